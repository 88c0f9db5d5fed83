"""FrameRecord: durable append-only record, crash recovery, torn tails, export to NWB."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from service.ingest import (
    FrameRecord,
    IngestError,
    SessionBuffer,
    record_status,
    session_dir,
    stream_frame_indices,
)
from service.ingest.record import HEADER_SIZE, _payload_size

REPO = Path(__file__).resolve().parents[3]
N = 7
UNITS = [f"roi_{i:03d}" for i in range(N)]
RATE = 30.0


def values_for(idx: np.ndarray, n: int = N) -> np.ndarray:
    """Deterministic float32 values with full mantissas (bit-exactness is meaningful)."""
    idx = np.asarray(idx, dtype=np.int64)
    x = np.sin(idx[:, None] * 0.731 + np.arange(n)[None, :] * 1.37) * 3.0
    return x.astype(np.float32)


def ts_for(idx) -> np.ndarray:
    return np.asarray(idx, dtype=np.float64) / RATE + 12.345


def create(d: Path, **kw) -> FrameRecord:
    return FrameRecord.create(
        d,
        session_id="sess-A",
        unit_ids=UNITS,
        frame_rate_hz=RATE,
        subject_id="mouse-7",
        genetic_background="Vip-IRES-Cre",
        metadata={"rig": "2p-3", "depth_um": 175},
        **kw,
    )


def append_range(rec: FrameRecord, a: int, b: int) -> None:
    idx = np.arange(a, b)
    rec.append(idx, ts_for(idx), values_for(idx))


def seg_path(d: Path, k: int = 0) -> Path:
    return d / f"frames-{k:06d}.clr"


def chunk_bytes(n_frames: int) -> int:
    return HEADER_SIZE + _payload_size(n_frames, N)


def test_append_reopen_bit_exact_across_segments(tmp_path):
    d = tmp_path / "rec"
    rec = create(d, segment_bytes=2 * chunk_bytes(4))
    order = [(0, 4), (4, 8), (12, 16), (8, 12), (16, 20), (20, 21), (22, 30)]
    for a, b in order:
        rec.append(np.arange(a, b), ts_for(np.arange(a, b)), values_for(np.arange(a, b)))
    assert rec.n_frames == 29 and rec.last_index == 29 and rec.first_index == 0
    rec.close()
    assert len(sorted(d.glob("frames-*.clr"))) >= 3  # rotated
    rec = FrameRecord.open(d)
    assert not rec.recovery.torn_tail and rec.recovery.frames == 29
    h = rec.header
    assert h.session_id == "sess-A" and h.unit_ids == tuple(UNITS) and h.frame_rate_hz == RATE
    assert h.metadata == {"rig": "2p-3", "depth_um": 175}
    fr = rec.read()
    want = np.array([j for j in range(30) if j != 21])
    np.testing.assert_array_equal(fr.indices, want)
    assert fr.values.dtype == np.float32 and fr.values.tobytes() == values_for(want).tobytes()
    assert fr.timestamps.tobytes() == ts_for(want).tobytes()
    assert rec.missing_ranges() == [(21, 21)]
    part = rec.read(lo=10, hi=17)
    np.testing.assert_array_equal(part.indices, np.arange(10, 18))
    # chunks come back in the order written
    firsts = [int(i[0]) for i, _, _ in rec.iter_chunks()]
    assert firsts == [a for a, _ in order]
    # appending continues after a reopen
    append_range(rec, 30, 33)
    rec.close()
    rec = FrameRecord.open(d, readonly=True)
    assert rec.n_frames == 32 and rec.last_index == 32


def test_errors_have_codes(tmp_path):
    d = tmp_path / "rec"
    with pytest.raises(IngestError) as e:
        FrameRecord.open(d)
    assert e.value.code == "NOT_FOUND"
    rec = create(d)
    with pytest.raises(IngestError) as e:
        create(d)
    assert e.value.code == "ALREADY_EXISTS" and "FrameRecord.open" in e.value.message
    with pytest.raises(IngestError) as e:
        FrameRecord.open(d)  # a second writer while the first is live
    assert e.value.code == "FAILED_PRECONDITION" and f"pid {os.getpid()}" in e.value.message
    FrameRecord.open(d, readonly=True).close()  # readers are fine
    append_range(rec, 0, 3)
    with pytest.raises(IngestError) as e:
        append_range(rec, 2, 4)
    assert (
        e.value.code == "FAILED_PRECONDITION" and "frame 2 is already recorded" in e.value.message
    )
    bad = values_for(np.arange(3, 5))
    bad[0, 0] = np.nan
    with pytest.raises(IngestError) as e:
        rec.append(np.arange(3, 5), ts_for(np.arange(3, 5)), bad)
    assert e.value.code == "INVALID_ARGUMENT"
    with pytest.raises(IngestError) as e:
        rec.append(np.arange(3, 5), ts_for(np.arange(3, 5)), bad[:, :3])
    assert e.value.code == "INVALID_ARGUMENT" and f"expected (2, {N})" in e.value.message
    assert rec.n_frames == 3
    rec.mark_closed()
    with pytest.raises(IngestError) as e:
        append_range(rec, 3, 4)
    assert e.value.code == "FAILED_PRECONDITION" and "closed" in e.value.message
    rec.close()
    assert FrameRecord.open(d).closed_clean


def _three_chunks(d: Path) -> int:
    rec = create(d)
    for a in (0, 4, 8):
        append_range(rec, a, a + 4)
    rec.close()
    return chunk_bytes(4)


@pytest.mark.parametrize(
    "cut", [1, HEADER_SIZE - 1, HEADER_SIZE, HEADER_SIZE + 5, -1], ids=lambda c: f"cut{c}"
)
def test_torn_tail_truncated(tmp_path, cut):
    d = tmp_path / "rec"
    size = _three_chunks(d)
    p = seg_path(d)
    keep = 2 * size + (cut if cut > 0 else size + cut)
    with open(p, "r+b") as f:
        f.truncate(keep)
    ro = FrameRecord.open(d, readonly=True)  # readonly: reported, nothing changed on disk
    assert ro.recovery.torn_tail and ro.n_frames == 8 and p.stat().st_size == keep
    rec = FrameRecord.open(d)
    r = rec.recovery
    assert r.torn_tail and r.truncated_bytes == keep - 2 * size and r.torn_offset == 2 * size
    assert r.torn_segment == p.name and r.frames == 8
    assert p.stat().st_size == 2 * size
    np.testing.assert_array_equal(rec.read().indices, np.arange(8))
    append_range(rec, 8, 12)  # the lost chunk is simply sent again
    rec.close()
    rec = FrameRecord.open(d)
    assert not rec.recovery.torn_tail
    assert rec.read().values.tobytes() == values_for(np.arange(12)).tobytes()


@pytest.mark.parametrize("where", ["payload", "header", "zeros"])
def test_bad_last_chunk_is_a_torn_tail(tmp_path, where):
    d = tmp_path / "rec"
    size = _three_chunks(d)
    p = seg_path(d)
    data = bytearray(p.read_bytes())
    if where == "payload":
        data[2 * size + HEADER_SIZE + 9] ^= 0x40
        reason = "payload checksum"
    elif where == "header":
        data[2 * size + 8] ^= 0x01  # n_frames
        reason = "header checksum"
    else:  # a crash after the size grew but before the data landed (ext4 delayed allocation)
        data[2 * size :] = bytes(size)
        reason = "bad magic"
    p.write_bytes(bytes(data))
    rec = FrameRecord.open(d)
    assert rec.recovery.torn_tail and reason in rec.recovery.reason
    assert rec.n_frames == 8 and p.stat().st_size == 2 * size


def test_corruption_before_valid_data_is_refused(tmp_path):
    d = tmp_path / "rec"
    size = _three_chunks(d)
    p = seg_path(d)
    data = bytearray(p.read_bytes())
    data[size + HEADER_SIZE + 3] ^= 0x10  # the middle chunk
    p.write_bytes(bytes(data))
    for readonly in (True, False):
        with pytest.raises(IngestError) as e:
            FrameRecord.open(d, readonly=readonly)
        assert e.value.code == "DATA_LOSS"
        assert f"byte {size}" in e.value.message and "not a torn write" in e.value.message
        assert "valid chunks after it" in e.value.message
    assert p.stat().st_size == 3 * size  # nothing cut


def test_missing_segment_is_refused(tmp_path):
    d = tmp_path / "rec"
    rec = create(d, segment_bytes=chunk_bytes(4))
    for a in (0, 4, 8):
        append_range(rec, a, a + 4)
    rec.close()
    seg_path(d, 1).unlink()
    with pytest.raises(IngestError) as e:
        FrameRecord.open(d)
    assert e.value.code == "DATA_LOSS" and "frames-000001.clr is missing" in e.value.message


def test_damaged_meta_is_refused(tmp_path):
    d = tmp_path / "rec"
    create(d).close()
    (d / "meta.json").write_text('{"format": "cortexlens.frame_record", "version": 1')
    with pytest.raises(IngestError) as e:
        FrameRecord.open(d)
    assert e.value.code == "DATA_LOSS" and "meta.json" in e.value.message


CHILD = textwrap.dedent(
    """
    import sys
    import numpy as np
    sys.path.insert(0, sys.argv[2])
    from service.ingest import FrameRecord
    from tests.service.ingest.test_record import UNITS, RATE, values_for, ts_for

    rec = FrameRecord.create(sys.argv[1], session_id="crash", unit_ids=UNITS, frame_rate_hz=RATE,
                             segment_bytes=int(sys.argv[3]), sync=sys.argv[4] == "1")
    rng = np.random.default_rng(0)
    j = 0
    while True:
        k = int(rng.integers(1, 200))
        idx = np.arange(j, j + k)
        rec.append(idx, ts_for(idx), values_for(idx))
        sys.stdout.write(f"{j} {j + k - 1}\\n")
        sys.stdout.flush()
        j += k
    """
)


@pytest.mark.parametrize("kill_after,sync", [(5, True), (40, True), (40, False)])
def test_sigkill_mid_stream_keeps_every_acknowledged_frame(tmp_path, kill_after, sync):
    """A writer killed with SIGKILL mid-stream loses no frame whose append had returned.

    (sync=False too: a killed process's writes are in the page cache; only power loss needs the
    fdatasync.) Real kills rarely tear a chunk; torn tails are made by hand in the tests above.
    """
    d = tmp_path / "rec"
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    proc = subprocess.Popen(
        [
            sys.executable,
            str(script),
            str(d),
            str(REPO),
            str(64 * chunk_bytes(100)),
            str(int(sync)),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    acked: list[tuple[int, int]] = []
    try:
        deadline = time.monotonic() + 60
        while len(acked) < kill_after and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            a, b = map(int, line.split())
            acked.append((a, b))
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(10)
    # acknowledgements the child printed before it died count too
    for line in proc.stdout.read().splitlines():
        a, b = map(int, line.split())
        acked.append((a, b))
    assert len(acked) >= kill_after, proc.stderr.read()
    assert proc.returncode == -signal.SIGKILL
    rec = FrameRecord.open(d)  # the kernel released the dead writer's lock
    fr = rec.read()
    last = acked[-1][1]
    assert rec.last_index >= last
    # every acknowledged frame is there, bit for bit; anything after is a whole chunk
    np.testing.assert_array_equal(fr.indices, np.arange(fr.indices.size))
    np.testing.assert_array_equal(fr.indices[: last + 1], np.arange(last + 1))
    assert fr.values.tobytes() == values_for(fr.indices).tobytes()
    assert fr.timestamps.tobytes() == ts_for(fr.indices).tobytes()
    rec.close()
    assert FrameRecord.open(d).recovery.torn_tail is False  # the repair was durable


def test_to_recording_and_nwb_round_trip(tmp_path):
    from models.data.io import load_recordings, write_recording

    d = tmp_path / "rec"
    rec = create(d)
    for a, b in [(0, 10), (13, 20), (10, 12)]:  # frame 12 never arrives
        append_range(rec, a, b)
    r = rec.to_recording()
    want = np.array([j for j in range(20) if j != 12])
    assert r.source == "stream" and r.session_id == "sess-A" and r.subject_id == "mouse-7"
    assert r.genetic_background == "Vip-IRES-Cre" and r.sampling_rate == RATE
    assert r.unit_ids == tuple(UNITS) and len(r.trials) == 0
    np.testing.assert_array_equal(r.traces, values_for(want))
    np.testing.assert_array_equal(r.timestamps, ts_for(want))
    s = r.metadata["stream"]
    assert s["missing_ranges"] == [[12, 12]] and s["frames_missing"] == 1
    assert s["first_frame_index"] == 0 and s["last_frame_index"] == 19
    assert r.metadata["rig"] == "2p-3"

    path = write_recording(r, tmp_path / "sess-A.nwb", fmt="nwb")
    (back,) = load_recordings([path])
    np.testing.assert_array_equal(back.traces, r.traces)
    np.testing.assert_array_equal(back.timestamps, r.timestamps)
    assert back.unit_ids == r.unit_ids and back.session_id == "sess-A"
    assert back.genetic_background == "Vip-IRES-Cre"
    assert back.metadata["stream"]["missing_ranges"] == [[12, 12]]
    np.testing.assert_array_equal(stream_frame_indices(back), want)


def test_to_recording_of_empty_record(tmp_path):
    rec = create(tmp_path / "rec")
    with pytest.raises(IngestError) as e:
        rec.to_recording()
    assert e.value.code == "FAILED_PRECONDITION" and "no recorded frames" in e.value.message


def test_session_record_holds_every_unique_frame(tmp_path):
    from service.ingest import IngestConfig

    d = tmp_path / "s"
    buf = SessionBuffer.open(
        d,
        session_id="s",
        unit_ids=UNITS,
        frame_rate_hz=RATE,
        config=IngestConfig(window_frames=4, reorder_frames=0),
    )

    def push(a, b):
        idx = np.arange(a, b)
        return buf.push(a, values_for(idx), ts_for(idx))

    push(0, 3)
    push(2, 5)  # 2 duplicated
    push(8, 14)  # gap 5..7
    push(6, 7)  # late, older than the window: LATE, but kept in the record
    st = buf.close()
    assert st["frames_recorded"] == 12 and st["late_dropped"] == 1 and st["frames_missing"] == 3
    rec = FrameRecord.open(d, readonly=True)
    assert rec.closed_clean
    fr = rec.read()
    want = np.array([0, 1, 2, 3, 4, 6, 8, 9, 10, 11, 12, 13])
    np.testing.assert_array_equal(fr.indices, want)
    assert fr.values.tobytes() == values_for(want).tobytes()
    assert rec.to_recording().metadata["stream"]["missing_ranges"] == [[5, 5], [7, 7]]


def test_record_status_and_export(tmp_path):
    d = tmp_path / "rec"
    rec = create(d, sync=False)
    append_range(rec, 0, 5)
    append_range(rec, 7, 9)
    st = record_status(d)
    assert st["state"] == "LIVE" and st["frames_recorded"] == 7 and st["frames_missing"] == 2
    assert st["last_frame_index"] == 8 and st["n_cells"] == N and st["session_id"] == "sess-A"
    rec.close()  # the writer went away without closing the session
    assert record_status(d)["state"] == "INTERRUPTED"
    rec = FrameRecord.open(d)
    rec.mark_closed()
    rec.close()
    assert record_status(d)["state"] == "CLOSED"
    from models.data.io import load_recordings

    (back,) = load_recordings([FrameRecord.open(d, readonly=True).export(tmp_path / "x.nwb")])
    np.testing.assert_array_equal(back.traces, values_for(np.r_[0:5, 7:9]))


def test_torn_earlier_segment_or_forged_chunk_is_refused(tmp_path):
    from service.ingest.record import encode_chunk

    d = tmp_path / "rec"
    rec = create(d, segment_bytes=chunk_bytes(4))
    for a in (0, 4, 8):
        append_range(rec, a, a + 4)
    rec.close()
    with open(seg_path(d, 0), "r+b") as f:  # an earlier segment cannot have a torn tail
        f.truncate(chunk_bytes(4) - 3)
    with pytest.raises(IngestError) as e:
        FrameRecord.open(d)
    assert e.value.code == "DATA_LOSS" and "segment that was complete" in e.value.message

    d2 = tmp_path / "rec2"
    _three_chunks(d2)
    idx = np.arange(20, 22)
    with open(seg_path(d2), "ab") as f:  # a well-formed chunk out of sequence at the end
        f.write(encode_chunk(7, idx, ts_for(idx), values_for(idx)))
    with pytest.raises(IngestError) as e:
        FrameRecord.open(d2)
    assert e.value.code == "DATA_LOSS" and "checksums hold" in e.value.message


@pytest.mark.parametrize("bad", ["", "../x", "/etc", ".hidden", "a/b", "x" * 129, "a b"])
def test_session_dir_refuses_unsafe_ids(tmp_path, bad):
    with pytest.raises(IngestError) as e:
        session_dir(tmp_path, bad)
    assert e.value.code == "INVALID_ARGUMENT" and "letters, digits" in e.value.message


def test_session_dir_accepts_ordinary_ids(tmp_path):
    assert session_dir(tmp_path, "M123_2024-05-01.s1") == tmp_path / "M123_2024-05-01.s1"
