"""`service.wire`: validation of incoming windows and the proto conversions, without a server.

Every conversion is checked by serialising the message to bytes and parsing it back, so what is
tested is what a client on the other end of the wire would read.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from service import wire
from service.engine import Decoded, ModelRef, TaskResult, UnitAttribution
from service.ingest import IngestError, StreamEvent
from service.protos_gen.cortexlens.v1 import cortexlens_pb2 as pb


def _roundtrip(msg):
    out = type(msg)()
    out.ParseFromString(msg.SerializeToString())
    return out


def _f32(x: float) -> float:
    return float(np.float32(x))


# -- unit ids ------------------------------------------------------------------------------------


def test_units_key_round_trips_unit_ids():
    ids = ("sess/cell0001", "a b c", "ünïcödé", "x:y;z", "7")
    key = wire.units_key(ids)
    assert isinstance(key, str)
    assert wire.split_units_key(key) == ids
    # one id: no separator, and different id lists give different keys
    assert wire.split_units_key(wire.units_key(["only"])) == ("only",)
    assert wire.units_key(["a", "bc"]) != wire.units_key(["ab", "c"])


def test_check_unit_ids_accepts_and_normalises():
    assert wire.check_unit_ids(["c1", "c2", "c3"], max_cells=3) == ("c1", "c2", "c3")
    assert wire.check_unit_ids((1, 2), max_cells=10) == ("1", "2")


def test_check_unit_ids_refuses_empty_list():
    with pytest.raises(IngestError) as ei:
        wire.check_unit_ids([], max_cells=10)
    assert ei.value.code == "INVALID_ARGUMENT"
    assert "unit_ids" in ei.value.message


@pytest.mark.parametrize("bad", ["", "a" + wire.UNIT_SEP + "b"])
def test_check_unit_ids_refuses_empty_or_separator_ids(bad):
    with pytest.raises(IngestError) as ei:
        wire.check_unit_ids(["ok", bad], max_cells=10)
    assert ei.value.code == "INVALID_ARGUMENT"


def test_check_unit_ids_names_the_duplicate():
    with pytest.raises(IngestError) as ei:
        wire.check_unit_ids(["c1", "c2", "twice", "c3", "twice"], max_cells=10)
    assert ei.value.code == "INVALID_ARGUMENT"
    assert "'twice'" in ei.value.message
    assert "c1" not in ei.value.message and "c3" not in ei.value.message


def test_check_unit_ids_too_many_cells_is_resource_exhausted():
    ids = [f"c{i}" for i in range(11)]
    with pytest.raises(IngestError) as ei:
        wire.check_unit_ids(ids, max_cells=10)
    assert ei.value.code == "RESOURCE_EXHAUSTED"
    assert "11" in ei.value.message and "10" in ei.value.message
    assert wire.check_unit_ids(ids[:10], max_cells=10) == tuple(ids[:10])


# -- windows -------------------------------------------------------------------------------------


def _block(values: np.ndarray, timestamps, *, n_frames=None, n_cells=None, raw=None):
    values = np.asarray(values, dtype=np.float32)
    return pb.FrameBlock(
        n_frames=values.shape[0] if n_frames is None else n_frames,
        n_cells=values.shape[1] if n_cells is None else n_cells,
        values=values.astype("<f4").tobytes() if raw is None else raw,
        timestamps=list(timestamps),
    )


def _window(nf=5, nc=3, seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((nf, nc)).astype(np.float32), 10.0 + np.arange(nf) / 30.0


def test_window_from_block_decodes_row_major_little_endian():
    x, ts = _window()
    block = _roundtrip(_block(x, ts))
    values, times = wire.window_from_block(block, n_cells=3, max_frames=100)
    assert values.dtype == np.float32 and values.shape == (5, 3)
    np.testing.assert_array_equal(values, x)
    assert times.dtype == np.float64
    np.testing.assert_array_equal(times, ts)
    # the result is a writable copy, not a view of the message bytes
    values[0, 0] = 123.0
    assert values.flags.writeable


def test_window_from_block_single_frame():
    x, ts = _window(nf=1)
    values, times = wire.window_from_block(_block(x, ts), n_cells=3, max_frames=1)
    np.testing.assert_array_equal(values, x)
    assert times.tolist() == [ts[0]]


def _refused(block, n_cells=3, max_frames=100) -> IngestError:
    with pytest.raises(IngestError) as ei:
        wire.window_from_block(block, n_cells=n_cells, max_frames=max_frames)
    return ei.value


@pytest.mark.parametrize("delta", [-4, -1, 1, 4])
def test_window_from_block_wrong_byte_length(delta):
    x, ts = _window()
    raw = x.tobytes()
    raw = raw[:delta] if delta < 0 else raw + b"\0" * delta
    err = _refused(_block(x, ts, raw=raw))
    assert err.code == "INVALID_ARGUMENT"
    assert str(len(raw)) in err.message and "60" in err.message  # got vs 5 x 3 x 4


def test_window_from_block_n_cells_mismatch():
    x, ts = _window()
    err = _refused(_block(x, ts), n_cells=4)
    assert err.code == "INVALID_ARGUMENT"
    assert "n_cells=3" in err.message and "4" in err.message


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_window_from_block_refuses_nan_inf(bad):
    x, ts = _window()
    x[3, 2] = bad
    err = _refused(_block(x, ts))
    assert err.code == "INVALID_ARGUMENT"
    assert "NaN/Inf" in err.message
    assert "frame 3" in err.message and "column 2" in err.message


def test_window_from_block_zero_frames():
    err = _refused(pb.FrameBlock(n_frames=0, n_cells=3, values=b"", timestamps=[]))
    assert err.code == "INVALID_ARGUMENT"
    assert "n_frames=0" in err.message


def test_window_from_block_too_many_frames_is_resource_exhausted():
    x, ts = _window(nf=9)
    err = _refused(_block(x, ts), max_frames=8)
    assert err.code == "RESOURCE_EXHAUSTED"
    assert "9" in err.message and "8" in err.message
    values, _ = wire.window_from_block(_block(x, ts), n_cells=3, max_frames=9)
    assert values.shape == (9, 3)


@pytest.mark.parametrize("n_ts", [0, 4, 6])
def test_window_from_block_timestamp_count(n_ts):
    x, _ = _window()
    err = _refused(_block(x, 10.0 + np.arange(n_ts) / 30.0))
    assert err.code == "INVALID_ARGUMENT"
    assert f"{n_ts} timestamps" in err.message


@pytest.mark.parametrize(
    "ts",
    [
        [0.0, 0.1, 0.1, 0.2, 0.3],  # repeated
        [0.0, 0.1, 0.3, 0.2, 0.4],  # goes back
        [0.4, 0.3, 0.2, 0.1, 0.0],  # reversed
    ],
)
def test_window_from_block_timestamps_must_increase(ts):
    x, _ = _window()
    err = _refused(_block(x, ts))
    assert err.code == "INVALID_ARGUMENT"
    assert "strictly increasing" in err.message


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_window_from_block_timestamps_must_be_finite(bad):
    x, ts = _window()
    ts = ts.copy()
    ts[2] = bad
    err = _refused(_block(x, ts))
    assert err.code == "INVALID_ARGUMENT"
    assert "timestamps" in err.message and "NaN/Inf" in err.message


# -- messages ------------------------------------------------------------------------------------

REF = ModelRef(name="default", version="v0007", label_set="v0007/units-0123456789ab")


def _decoded() -> Decoded:
    direction = TaskResult(
        task="direction",
        predicted_class=2,
        predicted_label="90deg",
        class_names=tuple(f"{d}deg" for d in range(0, 360, 45)),
        probabilities=np.array([0.05, 0.1, 0.5, 0.1, 0.05, 0.05, 0.1, 0.05], np.float32),
        logits=np.array([-1.0, 0.25, 1.75, 0.3, -0.5, -2.0, 0.125, -0.75], np.float32),
        units=(
            UnitAttribution(unit=17, activation=3.5, attribution=0.625, label="direction 90°"),
            UnitAttribution(unit=3, activation=1.25, attribution=-0.375, label=""),
        ),
        unexplained=1.5,
    )
    genetic = TaskResult(
        task="genetic",
        predicted_class=0,
        predicted_label="KO",
        class_names=("KO", "control"),
        probabilities=np.array([0.75, 0.25], np.float32),
        logits=np.array([0.5, -0.5], np.float32),
        units=(),
        unexplained=0.5,
    )
    return Decoded(
        tasks=(direction, genetic),
        masked_fraction=0.25,
        n_cells_used=41,
        model_ms=1.5,
        batch_size=3,
    )


def test_model_ref_pb_round_trip():
    m = _roundtrip(wire.model_ref_pb(REF))
    assert (m.name, m.version, m.label_set) == (REF.name, REF.version, REF.label_set)


def test_prediction_pb_round_trip():
    d = _decoded()
    p = _roundtrip(
        wire.prediction_pb(
            d,
            session_id="s1",
            frame_index=1234567890123,
            timestamp=98765.4321,
            ref=REF,
            method="ablation",
            queue_ms=0.75,
            server_total_ms=4.5,
        )
    )
    assert p.session_id == "s1"
    assert p.frame_index == 1234567890123
    assert p.timestamp == 98765.4321  # double: exact
    assert (p.model.name, p.model.version, p.model.label_set) == (
        REF.name,
        REF.version,
        REF.label_set,
    )
    assert p.attribution_method == "ablation"
    assert p.timings.queue_ms == _f32(0.75)
    assert p.timings.model_ms == _f32(1.5)
    assert p.timings.server_total_ms == _f32(4.5)
    assert p.timings.batch_size == 3
    assert p.masked_fraction == _f32(0.25)
    assert p.n_cells_used == 41
    assert [t.task for t in p.tasks] == ["direction", "genetic"]
    for got, want in zip(p.tasks, d.tasks, strict=True):
        assert got.predicted_class == want.predicted_class
        assert got.predicted_label == want.predicted_label
        assert list(got.class_names) == list(want.class_names)
        np.testing.assert_array_equal(np.asarray(got.probabilities, np.float32), want.probabilities)
        np.testing.assert_array_equal(np.asarray(got.logits, np.float32), want.logits)
        assert got.unexplained == _f32(want.unexplained)
        assert len(got.units) == len(want.units)
        for gu, wu in zip(got.units, want.units, strict=True):
            assert gu.unit == wu.unit
            assert gu.activation == _f32(wu.activation)
            assert gu.attribution == _f32(wu.attribution)
            assert gu.label == wu.label
    # the pieces add up on the wire too
    t = p.tasks[0]
    assert sum(u.attribution for u in t.units) + t.unexplained == pytest.approx(
        t.logits[t.predicted_class], abs=1e-6
    )


@pytest.mark.parametrize("kind", ["GAP", "DUPLICATE", "LATE", "MODEL_CHANGED", "NOT_DECODED"])
def test_event_pb_round_trip(kind):
    e = _roundtrip(wire.event_pb(StreamEvent(kind, 100, 2**40, f"{kind} happened")))
    assert e.kind == pb.StreamEvent.Kind.Value(kind)
    assert pb.StreamEvent.Kind.Name(e.kind) == kind
    assert (e.first_frame_index, e.last_frame_index) == (100, 2**40)
    assert e.message == f"{kind} happened"


def test_event_pb_unknown_kind_is_refused():
    with pytest.raises(ValueError):
        wire.event_pb(StreamEvent("EXPLODED", 0, 0, ""))


def test_status_pb_round_trip():
    st = {
        "session_id": "s9",
        "state": "CLOSED",
        "frames_received": 1000,
        "frames_recorded": 998,
        "frames_decoded": 990,
        "duplicates_dropped": 2,
        "frames_missing": 7,
        "late_dropped": 1,
        "last_frame_index": 1006,
        "n_cells": 512,
        "late_filled": 3,
        "decodes_coalesced": 5,
    }
    s = _roundtrip(wire.status_pb(st, REF))
    assert s.session_id == "s9"
    assert s.state == pb.SessionStatus.CLOSED
    for k, v in st.items():
        if k not in ("session_id", "state"):
            assert getattr(s, k) == v, k
    assert s.HasField("model") and s.model.version == REF.version


def test_status_pb_defaults_without_model():
    s = _roundtrip(wire.status_pb({"session_id": "s0", "state": "LIVE", "frames_missing": None}))
    assert s.state == pb.SessionStatus.LIVE
    assert s.frames_received == 0 and s.frames_missing == 0
    assert s.last_frame_index == -1  # no frame yet
    assert not s.HasField("model")
    assert _roundtrip(wire.status_pb({})).state == pb.SessionStatus.STATE_UNSPECIFIED


def test_model_info_pb_round_trip():
    info = {
        "ref": REF,
        "parent_version": "v0006",
        "tasks": [("direction", ("0deg", "45deg")), ("genetic", ("KO", "control"))],
        "n_sae_units": 128,
        "attribution_method": "ablation",
        "tokenizer": "patch",
        "window_s": 1.25,
        "default_top_m": 16,
        "manifest_json": json.dumps({"name": "default", "version": "v0007"}),
        "metrics_json": json.dumps({"test_acc": 0.5}),
        "sessions": ["s1", "s2"],  # not part of the message
    }
    m = _roundtrip(wire.model_info_pb(info))
    assert (m.model.name, m.model.version, m.model.label_set) == (
        REF.name,
        REF.version,
        REF.label_set,
    )
    assert m.parent_version == "v0006"
    assert [(t.name, tuple(t.class_names)) for t in m.tasks] == info["tasks"]
    assert m.n_sae_units == 128
    assert m.attribution_method == "ablation"
    assert m.tokenizer == "patch"
    assert m.window_s == 1.25
    assert m.default_top_m == 16
    assert json.loads(m.manifest_json) == {"name": "default", "version": "v0007"}
    assert json.loads(m.metrics_json) == {"test_acc": 0.5}


def test_units_pb_round_trip():
    label = {
        "variable": "direction",
        "text": "direction 90°, OSI 0.71, q<0.01",
        "statistic_name": "osi",
        "statistic": 0.71,
        "p_value": 0.001,
        "q_value": 0.009,
        "reproduced_across_seeds": True,
    }
    units = [
        {"unit": 0, "labels": [], "firing_rate": 0.0},
        {"unit": 5, "labels": [label], "firing_rate": 0.125},
        {"unit": 127, "labels": [label, {**label, "variable": "genetic"}], "firing_rate": 0.5},
    ]
    r = _roundtrip(wire.units_pb(REF, units))
    assert r.model.label_set == REF.label_set
    assert [u.unit for u in r.units] == [0, 5, 127]
    assert [u.firing_rate for u in r.units] == [0.0, 0.125, 0.5]
    assert len(r.units[0].labels) == 0
    got = r.units[1].labels[0]
    for k, v in label.items():
        assert getattr(got, k) == v, k
    assert [lab.variable for lab in r.units[2].labels] == ["direction", "genetic"]
