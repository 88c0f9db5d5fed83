"""`cortexlens` command line: one typed CLI (typer) for data, training, serving and operations.

Heavy imports (torch, ray) happen inside the commands that need them, so `--help` and the
data commands start fast.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from service.cli import data as data_cmds

app = typer.Typer(
    name="cortexlens",
    help="Online decoding and explanation of neural activity (two-photon calcium imaging).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
app.add_typer(data_cmds.app, name="data")


def default_data_dir() -> Path:
    """The shipped real data: $CORTEXLENS_DATA, else ../shared/data/park2024 beside the repo."""
    env = os.environ.get("CORTEXLENS_DATA")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2].parent / "shared" / "data" / "park2024"


@app.command("demo")
def demo(
    data: Annotated[
        Path | None, typer.Option(help="Recordings to use (default: the shipped Park sessions).")
    ] = None,
    session: Annotated[int, typer.Option(min=0, help="Which recording to stream.")] = 0,
    seconds: Annotated[float, typer.Option(min=1, help="Seconds of recording to stream.")] = 20.0,
    speed: Annotated[float, typer.Option(min=0.1, help="Replay speed (x real time).")] = 2.0,
    every: Annotated[int, typer.Option(min=1, help="Print every N-th prediction.")] = 8,
    home: Annotated[
        Path | None, typer.Option(help="Home with the registry (default: .cortexlens).")
    ] = None,
) -> int:
    """The main job: train the default model if needed, serve it on a local Ray, stream a Park
    session through the gRPC service and print live explanations, then shut down."""
    from service.cli.serve import demo as run_demo

    data_cmds.info([str(data or default_data_dir())], as_json=False)
    return run_demo(data, session=session, seconds=seconds, speed=speed, every=every, home=home)


def _register_optional() -> None:
    """Command groups added by later parts of the system register here."""
    import importlib

    for mod in (
        "service.cli.model",
        "service.cli.evaluate",
        "service.cli.interpret",
        "service.cli.export",
        "service.cli.bundle",
        "service.cli.record",
        "service.cli.retrain",
        "service.cli.serve",
        "service.cli.stream",
    ):
        try:
            m = importlib.import_module(mod)
        except ModuleNotFoundError as e:
            if e.name == mod:
                continue
            raise
        m.register(app)


_register_optional()


def main(argv: list[str] | None = None) -> None:
    """Entry point: user errors become one clear line on stderr and exit status 2."""
    from pydantic import ValidationError

    from models.bundle import BundleError
    from models.config import ConfigError
    from models.data.recording import DataError

    try:
        rc = app(args=argv, standalone_mode=False)
    except (DataError, ConfigError, BundleError) as e:
        typer.secho(f"error: {e}", fg=typer.colors.RED, err=True)
        sys.exit(2)
    except ValidationError as e:  # a typed config built from command-line options
        for err in e.errors():
            where = ".".join(str(x) for x in err["loc"]) or e.title
            typer.secho(f"error: {where}: {err['msg']}", fg=typer.colors.RED, err=True)
        sys.exit(2)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except typer.Abort:
        typer.echo("aborted", err=True)
        sys.exit(130)
    except Exception as e:  # usage errors (typer vendors its own click: match by shape)
        if callable(getattr(e, "show", None)) and isinstance(getattr(e, "exit_code", None), int):
            e.show()
            sys.exit(e.exit_code)
        raise
    if isinstance(rc, int) and rc:
        sys.exit(rc)
