"""The real `cortexlens data ...` command line, in process (`service.cli.main`) and as a script."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from service.cli import main
from tests.models.data.test_park import EXPECTED


def run(capsys, *argv) -> tuple[int, str, str]:
    try:
        main(list(argv))
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    out, err = capsys.readouterr()
    return code, out, err


def test_info_on_the_park_sessions(capsys, park_dir):
    code, out, err = run(capsys, "data", "info", str(park_dir), "--json")
    assert code == 0, err
    sessions = json.loads(out)
    assert [s["subject_id"] for s in sessions] == list(EXPECTED)
    for s in sessions:
        n, group = EXPECTED[s["subject_id"]]
        assert (s["neurons"], s["genetic_background"]) == (n, group)
        assert s["trials"] == 128 and s["frame_rate_hz"] == 16.0
        assert s["frames"] == 128 * 49 and s["pseudo_continuous"]
        assert set(s["trials_per_condition"].values()) == {16}
        assert len(s["trials_per_condition"]) == 8

    code, out, _ = run(capsys, "data", "info", str(park_dir))  # the table
    assert code == 0 and "5 session(s)" in out and "mrcuts26" in out


def test_convert_to_nwb_then_info(capsys, park_files, tmp_path):
    src = park_files[-1]
    out_nwb = tmp_path / "out.nwb"
    code, out, err = run(capsys, "data", "convert", str(src), str(out_nwb))
    assert code == 0, err
    assert out_nwb.is_file() and "18 units" in out
    code, out, err = run(capsys, "data", "info", str(out_nwb), "--json")
    assert code == 0, err
    (s,) = json.loads(out)
    assert (s["neurons"], s["genetic_background"], s["trials"]) == (18, "control", 128)
    assert s["path"] == str(out_nwb) and s["frame_rate_hz"] == 16.0

    code, out, err = run(
        capsys, "data", "convert", str(src), str(tmp_path / "bs"), "--to", "brainsets"
    )
    assert code == 0, err
    (h5,) = sorted((tmp_path / "bs").glob("*.h5"))
    code, out, _ = run(capsys, "data", "info", str(h5), "--json")
    assert json.loads(out)[0]["neurons"] == 18


@pytest.mark.parametrize("name", ["corrupt.nwb", "corrupt.h5", "corrupt.mat"])
def test_corrupt_file_is_one_error_line_and_exit_2(capsys, tmp_path, name):
    bad = tmp_path / name
    bad.write_bytes(b"\x89HDF\r\n garbage " * 40)
    code, out, err = run(capsys, "data", "info", str(bad))
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and str(bad) in lines[0]
    assert "Traceback" not in err


def test_truncated_file_via_the_installed_script(park_files, tmp_path):
    from models.data.nwb import write_nwb
    from models.data.park import read_park

    good = write_nwb(read_park(park_files[-1]), tmp_path / "good.nwb")
    cut = tmp_path / "cut.nwb"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    exe = Path(sys.executable).with_name("cortexlens")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "service.cli"]
    proc = subprocess.run([*cmd, "data", "info", str(cut)], capture_output=True, text=True)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {cut}")
    assert "Traceback" not in proc.stderr


def test_simulate_cli_writes_sessions_and_rejects_bad_options(tmp_path, capsys):
    import pytest

    from service.cli import main

    out = tmp_path / "sim"
    with pytest.raises(SystemExit) as ei:
        main(["data", "simulate", "--out", str(out), "--cre-line", "NoSuchCre"])
    assert ei.value.code == 2
    err = capsys.readouterr().err
    assert "unknown Cre line 'NoSuchCre'" in err and "Traceback" not in err
    main(
        [
            "data", "simulate", "--sessions", "2", "--cells", "12", "--minutes", "0.5",
            "--seed", "1", "--cre-line", "Vip-IRES-Cre", "--out", str(out),
        ]
    )  # fmt: skip
    assert sorted(p.name for p in out.iterdir()) == [
        "sim-s1-000.nwb",
        "sim-s1-000.truth.json",
        "sim-s1-001.nwb",
        "sim-s1-001.truth.json",
    ]
    from models.data.io import load_recordings

    recs = load_recordings([out])
    assert [r.genetic_background for r in recs] == ["Vip-IRES-Cre"] * 2
    assert all(r.n_units == 12 and r.sampling_rate == 30.0 for r in recs)
