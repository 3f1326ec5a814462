"""``sdmaker model tune NAME``: find the fastest recipe that keeps a stored model's pictures, make it its default.

The search lives in :mod:`sdmaker.tuning`; this module loads the model, shows progress and the table of
candidates, and writes the choice into the store (:meth:`sdmaker.store.Store.set_tuned`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from sdmaker.cli._common import console, err_console
from sdmaker.config import Settings
from sdmaker.errors import InvalidRequestError

__all__ = ["candidate_table", "fast_dtypes", "read_prompts", "tune_stored"]


def read_prompts(path: Path) -> list[str]:
    """One prompt per non-empty line of ``path`` (at least 4, at most 256)."""
    try:
        prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidRequestError(f"cannot read the prompt file {path}: {exc}", field="prompts") from exc
    if not 4 <= len(prompts) <= 256:
        raise InvalidRequestError(f"{path} holds {len(prompts)} prompts; give 4 to 256 (16 or more recommended), "
                                  "one per line", field="prompts", value=len(prompts), allowed="4..256")
    return prompts


def fast_dtypes(device: str) -> list[str]:
    """The precisions worth trying besides fp32 on ``device``: fp16 on CUDA, bf16 on CPUs with native bf16."""
    from sdmaker.engine import cpu_has_native_bf16

    if device.startswith("cuda"):
        return ["fp16"]
    return ["bf16"] if cpu_has_native_bf16() else []


def candidate_table(result: Any) -> Table:
    """Every measured candidate: time per image, speed-up over the reference, distance, kept or rejected."""
    ref_time = result.reference.seconds_per_image or 0.0
    table = Table("#", "recipe", "s/image", "speed-up", f"distance (bar {result.threshold:.4g})", "status", "note",
                  title=f"model tune: {result.prompts} prompts at {result.width}x{result.height}, "
                        f"guidance {result.guidance_scale:g}, on {result.device}")
    table.columns[-1].overflow = "fold"
    styles = {"chosen": "bold green", "kept": "green", "rejected": "red", "reference": "cyan"}
    for i, c in enumerate(result.candidates, 1):
        t = c.seconds_per_image
        table.add_row(str(i), c.recipe.label(), "-" if t is None else f"{t:.3f}",
                      "-" if not t or not ref_time else f"{ref_time / t:.2f}x",
                      "-" if c.distance is None else f"{c.distance:.4f}",
                      f"[{styles.get(c.status, '')}]{c.status}[/]", c.note)
    return table


def tune_stored(name: str, settings: Settings, *, height: int | None = None, width: int | None = None,
                threshold: float | None = None, prompts: list[str] | None = None, device: str | None = None,
                seed: int = 0) -> Any:
    """Tune the stored model ``name`` (progress bar + table on the console) and write the choice to the store."""
    from sdmaker.engine import load_model, resolve_placement
    from sdmaker.store import Store
    from sdmaker.tuning import QUALITY_THRESHOLD, tune

    store = Store(settings.store_dir, settings=settings)
    manifest = store.get(name)
    path = store.model_path(name)
    device = resolve_placement(device or settings.device, "fp32").device
    dtypes = fast_dtypes(device)

    def load(dtype: str) -> Any:
        return load_model(path, name=name, digest=manifest.digest, device=device, dtype=dtype)

    with Progress(TextColumn("[bold]tuning[/bold] {task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), console=err_console, transient=True) as bar:
        task = bar.add_task("reference recipe", total=24)

        def on_candidate(candidate: Any, done: int) -> None:
            total = bar.tasks[0].total or 0
            bar.update(task, completed=done, total=max(total, done + 1),
                       description=f"{candidate.recipe.label()}: {candidate.status}")

        result = tune(load, dtypes=dtypes, prompts=prompts, height=height, width=width,
                      threshold=QUALITY_THRESHOLD if threshold is None else threshold, seed=seed,
                      on_candidate=on_candidate)
    console.print(candidate_table(result))
    chosen = result.chosen.recipe
    record = {**result.record(), "dtypes_tried": ["fp32", *dtypes]}
    updated = store.set_tuned(name, chosen.card_defaults(), dtype=chosen.dtype if dtypes else None, record=record)
    verdict = ("kept the reference recipe: no faster recipe stayed within the bar"
               if result.chosen is result.reference else
               f"{result.speedup:.1f}x faster than the reference ({result.reference.recipe.label()}), "
               f"distance {result.chosen.distance:.4f} <= {result.threshold:.4g}")
    console.print(f"[bold]{name}[/bold] now defaults to [bold]{chosen.label()}[/bold]: {verdict}. "
                  f"Tuned in {result.seconds:.0f}s; digest {updated.digest[:12]}. "
                  f"Undo with `sdmaker model tune {name} --reset`.", highlight=False, soft_wrap=True)
    return result
