"""NWB (Neurodata Without Borders) files: read any two-photon dF/F file, write ours (pynwb).

Layout written by `write_nwb` (NWB 2.x core types only, no extensions):

- ``/general/subject``: `Subject` with ``subject_id``, ``genotype`` = genetic background,
  ``species`` (metadata ``species``, default "Mus musculus"), ``sex`` (metadata or "U") and
  ``age`` (metadata ``age`` as ISO 8601 / ``age_days``, else "P0D/", i.e. unknown);
  ``/general/session_id`` = session id.
- ``/processing/ophys``: ``ImageSegmentation/PlaneSegmentation`` (one row per unit, a minimal
  one-pixel ``pixel_mask`` each and a ``unit_id`` column holding the unit ids) on an
  ``ImagingPlane`` (with its ``OpticalChannel`` and ``Device``), and
  ``DfOverF/dff`` (a ``RoiResponseSeries``) with the traces ``[T, N]`` float32, gzip. The clock
  is written as ``starting_time`` + ``rate`` when ``t0 + arange(T) / rate`` reproduces the
  timestamps bit for bit (nwbinspector flags regular explicit timestamps), else as explicit
  ``timestamps``; the ``ImagingPlane`` carries ``imaging_rate``, ``location`` (Allen CCF
  acronym, e.g. "V1" -> "VISp"), ``indicator`` and wavelengths from metadata (NaN if unknown).
- ``/intervals/trials``: ``start_time``, ``stop_time``, ``direction`` (degrees, NaN = blank),
  ``temporal_frequency`` (Hz; left out when all NaN) and every extra trial column.
- ``/processing/behavior/BehavioralTimeSeries``: one `TimeSeries` per covariate (NaN kept), on
  the traces' clock (same rate, or timestamps linked to the dF/F series).
- ``/scratch/cortexlens_recording``: JSON with the facts NWB has no field for (source,
  ``pseudo_continuous``, sampling rate, free-form metadata).

`read_nwb` also reads files written by other tools: the dF/F series is taken from
``processing['ophys']`` (a ``DfOverF`` preferred over ``Fluorescence``; any
``RoiResponseSeries``), with ``rate``/``starting_time`` when there are no timestamps; trials from
``/intervals/trials``, else ``epochs`` or any other `TimeIntervals` with a direction-like column
(``direction``, ``orientation``, ``grating_direction``; ``temporal_frequency``/``tf``); genetic
background from ``Subject.genotype`` (else "unknown"). Every failure raises `DataError` naming the
file and the field.
"""

from __future__ import annotations

import datetime as _dt
import json
import uuid
import warnings
from pathlib import Path

import numpy as np

from models.data.hdf5 import one_line, open_hdf5
from models.data.recording import DataError, Recording, Trials

SCRATCH_NAME = "cortexlens_recording"
DFF_NAME = "dff"
DIRECTION_COLUMNS = ("direction", "orientation", "grating_direction", "drift_direction", "dir")
TF_COLUMNS = ("temporal_frequency", "tf", "temporal_freq")
_RESERVED_TRIAL_COLUMNS = {"start_time", "stop_time", "tags", "timeseries", "id"}
_TRIAL_DESCRIPTIONS = {
    "direction": "drift direction of the grating in degrees (NaN: blank sweep)",
    "temporal_frequency": "temporal frequency of the grating in Hz (NaN: not given)",
    "segment_start": "start (s) of the trial snippet this trial was cut from",
    "segment_end": "end (s) of the trial snippet this trial was cut from",
}
# Common names of mouse visual areas -> Allen CCF acronyms (what nwbinspector expects).
_AREA_TO_CCF = {
    "v1": "VISp",
    "visp": "VISp",
    "lm": "VISl",
    "visl": "VISl",
    "al": "VISal",
    "visal": "VISal",
    "pm": "VISpm",
    "vispm": "VISpm",
    "am": "VISam",
    "visam": "VISam",
    "rl": "VISrl",
    "visrl": "VISrl",
}


