"""``sdmaker model ...``: import, list, show, tune, remove and package stored models."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.table import Table

from sdmaker.cli._common import console, err_console, get_settings, setup_logging

__all__ = ["byte_progress", "register"]

model_app = typer.Typer(help="Import, list, show, tune, remove and package models in the local store.",
                        no_args_is_help=True)

Verbose = Annotated[bool, typer.Option("--verbose", "-v", help="Log what happens.")]


@contextlib.contextmanager
def byte_progress(label: str) -> Iterator[Callable[[int, int], None]]:
    """A rich bytes progress bar (on stderr, transient) as a ``(done, total)`` callback."""
    with Progress(TextColumn(f"[bold]{label}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                  TimeRemainingColumn(), console=err_console, transient=True) as bar:
        task = bar.add_task(label, total=None)

        def update(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total or None)

        yield update


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000  # type: ignore[assignment]
    return f"{n} B"  # pragma: no cover


@model_app.command("import")
def import_cmd(
    src: Annotated[str, typer.Argument(help="Diffusers folder, model.tar.gz/.tar/.tar.zst, s3:// URI or hub id.")],
    name: Annotated[str, typer.Option("--name", "-n", help="Store name for the model.")],
    allow_pickle: Annotated[bool, typer.Option("--allow-pickle", help="Accept .bin/.ckpt/.pt weights "
                                               "(unpickling runs code; trusted sources only).")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace a model of the same name.")] = False,
    fit_previews: Annotated[bool, typer.Option("--fit-previews/--no-fit-previews", help=(
        "Fit the model's cheap preview factors (latent-to-RGB) against its VAE now and keep them with it; "
        "otherwise each worker fits them the first time a request asks for a preview."))] = True,
    tune: Annotated[bool, typer.Option("--tune", help="Then run `sdmaker model tune` on it (minutes; makes the "
                                       "fastest recipe that keeps its pictures its default).")] = False,
    base: Annotated[str | None, typer.Option("--base", help="For a LoRA adapter (a .safetensors file): the model it "
                                             "was trained on (store name, built-in, folder...). Its layers are "
                                             "checked against that model and its digest recorded.")] = None,
    verbose: Verbose = False,
) -> None:
    """Import a model, or a LoRA adapter file, into the store (content-addressed; identical files are stored once).

    Example: sdmaker model import ./sd-folder --name my-sd --tune
    Example: sdmaker model import heart.safetensors --name heart --base mini
    """
    from sdmaker.store import Store

    setup_logging(verbose)
    settings = get_settings()
    store = Store(settings.store_dir, settings=settings)
    if _is_lora_file(src):
        _import_lora(store, Path(src), name=name, base=base, allow_pickle=allow_pickle, overwrite=overwrite)
        return
    if base is not None:
        raise typer.BadParameter("--base is for LoRA adapter files (.safetensors); a model has no base",
                                 param_hint="--base")
    with byte_progress("importing") as progress:
        manifest = store.import_model(src, name=name, allow_pickle=allow_pickle, progress=progress,
                                      overwrite=overwrite)
    console.print(f"imported [bold]{manifest.name}[/bold]: {len(manifest.files)} files, "
                  f"{_size(manifest.total_size)}, digest {manifest.digest}", highlight=False, soft_wrap=True)
    path = store.model_path(manifest.name)
    if fit_previews and (path / "vae" / "config.json").is_file():
        _fit_previews(path)
    console.print(str(path), highlight=False, soft_wrap=True)
    if tune:
        from sdmaker.cli._tune import tune_stored

        tune_stored(manifest.name, settings)


def _is_lora_file(src: str) -> bool:
    """A single weights file (``.safetensors``, or a pickle ``.bin``/``.pt``...): a LoRA adapter, not a model."""
    from sdmaker.files import PICKLE_SUFFIXES

    path = Path(src)
    return path.is_file() and path.suffix.lower() in (".safetensors", *PICKLE_SUFFIXES)


def _import_lora(store: Any, src: Path, *, name: str, base: str | None, allow_pickle: bool, overwrite: bool) -> None:
    """``model import FILE``: a LoRA adapter (kind ``lora``) checked against ``--base`` when given."""
    import shutil

    from sdmaker.files import PICKLE_SUFFIXES
    from sdmaker.store import resolve_model

    settings = get_settings()
    staging: Path | None = None
    try:
        if src.suffix.lower() in PICKLE_SUFFIXES:
            if not allow_pickle:
                from sdmaker.errors import PickleRefusedError

                raise PickleRefusedError(f"{src} is a pickle file; unpickling can run arbitrary code. Convert it to "
                                         ".safetensors, or pass --allow-pickle if you trust the source.",
                                         model=str(src))
            from sdmaker.engine import pickle_lora_to_safetensors

            staging = store.staging_dir("lora-")
            src = pickle_lora_to_safetensors(src, staging / "adapter.safetensors")
        resolved = resolve_model(base, settings) if base is not None else None
        manifest = store.import_lora(src, name=name, base=resolved.name if resolved else None,
                                     base_digest=resolved.digest if resolved else None,
                                     base_weights_digest=resolved.weights_digest if resolved else None,
                                     base_unet=resolved.path / "unet" if resolved else None, overwrite=overwrite)
    finally:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
    info = manifest.lora
    assert info is not None
    console.print(f"imported LoRA [bold]{manifest.name}[/bold]: {info.layout} layout, rank {info.rank}, alpha "
                  f"{info.alpha if info.alpha is not None else 'per layer'}, {len(info.target_modules)} layers, "
                  f"{_size(manifest.total_size)}, sha256 {info.sha256}", highlight=False, soft_wrap=True)
    if resolved is not None:
        console.print(f"base: {resolved.name} (digest {resolved.digest}, weights digest {resolved.weights_digest}); "
                      "models with other weights refuse it (a new model card, as `model tune` writes, does not "
                      "matter)", highlight=False, soft_wrap=True)
    else:
        console.print("no --base: any model whose UNet layers fit it may use it", highlight=False, soft_wrap=True)


def _fit_previews(path: Path) -> None:
    """Fit and keep the approx-preview factors (``sdmaker.engine.fit_preview_file``); a failure only warns."""
    try:
        with err_console.status("fitting preview factors against the model's VAE"):
            from sdmaker.engine import fit_preview_file

            fit_preview_file(path)
    except Exception as exc:  # noqa: BLE001 - previews are optional: the import itself succeeded
        err_console.print(f"[yellow]warning:[/yellow] preview factors not fitted ({exc}); workers fit them on "
                          "first use", highlight=False)


@model_app.command("tune")
def tune_cmd(
    name: Annotated[str, typer.Argument(help="Store name.")],
    reset: Annotated[bool, typer.Option("--reset", help="Undo a tune: the model's defaults as imported.")] = False,
    height: Annotated[int | None, typer.Option(help="Tune at this height (default: the model's, else native).")] = None,
    width: Annotated[int | None, typer.Option(help="Tune at this width (default: the model's, else native).")] = None,
    threshold: Annotated[float | None, typer.Option(help="Largest mean 1-SSIM to the reference images that counts "
                                                    "as the same pictures (default: calibrated on mini).")] = None,
    prompts: Annotated[Path | None, typer.Option("--prompts", help="Prompt file, one per line (default: the "
                                                 "model's own set, else 16 general prompts).")] = None,
    device: Annotated[str | None, typer.Option(help="auto, cpu or cuda.")] = None,
    verbose: Verbose = False,
) -> None:
    """Measure scheduler x steps x DeepCache x precision on the model; make the fastest recipe that keeps its
    pictures (against its own 50-step fp32 recipe, same seeds) the model's default everywhere it is served.

    Example: sdmaker model tune my-sd ; sdmaker model tune my-sd --reset
    """
    from sdmaker.schema import parse_request
    from sdmaker.store import Store

    setup_logging(verbose)
    settings = get_settings()
    store = Store(settings.store_dir, settings=settings)
    if reset:
        before = store.get(name)
        after = store.reset_tuned(name)
        what = "restored its defaults as imported" if before.tuning else "was not tuned; nothing changed"
        console.print(f"{name}: {what} ({', '.join(f'{k}={v}' for k, v in after.defaults.items()) or 'no defaults'}"
                      f"; digest {after.digest[:12]})", highlight=False, soft_wrap=True)
        return
    if height is not None or width is not None:  # the schema's size rules, checked before any model is loaded
        parse_request({"prompt": "x", "height": height, "width": width})
    from sdmaker.cli._tune import read_prompts, tune_stored

    store.get(name)  # a missing model fails before torch is imported
    tune_stored(name, settings, height=height, width=width, threshold=threshold,
                prompts=read_prompts(prompts) if prompts is not None else None, device=device)


@model_app.command("list")
def list_cmd() -> None:
    """List stored models."""
    from sdmaker.store import Store

    store = Store(get_settings().store_dir)
    manifests = store.list()
    if not manifests:
        console.print(f"no models in {store.root} (import one with `sdmaker model import SRC --name NAME`)")
        return
    table = Table("name", "kind", "size", "files", "digest", "prediction", "native size", "created")
    for m in manifests:
        native = m.architecture.native_size
        kind = (f"lora r{m.lora.rank}, base {m.lora.base or 'any'}" if m.kind == "lora" and m.lora else m.kind)
        table.add_row(m.name, kind, _size(m.total_size), str(len(m.files)), m.digest[:12], m.prediction_type or "-",
                      f"{native}px" if native else "-", m.created.strftime("%Y-%m-%d %H:%M"))
    console.print(table)


@model_app.command("show")
def show_cmd(name: Annotated[str, typer.Argument(help="Store name.")]) -> None:
    """Show a stored model: digest, architecture, prediction type, defaults and files."""
    from sdmaker.store import Store

    store = Store(get_settings().store_dir)
    m = store.get(name)
    arch = m.architecture
    if m.kind == "lora" and m.lora is not None:
        lora = m.lora
        for key, value in (("name", m.name), ("kind", "lora"), ("sha256", lora.sha256), ("layout", lora.layout),
                           ("rank", lora.rank), ("alpha", lora.alpha if lora.alpha is not None else "per layer"),
                           ("base", lora.base or "- (any model whose layers fit)"), ("base digest", lora.base_digest or "-"),
                           ("base weights digest", lora.base_weights_digest or "- (checked by base digest)"),
                           ("size", _size(m.total_size)), ("source", m.source or "-"),
                           ("layers", f"{len(lora.target_modules)}: {', '.join(lora.target_modules)}")):
            console.print(f"[bold]{key + ':':<25}[/bold]{value}", highlight=False, soft_wrap=True)
        return
    rows = [
        ("name", m.name), ("digest", m.digest), ("weights digest", m.weights_digest),
        ("path", str(store.model_path(name))),
        ("size", f"{_size(m.total_size)} ({m.total_size} bytes, {len(m.files)} files)"),
        ("created", m.created.isoformat(timespec="seconds")), ("source", m.source or "-"),
        ("pipeline", arch.pipeline_class or "-"), ("prediction type", m.prediction_type or "-"),
        ("unet block_out_channels", str(arch.unet_block_out_channels or "-")),
        ("cross_attention_dim", str(arch.cross_attention_dim or "-")),
        ("sample size", f"{arch.sample_size} latent = {arch.native_size}px" if arch.native_size else "-"),
        ("text encoder", arch.text_encoder_class or "-"), ("tokenizer", arch.tokenizer_class or "-"),
        ("scheduler", arch.scheduler_class or "-"),
        ("defaults", ", ".join(f"{k}={v}" for k, v in m.defaults.items()) or "-"),
        ("tuned", _tuned_line(m.tuning.record) if m.tuning else "no (`sdmaker model tune " + m.name + "`)"),
    ]
    for key, value in rows:  # plain lines: digests and paths must never be cut to the terminal width
        console.print(f"[bold]{key + ':':<25}[/bold]{value}", highlight=False, soft_wrap=True)
    files = Table("file", "size", "sha256")
    files.columns[0].overflow = "fold"
    for f in m.files:
        files.add_row(f.path, _size(f.size), f.sha256[:16])
    console.print(files)


def _tuned_line(record: dict[str, Any]) -> str:
    """``model show``'s summary of a tuning record."""
    recipe, ref = record.get("recipe") or {}, record.get("reference") or {}

    def label(r: dict[str, Any]) -> str:
        dc = f" + DeepCache {r.get('deep_cache_interval')}" if (r.get("deep_cache_interval") or 0) > 1 else ""
        return f"{r.get('scheduler') or 'own scheduler'} {r.get('steps')} steps{dc}, {r.get('dtype')}"

    kept = recipe == ref
    dist = record.get("distance")
    return (f"{label(recipe)}" + (" (kept the reference: nothing faster stayed within the bar)" if kept else
            f", {record.get('speedup')}x faster than {label(ref)}, {record.get('metric')} {dist} <= "
            f"{record.get('threshold')}") + f"; at {record.get('width')}x{record.get('height')} on "
            f"{record.get('device')}, {len(record.get('candidates') or [])} candidates")


