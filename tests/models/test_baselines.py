import numpy as np
import pytest

from models import baselines
from models.baselines import (
    cross_validated_accuracy,
    genetic_baselines,
    population_features,
    trial_features,
    trial_task_baselines,
)
from models.data.recording import DataError
from models.splits import split_all, split_trials
from models.tasks import genetic_classes

# README of ../shared/data/park2024: 5-fold CV logistic (standardised, C=0.1) on each neuron's
# mean response 0-2 s after onset, 8-way direction accuracy per session (in file order).
README_LOGISTIC = {
    "mrcuts24": 0.24,
    "mrcuts25": 0.48,
    "mrcuts26": 0.06,
    "mrcuts28": 0.76,
    "mrcuts29": 0.39,
}


def test_trial_features_are_mean_response_0_to_2s(park_recordings):
    rec = park_recordings[0]
    x = trial_features(rec)
    assert x.shape == (128, rec.n_units)
    # Park snippets: 49 samples at 16 Hz from -1 s; onset is sample 16, the grating runs to +2 s.
    cube = rec.traces.reshape(128, 49, rec.n_units)
    np.testing.assert_allclose(x, cube[:, 16:49].mean(axis=1), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(trial_features(rec, window=(0.0, 2.0 + 1 / 16)), x, rtol=1e-6)
    early = trial_features(rec, [0, 5], window=(0.0, 1.0))
    np.testing.assert_allclose(early, cube[[0, 5], 16:32].mean(axis=1), rtol=1e-6, atol=1e-7)


def test_feature_window_without_frames_is_a_data_error(park_recordings):
    rec = park_recordings[0]
    with pytest.raises(DataError, match="no frames in the feature window"):
        trial_features(rec, window=(1e-4, 2e-4))
    with pytest.raises(DataError, match="end > start"):
        trial_features(rec, window=(1.0, 0.5))


def test_logistic_cv_reproduces_readme(park_recordings):
    """Checks loading and feature extraction against the dataset's published reference."""
    got = {r.subject_id: cross_validated_accuracy(r, "logistic", seed=0) for r in park_recordings}
    assert set(got) == set(README_LOGISTIC)
    for mouse, ref in README_LOGISTIC.items():
        assert abs(got[mouse] - ref) <= 0.1, (mouse, got[mouse], ref)


def test_population_features_ignore_cell_order(park_recordings):
    rec = park_recordings[1]
    perm = np.random.default_rng(0).permutation(rec.n_units)
    shuffled = rec.replace(traces=rec.traces[:, perm], unit_ids=[rec.unit_ids[i] for i in perm])
    a, b = population_features(rec), population_features(shuffled)
    assert a.shape == (128, 12)
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_trial_task_baselines_on_park_split(park_recordings):
    rec = next(r for r in park_recordings if r.subject_id == "mrcuts28")
    sp = split_trials(rec, seed=0)
    out = trial_task_baselines(rec, sp, seed=0)
    assert set(out) == {"direction"}
    for model in ("logistic", "mlp"):
        y, p = out["direction"][model]
        assert y.shape == p.shape == (sp.test.size,)
        assert (p == y).mean() > 0.4  # the best Park session, far above chance (0.125)
    # deterministic in the seed
    again = trial_task_baselines(rec, sp, seed=0)
    assert np.array_equal(again["direction"]["mlp"][1], out["direction"]["mlp"][1])


def test_genetic_baselines_leave_the_test_session_out(park_recordings, monkeypatch):
    recs = park_recordings
    splits = split_all(recs, seed=0)
    classes = genetic_classes(recs)
    n_fit = {
        r.session_id: splits[r.session_id].train.size + splits[r.session_id].val.size for r in recs
    }
    seen = []
    real = baselines.fit_predict

    def spy(name, x_train, y_train, x_test, **kw):
        seen.append((x_train.shape[0], x_test.shape[0], kw.get("balanced")))
        return real(name, x_train, y_train, x_test, **kw)

    monkeypatch.setattr(baselines, "fit_predict", spy)
    out = genetic_baselines(recs, splits, classes, seed=0, models=("logistic",))
    assert set(out) == {r.session_id for r in recs}
    total = sum(n_fit.values())
    for (n_tr, n_te, balanced), r in zip(seen, recs, strict=True):
        assert n_tr == total - n_fit[r.session_id]  # trained on the other sessions only
        assert n_te == splits[r.session_id].test.size
        assert balanced
        y, p = out[r.session_id]["logistic"]
        assert np.all(y == classes.index(r.genetic_background))
        assert set(np.unique(p)) <= {0, 1}


def test_fit_predict_with_one_training_class_predicts_it():
    x = np.random.default_rng(0).normal(size=(10, 3))
    assert baselines.fit_predict("mlp", x, np.full(10, 2), x[:4]).tolist() == [2, 2, 2, 2]
    with pytest.raises(KeyError, match="unknown baseline"):
        baselines.make_model("svm")
