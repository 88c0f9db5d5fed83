"""Training on a planted sparse dictionary; AuxK; metrics; spliced evaluation; ONNX export."""

import pytest
import torch

from models.sae import SAEConfig, SAETrainConfig, SplicedEval, build_sae, sae_metrics, train_sae
from models.sae.metrics import latent_mean
from tests.models.sae.planted import planted_data


def _recovery(dic, sae):
    return (dic @ sae.W_dec.detach().T).max(1).values


@pytest.mark.parametrize(
    ("arch", "min_recovered", "max_fvu"), [("topk", 0.9, 0.2), ("batchtopk", 0.6, 0.3)]
)
def test_recovers_planted_dictionary(arch, min_recovered, max_fvu):
    dic, x = planted_data()  # 128 atoms in 32 dims, 4 active per token
    cfg = SAEConfig(architecture=arch, d_in=32, n_units=256, k=4)
    tc = SAETrainConfig(steps=600, batch_size=256, lr=1e-2, warmup_steps=20)
    sae, hist = train_sae(x, cfg, tc)
    assert sae.cfg.train == tc and not sae.training
    rec = _recovery(dic, sae)
    m = sae_metrics(sae, x)
    print(f"{arch}: recovered {(rec > 0.9).float().mean():.3f}, fvu {m.fvu:.3f}, l0 {m.l0:.2f}")
    assert (rec > 0.9).float().mean() >= min_recovered
    assert m.fvu < max_fvu
    assert abs(m.l0 - 4) < (1e-6 if arch == "topk" else 0.5)
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(256))
    assert hist.fvu[-1] < hist.fvu[0]


def test_auxk_revives_units_topk_never_selects():
    # half of the units start with a tiny encoder: they never win the top-k, get no gradient
    # from the reconstruction and stay dead; AuxK trains them on the residual and revives them
    dic, x = planted_data(n_atoms=256, n=10000)
    dead = {}
    for aux in (1 / 32, 0.0):
        cfg = SAEConfig(architecture="topk", d_in=32, n_units=128, k=4, aux_coeff=aux)
        sae = build_sae(cfg)
        sae.fit_normalizer(x)
        with torch.no_grad():
            sae.W_enc[:, 64:] *= 1e-3
        tc = SAETrainConfig(
            steps=250, batch_size=512, lr=3e-3, warmup_steps=20, dead_after_tokens=2000
        )
        sae, _ = train_sae(x, cfg, tc, init=sae, fit_normalizer=False)
        dead[aux] = sae_metrics(sae, x).dead_fraction
    print("dead fraction with / without AuxK:", dead)
    assert dead[0.0] >= 0.4
    assert dead[1 / 32] <= 0.1


def test_relu_l1_is_sparse():
    _, x = planted_data(n=5000)
    tc = SAETrainConfig(steps=150, batch_size=256, lr=3e-3, warmup_steps=10, l1_warmup_steps=50)
    res = {}
    for l1 in (0.03, 0.1):
        cfg = SAEConfig(architecture="relu", d_in=32, n_units=128, l1_coeff=l1)
        res[l1] = sae_metrics(train_sae(x, cfg, tc)[0], x)
    assert res[0.03].l0 < 0.4 * 128 and res[0.03].fvu < 0.3
    assert res[0.1].l0 < 0.5 * res[0.03].l0  # a stronger penalty gives a sparser code


def test_metrics_values():
    _, x = planted_data(n=3000)
    sae = build_sae(SAEConfig(d_in=32, n_units=64, k=4))
    sae.fit_normalizer(x)
    with torch.no_grad():
        sae.b_enc[:8] = -1e3  # 8 units can never fire
        sae.b_enc[8:10] = 1e3  # 2 units always win the top-k
    m = sae_metrics(sae, x, batch_size=700)
    out = sae(x)
    fvu = out.error.double().pow(2).sum() / (x.double() - x.double().mean(0)).pow(2).sum()
    assert m.fvu == pytest.approx(fvu.item(), rel=1e-4)
    assert m.l0 == pytest.approx(4.0)
    assert m.dead_fraction >= 8 / 64
    assert m.dense_fraction == pytest.approx(2 / 64)
    assert set(m.to_dict()) >= {"l0", "fvu", "dead_fraction", "dense_fraction"}


def test_spliced_eval_recovered():
    torch.manual_seed(0)
    b, n_tok, d = 64, 4, 32
    _, x = planted_data(n=b * n_tok)
    x = x.reshape(b, n_tok, d)
    head = torch.nn.Linear(n_tok * d, 5)
    readout = lambda z: {"direction": head(z.reshape(z.shape[0], -1))}  # noqa: E731
    y = readout(x)["direction"].argmax(-1)
    y[:3] = -1  # unlabelled examples are ignored
    sae = build_sae(SAEConfig(d_in=d, n_units=64, k=4))
    sae.fit_normalizer(x)
    ev = SplicedEval(sae, latent_mean(x))
    ev.update(x[:32], readout, {"direction": y[:32], "absent_task": y[:32]})
    ev.update(x[32:], readout, {"direction": y[32:]})
    r = ev.result()["direction"]
    assert r["plain"]["accuracy"] == 1.0 and r["plain"]["n"] == 61
    assert r["mean_ablation"]["accuracy"] < 0.6
    a = r["accuracy_recovered"]
    assert a == pytest.approx(
        (r["sae"]["accuracy"] - r["mean_ablation"]["accuracy"])
        / (r["plain"]["accuracy"] - r["mean_ablation"]["accuracy"])
    )
    assert "absent_task" not in ev.result()


@pytest.mark.parametrize("arch", ["topk", "batchtopk"])
def test_onnx_export_inference_path(arch, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    sae = build_sae(SAEConfig(architecture=arch, d_in=16, n_units=64, k=4))
    x = torch.randn(200, 16)
    sae.fit_normalizer(x)
    if arch == "batchtopk":
        sae.threshold.fill_(0.5)
    sae.eval()

    class Wrap(torch.nn.Module):
        def __init__(self, s):
            super().__init__()
            self.s = s

        def forward(self, z):
            o = self.s(z)
            return o.recon, o.acts

    xb = x.reshape(10, 20, 16)
    path = tmp_path / "sae.onnx"
    torch.onnx.export(
        Wrap(sae).eval(),
        (xb,),
        str(path),
        dynamo=True,
        dynamic_shapes={"z": {0: torch.export.Dim("batch")}},
    )
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x2 = torch.randn(3, 20, 16)
    recon, acts = sess.run(None, {sess.get_inputs()[0].name: x2.numpy()})
    o = sae(x2)
    torch.testing.assert_close(torch.from_numpy(recon), o.recon, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(torch.from_numpy(acts), o.acts, atol=1e-5, rtol=1e-4)


def test_collect_latents_and_train_on_token_grid():
    from models.sae import collect_latents

    batches = [torch.randn(5, 3, 8) for _ in range(4)]
    z = collect_latents(lambda b: b * 2, batches, max_tokens=40)
    assert z.shape == (40, 8)
    torch.testing.assert_close(z[:15], batches[0].reshape(15, 8) * 2)
    cfg = SAEConfig(d_in=8, n_units=16, k=2)
    sae, hist = train_sae(torch.randn(20, 3, 8), cfg, SAETrainConfig(steps=3, batch_size=16))
    assert len(hist.step) == 2 and sae.encode(torch.randn(2, 3, 8)).shape == (2, 3, 16)
    with pytest.raises(ValueError, match="differs"):
        train_sae(torch.randn(20, 8), cfg.model_copy(update={"k": 3}), init=sae)
