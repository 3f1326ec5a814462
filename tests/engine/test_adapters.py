"""LoRA adapters per request: solo runs equal diffusers' own LoRA loading, mixed-adapter batches equal solo
runs, every key layout gives the same images, and bad adapter requests fail alone with a clear error."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from sdmaker.engine import AdapterCache, AdapterLibrary, StepBatcher, generate, load_model
from sdmaker.errors import InvalidRequestError, ModelNotFoundError
from sdmaker.files import tree_digest
from sdmaker.schema import GenerateRequest
from sdmaker.store import Store


@pytest.fixture(scope="module")
def store(sd1_dir: Path, lora_files: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Store:
    store = Store(tmp_path_factory.mktemp("lora-store"))
    digest = tree_digest(sd1_dir)
    for name, path in lora_files.items():
        store.import_lora(path, name=name, base="sd1-tiny", base_digest=digest, base_unet=sd1_dir / "unet")
    store.import_lora(lora_files["a"], name="other-base", base="elsewhere", base_digest="0" * 64)
    return store


@pytest.fixture(scope="module")
def model(sd1_dir: Path, store: Store):  # type: ignore[no-untyped-def]
    model = load_model(sd1_dir, dtype="fp32")  # exact comparisons below are fp32 facts
    model.adapters = AdapterLibrary(store=store)
    return model


def _req(loras: Any = None, seed: int = 5, **kw: Any) -> GenerateRequest:
    return GenerateRequest(**{"prompt": "a red circle", "height": 64, "width": 64, "num_inference_steps": 3,
                              "guidance_scale": 7.5, "seed": seed, "loras": loras, **kw})


def _diffusers(model: Any, lora_dirs: dict[str, Path], weights: dict[str, float], seed: int = 5) -> np.ndarray:
    """The reference: diffusers' ``load_lora_weights`` + ``set_adapters`` on the same pipeline, called whole."""
    pipe = model.pipeline
    with model.lock:
        try:
            for name in weights:
                pipe.load_lora_weights(lora_dirs[name], adapter_name=name)
            pipe.set_adapters(list(weights), list(weights.values()))
            with torch.inference_mode():
                out = pipe(prompt="a red circle", height=64, width=64, num_inference_steps=3, guidance_scale=7.5,
                           generator=[torch.Generator("cpu").manual_seed(seed)], output_type="np")
        finally:
            pipe.unload_lora_weights()
    return np.asarray(out.images)


def test_solo_runs_equal_diffusers_lora_loading(model, lora_files: dict[str, Path]) -> None:  # type: ignore[no-untyped-def]
    dirs = {name: path.parent for name, path in lora_files.items()}
    plain = generate(model, _req()).arrays
    one = generate(model, _req([{"name": "a", "scale": 0.7}])).arrays
    two = generate(model, _req([{"name": "a", "scale": 0.5}, {"name": "b", "scale": 1.0}])).arrays
    assert float(np.abs(one - plain).max()) > 0.01  # type: ignore[operator]  # the adapter changes the image
    assert float(np.abs(one - _diffusers(model, dirs, {"a": 0.7})).max()) <= 1e-4  # type: ignore[operator]
    assert float(np.abs(two - _diffusers(model, dirs, {"a": 0.5, "b": 1.0})).max()) <= 1e-4  # type: ignore[operator]
    assert np.array_equal(generate(model, _req()).arrays, plain)  # type: ignore[arg-type]  # nothing left behind


@pytest.mark.parametrize("layout", ["kohya", "old"])
def test_every_key_layout_gives_the_same_images(model, layout: str) -> None:  # type: ignore[no-untyped-def]
    peft = generate(model, _req([{"name": "a", "scale": 0.8}])).arrays
    other = generate(model, _req([{"name": layout, "scale": 0.8}])).arrays
    assert float(np.abs(peft - other).max()) <= 1e-5  # type: ignore[operator]


