"""The data a retraining job uses: recorded sessions and the serving model's own sources.

Recorded sessions (`load_session`): the frames a live session recorded durably
(``<home>/sessions/<id>``, `service.ingest.FrameRecord`, opened read-only so a live writer is
not disturbed) and its labelled trials from ``<record dir>/trials.jsonl``, one JSON object per
line: ``{"start": s, "end": s, "direction": deg, "temporal_frequency": hz or null}`` with times on
the session's clock (the clock of the frames' timestamps). Trials that do not lie inside the
recorded frames (a stream that stopped early, or started late) are left out and counted.

The serving model's sources (`original_recordings`): the ``sources`` of the bundle's checkpoint
config (file paths for data loaded from disk, e.g. the shipped Park sessions). A path that no
longer exists is looked up by file name in the shipped data directory
(`service.cli.default_data_dir`); sources that are not files (e.g. ``simulated:<id>``: simulated
sessions generated in memory) cannot be found and are listed as unavailable. Only recordings
whose session the model knows are kept.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from models.data.recording import Recording, Trials

TRIALS_FILE = "trials.jsonl"


def session_record_dir(home: str | Path, session_id: str) -> Path:
    from service.ingest.record import session_dir

    return session_dir(Path(home) / "sessions", session_id)


def read_trials(path: Path) -> Trials:
    """The trials in a ``trials.jsonl`` file (ValueError naming the line if malformed)."""
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
            start, end = float(obj["start"]), float(obj["end"])
            direction = obj.get("direction")
            direction = math.nan if direction is None else float(direction)
            tf = obj.get("temporal_frequency")
            tf = math.nan if tf is None else float(tf)
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            raise ValueError(
                f"{path}:{n}: not a trial (need JSON with start, end, direction, "
                f"temporal_frequency): {e}"
            ) from None
        if not (math.isfinite(start) and math.isfinite(end) and end > start):
            raise ValueError(f"{path}:{n}: trial needs finite start < end, got {start}, {end}")
        rows.append((start, end, direction, tf))
    if not rows:
        return Trials.empty()
    rows.sort(key=lambda r: r[0])
    a = np.asarray(rows, dtype=np.float64)
    return Trials.from_arrays(a[:, 0], a[:, 1], a[:, 2], a[:, 3])


def record_hash(record_dir: Path) -> str:
    """sha256 over the record's meta.json, segment files (name + bytes) and trials.jsonl: the
    provenance of exactly the data a job read."""
    h = hashlib.sha256()
    names = ["meta.json", TRIALS_FILE, *sorted(p.name for p in record_dir.glob("frames-*.clr"))]
    for name in names:
        p = record_dir / name
        if not p.is_file():
            continue
        h.update(name.encode() + b"\0")
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def load_session(home: str | Path, session_id: str) -> Recording:
    """A recorded session as a `Recording` with its labelled trials (see the module docstring).

    Raises ``service.ingest.IngestError`` (NOT_FOUND) when there is no record, and ValueError when
    the session has no ``trials.jsonl`` or no labelled trial inside the recorded frames.
    """
    from service.ingest.record import FrameRecord

    d = session_record_dir(home, session_id)
    fr = FrameRecord.open(d, readonly=True)
    rec = fr.to_recording()
    tpath = d / TRIALS_FILE
    if not tpath.is_file():
        raise ValueError(
            f"session {session_id!r} has no labelled trials ({tpath} missing); a retraining job "
            "needs the stimulus of each trial"
        )
    trials = read_trials(tpath)
    inside = (trials.start >= rec.timestamps[0]) & (trials.end <= rec.timestamps[-1])
    labelled = inside & np.isfinite(trials.direction)
    if not labelled.any():
        raise ValueError(
            f"session {session_id!r}: none of the {len(trials)} trials in {tpath} is labelled "
            f"with a direction and lies inside the recorded frames "
            f"({rec.timestamps[0]:.2f} s to {rec.timestamps[-1]:.2f} s)"
        )
    meta = dict(rec.metadata)
    meta["retrain"] = {
        "trials_file": str(tpath),
        "trials_total": len(trials),
        "trials_outside_record": int((~inside).sum()),
        "record_sha256": record_hash(d),
    }
    return rec.replace(trials=trials.select(inside), metadata=meta)


def original_recordings(
    sources: Sequence[str], known_sessions: Sequence[str]
) -> tuple[list[Recording], list[str], list[str]]:
    """Load the model's training sources that can be found (module docstring).

    Returns (recordings of known sessions, the files used, the sources that were unavailable).
    """
    from models.data.io import load_recordings
    from service.cli import default_data_dir

    known = set(known_sessions)
    shipped = default_data_dir()
    files: list[Path] = []
    missing: list[str] = []
    for s in sources:
        p = Path(s)
        if not p.is_file() and (shipped / p.name).is_file() and p.suffix:
            p = shipped / p.name
        if p.is_file():
            if p not in files:
                files.append(p)
        else:
            missing.append(s)
    recs: list[Recording] = []
    if files:
        for r in load_recordings(files):
            if r.session_id in known and r.session_id not in {x.session_id for x in recs}:
                recs.append(r)
    return recs, [str(f) for f in files], missing


__all__ = [
    "TRIALS_FILE",
    "load_session",
    "original_recordings",
    "read_trials",
    "record_hash",
    "session_record_dir",
]
