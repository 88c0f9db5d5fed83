import datetime as dt
import warnings

import h5py
import numpy as np
import pytest

from models.data.nwb import read_nwb, write_nwb
from models.data.recording import DataError, Recording, Trials

pynwb = pytest.importorskip("pynwb")


def _small_recording(**changes) -> Recording:
    rng = np.random.default_rng(1)
    n_frames, n_units = 300, 5
    # jittered (irregular) clock: must be written as explicit timestamps and come back exactly
    ts = 10.0 + np.cumsum(rng.uniform(0.03, 0.04, n_frames))
    speed = rng.normal(size=n_frames)
    speed[[3, 50]] = np.nan
    kw = dict(
        traces=rng.normal(size=(n_frames, n_units)).astype(np.float32),
        timestamps=ts,
        unit_ids=[f"cell-{i}" for i in range(n_units)],
        session_id="sess1",
        subject_id="mouse7",
        genetic_background="Sst-IRES-Cre",
        sampling_rate=30.0,
        trials=Trials.from_arrays(
            ts[[10, 100, 200]],
            ts[[60, 150, 250]],
            [0.0, np.nan, 315.0],
            [1.0, np.nan, 15.0],
            contrast=np.array([0.8, 0.0, 0.8]),
            stimulus=np.array(["grating", "blank", "grating"]),
            repeat=np.array([0, 1, 2]),
        ),
        source="simulated",
        covariates={"speed": speed},
        metadata={"area": "VISp", "species": "Mus musculus", "age_days": 90, "seed": 3},
    )
    kw.update(changes)
    return Recording(**kw)


@pytest.fixture(scope="module")
def park_nwb(park_recordings, tmp_path_factory):
    """Every Park session written to NWB once: (recording, path) pairs."""
    out = tmp_path_factory.mktemp("park_nwb")
    return [(rec, write_nwb(rec, out / f"{rec.session_id}.nwb")) for rec in park_recordings]


def test_park_sessions_round_trip_exactly(park_nwb):
    for rec, path in park_nwb:
        back = read_nwb(path)
        assert back.differences(rec) == []
        assert back.equals(rec)
        assert back.source == "park2024" and back.pseudo_continuous
        assert back.source_path == str(path)
        assert back.genetic_background == rec.genetic_background
        assert back.metadata == rec.metadata
        assert set(back.trials.extra) == {"segment_start", "segment_end"}
        for name, cov in rec.covariates.items():
            np.testing.assert_array_equal(back.covariates[name], cov)  # NaN where NaN
            assert back.covariates[name].dtype == cov.dtype
        assert back.traces.dtype == np.float32


def test_written_file_is_valid_nwb_and_passes_inspector(park_nwb):
    from nwbinspector import Importance, inspect_nwbfile

    rec, path = min(park_nwb, key=lambda rp: rp[0].n_units)
    assert pynwb.validate(path=str(path)) == []
    important = [
        m
        for m in inspect_nwbfile(nwbfile_path=str(path))
        if m.importance in (Importance.CRITICAL, Importance.BEST_PRACTICE_VIOLATION)
    ]
    assert important == [], [f"{m.check_function_name}: {m.message}" for m in important]

    with pynwb.NWBHDF5IO(str(path), "r") as io:
        nwb = io.read()
        dff = nwb.processing["ophys"]["DfOverF"]["dff"]
        assert dff.data.shape == (rec.n_frames, rec.n_units) and dff.data.dtype == np.float32
        assert dff.rate == pytest.approx(16.0) and dff.timestamps is None  # regular clock
        seg = nwb.processing["ophys"]["ImageSegmentation"]["PlaneSegmentation"]
        assert list(seg["unit_id"].data[:]) == list(rec.unit_ids)
        assert nwb.subject.genotype == rec.genetic_background
        assert nwb.subject.species == "Mus musculus"
        assert nwb.session_id == rec.session_id
        assert len(nwb.trials) == 128
        assert nwb.imaging_planes["ImagingPlane"].location == "VISp"


