import numpy as np
import pytest
import scipy.io as sio

from models.data.park import read_park
from models.data.recording import DataError

EXPECTED = {  # from ../shared/data/park2024/README.md
    "mrcuts24": (28, "KO"),
    "mrcuts25": (53, "KO"),
    "mrcuts26": (74, "KO"),
    "mrcuts28": (56, "control"),
    "mrcuts29": (18, "control"),
}


def test_five_sessions_as_documented(park_recordings):
    assert len(park_recordings) == 5
    for rec in park_recordings:
        n, group = EXPECTED[rec.subject_id]
        assert rec.n_units == n
        assert rec.genetic_background == group
        assert rec.sampling_rate == pytest.approx(16.0)
        assert len(rec.trials) == 128
        assert rec.pseudo_continuous and rec.source == "park2024"
        assert rec.n_frames == 128 * 49
        # 8 directions, 16 trials each
        vals, counts = np.unique(rec.trials.direction, return_counts=True)
        assert list(vals) == [0, 45, 90, 135, 180, 225, 270, 315]
        assert set(counts) == {16}
        assert set(rec.covariates) == {"pupil_zscore", "speed"}
        assert len(set(rec.unit_ids)) == n and rec.unit_ids[0].startswith(rec.subject_id)


def test_traces_are_the_snippets_in_trial_order(park_files, park_recordings):
    path, rec = park_files[-1], park_recordings[-1]
    m = sio.loadmat(path, squeeze_me=True, struct_as_record=False)
    k = 37  # trial
    snippet = m["D"].neuron3[k]
    np.testing.assert_allclose(rec.traces[k * 49 : (k + 1) * 49, 2], snippet, rtol=1e-6)
    # trial k's onset is sample 16 of its snippet (t = 0), its grating lasts to the snippet end
    assert rec.trials.start[k] == pytest.approx((k * 49 + 16) / 16.0)
    assert rec.trials.end[k] == pytest.approx((k + 1) * 49 / 16.0)
    assert rec.trials.extra["segment_start"][k] == pytest.approx(k * 49 / 16.0)
    assert rec.trials.direction[k] == m["TE"].direction[k]


def test_corrupt_and_truncated_files_give_one_clear_error(tmp_path, park_files):
    junk = tmp_path / "230101_mouse1_fov1_grat-000_data.mat"
    junk.write_bytes(b"this is not a mat file" * 10)
    with pytest.raises(DataError, match="not a readable MATLAB v5 file") as ei:
        read_park(junk)
    assert str(junk) in str(ei.value)

    truncated = tmp_path / "230102_mouse1_fov1_grat-000_data.mat"
    truncated.write_bytes(park_files[0].read_bytes()[:5000])
    with pytest.raises(DataError, match=str(truncated)):
        read_park(truncated)

    with pytest.raises(DataError, match="no such file"):
        read_park(tmp_path / "missing.mat")


def _write_struct_file(path, n_trials=8, n_samples=49, **overrides):
    rng = np.random.default_rng(0)
    cell = np.empty(n_trials, dtype=object)
    for i in range(n_trials):
        cell[i] = rng.normal(size=n_samples)
    D = {"neuron1": cell, "neuron2": cell.copy()}
    TE = {"direction": np.arange(n_trials) % 8 * 45.0, "nTrials": n_trials, "dt": 0.0625}
    t = np.linspace(-1, 2, n_samples)
    D.update(overrides.pop("D", {}))
    TE.update(overrides.pop("TE", {}))
    sio.savemat(path, {"D": D, "TE": TE, "t": t})
    return path


def test_malformed_fields_are_named(tmp_path):
    ok = _write_struct_file(tmp_path / "230101_mx_fov1_grat.mat")
    rec = read_park(ok)
    assert rec.n_units == 2 and rec.genetic_background == "unknown"

    bad = np.empty(8, dtype=object)
    for i in range(8):
        bad[i] = np.zeros(30 if i == 3 else 49)
    p = _write_struct_file(tmp_path / "a.mat", D={"neuron2": bad})
    with pytest.raises(DataError, match=r"field 'D.neuron2'"):
        read_park(p)

    nan = np.empty(8, dtype=object)
    for i in range(8):
        nan[i] = np.full(49, np.nan) if i == 5 else np.zeros(49)
    p = _write_struct_file(tmp_path / "b.mat", D={"neuron1": nan})
    with pytest.raises(DataError, match=r"NaN/Inf samples \(first in trial 5\)"):
        read_park(p)

    p = _write_struct_file(tmp_path / "c.mat", TE={"nTrials": 9})
    with pytest.raises(DataError, match=r"field 'TE.direction'"):
        read_park(p)

    p = tmp_path / "d.mat"
    sio.savemat(p, {"D": {"neuron1": 1}, "t": np.zeros(3)})
    with pytest.raises(DataError, match="missing top-level variable 'TE'"):
        read_park(p)
