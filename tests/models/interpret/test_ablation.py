"""Latent windows, trial pooling, sparse SAE activations and unit-ablation experiments."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from models.decoder.predict import decode_from_s
from models.decoder.windows import SessionData, pooled_logits
from models.interpret.ablation import (
    SparseActs,
    ablation_experiment,
    encode_windows,
    pooled_log_probs,
    trial_accuracy,
)
from models.sae import SAEConfig, SAETrainConfig, train_sae
from tests.models.interpret.test_pipeline import make_recording, tiny_checkpoint


@pytest.fixture(scope="module")
def setup():
    torch.set_num_threads(1)
    recs = [make_recording("a", seed=0), make_recording("b", n_cells=7, genetic="B", seed=1)]
    ck = tiny_checkpoint(recs, seed=1)
    sessions = [SessionData.build(r, ck.vocab) for r in recs]
    trials = [ck.splits[r.session_id].test for r in recs]
    ws = encode_windows([ck.model], ck.tokenizer, sessions, trials, from_s=decode_from_s(ck))
    z = ws.latents[0]
    sae, _ = train_sae(
        z, SAEConfig(d_in=z.shape[-1], n_units=24, k=3), SAETrainConfig(steps=30, batch_size=256)
    )
    return ck, recs, sessions, trials, ws, sae


def test_pooling_matches_predict_trials(setup):
    ck, recs, sessions, trials, ws, _ = setup
    lp = pooled_log_probs(ck.model, ws)
    off = 0
    for sd, tr in zip(sessions, trials, strict=True):
        ref = pooled_logits(ck.model, ck.tokenizer, sd, tr, from_s=decode_from_s(ck))
        for task, v in ref.items():
            np.testing.assert_allclose(lp[task][off : off + tr.size], v, rtol=1e-5, atol=1e-5)
        off += tr.size
    assert ws.n_trials == off and ws.latents[0].shape[1:] == (4, 16)


def test_window_stride_and_select(setup):
    ck, _, sessions, trials, ws, _ = setup
    ws2 = encode_windows([ck.model], ck.tokenizer, sessions, trials, stride=3)
    assert 0 < len(ws2) < len(ws)
    assert np.array_equal(np.unique(ws2.owner), np.arange(ws.n_trials))  # every trial kept
    mask = np.zeros(ws.n_trials, bool)
    mask[[1, 4]] = True
    sub = ws.select(mask)
    assert sub.n_trials == 2 and set(sub.owner.tolist()) == {0, 1}
    assert torch.equal(sub.latents[0], ws.latents[0][torch.as_tensor(np.isin(ws.owner, [1, 4]))])


def test_sparse_acts_reconstruct_the_sae(setup):
    *_, ws, sae = setup
    z = ws.latents[0]
    sa = SparseActs.compute(sae, z, batch_size=7)  # odd batch: rows stay ordered
    with torch.no_grad():
        acts = sae.encode(z)
        x_hat = sae.decode(acts)
    all_units = torch.ones(sa.n_units, dtype=torch.bool)
    sl = slice(3, len(ws))
    contrib = sa.contribution(all_units, sl)
    torch.testing.assert_close(contrib + sae.bias_vector(), x_hat[sl], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(sa.window_mean(), acts.mean(1).numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(sa.firing_rate(), (acts > 0).float().mean((0, 1)).numpy())
    # ablating nothing is the identity; ablating a unit removes exactly its contribution
    f0 = sa.ablate([])
    torch.testing.assert_close(f0(z[sl], sl), z[sl])
    u = int(acts.sum((0, 1)).argmax())
    f1 = sa.ablate([u])
    expect = z[sl] - acts[sl][..., u : u + 1] * sae.unit_directions()[u]
    torch.testing.assert_close(f1(z[sl], sl), expect, rtol=1e-4, atol=1e-5)


def test_ablation_experiment(setup):
    ck, recs, _, trials, ws, sae = setup
    sa = SparseActs.compute(sae, ws.latents[0])
    targets = {
        "direction": np.concatenate(
            [(np.mod(r.trials.direction[t], 360) / 45).round().astype(int) for r, t in
             zip(recs, trials, strict=True)]
        ),
        "genetic": np.concatenate([np.full(t.size, i) for i, t in enumerate(trials)]),
    }  # fmt: skip
    active = np.flatnonzero(sa.firing_rate() > 0)
    out = ablation_experiment(
        ck.model, ws, sa, {"direction": active[:2], "none": np.array([], int)}, targets,
        n_draws=6, seed=0, n_boot=50,
    )  # fmt: skip
    plain = trial_accuracy(pooled_log_probs(ck.model, ws), targets)
    assert out["baseline"]["direction"] == pytest.approx(plain["direction"]["accuracy"])
    assert set(out["matrix"]) == {"direction"}  # empty unit sets are skipped
    for cell in out["matrix"]["direction"].values():
        assert cell["n_units"] == 2 and cell["n_draws"] == 6
        assert 0 < cell["p"] <= 1
        lo, hi = cell["random_drop_ci"]
        assert lo <= cell["random_drop"] <= hi
        assert (
            cell["drop_ci"][0] <= cell["drop"] + 1e-9 and cell["drop"] <= cell["drop_ci"][1] + 1e-9
        )
    # with nearly all active units labelled, random sets come from all active units
    out2 = ablation_experiment(ck.model, ws, sa, {"v": active[:-1]}, targets, n_draws=2, n_boot=10)
    assert out2["matrix"]["v"]["direction"]["random_pool"].startswith("all active")
