import numpy as np

from models.splits import split_trials
from models.tasks import direction_labels, genetic_classes, genetic_label, trial_labels


def test_park_labels_and_splits(park_recordings):
    rec = park_recordings[0]
    lab = trial_labels(rec)
    assert set(lab) == {"direction"}  # Park has no temporal frequency
    assert np.bincount(lab["direction"]).tolist() == [16] * 8
    s = split_trials(rec, seed=0)
    all_idx = np.concatenate([s.train, s.val, s.test])
    assert len(set(all_idx.tolist())) == all_idx.size == 128  # disjoint, complete
    # stratified: each direction appears in test
    assert set(lab["direction"][s.test]) == set(range(8))
    # deterministic per session and seed, different across seeds
    assert np.array_equal(split_trials(rec, seed=0).test, s.test)
    assert not np.array_equal(split_trials(rec, seed=1).test, s.test)
    assert genetic_classes(park_recordings) == ["KO", "control"]
    assert genetic_label(rec, ["KO", "control"]) == 0


def test_direction_labels_wrap_and_blank(park_recordings):
    rec = park_recordings[0]
    from models.data.recording import Trials

    t = Trials.from_arrays([1, 2, 3, 4], [1.5, 2.5, 3.5, 4.5], [359.5, 45.2, np.nan, 100])
    r = rec.replace(trials=t)
    assert direction_labels(r).tolist() == [0, 1, -1, -1]


def test_small_strata_still_get_validation_trials(park_recordings):
    from models.data.recording import Trials

    rec = park_recordings[0]
    # 40 conditions x 5 trials each, like a 10-minute simulated session
    n = 200
    start = np.arange(n) * 1.5 + 1.0
    t = Trials.from_arrays(
        start, start + 1.0, np.arange(n) % 8 * 45.0, [1.0, 2.0, 4.0, 8.0, 15.0] * 40
    )
    r = rec.replace(trials=t)
    s = split_trials(r, seed=0, val_fraction=0.1, test_fraction=0.2)
    assert (s.val.size, s.test.size, s.train.size) == (20, 40, 140)
    # each direction still appears in test
    assert set(direction_labels(r)[s.test]) == set(range(8))
