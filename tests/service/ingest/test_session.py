"""SessionBuffer: ordering, duplicates, gaps, late frames, window, stride, backpressure, errors."""

from __future__ import annotations

import os
import tempfile

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from service.ingest import (
    STATUS_FIELDS,
    FrameRecord,
    IngestConfig,
    IngestError,
    SessionBuffer,
)

N = 5
UNITS = [f"cell{i}" for i in range(N)]
RATE = 30.0
SHM = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None


def frame_values(j: int) -> np.ndarray:
    """Deterministic, distinct values for frame j: [N] float32."""
    return (np.arange(N, dtype=np.float32) + 1) * np.float32(0.25) + np.float32(j)


def block(first: int, k: int = 1):
    idx = np.arange(first, first + k)
    vals = np.stack([frame_values(int(j)) for j in idx]).astype(np.float32)
    return first, vals, idx / RATE + 100.0


def make(**cfg) -> SessionBuffer:
    cfg.setdefault("max_pending_decodes", 10_000)
    return SessionBuffer("s1", UNITS, RATE, IngestConfig(**cfg))


def events(res):
    return [(e.kind, e.first_frame_index, e.last_frame_index) for e in res.events]


def drain(buf: SessionBuffer) -> list[int]:
    out = []
    while (t := buf.pop_decode()) is not None:
        out.append(t.frame_index)
    return out


def test_in_order_window_and_counters():
    buf = make(window_frames=8)
    for j in range(0, 20, 4):
        res = buf.push(*block(j, 4))
        assert res.events == [] and res.frames_accepted == 4
    w = buf.window()
    np.testing.assert_array_equal(w.frame_indices, np.arange(12, 20))
    assert w.mask.all() and w.masked_fraction == 0.0
    np.testing.assert_array_equal(w.values, block(12, 8)[1])
    np.testing.assert_array_equal(w.timestamps, np.arange(12, 20) / RATE + 100.0)
    st_ = buf.status()
    assert set(STATUS_FIELDS) <= set(st_)
    assert st_["frames_received"] == 20
    assert st_["duplicates_dropped"] == st_["frames_missing"] == st_["late_dropped"] == 0
    assert st_["last_frame_index"] == 19 and st_["n_cells"] == N and st_["state"] == "LIVE"
    assert buf.next_frame_index == 20
    assert drain(buf) == list(range(20))


def test_window_before_it_fills_is_padded_and_masked():
    buf = make(window_frames=6)
    w0 = buf.window()
    assert not w0.mask.any() and np.isnan(w0.values).all()
    buf.push(*block(0, 2))
    w = buf.window()
    np.testing.assert_array_equal(w.frame_indices, np.arange(-4, 2))
    np.testing.assert_array_equal(w.mask, [False] * 4 + [True] * 2)
    assert np.isnan(w.values[:4]).all()
    np.testing.assert_allclose(w.timestamps, np.arange(-4, 2) / RATE + 100.0)
    assert w.masked_fraction == pytest.approx(4 / 6)
    assert (w.filled(0.0)[:4] == 0).all()


def test_duplicates_dropped_with_exact_counters():
    buf = make(window_frames=8)
    buf.push(*block(0, 6))
    res = buf.push(*block(3, 5))  # 3,4,5 are copies; 6,7 new
    assert events(res) == [("DUPLICATE", 3, 5)]
    assert res.duplicates == 3 and res.frames_accepted == 2
    res = buf.push(*block(7))
    assert events(res) == [("DUPLICATE", 7, 7)]
    s = buf.status()
    assert s["frames_received"] == 12 and s["duplicates_dropped"] == 4
    assert s["frames_missing"] == 0 and s["late_dropped"] == 0
    np.testing.assert_array_equal(buf.window().values, block(0, 8)[1])
    assert drain(buf) == list(range(8))


def test_reorder_within_tolerance_is_silent():
    buf = make(window_frames=8, reorder_frames=2)
    order = [0, 2, 1, 4, 3, 5, 7, 6]
    for j in order:
        assert buf.push(*block(j)).events == []
    assert buf.frames_waiting == 0
    np.testing.assert_array_equal(buf.window().values, block(0, 8)[1])
    assert drain(buf) == list(range(8))  # decodes in index order


