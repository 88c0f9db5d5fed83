"""The model registry: versioned bundles per model name, with an atomic "current" pointer.

On-disk layout under the registry root::

    root/
      <model name>/
        versions/
          v0001/            a complete bundle (see models.bundle); its manifest names the version
          v0002/
        current.json        the pointer: {"version": "v0002", "stack": [...], ...}
        index.jsonl         publish log, one line per version: manifest and content sha256
        history.jsonl       audit log of promotions and rollbacks
        .lock               fcntl lock file serialising writers of this model name
        .staging/           publishes in progress (never visible as versions)

Why a JSON pointer file rather than a symlink: the pointer is one small file replaced with
temp + fsync + `os.replace`, which is atomic on POSIX file systems and maps to a single
whole-object PUT on object stores and their FUSE mounts (S3, GCS), where symlinks do not exist
and readers still see either the old or the new pointer, never a mix. It also carries what a
symlink cannot: the manifest sha256 the version was promoted with and the promotion stack that
`rollback` walks back, all in one atomic write.

Versions are ``v0001``, ``v0002``, ... and increase monotonically (a number is never reused,
even after a failed publish). A version is assembled in ``.staging/`` and renamed into
``versions/`` under the per-model lock, so it appears whole or not at all, and two processes
publishing at once get distinct versions. Old versions stay on disk for rollback.

Limits on object stores: the per-model lock is an `fcntl.flock` (local file systems, and NFS
through the kernel's lock emulation); a directory rename on a FUSE-mounted bucket is a copy, not
atomic. There, run one publisher per model name (e.g. the retraining actor); readers stay safe
because only the single-file pointer decides what is served, and a version that is incomplete
or altered fails the hash checks on `open` instead of being served.

Opening a version verifies every file hash (models.bundle) and also checks that its manifest is
the one recorded in ``index.jsonl`` at publish time, so a bundle whose files *and* manifest were
edited afterwards is refused too.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from models.bundle import (
    MANIFEST,
    Bundle,
    BundleError,
    _check_name,
    _fsync_dir,
    _now,
    _validate_inputs,
    build_manifest,
    manifest_bytes,
    replace_durable,
    stage_files,
    write_bytes_durable,
)

VERSION_RE = re.compile(r"^v(\d{4,})$")
_AUTO: Any = object()
_STALE_STAGING_S = 24 * 3600


class RegistryError(BundleError):
    """A registry operation that cannot be done (unknown model or version, nothing to roll back)."""


def format_version(n: int) -> str:
    return f"v{n:04d}"


def parse_version(v: str) -> int:
    m = VERSION_RE.match(v or "")
    if not m:
        raise RegistryError(f"{v!r}: not a registry version (expected v0001, v0002, ...)")
    return int(m.group(1))


@dataclass(frozen=True)
class VersionInfo:
    name: str
    version: str
    parent: str | None
    published_at: str | None
    content_sha256: str | None
    manifest_sha256: str | None
    current: bool

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _append_jsonl(path: Path, record: Mapping[str, Any]) -> None:
    line = json.dumps(dict(record), sort_keys=True) + "\n"
    with open(path, "a", encoding="utf-8") as f:
        f.write(line)
        f.flush()
        os.fsync(f.fileno())


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    out = []
    lines = path.read_text(encoding="utf-8").splitlines()
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            # a torn last line (crash mid-append) is ignored; anything else is corruption
            if i == len(lines):
                continue
            raise RegistryError(f"{path}: line {i} is not valid JSON") from None
    return out


class Registry:
    """A directory of versioned bundles per model name, on a local path or mounted store."""

    def __init__(self, root: str | Path, *, create: bool = True):
        self.root = Path(root)
        if create:
            self.root.mkdir(parents=True, exist_ok=True)
        elif not self.root.is_dir():
            raise RegistryError(f"{self.root}: no such registry directory")

    # -- paths -------------------------------------------------------------------------------
    def _model_dir(self, name: str) -> Path:
        _check_name(name, "model name")
        return self.root / name

    def path(self, name: str, version: str) -> Path:
        parse_version(version)
        return self._model_dir(name) / "versions" / version

    @contextlib.contextmanager
    def _lock(self, name: str) -> Iterator[Path]:
        mdir = self._model_dir(name)
        mdir.mkdir(parents=True, exist_ok=True)
        with open(mdir / ".lock", "a+") as f:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
            try:
                yield mdir
            finally:
                fcntl.flock(f.fileno(), fcntl.LOCK_UN)

    # -- reading -----------------------------------------------------------------------------
    def names(self) -> list[str]:
        """Model names that have at least one published version."""
        if not self.root.is_dir():
            return []
        return sorted(
            d.name for d in self.root.iterdir() if d.is_dir() and self._versions_on_disk(d.name)
        )

    def _versions_on_disk(self, name: str) -> list[str]:
        vdir = self._model_dir(name) / "versions"
        if not vdir.is_dir():
            return []
        vs = [
            d.name for d in vdir.iterdir() if VERSION_RE.match(d.name) and (d / MANIFEST).is_file()
        ]
        return sorted(vs, key=parse_version)

    def _index(self, name: str) -> dict[str, dict[str, Any]]:
        return {r["version"]: r for r in _read_jsonl(self._model_dir(name) / "index.jsonl")}

    def _pointer(self, name: str) -> dict[str, Any] | None:
        p = self._model_dir(name) / "current.json"
        try:
            data = json.loads(p.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except json.JSONDecodeError as e:
            raise RegistryError(f"{p}: corrupt pointer file ({e})") from None
        if not isinstance(data, dict) or "version" not in data:
            raise RegistryError(f"{p}: corrupt pointer file (no 'version')")
        return data

    def current(self, name: str) -> str | None:
        """The promoted version of `name`, or None if none was promoted."""
        ptr = self._pointer(name)
        return None if ptr is None else ptr["version"]

    def list_versions(self, name: str) -> list[VersionInfo]:
        """Published versions of `name`, oldest first (does not re-hash files; see `open`)."""
        index = self._index(name)
        cur = self.current(name)
        out = []
        for v in self._versions_on_disk(name):
            rec = index.get(v, {})
            out.append(
                VersionInfo(
                    name=name,
                    version=v,
                    parent=rec.get("parent"),
                    published_at=rec.get("published_at"),
                    content_sha256=rec.get("content_sha256"),
                    manifest_sha256=rec.get("manifest_sha256"),
                    current=v == cur,
                )
            )
        return out

    def history(self, name: str) -> list[dict[str, Any]]:
        """Promotions and rollbacks of `name`, oldest first."""
        return _read_jsonl(self._model_dir(name) / "history.jsonl")

    def verify(self, name: str, version: str) -> list[str]:
        """Problems with a published version (empty when intact), each naming the file."""
        try:
            self.open(name, version)
        except BundleError as e:
            return [str(e)]
        return []

    def open(self, name: str, version: str | None = None) -> Bundle:
        """Open a version (default: the current one), verifying every hash; refuse on mismatch."""
        if version is None:
            version = self.current(name)
            if version is None:
                raise RegistryError(
                    f"{name}: no current version in {self.root} (promote one first)"
                )
        path = self.path(name, version)
        if not (path / MANIFEST).is_file():
            known = ", ".join(self._versions_on_disk(name)) or "none"
            raise RegistryError(f"{name} {version}: no such version in {self.root} (have {known})")
        bundle = Bundle.open(path, verify=True)
        rec = self._index(name).get(version)
        if rec is None:
            raise RegistryError(f"{path}: version not recorded in the registry index")
        if rec.get("manifest_sha256") != bundle.manifest_sha256:
            raise BundleError(
                f"bundle {path} refused: {MANIFEST}: modified after publishing "
                f"(sha256 differs from the registry index)"
            )
        if bundle.name != name or bundle.version != version:
            raise BundleError(
                f"bundle {path} refused: {MANIFEST}: names {bundle.name} {bundle.version}, "
                f"expected {name} {version}"
            )
        return bundle

    # -- writing -----------------------------------------------------------------------------
    def _next_version(self, name: str) -> str:
        vdir = self._model_dir(name) / "versions"
        nums = [parse_version(v) for v in self._index(name)]
        if vdir.is_dir():  # incomplete directories too: never rename onto one
            nums += [parse_version(d.name) for d in vdir.iterdir() if VERSION_RE.match(d.name)]
        return format_version(max(nums, default=0) + 1)

    def _clean_staging(self, staging: Path) -> None:
        if not staging.is_dir():
            return
        cutoff = time.time() - _STALE_STAGING_S
        for d in staging.iterdir():
            with contextlib.suppress(OSError):
                if d.stat().st_mtime < cutoff:
                    shutil.rmtree(d, ignore_errors=True)

    def publish(
        self,
        source: str | Path | Bundle | Mapping[str, str | Path | bytes],
        name: str,
        *,
        parent: str | None = _AUTO,
        provenance: Mapping[str, Any] | None = None,
        required: list[str] | None = None,
        promote: bool = False,
        **extra: Any,
    ) -> str:
        """Publish a bundle (a bundle directory, an opened `Bundle`, or a files mapping as for
        `write_bundle`) as the next version of `name`; return the version.

        A bundle source is verified first (a tampered bundle is refused). `parent` defaults to
        the source manifest's parent, else the current version of `name`; pass None for none.
        `provenance` defaults to the source manifest's (required for a files mapping). Does not
        change the current version unless `promote=True`.
        """
        mdir = self._model_dir(name)
        if isinstance(source, Mapping):
            if provenance is None:
                raise RegistryError("publish from files needs provenance={...}")
            files = dict(source)
            req = _validate_inputs(files, required)
            src_bundle = None
            src_parent, src_extra, created_at = None, {}, None
        else:
            # a bundle source is verified in full (missing, modified or stray files refuse it)
            b = Bundle.open(source.path if isinstance(source, Bundle) else source, verify=True)
            src_bundle = b
            files = b.source_files()
            req = sorted(b.manifest.required if required is None else required)
            _validate_inputs(files, req)
            provenance = b.provenance if provenance is None else provenance
            src_parent, src_extra = b.parent, dict(b.manifest.extra)
            created_at = b.manifest.created_at
            src_extra.setdefault(
                "source_bundle",
                {"name": b.name, "version": b.version, "manifest_sha256": b.manifest_sha256},
            )
        if parent is not _AUTO and parent is not None:
            if not (self.path(name, parent) / MANIFEST).is_file():
                raise RegistryError(f"{name} {parent}: parent version not in the registry")

        staging = mdir / ".staging"
        staging.mkdir(parents=True, exist_ok=True)
        tmp = staging / f"{uuid.uuid4().hex}"
        tmp.mkdir()
        try:
            # heavy copying happens outside the lock; version assignment and rename inside it
            entries = stage_files(files, tmp)
            if src_bundle is not None:  # the bytes copied must be the bytes verified
                changed = [
                    f for f, e in entries.items() if e.sha256 != src_bundle.manifest.files[f].sha256
                ]
                if changed:
                    raise BundleError(
                        f"bundle {src_bundle.path} refused: "
                        + "; ".join(f"{f}: modified while publishing" for f in changed)
                    )
            with self._lock(name):
                version = self._next_version(name)
                if parent is _AUTO:
                    par = src_parent if src_parent is not None else self.current(name)
                else:
                    par = parent
                manifest = build_manifest(
                    entries,
                    name=name,
                    version=version,
                    parent=par,
                    provenance=provenance,
                    required=req,
                    extra={**src_extra, **extra},
                    created_at=created_at,
                )
                raw = manifest_bytes(manifest)
                write_bytes_durable(tmp / MANIFEST, raw)
                _fsync_dir(tmp)
                # record the version first (burns the number even if the rename never happens),
                # then make it visible with one atomic rename
                _append_jsonl(
                    mdir / "index.jsonl",
                    {
                        "version": version,
                        "parent": par,
                        "published_at": _now(),
                        "manifest_sha256": hashlib.sha256(raw).hexdigest(),
                        "content_sha256": manifest.content_sha256(),
                    },
                )
                final = mdir / "versions" / version
                final.parent.mkdir(parents=True, exist_ok=True)
                os.rename(tmp, final)
                _fsync_dir(final.parent)
                self._clean_staging(staging)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        if promote:
            self.promote(name, version)
        return version

    def _set_current(
        self, name: str, mdir: Path, version: str, action: str, stack: list[str], reason: str | None
    ) -> str | None:
        bundle = self.open(name, version)  # refuse a tampered or unknown version
        ptr = self._pointer(name)
        previous = None if ptr is None else ptr["version"]
        now = _now()
        replace_durable(
            mdir / "current.json",
            (
                json.dumps(
                    {
                        "name": name,
                        "version": version,
                        "manifest_sha256": bundle.manifest_sha256,
                        "content_sha256": bundle.content_sha256,
                        "updated_at": now,
                        "stack": stack,
                    },
                    indent=2,
                    sort_keys=True,
                )
                + "\n"
            ).encode(),
        )
        _append_jsonl(
            mdir / "history.jsonl",
            {
                "time": now,
                "action": action,
                "version": version,
                "previous": previous,
                "reason": reason,
                "user": os.environ.get("USER"),
            },
        )
        return previous

    def promote(self, name: str, version: str, *, reason: str | None = None) -> str:
        """Make `version` the current one (atomically); it is verified first. Returns it."""
        with self._lock(name) as mdir:
            ptr = self._pointer(name)
            stack = list(ptr.get("stack", [])) if ptr else []
            if ptr is not None and ptr["version"] == version:
                self.open(name, version)
                return version
            self._set_current(name, mdir, version, "promote", stack + [version], reason)
        return version

    def rollback(self, name: str, to: str | None = None, *, reason: str | None = None) -> str:
        """Return `name` to the previously promoted version (or to version `to`); return it.

        Repeated rollbacks walk further back through the promotions. The target is verified
        before the pointer moves.
        """
        with self._lock(name) as mdir:
            ptr = self._pointer(name)
            stack = list(ptr.get("stack", [])) if ptr else []
            if to is None:
                if len(stack) < 2:
                    raise RegistryError(
                        f"{name}: no earlier promoted version to roll back to "
                        f"(current: {stack[-1] if stack else 'none'}; name one with --to)"
                    )
                target = stack[-2]
                new_stack = stack[:-1]
            else:
                parse_version(to)
                target = to
                if target in stack:
                    new_stack = stack[: len(stack) - stack[::-1].index(target)]
                else:
                    new_stack = stack + [target]
            self._set_current(name, mdir, target, "rollback", new_stack, reason)
        return target
