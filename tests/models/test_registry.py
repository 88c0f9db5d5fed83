"""Registry: publish, promote, current, rollback, history, atomicity, concurrency, tampering."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
from pathlib import Path

import pytest

from models.bundle import Bundle, BundleError
from models.registry import Registry, RegistryError
from tests.models.test_bundle import PROVENANCE, flip_byte, make_bundle, make_sources


@pytest.fixture()
def reg(tmp_path) -> Registry:
    return Registry(tmp_path / "registry")


def test_publish_promote_current_rollback(tmp_path, reg):
    b0, b1, b2 = (make_bundle(tmp_path, seed=s) for s in range(3))
    assert reg.current("dec") is None
    assert reg.publish(b0.path, "dec") == "v0001"
    assert reg.current("dec") is None  # publishing does not promote
    assert reg.promote("dec", "v0001") == "v0001"
    v2 = reg.publish(b1.path, "dec")
    v3 = reg.publish(b2, "dec", parent="v0001", reason="refit")
    assert (v2, v3) == ("v0002", "v0003")

    infos = reg.list_versions("dec")
    assert [i.version for i in infos] == ["v0001", "v0002", "v0003"]
    assert [i.current for i in infos] == [True, False, False]
    # parent defaults to the current version; an explicit parent is kept
    assert [i.parent for i in infos] == [None, "v0001", "v0001"]
    assert infos[1].content_sha256 == b1.content_sha256
    assert reg.names() == ["dec"]

    opened = reg.open("dec", "v0003")
    assert opened.version == "v0003" and opened.parent == "v0001" and opened.name == "dec"
    assert opened.provenance == PROVENANCE
    assert opened.manifest.extra["reason"] == "refit"
    assert opened.content_sha256 == b2.content_sha256
    assert reg.open("dec").version == "v0001"  # current

    reg.promote("dec", "v0002")
    reg.promote("dec", "v0003")
    assert reg.current("dec") == "v0003"
    assert reg.rollback("dec") == "v0002"  # previous promoted
    assert reg.current("dec") == "v0002"
    assert reg.rollback("dec") == "v0001"  # walks further back
    with pytest.raises(RegistryError, match="no earlier promoted version"):
        reg.rollback("dec")
    assert reg.rollback("dec", to="v0003") == "v0003"  # named version
    assert reg.open("dec").version == "v0003"
    # old versions stay available
    assert all(reg.verify("dec", v) == [] for v in ("v0001", "v0002", "v0003"))

    hist = reg.history("dec")
    assert [(h["action"], h["previous"], h["version"]) for h in hist] == [
        ("promote", None, "v0001"),
        ("promote", "v0001", "v0002"),
        ("promote", "v0002", "v0003"),
        ("rollback", "v0003", "v0002"),
        ("rollback", "v0002", "v0001"),
        ("rollback", "v0001", "v0003"),
    ]
    ptr = json.loads((reg.root / "dec" / "current.json").read_text())
    assert ptr["version"] == "v0003" and ptr["manifest_sha256"] == reg.open("dec").manifest_sha256


def test_publish_from_files_and_promote_flag(tmp_path, reg):
    v = reg.publish(make_sources(tmp_path / "s"), "m", provenance=PROVENANCE, promote=True)
    assert v == "v0001" and reg.current("m") == "v0001"
    with pytest.raises(RegistryError, match="provenance"):
        reg.publish(make_sources(tmp_path / "s"), "m")


def test_unknown_names_and_versions(tmp_path, reg):
    b = make_bundle(tmp_path)
    reg.publish(b.path, "m")
    with pytest.raises(RegistryError, match="no such version"):
        reg.promote("m", "v0009")
    with pytest.raises(RegistryError, match="not a registry version"):
        reg.promote("m", "latest")
    with pytest.raises(RegistryError, match="no current version"):
        reg.open("m")
    with pytest.raises(RegistryError, match="parent version not in the registry"):
        reg.publish(b.path, "m", parent="v0007")
    with pytest.raises(BundleError, match="model name"):
        reg.publish(b.path, "../x")
    assert reg.current("m") is None
    with pytest.raises(RegistryError, match="no such registry"):
        Registry(tmp_path / "absent", create=False)


def test_promotion_is_a_single_atomic_pointer_file(tmp_path, reg):
    reg.publish(make_bundle(tmp_path).path, "m", promote=True)
    mdir = reg.root / "m"
    assert sorted(p.name for p in mdir.iterdir()) == [
        ".lock",
        ".staging",
        "current.json",
        "history.jsonl",
        "index.jsonl",
        "versions",
    ]
    assert not (mdir / "current.json").is_symlink()
    assert list((mdir / ".staging").iterdir()) == []


def test_tampered_source_bundle_not_published(tmp_path, reg):
    b = make_bundle(tmp_path)
    (b.path / "units.json").unlink()
    with pytest.raises(BundleError, match=r"units\.json: missing"):
        reg.publish(b.path, "m")
    assert reg.list_versions("m") == []


@pytest.mark.parametrize(
    "tamper, expect",
    [
        (lambda p: flip_byte(p / "model.onnx"), r"model\.onnx: modified"),
        (lambda p: (p / "metrics.json").unlink(), r"metrics\.json: missing"),
        (lambda p: (p / "extra.txt").write_text("x"), r"extra\.txt: not listed"),
    ],
)
def test_tampered_version_refused(tmp_path, reg, tamper, expect):
    reg.publish(make_bundle(tmp_path, 0).path, "m", promote=True)
    reg.publish(make_bundle(tmp_path, 1).path, "m")
    tamper(reg.path("m", "v0002"))
    with pytest.raises(BundleError, match=expect):
        reg.open("m", "v0002")
    with pytest.raises(BundleError, match=expect):
        reg.promote("m", "v0002")  # never promote a tampered version
    assert reg.current("m") == "v0001"
    assert reg.verify("m", "v0002") and reg.verify("m", "v0001") == []


def test_consistent_retamper_of_file_and_manifest_refused(tmp_path, reg):
    """Editing a file *and* its manifest hash is caught by the registry index."""
    import hashlib

    reg.publish(make_bundle(tmp_path).path, "m", promote=True)
    p = reg.path("m", "v0001")
    (p / "metrics.json").write_text('{"direction_acc": 0.99}')
    m = json.loads((p / "manifest.json").read_text())
    data = (p / "metrics.json").read_bytes()
    m["files"]["metrics.json"] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
    (p / "manifest.json").write_text(json.dumps(m))
    assert Bundle.open(p)  # self-consistent on its own
    with pytest.raises(BundleError, match=r"manifest\.json: modified after publishing"):
        reg.open("m")


def test_crash_while_publishing_leaves_no_version(tmp_path, reg, monkeypatch):
    import models.registry as mr

    b = make_bundle(tmp_path)
    reg.publish(b.path, "m", promote=True)

    def boom(*a, **k):
        raise RuntimeError("crash in the middle of publishing (simulated)")

    # crash after the files are staged, while the manifest is being written under the lock
    monkeypatch.setattr(mr, "write_bytes_durable", boom)
    with pytest.raises(RuntimeError, match="simulated"):
        reg.publish(make_bundle(tmp_path, 1).path, "m")
    monkeypatch.undo()
    assert [i.version for i in reg.list_versions("m")] == ["v0001"]
    assert reg.current("m") == "v0001"
    assert list((reg.root / "m" / ".staging").iterdir()) == []
    assert reg.publish(make_bundle(tmp_path, 2).path, "m") == "v0002"


def _publish_then_die(root: str, src: str) -> None:
    """Child process: killed (os._exit) halfway through copying files into staging."""
    import models.bundle as mb

    real = mb._write_file
    n = [0]

    def dying(dst, s):
        n[0] += 1
        if n[0] == 3:
            os._exit(17)
        return real(dst, s)

    mb._write_file = dying
    Registry(root).publish(src, "m")


def test_killed_publisher_leaves_no_visible_version(tmp_path, reg):
    b = make_bundle(tmp_path)
    ctx = mp.get_context("spawn")
    p = ctx.Process(target=_publish_then_die, args=(str(reg.root), str(b.path)))
    p.start()
    p.join(60)
    assert p.exitcode == 17
    assert reg.list_versions("m") == []  # the half-written staging dir is invisible
    assert any((reg.root / "m" / ".staging").iterdir())
    assert reg.publish(b.path, "m") == "v0001"


def _publish_many(root: str, src: str, n: int, q) -> None:
    q.put([Registry(root).publish(src, "m") for _ in range(n)])


def test_concurrent_publishers_get_distinct_versions(tmp_path, reg):
    b = make_bundle(tmp_path)
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [
        ctx.Process(target=_publish_many, args=(str(reg.root), str(b.path), 4, q)) for _ in range(2)
    ]
    for p in procs:
        p.start()
    got = [v for _ in procs for v in q.get(timeout=120)]
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    assert sorted(got) == [f"v{i:04d}" for i in range(1, 9)]
    assert [i.version for i in reg.list_versions("m")] == sorted(got)
    for v in got:
        assert reg.open("m", v).version == v


def test_version_numbers_never_reused(tmp_path, reg):
    """A version number recorded in the index is burned even if its directory vanished."""
    import shutil

    b = make_bundle(tmp_path)
    reg.publish(b.path, "m")
    reg.publish(b.path, "m")
    shutil.rmtree(reg.path("m", "v0002"))
    assert reg.publish(b.path, "m") == "v0003"


def test_list_versions_ignores_junk(tmp_path, reg):
    reg.publish(make_bundle(tmp_path).path, "m")
    vdir = reg.root / "m" / "versions"
    (vdir / "v0005").mkdir()  # no manifest: incomplete, not a version
    (vdir / "notes").mkdir()
    assert [i.version for i in reg.list_versions("m")] == ["v0001"]
    assert Path(reg.path("m", "v0001")).is_dir()
    assert reg.publish(make_bundle(tmp_path, 1).path, "m") == "v0006"  # never onto v0005
