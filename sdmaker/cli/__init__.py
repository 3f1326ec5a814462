"""The ``sdmaker`` command line (typer + rich).

Each command group lives in its own module and registers itself on :data:`app`. Commands are thin:
parse, call one library function, render. Known errors (:class:`~sdmaker.errors.SdmakerError`) print
one line and exit 1; usage errors exit 2; ``SDMAKER_DEBUG=1`` shows tracebacks.
"""

from __future__ import annotations

import sys

import typer

from sdmaker import __version__
from sdmaker.cli._common import SdmakerGroup as _SdmakerGroup
from sdmaker.cli._common import console, err_console
from sdmaker.cli._common import run_app as _run_app

__all__ = ["app", "console", "err_console", "main", "version"]

app = typer.Typer(
    name="sdmaker",
    cls=_SdmakerGroup,
    help="Self-hosted Stable Diffusion: generate, package, store, deploy and invoke models offline.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.command("version")
def version() -> None:
    """Print the sdmaker version."""
    console.print(__version__)


# Command groups register themselves here (one module per group).
from sdmaker.cli import _generate  # noqa: E402

_generate.register(app)

from sdmaker.cli import _endpoint  # noqa: E402

_endpoint.register(app)

from sdmaker.cli import _jobs  # noqa: E402

_jobs.register(app)

from sdmaker.cli import _model, _s3  # noqa: E402

_model.register(app)
_s3.register(app)

from sdmaker.cli import _train  # noqa: E402

_train.register(app)

from sdmaker.cli import _serve  # noqa: E402

_serve.register(app)

from sdmaker.cli import _demo  # noqa: E402

_demo.register(app)


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point."""
    sys.exit(_run_app(app, argv))