def test_gap_declared_after_tolerance_and_masked():
    buf = make(window_frames=8, reorder_frames=2)
    buf.push(*block(0, 3))  # 0..2
    # 3, 4 never arrive; 5, 6 wait behind the hole
    assert buf.push(*block(5)).events == []
    assert buf.push(*block(6)).events == []
    assert buf.frames_waiting == 2 and buf.window().frame_indices[-1] == 2
    res = buf.push(*block(7))  # 7 >= 5 + 2: the hole is a gap
    assert events(res) == [("GAP", 3, 4)]
    assert buf.frames_waiting == 0
    w = buf.window()
    np.testing.assert_array_equal(w.frame_indices, np.arange(0, 8))
    np.testing.assert_array_equal(w.mask, [1, 1, 1, 0, 0, 1, 1, 1])
    assert np.isnan(w.values[3:5]).all()
    np.testing.assert_array_equal(w.values[[0, 1, 2, 5, 6, 7]], block(0, 8)[1][[0, 1, 2, 5, 6, 7]])
    np.testing.assert_allclose(w.timestamps, np.arange(8) / RATE + 100.0)  # interpolated
    s = buf.status()
    assert s["frames_missing"] == 2 and s["gap_events"] == 1 and s["frames_received"] == 6
    # decoded through with masking: gap frames trigger decodes too, in index order
    tasks = []
    while (t := buf.pop_decode()) is not None:
        tasks.append(t)
    assert [t.frame_index for t in tasks] == list(range(8))
    assert tasks[3].window.mask[-1] == np.False_ and tasks[3].window.masked_fraction == 5 / 8


def test_late_frame_inside_ring_is_placed_older_is_dropped():
    buf = make(window_frames=6, reorder_frames=0)
    buf.push(*block(0, 2))
    res = buf.push(*block(4, 2))  # 2, 3 missing; tolerance 0 -> gap at once
    assert events(res) == [("GAP", 2, 3)]
    res = buf.push(*block(3))  # late but inside the window: placed
    assert res.events == [] and res.late == 1
    w = buf.window()
    np.testing.assert_array_equal(w.mask, [1, 1, 0, 1, 1, 1])
    np.testing.assert_array_equal(w.values[3], frame_values(3))
    buf.push(*block(6, 6))  # ring now holds 6..11
    res = buf.push(*block(2))  # older than the ring: LATE, dropped
    assert events(res) == [("LATE", 2, 2)]
    assert events(buf.push(*block(2))) == [("DUPLICATE", 2, 2)]  # it was kept after all
    s = buf.status()
    assert s["late_filled"] == 1 and s["late_dropped"] == 1 and s["frames_missing"] == 2
    assert buf.window().mask.all()


def test_late_frames_second_copy_is_a_duplicate():
    buf = make(window_frames=4, reorder_frames=0)
    buf.push(*block(0))
    buf.push(*block(2, 6))
    assert events(buf.push(*block(1))) == [("LATE", 1, 1)]
    assert events(buf.push(*block(1))) == [("DUPLICATE", 1, 1)]


def test_gap_beyond_limit_refused_and_state_unchanged():
    buf = make(window_frames=4, max_gap_frames=10)
    buf.push(*block(0, 3))
    before = (buf.status(), buf.window().values.copy())
    with pytest.raises(IngestError) as e:
        buf.push(*block(14))  # 11 frames missing after frame 2
    assert e.value.code == "FAILED_PRECONDITION"
    assert "11 frames missing after frame 2" in e.value.message
    assert "from index 3" in e.value.message and "resume" in e.value.message
    after = buf.status()
    assert after["blocks_refused"] == 1
    after.pop("blocks_refused")
    before[0].pop("blocks_refused")
    assert after == before[0]
    np.testing.assert_array_equal(buf.window().values, before[1])
    assert buf.push(*block(13)).events == []  # 10 missing: allowed (waits behind the hole)


def test_first_block_far_from_start_refused():
    buf = make(max_gap_frames=100)
    with pytest.raises(IngestError) as e:
        buf.push(*block(5000))
    assert e.value.code == "FAILED_PRECONDITION" and "at the start" in e.value.message
    ok = SessionBuffer("s", UNITS, RATE, IngestConfig(first_frame_index=5000))
    assert ok.push(*block(5000)).events == []
    assert events(ok.push(*block(4999))) == [("LATE", 4999, 4999)]


