"""`SessionBuffer`: the ingestion core of one live session (plain Python; a Ray actor wraps it).

Frames arrive in blocks (``first_frame_index``, values ``[k, n_cells]`` float32, timestamps
``[k]``), as in the ``Frames``/``FrameBlock`` messages of the gRPC contract. The buffer

- **validates** every block before touching any state (shape, unit count, dtype and byte length
  of raw bytes, NaN/Inf, timestamps strictly increasing within the block and consistent with the
  frames already received): a refused block changes nothing, so the client may fix and resend;
- **orders** frames by index with a reorder tolerance of ``reorder_frames`` (a jitter buffer):
  a frame that arrives in order is committed at once; frames after a hole wait until the hole
  is filled, or until ``reorder_frames`` further frames have arrived past the hole, when the
  hole is declared a **gap**: one ``GAP`` event for the whole hole, and NaN frames, masked, are
  committed in its place so the window stays aligned (their timestamps are interpolated between
  the received neighbours). A frame that arrives within the tolerance is never reported, so
  any delivery order within the tolerance gives the same window, decodes and record as in-order
  delivery. A hole longer than ``max_gap_frames`` is refused (``FAILED_PRECONDITION``);
- **drops duplicates** (a frame index received before): ``DUPLICATE`` event;
- **late frames**, i.e. frames of a hole already declared a gap: if the frame still lies in the
  ring it is put in place (unmasked; counted ``late_filled``; later windows use it); if it is
  older than the ring it cannot be placed: ``LATE`` event, ``late_dropped``, not decoded. Both
  are written to the durable record, which keeps every frame received (for dropped ones unless
  ``record_late=False``). Frames before the session's ``first_frame_index`` are ``LATE`` and not
  recorded;
- keeps a **ring buffer** of the last ``window_frames`` committed frames: `window` gives values
  ``[W, N]`` (NaN where masked), a frame mask ``[W]``, frame indices and timestamps;
- **decode stride**: committing frame ``j`` triggers a decode when ``(j + 1) % decode_stride ==
  0`` (stride 1: every frame; stride k: frames k-1, 2k-1, ...), gap frames included ("decoded
  through with masking"), except windows with no received frame at all;
- keeps a **bounded queue of pending decodes** (`DecodeTask`, each with a snapshot of its
  window). Backpressure policy, ``backpressure``:

  * ``"coalesce"`` (default, what a closed loop wants): when the queue is full the oldest pending
    decodes are dropped and the newest kept (counted ``decodes_coalesced``). Frames are always
    accepted, placed in the ring and recorded; only stale predictions are skipped.
  * ``"refuse"``: a block that would push the queue past its bound is refused whole with
    ``RESOURCE_EXHAUSTED`` before anything is recorded or changed; the client waits for
    predictions and resends it.

  Recorded frames are never lost under either policy;
- writes every new frame to a `FrameRecord` (if given) **before** the in-memory state changes:
  when `push` returns, the frames are durable; if the record cannot be written the block is
  refused and nothing changes;
- keeps counters matching ``SessionStatus`` (`status`).

A session is resumable: `SessionBuffer.open(..., resume=True)` (or `resume`) rebuilds the
ordering state and the ring from the record after a restart; `next_frame_index` is where the
client continues (``SessionAccepted.next_frame_index``).

Driving it from an actor: ``push``/``push_bytes`` per ``Frames`` message (send the returned
events as ``StreamEvent``s), then ``pop_decode`` until None and hand each `DecodeTask` to the
decoder, ``mark_decoded`` when its prediction went out; ``close`` on half-close. One owner at a
time: the object is not thread-safe.

Errors are `IngestError` with a gRPC status code name and a message saying what to do.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from service.ingest.errors import IngestError
from service.ingest.record import FrameRecord

# The SessionStatus fields of the gRPC contract that `SessionBuffer.status` fills.
STATUS_FIELDS = (
    "session_id",
    "state",
    "frames_received",
    "frames_recorded",
    "frames_decoded",
    "duplicates_dropped",
    "frames_missing",
    "late_dropped",
    "last_frame_index",
    "n_cells",
)

BACKPRESSURE_POLICIES = ("coalesce", "refuse")
MAX_FRAME_INDEX = 1 << 60  # frame indices are uint64 on the wire; int64 arithmetic here


@dataclass(frozen=True)
class IngestConfig:
    """Limits and behaviour of one session's ingestion."""

    window_frames: int = 32  # W: frames in the ring / decode window
    decode_stride: int = 1  # decode every k-th frame
    reorder_frames: int = 3  # a hole waits for this many frames past it before it is a gap
    max_gap_frames: int = 300  # a longer hole is "out of order beyond repair"
    max_pending_decodes: int = 4  # bound of the pending-decode queue
    backpressure: str = "coalesce"  # "coalesce" (drop oldest pending decodes) or "refuse"
    max_block_frames: int = 1024  # frames per message
    first_frame_index: int = 0  # index of a new session's first frame
    record_late: bool = True  # write late frames to the record too
    skip_empty_windows: bool = True  # no decode for a window without any received frame

    def __post_init__(self) -> None:
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise IngestError("INVALID_ARGUMENT", f"ingest config: {msg}")

        need(self.window_frames >= 1, f"window_frames must be >= 1, got {self.window_frames}")
        need(self.decode_stride >= 1, f"decode_stride must be >= 1, got {self.decode_stride}")
        need(self.reorder_frames >= 0, f"reorder_frames must be >= 0, got {self.reorder_frames}")
        need(
            self.max_gap_frames >= 1,
            f"max_gap_frames must be >= 1, got {self.max_gap_frames}",
        )
        need(
            self.max_pending_decodes >= 1,
            f"max_pending_decodes must be >= 1, got {self.max_pending_decodes}",
        )
        need(
            self.backpressure in BACKPRESSURE_POLICIES,
            f"backpressure must be one of {BACKPRESSURE_POLICIES}, got {self.backpressure!r}",
        )
        need(self.max_block_frames >= 1, "max_block_frames must be >= 1")
        need(self.first_frame_index >= 0, "first_frame_index must be >= 0")