# -- helpers ------------------------------------------------------------------------------------
def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, _dt.datetime | _dt.date):
        return obj.isoformat()
    if isinstance(obj, Path):
        return str(obj)
    return obj


def _session_start(metadata: dict) -> _dt.datetime:
    """Session start from metadata (``session_start_time`` or ``recording_date``), else now."""
    for key in ("session_start_time", "recording_date"):
        val = metadata.get(key)
        if not val:
            continue
        s = str(val)
        for parse in (
            _dt.datetime.fromisoformat,
            lambda x: _dt.datetime.strptime(x, "%y%m%d"),
            lambda x: _dt.datetime.strptime(x, "%Y%m%d"),
        ):
            try:
                t = parse(s)
            except ValueError:
                continue
            return t if t.tzinfo else t.replace(tzinfo=_dt.UTC)
    return _dt.datetime.now(_dt.UTC).replace(microsecond=0)


def _age(metadata: dict) -> str:
    age = metadata.get("age")
    if isinstance(age, str) and age.startswith("P"):
        return age
    days = metadata.get("age_days", age)
    if isinstance(days, int | float) and np.isfinite(days) and days >= 0:
        return f"P{int(round(days))}D"
    return "P0D/"  # ISO 8601 open range: age unknown


def _float_or_nan(value) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return float("nan")


def _sex(value) -> str:
    """NWB's one-letter sex code (M, F, O, U) from "F", "female", "MALE", ..."""
    s = str(value or "U").strip().upper()[:1]
    return s if s in ("M", "F", "O") else "U"


def _regular_clock(ts: np.ndarray, sampling_rate: float) -> tuple[float, float] | None:
    """(starting_time, rate) when ``t0 + arange(T) / rate`` reproduces ``ts`` bit for bit."""
    if ts.size < 2:
        return None
    t0 = float(ts[0])
    k = np.arange(ts.size, dtype=np.float64)
    est = 1.0 / float(np.median(np.diff(ts)))
    for rate in (float(sampling_rate), est, round(est, 6)):
        if rate > 0 and np.array_equal(t0 + k / rate, ts):
            return t0, rate
    return None


def _col_values(values: np.ndarray, name: str, path) -> list:
    v = np.asarray(values)
    if v.dtype.kind in "US":
        return [str(x.decode() if isinstance(x, bytes) else x) for x in v.tolist()]
    if v.dtype.kind in "biuf":
        return v
    raise DataError(
        f"trial column '{name}' has unsupported dtype {v.dtype} (numbers or strings only)",
        source=path,
        field="trials",
    )