@pytest.mark.parametrize("stride", [1, 3, 4])
def test_decode_stride(stride):
    buf = make(window_frames=5, decode_stride=stride)
    for j in range(0, 24, 6):
        buf.push(*block(j, 6))
    tasks = []
    while (t := buf.pop_decode()) is not None:
        tasks.append(t)
    want = [j for j in range(24) if (j + 1) % stride == 0]
    assert [t.frame_index for t in tasks] == want
    assert all(buf.is_decode_frame(j) for j in want)
    for t in tasks:  # each task holds the window ending at its frame
        np.testing.assert_array_equal(
            t.window.frame_indices, np.arange(t.frame_index - 4, t.frame_index + 1)
        )
        assert t.timestamp == pytest.approx(t.frame_index / RATE + 100.0)
        m = t.window.frame_indices >= 0
        np.testing.assert_array_equal(
            t.window.values[m], block(0, 24)[1][t.window.frame_indices[m]]
        )


def test_long_gap_skips_empty_windows():
    buf = make(window_frames=4, reorder_frames=0, max_gap_frames=50)
    buf.push(*block(0, 2))
    res = buf.push(*block(20))
    assert events(res) == [("GAP", 2, 19)]
    got = drain(buf)
    # windows ending at 2..4 still hold frame 1; those ending at 5..19 hold nothing: skipped
    assert got == [0, 1, 2, 3, 4, 20]
    assert buf.status()["decodes_skipped_empty"] == 15


def test_backpressure_coalesce_keeps_newest_and_records_everything(tmp_path):
    buf = SessionBuffer.open(
        tmp_path / "s1",
        session_id="s1",
        unit_ids=UNITS,
        frame_rate_hz=RATE,
        config=IngestConfig(window_frames=4, max_pending_decodes=2),
    )
    for j in range(10):
        buf.push(*block(j))
    res = buf.push(*block(10, 5))  # 5 triggers in one block, only the newest 2 kept
    assert res.decodes_enqueued == 2 and res.decodes_coalesced == 5
    assert buf.pending_decodes == 2
    t = buf.pop_decode()
    assert t.frame_index == 13
    buf.mark_decoded()
    assert buf.pop_decode().frame_index == 14
    s = buf.status()
    assert s["decodes_triggered"] == 15 and s["decodes_coalesced"] == 13
    assert s["frames_recorded"] == 15 and s["frames_decoded"] == 1
    np.testing.assert_array_equal(buf.record.read().indices, np.arange(15))
    buf.close()


def test_backpressure_refuse(tmp_path):
    buf = SessionBuffer.open(
        tmp_path / "s1",
        session_id="s1",
        unit_ids=UNITS,
        frame_rate_hz=RATE,
        config=IngestConfig(window_frames=4, max_pending_decodes=2, backpressure="refuse"),
    )
    buf.push(*block(0))
    buf.push(*block(1))
    with pytest.raises(IngestError) as e:
        buf.push(*block(2))
    assert e.value.code == "RESOURCE_EXHAUSTED"
    assert "2 decodes pending (limit 2)" in e.value.message and "wait" in e.value.message
    # nothing recorded or changed: the client resends the same block later
    assert buf.record.n_frames == 2 and buf.next_frame_index == 2
    assert buf.status()["frames_received"] == 2
    assert buf.pop_decode().frame_index == 0
    assert buf.push(*block(2)).decodes_enqueued == 1
    assert buf.record.n_frames == 3 and buf.status()["decodes_coalesced"] == 0
    # a block that alone triggers more decodes than the bound can never pass: said so
    drain(buf)
    with pytest.raises(IngestError, match="at most 2 frames"):
        buf.push(*block(3, 3))


# -- validation ---------------------------------------------------------------------------------
def _refused(buf, code, fragment, call):
    before = buf.status()
    with pytest.raises(IngestError) as e:
        call()
    assert e.value.code == code, e.value
    assert fragment in e.value.message, e.value.message
    assert "s1" in e.value.message  # names the session
    after = buf.status()
    assert after["blocks_refused"] == before["blocks_refused"] + 1
    after.pop("blocks_refused"), before.pop("blocks_refused")
    assert after == before