def test_irregular_clock_strings_blanks_and_nan_covariates_round_trip(tmp_path):
    rec = _small_recording()
    path = write_nwb(rec, tmp_path / "sub" / "small.nwb")
    back = read_nwb(path)
    assert back.differences(rec) == []
    assert back.trials.extra["stimulus"].tolist() == ["grating", "blank", "grating"]
    assert np.isnan(back.trials.direction[1]) and np.isnan(back.covariates["speed"][3])
    assert back.metadata == rec.metadata
    with pynwb.NWBHDF5IO(str(path), "r") as io:
        dff = io.read().processing["ophys"]["DfOverF"]["dff"]
        np.testing.assert_array_equal(dff.timestamps[:], rec.timestamps)
    assert pynwb.validate(path=str(path)) == []


def _foreign_nwb(
    path,
    *,
    data=None,
    rate=8.0,
    timestamps=None,
    interface="Fluorescence",
    trials_in="epochs",
    ophys=True,
    genotype="Vip-IRES-Cre/wt",
    mutate=None,
):
    """An NWB file as another tool might write it (no cortexlens facts)."""
    from pynwb import NWBFile
    from pynwb.file import Subject
    from pynwb.ophys import DfOverF, Fluorescence, ImageSegmentation, OpticalChannel

    rng = np.random.default_rng(2)
    data = rng.normal(size=(80, 4)).astype(np.float64) if data is None else data
    nwb = NWBFile(
        session_description="foreign",
        identifier="abc-123",
        session_start_time=dt.datetime(2020, 1, 2, tzinfo=dt.UTC),
        session_id="exp42",
        subject=Subject(subject_id="m1", species="Mus musculus", genotype=genotype, age="P60D"),
    )
    if ophys:
        device = nwb.create_device(name="scope")
        plane = nwb.create_imaging_plane(
            name="plane",
            optical_channel=OpticalChannel(name="ch", description="g", emission_lambda=520.0),
            description="p",
            device=device,
            excitation_lambda=920.0,
            indicator="GCaMP6f",
            location="VISp",
            imaging_rate=rate or 8.0,
        )
        mod = nwb.create_processing_module(name="ophys", description="ophys")
        segm = ImageSegmentation()
        mod.add(segm)
        seg = segm.create_plane_segmentation(name="cells", description="d", imaging_plane=plane)
        for i in range(4):
            mask = np.zeros((4, 4))
            mask[i, i] = 1.0
            seg.add_roi(image_mask=mask, id=101 + i)
        if interface is not None:
            iface = (Fluorescence if interface == "Fluorescence" else DfOverF)(name=interface)
            mod.add(iface)
            timing = {"timestamps": timestamps} if timestamps is not None else {"rate": rate}
            iface.create_roi_response_series(
                name="RoiResponseSeries",
                data=data,
                rois=seg.create_roi_table_region(region=[0, 1, 2, 3], description="all"),
                unit="n.a.",
                starting_time=2.0 if timestamps is None else None,
                **timing,
            )
    if trials_in == "epochs":
        nwb.add_epoch_column("orientation", "drift direction (deg)")
        nwb.add_epoch_column("tf", "temporal frequency (Hz)")
        for i in range(4):
            nwb.add_epoch(
                start_time=2.0 + 2 * i, stop_time=3.0 + 2 * i, orientation=90.0 * i, tf=2.0
            )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pynwb.NWBHDF5IO(str(path), "w") as io:
            io.write(nwb)
    if mutate is not None:  # break the file below pynwb's own checks
        with h5py.File(path, "a") as f:
            mutate(f["processing/ophys/Fluorescence/RoiResponseSeries"])
    return path


def _replace(name, value):
    def mutate(grp):
        del grp[name]
        grp[name] = value

    return mutate


