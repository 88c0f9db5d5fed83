"""One way for CLI commands to turn a known user-facing error into one line and an exit status.

Uses ``sys.exit`` (not ``typer.Exit``): `service.cli.main` runs the app with
``standalone_mode=False``, where click turns ``typer.Exit`` into a return value that would be lost.
"""

from __future__ import annotations

import functools
import importlib
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import typer

F = TypeVar("F", bound=Callable[..., Any])


def exits_on(
    error: str, *, status: int = 2, message: Callable[[BaseException], str] = str
) -> Callable[[F], F]:
    """Decorator: ``error`` (``"module:Class"``, imported only when the command runs, so the CLI
    starts without the heavy modules) -> ``error: <message(e)>`` on stderr, exit ``status``."""
    module, _, name = error.partition(":")

    def wrap(fn: F) -> F:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            exc = getattr(importlib.import_module(module), name)
            try:
                return fn(*args, **kwargs)
            except exc as e:
                typer.secho(f"error: {message(e)}", fg=typer.colors.RED, err=True)
                sys.exit(status)

        return wrapper  # type: ignore[return-value]

    return wrap
