"""`Recording`: the one in-memory type for a recording session.

Every loader (Park .mat, NWB, brainsets HDF5, the simulator) produces a `Recording`, and every
writer consumes one. Construction validates the contents; anything that cannot be right raises
`DataError` with a message naming the source file and the field.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np


class DataError(ValueError):
    """A recording, file or field that cannot be right. The message names the file and field."""

    def __init__(self, message: str, *, source: str | Path | None = None, field: str | None = None):
        self.source = str(source) if source is not None else None
        self.field = field
        where = []
        if self.source:
            where.append(self.source)
        if field:
            where.append(f"field '{field}'")
        super().__init__(f"{': '.join(where)}: {message}" if where else message)


TRIAL_CORE_COLUMNS = ("start", "end", "direction", "temporal_frequency")


@dataclass(frozen=True)
class Trials:
    """Stimulus trials of a recording (drifting gratings).

    ``start``/``end`` are seconds on the recording's clock; ``direction`` is the drift direction in
    degrees (NaN for a blank sweep); ``temporal_frequency`` in Hz (NaN where the data has none).
    ``extra`` holds any further per-trial columns (1-D arrays of the same length).
    """

    start: np.ndarray
    end: np.ndarray
    direction: np.ndarray
    temporal_frequency: np.ndarray
    extra: Mapping[str, np.ndarray] = field(default_factory=dict)

    @classmethod
    def empty(cls) -> Trials:
        z = np.zeros(0, dtype=np.float64)
        return cls(z, z.copy(), z.copy(), z.copy())

    @classmethod
    def from_arrays(
        cls,
        start,
        end,
        direction,
        temporal_frequency=None,
        **extra,
    ) -> Trials:
        start = np.asarray(start, dtype=np.float64)
        tf = (
            np.full(start.shape, np.nan)
            if temporal_frequency is None
            else np.asarray(temporal_frequency, dtype=np.float64)
        )
        return cls(
            start=start,
            end=np.asarray(end, dtype=np.float64),
            direction=np.asarray(direction, dtype=np.float64),
            temporal_frequency=tf,
            extra={k: np.asarray(v) for k, v in extra.items()},
        )

    def __len__(self) -> int:
        return int(self.start.shape[0])

    @property
    def has_temporal_frequency(self) -> bool:
        return bool(len(self)) and bool(np.isfinite(self.temporal_frequency).any())

    def columns(self) -> dict[str, np.ndarray]:
        cols = {c: getattr(self, c) for c in TRIAL_CORE_COLUMNS}
        cols.update(self.extra)
        return cols

    def select(self, index) -> Trials:
        """A subset of trials (boolean mask or integer index)."""
        return Trials(
            start=self.start[index],
            end=self.end[index],
            direction=self.direction[index],
            temporal_frequency=self.temporal_frequency[index],
            extra={k: v[index] for k, v in self.extra.items()},
        )

    def condition_counts(self) -> dict[tuple[float, float], int]:
        """Number of trials per (direction, temporal frequency) condition."""
        counts: dict[tuple[float, float], int] = {}
        # NaN (blank sweep / no temporal frequency) is one condition, not one per trial.
        d = np.where(np.isfinite(self.direction), self.direction, -1.0)
        f = np.where(np.isfinite(self.temporal_frequency), self.temporal_frequency, -1.0)
        for key in zip(d.tolist(), f.tolist(), strict=True):
            counts[key] = counts.get(key, 0) + 1
        return {
            (np.nan if dd == -1.0 else dd, np.nan if ff == -1.0 else ff): c
            for (dd, ff), c in counts.items()
        }


@dataclass(frozen=True)
class Recording:
    """One recording session of dF/F traces with its stimulus trials and labels.

    Fields:
        traces: dF/F, shape ``[T, N]``, float32, finite.
        timestamps: frame times in seconds, shape ``[T]``, float64, strictly increasing.
        unit_ids: ``N`` unique strings, stable across files of the same cells.
        session_id, subject_id: identifiers.
        genetic_background: Cre line (Allen) or genotype group (e.g. ``"KO"``/``"control"``).
        sampling_rate: frames per second (Hz).
        trials: the trial table.
        source: where it came from (``"park2024"``, ``"nwb"``, ``"brainsets"``, ``"simulated"``,
            ``"stream"``).
        source_path: the file it was read from, if any (used in error messages).
        pseudo_continuous: True when the stream is made by concatenating separate trial snippets
            (time is not continuous across snippet boundaries).
        covariates: behavioural or other per-frame signals, name -> ``[T]`` array.
        metadata: free-form JSON-serialisable facts (species, area, depth, ...).
    """

    traces: np.ndarray
    timestamps: np.ndarray
    unit_ids: tuple[str, ...]
    session_id: str
    subject_id: str
    genetic_background: str
    sampling_rate: float
    trials: Trials
    source: str = "unknown"
    source_path: str | None = None
    pseudo_continuous: bool = False
    covariates: Mapping[str, np.ndarray] = field(default_factory=dict)
    metadata: Mapping[str, object] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # Normalise types first (frozen dataclass: use object.__setattr__), then validate.
        object.__setattr__(self, "traces", np.ascontiguousarray(self.traces, dtype=np.float32))
        object.__setattr__(self, "timestamps", np.asarray(self.timestamps, dtype=np.float64))
        object.__setattr__(self, "unit_ids", tuple(str(u) for u in self.unit_ids))
        object.__setattr__(self, "sampling_rate", float(self.sampling_rate))
        object.__setattr__(
            self, "covariates", {k: np.asarray(v) for k, v in dict(self.covariates).items()}
        )
        object.__setattr__(self, "metadata", dict(self.metadata))
        self.validate()

    # -- shape --------------------------------------------------------------------------------
    @property
    def n_frames(self) -> int:
        return int(self.traces.shape[0])

    @property
    def n_units(self) -> int:
        return int(self.traces.shape[1])

    @property
    def duration(self) -> float:
        return self.n_frames / self.sampling_rate if self.n_frames else 0.0

    # -- validation ---------------------------------------------------------------------------
    def _err(self, message: str, field_name: str) -> DataError:
        return DataError(message, source=self.source_path or self.session_id, field=field_name)

    def validate(self) -> None:
        """Raise `DataError` naming the file and field for anything that cannot be right."""
        tr, ts = self.traces, self.timestamps
        if tr.ndim != 2:
            raise self._err(f"must be 2-D [frames, units], got shape {tr.shape}", "traces")
        if tr.shape[0] == 0 or tr.shape[1] == 0:
            raise self._err(f"is empty (shape {tr.shape})", "traces")
        bad = ~np.isfinite(tr)
        if bad.any():
            f, u = np.argwhere(bad)[0]
            raise self._err(
                f"contains {int(bad.sum())} NaN/Inf values (first at frame {f}, "
                f"unit '{self.unit_ids[u] if u < len(self.unit_ids) else u}')",
                "traces",
            )
        if ts.ndim != 1 or ts.shape[0] != tr.shape[0]:
            raise self._err(
                f"has shape {ts.shape} but traces have {tr.shape[0]} frames", "timestamps"
            )
        if not np.isfinite(ts).all():
            raise self._err("contains NaN/Inf", "timestamps")
        if ts.shape[0] > 1:
            d = np.diff(ts)
            if (d <= 0).any():
                i = int(np.argmax(d <= 0))
                raise self._err(
                    f"must be strictly increasing; frame {i + 1} at {ts[i + 1]:.6g} s does not "
                    f"come after frame {i} at {ts[i]:.6g} s",
                    "timestamps",
                )
        if len(self.unit_ids) != tr.shape[1]:
            raise self._err(
                f"has {len(self.unit_ids)} ids but traces have {tr.shape[1]} units", "unit_ids"
            )
        if len(set(self.unit_ids)) != len(self.unit_ids):
            seen: set[str] = set()
            dup = next(u for u in self.unit_ids if u in seen or seen.add(u))
            raise self._err(f"duplicate unit id '{dup}'", "unit_ids")
        if not self.session_id:
            raise self._err("must not be empty", "session_id")
        if not (np.isfinite(self.sampling_rate) and self.sampling_rate > 0):
            raise self._err(f"must be a positive number, got {self.sampling_rate}", "sampling_rate")
        self._validate_trials()
        for name, cov in self.covariates.items():
            if cov.shape[:1] != (tr.shape[0],):
                raise self._err(
                    f"'{name}' has shape {cov.shape}, expected {tr.shape[0]} frames", "covariates"
                )

    def _validate_trials(self) -> None:
        t = self.trials
        n = len(t)
        for name, col in t.columns().items():
            if np.asarray(col).shape != (n,):
                raise self._err(
                    f"column '{name}' has shape {np.asarray(col).shape}, expected ({n},)", "trials"
                )
        if n == 0:
            return
        if not (np.isfinite(t.start).all() and np.isfinite(t.end).all()):
            raise self._err("start/end contain NaN/Inf", "trials")
        if (t.end < t.start).any():
            i = int(np.argmax(t.end < t.start))
            raise self._err(f"trial {i} ends ({t.end[i]:.6g} s) before it starts", "trials")
        lo = self.timestamps[0]
        hi = self.timestamps[-1] + 1.0 / self.sampling_rate
        tol = 0.5 / self.sampling_rate
        outside = (t.start < lo - tol) | (t.end > hi + tol)
        if outside.any():
            i = int(np.argmax(outside))
            raise self._err(
                f"trial {i} [{t.start[i]:.6g}, {t.end[i]:.6g}] s lies outside the recording "
                f"[{lo:.6g}, {hi:.6g}] s",
                "trials",
            )
        d = t.direction[np.isfinite(t.direction)]
        if ((d < 0) | (d >= 360)).any():
            raise self._err("direction must be in [0, 360) degrees", "trials")

    # -- helpers ------------------------------------------------------------------------------
    def replace(self, **changes) -> Recording:
        """A copy with some fields changed (validated again)."""
        return replace(self, **changes)

    def frame_index(self, t: np.ndarray | float) -> np.ndarray:
        """Index of the last frame at or before time(s) ``t`` (-1 if before the first frame)."""
        return np.searchsorted(self.timestamps, np.asarray(t, dtype=np.float64), side="right") - 1

    def equals(self, other: Recording, *, rtol: float = 0.0, atol: float = 0.0) -> bool:
        """True when both hold the same data (arrays compared with the given tolerances)."""
        return not self.differences(other, rtol=rtol, atol=atol)

    def differences(self, other: Recording, *, rtol: float = 0.0, atol: float = 0.0) -> list[str]:
        """Names of the fields in which two recordings differ (empty when equal)."""
        out: list[str] = []

        def close(a, b) -> bool:
            a, b = np.asarray(a), np.asarray(b)
            if a.shape != b.shape:
                return False
            if a.dtype.kind in "fc" and b.dtype.kind in "fc":
                return bool(np.allclose(a, b, rtol=rtol, atol=atol, equal_nan=True))
            return bool(np.array_equal(a, b))

        for name in ("traces", "timestamps"):
            if not close(getattr(self, name), getattr(other, name)):
                out.append(name)
        for name in (
            "unit_ids",
            "session_id",
            "subject_id",
            "genetic_background",
            "pseudo_continuous",
        ):
            if getattr(self, name) != getattr(other, name):
                out.append(name)
        if not np.isclose(self.sampling_rate, other.sampling_rate, rtol=1e-9):
            out.append("sampling_rate")
        a, b = self.trials.columns(), other.trials.columns()
        if a.keys() != b.keys():
            out.append("trials")
        else:
            out.extend(f"trials.{k}" for k in a if not close(a[k], b[k]))
        if self.covariates.keys() != other.covariates.keys():
            out.append("covariates")
        else:
            out.extend(
                f"covariates.{k}"
                for k in self.covariates
                if not close(self.covariates[k], other.covariates[k])
            )
        return out

    def summary(self) -> dict[str, object]:
        """Per-session facts for `cortexlens data info` (JSON-serialisable)."""
        t = self.trials
        conds: dict[str, int] = {}
        for (d, f), c in sorted(t.condition_counts().items()):
            key = "blank" if not np.isfinite(d) else f"{d:g}deg"
            if np.isfinite(f):
                key += f"@{f:g}Hz"
            conds[key] = c
        return {
            "session_id": self.session_id,
            "subject_id": self.subject_id,
            "source": self.source,
            "path": self.source_path,
            "neurons": self.n_units,
            "frames": self.n_frames,
            "frame_rate_hz": self.sampling_rate,
            "duration_s": round(self.duration, 3),
            "trials": len(t),
            "trials_per_condition": conds,
            "genetic_background": self.genetic_background,
            "pseudo_continuous": self.pseudo_continuous,
        }
