"""End-to-end (KL + FVU) fine-tune of an SAE through a frozen host readout."""

import json

import pytest
import torch

from models.sae import (
    SAEConfig,
    SAETrainConfig,
    finetune_sae_e2e,
    load_sae,
    output_kl,
    sae_metrics,
    train_sae,
)
from models.sae.train import e2e_lr_factor
from tests.models.sae.planted import planted_data


def _host(d=32, n=4000, tokens=2, seed=3):
    """Latents [n, tokens, d]: a planted sparse code (what reconstruction fits) plus a weak,
    dense signal along one direction that the host's readout amplifies (what it reads)."""
    g = torch.Generator().manual_seed(seed)
    _, x = planted_data(d=d, n=n * tokens, seed=seed)
    u = torch.randn(d, generator=g)
    u /= u.norm()
    s = torch.randn(n * tokens, generator=g) * 0.15
    z = (x + s[:, None] * u).reshape(n, tokens, d)
    head = torch.nn.Linear(d, 4)
    with torch.no_grad():
        head.weight.copy_(torch.outer(torch.tensor([-3.0, -1.0, 1.0, 3.0]), u) * 8)
        head.bias.zero_()
    head.requires_grad_(False)

    def readout(zz, idx):
        return {"task": head(zz.mean(1))}

    return z, readout, head


def _kl(sae, z, readout):
    with torch.no_grad():
        idx = torch.arange(z.shape[0])
        return output_kl(readout(z, idx), readout(sae.splice(z), idx)).item()


def test_output_kl():
    a = {"t": torch.randn(5, 3), "u": torch.randn(5, 2)}
    assert output_kl(a, a).item() == pytest.approx(0.0, abs=1e-6)
    b = {"t": a["t"] + torch.randn(5, 3), "u": a["u"]}
    assert output_kl(a, b).item() > 1e-3
    with pytest.raises(ValueError):
        output_kl(a, {"v": a["t"]})


@pytest.mark.parametrize("arch", ["topk", "batchtopk"])
def test_e2e_finetune_lowers_kl_keeps_sparsity(arch):
    torch.manual_seed(0)
    z, readout, head = _host(n=2000)
    w_head = head.weight.clone()
    cfg = SAEConfig(architecture=arch, d_in=32, n_units=128, k=4)
    tc = SAETrainConfig(steps=300, batch_size=512, lr=1e-2, warmup_steps=20)
    sae, _ = train_sae(z, cfg, tc)
    kl0, fvu0 = _kl(sae, z, readout), sae_metrics(sae, z).fvu
    tc2 = tc.model_copy(update={"e2e_steps": 100, "e2e_batch_size": 128, "e2e_lr": 3e-3})
    sae, hist = finetune_sae_e2e(sae, z, readout, tc2, log_every=10)
    kl1, m1 = _kl(sae, z, readout), sae_metrics(sae, z)
    print(f"{arch}: KL {kl0:.4f} -> {kl1:.4f}, FVU {fvu0:.4f} -> {m1.fvu:.4f}, L0 {m1.l0:.2f}")
    assert kl1 < 0.5 * kl0  # reconstruction-only training leaves it at ~kl0 (e2e_kl_coeff=0)
    assert m1.fvu < fvu0 + 0.1  # the reconstruction term keeps the SAE a reconstruction
    assert abs(m1.l0 - 4) < (1e-6 if arch == "topk" else 0.6)
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(128))
    torch.testing.assert_close(head.weight, w_head)  # the host is frozen
    assert not sae.training and sae.cfg.train == tc2
    assert len(hist.kl) == len(hist.step) > 0 and hist.step[-1] == 99


def test_train_sae_runs_e2e_phase_and_saves_config(tmp_path):
    z, readout, _ = _host(n=1000)
    cfg = SAEConfig(d_in=32, n_units=64, k=4)
    tc = SAETrainConfig(steps=50, batch_size=256, warmup_steps=5, e2e_steps=20, e2e_batch_size=64)
    with pytest.raises(ValueError, match="readout"):
        train_sae(z, cfg, tc)
    sae, hist = train_sae(z, cfg, tc, readout=readout, log_every=10)
    assert hist.step[-1] == 50 + 19 and len(hist.kl) == len(hist.step)
    sae.save(tmp_path / "sae")
    assert load_sae(tmp_path / "sae").cfg.train.e2e_steps == 20


def test_old_cfg_json_without_e2e_fields_loads(tmp_path):
    sae, _ = train_sae(
        torch.randn(300, 8), SAEConfig(d_in=8, n_units=16, k=2), SAETrainConfig(steps=3)
    )
    sae.save(tmp_path / "sae")
    p = tmp_path / "sae" / "cfg.json"
    raw = json.loads(p.read_text())
    for key in list(raw["train"]):
        if key.startswith("e2e_"):
            del raw["train"][key]
    p.write_text(json.dumps(raw))
    assert load_sae(tmp_path / "sae").cfg.train.e2e_steps == 0


def test_e2e_lr_schedule():
    tc = SAETrainConfig(steps=1000, warmup_steps=100, decay_fraction=0.2, e2e_steps=100)
    f = [e2e_lr_factor(s, tc) for s in range(100)]
    assert f[0] == pytest.approx(0.1) and f[9] == 1.0  # warm-up: a tenth of the e2e steps
    assert f[50] == 1.0 and f[99] == pytest.approx(1 / 20) and f[90] < f[80]
