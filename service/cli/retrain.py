"""`cortexlens retrain ...`: batch retraining jobs on recorded sessions, over gRPC.

Exit status: 0 on success (for `start --watch` and `watch`: the job SUCCEEDED); 1 on a gRPC error
or a job that FAILED or was CANCELLED; 2 for user errors.
"""

from __future__ import annotations

import json
import sys
from typing import Annotated

import typer

from service.cli.errors import exits_on

retrain_app = typer.Typer(
    help="Retraining jobs (adapt, sae_refit, finetune) on recorded sessions.",
    no_args_is_help=True,
)

Target = Annotated[str, typer.Option(help="Server HOST:PORT.")]
Token = Annotated[str | None, typer.Option(envvar="CORTEXLENS_TOKEN", help="Bearer token.")]


def _client(target: str, token: str | None):
    from service.client import Client

    return Client(target, token=token, timeout_s=30)


_errors = exits_on(
    "service.client:CortexlensError", status=1, message=lambda e: f"{e.code.name}: {e.details}"
)


def job_line(j) -> str:
    extra = f" candidate {j.candidate_version}" if j.candidate_version else ""
    promoted = " PROMOTED" if j.promoted else ""
    return (
        f"{j.job_id} {j.kind:9s} {j.state:9s} {j.progress:5.0%} "
        f"[{', '.join(j.session_ids)}]{extra}{promoted}  {j.message}"
    )


def _watch(c, job_id: str) -> int:
    last = None
    for j in c.watch_job(job_id):
        last = j
        typer.echo(job_line(j))
    if last is None:
        return 1
    if last.decision:
        typer.echo(f"decision: {last.decision}")
    return 0 if last.state == "SUCCEEDED" else 1


@retrain_app.command("start")
@_errors
def start_cmd(
    kind: Annotated[str, typer.Argument(help="adapt | sae_refit | finetune")],
    sessions: Annotated[list[str], typer.Argument(help="Recorded session ids.")],
    target: Target = "127.0.0.1:9000",
    token: Token = None,
    workers: Annotated[int, typer.Option(min=0, help="Ray Train workers (finetune).")] = 0,
    epochs: Annotated[int, typer.Option(min=0, help="Epochs (0: the kind's default).")] = 0,
    promote: Annotated[bool, typer.Option(help="Promote if the gates pass.")] = True,
    min_delta: Annotated[
        float | None, typer.Option(help="Gate: minimum held-out accuracy gain.")
    ] = None,
    watch: Annotated[bool, typer.Option(help="Follow the job until it ends.")] = True,
) -> None:
    """Start a job; with --watch (default) print its progress and the promotion decision."""
    with _client(target, token) as c:
        j = c.start_job(
            kind,
            sessions,
            workers=workers,
            epochs=epochs,
            promote=promote,
            min_accuracy_delta=min_delta,
        )
        typer.echo(job_line(j))
        if watch:
            sys.exit(_watch(c, j.job_id))


@retrain_app.command("watch")
@_errors
def watch_cmd(job_id: str, target: Target = "127.0.0.1:9000", token: Token = None) -> None:
    """Follow a job until it ends."""
    with _client(target, token) as c:
        sys.exit(_watch(c, job_id))


@retrain_app.command("show")
@_errors
def show_cmd(job_id: str, target: Target = "127.0.0.1:9000", token: Token = None) -> None:
    """A job with its full result (evaluation, SAE metrics, labels, durations) as JSON."""
    from google.protobuf.json_format import MessageToDict

    with _client(target, token) as c:
        j = c.job(job_id)
    d = MessageToDict(j, preserving_proto_field_name=True)
    if j.result_json:
        d["result"] = json.loads(j.result_json)
        d.pop("result_json", None)
    typer.echo(json.dumps(d, indent=2))


@retrain_app.command("list")
@_errors
def list_cmd(target: Target = "127.0.0.1:9000", token: Token = None) -> None:
    """Every job, oldest first."""
    with _client(target, token) as c:
        for j in c.jobs():
            typer.echo(job_line(j))


@retrain_app.command("cancel")
@_errors
def cancel_cmd(job_id: str, target: Target = "127.0.0.1:9000", token: Token = None) -> None:
    """Cancel a queued or running job (a running job stops at its next step)."""
    with _client(target, token) as c:
        typer.echo(job_line(c.cancel_job(job_id)))


@retrain_app.command("rollback")
@_errors
def rollback_cmd(
    version: Annotated[str, typer.Option(help="Version to restore (default: previous).")] = "",
    model: Annotated[str, typer.Option(help="Model name (default: the served one).")] = "",
    target: Target = "127.0.0.1:9000",
    token: Token = None,
) -> None:
    """Make an earlier version current; the serving replicas swap to it in place."""
    with _client(target, token) as c:
        r = c.rollback(model, version)
    typer.echo(f"{r.name}: current version is now {r.version}")


def register(app: typer.Typer) -> None:
    app.add_typer(retrain_app, name="retrain")
