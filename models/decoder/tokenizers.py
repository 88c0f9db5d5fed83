"""Tokenizers: a causal window of dF/F ``[frames, cells]`` -> input tokens (numpy only).

Both tokenizers share one interface, so training, evaluation and the online service (which holds
numpy ring buffers and no torch) build the same tokens:

- ``poyo``: one token per (frame, cell) as in POYO+: value ``[1]`` (the dF/F sample), the cell's
  unit index, and the frame's time. Cost grows with frames x cells.
- ``patch``: one token per cell carrying its recent frames: the window is cut into
  ``patch_samples`` equal bins, each bin holds the mean of the cell's frames inside it (empty bins
  are filled from the nearest earlier bin, or the first filled bin), so 16 Hz and 30 Hz data give
  tokens of the same size. The token's time is the window end.

Times are relative to the window start: a window ending at ``end_time`` covers
``(end_time - window_s, end_time]`` and its tokens have times in ``(0, window_s]``. Frames after
``end_time`` are dropped here, so a decoder fed by a tokenizer never sees the future.

`collate` pads a list of tokenized windows into a batch: ``values [B, N, V]`` float32,
``unit_index [B, N]`` int64, ``timestamps [B, N]`` float32, ``mask [B, N]`` bool (True = real
token) and ``session_index [B]`` int64. Padded tokens have mask False, unit index 0 and value 0.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

_EPS = 1e-6


def _select_frames(
    window: np.ndarray, frame_times: np.ndarray, end_time: float, window_s: float
) -> tuple[np.ndarray, np.ndarray]:
    """Frames with times in ``(end_time - window_s, end_time]``; times relative to window start."""
    window = np.asarray(window, dtype=np.float32)
    if window.ndim != 2:
        raise ValueError(f"window must be [frames, cells], got shape {window.shape}")
    t = np.asarray(frame_times, dtype=np.float64)
    if t.shape != (window.shape[0],):
        raise ValueError(f"frame_times has shape {t.shape}, window has {window.shape[0]} frames")
    rel = t - (float(end_time) - window_s)
    keep = (rel > _EPS * window_s) & (rel <= window_s * (1 + _EPS))
    return window[keep], rel[keep]


class PatchTokenizer:
    """One token per cell: its window resampled to ``patch_samples`` bin means."""

    name = "patch"

    def __init__(self, window_s: float = 1.0, patch_samples: int = 16):
        self.window_s = float(window_s)
        self.patch_samples = int(patch_samples)

    @property
    def value_dim(self) -> int:
        return self.patch_samples

    def n_tokens(self, n_frames: int, n_cells: int) -> int:
        return n_cells

    def tokenize(
        self,
        window: np.ndarray,
        frame_times: np.ndarray,
        end_time: float,
        unit_index: np.ndarray,
    ) -> dict[str, np.ndarray]:
        x, rel = _select_frames(window, frame_times, end_time, self.window_s)
        n_cells = int(np.asarray(window).shape[1])
        p = self.patch_samples
        values = np.zeros((n_cells, p), dtype=np.float32)
        if x.shape[0]:
            w = self.window_s / p
            bins = np.clip(np.ceil(rel / w - _EPS).astype(np.int64) - 1, 0, p - 1)
            onehot = np.zeros((p, bins.size), dtype=np.float32)
            onehot[bins, np.arange(bins.size)] = 1.0
            sums = onehot @ x  # [P, cells]: sum of the frames in each bin
            counts = np.bincount(bins, minlength=p)
            filled = counts > 0
            # index of the nearest filled bin at or before each bin (first filled bin before it)
            idx = np.where(filled, np.arange(p), -1)
            idx = np.maximum.accumulate(idx)
            idx[idx < 0] = int(np.argmax(filled))
            means = sums[filled] / counts[filled][:, None]
            lookup = np.cumsum(filled) - 1  # position of each filled bin among the filled ones
            values = means[lookup[idx]].T.astype(np.float32)
        return {
            "values": values,
            "unit_index": np.asarray(unit_index, dtype=np.int64).reshape(n_cells),
            "timestamps": np.full(n_cells, self.window_s, dtype=np.float32),
        }


class PoyoTokenizer:
    """One token per (frame, cell): value, unit index, frame time."""

    name = "poyo"

    def __init__(self, window_s: float = 1.0, patch_samples: int | None = None):
        self.window_s = float(window_s)

    @property
    def value_dim(self) -> int:
        return 1

    def n_tokens(self, n_frames: int, n_cells: int) -> int:
        return n_frames * n_cells

    def tokenize(
        self,
        window: np.ndarray,
        frame_times: np.ndarray,
        end_time: float,
        unit_index: np.ndarray,
    ) -> dict[str, np.ndarray]:
        x, rel = _select_frames(window, frame_times, end_time, self.window_s)
        n_cells = int(np.asarray(window).shape[1])
        unit_index = np.asarray(unit_index, dtype=np.int64).reshape(n_cells)
        if x.shape[0] == 0:  # nothing in the window yet: one zero token per cell at the end
            x = np.zeros((1, n_cells), dtype=np.float32)
            rel = np.array([self.window_s])
        n_f = x.shape[0]
        return {
            "values": x.reshape(n_f * n_cells, 1).astype(np.float32),
            "unit_index": np.tile(unit_index, n_f),
            "timestamps": np.repeat(rel.astype(np.float32), n_cells),
        }


Tokenizer = PatchTokenizer | PoyoTokenizer

TOKENIZERS = {"patch": PatchTokenizer, "poyo": PoyoTokenizer}


def get_tokenizer(name: str, *, window_s: float = 1.0, patch_samples: int = 16) -> Tokenizer:
    """The tokenizer called ``name`` (``patch`` or ``poyo``)."""
    try:
        cls = TOKENIZERS[name]
    except KeyError:
        raise ValueError(f"unknown tokenizer '{name}' (known: {', '.join(TOKENIZERS)})") from None
    return cls(window_s=window_s, patch_samples=patch_samples)


def tokenizer_for(config) -> Tokenizer:
    """The tokenizer a `DecoderConfig` names, with its window and patch size."""
    return get_tokenizer(
        config.tokenizer, window_s=config.window_s, patch_samples=config.patch_samples
    )


def collate(
    samples: Sequence[dict[str, np.ndarray]],
    session_index: Sequence[int] | np.ndarray,
    *,
    keep: Sequence[np.ndarray | None] | None = None,
    pad_to: int | None = None,
) -> dict[str, np.ndarray]:
    """Pad tokenized windows into one batch (see module docstring for the keys).

    ``keep`` optionally gives, per sample, a boolean array over its tokens (False = drop, e.g.
    unit dropout). ``pad_to`` pads to at least that many tokens (fixed shapes for export).
    """
    b = len(samples)
    if b == 0:
        raise ValueError("empty batch")
    if keep is not None:
        samples = [
            s if k is None else {key: v[k] for key, v in s.items()}
            for s, k in zip(samples, keep, strict=True)
        ]
    n = max(int(s["unit_index"].shape[0]) for s in samples)
    n = max(n, int(pad_to or 0), 1)
    v = int(samples[0]["values"].shape[1])
    values = np.zeros((b, n, v), dtype=np.float32)
    unit_index = np.zeros((b, n), dtype=np.int64)
    timestamps = np.zeros((b, n), dtype=np.float32)
    mask = np.zeros((b, n), dtype=bool)
    for i, s in enumerate(samples):
        k = int(s["unit_index"].shape[0])
        values[i, :k] = s["values"]
        unit_index[i, :k] = s["unit_index"]
        timestamps[i, :k] = s["timestamps"]
        mask[i, :k] = True
    return {
        "values": values,
        "unit_index": unit_index,
        "timestamps": timestamps,
        "mask": mask,
        "session_index": np.asarray(session_index, dtype=np.int64).reshape(b),
    }
