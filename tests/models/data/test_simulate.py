import json
import time

import numpy as np
import pytest
from pydantic import ValidationError
from scipy import stats
from scipy.signal import lfilter

from models.data.cre_lines import (
    CRE_LINE_NAMES,
    CRE_LINES,
    EXCITATORY_LINES,
    INHIBITORY_LINES,
)
from models.data.io import load_recordings
from models.data.recording import DataError
from models.data.simulate import (
    SIMULATOR_VERSION,
    GroundTruth,
    SimConfig,
    _calcium_filter,
    load_truth,
    session_cre_line,
    signal_correlations,
    simulate_corpus,
    simulate_session,
    truth_path,
)
from models.tasks import DIRECTIONS_DEG, TEMPORAL_FREQUENCIES_HZ, direction_labels


def _trial_means(rec, window_s=2.0):
    """Mean dF/F in each trial's grating window, ``[trials, N]``."""
    i0 = rec.frame_index(rec.trials.start) + 1
    n = int(round(window_s * rec.sampling_rate))
    return rec.traces[i0[:, None] + np.arange(n)[None, :]].mean(axis=1)


def _condition_means(rec, R):
    d, f = rec.trials.direction, rec.trials.temporal_frequency
    return np.stack(
        [R[(d == x) & (f == y)].mean(0) for x in DIRECTIONS_DEG for y in TEMPORAL_FREQUENCIES_HZ],
        axis=1,
    )


def test_cre_line_table():
    assert len(CRE_LINES) == 13
    assert set(INHIBITORY_LINES) == {"Pvalb-IRES-Cre", "Sst-IRES-Cre", "Vip-IRES-Cre"}
    assert len(EXCITATORY_LINES) == 10
    for line in CRE_LINES.values():
        assert np.isclose(sum(line.tf_pref_probs), 1.0)
        assert 0 < line.frac_responsive <= 0.5  # unresponsive cells are the largest class
    # inhibitory lines: broader tuning than every excitatory line
    assert max(CRE_LINES[n].kappa for n in INHIBITORY_LINES) < min(
        CRE_LINES[n].kappa for n in EXCITATORY_LINES
    )


def test_config_is_validated():
    with pytest.raises(ValidationError, match="unknown Cre line"):
        SimConfig(cre_line="Foo-Cre")
    with pytest.raises(ValidationError):
        SimConfig(n_cells=0)
    with pytest.raises(ValidationError):
        SimConfig(typo_field=1)
    assert SimConfig(minutes=1.0, frame_rate=30.0).n_frames == 1800


def test_deterministic_by_seed():
    cfg = SimConfig(n_cells=30, minutes=1.0)
    a, ta = simulate_session(cfg, seed=7, session_index=2)
    b, tb = simulate_session(cfg, seed=7, session_index=2)
    assert np.array_equal(a.traces, b.traces) and a.equals(b)
    assert ta.equals(tb)
    c, _ = simulate_session(cfg, seed=8, session_index=2)
    assert not np.array_equal(a.traces, c.traces)
    d, _ = simulate_session(cfg, seed=7, session_index=3)
    assert d.session_id != a.session_id and d.subject_id != a.subject_id
    # the ground truth's config (Cre line resolved) reproduces the session bit for bit
    e, te = simulate_session(SimConfig(**ta.config), seed=ta.seed, session_index=ta.session_index)
    assert np.array_equal(a.traces, e.traces) and te.equals(ta)


def test_shapes_ids_and_trial_table():
    rec, truth = simulate_session(SimConfig(n_cells=40, minutes=4.0), seed=1, session_index=5)
    assert rec.traces.shape == (7200, 40) and rec.traces.dtype == np.float32
    assert rec.sampling_rate == 30.0 and rec.source == "simulated"
    np.testing.assert_allclose(np.diff(rec.timestamps), 1 / 30.0)
    assert rec.session_id == "sim-s1-005"
    assert rec.unit_ids[3] == "sim-s1-005/cell0003" and truth.unit_ids == rec.unit_ids
    assert rec.genetic_background == truth.cre_line in CRE_LINE_NAMES
    assert rec.metadata["simulator_version"] == SIMULATOR_VERSION
    assert rec.metadata["config"]["n_cells"] == 40
    assert rec.metadata["config"]["cre_line"] == truth.cre_line
    json.dumps(rec.metadata)  # JSON-serialisable

    tr = rec.trials
    np.testing.assert_allclose(tr.end - tr.start, 2.0)  # 2 s gratings
    np.testing.assert_allclose(np.diff(tr.start), 3.0)  # + 1 s grey
    assert tr.start[0] >= rec.timestamps[0] and tr.end[-1] <= rec.duration
    assert len(tr) == 79  # (240 s - 2 s lead-in - 2 s) / 3 s + 1
    # the first block holds each of the 8 x 5 conditions once and one blank sweep
    first = tr.select(tr.extra["block"] == 0)
    assert len(first) == 41
    counts = first.condition_counts()
    assert sum(1 for d, _ in counts if np.isnan(d)) == 1
    real = {k: v for k, v in counts.items() if not np.isnan(k[0])}
    assert set(real) == {(d, f) for d in DIRECTIONS_DEG for f in TEMPORAL_FREQUENCIES_HZ}
    assert set(real.values()) == {1}
    blank = np.isnan(tr.direction)
    assert np.isnan(tr.temporal_frequency[blank]).all()
    assert (direction_labels(rec)[blank] == -1).all() and (direction_labels(rec)[~blank] >= 0).all()
    # blocks are shuffled differently
    assert not np.array_equal(tr.direction[:41], tr.direction[41:79])

    no_blanks, _ = simulate_session(SimConfig(n_cells=5, minutes=3.0, blank_sweeps_per_block=0))
    assert np.isfinite(no_blanks.trials.direction).all()


