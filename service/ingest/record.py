"""`FrameRecord`: the durable, append-only record of every frame a live session received.

One directory per session::

    <dir>/meta.json            session facts, written once, atomically (tmp + fsync + rename)
    <dir>/frames-000000.clr    segment files of chunks, appended and fsync'd
    <dir>/frames-000001.clr    (a new segment starts when the current one passes segment_bytes)
    <dir>/CLOSED               written atomically when the session closed cleanly
    <dir>/.lock                flock'd by the one writer (released by the kernel if it dies)

``meta.json``: ``{"format": "cortexlens.frame_record", "version": 1, "session_id", "subject_id",
"genetic_background", "unit_ids": [...], "n_cells", "frame_rate_hz", "metadata": {...},
"created_utc"}``.

A segment is a sequence of chunks; one `append` writes one chunk with a single ``write`` and then
``fdatasync``s the file (and ``fsync``s the directory when it created the segment), so an append
that returned is durable (``sync=False`` skips the per-append fdatasync: still safe against the
process being killed, not against power loss; see `FrameRecord`). A chunk, all little-endian::

    header (32 bytes)
      magic        4s   b"CLFC"
      version      u16  1
      flags        u16  0
      n_frames     u32
      n_cells      u32
      seq          u64  chunk sequence number, 0, 1, 2, ... across all segments
      payload_crc  u32  CRC-32 (zlib) of the payload
      header_crc   u32  CRC-32 of the 28 header bytes before it
    payload
      indices      int64   [n_frames]           frame indices (any order, unique in the record)
      timestamps   float64 [n_frames]           seconds on the client's clock
      values       float32 [n_frames, n_cells]  dF/F, row-major

Recovery (`FrameRecord.open`) reads every chunk and checks both CRCs and the sequence numbers. A
chunk that is short or fails its checks at the end of the last segment, with no valid chunk after
it, is the torn tail of a write interrupted by a crash: it is cut off (the file truncated to the
last good chunk and fsync'd) and reported in `FrameRecord.recovery`; it had never been
acknowledged. A bad chunk anywhere else (followed by a valid chunk, or in an earlier segment) is
corruption, not a torn write, and raises ``IngestError("DATA_LOSS")`` rather than dropping data
silently; so does a chunk whose checksums hold but whose sequence number, cell count or frame
indices cannot be right. Reading never unpickles: only ``json`` and ``numpy.frombuffer``.

Export (`to_recording`): the frames actually received, sorted by frame index, with their real
timestamps; missing frames (gaps) are not invented, because a `Recording` holds finite values
only. The gaps are listed in ``metadata["stream"]["missing_ranges"]`` (inclusive index ranges)
together with ``first_frame_index``/``last_frame_index``, so that
``models.data.io.write_recording(rec, path, fmt="nwb")`` exports it; `stream_frame_indices`
rebuilds each exported frame's index (``first..last`` without the missing ranges) from a
`Recording` read back.

`session_dir(root, session_id)` maps a client's session id to its directory (refusing ids that
are not plain names); `record_status(dir)` gives a recorded session's ``SessionStatus`` fields
with its state (``LIVE`` while a writer holds it, ``CLOSED``, else ``INTERRUPTED``).
"""

from __future__ import annotations

import datetime as _dt
import fcntl
import json
import os
import re
import struct
import zlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from service.ingest.errors import IngestError

FORMAT = "cortexlens.frame_record"
FORMAT_VERSION = 1
MAGIC = b"CLFC"
CHUNK_VERSION = 1
_HEADER = struct.Struct("<4sHHIIQII")  # magic, version, flags, n_frames, n_cells, seq, pcrc, hcrc
HEADER_SIZE = _HEADER.size  # 32
META_NAME = "meta.json"
CLOSED_NAME = "CLOSED"
LOCK_NAME = ".lock"
SEGMENT_RE = re.compile(r"^frames-(\d{6})\.clr$")
DEFAULT_SEGMENT_BYTES = 64 << 20
# A chunk header that claims more than this is corrupt, whatever its CRC says.
MAX_CHUNK_FRAMES = 1 << 20


def _segment_name(k: int) -> str:
    return f"frames-{k:06d}.clr"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fdatasync(fd: int) -> None:
    (getattr(os, "fdatasync", None) or os.fsync)(fd)


