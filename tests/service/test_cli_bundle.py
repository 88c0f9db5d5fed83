"""`cortexlens bundle ...` and `cortexlens registry ...` through the real entry point."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from models.registry import Registry
from service.cli import main
from tests.models.test_bundle import flip_byte, make_bundle

REPO = Path(__file__).resolve().parents[2]


def run(argv: list[str], capsys) -> tuple[int, str, str]:
    """Run `cortexlens ARGV` in-process through `service.cli.main`; return (status, out, err)."""
    try:
        main(argv)
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    out, err = capsys.readouterr()
    return code, out, err


def test_verify_intact_and_tampered(tmp_path, capsys):
    b = make_bundle(tmp_path)
    code, out, err = run(["bundle", "verify", str(b.path)], capsys)
    assert code == 0, err
    assert out.startswith(f"OK {b.path}") and b.content_sha256 in out

    flip_byte(b.path / "model.onnx")
    code, out, err = run(["bundle", "verify", str(b.path)], capsys)
    assert code == 1
    assert err.startswith("error: ") and "model.onnx: modified" in err
    assert len(err.strip().splitlines()) == 1


@pytest.mark.parametrize(
    "tamper, fname",
    [
        (lambda p: (p / "units.json").unlink(), "units.json: missing"),
        (lambda p: (p / "stray.bin").write_bytes(b"x"), "stray.bin: not listed"),
        (lambda p: (p / "manifest.json").unlink(), "manifest.json: missing"),
    ],
)
def test_verify_names_the_file(tmp_path, capsys, tamper, fname):
    b = make_bundle(tmp_path)
    tamper(b.path)
    code, _, err = run(["bundle", "verify", str(b.path)], capsys)
    assert code == 1 and fname in err


def test_verify_via_console_script(tmp_path):
    """The installed `cortexlens` script (a real process) gives the same exit codes."""
    exe = Path(sys.executable).parent / "cortexlens"
    cmd = (
        [str(exe)]
        if exe.exists()
        else [sys.executable, "-c", "from service.cli import main; main()"]
    )
    b = make_bundle(tmp_path)
    ok = subprocess.run(
        [*cmd, "bundle", "verify", str(b.path)], capture_output=True, text=True, cwd=REPO
    )
    assert ok.returncode == 0, ok.stderr
    flip_byte(b.path / "decoder.safetensors", -1)
    bad = subprocess.run(
        [*cmd, "bundle", "verify", str(b.path)], capture_output=True, text=True, cwd=REPO
    )
    assert bad.returncode != 0 and "decoder.safetensors" in bad.stderr


def test_show(tmp_path, capsys):
    b = make_bundle(tmp_path)
    code, out, _ = run(["bundle", "show", str(b.path)], capsys)
    assert code == 0
    assert "v1-decoder" in out and "intact" in out and "park2024" in out and "model.onnx" in out
    code, out, _ = run(["bundle", "show", "--json", str(b.path)], capsys)
    m = json.loads(out)
    assert m["verified"] is True and m["format"] == "cortexlens-bundle/1"
    (b.path / "units.json").unlink()
    code, out, _ = run(["bundle", "show", str(b.path)], capsys)
    assert code == 0 and "NOT INTACT" in out and "units.json: missing" in out
    code, _, err = run(["bundle", "show", str(tmp_path / "nope")], capsys)
    assert code == 2 and err.startswith("error:") and "not a directory" in err


def test_registry_commands(tmp_path, capsys):
    root = tmp_path / "reg"
    b0, b1 = make_bundle(tmp_path, 0), make_bundle(tmp_path, 1)
    assert run(["registry", "publish", str(root), "dec", str(b0.path), "--promote"], capsys)[
        :2
    ] == (0, "published dec v0001 (current)\n")
    assert (
        run(["registry", "publish", str(root), "dec", str(b1.path)], capsys)[1]
        == "published dec v0002\n"
    )

    code, out, _ = run(["registry", "list", str(root)], capsys)
    assert code == 0 and "dec  current v0001  (2 versions)" in out
    code, out, _ = run(["registry", "list", str(root), "dec"], capsys)
    lines = out.strip().splitlines()
    assert lines[0].startswith("* v0001") and lines[1].startswith("  v0002")

    code, out, _ = run(
        ["registry", "promote", str(root), "dec", "v0002", "--reason", "better"], capsys
    )
    assert code == 0 and out == "promoted dec v0002 (was v0001)\n"
    assert Registry(root).current("dec") == "v0002"

    code, out, _ = run(["registry", "rollback", str(root), "dec"], capsys)
    assert code == 0 and out == "rolled back dec to v0001 (was v0002)\n"
    code, out, _ = run(["registry", "rollback", str(root), "dec", "--to", "v0002"], capsys)
    assert code == 0 and Registry(root).current("dec") == "v0002"

    code, out, _ = run(["registry", "history", str(root), "dec"], capsys)
    assert code == 0 and len(out.strip().splitlines()) == 4 and "(better)" in out

    code, out, _ = run(["registry", "list", "--json", str(root), "dec"], capsys)
    assert [v["current"] for v in json.loads(out)] == [False, True]


def test_registry_user_errors(tmp_path, capsys):
    root = tmp_path / "reg"
    b = make_bundle(tmp_path)
    run(["registry", "publish", str(root), "dec", str(b.path), "--promote"], capsys)
    for argv, msg in [
        (["registry", "promote", str(root), "dec", "v0042"], "no such version"),
        (["registry", "rollback", str(root), "dec"], "no earlier promoted version"),
        (["registry", "list", str(tmp_path / "absent")], "no such registry"),
    ]:
        code, _, err = run(argv, capsys)
        assert code == 2 and err.startswith("error:") and msg in err, (argv, err)

    run(["registry", "publish", str(root), "dec", str(b.path)], capsys)
    flip_byte(Registry(root).path("dec", "v0002") / "model.onnx")
    code, _, err = run(["registry", "promote", str(root), "dec", "v0002"], capsys)
    assert code == 2 and "model.onnx: modified" in err
    assert Registry(root).current("dec") == "v0001"