def test_cre_lines_balanced_and_drawn_from_seed():
    lines = [session_cre_line(4, i) for i in range(26)]
    assert sorted(lines[:13]) == sorted(CRE_LINE_NAMES) == sorted(lines[13:])
    assert lines != [session_cre_line(5, i) for i in range(26)]
    rec, truth = simulate_session(SimConfig(n_cells=5, minutes=0.5), seed=4, session_index=3)
    assert rec.genetic_background == truth.cre_line == lines[3]
    rec, _ = simulate_session(SimConfig(n_cells=5, minutes=0.5, cre_line="Vip-IRES-Cre"), seed=4)
    assert rec.genetic_background == "Vip-IRES-Cre"


def test_calcium_kernel_is_gcamp6f_like():
    cfg = SimConfig()
    b, a, _ = _calcium_filter(cfg)
    impulse = np.zeros(200)
    impulse[0] = 1.0
    h = lfilter(b, a, impulse)
    t_peak = np.argmax(h) / cfg.frame_rate
    assert h.max() == pytest.approx(1.0)
    assert 0.05 <= t_peak <= 0.2  # rise ~50 ms
    after = h[np.argmax(h) :]
    t_half = np.argmax(after < 0.5) / cfg.frame_rate
    assert 0.3 <= t_half <= 0.8  # decay ~0.7 s


def test_planted_tuning_is_recovered_from_the_traces():
    cfg = SimConfig(n_cells=160, minutes=10.0, cre_line="Cux2-CreERT2")
    rec, truth = simulate_session(cfg, seed=11)
    R = _trial_means(rec)
    d = rec.trials.direction
    per_dir = np.stack([R[d == x].mean(0) for x in DIRECTIONS_DEG], axis=1)  # [N, 8]
    est = np.asarray(DIRECTIONS_DEG)[per_dir.argmax(axis=1)]
    err = np.abs((est - truth.pref_direction + 180.0) % 360.0 - 180.0)
    tuned = truth.responsive & ~truth.orientation_selective & (truth.kappa >= 1.5)
    assert tuned.sum() >= 20
    assert np.mean(err[tuned] <= 45.0) >= 0.8

    # many cells are unresponsive, and they show no significant direction tuning
    assert (~truth.responsive).mean() >= 0.4
    p = np.array(
        [stats.f_oneway(*[R[d == x, j] for x in DIRECTIONS_DEG]).pvalue for j in range(rec.n_units)]
    )
    assert np.mean(p[~truth.responsive] >= 0.05) >= 0.8
    assert np.mean(p[truth.responsive] < 0.05) >= 0.7
    # dF/F: unresponsive cells sit around zero
    assert abs(np.median(rec.traces[:, ~truth.responsive].mean(axis=0))) < 0.02


def test_orientation_selective_cells_have_two_peaks():
    truth = simulate_session(SimConfig(n_cells=300, minutes=0.5, cre_line="Rorb-IRES2-Cre"))[1]
    resp = truth.responsive
    curves = truth.tuning_curves()[resp].max(axis=2)  # [n_resp, 8] at the best TF
    pref = np.round(truth.pref_direction[resp] / 45.0).astype(int) % 8
    rows = np.arange(curves.shape[0])
    ratio = curves[rows, (pref + 4) % 8] / curves[rows, pref]
    osel = truth.orientation_selective[resp]
    dsel = ~osel & (truth.kappa[resp] > 1.5)
    assert osel.sum() >= 10 and dsel.sum() >= 10
    assert np.median(ratio[osel]) > 0.5 > 0.1 > np.median(ratio[dsel])
    assert (truth.tuning_curves()[~resp] == 0).all()


