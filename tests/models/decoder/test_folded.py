"""`models.decoder.folded`: the folded inference arithmetic computes the trained decoder's function.

In float64 the two must agree to rounding (1e-9): any mistake in a folded constant (rotation
sign, pair order, head selection, scale, table) shows up as a difference of order one. The
weights are perturbed away from their initialisation so that no term is near zero, the unit
statistics are not the identity, and the timestamps are not all equal: `poyo` tokens (and
padding) carry different times; `patch` windows each have their own time, shared by their tokens
(the patch tokenizer's windows), with padding at other times, and the per-token path
(``shared_time=False``) is checked on per-token times too.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from models.decoder.config import DecoderConfig
from models.decoder.folded import FoldedDecoder
from models.decoder.model import BATCH_KEYS, Decoder
from models.export import simulated_batch

TASKS = {"direction": 8, "temporal_frequency": 5, "genetic": 2}


def _decoder(seed: int = 0, **kw) -> Decoder:
    torch.manual_seed(seed)
    cfg = DecoderConfig(n_units=60, n_sessions=3, tasks=TASKS, dropout=0.0, **kw)
    dec = Decoder(cfg).eval()
    with torch.no_grad():
        for p in dec.parameters():
            p.add_(torch.randn_like(p) * 0.2)
        dec.unit_loc.uniform_(-1.0, 1.0)
        dec.unit_scale.uniform_(0.5, 2.0)
    return dec


def _batch(
    dec: Decoder, seed: int = 1, dtype=torch.float32, per_token: bool | None = None
) -> dict[str, torch.Tensor]:
    """Per-token times (poyo, or ``per_token``), else one time per window (patch) with the
    padding at random other times."""
    b = simulated_batch(dec, 3, 17, seed=seed, n_pad=4)
    g = torch.Generator().manual_seed(seed)
    if per_token is None:
        per_token = dec.config.tokenizer != "patch"
    jitter = torch.rand(b["timestamps"].shape, generator=g)
    if not per_token:
        jitter = torch.where(b["mask"], jitter[:, :1], jitter)
    b["timestamps"] = b["timestamps"] + 0.3 * jitter
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in b.items()}


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


CASES = list(
    itertools.product(
        ["patch", "poyo"],  # tokenizer
        [True, False],  # direct_path
        [(False, False), (True, False), (False, True), (True, True)],  # stats: tokens, population
        [[], ["genetic"]],  # session_free_tasks
    )
)


@pytest.mark.parametrize(("tokenizer", "direct", "stats", "free"), CASES)
def test_folded_equals_decoder_in_float64(tokenizer, direct, stats, free):
    dec = _decoder(
        tokenizer=tokenizer,
        direct_path=direct,
        unit_stats_input=stats[0],
        population_stats=stats[1],
        session_free_tasks=free,
    ).double()
    folded = FoldedDecoder(dec)
    batch = _batch(dec, dtype=torch.float64)
    with torch.no_grad():
        assert float((dec.encode(batch) - folded.encode(batch)).abs().max()) < 1e-9
        want = dec.forward_batch(batch)
        got = folded(*(batch[k] for k in BATCH_KEYS))
    assert _max_diff(want, got) < 1e-9
    assert max(float(v.abs().max()) for v in want.values()) > 0.5  # not trivially small


@pytest.mark.parametrize(
    "shape",
    [
        {"dim": 16, "dim_head": 8, "depth": 0, "num_latents": 3, "cross_heads": 1},
        {"dim": 32, "dim_head": 16, "depth": 3, "self_heads": 4, "cross_heads": 3},
        {"dim": 24, "dim_head": 12, "depth": 1, "num_latents": 5, "t_min": 0.05, "t_max": 2.0},
    ],
)
def test_folded_equals_decoder_for_other_shapes(shape):
    dec = _decoder(seed=3, **shape).double()
    batch = _batch(dec, seed=4, dtype=torch.float64)
    with torch.no_grad():
        want = dec.forward_batch(batch)
        got = FoldedDecoder(dec)(*(batch[k] for k in BATCH_KEYS))
    assert _max_diff(want, got) < 1e-9


@pytest.mark.parametrize("direct", [True, False])
def test_patch_per_token_path_and_shared_time_path(direct):
    """The per-token rotation path still computes a patch decoder on tokens at any times; the
    shared-time path (the patch default) equals it on windows whose tokens share a time."""
    dec = _decoder(seed=5, tokenizer="patch", direct_path=direct).double()
    general = FoldedDecoder(dec, shared_time=False)
    shared = FoldedDecoder(dec)
    assert shared.shared_time and not general.shared_time
    with torch.no_grad():
        b = _batch(dec, seed=6, dtype=torch.float64, per_token=True)
        want = dec.forward_batch(b)
        assert _max_diff(want, general(*(b[k] for k in BATCH_KEYS))) < 1e-9
        b = _batch(dec, seed=7, dtype=torch.float64)
        assert b["timestamps"][0, 0] != b["timestamps"][1, 0]  # windows at different times
        want = dec.forward_batch(b)
        assert _max_diff(want, shared(*(b[k] for k in BATCH_KEYS))) < 1e-9
        assert _max_diff(want, general(*(b[k] for k in BATCH_KEYS))) < 1e-9


def test_shared_time_refused_for_poyo_tokens():
    with pytest.raises(ValueError, match="poyo tokens carry frame times"):
        FoldedDecoder(_decoder(tokenizer="poyo"), shared_time=True)
    assert not FoldedDecoder(_decoder(tokenizer="poyo")).shared_time


def test_float32_folded_within_export_tolerance_and_dtype_kept():
    dec = _decoder()
    folded = FoldedDecoder(dec)
    assert all(b.dtype == torch.float32 for b in folded.buffers() if b.is_floating_point())
    batch = _batch(dec)
    with torch.no_grad():
        truth = dec.double().forward_batch(
            {k: v.double() if v.is_floating_point() else v for k, v in batch.items()}
        )
        dec.float()
        want = dec.forward_batch(batch)
        got = folded(*(batch[k] for k in BATCH_KEYS))
    # folding in float64 rounds each constant once: no further from the truth than the decoder
    err_folded = _max_diff({k: v.double() for k, v in got.items()}, truth)
    err_dec = _max_diff({k: v.double() for k, v in want.items()}, truth)
    assert err_folded < 1e-4
    assert err_folded <= 4 * err_dec + 1e-6


def test_folded_holds_its_own_frozen_copies():
    dec = _decoder()
    folded = FoldedDecoder(dec)
    assert not any(p.requires_grad for p in folded.parameters())
    batch = _batch(dec)
    with torch.no_grad():
        before = folded(*(batch[k] for k in BATCH_KEYS))
        for p in dec.parameters():  # training the decoder further does not move the twin
            p.add_(1.0)
        after = folded(*(batch[k] for k in BATCH_KEYS))
    assert _max_diff(before, after) == 0.0
    assert all(p.requires_grad for p in dec.parameters())
