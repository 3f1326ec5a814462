"""``sdmaker jobs list | show | wait | cancel``: asynchronous inference jobs on the running daemon."""

from __future__ import annotations

import json
import time
from typing import Annotated, Any

import typer
from rich.table import Table

from sdmaker.cli._common import console, get_settings
from sdmaker.errors import InvocationFailedError

__all__ = ["register"]

jobs_app = typer.Typer(help="Follow and cancel asynchronous inference jobs (InvokeEndpointAsync, invoke --async).",
                       no_args_is_help=True)

_STYLE = {"queued": "yellow", "running": "cyan", "succeeded": "green", "failed": "red", "expired": "magenta",
          "cancelled": "dim"}


def _client() -> Any:
    from sdmaker.client import Client

    return Client(settings=get_settings())


def _when(stamp: float | None) -> str:
    return "-" if stamp is None else time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(stamp))


def _progress(job: dict[str, Any]) -> str:
    if job["state"] == "queued":
        return f"position {job.get('queue_position')}"
    if job["state"] == "running" and job.get("total_steps"):
        return f"step {job['step']} of {job['total_steps']}"
    return ""


def _state(job: dict[str, Any]) -> str:
    return f"[{_STYLE.get(job['state'], 'white')}]{job['state']}[/]"


@jobs_app.command("list")
def list_cmd(
    endpoint: Annotated[str | None, typer.Option("--endpoint", "-e", help="Only this endpoint's jobs.")] = None,
    state: Annotated[str | None, typer.Option(help="queued, running, succeeded, failed, expired or cancelled.")]
    = None,
    limit: Annotated[int, typer.Option(min=1, max=1000, help="At most this many (newest first).")] = 50,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """List jobs, newest first."""
    with _client() as client:
        rows = client.jobs(endpoint=endpoint, state=state, limit=limit)
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    table = Table("id", "endpoint", "state", "progress", "created", "attempts")
    for job in rows:
        table.add_row(job["id"], job["endpoint"], _state(job), _progress(job), _when(job["created"]),
                      str(job["attempts"]))
    console.print(table)


def _show(job: dict[str, Any]) -> None:
    rows = [("state", _state(job)), ("progress", _progress(job) or "-"), ("endpoint", job["endpoint"]),
            ("input", job.get("input_location") or f"inline, {job.get('inline_input_bytes')} bytes"),
            ("output", job["output_location"]), ("failure", job["failure_location"]),
            ("failure reason", job.get("failure_reason") or "-"), ("created", _when(job["created"])),
            ("started", _when(job.get("started"))), ("finished", _when(job.get("finished"))),
            ("attempts", str(job["attempts"])), ("ttl / timeout", f"{job['ttl_s']} s / {job['timeout_s']} s")]
    console.print(f"[bold]{'job':>15}[/bold]  {job['id']}", highlight=False)
    for key, value in rows:
        console.print(f"[bold]{key:>15}[/bold]  {value}", highlight=False, soft_wrap=True)


@jobs_app.command("show")
def show_cmd(job_id: str, as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """State, progress (queue position, step i of n), timestamps and where the result goes."""
    with _client() as client:
        job = client.job(job_id)
    if as_json:
        typer.echo(json.dumps(job, indent=2))
    else:
        _show(job)


@jobs_app.command("wait")
def wait_cmd(
    job_id: str,
    timeout: Annotated[float, typer.Option(help="Give up after this many seconds.")] = 3600.0,
) -> None:
    """Wait until the job ends; print where its result is (exit 1 if it did not succeed)."""
    with _client() as client:
        job = client.wait_job(job_id, timeout_s=timeout)
    if job["state"] != "succeeded":
        raise InvocationFailedError(f"job {job_id} {job['state']}: {job.get('failure_reason') or '-'} "
                                    f"(failure object: {job['failure_location']})", job_id=job_id)
    console.print(job["output_location"], highlight=False, soft_wrap=True)


@jobs_app.command("cancel")
def cancel_cmd(job_id: str) -> None:
    """Cancel a queued or running job (a finished one is left as it is)."""
    with _client() as client:
        job = client.cancel_job(job_id)
    console.print(f"{job_id}: {job['state']}", highlight=False)


def register(app: typer.Typer) -> None:
    app.add_typer(jobs_app, name="jobs")
