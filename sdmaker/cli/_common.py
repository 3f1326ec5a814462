"""Shared CLI plumbing: consoles, logging setup, the error table, and shared option types."""

from __future__ import annotations

import logging
import sys
import traceback

import click
import typer
from rich.console import Console
from rich.logging import RichHandler

from sdmaker.config import Settings, load_settings
from sdmaker.errors import SdmakerError

__all__ = ["console", "err_console", "get_settings", "run_app", "setup_logging"]

console = Console()
err_console = Console(stderr=True)


def setup_logging(verbose: bool = False) -> None:
    """Configure the root logger once (library modules never add handlers)."""
    level = logging.DEBUG if verbose else logging.WARNING
    logging.basicConfig(level=level, format="%(message)s", handlers=[RichHandler(console=err_console,
                        show_path=False)])


def get_settings() -> Settings:
    """Settings of this CLI invocation (reads the environment once)."""
    return load_settings()


def run_app(app: typer.Typer, argv: list[str] | None = None) -> int:
    """Run ``app``; turn known errors into one line + exit 1, usage errors into exit 2."""
    debug = False
    try:
        debug = load_settings().debug
    except SdmakerError:
        pass
    try:
        app(args=argv, standalone_mode=False)
    except click.exceptions.Exit as exc:
        return int(exc.exit_code or 0)
    except click.exceptions.Abort:
        err_console.print("[red]Aborted.[/red]")
        return 130
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code
    except SdmakerError as exc:
        if debug:
            traceback.print_exc()
        err_console.print(f"[red]Error:[/red] {exc.message}", highlight=False, soft_wrap=True)
        return 1
    except KeyboardInterrupt:
        err_console.print("[red]Interrupted.[/red]")
        return 130
    except Exception as exc:  # noqa: BLE001 - last resort: one line unless debugging
        if debug:
            raise
        err_console.print(f"[red]Unexpected error:[/red] {type(exc).__name__}: {exc} "
                          "(set SDMAKER_DEBUG=1 for the traceback)", highlight=False, soft_wrap=True)
        return 1
    return 0


