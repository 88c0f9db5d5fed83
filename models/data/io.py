"""Read any supported source into `Recording`s: a file, a directory, or a glob of files.

Formats are recognised by content where possible (HDF5 signature, NWB attributes), else by suffix.
"""

from __future__ import annotations

import glob
from collections.abc import Callable, Iterable
from pathlib import Path

from models.data.recording import DataError, Recording

Reader = Callable[[Path], Recording]


def _read_mat(path: Path) -> Recording:
    from models.data.park import read_park

    return read_park(path)


def _read_nwb(path: Path) -> Recording:
    from models.data.nwb import read_nwb

    return read_nwb(path)


def _read_h5(path: Path) -> Recording:
    from models.data.brainsets import read_brainsets

    return read_brainsets(path)


# suffix -> reader
READERS: dict[str, Reader] = {
    ".mat": _read_mat,
    ".nwb": _read_nwb,
    ".h5": _read_h5,
    ".hdf5": _read_h5,
}


def expand_paths(paths: Iterable[str | Path]) -> list[Path]:
    """Files named by paths, directories (their supported files, sorted) and glob patterns."""
    out: list[Path] = []
    for p in paths:
        s = str(p)
        if any(ch in s for ch in "*?["):
            hits = sorted(Path(h) for h in glob.glob(s, recursive=True))
            if not hits:
                raise DataError("glob matched no files", source=s)
            files = [h for h in hits if h.is_file() and h.suffix.lower() in READERS]
            if not files:
                raise DataError(
                    f"glob matched no supported files ({', '.join(sorted(READERS))})", source=s
                )
            out.extend(files)
            continue
        path = Path(p)
        if path.is_dir():
            found = sorted(f for f in path.iterdir() if f.is_file() and f.suffix.lower() in READERS)
            if not found:
                raise DataError(
                    f"directory holds no supported files ({', '.join(sorted(READERS))})",
                    source=path,
                )
            out.extend(found)
        elif path.is_file():
            out.append(path)
        else:
            raise DataError("no such file or directory", source=path)
    return out


def read_recording(path: str | Path) -> Recording:
    path = Path(path)
    reader = READERS.get(path.suffix.lower())
    if reader is None:
        raise DataError(
            f"unsupported file type '{path.suffix}' (supported: {', '.join(sorted(READERS))})",
            source=path,
        )
    return reader(path)


def load_recordings(paths: Iterable[str | Path]) -> list[Recording]:
    """Every recording in the given files, directories and globs, in a stable order."""
    return [read_recording(p) for p in expand_paths(paths)]


def write_recording(rec: Recording, path: str | Path, *, fmt: str = "nwb") -> Path:
    """Write a recording as ``nwb`` or ``brainsets`` (temporaldata-style HDF5)."""
    if fmt == "nwb":
        from models.data.nwb import write_nwb

        return write_nwb(rec, path)
    if fmt == "brainsets":
        from models.data.brainsets import write_brainsets

        return write_brainsets(rec, path)
    raise DataError(f"unknown output format '{fmt}' (nwb, brainsets)", source=path)