@dataclass(frozen=True)
class StreamEvent:
    """A ``StreamEvent`` of the contract: GAP, DUPLICATE or LATE for frames [first, last]."""

    kind: str
    first_frame_index: int
    last_frame_index: int
    message: str


@dataclass(frozen=True)
class Window:
    """The ring's frames, oldest first: ``values [W, N]`` (NaN where ``mask`` is False).

    ``mask [W]`` is True for frames that were received; gap frames and the frames before the
    session's first frame (index < ``first_frame_index``; present until W frames arrived) are
    masked. ``timestamps`` are real for received frames, interpolated in gaps, extrapolated at
    the frame rate before the first frame (NaN while nothing was received).
    """

    values: np.ndarray
    mask: np.ndarray
    frame_indices: np.ndarray
    timestamps: np.ndarray

    @property
    def masked_fraction(self) -> float:
        return float(1.0 - self.mask.mean()) if self.mask.size else 1.0

    def filled(self, value: float = 0.0) -> np.ndarray:
        """Values with masked frames set to ``value`` (what a model takes)."""
        out = self.values.copy()
        out[~self.mask] = value
        return out


@dataclass(frozen=True)
class DecodeTask:
    """A pending decode of the window ending at ``frame_index``."""

    frame_index: int
    timestamp: float
    window: Window
    enqueued_at: float  # time.monotonic() when it was queued (for queue-wait metrics)


@dataclass
class PushResult:
    """What one `push` did."""

    events: list[StreamEvent] = field(default_factory=list)
    frames_accepted: int = 0  # new frames (not duplicates), recorded
    duplicates: int = 0
    late: int = 0  # late frames (placed or dropped)
    frames_recorded: int = 0
    decodes_enqueued: int = 0
    decodes_coalesced: int = 0  # pending decodes dropped to make room (coalesce policy)
    next_frame_index: int = 0  # the next frame the session waits for


