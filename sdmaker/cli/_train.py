"""``sdmaker train vae|unet|export`` and ``sdmaker eval``: sdmaker's own training pipeline, from the shell."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from sdmaker.cli._common import console, err_console, get_settings, load_model_ref, setup_logging

__all__ = ["register"]

train_app = typer.Typer(help="Train the VAE, UNet or a LoRA adapter of a scene model (checkpoints, --resume, MLflow).",
                        no_args_is_help=True)

_Config = Annotated[Path, typer.Option("--config", "-c", help="Training config (JSON or YAML).", exists=True,
                                       dir_okay=False)]
_Resume = Annotated[bool, typer.Option("--resume", help="Continue from the checkpoint in --out, exactly.")]
_Quick = Annotated[bool, typer.Option("--quick", help="The seconds-long recipe of the config (tests).")]
_Out = Annotated[Path | None, typer.Option("--out", "-o", help="Run folder (default: runs/<config name>).")]
_NoTrack = Annotated[bool, typer.Option("--no-track", help="Do not log to MLflow.")]
_Verbose = Annotated[bool, typer.Option("--verbose", "-v")]


def _run(kind: str, config: Path, resume: bool, quick: bool, out: Path | None, no_track: bool, verbose: bool,
         overrides: dict[str, Any] | None = None) -> None:
    from sdmaker.training._config import load_config
    from sdmaker.training._trainer import train

    setup_logging(verbose)
    settings = get_settings()
    cfg = load_config(config, quick=quick, kind=kind, overrides=overrides)
    if kind == "lora":  # the base model by name (built-in, store) or folder, and its digest
        from sdmaker.store import resolve_model
        from sdmaker.training._config import prepare_lora

        resolved = resolve_model(cfg["base"], settings)
        cfg = prepare_lora(cfg, resolved.path, resolved.digest)
    out = out or Path("runs") / (cfg["name"] + ("-quick" if quick else ""))
    columns = (TextColumn(f"[bold]train {kind}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("loss {task.fields[loss]:.4f}"), TextColumn("{task.fields[ips]:.1f} img/s"),
               TimeElapsedColumn(), TimeRemainingColumn())
    with Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task("train", total=cfg["steps"], loss=float("nan"), ips=0.0)

        def on_step(step: int, total: int, metrics: dict[str, float]) -> None:
            progress.update(task, completed=step, loss=metrics["loss"], ips=metrics["images_per_s"])

        result = train(cfg, out, resume=resume, mlflow_dir=None if no_track else settings.mlflow_dir,
                       progress=on_step)
    if result.status != "finished":
        err_console.print(f"[yellow]training stopped ({result.status}) at step {result.steps_done}; the last good "
                          f"checkpoint is in {out}[/yellow]")
        raise typer.Exit(1)
    loss = "n/a (no steps left)" if result.final_loss is None else f"{result.final_loss:.4f}"
    console.print(f"{kind} trained: {result.steps_done} steps in {result.seconds:.0f}s, final loss {loss}; "
                  f"model: {result.model_dir}", highlight=False)
    if result.run_id:
        console.print(f"MLflow run {result.run_id} in {settings.mlflow_dir}", highlight=False)


@train_app.command("vae")
def train_vae(config: _Config, resume: _Resume = False, quick: _Quick = False, out: _Out = None,
              no_track: _NoTrack = False, verbose: _Verbose = False) -> None:
    """Train the AutoencoderKL (64x64 images <-> latents)."""
    _run("vae", config, resume, quick, out, no_track, verbose)


@train_app.command("unet")
def train_unet(config: _Config, resume: _Resume = False, quick: _Quick = False, out: _Out = None,
               vae: Annotated[Path | None, typer.Option(help="Trained VAE folder (overrides the config's).")] = None,
               no_track: _NoTrack = False, verbose: _Verbose = False) -> None:
    """Train the text-conditioned UNet on latents of the trained VAE."""
    _run("unet", config, resume, quick, out, no_track, verbose,
         overrides={"vae": str(vae.resolve())} if vae else None)


@train_app.command("lora")
def train_lora(config: _Config, resume: _Resume = False, quick: _Quick = False, out: _Out = None,
               base: Annotated[str | None, typer.Option(help="Base model: built-in name, store name or folder "
                                                             "(overrides the config's).")] = None,
               no_track: _NoTrack = False, verbose: _Verbose = False) -> None:
    """Train a LoRA adapter (PEFT) on a frozen base model's UNet; writes it in diffusers' LoRA layout."""
    _run("lora", config, resume, quick, out, no_track, verbose, overrides={"base": base} if base else None)


@train_app.command("export")
def train_export(
    vae: Annotated[Path, typer.Option(help="Trained VAE folder (runs/<vae>/model).", exists=True)],
    unet: Annotated[Path, typer.Option(help="Trained UNet folder (runs/<unet>/model).", exists=True)],
    dest: Annotated[Path, typer.Option(help=(
        "Where to write the model files (the built-in one is sdmaker/models/mini: needs --force)."))],
    name: Annotated[str, typer.Option()] = "mini",
    force: Annotated[bool, typer.Option("--force", help="Replace --dest if it exists.")] = False,
) -> None:
    """Package a trained VAE + UNet as built-in model files (fp16 safetensors, configs, defaults)."""
    from sdmaker.training._export import check_export_dest, export_builtin

    setup_logging(False)
    check_export_dest(dest, overwrite=force)  # before torch and the weights are loaded
    path = export_builtin(vae, unet, dest, name=name, overwrite=force)
    console.print(str(path), highlight=False)


def eval_cmd(
    model: Annotated[str, typer.Argument(help="Model folder, store name, or built-in name (mini).")] = "mini",
    steps: Annotated[int | None, typer.Option("--steps", help="Denoising steps (default: the model's).")] = None,
    scheduler: Annotated[str | None, typer.Option(help="Scheduler (default: the model's).")] = None,
    guidance_scale: Annotated[float | None, typer.Option("--guidance-scale", "-g")] = None,
    deep_cache: Annotated[int | None, typer.Option("--deep-cache", help="DeepCache interval (0 = off; default: "
                                                                         "the model's).")] = None,
    n: Annotated[int | None, typer.Option("--n", help="Number of held-out prompts or cases (default: 128 for "
                                                      "txt2img, 32 for the edit tasks).")] = None,
    seed: Annotated[int, typer.Option(help="Base seed of the generations.")] = 0,
    prompt_seed: Annotated[int | None, typer.Option(help="Draw another prompt set (for tuning settings).")] = None,
    prompt_set: Annotated[str, typer.Option("--set", help="Prompt set: base (held-out templates), paraphrase "
                                                          "(held-out phrasings) or concept (heart/pink).")] = "base",
    lora: Annotated[Path | None, typer.Option("--lora", help="Fuse this LoRA adapter (folder or .safetensors) "
                                                             "into the model first.")] = None,
    lora_scale: Annotated[float, typer.Option("--lora-scale", help="Scale of the --lora adapter.")] = 1.0,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
    sheet: Annotated[Path | None, typer.Option(help="Also write a contact sheet PNG of the generations.")] = None,
    kind: Annotated[str, typer.Option("--task", help="txt2img (the prompt set), or the edit evals: img2img (red circle "
                                           "recoloured blue at strength 0.7), inpaint (a yellow star into a "
                                           "masked right half).")] = "txt2img",
    no_track: _NoTrack = False,
    verbose: _Verbose = False,
) -> None:
    """Generate the held-out prompt set and score it per attribute with the scene analyser."""
    from sdmaker.errors import ConfigError
    from sdmaker.training._eval import EVAL_SEED, PROMPT_SETS, evaluate
    from sdmaker.training._tracking import Tracker

    setup_logging(verbose)
    if kind not in ("txt2img", "img2img", "inpaint"):
        raise typer.BadParameter(f"{kind!r}: one of txt2img, img2img, inpaint", param_hint="--task")
    if prompt_set not in PROMPT_SETS:
        raise ConfigError(f"--set {prompt_set!r} is not valid; allowed: {', '.join(PROMPT_SETS)}", field="set",
                          value=prompt_set)
    settings = get_settings()
    loaded = load_model_ref(model, settings)
    name = loaded.name
    adapter: dict[str, Any] = {}
    if lora is not None:
        from sdmaker.training._lora import fuse_lora

        adapter = fuse_lora(loaded, lora, scale=lora_scale)
        name = f"{name}+lora:{Path(adapter['path']).parent.name}@{lora_scale:g}"
    if kind != "txt2img":
        _edit_eval(loaded, kind, n=32 if n is None else n, steps=steps, scheduler=scheduler, deep_cache=deep_cache,
                   guidance_scale=guidance_scale, seed=seed, as_json=as_json, sheet=sheet)
        return
    n = 128 if n is None else n
    with Progress(TextColumn("[bold]eval"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=err_console, transient=True) as progress:
        task = progress.add_task("eval", total=n)
        report = evaluate(loaded, n=n, steps=steps, scheduler=scheduler, guidance_scale=guidance_scale,
                          deep_cache_interval=deep_cache, seed=seed,
                          prompt_seed=EVAL_SEED if prompt_seed is None else prompt_seed, prompt_set=prompt_set,
                          on_batch=lambda done, total: progress.update(task, completed=done),
                          keep_images=sheet is not None)
    if sheet is not None:
        from sdmaker.training._sampling import contact_sheet

        contact_sheet([r["image"] for r in report.items], [r["prompt"] for r in report.items],
                      cols=8).save(sheet)
    if not no_track:
        tracker = Tracker(settings.mlflow_dir, "sdmaker-eval")
        tracker.start(f"eval-{name}", {"model": name, "model_digest": loaded.digest, "n": n, **report.settings,
                                       **({"lora": adapter["path"], "lora_scale": lora_scale} if adapter else {})})
        tracker.log_metrics(report.metrics, 0)
        for group, values in report.groups.items():
            tracker.log_metrics({f"{group}.{k}": v for k, v in values.items() if k != "n"}, 0)
        tracker.end()
    data = {"model": name, "digest": loaded.digest, **report.to_dict(),
            **({"lora": {k: adapter.get(k) for k in ("path", "scale", "base_digest")}} if adapter else {})}
    if as_json:
        console.print_json(json.dumps(data))
        return
    keys = ("overall", "color", "shape", "size", "position", "relation", "two_shape_both", "background", "drawn", "all")
    table = Table(title=f"eval {name} ({n} held-out {prompt_set} prompts, {report.settings['num_inference_steps']} steps, "
                        f"{report.settings['scheduler']}, guidance {report.settings['guidance_scale']})")
    table.add_column("metric")
    table.add_column("all", justify="right")
    groups = [g for g in ("one", "one_heldout", "two", "two_heldout", "heldout_pairs", "para_one", "para_two",
                          "concept_one", "concept_two", "new_shape", "new_color_shape", "new_color_background")
              if g in report.groups]
    for g in groups:
        table.add_column(f"{g} (n={int(report.groups[g]['n'])})", justify="right")
    for key in keys:
        cells = [f"{report.metrics[key]:.1%}" if key in report.metrics else "-"]
        cells += [f"{report.groups[g][key]:.1%}" if key in report.groups[g] else "-" for g in groups]
        table.add_row(key, *cells)
    console.print(table)
    console.print(f"{report.seconds:.0f}s", highlight=False)


def _edit_eval(loaded: Any, task: str, *, n: int, steps: int | None, scheduler: str | None, deep_cache: int | None,
               guidance_scale: float | None, seed: int, as_json: bool, sheet: Path | None) -> None:
    """``sdmaker eval --task img2img|inpaint``: the edit evals (:mod:`sdmaker.training._edit_eval`)."""
    from sdmaker.training._edit_eval import evaluate_edits

    with Progress(TextColumn(f"[bold]eval {task}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=err_console, transient=True) as progress:
        bar = progress.add_task("eval", total=n)
        report = evaluate_edits(loaded, task, n=n, steps=steps, scheduler=scheduler, deep_cache_interval=deep_cache,
                                guidance_scale=guidance_scale, seed=seed, on_batch=lambda done, total: progress.update(bar, completed=done),
                                keep_images=sheet is not None)
    if sheet is not None:
        from sdmaker.training._sampling import contact_sheet

        images = [im for r in report.rows for im in (r["source"], r["image"])]
        contact_sheet(images, [r["prompt"] for r in report.rows for _ in (0, 1)], cols=8).save(sheet)
    data = {"model": loaded.name, "digest": loaded.digest, **report.to_dict()}
    if as_json:
        console.print_json(json.dumps(data))
        return
    table = Table(title=f"eval {task} {loaded.name} ({report.n} held-out cases, {report.settings['num_inference_steps']}"
                        f" steps x strength {report.settings['strength']})")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in report.metrics.items():
        table.add_row(key, f"{value:.4f}" if key == "unmasked_diff" else f"{value:.1%}")
    console.print(table)
    console.print(f"{report.seconds:.0f}s", highlight=False)


def register(app: typer.Typer) -> None:
    app.add_typer(train_app, name="train")
    app.command("eval")(eval_cmd)