def write_json_atomic(path: Path, obj: object) -> None:
    """Write JSON so that ``path`` holds either the old or the new content after a crash."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    data = (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        _write_all(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def encode_chunk(
    seq: int, indices: np.ndarray, timestamps: np.ndarray, values: np.ndarray
) -> bytes:
    """One chunk (header + payload) in the on-disk format described in the module docstring."""
    n, n_cells = values.shape
    payload = b"".join(
        (
            np.ascontiguousarray(indices, dtype="<i8").tobytes(),
            np.ascontiguousarray(timestamps, dtype="<f8").tobytes(),
            np.ascontiguousarray(values, dtype="<f4").tobytes(),
        )
    )
    head = struct.pack("<4sHHIIQI", MAGIC, CHUNK_VERSION, 0, n, n_cells, seq, zlib.crc32(payload))
    return head + struct.pack("<I", zlib.crc32(head)) + payload


def _payload_size(n_frames: int, n_cells: int) -> int:
    return n_frames * (8 + 8 + 4 * n_cells)


@dataclass(frozen=True)
class RecordHeader:
    """The session facts in ``meta.json``."""

    session_id: str
    unit_ids: tuple[str, ...]
    frame_rate_hz: float
    subject_id: str = ""
    genetic_background: str = ""
    metadata: Mapping[str, object] = field(default_factory=dict)
    created_utc: str = ""

    @property
    def n_cells(self) -> int:
        return len(self.unit_ids)

    def to_json(self) -> dict:
        return {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "session_id": self.session_id,
            "subject_id": self.subject_id,
            "genetic_background": self.genetic_background,
            "unit_ids": list(self.unit_ids),
            "n_cells": self.n_cells,
            "frame_rate_hz": self.frame_rate_hz,
            "metadata": dict(self.metadata),
            "created_utc": self.created_utc,
        }

    @classmethod
    def from_json(cls, obj: object, where: Path) -> RecordHeader:
        def bad(msg: str) -> IngestError:
            return IngestError("DATA_LOSS", f"{where}: {msg}; the record's meta.json is damaged")

        if not isinstance(obj, dict):
            raise bad("top level is not a JSON object")
        if obj.get("format") != FORMAT:
            raise bad(f"'format' is {obj.get('format')!r}, expected {FORMAT!r}")
        if obj.get("version") != FORMAT_VERSION:
            raise IngestError(
                "FAILED_PRECONDITION",
                f"{where}: frame record version {obj.get('version')!r} is not supported by this "
                f"build (version {FORMAT_VERSION}); read it with the release that wrote it",
            )
        units = obj.get("unit_ids")
        if not isinstance(units, list) or not all(isinstance(u, str) for u in units):
            raise bad("'unit_ids' is not a list of strings")
        if obj.get("n_cells") != len(units):
            raise bad(f"'n_cells' is {obj.get('n_cells')!r} but there are {len(units)} unit_ids")
        rate = obj.get("frame_rate_hz")
        if not isinstance(rate, int | float) or not rate > 0:
            raise bad(f"'frame_rate_hz' is {rate!r}, expected a positive number")
        sid = obj.get("session_id")
        if not isinstance(sid, str) or not sid:
            raise bad("'session_id' is missing or empty")
        meta = obj.get("metadata") or {}
        if not isinstance(meta, dict):
            raise bad("'metadata' is not a JSON object")
        return cls(
            session_id=sid,
            unit_ids=tuple(units),
            frame_rate_hz=float(rate),
            subject_id=str(obj.get("subject_id") or ""),
            genetic_background=str(obj.get("genetic_background") or ""),
            metadata=meta,
            created_utc=str(obj.get("created_utc") or ""),
        )


@dataclass(frozen=True)
class RecoveryReport:
    """What `FrameRecord.open` found: chunks and frames kept, and any torn tail cut off."""

    segments: int = 0
    chunks: int = 0
    frames: int = 0
    torn_tail: bool = False
    truncated_bytes: int = 0
    torn_segment: str | None = None
    torn_offset: int | None = None
    reason: str | None = None


@dataclass(frozen=True)
class RecordFrames:
    """Frames read from a record, sorted by frame index."""

    indices: np.ndarray  # int64 [n]
    timestamps: np.ndarray  # float64 [n]
    values: np.ndarray  # float32 [n, n_cells]

    def __len__(self) -> int:
        return int(self.indices.shape[0])


@dataclass(frozen=True)
class _Chunk:
    segment: int
    offset: int  # of the header
    n_frames: int
    seq: int
    lo: int  # smallest frame index in the chunk
    hi: int  # largest


class _IndexBitmap:
    """A growable set of non-negative frame indices (one byte per index from the smallest)."""

    def __init__(self) -> None:
        self.base = 0
        self.bits = np.zeros(0, dtype=bool)
        self.count = 0

    def _ensure(self, lo: int, hi: int) -> None:
        if self.bits.size == 0:
            self.base = lo
            self.bits = np.zeros(max(1024, hi - lo + 1), dtype=bool)
            return
        if lo < self.base:
            grow = self.base - lo
            self.bits = np.concatenate([np.zeros(grow, dtype=bool), self.bits])
            self.base = lo
        need = hi - self.base + 1
        if need > self.bits.size:
            new = np.zeros(max(need, 2 * self.bits.size), dtype=bool)
            new[: self.bits.size] = self.bits
            self.bits = new

    def contains(self, idx: np.ndarray) -> np.ndarray:
        idx = np.asarray(idx, dtype=np.int64)
        rel = idx - self.base
        ok = (rel >= 0) & (rel < self.bits.size)
        out = np.zeros(idx.shape, dtype=bool)
        out[ok] = self.bits[rel[ok]]
        return out

    def add(self, idx: np.ndarray) -> None:
        idx = np.asarray(idx, dtype=np.int64)
        if idx.size == 0:
            return
        self._ensure(int(idx.min()), int(idx.max()))
        self.bits[idx - self.base] = True
        self.count += int(idx.size)


class FrameRecord:
    """A session's durable append-only frame record (see the module docstring for the format).

    Create with `FrameRecord.create`, reopen (after a clean close, a process restart or a crash)
    with `FrameRecord.open`. ``sync=True`` (default): every `append` is fdatasync'd before it
    returns, so it survives power loss. ``sync=False`` leaves flushing to the OS (and `sync`,
    `close`): an append that returned survives the process being killed (the data is in the
    page cache) but not a kernel crash or power loss; recovery is the same either way.

    One writer at a time: a writable record holds an exclusive ``flock`` on ``<dir>/.lock``
    that the kernel releases when the process dies, so a restarted actor can reopen at once
    while a second live writer is refused.
    """

    def __init__(
        self,
        directory: Path,
        header: RecordHeader,
        *,
        readonly: bool,
        segment_bytes: int,
        sync: bool = True,
    ) -> None:
        self.directory = directory
        self.header = header
        self.readonly = readonly
        self.segment_bytes = int(segment_bytes)
        self.sync_each_append = bool(sync)
        self.recovery = RecoveryReport()
        self._chunks: list[_Chunk] = []
        self._idx_parts: list[np.ndarray] = []
        self._ts_parts: list[np.ndarray] = []
        self._recorded = _IndexBitmap()
        self._next_seq = 0
        self._last_index = -1
        self._first_index = -1
        self._seg = 0
        self._seg_size = 0
        self._fd: int | None = None
        self._lock_fd: int | None = None
        self._closed_clean = (directory / CLOSED_NAME).exists()

    # -- construction -----------------------------------------------------------------------
    @classmethod
    def create(
        cls,
        directory: str | Path,
        *,
        session_id: str,
        unit_ids: Sequence[str],
        frame_rate_hz: float,
        subject_id: str = "",
        genetic_background: str = "",
        metadata: Mapping[str, object] | None = None,
        segment_bytes: int = DEFAULT_SEGMENT_BYTES,
        sync: bool = True,
    ) -> FrameRecord:
        """A new, empty record in ``directory`` (created; it must not hold a record already)."""
        directory = Path(directory)
        if not session_id:
            raise IngestError("INVALID_ARGUMENT", "session_id must not be empty")
        units = tuple(str(u) for u in unit_ids)
        if not units:
            raise IngestError("INVALID_ARGUMENT", "unit_ids must name at least one cell")
        if len(set(units)) != len(units):
            seen: set[str] = set()
            dup = next(u for u in units if u in seen or seen.add(u))
            raise IngestError("INVALID_ARGUMENT", f"unit_ids has the duplicate id {dup!r}")
        if not (np.isfinite(frame_rate_hz) and frame_rate_hz > 0):
            raise IngestError(
                "INVALID_ARGUMENT", f"frame_rate_hz must be a positive number, got {frame_rate_hz}"
            )
        meta = dict(metadata or {})
        try:
            json.dumps(meta)
        except (TypeError, ValueError) as e:
            raise IngestError(
                "INVALID_ARGUMENT", f"metadata is not JSON-serialisable: {e}"
            ) from None
        exists = IngestError(
            "ALREADY_EXISTS",
            f"{directory} already holds a frame record; reopen it with FrameRecord.open "
            "(resume) or choose another directory",
        )
        if (directory / META_NAME).exists():
            raise exists
        directory.mkdir(parents=True, exist_ok=True)
        _fsync_dir(directory.parent)
        header = RecordHeader(
            session_id=session_id,
            unit_ids=units,
            frame_rate_hz=float(frame_rate_hz),
            subject_id=subject_id,
            genetic_background=genetic_background,
            metadata=meta,
            created_utc=_dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        )
        rec = cls(directory, header, readonly=False, segment_bytes=segment_bytes, sync=sync)
        rec._lock()  # first, so that two creators cannot both pass the checks below
        try:
            if (directory / META_NAME).exists():
                raise exists
            stray = [p.name for p in directory.iterdir() if SEGMENT_RE.match(p.name)]
            if stray:
                raise IngestError(
                    "DATA_LOSS",
                    f"{directory} holds segment files ({', '.join(sorted(stray)[:3])}) but no "
                    f"{META_NAME}; move them aside before creating a record there",
                )
            write_json_atomic(directory / META_NAME, header.to_json())
        except BaseException:
            rec.close()
            raise
        return rec

    @classmethod
    def open(
        cls,
        directory: str | Path,
        *,
        readonly: bool = False,
        segment_bytes: int = DEFAULT_SEGMENT_BYTES,
        sync: bool = True,
    ) -> FrameRecord:
        """Reopen a record, recovering from a crash: verifies every chunk, cuts a torn tail.

        ``readonly`` opens take no lock and change nothing on disk (a torn tail is ignored in
        memory and reported). Raises ``NOT_FOUND`` when there is no record, ``DATA_LOSS`` on
        corruption that is not a torn tail, ``FAILED_PRECONDITION`` when another live process
        holds the record open for writing.
        """
        directory = Path(directory)
        meta_path = directory / META_NAME
        if not meta_path.is_file():
            raise IngestError(
                "NOT_FOUND",
                f"no frame record at {directory} ({META_NAME} missing); check the session id "
                "or open a new session",
            )
        try:
            obj = json.loads(meta_path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise IngestError("DATA_LOSS", f"{meta_path}: cannot read JSON ({e})") from None
        header = RecordHeader.from_json(obj, meta_path)
        rec = cls(directory, header, readonly=readonly, segment_bytes=segment_bytes, sync=sync)
        if not readonly:
            rec._lock()
        try:
            rec._recover()
        except BaseException:
            rec.close()
            raise
        return rec

    def _lock(self) -> None:
        path = self.directory / LOCK_NAME
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
            finally:
                os.close(fd)
            raise IngestError(
                "FAILED_PRECONDITION",
                f"the frame record at {self.directory} is open for writing by another process "
                f"(pid {holder}); close that session first, or read it with readonly=True",
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self._lock_fd = fd

    # -- recovery ----------------------------------------------------------------------------
    def _segments(self) -> list[tuple[int, Path]]:
        out = []
        for p in self.directory.iterdir():
            m = SEGMENT_RE.match(p.name)
            if m:
                out.append((int(m.group(1)), p))
        out.sort()
        for want, (k, p) in enumerate(out):
            if k != want:
                raise IngestError(
                    "DATA_LOSS",
                    f"{self.directory}: segment {_segment_name(want)} is missing (found {p.name}); "
                    "the record cannot be trusted past that point",
                )
        return out

    def _parse(self, buf: bytes, pos: int, expect_seq: int) -> tuple[_Chunk | None, str, int]:
        """Check the chunk at ``pos``: (chunk, "", end) or (None, reason, fatal).

        ``fatal`` (1) marks a chunk whose checksums hold but whose contents cannot be right:
        that is corruption or a foreign writer, never a torn write, wherever it sits.
        """
        if len(buf) - pos < HEADER_SIZE:
            return None, f"short header ({len(buf) - pos} of {HEADER_SIZE} bytes)", 0
        magic, ver, _flags, n, n_cells, seq, pcrc, hcrc = _HEADER.unpack_from(buf, pos)
        if magic != MAGIC:
            return None, f"bad magic {magic!r}", 0
        if zlib.crc32(buf[pos : pos + HEADER_SIZE - 4]) != hcrc:
            return None, "header checksum mismatch", 0
        if ver != CHUNK_VERSION:
            return None, f"unknown chunk version {ver}", 1
        if n_cells != self.header.n_cells:
            return None, f"chunk has {n_cells} cells, the record {self.header.n_cells}", 1
        if not 0 < n <= MAX_CHUNK_FRAMES:
            return None, f"implausible frame count {n}", 1
        if seq != expect_seq:
            return None, f"sequence number {seq}, expected {expect_seq}", 1
        start = pos + HEADER_SIZE
        end = start + _payload_size(n, n_cells)
        if end > len(buf):
            return None, f"short payload ({len(buf) - start} of {end - start} bytes)", 0
        if zlib.crc32(buf[start:end]) != pcrc:
            return None, "payload checksum mismatch", 0
        idx = np.frombuffer(buf, dtype="<i8", count=n, offset=start)
        return _Chunk(-1, pos, n, seq, int(idx.min()), int(idx.max())), "", end

    def _any_valid_chunk_after(self, buf: bytes, pos: int, min_seq: int) -> bool:
        """Is there a chunk with seq >= min_seq anywhere after ``pos``? (corruption, not a tear)"""
        at = buf.find(MAGIC, pos + 1)
        while at >= 0:
            if len(buf) - at >= HEADER_SIZE:
                seq = _HEADER.unpack_from(buf, at)[5]
                if seq >= min_seq:
                    chunk, _, _ = self._parse(buf, at, seq)
                    if chunk is not None:
                        return True
            at = buf.find(MAGIC, at + 1)
        return False

    def _recover(self) -> None:
        segs = self._segments()
        chunks = frames = 0
        report = RecoveryReport()
        for k, path in segs:
            buf = path.read_bytes()
            pos = 0
            while pos < len(buf):
                chunk, reason, end = self._parse(buf, pos, self._next_seq)
                if chunk is None:
                    last = k == segs[-1][0]
                    fatal = end == 1
                    if (
                        last
                        and not fatal
                        and not self._any_valid_chunk_after(buf, pos, self._next_seq)
                    ):
                        report = RecoveryReport(
                            torn_tail=True,
                            truncated_bytes=len(buf) - pos,
                            torn_segment=path.name,
                            torn_offset=pos,
                            reason=reason,
                        )
                        if not self.readonly:
                            fd = os.open(path, os.O_WRONLY)
                            try:
                                os.ftruncate(fd, pos)
                                os.fsync(fd)
                            finally:
                                os.close(fd)
                        buf = buf[:pos]
                        break
                    if fatal:
                        why = "its checksums hold, so it was written that way"
                    elif not last:
                        why = "in a segment that was complete before the next one started"
                    else:
                        why = "with valid chunks after it"
                    raise IngestError(
                        "DATA_LOSS",
                        f"{path}: corrupt chunk at byte {pos} ({reason}) {why}; this is not a "
                        "torn write from a crash. Copy the record aside and export the frames "
                        "before it; do not resume this session",
                    )
                start = pos + HEADER_SIZE
                n = chunk.n_frames
                idx = np.frombuffer(buf, dtype="<i8", count=n, offset=start).astype(np.int64)
                ts = np.frombuffer(buf, dtype="<f8", count=n, offset=start + 8 * n).astype(
                    np.float64
                )
                if self._recorded.contains(idx).any() or np.unique(idx).size != n:
                    raise IngestError(
                        "DATA_LOSS",
                        f"{path}: chunk {chunk.seq} at byte {pos} repeats frame indices already "
                        "recorded; the record was written by something other than FrameRecord",
                    )
                self._add_chunk(_Chunk(k, pos, n, chunk.seq, chunk.lo, chunk.hi), idx, ts)
                chunks += 1
                frames += n
                pos = end
            self._seg, self._seg_size = k, len(buf)
        self.recovery = RecoveryReport(
            segments=len(segs),
            chunks=chunks,
            frames=frames,
            torn_tail=report.torn_tail,
            truncated_bytes=report.truncated_bytes,
            torn_segment=report.torn_segment,
            torn_offset=report.torn_offset,
            reason=report.reason,
        )

    def _add_chunk(self, chunk: _Chunk, idx: np.ndarray, ts: np.ndarray) -> None:
        self._chunks.append(chunk)
        self._idx_parts.append(idx)
        self._ts_parts.append(ts)
        self._recorded.add(idx)
        self._next_seq = chunk.seq + 1
        self._last_index = max(self._last_index, chunk.hi)
        self._first_index = chunk.lo if self._first_index < 0 else min(self._first_index, chunk.lo)

    # -- state -------------------------------------------------------------------------------
    @property
    def n_frames(self) -> int:
        """Frames durably recorded."""
        return self._recorded.count

    @property
    def last_index(self) -> int:
        """The largest recorded frame index (-1 when empty)."""
        return self._last_index

    @property
    def first_index(self) -> int:
        """The smallest recorded frame index (-1 when empty)."""
        return self._first_index

    @property
    def closed_clean(self) -> bool:
        """True once `mark_closed` ran (the session ended normally, not by a crash)."""
        return self._closed_clean

    def contains(self, indices) -> np.ndarray:
        """Which of ``indices`` are recorded (bool array)."""
        return self._recorded.contains(np.atleast_1d(np.asarray(indices, dtype=np.int64)))

    def index(self) -> tuple[np.ndarray, np.ndarray]:
        """(indices, timestamps) of every recorded frame, sorted by index (no values read)."""
        if not self._idx_parts:
            return np.zeros(0, np.int64), np.zeros(0, np.float64)
        idx = np.concatenate(self._idx_parts)
        ts = np.concatenate(self._ts_parts)
        order = np.argsort(idx, kind="stable")
        return idx[order], ts[order]

    def missing_ranges(self) -> list[tuple[int, int]]:
        """Inclusive ranges of indices between the first and last recorded frame not recorded."""
        idx, _ = self.index()
        if idx.size < 2:
            return []
        d = np.diff(idx)
        at = np.flatnonzero(d > 1)
        return [(int(idx[i] + 1), int(idx[i + 1] - 1)) for i in at]

    # -- writing -----------------------------------------------------------------------------
    def append(self, indices, timestamps, values) -> int:
        """Append frames as one chunk; durable (fdatasync'd) when this returns. Returns its seq.

        ``indices`` int [n] (unique, >= 0, not recorded yet), ``timestamps`` float [n] finite,
        ``values`` float32 [n, n_cells] finite.
        """
        if self.readonly:
            raise IngestError(
                "FAILED_PRECONDITION", f"{self.directory}: record was opened readonly"
            )
        if self._closed_clean:
            raise IngestError(
                "FAILED_PRECONDITION",
                f"session {self.header.session_id!r} was closed; open a new session to record more",
            )
        if self._lock_fd is None:
            raise IngestError("FAILED_PRECONDITION", f"{self.directory}: record is closed")
        idx = np.atleast_1d(np.asarray(indices))
        ts = np.atleast_1d(np.asarray(timestamps, dtype=np.float64))
        vals = np.asarray(values)
        n = idx.shape[0]
        if idx.ndim != 1 or n == 0 or idx.dtype.kind not in "iu":
            raise IngestError(
                "INVALID_ARGUMENT", f"indices must be a non-empty 1-D integer array, got {idx!r}"
            )
        if n > MAX_CHUNK_FRAMES:
            raise IngestError(
                "RESOURCE_EXHAUSTED", f"{n} frames in one chunk (limit {MAX_CHUNK_FRAMES})"
            )
        idx = idx.astype(np.int64)
        if vals.shape != (n, self.header.n_cells):
            raise IngestError(
                "INVALID_ARGUMENT",
                f"values have shape {vals.shape}, expected ({n}, {self.header.n_cells}) "
                "[frames, cells]",
            )
        if ts.shape != (n,):
            raise IngestError(
                "INVALID_ARGUMENT", f"timestamps have shape {ts.shape}, expected ({n},)"
            )
        if (idx < 0).any():
            raise IngestError("INVALID_ARGUMENT", "frame indices must be >= 0")
        if np.unique(idx).size != n:
            raise IngestError("INVALID_ARGUMENT", "frame indices repeat within the chunk")
        dup = self._recorded.contains(idx)
        if dup.any():
            raise IngestError(
                "FAILED_PRECONDITION",
                f"frame {int(idx[dup][0])} is already recorded for session "
                f"{self.header.session_id!r}; drop duplicates before appending",
            )
        vals = vals.astype(np.float32, copy=False)
        if not (np.isfinite(vals).all() and np.isfinite(ts).all()):
            raise IngestError("INVALID_ARGUMENT", "values and timestamps must be finite")
        data = encode_chunk(self._next_seq, idx, ts, vals)
        if self._fd is None or self._seg_size >= self.segment_bytes:
            self._open_segment()
        offset = self._seg_size
        try:
            _write_all(self._fd, data)
            if self.sync_each_append:
                _fdatasync(self._fd)
        except OSError as e:
            # Cut anything partially written so the next append starts on a chunk boundary.
            try:
                os.ftruncate(self._fd, offset)
            except OSError:
                pass
            raise IngestError(
                "RESOURCE_EXHAUSTED" if e.errno in (28, 122) else "FAILED_PRECONDITION",
                f"{self.directory}: cannot write frames ({e.strerror}); free disk space or "
                "check the record directory",
            ) from None
        self._seg_size += len(data)
        seq = self._next_seq
        self._add_chunk(
            _Chunk(self._seg, offset, n, seq, int(idx.min()), int(idx.max())),
            idx.copy(),
            ts.copy(),
        )
        return seq

    def _open_segment(self) -> None:
        """Open the current segment for appending, starting the next one when it is full."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if self._seg_size >= self.segment_bytes:
            self._seg += 1
            self._seg_size = 0
        path = self.directory / _segment_name(self._seg)
        existed = path.exists()
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        if not existed:
            _fsync_dir(self.directory)
        self._seg_size = os.fstat(self._fd).st_size

    def sync(self) -> None:
        """Make every append so far durable (for ``sync=False`` records: call it on a timer)."""
        if self._fd is not None:
            _fdatasync(self._fd)

    def mark_closed(self) -> None:
        """Record that the session ended normally (atomically); later appends are refused."""
        if self.readonly:
            raise IngestError(
                "FAILED_PRECONDITION", f"{self.directory}: record was opened readonly"
            )
        self.sync()
        write_json_atomic(
            self.directory / CLOSED_NAME,
            {
                "closed_utc": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
                "frames": self.n_frames,
                "last_frame_index": self.last_index,
            },
        )
        self._closed_clean = True

    def close(self) -> None:
        """Release the file and the writer lock (the record stays resumable unless marked)."""
        if self._fd is not None:
            if not self.sync_each_append:
                _fdatasync(self._fd)
            os.close(self._fd)
            self._fd = None
        if self._lock_fd is not None:
            try:
                fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            finally:
                os.close(self._lock_fd)
                self._lock_fd = None

    def __enter__(self) -> FrameRecord:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:  # pragma: no cover - best effort
        try:
            self.close()
        except Exception:
            pass

    # -- reading -----------------------------------------------------------------------------
    def iter_chunks(self) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """(indices, timestamps, values) of each chunk in the order written (CRC re-checked)."""
        yield from self._read_chunks(self._chunks)

    def _read_chunks(self, chunks) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        n_cells = self.header.n_cells
        files: dict[int, object] = {}
        try:
            for c in chunks:
                f = files.get(c.segment)
                if f is None:
                    f = files[c.segment] = open(self.directory / _segment_name(c.segment), "rb")
                f.seek(c.offset)
                size = HEADER_SIZE + _payload_size(c.n_frames, n_cells)
                buf = f.read(size)
                chunk, reason, _ = self._parse(buf, 0, c.seq)
                if chunk is None:
                    raise IngestError(
                        "DATA_LOSS",
                        f"{self.directory / _segment_name(c.segment)}: chunk {c.seq} at byte "
                        f"{c.offset} changed on disk since the record was opened ({reason})",
                    )
                n = c.n_frames
                idx = np.frombuffer(buf, "<i8", n, HEADER_SIZE).astype(np.int64)
                ts = np.frombuffer(buf, "<f8", n, HEADER_SIZE + 8 * n).astype(np.float64)
                vals = np.frombuffer(buf, "<f4", n * n_cells, HEADER_SIZE + 16 * n)
                yield idx, ts, vals.reshape(n, n_cells).astype(np.float32)
        finally:
            for f in files.values():
                f.close()

    def read(self, lo: int | None = None, hi: int | None = None) -> RecordFrames:
        """Recorded frames with ``lo <= index <= hi`` (all by default), sorted by index."""
        lo_ = -(1 << 62) if lo is None else int(lo)
        hi_ = 1 << 62 if hi is None else int(hi)
        parts = [
            (i, t, v)
            for i, t, v in self._read_chunks(
                [c for c in self._chunks if c.hi >= lo_ and c.lo <= hi_]
            )
        ]
        n_cells = self.header.n_cells
        if not parts:
            return RecordFrames(
                np.zeros(0, np.int64), np.zeros(0, np.float64), np.zeros((0, n_cells), np.float32)
            )
        idx = np.concatenate([p[0] for p in parts])
        ts = np.concatenate([p[1] for p in parts])
        vals = np.concatenate([p[2] for p in parts])
        keep = (idx >= lo_) & (idx <= hi_)
        idx, ts, vals = idx[keep], ts[keep], vals[keep]
        order = np.argsort(idx, kind="stable")
        return RecordFrames(idx[order], ts[order], np.ascontiguousarray(vals[order]))

    def export(self, path: str | Path, fmt: str = "nwb") -> Path:
        """Write the record as NWB (or ``brainsets`` HDF5) via `models.data.io.write_recording`."""
        from models.data.io import write_recording

        return write_recording(self.to_recording(), path, fmt=fmt)

    def to_recording(self):
        """The received frames as a `Recording` (source "stream"); gaps are listed, not filled.

        Frames are sorted by index with their real timestamps; missing frames are left out
        (a `Recording` holds finite values only) and listed in
        ``metadata["stream"]["missing_ranges"]``. Raises ``FAILED_PRECONDITION`` when the record
        holds no frames, ``INVALID_ARGUMENT`` when its timestamps do not increase with the index.
        """
        from models.data.recording import DataError, Recording, Trials

        fr = self.read()
        h = self.header
        if len(fr) == 0:
            raise IngestError(
                "FAILED_PRECONDITION",
                f"session {h.session_id!r} has no recorded frames yet; nothing to export",
            )
        missing = self.missing_ranges()
        meta = dict(h.metadata)
        meta["stream"] = {
            "first_frame_index": int(fr.indices[0]),
            "last_frame_index": int(fr.indices[-1]),
            "frames_recorded": len(fr),
            "frames_missing": int(sum(b - a + 1 for a, b in missing)),
            "missing_ranges": [[a, b] for a, b in missing],
            "closed_clean": self._closed_clean,
            "record_created_utc": h.created_utc,
        }
        try:
            return Recording(
                traces=fr.values,
                timestamps=fr.timestamps,
                unit_ids=h.unit_ids,
                session_id=h.session_id,
                subject_id=h.subject_id or "unknown",
                genetic_background=h.genetic_background or "unknown",
                sampling_rate=h.frame_rate_hz,
                trials=Trials.empty(),
                source="stream",
                source_path=str(self.directory),
                metadata=meta,
            )
        except DataError as e:
            raise IngestError("INVALID_ARGUMENT", f"cannot export the record: {e}") from None


def record_status(directory: str | Path) -> dict[str, object]:
    """``SessionStatus`` fields of a recorded session, read without disturbing a live writer.

    ``state`` is ``LIVE`` while a writer holds the record, ``CLOSED`` after a clean close, else
    ``INTERRUPTED`` (the writer died; the session can be resumed).
    """
    directory = Path(directory)
    rec = FrameRecord.open(directory, readonly=True)
    state = "CLOSED" if rec.closed_clean else "INTERRUPTED"
    lock = directory / LOCK_NAME
    if state != "CLOSED" and lock.exists():
        fd = os.open(lock, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            fcntl.flock(fd, fcntl.LOCK_UN)
        except BlockingIOError:
            state = "LIVE"
        finally:
            os.close(fd)
    missing = rec.missing_ranges()
    return {
        "session_id": rec.header.session_id,
        "state": state,
        "frames_recorded": rec.n_frames,
        "frames_missing": int(sum(b - a + 1 for a, b in missing)),
        "last_frame_index": rec.last_index,
        "n_cells": rec.header.n_cells,
        "torn_tail": rec.recovery.torn_tail,
    }


_SESSION_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def session_dir(root: str | Path, session_id: str) -> Path:
    """The record directory of ``session_id`` under ``root``; refuses ids that are not safe names.

    Session ids come from clients, so they must not name another directory ("../x", "/etc").
    """
    if not isinstance(session_id, str) or not _SESSION_ID_RE.match(session_id):
        raise IngestError(
            "INVALID_ARGUMENT",
            f"session_id {session_id!r} is not allowed: use 1-128 letters, digits, '.', '_' or "
            "'-', starting with a letter or digit",
        )
    return Path(root) / session_id


def stream_frame_indices(rec) -> np.ndarray:
    """Frame index of each frame of a `Recording` exported by `FrameRecord.to_recording`.

    Uses ``metadata["stream"]`` (kept through NWB); raises ``INVALID_ARGUMENT`` for a recording
    that did not come from a stream, or whose frame count does not match.
    """
    s = dict(rec.metadata).get("stream")
    if not isinstance(s, dict) or "first_frame_index" not in s:
        raise IngestError(
            "INVALID_ARGUMENT",
            f"recording {rec.session_id!r} has no metadata['stream']: it was not exported from "
            "a frame record",
        )
    first, last = int(s["first_frame_index"]), int(s["last_frame_index"])
    keep = np.ones(last - first + 1, dtype=bool)
    for a, b in s.get("missing_ranges") or []:
        keep[int(a) - first : int(b) - first + 1] = False
    idx = np.flatnonzero(keep).astype(np.int64) + first
    if idx.size != rec.n_frames:
        raise IngestError(
            "INVALID_ARGUMENT",
            f"recording {rec.session_id!r} has {rec.n_frames} frames but metadata['stream'] "
            f"describes {idx.size}",
        )
    return idx
