"""brainsets / temporaldata HDF5 sessions (the Allen Brain Observatory as prepared for POYO+).

A temporaldata ``Data.to_hdf5`` file is a tree of groups, each tagged with an ``object``
attribute (``Data``, ``ArrayDict``, ``Interval``, ``IrregularTimeSeries``, ``RegularTimeSeries``).
Arrays are datasets; scalar facts of ``Data`` objects are attributes (enums and datetimes as
strings); string arrays are stored as fixed-length bytes and listed in ``_unicode_keys``; time
columns are listed in ``timekeys``. The brainsets Allen pipeline
(``allen_visual_coding_ophys_2016``) writes, per session:

- ``calcium_traces``: ``df_over_f`` ``[T, N]`` as a ``RegularTimeSeries`` (attribute
  ``sampling_rate``, ``domain`` group whose first ``start`` is the first frame time) or, in
  other brainsets, an ``IrregularTimeSeries`` with a ``timestamps`` dataset;
- ``units`` (``rois`` in newer versions): ``ArrayDict`` with ``id`` (ROI ids as strings);
- ``drifting_gratings``: ``Interval`` with ``start``, ``end``, ``orientation`` (degrees; for the
  Allen drifting gratings this is the drift direction, 0..315), ``temporal_frequency`` (Hz),
  ``timestamps`` (mid-points) and class ids;
- ``subject``/``session``/``device``/``brainset``: ``Data`` groups whose attributes hold ``id``,
  ``cre_line``, ``genotype``, ``species``, ``recording_date``, ...

`read_brainsets` reads that layout with h5py alone (no temporaldata needed). `write_brainsets`
writes the same layout (``calcium_traces`` as an ``IrregularTimeSeries`` with explicit
timestamps, so any clock round-trips exactly), plus ``covariates`` (an ``IrregularTimeSeries`` on
the frame clock) and a ``cortexlens`` ``Data`` group holding the facts temporaldata has no place
for (source, ``pseudo_continuous``, sampling rate, metadata as JSON). temporaldata's
``Data.from_hdf5`` loads the written files.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from models.data.hdf5 import one_line, open_hdf5
from models.data.recording import DataError, Recording, Trials

CRE_LINE_KEYS = ("subject/cre_line", "subject.cre_line")
_TRIAL_SKIP = {"start", "end", "orientation", "temporal_frequency", "timestamps"}


def _text(v) -> str:
    if isinstance(v, bytes):
        return v.decode("utf-8", "replace")
    if isinstance(v, np.ndarray) and v.shape == ():
        return _text(v.item())
    if isinstance(v, np.generic):
        return _text(v.item())
    return str(v)


# -- writing ------------------------------------------------------------------------------------
def _bytes_array(values) -> np.ndarray:
    enc = [str(v).encode("utf-8") for v in values]
    width = max((len(b) for b in enc), default=1) or 1
    return np.array(enc, dtype=f"S{width}")


def _write_interval(grp, columns: dict[str, np.ndarray], timekeys: list[str]) -> None:
    unicode_keys = []
    for key, value in columns.items():
        value = np.asarray(value)
        if value.dtype.kind in "UO":
            value = _bytes_array(value.tolist())
            unicode_keys.append(key)
        grp.create_dataset(key, data=value)
    grp.attrs["_unicode_keys"] = np.array(unicode_keys, dtype="S")
    grp.attrs["timekeys"] = np.array(timekeys, dtype="S")
    grp.attrs["object"] = "Interval"


def _write_irregular(grp, timestamps: np.ndarray, columns: dict[str, np.ndarray]) -> None:
    grp.create_dataset("timestamps", data=timestamps)
    for key, value in columns.items():
        grp.create_dataset(key, data=value)
    start, end = float(timestamps[0]), float(timestamps[-1])
    grid = np.arange(start, end + 1.0, 1.0, dtype=np.float64)
    grp.create_dataset("timestamp_indices_1s", data=np.searchsorted(timestamps, grid))
    _write_interval(
        grp.create_group("domain"),
        {"start": np.array([start]), "end": np.array([end])},
        ["start", "end"],
    )
    grp.attrs["_unicode_keys"] = np.array([], dtype="S")
    grp.attrs["timekeys"] = np.array(["timestamps"], dtype="S")
    grp.attrs["object"] = "IrregularTimeSeries"


def _write_data(grp, attrs: dict) -> None:
    for key, value in attrs.items():
        if value is not None:
            grp.attrs[key] = value
    grp.attrs["object"] = "Data"
    grp.attrs["absolute_start"] = 0.0


def write_brainsets(rec: Recording, path: str | Path) -> Path:
    """Write a recording as brainsets/temporaldata HDF5 (layout in the module docstring)."""
    import h5py

    path = Path(path)
    meta = dict(rec.metadata)
    t = rec.trials
    if "timestamps" in t.extra:
        raise DataError(
            "extra trial column 'timestamps' clashes with the interval mid-points",
            source=path,
            field="trials",
        )
    gb = rec.genetic_background
    is_cre = "cre" in gb.lower()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with h5py.File(path, "w") as f:
            ts = rec.timestamps
            _write_data(
                f.create_group("brainset"),
                {
                    "id": str(meta.get("brainset", "cortexlens")),
                    "origin_version": "unknown",
                    "derived_version": "1.0.0",
                    "source": rec.source,
                    "description": "written by cortexlens models.data.brainsets",
                },
            )
            _write_data(
                f.create_group("subject"),
                {
                    "id": rec.subject_id,
                    "species": str(meta.get("species", "Mus musculus")).upper().replace(" ", "_"),
                    "age": _float_or(meta.get("age_days"), 0.0),
                    "sex": str(meta.get("sex", "UNKNOWN")),
                    "genotype": gb,
                    "cre_line": gb if is_cre else None,
                },
            )
            _write_data(
                f.create_group("session"),
                {"id": rec.session_id, "recording_date": str(meta.get("recording_date", ""))},
            )
            _write_data(
                f.create_group("device"),
                {
                    "id": rec.session_id,
                    "recording_tech": "TWO_PHOTON_IMAGING",
                    "target_area": str(meta.get("area", "unknown")),
                },
            )
            _write_irregular(f.create_group("calcium_traces"), ts, {"df_over_f": rec.traces})
            units = f.create_group("units")
            units.create_dataset("id", data=_bytes_array(rec.unit_ids))
            units.attrs["object"] = "ArrayDict"
            units.attrs["_unicode_keys"] = np.array(["id"], dtype="S")
            if len(t):
                cols = {
                    "start": t.start,
                    "end": t.end,
                    "orientation": t.direction,
                    "temporal_frequency": t.temporal_frequency,
                    "timestamps": (t.start + t.end) / 2,
                    **{k: np.asarray(v) for k, v in t.extra.items()},
                }
                _write_interval(
                    f.create_group("drifting_gratings"), cols, ["start", "end", "timestamps"]
                )
            if rec.covariates:
                _write_irregular(
                    f.create_group("covariates"),
                    ts,
                    {k: np.asarray(v) for k, v in rec.covariates.items()},
                )
            _write_data(
                f.create_group("cortexlens"),
                {
                    "format": "cortexlens.recording/1",
                    "source": rec.source,
                    "pseudo_continuous": bool(rec.pseudo_continuous),
                    "sampling_rate": float(rec.sampling_rate),
                    "genetic_background": gb,
                    "metadata_json": json.dumps(meta, default=_json_default),
                },
            )
            _write_interval(
                f.create_group("domain"),
                {"start": np.array([ts[0]]), "end": np.array([ts[-1]])},
                ["start", "end"],
            )
            f.attrs["object"] = "Data"
            f.attrs["absolute_start"] = 0.0
    except (OSError, ValueError, TypeError) as e:
        raise DataError(f"cannot write HDF5 file ({one_line(e)})", source=path) from None
    return path


def _float_or(v, default: float) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return default


def _json_default(o):
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, np.generic):
        return o.item()
    return str(o)


# -- reading ------------------------------------------------------------------------------------
def read_brainsets(path: str | Path) -> Recording:
    """Read a brainsets/temporaldata HDF5 session (layout in the module docstring)."""
    path = Path(path)
    with open_hdf5(path, not_hdf5="not an HDF5 file") as f:
        return _read(f, path)


def _group(f, name: str, path: Path, *, required: bool = True):
    import h5py

    obj = f.get(name)
    if obj is None:
        if required:
            raise DataError(f"missing group '{name}'", source=path, field=name)
        return None
    if not isinstance(obj, h5py.Group):
        raise DataError(f"'{name}' must be a group", source=path, field=name)
    return obj


def _dataset(grp, key: str, path: Path, *, required: bool = True) -> np.ndarray | None:
    import h5py

    obj = grp.get(key)
    where = f"{grp.name.strip('/')}/{key}"
    if obj is None:
        if required:
            raise DataError("missing", source=path, field=where)
        return None
    if not isinstance(obj, h5py.Dataset):
        raise DataError("must be a dataset", source=path, field=where)
    return obj[()]


def _strings(arr: np.ndarray) -> list[str]:
    return [_text(x) for x in np.asarray(arr).reshape(-1).tolist()]


def _numeric(arr, path: Path, where: str) -> np.ndarray:
    try:
        return np.asarray(arr, dtype=np.float64)
    except (TypeError, ValueError):
        raise DataError(
            f"must be numeric, got dtype {np.asarray(arr).dtype}", source=path, field=where
        ) from None


def _attr(f, dotted: str):
    """An attribute ``group/key`` (or ``group.key`` on the root), else None."""
    if "/" in dotted:
        g, key = dotted.rsplit("/", 1)
        grp = f.get(g)
        if grp is not None:
            if key in grp.attrs:
                return grp.attrs[key]
            if key in grp and hasattr(grp[key], "shape") and grp[key].shape == ():
                return grp[key][()]
        return None
    return f.attrs.get(dotted)


def _read(f, path: Path) -> Recording:
    facts = {}
    if "cortexlens" in f:
        facts = {k: v for k, v in f["cortexlens"].attrs.items() if k != "object"}

    # -- traces and clock
    ct = _group(f, "calcium_traces", path)
    traces = _dataset(ct, "df_over_f", path)
    if traces.dtype.kind not in "biuf":
        raise DataError(
            f"must be numeric, got dtype {traces.dtype}",
            source=path,
            field="calcium_traces/df_over_f",
        )
    if traces.ndim == 1:
        traces = traces[:, None]
    if traces.ndim != 2:
        raise DataError(
            f"must be 2-D [frames, units], got shape {traces.shape}",
            source=path,
            field="calcium_traces/df_over_f",
        )
    n_frames = traces.shape[0]
    rate = ct.attrs.get("sampling_rate")
    timestamps = _dataset(ct, "timestamps", path, required=False)
    if timestamps is not None:
        timestamps = _numeric(timestamps, path, "calcium_traces/timestamps").reshape(-1)
        if timestamps.shape[0] != n_frames:
            raise DataError(
                f"has {timestamps.shape[0]} entries but df_over_f has {n_frames} frames",
                source=path,
                field="calcium_traces/timestamps",
            )
    else:  # RegularTimeSeries: first domain start + k / sampling_rate
        if rate is None or not np.isfinite(float(rate)) or float(rate) <= 0:
            raise DataError(
                "has neither a 'timestamps' dataset nor a positive 'sampling_rate' attribute",
                source=path,
                field="calcium_traces",
            )
        t0 = 0.0
        dom = ct.get("domain")
        if dom is not None and "start" in dom and dom["start"].shape[0] > 0:
            t0 = float(dom["start"][0])
        timestamps = t0 + np.arange(n_frames, dtype=np.float64) / float(rate)

    sampling_rate = facts.get("sampling_rate", rate)
    if sampling_rate is None:
        if n_frames < 2:
            raise DataError(
                "cannot tell the sampling rate (one frame, no sampling_rate)",
                source=path,
                field="calcium_traces",
            )
        sampling_rate = 1.0 / float(np.median(np.diff(timestamps)))

    # -- units
    ugrp = _group(f, "units", path, required=False) or _group(f, "rois", path, required=False)
    if ugrp is None:
        raise DataError(
            "missing group 'units' (or 'rois') with unit ids", source=path, field="units/id"
        )
    unit_ids = _strings(_dataset(ugrp, "id", path))
    if len(unit_ids) != traces.shape[1]:
        raise DataError(
            f"has {len(unit_ids)} ids but df_over_f has {traces.shape[1]} units",
            source=path,
            field=f"{ugrp.name.strip('/')}/id",
        )

    # -- trials
    trials = Trials.empty()
    dg = _group(f, "drifting_gratings", path, required=False)
    if dg is not None:
        start = _numeric(_dataset(dg, "start", path), path, "drifting_gratings/start")
        n = start.shape[0]
        cols: dict[str, np.ndarray] = {"start": start}
        # Allen's drifting-grating "orientation" is the drift direction; accept "direction" too.
        dcol = "direction" if "direction" in dg and "orientation" not in dg else "orientation"
        for key in ("end", dcol, "temporal_frequency"):
            required = key != "temporal_frequency"
            val = _dataset(dg, key, path, required=required)
            if val is not None:
                cols[key] = _numeric(val, path, f"drifting_gratings/{key}")
        unicode_keys = set(_strings(dg.attrs.get("_unicode_keys", np.array([], dtype="S"))))
        extra = {}
        for key, obj in dg.items():
            if key in _TRIAL_SKIP or key == "direction" or not hasattr(obj, "shape"):
                continue
            val = obj[()]
            if key in unicode_keys or val.dtype.kind == "S":
                val = np.asarray(_strings(val), dtype=str)
            extra[key] = val
        for key, val in {**cols, **extra}.items():
            if np.asarray(val).shape != (n,):
                raise DataError(
                    f"has shape {np.asarray(val).shape}, expected ({n},) like 'start'",
                    source=path,
                    field=f"drifting_gratings/{key}",
                )
        trials = Trials.from_arrays(
            cols["start"], cols["end"], cols[dcol], cols.get("temporal_frequency"), **extra
        )

    # -- covariates on the frame clock
    covariates = {}
    cov = _group(f, "covariates", path, required=False)
    if cov is not None:
        for key, obj in cov.items():
            if key in ("timestamps", "timestamp_indices_1s", "domain") or not hasattr(obj, "shape"):
                continue
            val = obj[()]
            if val.shape[:1] != (n_frames,):
                raise DataError(
                    f"has shape {val.shape}, expected {n_frames} frames",
                    source=path,
                    field=f"covariates/{key}",
                )
            covariates[key] = val

    # -- labels
    genetic = None
    for key in CRE_LINE_KEYS:
        v = _attr(f, key)
        if v is not None and _text(v) not in ("", "None", "unknown"):
            genetic = _text(v)
            break
    if genetic is None:
        v = _attr(f, "subject/genotype") or facts.get("genetic_background")
        genetic = _text(v) if v is not None and _text(v) not in ("", "None") else "unknown"
    session_id = _attr(f, "session/id")
    subject_id = _attr(f, "subject/id")
    metadata = {}
    if "metadata_json" in facts:
        try:
            metadata = json.loads(_text(facts["metadata_json"]))
        except ValueError as e:
            raise DataError(
                f"is not valid JSON ({one_line(e)})", source=path, field="cortexlens/metadata_json"
            ) from None
    else:
        for key in (
            "subject/species",
            "subject/sex",
            "subject/age",
            "session/recording_date",
            "device/target_area",
            "device/imaging_depth",
            "brainset/id",
        ):
            v = _attr(f, key)
            if v is not None:
                metadata[key.replace("/", ".")] = (
                    v.item() if isinstance(v, np.generic) else _text(v)
                )

    return Recording(
        traces=traces,
        timestamps=timestamps,
        unit_ids=unit_ids,
        session_id=_text(session_id) if session_id is not None else path.stem,
        subject_id=_text(subject_id) if subject_id is not None else "unknown",
        genetic_background=genetic,
        sampling_rate=float(sampling_rate),
        trials=trials,
        source=_text(facts.get("source", "brainsets")),
        source_path=str(path),
        pseudo_continuous=bool(facts.get("pseudo_continuous", False)),
        covariates=covariates,
        metadata=metadata,
    )