def test_mixed_adapter_batch_equals_solo_runs(model) -> None:  # type: ignore[no-untyped-def]
    sets: list[Any] = [[{"name": "a"}], [{"name": "b"}], [{"name": "a", "scale": 0.5}, {"name": "b", "scale": 1.0}],
                       None, [{"name": "a", "scale": -1.0}]]
    reqs = [_req(s, seed=10 + i, guidance_scale=1.0 if i == 3 else 7.5) for i, s in enumerate(sets)]
    solo = [generate(model, r) for r in reqs]
    with StepBatcher(model, max_batch=8) as batcher:
        with model.lock:  # hold the batcher's first step until every request is queued
            futures = [batcher.submit_async(r) for r in reqs]
        results = [f.result() for f in futures]
        assert batcher.stats.max_rows == 9  # all five (4 with CFG) shared a UNet call
    for a, b in zip(solo, results, strict=True):
        assert float(np.abs(a.arrays - b.arrays).max()) <= 1e-4
        assert a.adapters == b.adapters


def test_the_recipe_lists_adapters_with_their_digests(model, store: Store) -> None:  # type: ignore[no-untyped-def]
    result = generate(model, _req([{"name": "a", "scale": 0.5}], format="png"))
    recipe = result.recipe(0)
    assert recipe["adapters"] == [{"name": "a", "scale": 0.5, "digest": store.get("a").lora.sha256}]  # type: ignore[union-attr]
    assert recipe["request"]["loras"] == [{"name": "a", "scale": 0.5}]
    assert "adapters" not in generate(model, _req()).recipe(0)
    assert "loras" not in generate(model, _req()).recipe(0)["request"]


def test_wrong_base_and_unknown_names_fail_alone(model, sd1_dir: Path) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(InvalidRequestError) as info:
        generate(model, _req([{"name": "other-base"}]))
    assert "0" * 64 in info.value.message and tree_digest(sd1_dir) in info.value.message
    assert info.value.field == "loras" and info.value.http_status == 400
    with pytest.raises(ModelNotFoundError, match="nope"):
        generate(model, _req([{"name": "nope"}]))
    with StepBatcher(model, max_batch=4) as batcher:
        good = batcher.submit_async(_req([{"name": "a"}]))
        with pytest.raises(InvalidRequestError, match="digest"):
            batcher.submit_async(_req([{"name": "other-base"}]))
        assert good.result().adapters[0]["name"] == "a"


