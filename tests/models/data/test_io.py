import shutil

import pytest

from models.data.io import load_recordings, read_recording, write_recording
from models.data.recording import DataError


@pytest.fixture(scope="module")
def mixed_dir(park_files, park_recordings, tmp_path_factory):
    """One Park session of each kind: .mat (copied), .nwb and .h5 (converted), plus a .txt."""
    d = tmp_path_factory.mktemp("mixed")
    shutil.copy(park_files[0], d / park_files[0].name)  # the name carries mouse and session
    write_recording(park_recordings[1], d / "b_session.nwb", fmt="nwb")
    write_recording(park_recordings[2], d / "c_session.h5", fmt="brainsets")
    (d / "notes.txt").write_text("not a recording")
    return d


def test_directory_with_mixed_formats(mixed_dir, park_files, park_recordings):
    recs = load_recordings([mixed_dir])
    assert [r.source_path.rsplit("/", 1)[-1] for r in recs] == [
        park_files[0].name,
        "b_session.nwb",
        "c_session.h5",
    ]
    for rec, original in zip(recs, park_recordings[:3], strict=True):
        assert rec.equals(original), rec.differences(original)


def test_globs_and_several_paths(mixed_dir):
    assert [r.session_id for r in load_recordings([str(mixed_dir / "*.nwb")])] == [
        "230803_mrcuts25_fov6"
    ]
    recs = load_recordings([mixed_dir / "c_session.h5", str(mixed_dir / "[2b]*")])
    assert [r.source_path.rsplit(".", 1)[-1] for r in recs] == ["h5", "mat", "nwb"]


def test_write_recording_formats(park_recordings, tmp_path):
    rec = park_recordings[-1]
    for fmt, suffix in (("nwb", ".nwb"), ("brainsets", ".h5")):
        path = write_recording(rec, tmp_path / f"out{suffix}", fmt=fmt)
        assert read_recording(path).equals(rec)
    with pytest.raises(DataError, match="unknown output format 'csv'"):
        write_recording(rec, tmp_path / "out.csv", fmt="csv")


def test_user_errors_are_one_clear_data_error(tmp_path, mixed_dir):
    bad = tmp_path / "notes.txt"
    bad.write_text("x")
    with pytest.raises(DataError, match=r"notes.txt: unsupported file type '.txt'"):
        load_recordings([bad])

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match=r"empty: directory holds no supported files"):
        load_recordings([empty])

    with pytest.raises(DataError, match=r"nowhere: no such file or directory"):
        load_recordings([tmp_path / "nowhere"])

    with pytest.raises(DataError, match=r"glob matched no files"):
        load_recordings([str(tmp_path / "*.nwb")])

    # one corrupt file among good ones names the corrupt file
    broken = tmp_path / "broken"
    shutil.copytree(mixed_dir, broken)
    (broken / "d_session.nwb").write_bytes(b"garbage" * 100)
    (broken / "e_session.h5").write_bytes((mixed_dir / "c_session.h5").read_bytes()[:4000])
    with pytest.raises(DataError, match=r"d_session.nwb: not an NWB file"):
        load_recordings([broken])
    (broken / "d_session.nwb").unlink()
    with pytest.raises(DataError, match=r"e_session.h5: ") as ei:
        load_recordings([broken])
    assert "\n" not in str(ei.value)
