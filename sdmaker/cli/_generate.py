"""``sdmaker generate``: the seed's notebook step, from the shell."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from sdmaker.cli._common import console, get_settings, setup_logging
from sdmaker.schema import parse_request

__all__ = ["register"]


def generate_cmd(
    prompt: Annotated[list[str] | None, typer.Option("--prompt", "-p", help="Prompt; repeat for a batch.")] = None,
    model: Annotated[str | None, typer.Option("--model", "-m", help="Store name or model folder.")] = None,
    negative_prompt: Annotated[list[str] | None, typer.Option("--negative-prompt", "-n")] = None,
    height: Annotated[int | None, typer.Option(help="Pixels, multiple of 8 (default: model's, else 512).")] = None,
    width: Annotated[int | None, typer.Option(help="Pixels, multiple of 8 (default: model's, else 512).")] = None,
    steps: Annotated[int | None, typer.Option("--steps", "--num-inference-steps")] = None,
    guidance_scale: Annotated[float | None, typer.Option("--guidance-scale", "-g")] = None,
    num_images: Annotated[int | None, typer.Option("--num-images", "--num-images-per-prompt")] = None,
    seed: Annotated[int | None, typer.Option(help="Base seed; image i uses seed+i.")] = None,
    scheduler: Annotated[str | None, typer.Option(help="ddim, pndm, euler, euler_a, dpmpp_2m, unipc, ...")] = None,
    fmt: Annotated[str, typer.Option("--format", help="jpeg, png (with recipe) or webp.")] = "png",
    quality: Annotated[int, typer.Option(help="JPEG/WebP quality 1..100.")] = 90,
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder.")] = Path("sdmaker-out"),
    device: Annotated[str | None, typer.Option(help="auto, cpu or cuda.")] = None,
    dtype: Annotated[str | None, typer.Option(help="auto, fp32, bf16 or fp16.")] = None,
    allow_pickle: Annotated[bool, typer.Option("--allow-pickle", help="Accept .bin/.ckpt weights.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Generate images from a prompt and print the written paths."""
    from sdmaker.engine import generate, load_model

    setup_logging(verbose)
    settings = get_settings()
    data: dict[str, Any] = {"format": fmt, "quality": quality}
    if prompt:
        data["prompt"] = prompt[0] if len(prompt) == 1 else prompt
    else:
        raise typer.BadParameter("give --prompt", param_hint="--prompt")
    if negative_prompt:
        data["negative_prompt"] = negative_prompt[0] if len(negative_prompt) == 1 else negative_prompt
    for key, value in (("height", height), ("width", width), ("num_inference_steps", steps),
                       ("guidance_scale", guidance_scale), ("num_images_per_prompt", num_images),
                       ("seed", seed), ("scheduler", scheduler)):
        if value is not None:
            data[key] = value
    request = parse_request(data)  # validate before loading any weights
    if model is None:
        raise typer.BadParameter("give --model", param_hint="--model")
    loaded = load_model(Path(model), device=device or settings.device, dtype=dtype or settings.dtype,
                        allow_pickle=allow_pickle)
    resolved = request.resolve(loaded.defaults)
    with Progress(TextColumn("[bold]generating"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, transient=True) as progress:
        task = progress.add_task("steps", total=resolved.num_inference_steps)
        result = generate(loaded, resolved, on_step=lambda step, total: progress.update(task, completed=step, total=total))
    out.mkdir(parents=True, exist_ok=True)
    ext = {"jpeg": "jpg", "png": "png", "webp": "webp"}[resolved.format]
    for i, img in enumerate(result.images):
        path = out / f"{i:02d}-seed{img.seed}.{ext}"
        path.write_bytes(result.encode(i))
        console.print(str(path), highlight=False)


def register(app: typer.Typer) -> None:
    app.command("generate")(generate_cmd)
