"""Opening HDF5-based files (NWB, brainsets) with one clear `DataError` for every failure."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from models.data.recording import DataError


def one_line(e: BaseException, limit: int = 300) -> str:
    """``Type: first line of the message``, without hdmf's builder dumps, at most ``limit``."""
    msg = " ".join(str(e).split())
    i = msg.find("Could not construct")  # hdmf ConstructError: keep the reason, not the dump
    if i >= 0:
        msg = msg[i:].rstrip("')\"")
    if len(msg) > limit:
        msg = msg[: limit - 3] + "..."
    return f"{type(e).__name__}: {msg}" if msg else type(e).__name__


@contextmanager
def open_hdf5(path: Path, *, not_hdf5: str) -> Iterator:
    """An h5py file open for reading; a missing, non-HDF5, truncated or corrupt file (or any
    non-`DataError` failure while reading it) becomes one `DataError` naming the file."""
    import h5py

    if not path.is_file():
        raise DataError("no such file", source=path)
    try:
        is_h5 = h5py.is_hdf5(path)
    except OSError as e:
        raise DataError(f"cannot open file ({one_line(e)})", source=path) from None
    if not is_h5:
        raise DataError(not_hdf5, source=path)
    try:
        f = h5py.File(path, "r")
    except Exception as e:
        raise DataError(f"corrupt or truncated HDF5 file ({one_line(e)})", source=path) from None
    try:
        yield f
    except DataError:
        raise
    except Exception as e:  # truncated/corrupt files: h5py raises OSError/KeyError/...
        raise DataError(f"corrupt or truncated HDF5 file ({one_line(e)})", source=path) from None
    finally:
        f.close()
