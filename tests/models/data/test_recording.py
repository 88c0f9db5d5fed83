import numpy as np
import pytest

from models.data.recording import DataError, Recording, Trials


def make(**over):
    T, N = 100, 4
    kw = dict(
        traces=np.random.default_rng(0).normal(size=(T, N)).astype(np.float32),
        timestamps=np.arange(T) / 10.0,
        unit_ids=[f"u{i}" for i in range(N)],
        session_id="s1",
        subject_id="m1",
        genetic_background="KO",
        sampling_rate=10.0,
        trials=Trials.from_arrays([1.0, 5.0], [3.0, 7.0], [0.0, 90.0]),
        source_path="fake/file.nwb",
    )
    kw.update(over)
    return Recording(**kw)


def test_valid_recording_normalises_types():
    r = make(traces=np.ones((100, 4), dtype=np.float64))
    assert r.traces.dtype == np.float32
    assert r.unit_ids == ("u0", "u1", "u2", "u3")
    assert r.n_frames == 100 and r.n_units == 4
    assert r.duration == pytest.approx(10.0)
    assert len(r.trials) == 2 and not r.trials.has_temporal_frequency


@pytest.mark.parametrize(
    "over, field, words",
    [
        (dict(traces=np.zeros((100,), np.float32)), "traces", "2-D"),
        (dict(timestamps=np.arange(99) / 10.0), "timestamps", "99"),
        (dict(timestamps=np.r_[np.arange(50), np.arange(50)] / 10.0), "timestamps", "increasing"),
        (dict(unit_ids=["a", "b", "a", "c"]), "unit_ids", "duplicate unit id 'a'"),
        (dict(unit_ids=["a", "b"]), "unit_ids", "2 ids"),
        (
            dict(trials=Trials.from_arrays([1.0, 50.0], [3.0, 52.0], [0.0, 90.0])),
            "trials",
            "outside the recording",
        ),
        (dict(trials=Trials.from_arrays([3.0], [1.0], [0.0])), "trials", "before it starts"),
        (dict(trials=Trials.from_arrays([1.0], [2.0], [400.0])), "trials", "[0, 360)"),
        (dict(sampling_rate=0.0), "sampling_rate", "positive"),
        (dict(session_id=""), "session_id", "empty"),
    ],
)
def test_rejects_what_cannot_be_right(over, field, words):
    with pytest.raises(DataError) as ei:
        make(**over)
    msg = str(ei.value)
    assert "fake/file.nwb" in msg, msg
    assert f"field '{field}'" in msg, msg
    assert words in msg, msg
    assert ei.value.field == field


def test_rejects_nan_and_inf_naming_unit_and_frame():
    tr = np.zeros((100, 4), np.float32)
    tr[7, 2] = np.nan
    tr[9, 1] = np.inf
    with pytest.raises(DataError, match=r"2 NaN/Inf values \(first at frame 7, unit 'u2'\)"):
        make(traces=tr)


def test_equals_and_differences():
    a, b = make(), make()
    assert a.equals(b)
    c = make(genetic_background="control")
    assert a.differences(c) == ["genetic_background"]
    tr = a.traces.copy()
    tr[0, 0] += 1e-3
    d = a.replace(traces=tr)
    assert "traces" in a.differences(d)
    assert a.equals(d, atol=1e-2)


def test_summary_counts_conditions():
    r = make(trials=Trials.from_arrays([1, 2, 3], [1.5, 2.5, 3.5], [0, 0, 90], [1, 1, 2]))
    s = r.summary()
    assert s["trials_per_condition"] == {"0deg@1Hz": 2, "90deg@2Hz": 1}
    assert s["neurons"] == 4 and s["frame_rate_hz"] == 10.0


def test_frame_index():
    r = make()
    assert list(r.frame_index([0.0, 0.05, 0.1, 9.95, -1])) == [0, 0, 1, 99, -1]


def test_condition_counts_treat_nan_as_one_condition():
    r = make(trials=Trials.from_arrays([1, 2, 3, 4], [1.5, 2.5, 3.5, 4.5], [0, 0, 90, np.nan]))
    s = r.summary()["trials_per_condition"]
    assert s == {"0deg": 2, "90deg": 1, "blank": 1}