def test_inhibitory_lines_have_higher_signal_correlations():
    """Median pairwise signal correlation among responsive cells, per Cre line.

    Planted: of the noise-free tuning curves (4 sessions per line). Measured: of the
    trial-averaged mean dF/F in the 40 conditions (two 12-minute sessions per line). Allen:
    Pvalb 0.43, Vip 0.29, Sst 0.28, excitatory lines 0.04-0.20.
    """
    planted: dict[str, float] = {}
    measured: dict[str, float] = {}
    for i, line in enumerate(CRE_LINE_NAMES):
        meds = []
        for s in range(4):
            cfg = SimConfig(n_cells=150, minutes=0.1, cre_line=line)
            meds.append(
                np.median(simulate_session(cfg, seed=s, session_index=i)[1].signal_correlations())
            )
        planted[line] = float(np.mean(meds))
        cfg = SimConfig(n_cells=60, minutes=12.0, cre_line=line, frac_responsive=0.6)
        meds = []
        for s in range(2):
            rec, truth = simulate_session(cfg, seed=100 + s, session_index=i)
            cond = _condition_means(rec, _trial_means(rec))[truth.responsive]
            meds.append(np.median(signal_correlations(cond)))
        measured[line] = float(np.mean(meds))

    def group(values, lines):
        return float(np.median([values[n] for n in lines]))

    inh, exc = group(planted, INHIBITORY_LINES), group(planted, EXCITATORY_LINES)
    assert inh > exc + 0.1, (planted, inh, exc)
    assert 0.2 < inh < 0.5 and 0.02 < exc < 0.22, (inh, exc)
    inh, exc = group(measured, INHIBITORY_LINES), group(measured, EXCITATORY_LINES)
    assert inh > exc + 0.06, (measured, inh, exc)


def test_ground_truth_round_trip(tmp_path):
    _, truth = simulate_session(SimConfig(n_cells=25, minutes=0.5), seed=2)
    p = truth.save(tmp_path / "x.truth.json")
    back = GroundTruth.load(p)
    assert back.equals(truth)
    assert back.responsive.dtype == bool and back.pref_direction.dtype == np.float64
    np.testing.assert_array_equal(back.tuning_curves(), truth.tuning_curves())

    assert truth_path(tmp_path / "sim-s0-000.nwb") == tmp_path / "sim-s0-000.truth.json"
    (tmp_path / "bad.truth.json").write_text("{not json")
    with pytest.raises(DataError, match="not valid JSON"):
        GroundTruth.load(tmp_path / "bad.truth.json")
    (tmp_path / "other.truth.json").write_text('{"a": 1}')
    with pytest.raises(DataError, match="format"):
        GroundTruth.load(tmp_path / "other.truth.json")
    d = truth.to_dict()
    d["cells"]["gain"] = d["cells"]["gain"][:-1]
    (tmp_path / "short.truth.json").write_text(json.dumps(d))
    with pytest.raises(DataError, match="cells.gain"):
        GroundTruth.load(tmp_path / "short.truth.json")
    with pytest.raises(DataError, match="no such"):
        GroundTruth.load(tmp_path / "missing.truth.json")


@pytest.mark.parametrize("fmt,suffix", [("nwb", ".nwb"), ("brainsets", ".h5")])
def test_corpus_on_disk(tmp_path, fmt, suffix):
    paths = simulate_corpus(2, 20, 1.0, 3, tmp_path, fmt=fmt, progress=False)
    assert [p.name for p in paths] == [f"sim-s3-000{suffix}", f"sim-s3-001{suffix}"]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [p.name for p in paths] + [f"sim-s3-00{i}.truth.json" for i in range(2)]
    )
    recs = load_recordings([tmp_path])  # the truth JSON files are not picked up
    assert [r.session_id for r in recs] == ["sim-s3-000", "sim-s3-001"]
    for i, (rec, path) in enumerate(zip(recs, paths, strict=True)):
        mem, truth = simulate_session(SimConfig(n_cells=20, minutes=1.0), seed=3, session_index=i)
        assert rec.differences(mem) == []
        assert load_truth(path).equals(truth)
        assert rec.genetic_background == truth.cre_line
    assert recs[0].subject_id != recs[1].subject_id


def test_corpus_rejects_bad_arguments(tmp_path):
    with pytest.raises(DataError, match="format"):
        simulate_corpus(1, 5, 0.5, 0, tmp_path, fmt="csv", progress=False)
    with pytest.raises(DataError, match="n_sessions"):
        simulate_corpus(0, 5, 0.5, 0, tmp_path, progress=False)


@pytest.mark.slow
def test_one_hour_thousand_cells_is_fast():
    cfg = SimConfig(n_cells=1000, minutes=60.0)
    t0, c0 = time.perf_counter(), time.process_time()
    rec, truth = simulate_session(cfg, seed=0)
    elapsed, cpu = time.perf_counter() - t0, time.process_time() - c0
    print(
        f"\n1000 cells x 60 min at 30 Hz ({rec.n_frames} frames): "
        f"{elapsed:.2f} s wall, {cpu:.2f} s CPU"
    )
    assert rec.traces.shape == (108_000, 1000) and rec.traces.dtype == np.float32
    assert truth.n_cells == 1000
    assert elapsed < 60.0