# -- writing ------------------------------------------------------------------------------------
def write_nwb(rec: Recording, path: str | Path) -> Path:
    """Write a recording as an NWB file (layout in the module docstring); returns the path."""
    from pynwb import NWBHDF5IO

    path = Path(path)
    try:
        nwb = _build_nwbfile(rec, path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with NWBHDF5IO(str(path), mode="w") as io:
                io.write(nwb)
    except DataError:
        raise
    except (OSError, ValueError, TypeError) as e:
        raise DataError(f"cannot write NWB file ({one_line(e)})", source=path) from None
    return path


def _build_nwbfile(rec: Recording, path: Path):
    from hdmf.backends.hdf5.h5_utils import H5DataIO
    from pynwb import NWBFile, TimeSeries
    from pynwb.behavior import BehavioralTimeSeries
    from pynwb.file import Subject
    from pynwb.ophys import DfOverF, ImageSegmentation, OpticalChannel

    meta = dict(rec.metadata)
    area = str(meta.get("location") or meta.get("area") or "unknown")
    location = _AREA_TO_CCF.get(area.lower(), area)

    nwb = NWBFile(
        session_description=(
            f"Two-photon calcium imaging (dF/F), {rec.n_units} units, {len(rec.trials)} "
            f"drifting-grating trials; source: {rec.source}"
            + (
                "; pseudo-continuous: trial snippets concatenated in trial order"
                if rec.pseudo_continuous
                else ""
            )
        ),
        identifier=str(uuid.uuid4()),
        session_start_time=_session_start(meta),
        session_id=rec.session_id,
        experiment_description=str(
            meta.get("experiment_description")
            or meta.get("dataset")
            or f"two-photon calcium imaging of responses to drifting gratings ({rec.source})"
        ),
        source_script="cortexlens models.data.nwb.write_nwb",
        source_script_file_name="models/data/nwb.py",
        keywords=["two-photon calcium imaging", "dF/F", "drifting gratings", "visual cortex"],
        experimenter=meta.get("experimenter"),
        institution=meta.get("institution"),
        lab=meta.get("lab"),
    )
    nwb.subject = Subject(
        subject_id=rec.subject_id or "unknown",
        genotype=rec.genetic_background,
        species=str(meta.get("species", "Mus musculus")),
        sex=_sex(meta.get("sex")),
        age=_age(meta),
        description=f"subject '{rec.subject_id}', genetic background '{rec.genetic_background}'",
    )

    # -- ophys: device, imaging plane, segmentation, dF/F
    device = nwb.create_device(
        name="Microscope", description=str(meta.get("device", "two-photon microscope"))
    )
    channel = OpticalChannel(
        name="OpticalChannel",
        description="green channel (calcium indicator)",
        emission_lambda=_float_or_nan(meta.get("emission_lambda_nm")),
    )
    plane = nwb.create_imaging_plane(
        name="ImagingPlane",
        optical_channel=channel,
        description=f"imaging plane in {area}",
        device=device,
        excitation_lambda=_float_or_nan(meta.get("excitation_lambda_nm")),
        indicator=str(meta.get("indicator", "unknown")),
        location=location,
        imaging_rate=rec.sampling_rate,
    )
    ophys = nwb.create_processing_module(name="ophys", description="dF/F of segmented cells")
    segmentation = ImageSegmentation(name="ImageSegmentation")
    ophys.add(segmentation)
    seg = segmentation.create_plane_segmentation(
        name="PlaneSegmentation",
        description="one row per unit; masks are one-pixel placeholders (ROI shapes not kept)",
        imaging_plane=plane,
    )
    seg.add_column(name="unit_id", description="stable unit id (cortexlens)")
    for i, uid in enumerate(rec.unit_ids):
        seg.add_roi(pixel_mask=[(i, 0, 1.0)], unit_id=uid)
    rois = seg.create_roi_table_region(
        region=list(range(rec.n_units)), description="all units, in trace column order"
    )
    clock = _regular_clock(rec.timestamps, rec.sampling_rate)
    timing = (
        {"starting_time": clock[0], "rate": clock[1]}
        if clock is not None
        else {"timestamps": rec.timestamps}
    )
    dff_iface = DfOverF(name="DfOverF")
    ophys.add(dff_iface)
    dff = dff_iface.create_roi_response_series(
        name=DFF_NAME,
        data=H5DataIO(rec.traces, compression="gzip"),
        rois=rois,
        unit="n.a.",
        description="dF/F per unit, [frames, units]",
        **timing,
    )

    # -- trials
    t = rec.trials
    cols = t.columns()
    for name in cols:
        if name in _RESERVED_TRIAL_COLUMNS:
            raise DataError(
                f"extra trial column '{name}' clashes with an NWB trials column",
                source=path,
                field="trials",
            )
    if len(t):
        # An all-NaN temporal frequency (none given) is left out; reading restores it as NaN.
        if not t.has_temporal_frequency:
            cols.pop("temporal_frequency")
        for name in (c for c in cols if c not in ("start", "end")):
            nwb.add_trial_column(
                name=name, description=_TRIAL_DESCRIPTIONS.get(name, f"trial column '{name}'")
            )
        values = {
            name: _col_values(v, name, path)
            for name, v in cols.items()
            if name not in ("start", "end")
        }
        for i in range(len(t)):
            nwb.add_trial(
                start_time=float(t.start[i]),
                stop_time=float(t.end[i]),
                **{name: v[i] for name, v in values.items()},
            )

    # -- behavioural covariates on the traces' clock
    if rec.covariates:
        behavior = nwb.create_processing_module(
            name="behavior", description="behavioural covariates sampled at the imaging frames"
        )
        bts = BehavioralTimeSeries(name="BehavioralTimeSeries")
        for name, cov in rec.covariates.items():
            cov_timing = (
                {"starting_time": clock[0], "rate": clock[1]}
                if clock is not None
                else {"timestamps": dff}
            )
            bts.add_timeseries(
                TimeSeries(
                    name=name,
                    data=np.asarray(cov),
                    unit=str(meta.get(f"{name}_unit", "n.a.")),
                    description=f"covariate '{name}' per imaging frame (NaN: missing)",
                    **cov_timing,
                )
            )
        behavior.add(bts)

    facts = {
        "format": "cortexlens.recording/1",
        "source": rec.source,
        "pseudo_continuous": rec.pseudo_continuous,
        "sampling_rate": rec.sampling_rate,
        "session_id": rec.session_id,
        "subject_id": rec.subject_id,
        "genetic_background": rec.genetic_background,
        "covariate_dtypes": {k: str(np.asarray(v).dtype) for k, v in rec.covariates.items()},
        "metadata": _jsonable(meta),
    }
    nwb.add_scratch(
        json.dumps(facts),
        name=SCRATCH_NAME,
        description="cortexlens Recording facts NWB has no field for (JSON)",
    )
    return nwb


# -- reading ------------------------------------------------------------------------------------
def read_nwb(path: str | Path) -> Recording:
    """Read an NWB file (ours or another tool's) into a `Recording`."""
    path = Path(path)
    with open_hdf5(path, not_hdf5="not an NWB file (not HDF5)") as f:
        if "nwb_version" not in f.attrs:
            if "nwb_version" in f:  # NWB 1.x keeps it as a dataset
                raise DataError(
                    "NWB 1.x files are not supported (pynwb reads NWB 2.x)", source=path
                )
            raise DataError("not an NWB file (no 'nwb_version' attribute)", source=path)

    from pynwb import NWBHDF5IO

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with NWBHDF5IO(str(path), mode="r") as io:
                nwb = io.read()
                return _from_nwbfile(nwb, path)
    except DataError:
        raise
    except Exception as e:  # pynwb/hdmf/h5py raise many kinds for broken files
        raise DataError(f"cannot read NWB file ({one_line(e)})", source=path) from None


def _find_dff(nwb, path: Path):
    from pynwb.ophys import DfOverF, Fluorescence, RoiResponseSeries

    if "ophys" not in nwb.processing:
        raise DataError(
            "no 'ophys' processing module (expected DfOverF/RoiResponseSeries)",
            source=path,
            field="processing/ophys",
        )
    ophys = nwb.processing["ophys"]
    found: list[tuple[int, str, object]] = []
    for iname, iface in ophys.data_interfaces.items():
        if isinstance(iface, DfOverF | Fluorescence):
            rank = 0 if isinstance(iface, DfOverF) else 1
            for sname, series in iface.roi_response_series.items():
                found.append((rank, f"processing/ophys/{iname}/{sname}", series))
        elif isinstance(iface, RoiResponseSeries):
            found.append((2, f"processing/ophys/{iname}", iface))
    if not found:
        raise DataError(
            "no RoiResponseSeries in a DfOverF or Fluorescence interface",
            source=path,
            field="processing/ophys",
        )
    found.sort(key=lambda x: (x[0], x[1] != f"processing/ophys/DfOverF/{DFF_NAME}"))
    return found[0][1], found[0][2]


def _series_clock(series, n_frames: int, path: Path, where: str) -> tuple[np.ndarray, float | None]:
    if series.timestamps is not None:
        ts_src = series.timestamps
        if hasattr(ts_src, "timestamps") and not hasattr(ts_src, "shape"):  # linked TimeSeries
            ts_src = ts_src.timestamps
        ts = np.asarray(ts_src[:], dtype=np.float64).reshape(-1)
        return ts, None
    rate = series.rate
    if rate is None or not np.isfinite(rate) or rate <= 0:
        raise DataError(
            f"has neither timestamps nor a positive rate (rate={rate})",
            source=path,
            field=where,
        )
    t0 = float(series.starting_time or 0.0)
    return t0 + np.arange(n_frames, dtype=np.float64) / float(rate), float(rate)


def _unit_ids(series, n_units: int, path: Path, where: str) -> list[str]:
    rois = getattr(series, "rois", None)
    if rois is None:
        return [f"roi{i}" for i in range(n_units)]
    idx = np.asarray(rois.data[:], dtype=np.int64).reshape(-1)
    if idx.shape[0] != n_units:
        raise DataError(
            f"rois has {idx.shape[0]} rows but data has {n_units} units",
            source=path,
            field=f"{where}/rois",
        )
    table = rois.table
    col = None
    for name in ("unit_id", "cell_specimen_id", "roi_id"):
        if table is not None and name in table.colnames:
            col = table[name].data
            break
    if col is not None:
        vals = np.asarray(col[:])
        ids = vals[idx] if vals.shape[0] > int(idx.max(initial=-1)) else None
        if ids is not None:
            return [x.decode() if isinstance(x, bytes) else str(x) for x in ids.tolist()]
    if table is not None:
        tid = np.asarray(table.id.data[:])
        if tid.shape[0] > int(idx.max(initial=-1)):
            return [str(x) for x in tid[idx].tolist()]
    return [str(i) for i in idx.tolist()]


def _decode(arr: np.ndarray) -> np.ndarray:
    if arr.dtype.kind == "O" or arr.dtype.kind == "S":
        vals = [x.decode() if isinstance(x, bytes) else x for x in arr.tolist()]
        if all(isinstance(x, str) for x in vals):
            return np.asarray(vals, dtype=str)
        return np.asarray(vals)
    return arr


def _find_trials(nwb, path: Path) -> tuple[Trials, str | None]:
    candidates = []
    if nwb.trials is not None:
        candidates.append(("intervals/trials", nwb.trials))
    if nwb.epochs is not None:
        candidates.append(("intervals/epochs", nwb.epochs))
    for name, table in sorted(nwb.intervals.items()):
        if name not in ("trials", "epochs", "invalid_times"):
            candidates.append((f"intervals/{name}", table))
    for where, table in candidates:
        colnames = list(table.colnames)
        dcol = next((c for c in DIRECTION_COLUMNS if c in colnames), None)
        if dcol is None:
            continue
        fcol = next((c for c in TF_COLUMNS if c in colnames), None)
        n = len(table)
        indexed = {c.target.name for c in table.columns if type(c).__name__ == "VectorIndex"}
        cols: dict[str, np.ndarray] = {}
        for c in ["start_time", "stop_time", *colnames]:
            if c in cols or c in ("tags", "timeseries") or c in indexed:
                continue
            arr = _decode(np.asarray(table[c].data[:]))
            if arr.ndim != 1 or arr.shape[0] != n:
                continue  # ragged or multi-dimensional: not a per-trial scalar
            cols[c] = arr
        try:
            direction = np.asarray(cols.pop(dcol), dtype=np.float64)
            tf = np.asarray(cols.pop(fcol), dtype=np.float64) if fcol else None
        except (TypeError, ValueError):
            raise DataError(
                f"direction/temporal-frequency columns are not numeric ('{dcol}', '{fcol}')",
                source=path,
                field=where,
            ) from None
        start, end = cols.pop("start_time"), cols.pop("stop_time")
        return Trials.from_arrays(start, end, direction, tf, **cols), where
    return Trials.empty(), None


def _covariates(nwb, n_frames: int, facts: dict) -> dict[str, np.ndarray]:
    from pynwb import TimeSeries

    if "behavior" not in nwb.processing:
        return {}
    out: dict[str, np.ndarray] = {}
    dtypes = facts.get("covariate_dtypes", {})
    for iface in nwb.processing["behavior"].data_interfaces.values():
        series = (
            [iface]
            if isinstance(iface, TimeSeries)
            else list(getattr(iface, "time_series", {}).values())
        )
        for s in series:
            data = np.asarray(s.data[:])
            if data.shape[:1] != (n_frames,) or data.dtype.kind not in "biuf":
                continue  # not on the imaging clock
            if s.name in dtypes:
                data = data.astype(dtypes[s.name], copy=False)
            out[s.name] = data
    return out


def _from_nwbfile(nwb, path: Path) -> Recording:
    facts: dict = {}
    if SCRATCH_NAME in getattr(nwb, "scratch", {}):
        try:
            raw = nwb.scratch[SCRATCH_NAME].data
            raw = raw[()] if hasattr(raw, "shape") else raw
            facts = json.loads(raw.decode() if isinstance(raw, bytes) else str(raw))
        except (ValueError, TypeError) as e:
            raise DataError(
                f"is not valid JSON ({one_line(e)})", source=path, field=f"scratch/{SCRATCH_NAME}"
            ) from None

    where, series = _find_dff(nwb, path)
    data = np.asarray(series.data[:])
    if data.dtype.kind not in "biuf":
        raise DataError(f"data has non-numeric dtype {data.dtype}", source=path, field=where)
    if data.ndim == 1:
        data = data[:, None]
    if data.ndim != 2:
        raise DataError(
            f"data must be 2-D [frames, units], got shape {data.shape}", source=path, field=where
        )
    timestamps, rate = _series_clock(series, data.shape[0], path, where)
    if timestamps.shape[0] != data.shape[0]:
        raise DataError(
            f"has {timestamps.shape[0]} timestamps but data has {data.shape[0]} frames "
            f"(shape {data.shape})",
            source=path,
            field=where,
        )
    unit_ids = _unit_ids(series, data.shape[1], path, where)

    sampling_rate = facts.get("sampling_rate") or rate
    if not sampling_rate:
        plane = getattr(
            getattr(getattr(series, "rois", None), "table", None), "imaging_plane", None
        )
        sampling_rate = getattr(plane, "imaging_rate", None)
    if not sampling_rate and timestamps.size > 1:
        sampling_rate = 1.0 / float(np.median(np.diff(timestamps)))
    if not sampling_rate:
        raise DataError(
            "cannot tell the sampling rate (one frame, no rate)", source=path, field=where
        )

    trials, _ = _find_trials(nwb, path)
    subject = nwb.subject
    genotype = getattr(subject, "genotype", None) if subject is not None else None
    subject_id = getattr(subject, "subject_id", None) if subject is not None else None
    session_id = nwb.session_id or facts.get("session_id") or nwb.identifier or path.stem

    metadata = dict(facts.get("metadata") or {})
    if not facts:
        metadata.update(
            {
                "nwb_identifier": nwb.identifier,
                "session_description": nwb.session_description,
                "session_start_time": nwb.session_start_time.isoformat()
                if nwb.session_start_time
                else None,
                "species": getattr(subject, "species", None),
                "dff_series": where,
            }
        )
    return Recording(
        traces=data.astype(np.float32, copy=False),
        timestamps=timestamps,
        unit_ids=unit_ids,
        session_id=str(session_id),
        subject_id=str(subject_id or facts.get("subject_id") or "unknown"),
        genetic_background=str(genotype or facts.get("genetic_background") or "unknown"),
        sampling_rate=float(sampling_rate),
        trials=trials,
        source=str(facts.get("source", "nwb")),
        source_path=str(path),
        pseudo_continuous=bool(facts.get("pseudo_continuous", False)),
        covariates=_covariates(nwb, data.shape[0], facts),
        metadata=metadata,
    )
