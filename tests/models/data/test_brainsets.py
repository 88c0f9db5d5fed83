import h5py
import numpy as np
import pytest

from models.data.brainsets import read_brainsets, write_brainsets
from models.data.recording import DataError, Recording, Trials

T, N = 300, 6
RATE = 30.0


def _interval(grp, cols, timekeys, unicode_keys=()):
    for k, v in cols.items():
        grp[k] = v
    grp.attrs["object"] = "Interval"
    grp.attrs["timekeys"] = np.array(timekeys, dtype="S")
    grp.attrs["_unicode_keys"] = np.array(list(unicode_keys), dtype="S")


def _allen_h5(path, *, units_group="rois", cre_where="subject", mutate=None):
    """A session laid out like brainsets' allen_visual_coding_ophys_2016 output."""
    rng = np.random.default_rng(0)
    with h5py.File(path, "w") as f:
        f.attrs["object"] = "Data"
        f.attrs["absolute_start"] = 0.0
        subj = f.create_group("subject")
        subj.attrs.update(
            {"object": "Data", "absolute_start": 0.0, "id": "511510650", "species": "MUS_MUSCULUS"}
        )
        subj.attrs.update({"age": 104.0, "sex": "MALE", "genotype": "unknown"})
        if cre_where == "subject":
            subj.attrs["cre_line"] = "Cux2-CreERT2"
        elif cre_where == "root":
            f.attrs["subject.cre_line"] = "Cux2-CreERT2"
        sess = f.create_group("session")
        sess.attrs.update(
            {"object": "Data", "absolute_start": 0.0, "id": "501940850"}
            | {"recording_date": "2016-02-04 10:25:24"}
        )
        ct = f.create_group("calcium_traces")  # RegularTimeSeries
        ct["df_over_f"] = rng.normal(size=(T, N)).astype(np.float32)
        ct.attrs["object"] = "RegularTimeSeries"
        ct.attrs["sampling_rate"] = RATE
        _interval(ct.create_group("domain"), {"start": [9.5], "end": [9.5 + (T - 1) / RATE]}, [])
        units = f.create_group(units_group)  # ArrayDict
        units["id"] = np.array([str(587000000 + i) for i in range(N)], dtype="S")
        units["imaging_plane_xy"] = rng.uniform(0, 512, size=(N, 2))
        units.attrs["object"] = "ArrayDict"
        units.attrs["_unicode_keys"] = np.array(["id"], dtype="S")
        start = 9.5 + np.arange(8) * 1.0
        orient = np.arange(8) * 45.0
        _interval(
            f.create_group("drifting_gratings"),
            {
                "start": start,
                "end": start + 0.9,
                "orientation": orient,
                "temporal_frequency": np.array([1.0, 2, 4, 8, 15, 1, 2, 4]),
                "timestamps": start + 0.45,
                "orientation_id": (orient // 45).astype(np.int64),
            },
            ["start", "end", "timestamps"],
        )
        if mutate is not None:
            mutate(f)
    return path


def test_park_sessions_round_trip_exactly(park_recordings, tmp_path):
    for rec in park_recordings:
        path = write_brainsets(rec, tmp_path / f"{rec.session_id}.h5")
        back = read_brainsets(path)
        assert back.differences(rec) == []
        assert back.source == "park2024" and back.pseudo_continuous
        assert back.metadata == rec.metadata
        for name, cov in rec.covariates.items():
            np.testing.assert_array_equal(back.covariates[name], cov)
    with h5py.File(path, "r") as f:  # the temporaldata layout
        assert f.attrs["object"] == "Data"
        assert f["calcium_traces"].attrs["object"] == "IrregularTimeSeries"
        assert f["calcium_traces/df_over_f"].shape == (rec.n_frames, rec.n_units)
        assert f["units"].attrs["object"] == "ArrayDict"
        assert f["units/id"][0].decode() == rec.unit_ids[0]
        assert f["drifting_gratings"].attrs["object"] == "Interval"
        np.testing.assert_array_equal(f["drifting_gratings/orientation"][:], rec.trials.direction)
        assert f["subject"].attrs["genotype"] == rec.genetic_background


def test_written_file_loads_with_temporaldata(park_recordings, tmp_path):
    td = pytest.importorskip("temporaldata")
    rec = park_recordings[-1]
    path = write_brainsets(rec, tmp_path / "s.h5")
    with h5py.File(path, "r") as f:
        data = td.Data.from_hdf5(f, lazy=False)
        np.testing.assert_array_equal(data.calcium_traces.df_over_f, rec.traces)
        np.testing.assert_array_equal(data.calcium_traces.timestamps, rec.timestamps)
        assert list(data.units.id) == list(rec.unit_ids)
        np.testing.assert_array_equal(data.drifting_gratings.orientation, rec.trials.direction)
        assert data.subject.id == rec.subject_id and data.session.id == rec.session_id


def test_irregular_clock_strings_and_cre_line_round_trip(tmp_path):
    rng = np.random.default_rng(1)
    ts = 10.0 + np.cumsum(rng.uniform(0.03, 0.04, 200))
    rec = Recording(
        traces=rng.normal(size=(200, 4)),
        timestamps=ts,
        unit_ids=[f"c{i}" for i in range(4)],
        session_id="s1",
        subject_id="m1",
        genetic_background="Sst-IRES-Cre",
        sampling_rate=30.0,
        trials=Trials.from_arrays(
            ts[[10, 100]],
            ts[[60, 150]],
            [np.nan, 315.0],
            [np.nan, 15.0],
            stimulus=np.array(["blank", "grating"]),
            repeat=np.array([0, 1]),
        ),
        source="simulated",
        covariates={"speed": np.where(np.arange(200) % 7 == 0, np.nan, 1.0)},
        metadata={"area": "VISp", "seed": 3, "nested": {"a": [1, 2]}},
    )
    back = read_brainsets(write_brainsets(rec, tmp_path / "x" / "small.h5"))
    assert back.differences(rec) == []
    assert back.trials.extra["stimulus"].tolist() == ["blank", "grating"]
    assert back.metadata == rec.metadata
    assert back.genetic_background == "Sst-IRES-Cre"


@pytest.mark.parametrize("units_group", ["rois", "units"])
@pytest.mark.parametrize("cre_where", ["subject", "root"])
def test_reads_allen_pipeline_layout(tmp_path, units_group, cre_where):
    path = _allen_h5(tmp_path / "allen.h5", units_group=units_group, cre_where=cre_where)
    rec = read_brainsets(path)
    assert rec.source == "brainsets" and not rec.pseudo_continuous
    assert rec.traces.shape == (T, N) and rec.sampling_rate == RATE
    np.testing.assert_allclose(rec.timestamps, 9.5 + np.arange(T) / RATE)
    assert rec.unit_ids[0] == "587000000" and len(rec.unit_ids) == N
    assert rec.session_id == "501940850" and rec.subject_id == "511510650"
    assert rec.genetic_background == "Cux2-CreERT2"
    assert rec.trials.direction.tolist() == [0, 45, 90, 135, 180, 225, 270, 315]
    assert rec.trials.temporal_frequency.tolist() == [1, 2, 4, 8, 15, 1, 2, 4]
    assert set(rec.trials.extra) == {"orientation_id"}
    assert rec.metadata["subject.species"] == "MUS_MUSCULUS"


def test_genotype_when_no_cre_line(tmp_path):
    def genotype_only(f):
        f["subject"].attrs["genotype"] = "KO"

    rec = read_brainsets(_allen_h5(tmp_path / "a.h5", cre_where=None, mutate=genotype_only))
    assert rec.genetic_background == "KO"
    rec = read_brainsets(_allen_h5(tmp_path / "b.h5", cre_where=None))
    assert rec.genetic_background == "unknown"


def test_reads_a_file_written_by_temporaldata(tmp_path):
    td = pytest.importorskip("temporaldata")
    rng = np.random.default_rng(3)
    traces = td.RegularTimeSeries(
        df_over_f=rng.normal(size=(120, 3)).astype(np.float32),
        sampling_rate=RATE,
        domain_start=2.0,
    )
    grat = td.Interval(
        start=np.array([2.5, 4.0]),
        end=np.array([3.5, 5.0]),
        orientation=np.array([90.0, 270.0]),
        temporal_frequency=np.array([2.0, 8.0]),
    )
    data = td.Data(
        subject=td.Data(id="m9", cre_line="Vip-IRES-Cre", species="MUS_MUSCULUS"),
        session=td.Data(id="s9"),
        calcium_traces=traces,
        units=td.ArrayDict(id=np.array(["a", "b", "c"])),
        drifting_gratings=grat,
        domain=traces.domain,
    )
    path = tmp_path / "td.h5"
    with h5py.File(path, "w") as f:
        data.to_hdf5(f)
    rec = read_brainsets(path)
    assert rec.unit_ids == ("a", "b", "c") and rec.session_id == "s9"
    assert rec.genetic_background == "Vip-IRES-Cre" and rec.subject_id == "m9"
    np.testing.assert_allclose(rec.timestamps, 2.0 + np.arange(120) / RATE)
    assert rec.trials.direction.tolist() == [90.0, 270.0]


def _drop(name):
    return lambda f: f.__delitem__(name)


def _put(name, value):
    def mutate(f):
        if name in f:
            del f[name]
        f[name] = value

    return mutate


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (_drop("calcium_traces"), r"field 'calcium_traces': missing group 'calcium_traces'"),
        (_drop("calcium_traces/df_over_f"), r"field 'calcium_traces/df_over_f': missing"),
        (_put("calcium_traces/df_over_f", np.zeros((3, 4, 5))), r"must be 2-D"),
        (
            lambda f: f["calcium_traces"].attrs.__delitem__("sampling_rate"),
            r"field 'calcium_traces'.*neither a 'timestamps' dataset nor a positive",
        ),
        (
            _put("calcium_traces/timestamps", np.arange(10.0)),
            r"field 'calcium_traces/timestamps'.*10 entries but df_over_f has 300",
        ),
        (_drop("rois"), r"field 'units/id'.*missing group 'units' \(or 'rois'\)"),
        (_put("rois/id", np.array([b"1", b"2"])), r"field 'rois/id'.*2 ids but df_over_f has 6"),
        (_drop("drifting_gratings/orientation"), r"field 'drifting_gratings/orientation': missing"),
        (
            _put("drifting_gratings/end", np.arange(3.0)),
            r"field 'drifting_gratings/end'.*expected \(8,\)",
        ),
        (
            _put("drifting_gratings/start", np.array([b"a"] * 8)),
            r"field 'drifting_gratings/start'.*must be numeric",
        ),
        (
            _put("calcium_traces/df_over_f", np.full((T, N), np.nan)),
            r"field 'traces'.*NaN/Inf",
        ),
    ],
)
def test_malformed_files_name_file_and_field(tmp_path, mutate, match):
    path = _allen_h5(tmp_path / "bad.h5", mutate=mutate)
    with pytest.raises(DataError, match=match) as ei:
        read_brainsets(path)
    assert str(ei.value).startswith(str(path)) and "\n" not in str(ei.value)


def test_corrupt_truncated_and_missing_files(tmp_path, park_recordings):
    junk = tmp_path / "junk.h5"
    junk.write_bytes(b"\x00garbage" * 100)
    with pytest.raises(DataError, match=r"junk.h5: not an HDF5 file"):
        read_brainsets(junk)

    good = write_brainsets(park_recordings[0], tmp_path / "good.h5")
    blob = good.read_bytes()
    for frac in (0.3, 0.8):
        cut = tmp_path / f"cut{frac}.h5"
        cut.write_bytes(blob[: int(len(blob) * frac)])
        with pytest.raises(DataError, match=str(cut)) as ei:
            read_brainsets(cut)
        assert "\n" not in str(ei.value)

    with pytest.raises(DataError, match="no such file"):
        read_brainsets(tmp_path / "missing.h5")


def test_write_errors_are_data_errors(tmp_path, park_recordings):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(DataError, match=r"cannot write HDF5 file"):
        write_brainsets(park_recordings[0], blocker / "out.h5")
