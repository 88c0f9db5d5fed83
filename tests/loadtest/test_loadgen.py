"""`python -m loadtest`: one tiny point end to end (quick bundle, in-process baselines, the bare
gRPC server, the real Serve application); the JSON's shape is checked, never the timings."""

from __future__ import annotations

import json

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.ray, pytest.mark.timeout(900)]


def test_tiny_point_writes_every_section(tmp_path):
    from loadtest import harness
    from loadtest.__main__ import main

    out, md, plots = tmp_path / "point.json", tmp_path / "point.md", tmp_path / "plots"
    argv = [
        "--sessions", "2", "--cells", "64", "--rate", "10", "--seconds", "3",
        "--floor-seconds", "0.5", "--json", str(out), "--markdown", str(md),
        "--plots", str(plots), "--cache", str(harness.CACHE), "--max-seconds", "800",
    ]  # fmt: skip
    res = main(argv)
    doc = json.loads(out.read_text())
    assert doc["config"]["sessions"] == 2 and doc["config"]["cells"] == 64
    for sec in harness.SECTIONS:
        assert "skipped" not in doc[sec], (sec, doc[sec])
        for key in harness.REQUIRED_KEYS:
            assert key in doc[sec], (sec, key)
        assert doc[sec]["frames_sent"] > 0
        assert doc[sec]["frames_answered"] + doc[sec]["frames_dropped"] >= 1
    for sec in ("service", "bare_grpc"):
        s = doc[sec]
        assert s["n_errors"] == 0, s["errors"]
        assert s["frames_sent"] == 2 * 30  # 2 sessions x 3 s x 10 Hz
        assert s["decodes_expected"] == s["frames_answered"] + s["frames_dropped"]
        assert set(s["server_ms"]) >= {"queue_p50", "model_p50", "server_total_p50"}
    assert set(doc["ratios"]) >= {"service/bare_grpc", "service/onnx_floor"}
    assert "met" in doc["target"]
    assert res["target"] == doc["target"]
    assert "service/bare_grpc" in md.read_text()
    assert (plots / "latency_cdf.png").stat().st_size > 0