class _Ledger:
    """Received flag and timestamp per frame index (from ``base``), growable."""

    def __init__(self, base: int) -> None:
        self.base = base
        self.received = np.zeros(4096, dtype=bool)
        self.ts = np.full(4096, np.nan)
        self.top = base - 1  # the largest index added

    def _grow(self, hi: int) -> None:
        need = hi - self.base + 1
        if need > self.received.size:
            size = max(need, 2 * self.received.size)
            r = np.zeros(size, dtype=bool)
            r[: self.received.size] = self.received
            t = np.full(size, np.nan)
            t[: self.ts.size] = self.ts
            self.received, self.ts = r, t

    def contains(self, idx: np.ndarray) -> np.ndarray:
        rel = np.asarray(idx, dtype=np.int64) - self.base
        ok = (rel >= 0) & (rel < self.received.size)
        out = np.zeros(rel.shape, dtype=bool)
        out[ok] = self.received[rel[ok]]
        return out

    def add(self, idx: np.ndarray, ts: np.ndarray) -> None:
        if idx.size == 0:
            return
        self._grow(int(idx.max()))
        rel = idx - self.base
        self.received[rel] = True
        self.ts[rel] = ts
        self.top = max(self.top, int(idx.max()))

    def prev(self, j: int) -> tuple[int, float] | None:
        """The received frame with the largest index < j."""
        end = min(j - self.base, self.received.size)
        step = 256
        hi = end
        while hi > 0:
            lo = max(0, hi - step)
            hit = np.flatnonzero(self.received[lo:hi])
            if hit.size:
                r = lo + int(hit[-1])
                return r + self.base, float(self.ts[r])
            hi, step = lo, step * 4
        return None

    def next(self, j: int) -> tuple[int, float] | None:
        """The received frame with the smallest index > j."""
        start = max(0, j + 1 - self.base)
        hit = np.flatnonzero(self.received[start : self.top - self.base + 1])
        if hit.size == 0:
            return None
        r = start + int(hit[0])
        return r + self.base, float(self.ts[r])

    def received_in(self, lo: int, hi: int) -> np.ndarray:
        """Indices of received frames in [lo, hi]."""
        a = max(0, lo - self.base)
        b = min(self.received.size, hi - self.base + 1)
        if b <= a:
            return np.zeros(0, np.int64)
        return np.flatnonzero(self.received[a:b]).astype(np.int64) + a + self.base


def _runs(idx: np.ndarray) -> list[tuple[int, int]]:
    """Consecutive runs [a, b] of a sorted index array."""
    if idx.size == 0:
        return []
    cut = np.flatnonzero(np.diff(idx) != 1)
    starts = np.concatenate([[0], cut + 1])
    ends = np.concatenate([cut, [idx.size - 1]])
    return [(int(idx[s]), int(idx[e])) for s, e in zip(starts, ends, strict=True)]


def _span(a: int, b: int) -> str:
    return f"frame {a}" if a == b else f"frames {a}-{b}"