def test_validation_errors_are_actionable():
    buf = make(window_frames=4, max_block_frames=16)
    buf.push(*block(0, 2))
    f, v, t = block(2, 2)
    _refused(
        buf,
        "INVALID_ARGUMENT",
        f"frames have 4 cells but the session was opened with {N}",
        lambda: buf.push(f, v[:, :4], t),
    )
    bad = v.copy()
    bad[1, 3] = np.nan
    _refused(buf, "INVALID_ARGUMENT", "first at frame 3, cell 'cell3'", lambda: buf.push(f, bad, t))
    bad[1, 3] = np.inf
    _refused(buf, "INVALID_ARGUMENT", "NaN/Inf", lambda: buf.push(f, bad, t))
    big = v.astype(np.float64)
    big[0, 0] = 1e300  # overflows float32
    _refused(buf, "INVALID_ARGUMENT", "NaN/Inf", lambda: buf.push(f, big, t))
    _refused(
        buf, "INVALID_ARGUMENT", "does not come after frame 2", lambda: buf.push(f, v, t[::-1])
    )
    _refused(
        buf, "INVALID_ARGUMENT", "does not come after frame 1", lambda: buf.push(f, v, t - 1.0)
    )  # earlier than frames already received
    _refused(
        buf, "INVALID_ARGUMENT", "got 1 timestamps for 2 frames", lambda: buf.push(f, v, t[:1])
    )
    _refused(buf, "INVALID_ARGUMENT", "NaN/Inf", lambda: buf.push(f, v, [t[0], np.nan]))
    _refused(buf, "INVALID_ARGUMENT", "shape (1, n_cells)", lambda: buf.push(f, v[0], t[:1]))
    _refused(buf, "INVALID_ARGUMENT", "dtype complex", lambda: buf.push(f, v.astype(complex), t))
    _refused(buf, "INVALID_ARGUMENT", "negative", lambda: buf.push(-1, v, t))
    _refused(buf, "INVALID_ARGUMENT", "no frames", lambda: buf.push(f, v[:0], t[:0]))
    _refused(buf, "RESOURCE_EXHAUSTED", "split it", lambda: buf.push(*block(2, 17)))
    # raw bytes as in FrameBlock
    raw = v.astype("<f4").tobytes()
    _refused(
        buf,
        "INVALID_ARGUMENT",
        f"{len(raw) - 1} bytes but n_frames x n_cells x 4",
        lambda: buf.push_bytes(f, raw[:-1], 2, N, t),
    )
    _refused(buf, "INVALID_ARGUMENT", "n_cells=4", lambda: buf.push_bytes(f, raw, 2, 4, t))
    assert buf.push_bytes(f, raw, 2, N, t).frames_accepted == 2
    np.testing.assert_array_equal(buf.window().values, block(0, 4)[1])


def test_closed_session_refuses_frames_and_flushes_on_close():
    buf = make(window_frames=4, reorder_frames=5)
    buf.push(*block(0))
    buf.push(*block(3))  # waits behind the hole 1..2
    assert buf.frames_waiting == 1
    s = buf.close()
    assert s["state"] == "CLOSED" and s["frames_missing"] == 2 and s["frames_waiting"] == 0
    np.testing.assert_array_equal(buf.window().mask, [1, 0, 0, 1])
    _refused(buf, "FAILED_PRECONDITION", "closed", lambda: buf.push(*block(4)))


def test_config_and_open_errors(tmp_path):
    with pytest.raises(IngestError, match="backpressure"):
        IngestConfig(backpressure="drop")
    with pytest.raises(IngestError, match="decode_stride"):
        IngestConfig(decode_stride=0)
    with pytest.raises(IngestError, match="unique"):
        SessionBuffer("s", ["a", "a"], RATE)
    d = tmp_path / "s1"
    buf = SessionBuffer.open(d, session_id="s1", unit_ids=UNITS, frame_rate_hz=RATE)
    buf.record.close()
    with pytest.raises(IngestError) as e:
        SessionBuffer.open(d, session_id="s1", unit_ids=UNITS, frame_rate_hz=RATE)
    assert e.value.code == "ALREADY_EXISTS" and "resume=true" in e.value.message
    with pytest.raises(IngestError) as e:
        SessionBuffer.open(
            d, session_id="s1", unit_ids=UNITS[::-1], frame_rate_hz=RATE, resume=True
        )
    assert e.value.code == "FAILED_PRECONDITION" and "same unit_ids" in e.value.message


