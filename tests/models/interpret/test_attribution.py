import numpy as np
import pytest
import torch

from models.interpret.attribution import (
    ablation_attribution,
    agreement,
    attribute,
    compare_methods,
    tile_rows,
)
from models.sae import SAEConfig, build_sae

B, L, D, N_UNITS, K = 6, 3, 8, 32, 4


def _setup(seed=0):
    torch.manual_seed(seed)
    sae = build_sae(SAEConfig(d_in=D, n_units=N_UNITS, k=K, seed=seed))
    x = torch.randn(B, L, D) * 2 + 1
    sae.fit_normalizer(torch.randn(500, D) * 2 + 1)
    with torch.no_grad():
        sae.b_dec.normal_(0, 0.1)
    return sae.eval(), x


class MLP(torch.nn.Module):
    """Readout with per-example context (like a session embedding), two tasks."""

    def __init__(self, ctx):
        super().__init__()
        self.ctx = ctx  # [B, L*D]
        self.h = torch.nn.Linear(L * D, 16)
        self.a = torch.nn.Linear(16, 5)
        self.b = torch.nn.Linear(L * D, 2)

    def forward(self, z):
        flat = z.reshape(z.shape[0], -1)
        ctx = tile_rows(self.ctx, z.shape[0] // self.ctx.shape[0])
        return {"direction": self.a(torch.tanh(self.h(flat + ctx))), "genetic": self.b(flat)}


def _linear():
    lin = torch.nn.Linear(L * D, 4)
    return lambda z: lin(z.reshape(z.shape[0], -1))


def test_batched_ablation_equals_separate_runs():
    sae, x = _setup()
    mlp = MLP(torch.randn(B, L * D))
    m = 5
    with torch.no_grad():
        res = ablation_attribution(sae, x, mlp, m)
        acts = sae.encode(x)
        dirs = sae.unit_directions()
        full = mlp(x)
        for task in full:
            torch.testing.assert_close(res.logits[task], full[task], atol=1e-5, rtol=1e-5)
        for j in range(m):
            u = res.units[:, j]  # [B]
            c = acts[torch.arange(B), :, u][..., None] * dirs[u][:, None, :]  # [B, L, D]
            ab = mlp(x - c)
            for task in full:
                torch.testing.assert_close(
                    res.attributions[task][:, j], full[task] - ab[task], atol=1e-5, rtol=1e-5
                )
    # units are the most active ones (activation summed over tokens), most active first
    tot = acts.sum(1)
    assert torch.equal(res.units, tot.topk(m, -1).indices)
    assert (res.activations[:, :-1] >= res.activations[:, 1:]).all()


def test_ablation_without_terms_runs_fewer_rows_and_gives_the_same_attributions():
    sae, x = _setup(3)
    mlp = MLP(torch.randn(B, L * D))
    m = 5
    rows = []

    def readout(z):
        rows.append(z.shape[0])
        return mlp(z)

    with torch.no_grad():
        full = ablation_attribution(sae, x, readout, m)
        lean = ablation_attribution(sae, x, readout, m, terms=False)
    assert rows == [(m + 3) * B, (m + 1) * B]
    assert lean.terms == {} and set(full.terms) == {"direction", "genetic"}
    assert torch.equal(lean.units, full.units) and torch.equal(lean.activations, full.activations)
    for task in ("direction", "genetic"):
        torch.testing.assert_close(lean.logits[task], full.logits[task], atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(
            lean.attributions[task], full.attributions[task], atol=1e-6, rtol=1e-6
        )


@pytest.mark.parametrize("method", ["ablation", "grad", "ig"])
def test_terms_add_up_to_logit(method):
    sae, x = _setup(1)
    mlp = MLP(torch.randn(B, L * D))
    res = attribute(sae, x, mlp, 4, method)
    assert res.method == method
    for task in ("direction", "genetic"):
        torch.testing.assert_close(res.total(task), res.logits[task], atol=1e-5, rtol=1e-5)


def test_linear_readout_methods_agree_and_rest_is_other_units():
    sae, x = _setup(2)
    f = _linear()
    m = N_UNITS  # every unit: nothing is left outside the top M
    ex = attribute(sae, x, f, m, "ablation")
    gr = attribute(sae, x, f, m, "grad")
    ig = attribute(sae, x, f, m, "ig", n_steps=4)
    a = ex.attributions["logits"]
    torch.testing.assert_close(gr.attributions["logits"], a, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(ig.attributions["logits"], a, atol=1e-5, rtol=1e-4)
    assert ex.terms["logits"]["rest"].abs().max() < 1e-5
    assert ig.terms["logits"]["residual"].abs().max() < 1e-5
    # the error and bias parts match across methods for a linear readout
    torch.testing.assert_close(
        gr.terms["logits"]["error"], ex.terms["logits"]["error"], atol=1e-5, rtol=1e-4
    )
    torch.testing.assert_close(
        gr.terms["logits"]["bias"] + gr.terms["logits"]["offset"],
        ex.terms["logits"]["bias"],
        atol=1e-5,
        rtol=1e-4,
    )
    # with fewer units, "rest" is exactly the other units' contribution
    ex3 = attribute(sae, x, f, 3, "ablation")
    other = a.sum(1) - ex3.attributions["logits"].sum(1)
    torch.testing.assert_close(ex3.terms["logits"]["rest"], other, atol=1e-5, rtol=1e-4)
    ag = agreement(a[..., 0], gr.attributions["logits"][..., 0])
    assert ag["pearson"] > 0.9999 and ag["top1"] == 1.0 and ag["rel_error"] < 1e-4


def test_compare_methods_nonlinear():
    sae, x = _setup(3)
    mlp = MLP(torch.randn(B, L * D) * 0.1)
    rep = compare_methods(sae, x, mlp, 4, n_steps=16)
    assert set(rep) == {"direction", "genetic"}
    for meth in ("grad", "ig"):
        r = rep["direction"][meth]
        assert set(r) == {"pearson", "spearman", "top1", "sign", "rel_error"}
        assert np.isfinite(r["pearson"]) and r["pearson"] > 0.5
    # genetic head is linear: both cheap methods are exact there
    assert rep["genetic"]["grad"]["rel_error"] < 1e-4


def test_ablation_attribution_exports_to_onnx(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    sae, x = _setup(4)
    mlp = MLP(torch.randn(B, L * D)).eval()

    class Explain(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.sae, self.mlp = sae, mlp

        def forward(self, z):
            r = ablation_attribution(self.sae, z, self.mlp, 4)
            t = "direction"
            return (
                r.logits[t],
                r.units,
                r.activations,
                r.attributions[t],
                r.terms[t]["error"],
                r.terms[t]["bias"],
                r.terms[t]["rest"],
            )

    path = tmp_path / "explain.onnx"
    with torch.no_grad():
        torch.onnx.export(Explain().eval(), (x,), str(path), dynamo=True)
        ref = Explain()(x)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})
    for g, r in zip(got, ref, strict=True):
        np.testing.assert_allclose(g, r.numpy(), atol=1e-4, rtol=1e-4)
