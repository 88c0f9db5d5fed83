"""Bundle format: write, verify, refuse tampering, load weights without pickle.

The helpers at the top (`make_sources`, `PROVENANCE`, ...) are shared with the registry and CLI
tests, which import them from this module.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
import pytest

from models.bundle import (
    FORMAT,
    STANDARD_FILES,
    Bundle,
    BundleError,
    content_sha256,
    file_provenance,
    verify_bundle,
    write_bundle,
)

# --- shared helpers ---------------------------------------------------------------------------


def tiny_onnx_bytes(scale: float = 2.0) -> bytes:
    """A real ONNX model: y = x * scale, x float32 [1, 4]."""
    import onnx
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])
    s = helper.make_tensor("s", TensorProto.FLOAT, [1], [scale])
    graph = helper.make_graph([helper.make_node("Mul", ["x", "s"], ["y"])], "tiny", [x], [y], [s])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


def safetensors_bytes(seed: int = 0) -> bytes:
    from safetensors.numpy import save

    rng = np.random.default_rng(seed)
    return save(
        {
            "w": rng.standard_normal((4, 3)).astype(np.float32),
            "b": np.arange(3, dtype=np.float32),
        }
    )


def make_sources(tmp: Path, seed: int = 0) -> dict[str, Path]:
    """The six standard bundle files written under `tmp` (distinct content per seed)."""
    tmp.mkdir(parents=True, exist_ok=True)
    files = {
        "model.onnx": tiny_onnx_bytes(2.0 + seed),
        "decoder.safetensors": safetensors_bytes(seed),
        "sae.safetensors": safetensors_bytes(seed + 100),
        "config.json": json.dumps({"decoder": {"dim": 16, "depth": 2}, "seed": seed}).encode(),
        "units.json": json.dumps([{"id": 0, "label": "direction 90°, OSI 0.71"}]).encode(),
        "metrics.json": json.dumps({"direction_acc": 0.5 + seed / 100}).encode(),
    }
    out = {}
    for name, data in files.items():
        p = tmp / name
        p.write_bytes(data)
        out[name] = p
    return out


PROVENANCE = {
    "data": [{"source": "park2024", "sessions": ["s1", "s2"], "sha256": "0" * 64}],
    "code": {"git": "deadbeef"},
    "seed": 0,
}


def make_bundle(tmp: Path, seed: int = 0, name: str = "v1-decoder") -> Bundle:
    return write_bundle(
        make_sources(tmp / f"src{seed}", seed),
        tmp / f"bundle{seed}",
        name=name,
        provenance=PROVENANCE,
        exporter="test",
    )


def flip_byte(path: Path, offset: int = 10) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


# --- tests ------------------------------------------------------------------------------------


def test_write_and_open_roundtrip(tmp_path):
    b = make_bundle(tmp_path)
    assert verify_bundle(b.path) == []
    assert sorted(p.name for p in b.path.iterdir()) == sorted([*STANDARD_FILES, "manifest.json"])
    m = json.loads((b.path / "manifest.json").read_text())
    assert m["format"] == FORMAT == "cortexlens-bundle/1"
    assert m["name"] == "v1-decoder" and m["version"] is None and m["parent"] is None
    assert m["provenance"] == PROVENANCE
    assert m["extra"] == {"exporter": "test"}
    assert sorted(m["required"]) == sorted(STANDARD_FILES)
    src = tmp_path / "src0"
    for f in STANDARD_FILES:
        import hashlib

        assert m["files"][f]["sha256"] == hashlib.sha256((src / f).read_bytes()).hexdigest()
        assert m["files"][f]["size"] == (src / f).stat().st_size
    assert b.content_sha256 == content_sha256({f: e["sha256"] for f, e in m["files"].items()})

    again = Bundle.open(b.path)
    assert again.manifest == b.manifest
    w = again.load_safetensors("decoder.safetensors")
    assert w["w"].shape == (4, 3) and w["b"].tolist() == [0, 1, 2]
    assert again.read_json("metrics.json") == {"direction_acc": 0.5}

    import onnxruntime as ort

    sess = ort.InferenceSession(again.read_bytes("model.onnx"), providers=["CPUExecutionProvider"])
    (y,) = sess.run(None, {"x": np.ones((1, 4), np.float32)})
    assert y.tolist() == [[2.0] * 4]


def test_same_content_same_content_sha(tmp_path):
    a = make_bundle(tmp_path, seed=0)
    b = write_bundle(
        make_sources(tmp_path / "again", 0), tmp_path / "b2", name="other", provenance={}
    )
    c = make_bundle(tmp_path, seed=1)
    assert a.content_sha256 == b.content_sha256 != c.content_sha256


def test_bytes_sources_and_declared_required(tmp_path):
    b = write_bundle(
        {"model.onnx": tiny_onnx_bytes(), "config.json": b"{}", "model.onnx.data": b"\0" * 16},
        tmp_path / "b",
        name="m",
        provenance={"note": "onnx only"},
        required=["model.onnx", "config.json"],
    )
    assert b.manifest.required == ["config.json", "model.onnx"]
    assert set(b.files) == {"model.onnx", "config.json", "model.onnx.data"}
    assert verify_bundle(b.path) == []


def test_write_refuses_incomplete_or_bad_inputs(tmp_path):
    src = make_sources(tmp_path / "src")
    partial = {k: v for k, v in src.items() if k != "units.json"}
    with pytest.raises(BundleError, match="units.json"):
        write_bundle(partial, tmp_path / "b", name="m", provenance={})
    with pytest.raises(BundleError, match="metrics.json: not valid JSON"):
        write_bundle({**src, "metrics.json": b"{nope"}, tmp_path / "b", name="m", provenance={})
    with pytest.raises(BundleError, match="sae.safetensors: not a safetensors"):
        write_bundle(
            {**src, "sae.safetensors": b"\x80\x02pickle"}, tmp_path / "b", name="m", provenance={}
        )
    with pytest.raises(BundleError, match="invalid file name"):
        write_bundle({**src, "../evil": b"x"}, tmp_path / "b", name="m", provenance={})
    with pytest.raises(BundleError, match="model name"):
        write_bundle(src, tmp_path / "b", name="a/b", provenance={})
    assert not (tmp_path / "b").exists()
    assert [p for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp left


def test_write_is_atomic_on_failure(tmp_path, monkeypatch):
    import models.bundle as mb

    src = make_sources(tmp_path / "src")
    real = mb._write_file
    calls = []

    def failing(dst, s):
        calls.append(dst.name)
        if len(calls) == 3:
            raise OSError("disk full (simulated)")
        return real(dst, s)

    monkeypatch.setattr(mb, "_write_file", failing)
    with pytest.raises(OSError, match="simulated"):
        write_bundle(src, tmp_path / "out" / "b", name="m", provenance={})
    assert list((tmp_path / "out").iterdir()) == []  # no bundle, no temp directory


def test_overwrite(tmp_path):
    make_bundle(tmp_path, seed=0)
    with pytest.raises(BundleError, match="already exists"):
        make_bundle(tmp_path, seed=0)
    b = write_bundle(
        make_sources(tmp_path / "s1", 1),
        tmp_path / "bundle0",
        name="m",
        provenance={},
        overwrite=True,
    )
    assert b.read_json("config.json")["seed"] == 1
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


@pytest.mark.parametrize(
    "tamper, expect",
    [
        (lambda p: flip_byte(p / "model.onnx"), r"model\.onnx: modified \(sha256"),
        (lambda p: flip_byte(p / "decoder.safetensors", -1), r"decoder\.safetensors: modified"),
        (lambda p: (p / "units.json").unlink(), r"units\.json: missing"),
        (lambda p: (p / "stray.bin").write_bytes(b"x"), r"stray\.bin: not listed"),
        (lambda p: (p / "config.json").write_text('{"a": 1}'), r"config\.json: modified \(size"),
        (lambda p: (p / "manifest.json").unlink(), r"manifest\.json: missing"),
        (lambda p: (p / "manifest.json").write_text("{"), r"manifest\.json: not valid JSON"),
        (
            lambda p: _edit_manifest(
                p, lambda m: m["files"]["metrics.json"].update(sha256="ab" * 32)
            ),
            r"metrics\.json: modified",
        ),
        (
            lambda p: _edit_manifest(p, lambda m: m.update(format="cortexlens-bundle/9")),
            r"manifest\.json: unsupported format 'cortexlens-bundle/9'",
        ),
        (lambda p: _edit_manifest(p, lambda m: m.pop("format")), r"manifest\.json: malformed"),
        (
            lambda p: _edit_manifest(
                p, lambda m: m["files"].update({"../x": {"sha256": "0" * 64, "size": 1}})
            ),
            r"manifest\.json: malformed \(invalid file name '\.\./x'\)",
        ),
        (
            lambda p: _edit_manifest(p, lambda m: m["files"].pop("sae.safetensors")),
            r"sae\.safetensors: required by the manifest but not listed",
        ),
        (
            lambda p: _edit_manifest(p, lambda m: m["files"]["units.json"].update(sha256="zz")),
            r"manifest\.json: malformed \(invalid field\(s\): files\.units\.json\.sha256",
        ),
    ],
)
def test_tampered_bundle_is_refused(tmp_path, tamper, expect):
    b = make_bundle(tmp_path)
    tamper(b.path)
    problems = verify_bundle(b.path)
    assert problems and any(re.search(expect, p) for p in problems), problems
    with pytest.raises(BundleError, match=expect):
        Bundle.open(b.path)


def _edit_manifest(path: Path, fn) -> None:
    m = json.loads((path / "manifest.json").read_text())
    fn(m)
    (path / "manifest.json").write_text(json.dumps(m))


def test_not_a_directory(tmp_path):
    assert verify_bundle(tmp_path / "nope") == [f"{tmp_path / 'nope'}: not a directory"]
    with pytest.raises(BundleError, match="not a directory"):
        Bundle.open(tmp_path / "nope")


def test_read_bytes_rechecks_hash_after_open(tmp_path):
    b = make_bundle(tmp_path)
    flip_byte(b.path / "sae.safetensors", -2)  # tampered after a successful open
    with pytest.raises(BundleError, match=r"sae\.safetensors: modified"):
        b.load_safetensors("sae.safetensors")
    with pytest.raises(BundleError, match=r"nothing\.bin: not in bundle"):
        b.read_bytes("nothing.bin")


def test_symlink_refused(tmp_path):
    b = make_bundle(tmp_path)
    target = tmp_path / "elsewhere.json"
    os.replace(b.path / "units.json", target)
    os.symlink(target, b.path / "units.json")
    assert any("units.json: is a symbolic link" in p for p in verify_bundle(b.path))


def test_file_provenance(tmp_path):
    src = make_sources(tmp_path / "s")
    (rec,) = file_provenance([src["config.json"]])
    assert rec["size"] == src["config.json"].stat().st_size and len(rec["sha256"]) == 64
    with pytest.raises(BundleError, match="not found"):
        file_provenance([tmp_path / "missing.mat"])
