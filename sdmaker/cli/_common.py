"""Shared CLI plumbing: consoles, logging setup, the error table, and shared option types."""

from __future__ import annotations

import itertools
import logging
import traceback
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.text import Text

# [compat] typer 0.29 vendors click as typer._click; its exception classes differ from the click package's.
from typer._click import exceptions as click_exc
from typer.core import TyperGroup

from sdmaker.config import Settings, load_settings, quiet_third_party_logs
from sdmaker.errors import SdmakerError
from sdmaker.files import write_once

__all__ = ["SdmakerGroup", "console", "err_console", "get_settings", "load_model_ref", "print_error", "run_app",
           "setup_logging", "write_new_file"]

console = Console()
err_console = Console(stderr=True)


def setup_logging(verbose: bool = False) -> None:
    """Configure the root logger once (library modules never add handlers)."""
    level = logging.DEBUG if verbose else logging.WARNING
    if not verbose:
        quiet_third_party_logs()
    logging.basicConfig(level=level, format="%(message)s", handlers=[RichHandler(console=err_console,
                        show_path=False)])


def get_settings() -> Settings:
    """Settings of this CLI invocation (reads the environment once)."""
    return load_settings()


def print_error(message: str) -> None:
    """Print ``Error: message`` on stderr as plain, unwrapped text.

    Not typer's boxed panel: a box wraps long lines at the terminal's width, splitting the paths and names
    a user copies out of an error ("missi│ng-folder"). ``soft_wrap`` leaves wrapping to the terminal, so a
    copied path is whole, and ``Text`` keeps ``[...]`` in messages from being read as markup.
    """
    err_console.print(Text.assemble(("Error: ", "bold red"), message), soft_wrap=True, highlight=False)


def _print_click_error(exc: click_exc.ClickException) -> None:
    """A usage or parameter error: usage line, help hint, then the message (unboxed, see :func:`print_error`)."""
    ctx = getattr(exc, "ctx", None)
    if ctx is not None:
        err_console.print(Text(ctx.get_usage()), soft_wrap=True, highlight=False)
        if ctx.command.get_help_option(ctx) is not None:
            err_console.print(Text(f"Try '{ctx.command_path} {ctx.help_option_names[0]}' for help."),
                              soft_wrap=True, highlight=False)
    print_error(exc.format_message())


class SdmakerGroup(TyperGroup):
    """The root command group: the error table for every command lives here.

    A known :class:`SdmakerError` prints one unwrapped ``Error: ...`` line and exits 1 (usage errors keep
    exit 2); anything unexpected is one line too unless ``SDMAKER_DEBUG=1``, which shows the traceback.
    """

    def invoke(self, ctx: Any) -> object:  # click's Context (typer's own, vendored copy)
        if not _debug():
            quiet_third_party_logs()  # before any command imports transformers/diffusers
        try:
            return super().invoke(ctx)
        except SdmakerError as exc:
            if _debug():
                traceback.print_exc()
            print_error(exc.message)
            raise typer.Exit(1) from exc
        except click_exc.ClickException as exc:
            if type(exc).__name__ == "NoArgsIsHelpError":  # typer already printed the help
                raise
            _print_click_error(exc)
            raise typer.Exit(exc.exit_code) from exc
        except (typer.Exit, typer.Abort, KeyboardInterrupt, EOFError):
            raise
        except Exception as exc:
            if _debug():
                raise
            print_error(f"unexpected {type(exc).__name__}: {exc} (set SDMAKER_DEBUG=1 for the traceback)")
            raise typer.Exit(1) from exc


def _debug() -> bool:
    try:
        return load_settings().debug
    except SdmakerError:
        return False


def load_model_ref(ref: str, settings: Settings, *, allow_pickle: bool = False, device: str | None = None,
                   dtype: str | None = None) -> Any:
    """Resolve a store name / folder / archive / s3:// / hub id and load it (shared by generate and eval)."""
    from sdmaker.engine import load_model
    from sdmaker.store import resolve_model

    resolved = resolve_model(ref, settings, allow_pickle=allow_pickle)
    return load_model(resolved.path, name=resolved.name, digest=resolved.digest, allow_pickle=allow_pickle,
                      device=device or settings.device, dtype=dtype or settings.dtype)


def write_new_file(folder: Path, stem: str, suffix: str, data: bytes) -> Path:
    """Write ``data`` to ``folder/stem.suffix``, or ``stem-2.suffix``, ``stem-3.suffix``... if taken; return it.

    Earlier results are never overwritten: a second ``generate`` with the same seed, or a second ``invoke``,
    adds files instead of silently replacing the first run's (:func:`sdmaker.files.write_once`: two
    concurrent runs cannot take the same name, and a reader never sees a half-written image).
    """
    names = (folder / (f"{stem}.{suffix}" if n == 1 else f"{stem}-{n}.{suffix}") for n in itertools.count(1))
    path = write_once(names, data)
    assert path is not None  # the names never run out
    return path


def run_app(app: typer.Typer, argv: list[str] | None = None) -> int:
    """Run ``app`` in standalone mode (typer prints errors and picks exit codes); return the exit code."""
    try:
        app(args=argv)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    return 0