class SessionBuffer:
    """Ordering, gaps, duplicates, ring window, decode stride and backpressure for one session.

    Not thread-safe: one owner (a Ray actor processes one call at a time) drives it.
    """

    def __init__(
        self,
        session_id: str,
        unit_ids: Sequence[str],
        frame_rate_hz: float,
        config: IngestConfig | None = None,
        *,
        record: FrameRecord | None = None,
    ) -> None:
        cfg = config or IngestConfig()
        units = tuple(str(u) for u in unit_ids)
        if not session_id:
            raise IngestError("INVALID_ARGUMENT", "session_id must not be empty")
        if not units:
            raise IngestError(
                "INVALID_ARGUMENT", "unit_ids must list the cells in the column order of frames"
            )
        if len(set(units)) != len(units):
            raise IngestError("INVALID_ARGUMENT", "unit_ids must be unique")
        if not (np.isfinite(frame_rate_hz) and frame_rate_hz > 0):
            raise IngestError(
                "INVALID_ARGUMENT", f"frame_rate_hz must be a positive number, got {frame_rate_hz}"
            )
        if record is not None:
            h = record.header
            if h.unit_ids != units:
                raise IngestError(
                    "FAILED_PRECONDITION",
                    f"session {session_id!r} was recorded with {h.n_cells} unit_ids "
                    f"({', '.join(h.unit_ids[:3])}, ...); send the same unit_ids in the same "
                    "order to resume it, or open a new session",
                )
        self.session_id = session_id
        self.unit_ids = units
        self.n_cells = len(units)
        self.frame_rate_hz = float(frame_rate_hz)
        self.config = cfg
        self.record = record
        self.state = "LIVE"
        self._start = cfg.first_frame_index
        self._ledger = _Ledger(self._start)
        self._next = self._start  # next frame index to commit
        self._hi = self._start - 1  # highest frame index received
        self._pending: dict[int, np.ndarray] = {}  # reorder buffer: index -> values [N]
        w, n = cfg.window_frames, self.n_cells
        self._ring_vals = np.full((w, n), np.nan, dtype=np.float32)
        self._ring_present = np.zeros(w, dtype=bool)
        self._ring_idx = np.full(w, -(1 << 62), dtype=np.int64)
        self._ring_ts = np.full(w, np.nan)
        self._queue: deque[DecodeTask] = deque()
        self.counters: dict[str, int] = dict.fromkeys(
            (
                "frames_received",
                "frames_recorded",
                "frames_decoded",
                "duplicates_dropped",
                "frames_missing",
                "late_dropped",
                "late_filled",
                "gap_events",
                "decodes_triggered",
                "decodes_coalesced",
                "decodes_skipped_empty",
                "blocks_refused",
            ),
            0,
        )

    # -- construction with a durable record -------------------------------------------------
    @classmethod
    def open(
        cls,
        directory: str | Path,
        *,
        session_id: str,
        unit_ids: Sequence[str],
        frame_rate_hz: float,
        subject_id: str = "",
        genetic_background: str = "",
        metadata: Mapping[str, object] | None = None,
        config: IngestConfig | None = None,
        resume: bool = False,
        sync: bool = True,
    ) -> SessionBuffer:
        """Open a session recording to ``directory`` (``SessionOpen`` of the contract).

        A new directory starts a new record. An existing record is continued only with
        ``resume=True`` (else ``ALREADY_EXISTS``); ``resume=True`` without a record starts a new
        one. After a resume, `next_frame_index` is where the client continues. ``sync`` is
        `FrameRecord`'s: fdatasync every block before `push` returns (default).
        """
        directory = Path(directory)
        exists = (directory / "meta.json").exists()
        if exists and not resume:
            raise IngestError(
                "ALREADY_EXISTS",
                f"session {session_id!r} already has a record; reconnect with resume=true to "
                "continue it, or use a new session id",
            )
        if exists:
            rec = FrameRecord.open(directory, sync=sync)
            try:
                if rec.header.session_id != session_id:
                    raise IngestError(
                        "FAILED_PRECONDITION",
                        f"{directory} holds session {rec.header.session_id!r}, not {session_id!r}",
                    )
                return cls.resume(rec, config, unit_ids=unit_ids)
            except BaseException:
                rec.close()
                raise
        rec = FrameRecord.create(
            directory,
            session_id=session_id,
            unit_ids=unit_ids,
            frame_rate_hz=frame_rate_hz,
            subject_id=subject_id,
            genetic_background=genetic_background,
            metadata=metadata,
            sync=sync,
        )
        try:
            return cls(session_id, unit_ids, frame_rate_hz, config, record=rec)
        except BaseException:
            rec.close()
            raise

    @classmethod
    def resume(
        cls,
        record: FrameRecord,
        config: IngestConfig | None = None,
        *,
        unit_ids: Sequence[str] | None = None,
    ) -> SessionBuffer:
        """Continue a session from its record (after a restart or crash).

        Everything recorded counts as received; the session continues after the largest recorded
        index (holes below it are gaps); the ring is rebuilt from the record. Counters of the
        previous run other than ``frames_recorded`` and ``frames_missing`` restart at zero.
        """
        h = record.header
        if record.closed_clean:
            raise IngestError(
                "FAILED_PRECONDITION",
                f"session {h.session_id!r} was closed; open a new session to record more",
            )
        cfg = config or IngestConfig()
        buf = cls(
            h.session_id,
            h.unit_ids if unit_ids is None else unit_ids,
            h.frame_rate_hz,
            cfg,
            record=record,
        )
        idx, ts = record.index()
        keep = idx >= buf._start
        idx, ts = idx[keep], ts[keep]
        if idx.size:
            buf._ledger.add(idx, ts)
            buf._hi = int(idx[-1])
            buf._next = buf._hi + 1
            buf.counters["frames_missing"] = int(buf._next - buf._start - idx.size)
            w = cfg.window_frames
            lo = buf._next - w
            fr = record.read(lo=lo, hi=buf._next - 1)
            for j in range(max(lo, buf._start), buf._next):
                buf._ring_gap(j)
            for j, t, v in zip(fr.indices.tolist(), fr.timestamps, fr.values, strict=True):
                buf._ring_put(j, t, v)
        buf.counters["frames_recorded"] = record.n_frames
        return buf

    # -- properties --------------------------------------------------------------------------
    @property
    def next_frame_index(self) -> int:
        """The next frame index the session expects (``SessionAccepted.next_frame_index``)."""
        return max(self._next, self._hi + 1)

    @property
    def pending_decodes(self) -> int:
        return len(self._queue)

    @property
    def frames_waiting(self) -> int:
        """Frames received but held in the reorder buffer behind a hole."""
        return len(self._pending)

    def is_decode_frame(self, j: int) -> bool:
        """Does committing frame ``j`` trigger a decode (the decode stride)?"""
        return (j + 1) % self.config.decode_stride == 0

    # -- input -------------------------------------------------------------------------------
    def push_bytes(
        self,
        first_frame_index: int,
        data: bytes,
        n_frames: int,
        n_cells: int,
        timestamps: Sequence[float],
    ) -> PushResult:
        """`push` for a ``FrameBlock``: ``data`` is n_frames x n_cells float32 little-endian."""
        if n_cells != self.n_cells:
            raise self._refuse(
                "INVALID_ARGUMENT",
                f"block says n_cells={n_cells} but session {self.session_id!r} was opened with "
                f"{self.n_cells} unit_ids; send every frame with all {self.n_cells} cells in "
                "the order of unit_ids",
            )
        if n_frames < 1:
            raise self._refuse(
                "INVALID_ARGUMENT", f"block has n_frames={n_frames}; send at least one frame"
            )
        want = n_frames * n_cells * 4
        if len(data) != want:
            raise self._refuse(
                "INVALID_ARGUMENT",
                f"block values hold {len(data)} bytes but n_frames x n_cells x 4 = {n_frames} x "
                f"{n_cells} x 4 = {want} (float32, little-endian, row-major [frames, cells])",
            )
        values = np.frombuffer(data, dtype="<f4").reshape(n_frames, n_cells)
        return self.push(first_frame_index, values, timestamps)

    def push(self, first_frame_index: int, values, timestamps) -> PushResult:
        """Accept a block of consecutive frames starting at ``first_frame_index``.

        ``values`` ``[k, n_cells]`` (float32; other real dtypes are converted), ``timestamps``
        ``[k]`` seconds, strictly increasing. Raises `IngestError` (nothing changed) when the
        block is refused.
        """
        cfg = self.config
        if self.state != "LIVE":
            raise self._refuse(
                "FAILED_PRECONDITION",
                f"session {self.session_id!r} is closed; open a new session (or resume) to send "
                "more frames",
            )
        first, vals, ts = self._validate(first_frame_index, values, timestamps)
        k = vals.shape[0]
        idx = first + np.arange(k, dtype=np.int64)

        # -- classify every frame -------------------------------------------------------------
        before = idx < self._start
        dup = ~before & self._ledger.contains(idx)
        rest = ~before & ~dup
        late = rest & (idx < self._next)
        new = rest & ~late
        w = cfg.window_frames
        newest = self._next - 1
        late_fill = late & (idx > newest - w)
        late_drop = late & ~late_fill
        keep = new | late  # frames the session takes in (ledger; record)
        self._check_timestamps(idx, ts, keep)

        # -- plan the commits (no state changes yet) ------------------------------------------
        new_idx = idx[new]
        pend = np.array(sorted(set(self._pending) | set(new_idx.tolist())), dtype=np.int64)
        self._check_gap(pend)
        hi = max(self._hi, int(idx[keep].max()) if keep.any() else self._hi)
        runs, next_after = self._plan(pend, hi, flush=False)
        fresh = idx[keep]  # sorted
        triggers, skipped = self._triggers(runs, fresh)
        if cfg.backpressure == "refuse" and len(self._queue) + len(triggers) > (
            cfg.max_pending_decodes
        ):
            raise self._refuse(
                "RESOURCE_EXHAUSTED",
                f"decode queue full: {len(self._queue)} decodes pending (limit "
                f"{cfg.max_pending_decodes}) and this block would add {len(triggers)}; wait "
                "for predictions before sending more, send smaller blocks (at most "
                f"{cfg.max_pending_decodes * cfg.decode_stride} frames), or raise decode_stride",
            )

        # -- durable first: a frame is acknowledged only once it is on disk -------------------
        to_record = new | late_fill | (late_drop if cfg.record_late else np.zeros_like(new))
        n_rec = 0
        if self.record is not None and to_record.any():
            self.record.append(idx[to_record], ts[to_record], vals[to_record])
            n_rec = int(to_record.sum())

        # -- apply -----------------------------------------------------------------------------
        res = PushResult()
        c = self.counters
        c["frames_received"] += k
        c["frames_recorded"] += n_rec
        c["duplicates_dropped"] += int(dup.sum())
        c["late_dropped"] += int(late_drop.sum() + before.sum())
        c["late_filled"] += int(late_fill.sum())
        self._ledger.add(idx[keep], ts[keep])
        self._hi = hi
        for i in np.flatnonzero(new):
            self._pending[int(idx[i])] = vals[i]
        for i in np.flatnonzero(late_fill):
            self._ring_put(int(idx[i]), float(ts[i]), vals[i])
        for a, b in _runs(idx[dup]):
            res.events.append(
                StreamEvent(
                    "DUPLICATE",
                    a,
                    b,
                    f"{_span(a, b)} arrived again; the copies were dropped",
                )
            )
        for a, b in _runs(idx[before]):
            res.events.append(
                StreamEvent(
                    "LATE",
                    a,
                    b,
                    f"{_span(a, b)} precede the session's first frame {self._start}; dropped, "
                    "not recorded",
                )
            )
        kept = "kept in the record" if cfg.record_late else "not recorded"
        for a, b in _runs(idx[late_drop]):
            res.events.append(
                StreamEvent(
                    "LATE",
                    a,
                    b,
                    f"{_span(a, b)} arrived after being reported missing and are older than the "
                    f"{w}-frame window; not decoded, {kept}",
                )
            )
        self._apply(runs, triggers, res)
        assert self._next == next_after
        c["decodes_skipped_empty"] += skipped
        res.frames_accepted = int(new.sum())
        res.duplicates = int(dup.sum())
        res.late = int(late.sum() + before.sum())
        res.frames_recorded = n_rec
        res.next_frame_index = self.next_frame_index
        return res

    def flush(self) -> PushResult:
        """Commit every frame held behind a hole now, declaring the holes gaps (at close)."""
        res = PushResult()
        if self._pending:
            pend = np.array(sorted(self._pending), dtype=np.int64)
            runs, _ = self._plan(pend, self._hi, flush=True)
            triggers, skipped = self._triggers(runs, np.zeros(0, np.int64))
            self._apply(runs, triggers, res)
            self.counters["decodes_skipped_empty"] += skipped
        res.next_frame_index = self.next_frame_index
        return res

    def close(self) -> dict[str, object]:
        """End the session: flush, mark the record closed, release it. Returns `status`."""
        if self.state == "LIVE":
            self.flush()
            self.state = "CLOSED"
            if self.record is not None:
                self.record.mark_closed()
                self.record.close()
        return self.status()

    # -- output ------------------------------------------------------------------------------
    def window(self) -> Window:
        """The last ``window_frames`` committed frames, oldest first (see `Window`)."""
        return self._window_at(self._next - 1)

    def pop_decode(self) -> DecodeTask | None:
        """The oldest pending decode (None when there is none)."""
        return self._queue.popleft() if self._queue else None

    def mark_decoded(self, n: int = 1) -> None:
        """Count decodes whose predictions were produced (``frames_decoded``)."""
        self.counters["frames_decoded"] += int(n)

    def status(self) -> dict[str, object]:
        """``SessionStatus`` fields (`STATUS_FIELDS`) and further counters and state.

        Counters only grow: ``frames_received`` counts every frame of every accepted block
        (duplicates and late frames included; refused blocks count in ``blocks_refused``),
        ``frames_missing`` the frames reported in GAP events (a late frame that fills one later
        counts in ``late_filled`` or ``late_dropped``), ``frames_decoded`` what `mark_decoded`
        reported. ``last_frame_index`` is the largest index received (-1 before any).
        """
        c = self.counters
        out: dict[str, object] = {
            "session_id": self.session_id,
            "state": self.state,
            "frames_received": c["frames_received"],
            "frames_recorded": c["frames_recorded"],
            "frames_decoded": c["frames_decoded"],
            "duplicates_dropped": c["duplicates_dropped"],
            "frames_missing": c["frames_missing"],
            "late_dropped": c["late_dropped"],
            "last_frame_index": self._hi if self._hi >= self._start else -1,
            "n_cells": self.n_cells,
        }
        out.update({k: v for k, v in c.items() if k not in out})
        out.update(
            next_frame_index=self.next_frame_index,
            frames_waiting=len(self._pending),
            decodes_pending=len(self._queue),
        )
        return out

    # -- internals ---------------------------------------------------------------------------
    def _refuse(self, code: str, message: str) -> IngestError:
        self.counters["blocks_refused"] += 1
        return IngestError(code, f"session {self.session_id!r}: {message}")

    def _validate(self, first, values, timestamps) -> tuple[int, np.ndarray, np.ndarray]:
        cfg = self.config
        try:
            first = int(first)
        except (TypeError, ValueError):
            raise self._refuse(
                "INVALID_ARGUMENT", f"first_frame_index must be an integer, got {first!r}"
            ) from None
        if first < 0:
            raise self._refuse("INVALID_ARGUMENT", f"first_frame_index {first} is negative")
        if first > MAX_FRAME_INDEX:
            raise self._refuse(
                "INVALID_ARGUMENT",
                f"first_frame_index {first} is beyond {MAX_FRAME_INDEX}; number frames from 0 "
                "(or from the session's first_frame_index)",
            )
        v = np.asarray(values)
        if v.dtype.kind not in "fiu":
            raise self._refuse(
                "INVALID_ARGUMENT",
                f"frame values have dtype {v.dtype}; send float32 dF/F values",
            )
        if v.ndim != 2:
            hint = "; for one frame send shape (1, n_cells)" if v.ndim == 1 else ""
            raise self._refuse(
                "INVALID_ARGUMENT",
                f"frame values have shape {v.shape}, expected [frames, {self.n_cells}]{hint}",
            )
        k, n = v.shape
        if n != self.n_cells:
            raise self._refuse(
                "INVALID_ARGUMENT",
                f"frames have {n} cells but the session was opened with {self.n_cells} "
                f"unit_ids; send all {self.n_cells} cells in the order of unit_ids",
            )
        if k == 0:
            raise self._refuse("INVALID_ARGUMENT", "block holds no frames; send at least one")
        if k > cfg.max_block_frames:
            raise self._refuse(
                "RESOURCE_EXHAUSTED",
                f"block of {k} frames exceeds the limit of {cfg.max_block_frames} frames per "
                "message; split it into smaller blocks",
            )
        with np.errstate(over="ignore", invalid="ignore"):
            v = np.array(v, dtype=np.float32)  # a copy: the caller may reuse its buffer
        bad = ~np.isfinite(v)
        if bad.any():
            f, u = (int(x) for x in np.argwhere(bad)[0])
            raise self._refuse(
                "INVALID_ARGUMENT",
                f"frame values contain {int(bad.sum())} NaN/Inf (first at frame {first + f}, "
                f"cell {self.unit_ids[u]!r}); send finite dF/F (if a whole frame is missing, "
                "skip its index: it is masked as a gap)",
            )
        try:
            t = np.asarray(timestamps, dtype=np.float64)
        except (TypeError, ValueError):
            raise self._refuse("INVALID_ARGUMENT", "timestamps must be numbers") from None
        if t.shape != (k,):
            raise self._refuse(
                "INVALID_ARGUMENT",
                f"got {t.size} timestamps for {k} frames; send one timestamp per frame",
            )
        if not np.isfinite(t).all():
            raise self._refuse("INVALID_ARGUMENT", "timestamps contain NaN/Inf")
        if k > 1:
            d = np.diff(t)
            if (d <= 0).any():
                i = int(np.argmax(d <= 0))
                raise self._refuse(
                    "INVALID_ARGUMENT",
                    f"timestamps must be strictly increasing: frame {first + i + 1} at "
                    f"{t[i + 1]:.6f} s does not come after frame {first + i} at {t[i]:.6f} s",
                )
        return first, v, t

    def _check_timestamps(self, idx: np.ndarray, ts: np.ndarray, keep: np.ndarray) -> None:
        """Kept frames' times must increase with the index together with those received."""
        if not keep.any():
            return
        ki, kt = idx[keep], ts[keep]
        a, b = int(ki[0]), int(ki[-1])
        inside = self._ledger.received_in(a, b)
        parts_i = [ki, inside]
        parts_t = [kt, self._ledger.ts[inside - self._ledger.base]]
        for nb in (self._ledger.prev(a), self._ledger.next(b)):
            if nb is not None:
                parts_i.append(np.array([nb[0]], np.int64))
                parts_t.append(np.array([nb[1]]))
        ii, tt = np.concatenate(parts_i), np.concatenate(parts_t)
        order = np.argsort(ii, kind="stable")
        ii, tt = ii[order], tt[order]
        bad = np.flatnonzero(np.diff(tt) <= 0)
        if bad.size:
            i = int(bad[0])
            raise self._refuse(
                "INVALID_ARGUMENT",
                f"timestamps must increase with the frame index: frame {ii[i + 1]} at "
                f"{tt[i + 1]:.6f} s does not come after frame {ii[i]} at {tt[i]:.6f} s "
                "(received earlier); send times on one clock",
            )

    def _check_gap(self, pend: np.ndarray) -> None:
        if pend.size == 0:
            return
        seq = np.concatenate([[self._next - 1], pend])
        holes = np.diff(seq) - 1
        big = np.flatnonzero(holes > self.config.max_gap_frames)
        if big.size:
            i = int(big[0])
            a, b = int(seq[i]), int(seq[i + 1])
            after = f"after frame {a}" if a >= self._start else "at the start of the session"
            raise self._refuse(
                "FAILED_PRECONDITION",
                f"frame {b} would leave {b - a - 1} frames missing {after} (limit "
                f"max_gap_frames={self.config.max_gap_frames}): the stream is out of order beyond "
                f"repair. Send frames from index {self.next_frame_index}, or reopen the session "
                "with resume=true to continue from what the server holds",
            )

    def _plan(
        self, pend: np.ndarray, hi: int, flush: bool
    ) -> tuple[list[tuple[str, int, int]], int]:
        """Commit runs ("frames"|"gap", a, b) given the reorder buffer ``pend`` (sorted)."""
        r = self.config.reorder_frames
        out: list[tuple[str, int, int]] = []
        n = self._next
        k = 0
        p_list = pend.tolist()
        while k < len(p_list):
            p = p_list[k]
            if p == n:
                a = n
                while k < len(p_list) and p_list[k] == n:
                    n += 1
                    k += 1
                out.append(("frames", a, n - 1))
            elif flush or hi >= p + r:
                out.append(("gap", n, p - 1))
                n = p
            else:
                break
        return out, n

    def _triggers(self, runs, fresh: np.ndarray) -> tuple[list[int], int]:
        """Frames whose commit triggers a decode (non-empty windows) and the number skipped."""
        s = self.config.decode_stride
        w = self.config.window_frames
        out: list[int] = []
        skipped = 0
        for kind, a, b in runs:
            first = a + (-(a + 1)) % s
            for t in range(first, b + 1, s):
                if self.config.skip_empty_windows and kind == "gap":
                    lo = t - w + 1
                    has = self._ledger.received_in(lo, t).size or (
                        np.searchsorted(fresh, t, "right") > np.searchsorted(fresh, lo, "left")
                    )
                    if not has:
                        skipped += 1
                        continue
                out.append(t)
        return out, skipped

    def _apply(self, runs, triggers: list[int], res: PushResult) -> None:
        cfg = self.config
        q = cfg.max_pending_decodes
        keep_from = max(0, len(triggers) - q) if cfg.backpressure == "coalesce" else 0
        snap = set(triggers[keep_from:])
        dropped_here = keep_from
        c = self.counters
        for kind, a, b in runs:
            if kind == "gap":
                c["frames_missing"] += b - a + 1
                c["gap_events"] += 1
                res.events.append(
                    StreamEvent(
                        "GAP",
                        a,
                        b,
                        f"{_span(a, b)} never arrived; decoded through with masking",
                    )
                )
                prev = self._ledger.prev(a)
                nxt = self._ledger.next(b)
                for j in range(a, b + 1):
                    self._ring_gap(j, prev, nxt)
                    if j in snap:
                        self._enqueue(j)
            else:
                for j in range(a, b + 1):
                    t = float(self._ledger.ts[j - self._ledger.base])
                    self._ring_put(j, t, self._pending.pop(j))
                    if j in snap:
                        self._enqueue(j)
            self._next = b + 1
        c["decodes_triggered"] += len(triggers)
        res.decodes_enqueued += len(triggers) - dropped_here
        while len(self._queue) > q:
            self._queue.popleft()
            dropped_here += 1
        c["decodes_coalesced"] += dropped_here
        res.decodes_coalesced += dropped_here

    def _enqueue(self, j: int) -> None:
        win = self._window_at(j)
        ts = float(win.timestamps[-1])
        self._queue.append(DecodeTask(j, ts, win, time.monotonic()))

    def _ring_put(self, j: int, t: float, v) -> None:
        s = j % self.config.window_frames
        self._ring_idx[s] = j
        self._ring_present[s] = True
        self._ring_ts[s] = t
        if v is not None:
            self._ring_vals[s] = v

    def _ring_gap(self, j: int, prev=None, nxt=None) -> None:
        """Put masked NaN frame ``j`` in the ring, its time interpolated between neighbours."""
        s = j % self.config.window_frames
        self._ring_idx[s] = j
        self._ring_present[s] = False
        self._ring_vals[s] = np.nan
        if prev is None and nxt is None:
            prev, nxt = self._ledger.prev(j), self._ledger.next(j)
        dt = 1.0 / self.frame_rate_hz
        if prev is not None and nxt is not None:
            (ia, ta), (ib, tb) = prev, nxt
            t = ta + (j - ia) * (tb - ta) / (ib - ia)
        elif nxt is not None:
            t = nxt[1] - (nxt[0] - j) * dt
        elif prev is not None:
            t = prev[1] + (j - prev[0]) * dt
        else:
            t = np.nan
        self._ring_ts[s] = t

    def _window_at(self, t: int) -> Window:
        w = self.config.window_frames
        idx = np.arange(t - w + 1, t + 1, dtype=np.int64)
        slots = idx % w
        valid = (idx >= self._start) & (self._ring_idx[slots] == idx)
        values = np.where(valid[:, None], self._ring_vals[slots], np.float32(np.nan)).astype(
            np.float32
        )
        mask = valid & self._ring_present[slots]
        ts = np.where(valid, self._ring_ts[slots], np.nan)
        if valid.any() and not valid.all():
            p = int(np.argmax(valid))
            ts[:p] = ts[p] - (idx[p] - idx[:p]) / self.frame_rate_hz
        return Window(values=values, mask=mask, frame_indices=idx, timestamps=ts)
