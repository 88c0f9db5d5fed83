"""Allen Brain Observatory-like simulated sessions, with the ground truth that made them.

A session is one Cre line imaged at ~30 Hz while drifting gratings are shown: 8 directions x 5
temporal frequencies (1, 2, 4, 8, 15 Hz), 2 s of grating then 1 s of grey, in shuffled blocks
that hold every condition once (plus, by default, one blank sweep: grey, direction NaN).

Each cell (statistics per Cre line in `models.data.cre_lines`):

- is responsive to gratings with the line's probability; most cells are not (the largest class
  in the real data); unresponsive cells still fire spontaneously and carry all the noise;
- has von Mises direction tuning ``exp(kappa (cos(d - pref) - 1))``, orientation-selective cells
  with a second peak at ``pref + 180`` (ratio ``second_peak``), and log-Gaussian temporal
  frequency tuning around ``pref_tf``; its tuning is ``(1 - w) * own + w * shared``, where
  ``shared`` is one session-wide tuning curve; with their broad tuning and larger shared weight
  (w ~ 0.4-0.47 against 0.14-0.35) the inhibitory lines get the higher signal correlations of
  the Allen data (calibrated per line, see `models.data.cre_lines`);
- fires Poisson events at ``baseline + gain * tuning * trial_gain * profile(t)``, scaled by a slow
  session-wide state signal (arousal-like, coupling per cell), where ``trial_gain`` is
  gamma-distributed trial-to-trial variability and ``profile`` an onset transient after a 50 ms
  latency;
- turns events into calcium with GCaMP6f-like kinetics (difference of exponentials, rise ~50 ms,
  decay ~0.7 s, one `scipy.signal.lfilter` call over all cells of a chunk), then dF/F with read
  and shot noise and a slow baseline drift.

Everything is vectorised over cells and frames (cells are processed in chunks to bound memory):
1,000 cells x 1 h at 30 Hz takes seconds. Deterministic: the same ``(config, seed,
session_index)`` gives bit-identical traces, and session ``i`` of a corpus does not depend on how
many sessions the corpus has.
"""

from __future__ import annotations

import datetime as _dt
import json
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
from pydantic import Field, field_validator
from scipy.signal import lfilter

from models.config import Config
from models.data.cre_lines import CRE_LINE_NAMES, CreLine, cre_line
from models.data.recording import DataError, Recording, Trials
from models.tasks import DIRECTIONS_DEG, TEMPORAL_FREQUENCIES_HZ

SIMULATOR_VERSION = "1.0"
TRUTH_SUFFIX = ".truth.json"
_SESSION_EPOCH = _dt.datetime(2016, 1, 4, 9, 0, 0, tzinfo=_dt.UTC)
_CHUNK_VALUES = 1 << 22  # frames x cells simulated at once (~16 MB per float32 array)


class SimConfig(Config):
    """What one simulated session looks like. Defaults follow the Allen Brain Observatory."""

    n_cells: int = Field(200, ge=1, description="Cells (ROIs) in the session.")
    minutes: float = Field(10.0, gt=0, description="Length of the session.")
    frame_rate: float = Field(30.0, gt=0, description="Imaging frame rate (Hz).")
    cre_line: str | None = Field(
        None, description="Cre line of the session; None = drawn from the seed (balanced)."
    )
    grating_s: float = Field(2.0, gt=0, description="Duration of each grating.")
    grey_s: float = Field(1.0, ge=0, description="Grey screen after each grating.")
    lead_in_s: float = Field(2.0, ge=0, description="Grey screen before the first trial.")
    blank_sweeps_per_block: int = Field(
        1, ge=0, description="Blank sweeps (direction NaN) per block of 40 conditions."
    )
    frac_responsive: float | None = Field(
        None, ge=0, le=1, description="Override the Cre line's fraction of responsive cells."
    )
    tau_rise_s: float = Field(0.05, gt=0, description="Indicator rise time constant.")
    tau_decay_s: float = Field(0.7, gt=0, description="Indicator decay time constant.")
    latency_s: float = Field(0.05, ge=0, description="Response latency after grating onset.")
    onset_transient: float = Field(0.5, ge=0, description="Extra rate at onset (fraction).")
    adaptation_s: float = Field(0.3, gt=0, description="Decay time of the onset transient.")
    trial_cv: float = Field(0.4, ge=0, description="Trial-to-trial CV of the evoked gain.")
    noise_scale: float = Field(1.0, ge=0, description="Multiplies every cell's noise s.d.")
    shot_fraction: float = Field(
        0.5, ge=0, le=1, description="Share of the baseline noise variance that is shot noise."
    )
    drift_std: float = Field(0.02, ge=0, description="S.d. of the slow baseline drift (dF/F).")
    drift_timescale_s: float = Field(60.0, gt=0, description="Knot spacing of the drift.")
    state_timescale_s: float = Field(10.0, gt=0, description="Time constant of the state.")

    @field_validator("cre_line")
    @classmethod
    def _known_line(cls, v: str | None) -> str | None:
        if v is not None and v not in CRE_LINE_NAMES:
            raise ValueError(f"unknown Cre line '{v}' (known: {', '.join(CRE_LINE_NAMES)})")
        return v

    @property
    def n_frames(self) -> int:
        return max(1, int(round(self.minutes * 60.0 * self.frame_rate)))


