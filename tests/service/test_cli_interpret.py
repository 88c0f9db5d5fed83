"""`cortexlens interpret CHECKPOINT DATA... --out DIR` on real Park sessions (tiny settings)."""

from __future__ import annotations

import json

import pytest

from service.cli import main
from tests.models.interpret.test_pipeline import make_recording, tiny_checkpoint

TINY_ARGS = [
    "--steps", "30", "--e2e-steps", "6", "--sae-units", "24", "--k", "4", "--n-perm", "20",
    "--ablation-draws", "3", "--threads", "1", "--quiet", "--alpha", "0.2",
    "--max-unit-figures", "2",
]  # fmt: skip


def _run(args: list[str]) -> int:
    try:
        main(args)
    except SystemExit as e:
        return int(e.code or 0)
    return 0


@pytest.fixture(scope="module")
def park_ckpt(tmp_path_factory, park_recordings):
    recs = park_recordings[:2]
    path = tmp_path_factory.mktemp("ck") / "decoder"
    tiny_checkpoint(recs, dim=16, latents=2).save(path)
    return path


@pytest.mark.slow
def test_interpret_cli_writes_report_summary_and_units(park_ckpt, park_files, tmp_path, capsys):
    out = tmp_path / "interp"
    files = [str(p) for p in park_files[:3]]  # the third session is not in the checkpoint
    assert _run(["interpret", str(park_ckpt), *files, "--out", str(out), *TINY_ARGS]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["report"] == str(out / "report.html")
    s = json.loads((out / "summary.json").read_text())
    assert set(s["sae"]) >= {"l0", "fvu", "dead_fraction"}
    assert s["config"]["e2e_steps"] == 6 and s["config"]["steps"] == 30
    assert set(s["accuracy"]) == {"direction"}  # both sessions KO: no genetic task
    assert set(s["accuracy"]["direction"]) >= {"decoder", "spliced", "mean_ablation"}
    assert set(s["controls"]) >= {"random_init", "shuffled"}
    assert "direction" in s["labels"] and isinstance(s["ablation"], dict)
    assert len(s["data"]["sessions"]) == 2 and len(s["data"]["skipped_sessions"]) == 1
    units = json.loads((out / "units.json").read_text())
    assert units["n_units"] == 24
    html = (out / "report.html").read_text()
    assert "data:image/png;base64," in html and "Unit dashboards" in html
    assert (out / "sae" / "sae.safetensors").is_file()


def test_interpret_cli_user_errors_exit_2(park_ckpt, tmp_path, capsys):
    from models.data.io import write_recording

    assert _run(["interpret", str(tmp_path / "nope"), str(tmp_path), "--out", str(tmp_path)]) == 2
    assert "not a checkpoint directory" in capsys.readouterr().err
    other = write_recording(make_recording("other"), tmp_path / "other.nwb")
    rc = _run(["interpret", str(park_ckpt), str(other), "--out", str(tmp_path / "o"), *TINY_ARGS])
    assert rc == 2
    assert "vocabulary" in capsys.readouterr().err