def test_reads_files_written_by_other_tools(tmp_path):
    path = _foreign_nwb(tmp_path / "foreign.nwb")
    rec = read_nwb(path)
    assert rec.source == "nwb" and not rec.pseudo_continuous
    assert rec.traces.shape == (80, 4) and rec.traces.dtype == np.float32
    np.testing.assert_allclose(rec.timestamps, 2.0 + np.arange(80) / 8.0)
    assert rec.sampling_rate == 8.0
    assert rec.unit_ids == ("101", "102", "103", "104")  # PlaneSegmentation ids
    assert rec.session_id == "exp42" and rec.subject_id == "m1"
    assert rec.genetic_background == "Vip-IRES-Cre/wt"
    assert rec.trials.direction.tolist() == [0.0, 90.0, 180.0, 270.0]
    assert rec.trials.temporal_frequency.tolist() == [2.0] * 4
    assert rec.trials.start.tolist() == [2.0, 4.0, 6.0, 8.0]
    assert rec.trials.extra == {}
    assert rec.metadata["species"] == "Mus musculus"

    # explicit timestamps, DfOverF, no trials, no genotype
    ts = np.linspace(0, 10, 80)
    path = _foreign_nwb(
        tmp_path / "f2.nwb", timestamps=ts, interface="DfOverF", trials_in=None, genotype=None
    )
    rec = read_nwb(path)
    np.testing.assert_array_equal(rec.timestamps, ts)
    assert rec.genetic_background == "unknown" and len(rec.trials) == 0
    assert rec.sampling_rate == 8.0  # the imaging plane's imaging_rate


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"ophys": False}, r"field 'processing/ophys'.*no 'ophys' processing module"),
        ({"interface": None}, r"field 'processing/ophys'.*no RoiResponseSeries"),
        (
            {"data": np.full((80, 4), np.nan)},
            r"field 'traces'.*NaN/Inf",
        ),
        (
            {"timestamps": np.arange(80.0), "mutate": _replace("timestamps", np.arange(50.0))},
            r"Fluorescence/RoiResponseSeries'.*50 timestamps but data has 80 frames",
        ),
        (
            {"mutate": _replace("data", np.zeros((80, 4, 2)))},
            r"Could not construct RoiResponseSeries.*incorrect shape for data: got \(80, 4, 2\)",
        ),
        ({"mutate": _replace("data", np.zeros((80, 3)))}, r"rois has 4 rows but data has 3"),
        ({"mutate": _replace("data", np.array(["a"] * 80, dtype="S"))}, r"non-numeric"),
    ],
)
def test_malformed_files_name_file_and_field(tmp_path, kwargs, match):
    path = _foreign_nwb(tmp_path / "bad.nwb", **kwargs)
    with pytest.raises(DataError, match=match) as ei:
        read_nwb(path)
    assert str(ei.value).startswith(str(path))
    assert "\n" not in str(ei.value)


def test_corrupt_truncated_and_foreign_files_give_one_clear_error(tmp_path):
    junk = tmp_path / "junk.nwb"
    junk.write_bytes(b"not an nwb file at all" * 50)
    with pytest.raises(DataError, match=r"junk.nwb: not an NWB file \(not HDF5\)"):
        read_nwb(junk)

    good = write_nwb(_small_recording(), tmp_path / "good.nwb")
    blob = good.read_bytes()
    for frac in (0.5, 0.9):
        cut = tmp_path / f"cut{frac}.nwb"
        cut.write_bytes(blob[: int(len(blob) * frac)])
        with pytest.raises(DataError, match=str(cut)) as ei:
            read_nwb(cut)
        assert "\n" not in str(ei.value)

    plain = tmp_path / "plain.nwb"
    with h5py.File(plain, "w") as f:
        f["x"] = np.arange(3)
    with pytest.raises(DataError, match="not an NWB file"):
        read_nwb(plain)

    with pytest.raises(DataError, match="no such file"):
        read_nwb(tmp_path / "missing.nwb")


def test_write_errors_are_data_errors(tmp_path):
    rec = _small_recording()
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(DataError, match=r"cannot write NWB file"):
        write_nwb(rec, blocker / "out.nwb")  # parent is a file
    clash = rec.replace(trials=Trials.from_arrays([11.0], [12.0], [0.0], start_time=[1.0]))
    with pytest.raises(DataError, match=r"field 'trials'.*'start_time' clashes"):
        write_nwb(clash, tmp_path / "clash.nwb")