# --------------------------------------------------------------------------------------------
# Ground truth


_CELL_FIELDS = (
    "responsive",
    "pref_direction",
    "kappa",
    "orientation_selective",
    "second_peak",
    "pref_tf",
    "tf_sigma_oct",
    "gain",
    "shared_weight",
    "baseline_rate",
    "spike_amp",
    "noise_std",
    "state_coupling",
)


@dataclass
class GroundTruth:
    """What was planted in one simulated session.

    Per cell (arrays of length N, in the order of ``unit_ids``): ``responsive`` (bool; the
    tuning fields of an unresponsive cell were drawn but have no effect, its ``gain`` is 0),
    ``pref_direction`` (degrees, the larger peak), ``kappa`` (von Mises concentration),
    ``orientation_selective`` (second peak at pref + 180), ``second_peak`` (its height relative
    to the first; 0 for direction-selective cells), ``pref_tf`` (Hz), ``tf_sigma_oct``,
    ``gain`` (evoked event rate at the preferred condition, Hz), ``shared_weight`` (weight of the
    session's shared tuning curve), ``baseline_rate`` (Hz), ``spike_amp`` (dF/F per event),
    ``noise_std`` (dF/F), ``state_coupling``.

    Per session: ``shared`` (the shared tuning curve: ``pref_direction``, ``kappa``,
    ``pref_tf``, ``tf_sigma_oct``), the Cre line and its class, seed, session index, the full
    config and the simulator version.
    """

    session_id: str
    subject_id: str
    cre_line: str
    cell_class: str
    seed: int
    session_index: int
    simulator_version: str
    config: dict
    shared: dict
    unit_ids: tuple[str, ...]
    responsive: np.ndarray
    pref_direction: np.ndarray
    kappa: np.ndarray
    orientation_selective: np.ndarray
    second_peak: np.ndarray
    pref_tf: np.ndarray
    tf_sigma_oct: np.ndarray
    gain: np.ndarray
    shared_weight: np.ndarray
    baseline_rate: np.ndarray
    spike_amp: np.ndarray
    noise_std: np.ndarray
    state_coupling: np.ndarray

    @property
    def n_cells(self) -> int:
        return len(self.unit_ids)

    def tuning_curves(
        self,
        directions=DIRECTIONS_DEG,
        temporal_frequencies=TEMPORAL_FREQUENCIES_HZ,
    ) -> np.ndarray:
        """Planted mean evoked event rate (Hz) per cell and condition, ``[N, n_dir, n_tf]``.

        Zero for unresponsive cells. Trial-to-trial variability, state, calcium and noise are
        not included: this is the signal that the traces carry.
        """
        d = np.asarray(directions, dtype=np.float64)
        f = np.asarray(temporal_frequencies, dtype=np.float64)
        own = (
            _direction_tuning(d, self.pref_direction, self.kappa, self.second_peak)[:, :, None]
            * _tf_tuning(f, self.pref_tf, self.tf_sigma_oct)[:, None, :]
        )
        sh = self.shared
        shared = (
            _direction_tuning(
                d, np.array([sh["pref_direction"]]), np.array([sh["kappa"]]), np.zeros(1)
            )[:, :, None]
            * _tf_tuning(f, np.array([sh["pref_tf"]]), np.array([sh["tf_sigma_oct"]]))[:, None, :]
        )
        w = self.shared_weight[:, None, None]
        return (self.gain[:, None, None] * ((1.0 - w) * own + w * shared)).astype(np.float64)

    def signal_correlations(self, only_responsive: bool = True) -> np.ndarray:
        """Pairwise signal correlations of the planted tuning curves (upper triangle, flat)."""
        curves = self.tuning_curves()
        if only_responsive:
            curves = curves[self.responsive]
        return signal_correlations(curves.reshape(curves.shape[0], -1))

    # -- JSON ---------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        out: dict = {
            "format": "cortexlens-sim-truth",
            "session_id": self.session_id,
            "subject_id": self.subject_id,
            "cre_line": self.cre_line,
            "cell_class": self.cell_class,
            "seed": self.seed,
            "session_index": self.session_index,
            "simulator_version": self.simulator_version,
            "config": self.config,
            "shared": self.shared,
            "cells": {"unit_id": list(self.unit_ids)},
        }
        for name in _CELL_FIELDS:
            out["cells"][name] = getattr(self, name).tolist()
        return out

    @classmethod
    def from_dict(cls, d: dict, *, source: str | Path | None = None) -> GroundTruth:
        try:
            cells = d["cells"]
            kw = {
                name: np.asarray(
                    cells[name],
                    dtype=bool if name in ("responsive", "orientation_selective") else np.float64,
                )
                for name in _CELL_FIELDS
            }
            truth = cls(
                session_id=str(d["session_id"]),
                subject_id=str(d["subject_id"]),
                cre_line=str(d["cre_line"]),
                cell_class=str(d["cell_class"]),
                seed=int(d["seed"]),
                session_index=int(d["session_index"]),
                simulator_version=str(d["simulator_version"]),
                config=dict(d["config"]),
                shared={k: float(v) for k, v in d["shared"].items()},
                unit_ids=tuple(str(u) for u in cells["unit_id"]),
                **kw,
            )
        except KeyError as e:
            raise DataError("missing key in ground truth", source=source, field=str(e)) from None
        except (TypeError, ValueError) as e:
            raise DataError(f"malformed ground truth ({e})", source=source) from None
        n = truth.n_cells
        for name in _CELL_FIELDS:
            if getattr(truth, name).shape != (n,):
                raise DataError(
                    f"has {getattr(truth, name).shape} values, expected {n}",
                    source=source,
                    field=f"cells.{name}",
                )
        return truth

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict()) + "\n")
        return path

    @classmethod
    def load(cls, path: str | Path) -> GroundTruth:
        path = Path(path)
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            raise DataError("no such ground-truth file", source=path) from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DataError(f"not valid JSON ({e})", source=path) from None
        if not isinstance(raw, dict) or raw.get("format") != "cortexlens-sim-truth":
            raise DataError("not a simulator ground-truth file", source=path, field="format")
        return cls.from_dict(raw, source=path)

    def equals(self, other: GroundTruth) -> bool:
        for f in fields(self):
            a, b = getattr(self, f.name), getattr(other, f.name)
            if isinstance(a, np.ndarray):
                if not np.array_equal(a, b):
                    return False
            elif a != b:
                return False
        return True