def test_resume_continues_after_restart(tmp_path):
    d = tmp_path / "s1"
    cfg = IngestConfig(window_frames=6, reorder_frames=1)
    buf = SessionBuffer.open(d, session_id="s1", unit_ids=UNITS, frame_rate_hz=RATE, config=cfg)
    buf.push(*block(0, 5))
    buf.push(*block(7, 2))  # 5, 6 missing; 7, 8 recorded, 8 >= 7 + 1 -> gap declared
    w_before = buf.window()
    buf.record.close()  # the process dies (no clean close)
    buf2 = SessionBuffer.open(
        d, session_id="s1", unit_ids=UNITS, frame_rate_hz=RATE, config=cfg, resume=True
    )
    assert buf2.next_frame_index == 9
    w = buf2.window()
    np.testing.assert_array_equal(w.frame_indices, w_before.frame_indices)
    np.testing.assert_array_equal(w.mask, w_before.mask)
    np.testing.assert_array_equal(w.values, w_before.values)
    np.testing.assert_allclose(w.timestamps, w_before.timestamps)
    s = buf2.status()
    assert s["frames_recorded"] == 7 and s["frames_missing"] == 2
    assert events(buf2.push(*block(8))) == [("DUPLICATE", 8, 8)]
    buf2.push(*block(9))
    buf2.push(*block(5))  # late, inside the ring: placed and recorded
    buf2.close()
    with pytest.raises(IngestError) as e:
        SessionBuffer.open(d, session_id="s1", unit_ids=UNITS, frame_rate_hz=RATE, resume=True)
    assert e.value.code == "FAILED_PRECONDITION" and "closed" in e.value.message
    rec = FrameRecord.open(d, readonly=True)
    np.testing.assert_array_equal(rec.read().indices, [0, 1, 2, 3, 4, 5, 7, 8, 9])
    assert rec.missing_ranges() == [(6, 6)]


# -- property: delivery order within the tolerance does not matter ------------------------------
@st.composite
def deliveries(draw):
    n = draw(st.integers(1, 40))
    r = draw(st.integers(0, 4))
    sent = [j for j in range(n) if draw(st.booleans()) or j == n - 1 or draw(st.booleans())]
    # each frame j is delayed by d_j <= r positions (ties in any order): it may arrive after
    # frames j+1..j+r, but before any frame > j + r -- exactly the tolerance
    delay = {j: draw(st.integers(0, r)) for j in sent}
    tie = {j: draw(st.integers(0, 3)) for j in sent}
    order = sorted(sent, key=lambda j: (j + delay[j], tie[j], j))
    # duplicates: copies of frames re-sent anywhere after the original
    arrivals = list(order)
    for j in draw(st.lists(st.sampled_from(sent), max_size=8)):
        pos = draw(st.integers(arrivals.index(j) + 1, len(arrivals)))
        arrivals.insert(pos, j)
    # group consecutive arrivals with consecutive indices into blocks, sometimes
    blocks: list[list[int]] = []
    for j in arrivals:
        if blocks and blocks[-1][-1] + 1 == j and draw(st.booleans()):
            blocks[-1].append(j)
        else:
            blocks.append([j])
    return n, r, sent, blocks


