"""SAE architectures, registry, config/weights round trip, normalisation and splicing."""

import json

import pytest
import torch

from models.config import ConfigError
from models.sae import (
    BatchTopKSAE,
    ReLUSAE,
    SAEConfig,
    SAETrainConfig,
    TopKSAE,
    available_architectures,
    build_sae,
    get_sae_class,
    load_sae,
    register_sae,
)
from models.sae.batchtopk import batch_topk_sparsify
from models.sae.train import lr_factor

ARCHS = ["topk", "batchtopk", "relu"]


def _fitted(arch, d=8, n=32, k=3, seed=0):
    sae = build_sae(SAEConfig(architecture=arch, d_in=d, n_units=n, k=k, seed=seed))
    x = torch.randn(500, d) * 3 + 5
    sae.fit_normalizer(x)
    if arch == "batchtopk":
        from models.sae import calibrate_threshold

        calibrate_threshold(sae, x, batch_size=100)
    return sae.eval(), x


def test_registry():
    assert set(ARCHS) <= set(available_architectures())
    assert get_sae_class("topk") is TopKSAE
    assert get_sae_class("batchtopk") is BatchTopKSAE
    assert get_sae_class("relu") is ReLUSAE
    with pytest.raises(KeyError, match="unknown SAE architecture 'gated'"):
        get_sae_class("gated")
    with pytest.raises(ValueError, match="already registered"):
        register_sae("topk")(ReLUSAE)


def test_config_validation(tmp_path):
    with pytest.raises(ValueError, match="exceeds n_units"):
        SAEConfig(d_in=4, n_units=8, k=9)
    p = tmp_path / "cfg.json"
    p.write_text(json.dumps({"d_in": 4, "n_units": 8, "typo": 1}))
    with pytest.raises(ConfigError, match="typo"):
        SAEConfig.load(p)
    assert SAEConfig(d_in=64, n_units=8, k=4).effective_aux_k == 8
    assert SAEConfig(d_in=6, n_units=80).effective_aux_k == 3


@pytest.mark.parametrize("arch", ARCHS)
def test_save_load_round_trip(arch, tmp_path):
    sae, x = _fitted(arch)
    with torch.no_grad():
        sae.b_enc.normal_()
    sae.save(tmp_path / "s")
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == ["cfg.json", "sae.safetensors"]
    loaded = load_sae(tmp_path / "s")
    assert type(loaded) is type(sae) and loaded.cfg == sae.cfg
    a, b = sae(x), loaded(x)
    for t1, t2 in zip(a, b, strict=True):
        assert torch.equal(t1, t2)
    again = load_sae(cfg_path=tmp_path / "s/cfg.json", weights_path=tmp_path / "s/sae.safetensors")
    assert torch.equal(again.encode(x), a.acts)
    with pytest.raises(FileNotFoundError):
        load_sae(tmp_path / "missing")


def test_normalizer_and_bias_init():
    sae = build_sae(SAEConfig(d_in=6, n_units=12, k=2))
    x = torch.randn(4000, 6) * 2 + torch.arange(6.0)
    sae.fit_normalizer(x)
    xn = sae.normalize(x)
    assert xn.mean(0).abs().max() < 1e-4
    assert abs(xn.pow(2).sum(-1).mean().item() - 6) < 1e-3
    assert sae.b_dec.abs().max() < 1e-4  # centred data: data mean in normalised space is 0
    torch.testing.assert_close(sae.denormalize(xn), x, atol=1e-5, rtol=1e-5)
    # without centring, the decoder bias starts at the (scaled) data mean
    nc = build_sae(SAEConfig(d_in=6, n_units=12, k=2, center_input=False))
    nc.fit_normalizer(x)
    assert nc.input_mean.abs().max() == 0
    torch.testing.assert_close(nc.b_dec, x.mean(0) * nc.input_scale, atol=1e-4, rtol=1e-4)
    assert abs(nc.normalize(x).pow(2).sum(-1).mean().item() - 6) < 1e-3


@pytest.mark.parametrize("arch", ARCHS)
def test_decomposition_and_splice(arch):
    sae, x = _fitted(arch)
    x = x.reshape(50, 10, 8)  # [B, L, D] latent tokens
    out = sae(x)
    assert out.acts.shape == (50, 10, 32) and out.recon.shape == x.shape
    rebuilt = sae.bias_vector() + out.acts @ sae.unit_directions() + out.error
    torch.testing.assert_close(rebuilt, x, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(sae.splice(x, with_error=True), x, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(sae.splice(x), out.recon)
    if arch == "topk":
        assert ((out.acts > 0).sum(-1) <= 3).all()


def test_batchtopk_train_vs_inference():
    sae, x = _fitted("batchtopk")
    pre = sae.pre_activations(x[:100])
    acts = batch_topk_sparsify(pre, 3)
    assert (acts > 0).sum() == 300  # exactly k * N in the batch
    assert (acts > 0).float().sum(-1).std() > 0  # but varying per token
    thr = sae.threshold.item()
    assert thr > 0
    inf = sae.encode(x)
    assert torch.equal(inf > 0, pre_all := sae.pre_activations(x) > thr) and pre_all.any()
    # inference is per token: independent of the rest of the batch
    assert torch.equal(sae.encode(x[:7]), inf[:7])
    assert abs((inf > 0).float().sum(-1).mean().item() - 3) < 1.0


def test_decoder_constraints():
    sae, x = _fitted("topk")
    xn = sae.normalize(x)
    sae.train()
    sae.training_step(xn).loss.backward()
    sae.project_decoder_grad()
    par = (sae.W_dec.grad * sae.W_dec).sum(1)
    assert par.abs().max() < 1e-6
    with torch.no_grad():
        sae.W_dec.mul_(3.0)
    sae.normalize_decoder()
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(32))


def test_lr_schedule():
    tc = SAETrainConfig(steps=100, warmup_steps=10, decay_fraction=0.2)
    f = [lr_factor(s, tc) for s in range(100)]
    assert f[0] == pytest.approx(0.1) and f[9] == 1.0 and f[50] == 1.0
    assert f[80] == 1.0 and f[90] == pytest.approx(0.5) and f[99] == pytest.approx(0.05)
