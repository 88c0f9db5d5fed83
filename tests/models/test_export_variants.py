"""The attribution-off export variant: `ExplainedDecoder(..., attributions=False)`.

Same inputs as the bundle's graph; outputs only units, activations, logits and probs. Checked:
ONNX Runtime vs PyTorch within 1e-4 at other batch and token sizes than the export example
(dynamic dims, padding), and the same predictions and top units as the attribution-on model.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from models.decoder.config import DecoderConfig
from models.decoder.model import Decoder
from models.export import (
    INPUT_NAMES,
    ExplainedDecoder,
    export_onnx,
    ort_session,
    output_names,
    parity,
    run_ort,
    simulated_batch,
)
from models.sae import SAEConfig, build_sae

pytest.importorskip("onnxruntime")
TOL = 1e-4
TASKS = {"direction": 8, "genetic": 3}


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    cfg = DecoderConfig(
        dim=16, dim_head=8, depth=1, num_latents=4, n_units=60, n_sessions=2, tasks=TASKS,
        dropout=0.0, unit_stats_input=True, population_stats=True,
        identity_blind_tasks=["genetic"],
    )  # fmt: skip
    dec = Decoder(cfg).eval()
    with torch.no_grad():  # non-trivial per-unit normalisation
        dec.unit_loc.uniform_(-0.5, 0.5)
        dec.unit_scale.uniform_(0.5, 2.0)
    sae = build_sae(SAEConfig(d_in=16, n_units=48, k=4, seed=1)).eval()
    on = ExplainedDecoder(dec, sae, top_m=5).eval()
    off = ExplainedDecoder(dec, sae, top_m=5, attributions=False).eval()
    return on, off


@pytest.fixture(scope="module")
def off_session(models, tmp_path_factory):
    _, off = models
    torch.set_num_threads(1)
    path = export_onnx(off, tmp_path_factory.mktemp("variant") / "off.onnx")
    return ort_session(path, threads=1)


def _batches(dec):
    return [
        simulated_batch(dec, 1, 3, seed=11),
        simulated_batch(dec, 3, 40, seed=12, n_pad=5),
        simulated_batch(dec, 5, 60, seed=13, fs=30.0),
    ]


def test_output_names():
    assert output_names(["a"], attributions=False) == [
        "units",
        "activations",
        "a.logits",
        "a.probs",
    ]
    assert output_names(["a"]) == output_names(["a"], attributions=True)
    assert len(output_names(["a", "b"])) == 2 + 4 * 2


def test_off_variant_matches_the_on_variant_in_pytorch(models):
    on, off = models
    assert on.attributions is True and off.attributions is False
    assert off.output_names == ["units", "activations"] + [
        f"{t}.{k}" for t in sorted(TASKS) for k in ("logits", "probs")
    ]
    for batch in _batches(on.decoder):
        a, b = on.run_dict(batch), off.run_dict(batch)
        assert set(b) == set(off.output_names)
        torch.testing.assert_close(b["units"], a["units"], rtol=0, atol=0)
        torch.testing.assert_close(b["activations"], a["activations"], rtol=0, atol=1e-5)
        with torch.no_grad():
            plain = off.decoder.forward_batch(batch)
        for t in sorted(TASKS):
            torch.testing.assert_close(b[f"{t}.logits"], a[f"{t}.logits"], rtol=0, atol=1e-5)
            torch.testing.assert_close(b[f"{t}.logits"], plain[t], rtol=0, atol=1e-5)
            torch.testing.assert_close(b[f"{t}.probs"].sum(1), torch.ones(len(plain[t])))


def test_off_variant_onnx_parity(models, off_session):
    _, off = models
    sess = off_session
    assert [i.name for i in sess.get_inputs()] == list(INPUT_NAMES)
    assert [o.name for o in sess.get_outputs()] == off.output_names
    batches = _batches(off.decoder)
    for batch in batches:  # dynamic batch and token dims: none equals the export example's
        got = run_ort(sess, batch)
        ref = {k: v.numpy() for k, v in off.run_dict(batch).items()}
        b = batch["mask"].shape[0]
        np.testing.assert_array_equal(got["units"], ref["units"])
        assert got["units"].dtype == np.int64 and got["units"].shape == (b, 5)
        for name in off.output_names[1:]:
            assert got[name].shape == ref[name].shape, name
            np.testing.assert_allclose(got[name], ref[name], rtol=0, atol=TOL, err_msg=name)
    p = parity(off, sess, batches)
    assert max(p["logits"], p["probs"], p["activations"]) < TOL
    assert p["units_mismatch"] == 0.0 and p["plain_decoder_logits"] < 1e-5
    assert p["attributions"] == p["unexplained"] == p["additivity"] == 0.0  # not in this graph