@model_app.command("rm")
def rm_cmd(name: Annotated[str, typer.Argument(help="Store name.")], verbose: Verbose = False) -> None:
    """Remove a model; blobs no other model uses are deleted."""
    from sdmaker.store import Store

    setup_logging(verbose)
    store = Store(get_settings().store_dir)
    store.remove(name)
    console.print(f"removed {name}", highlight=False)


@model_app.command("package")
def package_cmd(
    src: Annotated[str, typer.Argument(help="Store name, model folder (or any model reference).")],
    out: Annotated[str, typer.Option("--out", "-o", help="model.tar.gz | .tar | .tar.zst path or s3:// URI.")],
    code: Annotated[Path | None, typer.Option("--code", help="Folder copied under code/ (inference.py, "
                                              "requirements.txt, ...).")] = None,
    seed_handler: Annotated[bool, typer.Option("--seed-handler", help=(
        "Add the seed-style code/inference.py (+ pinned requirements.txt) when none is given, so the "
        "artifact also runs on SageMaker's Hugging Face container. Without it, sdmaker's default handler "
        "serves the model."))] = False,
    compression: Annotated[str, typer.Option(help="auto (from the output suffix), gzip, none or zstd.")] = "auto",
    verbose: Verbose = False,
) -> None:
    """Write a SageMaker model artifact: model files at the root, handler code under code/.

    Example: sdmaker model package my-sd --code ./code -o model.tar.gz
    """
    from sdmaker.store import format_for, is_s3_uri, package_model, resolve_model
    from sdmaker.store._s3 import client_for

    setup_logging(verbose)
    settings = get_settings()
    format_for(out, compression)  # type: ignore[arg-type]  # refuse a bad output name before resolving
    resolved = resolve_model(src, settings)
    with byte_progress("packaging") as progress:
        result = package_model(resolved.path, out, code_dir=code, seed_handler=seed_handler,
                               compression=compression,  # type: ignore[arg-type]
                               progress=progress, s3_client=client_for(settings) if is_s3_uri(out) else None)
    console.print(f"packaged {resolved.name} ({result.compression}, {result.files} files, "
                  f"{_size(result.bytes_in)} -> {_size(result.bytes_out)}, {result.seconds:.1f}s)", highlight=False)
    console.print(result.path, highlight=False, soft_wrap=True)


def register(app: typer.Typer) -> None:
    app.add_typer(model_app, name="model")
