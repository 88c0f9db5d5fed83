from __future__ import annotations

import numpy as np
import pytest

from models.decoder.tokenizers import collate, get_tokenizer


def _window(n_frames: int, n_cells: int, fs: float, seed: int = 0):
    rng = np.random.default_rng(seed)
    t = 10.0 + np.arange(n_frames) / fs
    return rng.normal(size=(n_frames, n_cells)).astype(np.float32), t


@pytest.mark.parametrize("fs", [16.0, 30.0])
@pytest.mark.parametrize("n_cells", [1, 5, 64])
def test_patch_shapes(fs, n_cells):
    tok = get_tokenizer("patch", window_s=1.0, patch_samples=16)
    x, t = _window(int(fs) + 3, n_cells, fs)
    out = tok.tokenize(x, t, t[-1], np.arange(n_cells) + 7)
    assert out["values"].shape == (n_cells, 16)
    assert out["values"].dtype == np.float32
    assert out["unit_index"].tolist() == list(range(7, 7 + n_cells))
    np.testing.assert_allclose(out["timestamps"], 1.0)
    assert np.isfinite(out["values"]).all()


def test_patch_at_16hz_is_the_frames_themselves():
    tok = get_tokenizer("patch", window_s=1.0, patch_samples=16)
    x, t = _window(16, 3, 16.0)
    out = tok.tokenize(x, t, t[-1], np.arange(3))
    np.testing.assert_allclose(out["values"], x.T, rtol=1e-6)


def test_patch_fills_empty_bins_from_available_frames():
    tok = get_tokenizer("patch", window_s=1.0, patch_samples=16)
    x, t = _window(4, 2, 16.0)  # only the last 4 frames of the window exist
    out = tok.tokenize(x, t, t[-1], np.arange(2))
    np.testing.assert_allclose(out["values"][:, -4:], x.T, rtol=1e-6)
    np.testing.assert_allclose(out["values"][:, :12], np.repeat(x[:1].T, 12, axis=1), rtol=1e-6)


@pytest.mark.parametrize("fs", [16.0, 30.0])
def test_poyo_shapes(fs):
    tok = get_tokenizer("poyo", window_s=1.0)
    x, t = _window(40, 5, fs)
    out = tok.tokenize(x, t, t[-1], np.arange(5))
    n_f = int(np.sum(t > t[-1] - 1.0 + 1e-9))
    assert out["values"].shape == (n_f * 5, 1)
    assert out["unit_index"].shape == (n_f * 5,)
    ts = out["timestamps"]
    assert ts.min() > 0 and ts.max() == pytest.approx(1.0)
    np.testing.assert_allclose(out["values"][-5:, 0], x[-1])


@pytest.mark.parametrize("name", ["patch", "poyo"])
def test_tokenizer_ignores_frames_after_end(name):
    tok = get_tokenizer(name, window_s=1.0)
    x, t = _window(48, 4, 16.0)
    end = t[30]
    a = tok.tokenize(x, t, end, np.arange(4))
    x2 = x.copy()
    x2[31:] += 100.0
    b = tok.tokenize(x2, t, end, np.arange(4))
    c = tok.tokenize(x[:31], t[:31], end, np.arange(4))
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
        np.testing.assert_array_equal(a[k], c[k])


def test_get_tokenizer_unknown():
    with pytest.raises(ValueError, match="unknown tokenizer"):
        get_tokenizer("nope")


@pytest.mark.parametrize("name", ["patch", "poyo"])
def test_collate_pads_and_masks(name):
    tok = get_tokenizer(name, window_s=1.0)
    samples = []
    for n in (3, 9):
        x, t = _window(16, n, 16.0)
        samples.append(tok.tokenize(x, t, t[-1], np.arange(n)))
    b = collate(samples, [0, 1])
    n_max = max(s["unit_index"].shape[0] for s in samples)
    assert b["values"].shape == (2, n_max, tok.value_dim)
    assert b["mask"].sum(1).tolist() == [s["unit_index"].shape[0] for s in samples]
    assert b["session_index"].tolist() == [0, 1]
    assert not b["values"][0, samples[0]["unit_index"].shape[0] :].any()
