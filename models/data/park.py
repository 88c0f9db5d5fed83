"""Park et al. 2024 two-photon V1 sessions (MATLAB v5 ``.mat``, drifting gratings, KO vs control).

Each file holds 128 trial snippets of 49 samples (-1 s to +2 s around grating onset, 16 Hz) per
neuron. We concatenate the snippets in trial order into one pseudo-continuous stream (flagged
``pseudo_continuous=True``; time is *not* continuous across snippet boundaries) with a regular
16 Hz clock, and keep each snippet's bounds in the trial table (``segment_start``,
``segment_end``) so that windows can avoid crossing them.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from models.data.recording import DataError, Recording, Trials

# Genetic group per mouse, from the table in the dataset's README.
PARK_GROUPS: dict[str, str] = {
    "mrcuts24": "KO",
    "mrcuts25": "KO",
    "mrcuts26": "KO",
    "mrcuts28": "control",
    "mrcuts29": "control",
}

_NAME = re.compile(r"^(?P<date>\d{6})_(?P<mouse>[A-Za-z0-9]+)_(?P<fov>fov\d+)_")
_NEURON = re.compile(r"^neuron(\d+)$")


def looks_like_park(path: Path) -> bool:
    return path.suffix.lower() == ".mat"


def _field(obj, name: str, path: Path, where: str):
    try:
        return getattr(obj, name)
    except AttributeError:
        raise DataError(f"missing '{where}.{name}'", source=path, field=f"{where}.{name}") from None


def read_park(path: str | Path, *, genetic_background: str | None = None) -> Recording:
    """Read one Park et al. 2024 session file into a `Recording`.

    The genetic group comes from the dataset's table (by mouse name in the file name) unless
    ``genetic_background`` is given; an unknown mouse is labelled ``"unknown"``.
    """
    import scipy.io as sio

    path = Path(path)
    if not path.is_file():
        raise DataError("no such file", source=path)
    try:
        m = sio.loadmat(path, squeeze_me=True, struct_as_record=False)
    except Exception as e:  # scipy raises many kinds for corrupt/truncated files
        raise DataError(
            f"not a readable MATLAB v5 file ({type(e).__name__}: {e})", source=path
        ) from None
    for key in ("D", "TE", "t"):
        if key not in m:
            raise DataError(f"missing top-level variable '{key}'", source=path, field=key)
    D, TE = m["D"], m["TE"]
    if not hasattr(D, "_fieldnames") or not hasattr(TE, "_fieldnames"):
        raise DataError("'D' and 'TE' must be MATLAB structs", source=path, field="D")

    directions = np.atleast_1d(np.asarray(_field(TE, "direction", path, "TE"), dtype=np.float64))
    n_trials = int(np.asarray(_field(TE, "nTrials", path, "TE")))
    dt = float(np.asarray(_field(TE, "dt", path, "TE")))
    t_rel = np.atleast_1d(np.asarray(m["t"], dtype=np.float64))
    if directions.shape != (n_trials,):
        raise DataError(
            f"has {directions.size} entries but TE.nTrials is {n_trials}",
            source=path,
            field="TE.direction",
        )
    if not (np.isfinite(dt) and dt > 0):
        raise DataError(f"must be a positive number, got {dt}", source=path, field="TE.dt")
    n_samples = t_rel.size

    neuron_fields = sorted(
        (int(mm.group(1)), f) for f in D._fieldnames if (mm := _NEURON.match(f)) is not None
    )
    if not neuron_fields:
        raise DataError("no 'neuronK' fields", source=path, field="D")

    def snippets(name: str) -> np.ndarray:
        cell = np.atleast_1d(getattr(D, name))
        if cell.shape != (n_trials,):
            raise DataError(
                f"has {cell.size} trials, expected {n_trials}", source=path, field=f"D.{name}"
            )
        try:
            arr = np.stack([np.asarray(x, dtype=np.float64).reshape(-1) for x in cell])
        except ValueError:
            raise DataError(
                f"trial snippets differ in length (expected {n_samples} samples each)",
                source=path,
                field=f"D.{name}",
            ) from None
        if arr.shape != (n_trials, n_samples):
            raise DataError(
                f"snippets have {arr.shape[1]} samples, but 't' has {n_samples}",
                source=path,
                field=f"D.{name}",
            )
        return arr

    # [trials, samples, neurons] -> concatenated [trials*samples, neurons]
    cube = np.stack([snippets(f) for _, f in neuron_fields], axis=-1)
    bad = ~np.isfinite(cube)
    if bad.any():
        tr, _, nk = np.argwhere(bad)[0]
        raise DataError(
            f"contains {int(bad.sum())} NaN/Inf samples (first in trial {tr})",
            source=path,
            field=f"D.{neuron_fields[nk][1]}",
        )
    traces = cube.reshape(n_trials * n_samples, len(neuron_fields)).astype(np.float32)
    covariates = {}
    for name in ("pupil_zscore", "speed"):
        if name in D._fieldnames:
            cov = snippets(name).reshape(-1)
            # Behavioural covariates may have gaps; keep them as NaN (they are not traces).
            covariates[name] = cov.astype(np.float32)

    fs = 1.0 / dt
    timestamps = np.arange(n_trials * n_samples, dtype=np.float64) * dt
    seg_start = np.arange(n_trials, dtype=np.float64) * n_samples * dt
    seg_end = seg_start + n_samples * dt
    onset_idx = int(np.argmin(np.abs(t_rel)))  # sample at t = 0 (grating onset)
    stim_end_idx = int(np.argmin(np.abs(t_rel - t_rel.max())))
    start = seg_start + onset_idx * dt
    end = seg_start + (stim_end_idx + 1) * dt  # grating on from 0 s to the end of the snippet

    mm = _NAME.match(path.name)
    if mm:
        mouse, fov, date = mm.group("mouse"), mm.group("fov"), mm.group("date")
        session_id = f"{date}_{mouse}_{fov}"
    else:
        mouse, fov, date = path.stem, "fov", ""
        session_id = path.stem
    group = genetic_background or PARK_GROUPS.get(mouse, "unknown")
    unit_ids = [f"{mouse}_{fov}/neuron{k}" for k, _ in neuron_fields]

    return Recording(
        traces=traces,
        timestamps=timestamps,
        unit_ids=unit_ids,
        session_id=session_id,
        subject_id=mouse,
        genetic_background=group,
        sampling_rate=fs,
        trials=Trials.from_arrays(
            start,
            end,
            directions,
            None,
            segment_start=seg_start,
            segment_end=seg_end,
        ),
        source="park2024",
        source_path=str(path),
        pseudo_continuous=True,
        covariates=covariates,
        metadata={
            "dataset": "Park et al. 2024 (surlab/Park_et_al, sample-data/glm)",
            "area": "V1",
            "species": "Mus musculus",
            "snippet_samples": n_samples,
            "snippet_t0_s": float(t_rel[0]),
            "recording_date": date,
            "note": "pseudo-continuous: 128 trial snippets concatenated in trial order",
        },
    )
