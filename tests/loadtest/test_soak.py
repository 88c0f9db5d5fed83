"""`python -m loadtest soak`: a short soak in CI (~45 s of streaming), the full 10-minute one only
with ``CORTEXLENS_SOAK=1``. The report's structure and that nothing was lost are checked; the
drift figures are reported, not judged, except that they exist and are finite."""

from __future__ import annotations

import json
import math
import os

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.ray, pytest.mark.timeout(1200)]


def _check(doc: dict, *, sessions: int, seconds: float, rate: float, window_s: float) -> None:
    assert doc["config"]["sessions"] == sessions and doc["config"]["seconds"] == seconds
    # windows cover the run by send time, every frame of every session answered or coalesced
    n_win = math.ceil(seconds / window_s)
    assert [w["window"] for w in doc["windows"]] == list(range(n_win))
    for w in doc["windows"]:
        assert w["predictions"] > 0, w
        assert 0 < w["p50_ms"] <= w["p90_ms"] <= w["p99_ms"] <= w["max_ms"], w
    t = doc["totals"]
    assert t["frames_sent"] == sessions * round(seconds * rate)
    assert t["n_errors"] == 0, t["errors"]
    assert t["sessions_closed"] == sessions
    assert (
        sum(w["predictions"] for w in doc["windows"]) + t["decodes_coalesced"]
        >= (t["decodes_expected"])
    )
    # RSS of the Ray processes, sampled through the run, by role
    rss = doc["rss"]
    assert len(rss) >= 3 and all(s["total_mib"] > 100 for s in rss)
    assert rss[-1]["t_s"] <= seconds + 1e-6
    roles = set(rss[0]["by_role_mib"])
    assert {"raylet", "serve_grpc_proxy", "ingress", "decoder_model", "session_actors"} <= roles
    d = doc["drift"]
    for k in ("p50_ms_per_min", "p99_ms_per_min", "rss_mib_per_min"):
        assert d[k] is not None and math.isfinite(d[k]), (k, d[k])
    assert set(d["rss_mib_per_min_by_role"]) == {r for s in rss for r in s["by_role_mib"]}
    # nothing lost: the records hold every frame sent, every decode due is accounted for
    lost = doc["lost"]
    assert lost["frames_lost"] == 0, lost["records"]
    assert lost["decodes_unaccounted"] == 0
    assert len(lost["records"]) == sessions
    for r in lost["records"].values():
        assert r["missing"] == 0 and r["extra"] == 0 and r["values_match"], r
    assert doc["ok"] is True


def _soak(tmp_path, argv: list[str]) -> tuple[dict, str]:
    from loadtest import harness
    from loadtest.__main__ import main

    out, md = tmp_path / "soak.json", tmp_path / "SOAK.md"
    res = main(["soak", *argv, "--json", str(out), "--markdown", str(md),
                "--cache", str(harness.CACHE)])  # fmt: skip
    doc = json.loads(out.read_text())
    assert res["ok"] == doc["ok"]
    return doc, md.read_text()


def test_short_soak_reports_drift_and_loses_nothing(tmp_path):
    doc, md = _soak(
        tmp_path,
        ["--seconds", "45", "--sessions", "2", "--cells", "64", "--rate", "10",
         "--window-s", "10", "--sample-s", "2", "--max-seconds", "600"],
    )  # fmt: skip
    _check(doc, sessions=2, seconds=45.0, rate=10.0, window_s=10.0)
    assert "# cortexlens soak" in md and "| 40-45 |" in md and "Drift" in md


@pytest.mark.skipif(
    os.environ.get("CORTEXLENS_SOAK") != "1",
    reason="the 10-minute soak runs only with CORTEXLENS_SOAK=1 (CI runs the 45 s one)",
)
def test_ten_minute_soak(tmp_path):
    doc, md = _soak(
        tmp_path,
        ["--minutes", "10", "--sessions", "4", "--cells", "128", "--rate", "30",
         "--max-seconds", "1100"],
    )  # fmt: skip
    _check(doc, sessions=4, seconds=600.0, rate=30.0, window_s=60.0)
    print("\n" + md)
