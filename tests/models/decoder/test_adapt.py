from __future__ import annotations

import numpy as np
import torch

from models.decoder.adapt import adapt_session, balanced_subset
from models.decoder.checkpoint import Checkpoint
from models.decoder.config import CheckpointConfig, TrainConfig
from models.decoder.predict import predict_trials
from models.tasks import direction_labels
from tests.models.decoder.conftest import make_recording
from tests.models.decoder.test_model import make_model


def test_adaptation_fits_only_the_new_embeddings(small_recs, tmp_path):
    model, vocab = make_model(small_recs)
    ck = Checkpoint(
        model=model,
        config=CheckpointConfig(decoder=model.config, training=TrainConfig(unit_dropout=0.2)),
        vocab=vocab,
    )
    before = {k: v.clone() for k, v in model.state_dict().items()}
    new = make_recording("s_new", n_cells=6, n_trials=16, genetic="B", seed=7)
    ad = adapt_session(ck, new, np.arange(8), steps=15, seed=0)

    # the original checkpoint is untouched
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)
    after = ad.model.state_dict()
    n_u, n_s = vocab.n_units, vocab.n_sessions
    for k, v in before.items():
        a = after[k]
        if k in ("unit_emb.weight", "unit_loc", "unit_scale"):
            torch.testing.assert_close(a[:n_u], v, rtol=0, atol=0)
            assert a.shape[0] == n_u + 6
        elif k == "session_emb.weight":
            torch.testing.assert_close(a[:n_s], v, rtol=0, atol=0)
            assert a.shape[0] == n_s + 1
        else:
            torch.testing.assert_close(a, v, rtol=0, atol=0, msg=f"{k} changed")
    # the new rows did move
    init_rows = model.session_emb.weight.mean(0)
    assert not torch.allclose(after["session_emb.weight"][n_s], init_rows)
    assert ad.vocab.has_session("s_new") and ad.vocab.session_genetic["s_new"] == ""
    assert ad.model.config.n_units == n_u + 6
    assert not any(p.requires_grad for p in ad.model.parameters())

    probs = predict_trials(ad, new, np.arange(8, 16))
    assert probs["direction"].shape == (8, 8)
    np.testing.assert_allclose(probs["direction"].sum(1), 1.0, rtol=1e-5)
    assert probs["genetic"].shape == (8, 2)
    assert "temporal_frequency" not in probs  # the new recording has none

    ad.save(tmp_path / "ad")
    ad2 = Checkpoint.load(tmp_path / "ad")
    p2 = predict_trials(ad2, new, np.arange(8, 16))
    np.testing.assert_allclose(p2["direction"], probs["direction"], rtol=1e-6)


def test_balanced_subset_spreads_over_classes():
    rec = make_recording("x", n_trials=32)
    y = direction_labels(rec)
    sub = balanced_subset(y, np.arange(32), 8, seed=0)
    assert sorted(y[sub].tolist()) == list(range(8))