def truth_path(recording_path: str | Path) -> Path:
    """Where the ground truth of a written session lies: ``<dir>/<stem>.truth.json``."""
    p = Path(recording_path)
    return p.with_name(p.stem + TRUTH_SUFFIX)


def load_truth(recording_path: str | Path) -> GroundTruth:
    """The ground truth saved beside a simulated recording file."""
    return GroundTruth.load(truth_path(recording_path))


def signal_correlations(curves: np.ndarray) -> np.ndarray:
    """Pairwise Pearson correlations of mean-response vectors ``[N, n_conditions]`` (i < j)."""
    x = np.asarray(curves, dtype=np.float64)
    x = x - x.mean(axis=1, keepdims=True)
    norm = np.linalg.norm(x, axis=1)
    ok = norm > 0
    x = x[ok] / norm[ok, None]
    c = x @ x.T
    iu = np.triu_indices(c.shape[0], k=1)
    return c[iu]


# --------------------------------------------------------------------------------------------
# Tuning


def _direction_tuning(
    directions: np.ndarray, pref: np.ndarray, kappa: np.ndarray, second: np.ndarray
) -> np.ndarray:
    """Von Mises direction tuning, peak 1, ``[N, n_dir]``; a second peak at pref + 180."""
    delta = np.deg2rad(directions[None, :] - pref[:, None])
    k = kappa[:, None]
    first = np.exp(k * (np.cos(delta) - 1.0))
    opposite = np.exp(k * (np.cos(delta - np.pi) - 1.0))
    return first + second[:, None] * opposite