def test_no_adapters_installs_no_hooks_and_solo_runs_merge_and_restore(model, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    calls: list[str] = []
    original = torch.nn.Module.register_forward_hook

    def spy(self: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        calls.append(type(self).__name__)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.nn.Module, "register_forward_hook", spy)
    unet = model.pipeline.unet
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    generate(model, _req())
    generate(model, _req([{"name": "a"}, {"name": "b", "scale": -0.5}]))  # alone: merged into the weights
    assert calls == []
    assert all(torch.equal(before[k], v) for k, v in unet.state_dict().items())  # restored bit for bit
    with StepBatcher(model, max_batch=4) as batcher:  # in a batch: per-row hooks, removed after each call
        batcher.submit(_req([{"name": "a"}]))
    assert calls and all(not m._forward_hooks for m in unet.modules())


def test_the_cache_keeps_adapters_within_its_budget(model, store: Store) -> None:  # type: ignore[no-untyped-def]
    library = AdapterLibrary(store=store, cache=AdapterCache(max_bytes=1))
    first = library.adapter(model, "a")
    assert len(library.cache) == 0 and first.nbytes > 1  # bigger than the whole budget: used, not kept
    second = library.adapter(model, "b")
    library.cache.max_bytes = first.nbytes + second.nbytes - 1  # one at a time
    library.adapter(model, "a")
    again = library.adapter(model, "a")
    assert library.cache.hits == 1 and len(library.cache) == 1 and again.layers is library.adapter(model, "a").layers
    library.adapter(model, "b")  # a + b do not fit: the least recently used (a) goes
    assert library.cache.evictions == 1 and len(library.cache) == 1


def test_a_builtin_adapter_is_imported_for_mini_on_first_use(sdmaker_home: Path, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    from safetensors.torch import save_file

    from sdmaker.config import load_settings
    from sdmaker.engine import _adapters
    from sdmaker.store import LORA_FILE, resolve_model, unet_weight_shapes

    settings = load_settings()
    mini = resolve_model("mini", settings)
    shapes = unet_weight_shapes(mini.path / "unet")
    module = next(m for m in sorted(shapes) if m.endswith("attn1.to_q"))
    out_f, in_f = shapes[module]
    (tmp_path / "heart").mkdir()
    save_file({f"unet.{module}.lora_A.weight": torch.ones(2, in_f), f"unet.{module}.lora_B.weight": torch.ones(out_f, 2)},
              str(tmp_path / "heart" / LORA_FILE))
    monkeypatch.setattr(_adapters, "builtin_loras_dir", lambda: tmp_path)
    model = load_model(mini.path, name="mini", digest=mini.digest)
    model.adapters = AdapterLibrary(store=Store(settings.store_dir, settings=settings))
    result = generate(model, GenerateRequest(prompt="a pink heart", num_inference_steps=2, seed=1,
                                             loras=[{"name": "heart"}]))
    stored = Store(settings.store_dir).get("heart")
    assert stored.kind == "lora" and stored.lora.base == "mini" and stored.lora.base_digest == mini.digest  # type: ignore[union-attr]
    assert result.adapters[0]["digest"] == stored.lora.sha256  # type: ignore[union-attr]
    with pytest.raises(ModelNotFoundError, match="no LoRA adapter named 'absent'"):
        generate(model, GenerateRequest(prompt="x", num_inference_steps=1, loras=[{"name": "absent"}]))


def test_an_adapter_survives_tuning_its_base_and_another_base_is_refused(sdmaker_home: Path, tmp_path: Path) -> None:
    """Adapters are tied to the base's weights digest (UNet, text conditioning), not to its model card, which
    ``sdmaker model tune`` rewrites; adapters recorded with only a full digest are compared as before."""
    from safetensors.torch import save_file

    from sdmaker.config import load_settings
    from sdmaker.store import LORA_FILE, resolve_model, unet_weight_shapes

    settings = load_settings()
    mini = resolve_model("mini", settings)  # a store copy of the built-in mini, in this test's home
    shapes = unet_weight_shapes(mini.path / "unet")
    module = next(m for m in sorted(shapes) if m.endswith("attn2.to_v"))
    out_f, in_f = shapes[module]
    file = tmp_path / LORA_FILE
    save_file({f"unet.{module}.lora_A.weight": torch.full((2, in_f), 0.05),
               f"unet.{module}.lora_B.weight": torch.full((out_f, 2), 0.05)}, str(file))
    store = Store(settings.store_dir, settings=settings)
    store.import_lora(file, name="mine", base="mini", base_digest=mini.digest, base_weights_digest=mini.weights_digest,
                      base_unet=mini.path / "unet")
    store.import_lora(file, name="old-format", base="mini", base_digest=mini.digest, base_unet=mini.path / "unet")
    store.import_lora(file, name="elsewhere", base="other", base_digest="e" * 64, base_weights_digest="f" * 64)
    store.set_tuned("mini", {"num_inference_steps": 3, "guidance_scale": 5.0}, dtype=None, record={"by": "test"})
    tuned = resolve_model("mini", settings)
    assert tuned.digest != mini.digest and tuned.weights_digest == mini.weights_digest
    model = load_model(tuned.path, name="mini", digest=tuned.digest, dtype="fp32")
    model.adapters = AdapterLibrary(store=store)
    req = GenerateRequest(prompt="a red circle on the left", height=64, width=64, num_inference_steps=2, seed=3)
    plain = generate(model, req)
    adapted = generate(model, req.model_copy(update={"loras": [{"name": "mine", "scale": 1.0}]}))
    assert adapted.adapters[0]["name"] == "mine" and float(np.abs(adapted.arrays - plain.arrays).max()) > 0  # type: ignore[operator]
    # the weights digest from the manifest equals the one hashed from the folder (a model the store doesn't name)
    assert AdapterLibrary(store=None).model_weights_digest(load_model(tuned.path, name="x", dtype="fp32")) \
        == tuned.weights_digest
    with pytest.raises(InvalidRequestError) as info:
        generate(model, req.model_copy(update={"loras": [{"name": "elsewhere"}]}))
    message = info.value.message
    assert "f" * 64 in message and mini.weights_digest in message and tuned.digest in message  # type: ignore[operator]
    assert info.value.field == "loras" and info.value.http_status == 400
    with pytest.raises(InvalidRequestError) as info:  # an adapter recorded before weights digests: full digests
        generate(model, req.model_copy(update={"loras": [{"name": "old-format"}]}))
    assert mini.digest in info.value.message and tuned.digest in info.value.message
