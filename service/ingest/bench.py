"""Throughput of the durable record and of the session path (no assertions; a report).

    python -m service.ingest.bench [--cells 512] [--seconds 2] [--dir DIR]

For each chunk size (frames per append) it appends for ``--seconds`` with an fdatasync per
chunk and prints frames/s, MB/s and appends/s; then the same through `SessionBuffer.push`
(validation, ordering, ring, decode snapshots, record). Run it on the disk the service uses:
fsync cost is the disk's, not Python's.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import numpy as np

from service.ingest.record import FrameRecord
from service.ingest.session import IngestConfig, SessionBuffer


def _units(n: int) -> list[str]:
    return [f"c{i}" for i in range(n)]


def bench_record(
    directory: str, n_cells: int, chunk: int, seconds: float, sync: bool = True
) -> dict:
    rec = FrameRecord.create(
        f"{directory}/rec-{chunk}-{int(sync)}",
        session_id="bench",
        unit_ids=_units(n_cells),
        frame_rate_hz=30,
        sync=sync,
    )
    vals = np.random.default_rng(0).standard_normal((chunk, n_cells)).astype(np.float32)
    j = appends = 0
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        idx = np.arange(j, j + chunk)
        rec.append(idx, idx / 30.0, vals)
        j += chunk
        appends += 1
    dt = time.perf_counter() - t0
    rec.close()
    t1 = time.perf_counter()
    FrameRecord.open(f"{directory}/rec-{chunk}-{int(sync)}", readonly=True)
    reopen = time.perf_counter() - t1
    return {
        "path": "FrameRecord.append" + ("" if sync else " (sync=False)"),
        "cells": n_cells,
        "frames_per_append": chunk,
        "frames_per_s": round(j / dt),
        "appends_per_s": round(appends / dt),
        "MB_per_s": round(j * (16 + 4 * n_cells) / dt / 1e6, 1),
        "reopen_s_per_1k_frames": round(reopen / j * 1000, 4),
    }


def bench_session(directory: str, n_cells: int, chunk: int, seconds: float) -> dict:
    buf = SessionBuffer.open(
        f"{directory}/sess-{chunk}",
        session_id="bench",
        unit_ids=_units(n_cells),
        frame_rate_hz=30,
        config=IngestConfig(window_frames=32, max_pending_decodes=4),
    )
    vals = np.random.default_rng(0).standard_normal((chunk, n_cells)).astype(np.float32)
    j = 0
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        buf.push(j, vals, (np.arange(j, j + chunk)) / 30.0)
        while buf.pop_decode() is not None:
            pass
        j += chunk
    dt = time.perf_counter() - t0
    buf.close()
    return {
        "path": "SessionBuffer.push (+record, stride 1, W=32)",
        "cells": n_cells,
        "frames_per_append": chunk,
        "frames_per_s": round(j / dt),
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cells", type=int, default=512)
    ap.add_argument("--seconds", type=float, default=2.0)
    ap.add_argument("--chunks", default="1,4,16,64,256")
    ap.add_argument("--dir", default=None, help="where to write (default: a temp dir)")
    a = ap.parse_args(argv)
    chunks = [int(c) for c in a.chunks.split(",")]
    with tempfile.TemporaryDirectory(dir=a.dir) as d:
        for c in chunks:
            print(json.dumps(bench_record(d, a.cells, c, a.seconds)), flush=True)
        for c in chunks:
            print(json.dumps(bench_record(d, a.cells, c, a.seconds, sync=False)), flush=True)
        for c in chunks:
            print(json.dumps(bench_session(d, a.cells, c, a.seconds)), flush=True)


if __name__ == "__main__":
    main()