def _tf_tuning(tfs: np.ndarray, pref: np.ndarray, sigma_oct: np.ndarray) -> np.ndarray:
    """Log-Gaussian temporal-frequency tuning, peak 1, ``[N, n_tf]``."""
    z = (np.log2(tfs)[None, :] - np.log2(pref)[:, None]) / sigma_oct[:, None]
    return np.exp(-0.5 * z * z)


def _draw_pref_tf(rng: np.random.Generator, line: CreLine, n: int) -> np.ndarray:
    idx = rng.choice(len(TEMPORAL_FREQUENCIES_HZ), size=n, p=np.asarray(line.tf_pref_probs))
    jitter = rng.uniform(-0.25, 0.25, size=n)  # octaves
    return np.asarray(TEMPORAL_FREQUENCIES_HZ)[idx] * np.exp2(jitter)


# --------------------------------------------------------------------------------------------
# Session


def _seed_entropy(seed: int) -> int:
    return int(seed) % (1 << 64)  # negative seeds are allowed and distinct


def session_cre_line(seed: int, session_index: int) -> str:
    """The Cre line drawn for session ``session_index`` of seed ``seed``.

    Balanced: every consecutive run of 13 sessions (0-12, 13-25, ...) holds each line once, in a
    seeded order.
    """
    n = len(CRE_LINE_NAMES)
    rng = np.random.default_rng([_seed_entropy(seed), 0xC7E, session_index // n])
    return CRE_LINE_NAMES[int(rng.permutation(n)[session_index % n])]


def session_ids(seed: int, session_index: int) -> tuple[str, str]:
    """``(session_id, subject_id)`` of a simulated session."""
    return f"sim-s{seed}-{session_index:03d}", f"sim-mouse-s{seed}-{session_index:03d}"


def _trial_schedule(cfg: SimConfig, rng: np.random.Generator) -> Trials:
    period = cfg.grating_s + cfg.grey_s
    duration = cfg.n_frames / cfg.frame_rate
    n_trials = max(0, int(np.floor((duration - cfg.lead_in_s - cfg.grating_s) / period + 1e-9)) + 1)
    if cfg.lead_in_s + cfg.grating_s > duration + 1e-9:
        n_trials = 0
    conds = [(d, f) for d in DIRECTIONS_DEG for f in TEMPORAL_FREQUENCIES_HZ]
    conds += [(np.nan, np.nan)] * cfg.blank_sweeps_per_block
    order: list[tuple[float, float]] = []
    blocks: list[int] = []
    b = 0
    while len(order) < n_trials:
        perm = rng.permutation(len(conds))
        order.extend(conds[i] for i in perm)
        blocks.extend([b] * len(conds))
        b += 1
    order, blocks = order[:n_trials], blocks[:n_trials]
    start = cfg.lead_in_s + period * np.arange(n_trials, dtype=np.float64)
    return Trials.from_arrays(
        start=start,
        end=start + cfg.grating_s,
        direction=np.array([o[0] for o in order], dtype=np.float64),
        temporal_frequency=np.array([o[1] for o in order], dtype=np.float64),
        block=np.asarray(blocks, dtype=np.int64),
    )


def _draw_cells(
    cfg: SimConfig, line: CreLine, rng: np.random.Generator
) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    n = cfg.n_cells
    frac = line.frac_responsive if cfg.frac_responsive is None else cfg.frac_responsive
    responsive = rng.random(n) < frac
    pref_direction = rng.uniform(0.0, 360.0, size=n)
    kappa = line.kappa * np.exp(rng.normal(0.0, 0.4, size=n))
    orientation = rng.random(n) < line.p_orientation
    second_peak = np.where(orientation, rng.uniform(0.6, 1.0, size=n), 0.0)
    pref_tf = _draw_pref_tf(rng, line, n)
    tf_sigma = line.tf_sigma_oct * np.exp(rng.normal(0.0, 0.2, size=n))
    gain = line.peak_rate_hz * np.exp(rng.normal(0.0, 0.5, size=n))
    gain = np.where(responsive, gain, 0.0)
    shared_weight = np.clip(line.shared_weight + rng.normal(0.0, 0.05, size=n), 0.0, 0.95)
    shared_weight = np.where(responsive, shared_weight, 0.0)
    baseline = line.baseline_rate_hz * np.exp(rng.normal(0.0, 0.5, size=n))
    spike_amp = line.spike_amp * np.exp(rng.normal(0.0, 0.3, size=n))
    noise_std = line.noise_std * np.exp(rng.normal(0.0, 0.3, size=n))
    state = rng.normal(line.state_coupling * 0.5, line.state_coupling, size=n)
    shared = {
        "pref_direction": float(rng.uniform(0.0, 360.0)),
        "kappa": float(line.shared_kappa),
        "pref_tf": float(_draw_pref_tf(rng, line, 1)[0]),
        "tf_sigma_oct": float(line.tf_sigma_oct),
    }
    cells = {
        "responsive": responsive,
        "pref_direction": pref_direction,
        "kappa": kappa,
        "orientation_selective": orientation,
        "second_peak": second_peak,
        "pref_tf": pref_tf,
        "tf_sigma_oct": tf_sigma,
        "gain": gain,
        "shared_weight": shared_weight,
        "baseline_rate": baseline,
        "spike_amp": spike_amp,
        "noise_std": noise_std,
        "state_coupling": state,
    }
    return cells, shared


def _calcium_filter(cfg: SimConfig) -> tuple[np.ndarray, np.ndarray, float]:
    """``(b, a, kernel_sum)`` of a difference-of-exponentials kernel with peak 1."""
    g_d = np.exp(-1.0 / (cfg.tau_decay_s * cfg.frame_rate))
    g_r = np.exp(-1.0 / (cfg.tau_rise_s * cfg.frame_rate))
    if np.isclose(g_d, g_r):
        g_r = g_d * 0.5
    n = np.arange(int(20 * cfg.tau_decay_s * cfg.frame_rate) + 10)
    h = g_d**n - g_r**n
    peak = float(h.max())
    b = np.array([0.0, (g_d - g_r) / peak])
    a = np.array([1.0, -(g_d + g_r), g_d * g_r])
    return b, a, float(h.sum() / peak)


def _slow_state(cfg: SimConfig, rng: np.random.Generator, t: np.ndarray) -> np.ndarray:
    """A slow session-wide state signal (unit s.d., AR(1) with the configured time constant)."""
    rho = np.exp(-1.0 / (cfg.state_timescale_s * cfg.frame_rate))
    x = rng.standard_normal(t.shape[0]) * np.sqrt(1.0 - rho * rho)
    x[0] = rng.standard_normal()  # stationary from the first frame
    return lfilter([1.0], [1.0, -rho], x)


def simulate_session(
    cfg: SimConfig | None = None, *, seed: int = 0, session_index: int = 0
) -> tuple[Recording, GroundTruth]:
    """One simulated session and its ground truth. Deterministic in ``(cfg, seed, index)``."""
    cfg = cfg or SimConfig()
    if session_index < 0:
        raise DataError(f"must be >= 0, got {session_index}", field="session_index")
    line_name = cfg.cre_line or session_cre_line(seed, session_index)
    cfg = cfg.model_copy(update={"cre_line": line_name})
    line = cre_line(line_name)
    session_id, subject_id = session_ids(seed, session_index)
    unit_ids = tuple(f"{session_id}/cell{j:04d}" for j in range(cfg.n_cells))

    root = np.random.SeedSequence([_seed_entropy(seed), int(session_index)])
    r_cells, r_trials, r_var, r_state, r_noise, r_meta = (
        np.random.default_rng(s) for s in root.spawn(6)
    )
    cells, shared = _draw_cells(cfg, line, r_cells)
    trials = _trial_schedule(cfg, r_trials)
    truth = GroundTruth(
        session_id=session_id,
        subject_id=subject_id,
        cre_line=line.name,
        cell_class=line.cell_class,
        seed=int(seed),
        session_index=int(session_index),
        simulator_version=SIMULATOR_VERSION,
        config=cfg.to_dict(),
        shared=shared,
        unit_ids=unit_ids,
        **cells,
    )

    T, N, fs = cfg.n_frames, cfg.n_cells, cfg.frame_rate
    t = np.arange(T, dtype=np.float64) / fs

    # Evoked rate per (cell, trial): planted tuning x trial-to-trial gamma variability.
    n_trials = len(trials)
    dir_idx = np.searchsorted(np.asarray(DIRECTIONS_DEG), trials.direction)
    tf_idx = np.searchsorted(np.asarray(TEMPORAL_FREQUENCIES_HZ), trials.temporal_frequency)
    blank = ~np.isfinite(trials.direction)
    curves = truth.tuning_curves()  # [N, 8, 5], Hz
    amp = np.zeros((N, n_trials + 1), dtype=np.float64)  # last column: no trial
    if n_trials:
        ok = ~blank
        amp[:, :n_trials][:, ok] = curves[:, dir_idx[ok], tf_idx[ok]]
        if cfg.trial_cv > 0:
            k = 1.0 / cfg.trial_cv**2
            amp[:, :n_trials] *= r_var.gamma(k, 1.0 / k, size=(N, n_trials))

    # Which trial drives each frame, and the temporal profile of the drive within a trial.
    frame_trial = np.full(T, n_trials, dtype=np.int64)
    profile = np.zeros(T, dtype=np.float64)
    if n_trials:
        on = trials.start + cfg.latency_s
        k_tr = np.searchsorted(on, t, side="right") - 1
        since = t - on[np.clip(k_tr, 0, None)]
        inside = (k_tr >= 0) & (since < cfg.grating_s)
        frame_trial[inside] = k_tr[inside]
        shape = 1.0 + cfg.onset_transient * np.exp(-since[inside] / cfg.adaptation_s)
        norm = 1.0 + cfg.onset_transient * cfg.adaptation_s / cfg.grating_s * (
            1.0 - np.exp(-cfg.grating_s / cfg.adaptation_s)
        )
        profile[inside] = shape / norm  # mean 1 over the grating

    state = _slow_state(cfg, r_state, t)
    b, a, ksum = _calcium_filter(cfg)
    # Drift knots: one every drift_timescale_s, linear in between.
    n_knots = int(np.ceil(t[-1] / cfg.drift_timescale_s)) + 2
    knots = r_meta.normal(0.0, cfg.drift_std, size=(N, n_knots)) if cfg.drift_std > 0 else None
    kpos = t / cfg.drift_timescale_s
    k0 = np.floor(kpos).astype(np.int64)
    kw = (kpos - k0).astype(np.float32)

    out = np.empty((T, N), dtype=np.float32)
    chunk = max(1, min(N, _CHUNK_VALUES // T))
    base = cells["baseline_rate"]
    coupling = cells["state_coupling"]
    noise = cells["noise_std"] * cfg.noise_scale
    var_read = (noise**2 * (1.0 - cfg.shot_fraction)).astype(np.float32)
    var_shot = (noise**2 * cfg.shot_fraction).astype(np.float32)
    for lo in range(0, N, chunk):
        sl = slice(lo, min(N, lo + chunk))
        # event rate per frame [c, T]; the state factor has mean ~1 over time
        drive = np.take(amp[sl], frame_trial, axis=1)
        drive *= profile
        drive += base[sl, None]
        beta = coupling[sl, None]
        drive *= np.exp(beta * state[None, :] - 0.5 * beta * beta)
        drive *= 1.0 / fs
        events = r_noise.poisson(drive).astype(np.float32)
        calcium = lfilter(b.astype(np.float32), a.astype(np.float32), events, axis=-1)
        calcium *= cells["spike_amp"][sl, None].astype(np.float32)
        sd = np.sqrt(var_read[sl, None] + var_shot[sl, None] * (1.0 + calcium))
        dff = calcium
        # dF/F relative to the expected spontaneous level (what a baseline estimate removes)
        dff -= (base[sl] / fs * ksum * cells["spike_amp"][sl]).astype(np.float32)[:, None]
        dff += sd * r_noise.standard_normal(dff.shape, dtype=np.float32)
        if knots is not None:
            kn = knots[sl].astype(np.float32)
            dff += kn[:, k0] * (1.0 - kw) + kn[:, k0 + 1] * kw
        out[:, sl] = dff.T

    depth = int(r_meta.choice(np.asarray(line.depth_um)))
    age_days = int(r_meta.integers(75, 121))  # Allen mice: ~P75-P120
    sex = str(r_meta.choice(["F", "M"]))
    # a fixed, seed-independent clock so that written files are reproducible
    start_time = _SESSION_EPOCH + _dt.timedelta(days=int(session_index))
    rec = Recording(
        traces=out,
        timestamps=t,
        unit_ids=unit_ids,
        session_id=session_id,
        subject_id=subject_id,
        genetic_background=line.name,
        sampling_rate=fs,
        trials=trials,
        source="simulated",
        metadata={
            "simulator": "cortexlens.models.data.simulate",
            "simulator_version": SIMULATOR_VERSION,
            "seed": int(seed),
            "session_index": int(session_index),
            "config": cfg.to_dict(),
            "species": "Mus musculus",
            "area": "VISp",
            "imaging_depth_um": depth,
            "age_days": age_days,
            "sex": sex,
            "session_start_time": start_time.isoformat(),
            "indicator": "GCaMP6f-like",
            "cell_class": line.cell_class,
            "stimulus": "drifting_gratings",
        },
    )
    return rec, truth


def simulate_corpus(
    n_sessions: int,
    n_cells: int,
    minutes: float,
    seed: int,
    out_dir: str | Path,
    fmt: str = "nwb",
    *,
    config: SimConfig | None = None,
    progress: bool = True,
) -> list[Path]:
    """Simulate ``n_sessions`` sessions and write each (NWB or brainsets HDF5) with its truth.

    Session ``i`` is ``simulate_session(cfg, seed=seed, session_index=i)``, with the Cre line
    drawn so that every 13 consecutive sessions hold each line once. Files are
    ``<out_dir>/<session_id>.nwb`` (or ``.h5``) and ``<out_dir>/<session_id>.truth.json``.
    Returns the recording paths.
    """
    from tqdm import tqdm

    from models.data.io import write_recording

    if n_sessions < 1:
        raise DataError(f"must be at least 1, got {n_sessions}", field="n_sessions")
    suffix = {"nwb": ".nwb", "brainsets": ".h5"}.get(fmt)
    if suffix is None:
        raise DataError(f"unknown output format '{fmt}' (nwb, brainsets)", source=out_dir)
    base = config or SimConfig()
    cfg = base.model_copy(update={"n_cells": int(n_cells), "minutes": float(minutes)})
    cfg = SimConfig.model_validate(cfg.model_dump())  # validate the overrides
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    for i in tqdm(range(n_sessions), desc="simulating", unit="session", disable=not progress):
        rec, truth = simulate_session(cfg, seed=seed, session_index=i)
        path = write_recording(rec, out / f"{rec.session_id}{suffix}", fmt=fmt)
        truth.save(truth_path(path))
        paths.append(Path(path))
    return paths
