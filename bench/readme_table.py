"""Render ``bench/results.json`` as the README's Performance section (markdown).

``python -m bench.readme_table [results.json]`` prints it; the README pastes the output between its
``<!-- bench:start -->`` / ``<!-- bench:end -->`` markers (``--write README.md`` replaces them in place).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

from bench import BENCH_DIR

__all__ = ["render", "replace_block"]

START, END = "<!-- bench:start -->", "<!-- bench:end -->"


def _fmt(value: float | None) -> str:
    if value is None:
        return "–"
    return f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"


def render(data: dict[str, Any]) -> str:
    """Markdown: a context line (CPU, cores, date, versions) and one table row per result."""
    meta = data.get("metadata", {})
    lines = [
        f"Latest run on **{meta.get('cpu_model', 'unknown CPU')}**, {meta.get('cores', '?')} cores"
        + (f", GPU {meta['gpu']}" if meta.get("gpu") else "")
        + f", {meta.get('date', '?')}; torch {meta.get('torch', '?')}, diffusers {meta.get('diffusers', '?')}; "
        f"`python -m bench{' --quick' if meta.get('mode') == 'quick' else ''}` ({meta.get('wall_s', '?')} s)"
        + (f"; {meta['note']}" if meta.get("note") else "") + ".",
        "Ratio = how many times better ours is than the baseline (>1 is better), measured side by side in the same run.",
        "",
        "| benchmark | ours | baseline | unit | ratio | notes |",
        "|---|---:|---:|---|---:|---|",
    ]
    for r in data.get("results", []):
        ratio = "–" if r.get("ratio") is None else f"**{r['ratio']:.3g}x**"
        notes = str(r.get("notes", "")).replace("|", "\\|").replace("\n", " ")
        lines.append(f"| {r['name']} | {_fmt(r.get('ours'))} | {_fmt(r.get('baseline'))} | {r.get('unit', '')} | "
                     f"{ratio} | {notes} |")
    return "\n".join(lines) + "\n"


def replace_block(text: str, table: str) -> str:
    """``text`` with the block between the bench markers replaced by ``table`` (appended if absent)."""
    block = f"{START}\n{table}{END}"
    if START in text and END in text:
        head, rest = text.split(START, 1)
        return head + block + rest.split(END, 1)[1]
    return text.rstrip("\n") + "\n\n## Performance\n\n" + block + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.readme_table", description=__doc__)
    parser.add_argument("results", nargs="?", type=Path, default=BENCH_DIR / "results.json")
    parser.add_argument("--write", type=Path, help="replace the bench block of this markdown file in place")
    args = parser.parse_args(argv)
    table = render(json.loads(args.results.read_text()))
    if args.write is None:
        sys.stdout.write(table)
        return 0
    text = args.write.read_text() if args.write.exists() else ""
    fd, tmp = tempfile.mkstemp(dir=args.write.parent, suffix=".md")
    with os.fdopen(fd, "w") as fh:
        fh.write(replace_block(text, table))
    os.replace(tmp, args.write)
    return 0


if __name__ == "__main__":
    sys.exit(main())