def _run(blocks, cfg, directory):
    buf = SessionBuffer.open(
        directory, session_id="s1", unit_ids=UNITS, frame_rate_hz=RATE, config=cfg
    )
    for b in blocks:
        buf.push(*block(b[0], len(b)))
    tasks = []
    while (t := buf.pop_decode()) is not None:
        tasks.append(t)
    buf.flush()
    while (t := buf.pop_decode()) is not None:
        tasks.append(t)
    fr = buf.record.read()
    buf.close()
    return buf, tasks, fr


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(deliveries(), st.integers(1, 3), st.integers(2, 8))
def test_any_order_within_tolerance_equals_in_order(case, stride, w):
    n, r, sent, blocks = case
    cfg = IngestConfig(
        window_frames=w, reorder_frames=r, decode_stride=stride, max_pending_decodes=1000
    )
    # tmpfs where there is one: fsync is what costs here, and durability is tested elsewhere
    with tempfile.TemporaryDirectory(dir=SHM) as tmp:
        ref, ref_tasks, ref_fr = _run([[j] for j in sent], cfg, f"{tmp}/a")
        got, tasks, fr = _run(blocks, cfg, f"{tmp}/b")
    wa, wb = ref.window(), got.window()
    for name in ("values", "mask", "frame_indices", "timestamps"):
        np.testing.assert_array_equal(getattr(wa, name), getattr(wb, name))
    assert [t.frame_index for t in tasks] == [t.frame_index for t in ref_tasks]
    for a, b in zip(ref_tasks, tasks, strict=True):
        np.testing.assert_array_equal(a.window.values, b.window.values)
        np.testing.assert_array_equal(a.window.mask, b.window.mask)
    np.testing.assert_array_equal(fr.indices, ref_fr.indices)
    np.testing.assert_array_equal(fr.timestamps, ref_fr.timestamps)
    np.testing.assert_array_equal(fr.values, ref_fr.values)
    np.testing.assert_array_equal(fr.indices, sent)
    sa, sb = ref.status(), got.status()
    for key in ("frames_recorded", "frames_missing", "late_dropped", "gap_events", "late_filled"):
        assert sa[key] == sb[key], key
    n_sent = sum(len(b) for b in blocks)
    assert sb["frames_received"] == n_sent
    assert sb["duplicates_dropped"] == n_sent - len(sent)
    assert sb["late_dropped"] == 0 and sb["frames_missing"] == sent[-1] + 1 - len(sent)


def test_caller_may_reuse_its_buffer():
    buf = make(window_frames=4, reorder_frames=3)
    buf.push(*block(0))
    f, v, t = block(2)
    buf.push(f, v, t)  # waits behind the hole at 1
    v[:] = -1.0  # the client reuses its buffer
    buf.push(*block(1))
    np.testing.assert_array_equal(buf.window().values[1:], block(0, 3)[1])


def test_absurd_frame_index_refused():
    buf = make()
    with pytest.raises(IngestError) as e:
        buf.push(2**64 - 1, *block(0)[1:])
    assert e.value.code == "INVALID_ARGUMENT" and "number frames from 0" in e.value.message


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(st.tuples(st.integers(0, 60), st.integers(1, 4)), min_size=1, max_size=30),
    st.integers(0, 4),
    st.integers(2, 6),
    st.integers(1, 3),
)
def test_any_delivery_keeps_invariants(blocks, r, w, stride):
    """Arbitrary order, duplicates, late frames: nothing received is lost or invented."""
    cfg = IngestConfig(
        window_frames=w,
        reorder_frames=r,
        decode_stride=stride,
        max_gap_frames=64,
        max_pending_decodes=3,
    )
    with tempfile.TemporaryDirectory(dir=SHM) as tmp:
        buf = SessionBuffer.open(
            f"{tmp}/s", session_id="s1", unit_ids=UNITS, frame_rate_hz=RATE, config=cfg
        )
        seen: set[int] = set()
        sent = 0
        last_task = -1
        for first, k in blocks:
            res = buf.push(*block(first, k))
            sent += k
            seen |= set(range(first, first + k))
            kinds = {e.kind for e in res.events}
            assert kinds <= {"GAP", "DUPLICATE", "LATE"}
            while (t := buf.pop_decode()) is not None:
                assert t.frame_index > last_task
                last_task = t.frame_index
                m = t.window.mask
                assert m.any()
                np.testing.assert_array_equal(
                    t.window.values[m], block(0, 70)[1][t.window.frame_indices[m]]
                )
                assert np.isnan(t.window.values[~m]).all()
            win = buf.window()
            m = win.mask
            np.testing.assert_array_equal(win.values[m], block(0, 70)[1][win.frame_indices[m]])
            assert np.all(np.diff(win.timestamps[np.isfinite(win.timestamps)]) > 0)
        buf.flush()
        s = buf.status()
        fr = buf.record.read()
        buf.close()
    np.testing.assert_array_equal(fr.indices, sorted(seen))
    np.testing.assert_array_equal(fr.values, block(0, 70)[1][fr.indices])
    assert s["frames_received"] == sent and s["frames_recorded"] == len(seen)
    assert s["duplicates_dropped"] == sent - len(seen)
    assert s["last_frame_index"] == max(seen) and s["frames_waiting"] == 0
    assert s["next_frame_index"] == max(seen) + 1
    # every index up to the last was received in time, or reported missing (and maybe came late)
    holes = max(seen) + 1 - len(seen)
    assert s["frames_missing"] == holes + s["late_filled"] + s["late_dropped"]
