"""Progress reports and previews: shapes, the fit against the model's VAE, and images unchanged with previews on."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from sdmaker.engine import (
    LatentPreview,
    StepBatcher,
    StepProgress,
    fit_latent_preview,
    fit_preview_file,
    generate,
    load_model,
    preview_interval,
    read_latent_preview,
)
from sdmaker.errors import InvalidRequestError
from sdmaker.files import preview_factors_path
from sdmaker.models import assemble_builtin, is_builtin_ready
from sdmaker.schema import GenerateRequest, parse_request

pytestmark = pytest.mark.skipif(not is_builtin_ready("mini"), reason="mini weights not committed in this checkout")


@pytest.fixture(scope="module")
def mini(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    folder = assemble_builtin("mini", tmp_path_factory.mktemp("mini") / "mini")
    return load_model(folder, dtype="fp32")


def _req(**kw: object) -> GenerateRequest:
    base: dict[str, object] = {"prompt": "a red circle", "height": 64, "width": 64, "num_inference_steps": 6,
                               "seed": 7, "num_images_per_prompt": 2}
    base.update(kw)
    return GenerateRequest(**base)


def _corr(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.astype(np.float64).ravel(), b.astype(np.float64).ravel())[0, 1])


def test_preview_fields_are_validated() -> None:
    with pytest.raises(InvalidRequestError) as err:
        parse_request({"prompt": "x", "preview": "full"})
    assert err.value.fields["field"] == "preview"
    with pytest.raises(InvalidRequestError) as err:
        parse_request({"prompt": "x", "preview_every": -1})
    assert err.value.fields["field"] == "preview_every"
    assert preview_interval("none", 3, 10) == 0
    assert preview_interval("approx", 0, 10) == 1
    assert preview_interval("vae", 0, 20) == 5
    assert preview_interval("vae", 2, 20) == 2


def test_mini_ships_its_factors(mini) -> None:  # type: ignore[no-untyped-def]
    assert isinstance(mini.latent_preview, LatentPreview)
    assert mini.latent_preview.matrix.shape == (4, 3)


@pytest.mark.parametrize("kind", ["approx", "vae"])
def test_previews_have_the_image_shape_and_leave_images_unchanged(mini, kind: str) -> None:  # type: ignore[no-untyped-def]
    reports: list[StepProgress] = []
    plain = generate(mini, _req())
    shown = generate(mini, _req(preview=kind, preview_every=2), on_progress=reports.append)
    assert np.array_equal(plain.arrays, shown.arrays)  # type: ignore[arg-type]
    assert [r.step for r in reports] == list(range(1, 7))
    assert all(r.total == 6 and r.elapsed_s >= 0 and r.eta_s is not None and r.eta_s >= 0 for r in reports)
    assert reports[-1].eta_s == 0
    with_previews = [r for r in reports if r.previews is not None]
    assert [r.step for r in with_previews] == [2, 4]  # none after the last step: the result follows
    for r in with_previews:
        assert r.preview_kind == kind
        assert len(r.previews) == 2  # type: ignore[arg-type]
        assert all(p.shape == (64, 64, 3) and p.dtype == np.uint8 for p in r.previews)  # type: ignore[union-attr]
    assert shown.encode(0) == plain.encode(0)  # the recipe leaves the progress fields out


def test_approx_preview_correlates_with_the_vae_decode(mini) -> None:  # type: ignore[no-untyped-def]
    from sdmaker.engine._loop import prepare_jobs, preview_images, run_unet

    approx_req = _req(preview="approx", num_inference_steps=8).resolve(mini.defaults)
    with mini.lock:
        (job,) = prepare_jobs(mini, [(approx_req, None)])
        while not job.done:
            run_unet(mini, [job])
        approx = preview_images(mini, job)
        job.request = job.request.model_copy(update={"preview": "vae"})
        decoded = preview_images(mini, job)
    for a, d in zip(approx, decoded, strict=True):
        assert a.shape == d.shape
        assert _corr(a, d) > 0.8, _corr(a, d)


def test_fit_on_a_random_model_and_the_file_beside_it(sd1_dir: Path, tmp_path: Path) -> None:
    import shutil

    folder = tmp_path / "model"
    shutil.copytree(sd1_dir, folder)
    model = load_model(folder, dtype="fp32")
    assert model.latent_preview is None  # nothing kept with it yet
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(folder / "vae")
    factors = fit_latent_preview(vae, count=4)
    channels = vae.config.latent_channels
    assert factors.matrix.shape == (channels, 3) and factors.bias.shape == (3,)
    # least squares against the VAE's own decode: on the fitting data, the map beats the best constant colour
    # and any perturbation of itself (a random VAE's decode is mostly not linear in its latents, so no more)
    from sdmaker.engine._preview import _synthetic_images

    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    with torch.inference_mode():
        latents = vae.encode(_synthetic_images(4, 16 * factor, seed=0)).latent_dist.mean * vae.config.scaling_factor
        decoded = vae.decode(latents / vae.config.scaling_factor).sample.clamp(-1, 1) / 2 + 0.5
    target = torch.nn.functional.avg_pool2d(decoded, factor).permute(0, 2, 3, 1).numpy().astype(np.float64)

    def linear(f: LatentPreview) -> np.ndarray:
        return np.einsum("nchw,ck->nhwk", latents.numpy().astype(np.float64), f.matrix) + f.bias

    err_fit = float(((linear(factors) - target) ** 2).mean())
    nudged = LatentPreview(matrix=factors.matrix * 1.1, bias=factors.bias)
    assert err_fit < float(((linear(nudged) - target) ** 2).mean())
    err_mean = float(((target - target.mean(axis=(0, 1, 2))) ** 2).mean())
    assert err_fit < err_mean
    path = fit_preview_file(folder)
    assert path == preview_factors_path(folder) and path.is_file()
    again = read_latent_preview(folder)
    assert again is not None and again.matrix.shape == (channels, 3)
    assert load_model(folder, dtype="fp32").latent_preview is not None


def test_model_without_factors_fits_them_on_first_use(sd1_model) -> None:  # type: ignore[no-untyped-def]
    sd1_model.latent_preview = None
    reports: list[StepProgress] = []
    generate(sd1_model, _req(num_inference_steps=2, preview="approx"), on_progress=reports.append)
    assert reports[0].previews is not None and reports[0].previews[0].shape == (64, 64, 3)
    assert sd1_model.latent_preview is not None


def test_malformed_factors_are_refused_by_name(tmp_path: Path) -> None:
    from sdmaker.errors import ModelFormatError

    with pytest.raises(ModelFormatError, match="channels x 3"):
        LatentPreview.from_json({"matrix": [[1, 2]], "bias": [0, 0, 0]})
    (tmp_path / "sdmaker.json").write_text(json.dumps({"latent_preview": {"matrix": "x"}}))
    with pytest.raises(ModelFormatError, match="sdmaker.json"):
        read_latent_preview(tmp_path)


def _batch(mini, reqs: list[GenerateRequest], reports: dict[int, list[StepProgress]] | None):  # type: ignore[no-untyped-def]
    """Run ``reqs`` together in one batch (held behind a gated first job so they are admitted at once)."""
    with StepBatcher(mini, max_batch=4) as batcher:
        gate = threading.Event()
        first = batcher.submit_async(_req(num_inference_steps=2, num_images_per_prompt=1),
                                     on_step=lambda s, t: gate.wait(10))
        jobs = [batcher.submit_async(r, on_progress=reports[i].append if reports is not None else None)
                for i, r in enumerate(reqs)]
        gate.set()
        first.result()
        results = [job.result() for job in jobs]
        assert batcher.stats.max_rows >= len(reqs)  # they really ran together
    return results


def test_batching_and_deepcache_with_previews(mini) -> None:  # type: ignore[no-untyped-def]
    reqs = [_req(seed=10 + i, num_images_per_prompt=1, num_inference_steps=4, deep_cache_interval=2,
                 preview=("approx", "vae", "none")[i], preview_every=1) for i in range(3)]
    reports: dict[int, list[StepProgress]] = {i: [] for i in range(3)}
    shown = _batch(mini, reqs, reports)
    plain = _batch(mini, [r.model_copy(update={"preview": "none"}) for r in reqs], None)
    for i in range(3):
        assert np.array_equal(shown[i].arrays, plain[i].arrays)  # bit-identical with previews on
        assert [r.step for r in reports[i]] == [1, 2, 3, 4]
        previews = [r for r in reports[i] if r.previews is not None]
        assert len(previews) == (0 if i == 2 else 3)
        for r in previews:
            assert r.previews[0].shape == (64, 64, 3)  # type: ignore[index]
