"""The model bundle: one directory holding everything needed to serve and to audit a model.

Layout (DESIGN.md, "Model bundle and registry")::

    bundle/
      model.onnx            the decoder with the SAE spliced in (and attribution), ONNX
      decoder.safetensors   decoder weights (safetensors only; never pickle)
      sae.safetensors       SAE weights
      config.json           the typed configs the model was built from
      units.json            per-unit labels and statistics
      metrics.json          evaluation, SAE metrics, controls
      manifest.json         format, name, version, parent, provenance, sha256 + size per file

The code is generic over the files: it hashes, copies and checks them and never looks inside
`model.onnx` or the weights beyond "is this a readable JSON / safetensors header" at write time.
An exporter declares which files the bundle must hold with ``required=`` (default: the six
files above); the manifest records that list and every file present with its sha256 and size.

A bundle is written atomically (a hidden temporary directory beside the target, fsync'd, then
renamed into place), so a reader never sees half a bundle. Opening verifies every hash and
refuses a bundle that does not match, naming the file; `Bundle.read_bytes` re-checks the hash of
the bytes it returns, so what is loaded is exactly what was verified.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError

from models.config import Config

FORMAT = "cortexlens-bundle/1"
MANIFEST = "manifest.json"
MODEL_ONNX = "model.onnx"
DECODER_WEIGHTS = "decoder.safetensors"
SAE_WEIGHTS = "sae.safetensors"
CONFIG_JSON = "config.json"
UNITS_JSON = "units.json"
METRICS_JSON = "metrics.json"
#: The files DESIGN.md puts in every bundle (besides the manifest); the default `required`.
STANDARD_FILES: tuple[str, ...] = (
    MODEL_ONNX,
    DECODER_WEIGHTS,
    SAE_WEIGHTS,
    CONFIG_JSON,
    UNITS_JSON,
    METRICS_JSON,
)

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_HEX64_RE = r"^[0-9a-f]{64}$"
_CHUNK = 1 << 20


class BundleError(ValueError):
    """A bundle that cannot be written, read or trusted. The message names the file."""


class FileEntry(Config):
    sha256: str = Field(pattern=_HEX64_RE)
    size: int = Field(ge=0)


class Manifest(Config):
    """`manifest.json`, schema version `cortexlens-bundle/1`."""

    format: Literal["cortexlens-bundle/1"] = FORMAT
    name: str = Field(pattern=_NAME_RE.pattern)
    version: str | None = None
    parent: str | None = None
    created_at: str
    provenance: dict[str, Any]
    required: list[str]
    files: dict[str, FileEntry]
    extra: dict[str, Any] = Field(default_factory=dict)

    def content_sha256(self) -> str:
        return content_sha256({k: v.sha256 for k, v in self.files.items()})


def content_sha256(file_hashes: Mapping[str, str]) -> str:
    """Identity of a bundle's content, independent of name, version and time.

    sha256 of the `sha256sum`-style listing ``"<sha256>  <name>\\n"`` sorted by name (the
    manifest itself excluded), so two bundles with the same files have the same content sha.
    """
    listing = "".join(f"{file_hashes[n]}  {n}\n" for n in sorted(file_hashes))
    return hashlib.sha256(listing.encode()).hexdigest()


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def file_provenance(paths: Iterable[str | Path]) -> list[dict[str, Any]]:
    """Provenance records for data files: path, size and sha256 (for `provenance={"data": ...}`)."""
    out = []
    for p in paths:
        p = Path(p)
        if not p.is_file():
            raise BundleError(f"{p}: provenance file not found")
        out.append({"path": str(p), "size": p.stat().st_size, "sha256": sha256_file(p)})
    return out


def _check_name(name: str, what: str = "file name") -> None:
    if not isinstance(name, str) or not _NAME_RE.match(name) or name in (".", ".."):
        raise BundleError(
            f"{name!r}: invalid {what} (letters, digits, '.', '_', '-'; no path separators)"
        )


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def write_bytes_durable(path: Path, data: bytes) -> None:
    """Write `data` to `path` and fsync it (not atomic by itself; see `replace_durable`)."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def replace_durable(path: Path, data: bytes) -> None:
    """Atomically replace `path` with `data`: temp file beside it, fsync, os.replace, fsync dir."""
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex}")
    try:
        write_bytes_durable(tmp, data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _write_file(dst: Path, src: str | Path | bytes) -> FileEntry:
    """Copy a path or write bytes to `dst`, fsync, and return its hash and size (one pass)."""
    h = hashlib.sha256()
    size = 0
    with open(dst, "wb") as out:
        if isinstance(src, bytes | bytearray | memoryview):
            data = bytes(src)
            h.update(data)
            out.write(data)
            size = len(data)
        else:
            src = Path(src)
            if not src.is_file():
                raise BundleError(f"{dst.name}: source {src} is not a file")
            with open(src, "rb") as f:
                while chunk := f.read(_CHUNK):
                    h.update(chunk)
                    out.write(chunk)
                    size += len(chunk)
        out.flush()
        os.fsync(out.fileno())
    return FileEntry(sha256=h.hexdigest(), size=size)


def _sanity_check(name: str, path: Path) -> None:
    """Cheap structural checks at write time, so exporter bugs surface early (not security)."""
    if name.endswith(".json"):
        try:
            json.loads(path.read_bytes())
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise BundleError(f"{name}: not valid JSON ({e})") from None
    elif name.endswith(".safetensors"):
        with open(path, "rb") as f:
            head = f.read(8)
            n = int.from_bytes(head, "little") if len(head) == 8 else 0
            _safetensors_header(name, head + f.read(min(n, 100 << 20)))


def _safetensors_header(name: str, data: bytes) -> dict:
    if len(data) < 8:
        raise BundleError(f"{name}: not a safetensors file (too short)")
    n = int.from_bytes(data[:8], "little")
    if n <= 0 or 8 + n > len(data):
        raise BundleError(f"{name}: not a safetensors file (bad header length)")
    try:
        header = json.loads(data[8 : 8 + n])
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise BundleError(f"{name}: not a safetensors file (header is not JSON)") from None
    if not isinstance(header, dict):
        raise BundleError(f"{name}: not a safetensors file (header is not a JSON object)")
    return header


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def stage_files(src_files: Mapping[str, str | Path | bytes], tmp: Path) -> dict[str, FileEntry]:
    """Copy the payload files into directory `tmp` (fsync'd); return their entries."""
    entries: dict[str, FileEntry] = {}
    for fname in sorted(src_files):
        entries[fname] = _write_file(tmp / fname, src_files[fname])
        _sanity_check(fname, tmp / fname)
    return entries


def _validate_inputs(
    src_files: Mapping[str, str | Path | bytes], required: Iterable[str] | None
) -> list[str]:
    for fname in src_files:
        _check_name(fname)
        if fname == MANIFEST:
            raise BundleError(f"{MANIFEST}: written by write_bundle; do not pass it as a file")
    req = list(STANDARD_FILES if required is None else required)
    for fname in req:
        _check_name(fname)
    missing = [f for f in req if f not in src_files]
    if missing:
        raise BundleError(
            f"{', '.join(missing)}: required bundle file(s) not given "
            f"(pass required=[...] to declare which files this bundle holds)"
        )
    return sorted(set(req))


def build_manifest(
    entries: Mapping[str, FileEntry],
    *,
    name: str,
    version: str | None,
    parent: str | None,
    provenance: Mapping[str, Any],
    required: list[str],
    extra: Mapping[str, Any],
    created_at: str | None = None,
) -> Manifest:
    _check_name(name, "model name")
    if not isinstance(provenance, Mapping):
        raise BundleError("provenance must be a dict (data sources, code version, seed, ...)")
    try:
        return Manifest(
            name=name,
            version=version,
            parent=parent,
            created_at=created_at or _now(),
            provenance=dict(provenance),
            required=required,
            files=dict(sorted(entries.items())),
            extra=dict(extra),
        )
    except ValidationError as e:
        raise BundleError(f"{MANIFEST}: invalid manifest:\n{e}") from None


def manifest_bytes(manifest: Manifest) -> bytes:
    try:
        return (json.dumps(manifest.to_dict(), indent=2, sort_keys=True) + "\n").encode()
    except (TypeError, ValueError) as e:
        raise BundleError(
            f"{MANIFEST}: provenance/extra fields must be JSON-serialisable ({e})"
        ) from None


def write_bundle(
    src_files: Mapping[str, str | Path | bytes],
    out_dir: str | Path,
    *,
    name: str,
    version: str | None = None,
    parent: str | None = None,
    provenance: Mapping[str, Any],
    required: Iterable[str] | None = None,
    overwrite: bool = False,
    **extra: Any,
) -> Bundle:
    """Write a bundle atomically and return it (opened and verified).

    `src_files` maps bundle file names to a source path or the file's bytes. `required` declares
    which files this bundle must hold (default: `STANDARD_FILES`); other files may be added
    (e.g. `model.onnx.data`) and are hashed like the rest. `provenance` records where the data
    and code came from; `extra` keyword fields go to the manifest's ``extra`` object.

    The bundle is assembled in a hidden directory beside `out_dir` and renamed into place, so
    `out_dir` either does not exist or holds a complete bundle. With `overwrite=True` an existing
    bundle is replaced (the old one is moved aside first, then deleted).
    """
    out_dir = Path(out_dir)
    req = _validate_inputs(src_files, required)
    if out_dir.exists() and not overwrite:
        raise BundleError(f"{out_dir}: already exists (pass overwrite=True to replace it)")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{uuid.uuid4().hex}")
    tmp.mkdir()
    try:
        entries = stage_files(src_files, tmp)
        manifest = build_manifest(
            entries,
            name=name,
            version=version,
            parent=parent,
            provenance=provenance,
            required=req,
            extra=extra,
        )
        write_bytes_durable(tmp / MANIFEST, manifest_bytes(manifest))
        _fsync_dir(tmp)
        old = None
        if out_dir.exists():
            old = out_dir.with_name(f".{out_dir.name}.old-{uuid.uuid4().hex}")
            os.rename(out_dir, old)
        os.rename(tmp, out_dir)
        _fsync_dir(out_dir.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return Bundle.open(out_dir)


def _read_manifest(path: Path) -> tuple[Manifest | None, bytes | None, list[str]]:
    mpath = path / MANIFEST
    if not mpath.is_file():
        return None, None, [f"{MANIFEST}: missing (not a cortexlens bundle?)"]
    raw = mpath.read_bytes()
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        return None, raw, [f"{MANIFEST}: not valid JSON ({e})"]
    if not isinstance(data, dict) or "format" not in data:
        return None, raw, [f"{MANIFEST}: malformed (no 'format' field; not a cortexlens manifest)"]
    if data["format"] != FORMAT:
        return (
            None,
            raw,
            [f"{MANIFEST}: unsupported format {data['format']!r} (this version reads {FORMAT!r})"],
        )
    try:
        m = Manifest.model_validate(data)
    except ValidationError as e:
        fields = ", ".join(".".join(str(x) for x in err["loc"]) or "?" for err in e.errors())
        return None, raw, [f"{MANIFEST}: malformed (invalid field(s): {fields})"]
    problems = []
    for fname in m.files:
        if not _NAME_RE.match(fname) or fname == MANIFEST:
            problems.append(f"{MANIFEST}: malformed (invalid file name {fname!r})")
    for fname in m.required:
        if fname not in m.files:
            problems.append(f"{fname}: required by the manifest but not listed in its files")
    return m, raw, problems


def verify_bundle(path: str | Path) -> list[str]:
    """Every problem with the bundle at `path`, each starting with the file it concerns.

    Checks: the manifest exists, parses and has the supported format; every listed file exists,
    is a regular file, and has the recorded size and sha256; every required file is listed; no
    file is present that the manifest does not list. An empty list means the bundle is intact.
    """
    path = Path(path)
    if not path.is_dir():
        return [f"{path}: not a directory"]
    m, _, problems = _read_manifest(path)
    if m is None:
        return problems
    for fname, entry in m.files.items():
        if not _NAME_RE.match(fname) or fname == MANIFEST:
            continue  # already reported; never look outside the bundle directory
        fp = path / fname
        if fp.is_symlink():
            problems.append(f"{fname}: is a symbolic link (bundles hold regular files only)")
        elif not fp.exists():
            problems.append(f"{fname}: missing")
        elif not fp.is_file():
            problems.append(f"{fname}: not a regular file")
        else:
            size = fp.stat().st_size
            if size != entry.size:
                problems.append(
                    f"{fname}: modified (size {size} bytes, manifest says {entry.size})"
                )
                continue
            digest = sha256_file(fp)
            if digest != entry.sha256:
                problems.append(
                    f"{fname}: modified (sha256 {digest[:16]}..., "
                    f"manifest says {entry.sha256[:16]}...)"
                )
    for child in sorted(path.iterdir()):
        if child.name != MANIFEST and child.name not in m.files:
            problems.append(f"{child.name}: not listed in the manifest (stray file)")
    return problems


def _refusal(path: Path, problems: list[str]) -> BundleError:
    return BundleError(f"bundle {path} refused: " + "; ".join(problems))


@dataclass(frozen=True)
class Bundle:
    """An opened bundle: its directory and parsed manifest."""

    path: Path
    manifest: Manifest
    manifest_sha256: str

    @classmethod
    def open(cls, path: str | Path, verify: bool = True) -> Bundle:
        """Open the bundle at `path`; with `verify` (default) refuse it unless all hashes match."""
        path = Path(path)
        if verify:
            problems = verify_bundle(path)
            if problems:
                raise _refusal(path, problems)
        elif not path.is_dir():
            raise BundleError(f"{path}: not a directory")
        m, raw, problems = _read_manifest(path)
        if m is None or problems:
            raise _refusal(path, problems)
        assert raw is not None
        return cls(path=path, manifest=m, manifest_sha256=hashlib.sha256(raw).hexdigest())

    # -- manifest fields ---------------------------------------------------------------------
    @property
    def name(self) -> str:
        return self.manifest.name

    @property
    def version(self) -> str | None:
        return self.manifest.version

    @property
    def parent(self) -> str | None:
        return self.manifest.parent

    @property
    def provenance(self) -> dict[str, Any]:
        return self.manifest.provenance

    @property
    def files(self) -> list[str]:
        return list(self.manifest.files)

    @property
    def content_sha256(self) -> str:
        return self.manifest.content_sha256()

    def has(self, fname: str) -> bool:
        return fname in self.manifest.files

    def verify(self) -> list[str]:
        return verify_bundle(self.path)

    # -- reading files -----------------------------------------------------------------------
    def file(self, fname: str) -> Path:
        """Path of a listed file (for tools that need a path; prefer `read_bytes`)."""
        if fname not in self.manifest.files:
            raise BundleError(f"{fname}: not in bundle {self.path} (has {', '.join(self.files)})")
        return self.path / fname

    def read_bytes(self, fname: str) -> bytes:
        """The file's bytes, checked against the manifest hash (what you load is what was hashed).

        Pass them straight to the consumer, e.g. ``onnxruntime.InferenceSession(b.read_bytes(
        "model.onnx"))``.
        """
        fp = self.file(fname)
        try:
            data = fp.read_bytes()
        except FileNotFoundError:
            raise _refusal(self.path, [f"{fname}: missing"]) from None
        digest = hashlib.sha256(data).hexdigest()
        if digest != self.manifest.files[fname].sha256:
            raise _refusal(
                self.path,
                [
                    f"{fname}: modified (sha256 {digest[:16]}..., "
                    f"manifest says {self.manifest.files[fname].sha256[:16]}...)"
                ],
            )
        return data

    def read_json(self, fname: str) -> Any:
        try:
            return json.loads(self.read_bytes(fname))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise BundleError(f"{self.path / fname}: not valid JSON ({e})") from None

    def load_safetensors(self, fname: str, framework: str = "numpy") -> dict[str, Any]:
        """Load weights with safetensors (never pickle) from verified bytes.

        `framework` is "numpy" (no torch needed) or "pt" (torch tensors).
        """
        data = self.read_bytes(fname)
        _safetensors_header(fname, data)
        try:
            if framework == "numpy":
                from safetensors.numpy import load

                return load(data)
            if framework in ("pt", "torch"):
                from safetensors.torch import load as load_pt

                return load_pt(data)
        except Exception as e:  # safetensors raises its own error type
            raise BundleError(f"{self.path / fname}: unreadable safetensors ({e})") from None
        raise BundleError(f"unknown framework {framework!r} (use 'numpy' or 'pt')")

    def source_files(self) -> dict[str, Path]:
        """The payload files as a `write_bundle` source mapping (to re-bundle or publish)."""
        return {f: self.path / f for f in self.manifest.files}
