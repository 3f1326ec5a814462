"""``sdmaker generate``: the seed's notebook step, from the shell."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Annotated, Any

import typer

from sdmaker.cli._common import console, err_console, get_settings, load_model_ref, setup_logging, write_new_file
from sdmaker.cli._progress import image_bars
from sdmaker.cli._request_options import request_from_options, request_options
from sdmaker.config import check_engine

__all__ = ["DEFAULT_MODEL", "register"]

#: The embedded model used when --model is not given.
DEFAULT_MODEL = "mini"
_EXT = {"jpeg": "jpg", "png": "png", "webp": "webp"}


@request_options(descriptions={"format": "Output image format: png here by default (it carries the recipe)."})
def generate_cmd(
    request_values: dict[str, Any],
    model: Annotated[str | None, typer.Option("--model", "-m", help=(
        "Store name, model folder, model.tar.gz, s3:// URI or hub id. Default: the built-in 'mini'."))] = None,
    from_image: Annotated[Path | None, typer.Option("--from", help=(
        "Regenerate from the recipe embedded in an sdmaker PNG; other options override it."))] = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder.")] = Path("sdmaker-out"),
    device: Annotated[str | None, typer.Option(help="auto, cpu or cuda.")] = None,
    dtype: Annotated[str | None, typer.Option(help="auto, fp32, bf16 or fp16.")] = None,
    allow_pickle: Annotated[bool, typer.Option("--allow-pickle", help="Accept .bin/.ckpt weights.")] = False,
    engine: Annotated[str | None, typer.Option(help=(
        "Whose compiled UNet passes to use when a serving worker already built them here (SDMAKER_ENGINE: auto, "
        "torch or openvino); generate itself never builds any."))] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Generate images from a prompt and print the written paths (existing files are never overwritten).

    Example: sdmaker generate -p "a large red circle on a white background" --seed 1 -o out/
    """
    setup_logging(verbose)  # first: it quiets third-party logs before they are imported
    settings = get_settings()
    if engine is not None:
        settings = replace(settings, engine=check_engine(engine, field="engine"))
    recipe = None
    if from_image is not None:
        from sdmaker.engine import read_recipe

        recipe = read_recipe(from_image)
    options = dict(request_values)
    if options.get("format") is None and recipe is None:
        options["format"] = "png"
    # validated before torch is imported (sdmaker.engine): a bad --height fails at once, not 10 s later
    if recipe and recipe.get("inputs"):  # an edit: the recipe keeps the input images' digests, not the images
        _check_inputs(recipe["inputs"], options)
    request = request_from_options(options, recipe["request"] if recipe else None,
                                   missing_prompt="give --prompt (or --from IMAGE.png)")
    from sdmaker.engine import generate

    ref = model or (recipe["model"] if recipe else DEFAULT_MODEL)
    loaded = load_model_ref(ref, settings, allow_pickle=allow_pickle, device=device, dtype=dtype)
    if recipe and recipe.get("model_digest") and recipe["model_digest"] != loaded.digest:
        err_console.print(f"[yellow]warning:[/yellow] {ref} has digest {loaded.digest[:12]}, the image was made "
                          f"with {recipe['model_digest'][:12]}: the result will differ", highlight=False)
    _use_built_passes(loaded, settings)
    resolved = request.resolve(loaded.defaults)
    with image_bars(len(resolved.image_seeds()), resolved.num_inference_steps, resolved.image_seeds()) as bars:
        result = generate(loaded, resolved, on_progress=lambda p: bars.step(p.step, p.total, p.eta_s))
    for i, img in enumerate(result.images):
        path = write_new_file(out, f"{i:02d}-seed{img.seed}", _EXT[resolved.format], result.encode(i))
        console.print(str(path), highlight=False, soft_wrap=True)


def _use_built_passes(loaded: Any, settings: Any) -> None:
    """Run on the compiled UNet passes a serving worker of this model already built on this machine, if any.

    Never builds (minutes a one-shot run would not earn back); they load in the background while the first
    steps run eager. Same settings as a worker: ``SDMAKER_COMPILE``, ``SDMAKER_ENGINE``.
    """
    from sdmaker.engine import enable_compiled_steps

    enable_compiled_steps(loaded, settings.compile, settings.home / "cache" / "compiled", max_sizes=1,
                          cache_bytes=settings.compile_cache_bytes, engine=settings.engine, build=False,
                          static_batches=settings.openvino_static)


def _check_inputs(digests: dict[str, Any], options: dict[str, Any]) -> None:
    """An edited image regenerates from its recipe only with the same input files: refuse missing ones, warn on others."""
    import hashlib

    from sdmaker.schema import decode_input_image

    for name, option in (("image", "--image"), ("mask_image", "--mask")):
        want = digests.get(f"{name}_sha256")
        if want is None:
            continue
        value = options.get(name)
        if value is None:
            raise typer.BadParameter(f"this image was made from an input {name} (sha256 {want[:12]}): give it with "
                                     f"{option}", param_hint=option)
        got = hashlib.sha256(decode_input_image(value, name)).hexdigest()
        if got != want:
            err_console.print(f"[yellow]warning:[/yellow] {option} has sha256 {got[:12]}, the image was made from "
                              f"{want[:12]}: the result will differ", highlight=False)


def register(app: typer.Typer) -> None:
    app.command("generate")(generate_cmd)
