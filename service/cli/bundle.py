"""`cortexlens bundle ...` and `cortexlens registry ...`: check, inspect and promote model bundles.

Exit status: 0 on success; 1 when `bundle verify` finds the bundle not intact (each problem
names the file); 2 for user errors (unknown model or version, nothing to roll back, a bundle
refused by an operation), printed as one ``error:`` line.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from service.cli.errors import exits_on

bundle_app = typer.Typer(help="Check and inspect model bundles.", no_args_is_help=True)
registry_app = typer.Typer(
    help="Versioned bundles per model name with an atomic 'current' pointer.",
    no_args_is_help=True,
)

_user_errors = exits_on("models.bundle:BundleError")


def _short(sha: str | None) -> str:
    return (sha or "?")[:12]


@bundle_app.command("verify")
@_user_errors
def verify(
    bundle: Annotated[Path, typer.Argument(help="A bundle directory.")],
) -> None:
    """Check every file against the manifest's sha256; exit 0 if intact, 1 naming each bad file."""
    from models.bundle import Bundle, verify_bundle

    problems = verify_bundle(bundle)
    if problems:
        typer.secho(
            f"error: bundle {bundle} is not intact: " + "; ".join(problems),
            fg=typer.colors.RED,
            err=True,
        )
        sys.exit(1)
    b = Bundle.open(bundle, verify=False)
    typer.echo(
        f"OK {bundle}: {b.name} {b.version or '(unversioned)'}, {len(b.files)} files, "
        f"content sha256 {b.content_sha256}"
    )


@bundle_app.command("show")
@_user_errors
def show(
    bundle: Annotated[Path, typer.Argument(help="A bundle directory.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the manifest as JSON.")] = False,
) -> None:
    """Print the manifest: name, version, parent, provenance, files, and whether it verifies."""
    from models.bundle import Bundle

    b = Bundle.open(bundle, verify=False)
    problems = b.verify()
    if as_json:
        out = b.manifest.to_dict()
        out["verified"] = not problems
        out["problems"] = problems
        out["content_sha256"] = b.content_sha256
        typer.echo(json.dumps(out, indent=2, sort_keys=True))
        return
    m = b.manifest
    typer.echo(f"bundle    {bundle}")
    typer.echo(f"format    {m.format}")
    typer.echo(f"name      {m.name}")
    typer.echo(f"version   {m.version or '(unversioned)'}")
    typer.echo(f"parent    {m.parent or '-'}")
    typer.echo(f"created   {m.created_at}")
    typer.echo(f"content   {b.content_sha256}")
    typer.echo(f"status    {'intact' if not problems else 'NOT INTACT'}")
    for p in problems:
        typer.echo(f"  ! {p}")
    typer.echo("provenance")
    for line in json.dumps(m.provenance, indent=2, sort_keys=True).splitlines():
        typer.echo(f"  {line}")
    if m.extra:
        typer.echo("extra")
        for line in json.dumps(m.extra, indent=2, sort_keys=True).splitlines():
            typer.echo(f"  {line}")
    typer.echo("files")
    width = max(len(f) for f in m.files) if m.files else 0
    for fname, e in m.files.items():
        req = "required" if fname in m.required else ""
        typer.echo(f"  {fname:<{width}}  {e.size:>12,d} B  {_short(e.sha256)}  {req}")


@registry_app.command("list")
@_user_errors
def list_(
    root: Annotated[Path, typer.Argument(help="Registry root directory.")],
    name: Annotated[str | None, typer.Argument(help="Model name (default: all models).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Models with their current version, or one model's versions (* marks the current one)."""
    from models.registry import Registry

    reg = Registry(root, create=False)
    if name is None:
        rows = [
            {"name": n, "current": reg.current(n), "versions": len(reg.list_versions(n))}
            for n in reg.names()
        ]
        if as_json:
            typer.echo(json.dumps(rows, indent=2))
            return
        if not rows:
            typer.echo(f"no models in {root}")
        for r in rows:
            typer.echo(f"{r['name']}  current {r['current'] or '-'}  ({r['versions']} versions)")
        return
    infos = reg.list_versions(name)
    if as_json:
        typer.echo(json.dumps([i.to_dict() for i in infos], indent=2))
        return
    if not infos:
        typer.echo(f"{name}: no versions in {root}")
    for i in infos:
        mark = "*" if i.current else " "
        typer.echo(
            f"{mark} {i.version}  parent {i.parent or '-':<6}  published {i.published_at or '?'}"
            f"  content {_short(i.content_sha256)}"
        )


@registry_app.command("publish")
@_user_errors
def publish(
    root: Annotated[Path, typer.Argument(help="Registry root directory.")],
    name: Annotated[str, typer.Argument(help="Model name.")],
    bundle: Annotated[Path, typer.Argument(help="A bundle directory to publish.")],
    promote: Annotated[bool, typer.Option(help="Also make it the current version.")] = False,
) -> None:
    """Publish a (verified) bundle as the next version of NAME."""
    from models.registry import Registry

    reg = Registry(root)
    v = reg.publish(bundle, name, promote=promote)
    typer.echo(f"published {name} {v}" + (" (current)" if promote else ""))


@registry_app.command("promote")
@_user_errors
def promote(
    root: Annotated[Path, typer.Argument(help="Registry root directory.")],
    name: Annotated[str, typer.Argument(help="Model name.")],
    version: Annotated[str, typer.Argument(help="Version to make current, e.g. v0003.")],
    reason: Annotated[str | None, typer.Option(help="Recorded in the history.")] = None,
) -> None:
    """Atomically make VERSION the current version of NAME (verified first)."""
    from models.registry import Registry

    reg = Registry(root, create=False)
    before = reg.current(name)
    reg.promote(name, version, reason=reason)
    typer.echo(f"promoted {name} {version} (was {before or 'none'})")


@registry_app.command("rollback")
@_user_errors
def rollback(
    root: Annotated[Path, typer.Argument(help="Registry root directory.")],
    name: Annotated[str, typer.Argument(help="Model name.")],
    to: Annotated[
        str | None, typer.Option("--to", help="Version to return to (default: the previous).")
    ] = None,
    reason: Annotated[str | None, typer.Option(help="Recorded in the history.")] = None,
) -> None:
    """Return NAME to the previously promoted version (or --to VERSION)."""
    from models.registry import Registry

    reg = Registry(root, create=False)
    before = reg.current(name)
    v = reg.rollback(name, to=to, reason=reason)
    typer.echo(f"rolled back {name} to {v} (was {before or 'none'})")


@registry_app.command("history")
@_user_errors
def history(
    root: Annotated[Path, typer.Argument(help="Registry root directory.")],
    name: Annotated[str, typer.Argument(help="Model name.")],
) -> None:
    """Promotions and rollbacks of NAME, oldest first."""
    from models.registry import Registry

    for e in Registry(root, create=False).history(name):
        why = f"  ({e['reason']})" if e.get("reason") else ""
        typer.echo(f"{e['time']}  {e['action']:<8}  {e['previous'] or '-'} -> {e['version']}{why}")


def register(app: typer.Typer) -> None:
    """Called by `service.cli` to add the `bundle` and `registry` command groups."""
    app.add_typer(bundle_app, name="bundle")
    app.add_typer(registry_app, name="registry")
