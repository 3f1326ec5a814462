"""Progress bars for ``sdmaker generate`` and ``sdmaker invoke``: one rich bar per output image, with ETA.

The images of one request are denoised together, so their bars move together; each shows its own image
number and seed (when known), the step count, elapsed time and the engine's own ETA (time per step so far
times the steps left), which is steadier than rich's speed estimate over a handful of steps.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn

from sdmaker.cli._common import err_console

__all__ = ["ImageBars", "image_bars"]


def _eta(seconds: float | None) -> str:
    if seconds is None:
        return "eta -:--"
    seconds = max(0, round(seconds))
    return f"eta {seconds // 60}:{seconds % 60:02d}"


class ImageBars:
    """The bars of one request: :meth:`step` moves them all, :meth:`status` sets their label (queued...)."""

    def __init__(self, progress: Progress, images: int, total: int, seeds: list[int] | None = None) -> None:
        self.progress = progress
        self.tasks: list[TaskID] = []
        for i in range(images):
            seed = f" seed {seeds[i]}" if seeds and i < len(seeds) else ""
            self.tasks.append(progress.add_task(f"image {i + 1}/{images}{seed}", total=total, eta=_eta(None),
                                                state=""))

    def step(self, step: int, total: int, eta_s: float | None = None) -> None:
        for task in self.tasks:
            self.progress.update(task, completed=step, total=total, eta=_eta(eta_s), state="")

    def status(self, text: str) -> None:
        for task in self.tasks:
            self.progress.update(task, state=text)

    def on_event(self, event: dict[str, Any]) -> None:
        """A progress line of a response stream (``sdmaker invoke``)."""
        kind = event.get("type")
        if kind == "queued":
            position = int(event.get("position") or 0)
            self.status(f"queued ({position} ahead)" if position else "queued")
        elif kind == "started":
            self.status("running")
        elif kind == "step":
            self.step(int(event["step"]), int(event["total"]), event.get("eta_s"))


@contextmanager
def image_bars(images: int, total: int, seeds: list[int] | None = None) -> Iterator[ImageBars]:
    """Bars for ``images`` images of ``total`` steps on stderr (gone once done: stdout keeps only the paths)."""
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TextColumn("{task.fields[eta]}"), TextColumn("[dim]{task.fields[state]}"), console=err_console,
                  transient=True) as progress:
        yield ImageBars(progress, images, total, seeds)
