"""`loadtest.bench_export`: the ONNX Runtime vs eager sweep, on a tiny model (no timing checks).

The quick mode runs in-process (two ONNX exports, ~10 s each, dominate the test's time); the
JSON and markdown shapes are checked, never the timings.
"""

from __future__ import annotations

import json

import pytest

pytest.importorskip("onnxruntime")

from loadtest import bench_export as be  # noqa: E402

TINY = [
    "--dim", "16", "--dim-head", "8", "--depth", "1", "--num-latents", "2",
    "--sae-units", "32", "--sae-k", "4", "--top-m", "4",
]  # fmt: skip


def test_quick_mode_writes_every_config(tmp_path, capsys):
    out_json, out_md = tmp_path / "b.json", tmp_path / "b.md"
    argv = TINY + [
        "--quick", "--cells", "8,16", "--batches", "1,2", "--repeats", "3", "--warmup", "1",
        "--max-seconds", "600", "--json", str(out_json), "--markdown", str(out_md),
    ]  # fmt: skip
    res = be.main(argv)
    on_disk = json.loads(out_json.read_text())
    assert on_disk["rows"] == json.loads(json.dumps(res["rows"]))

    # quick: the patch graphs, attributions on and off, each exported once
    assert [(e["tokenizer"], e["attributions"]) for e in res["exports"]] == [
        ("patch", True),
        ("patch", False),
    ]
    for e in res["exports"]:
        assert e["export_s"] > 0 and e["parity"]["logits"] < 1e-4
        assert ("direction.attributions" in e["outputs"]) is e["attributions"]
    assert res["top_m"] == 4 and res["threads"] == 1
    assert res["decoder"]["dim"] == 16 and res["sae"]["n_units"] == 32
    assert "untrained" in res["weights"]

    rows = res["rows"]
    assert not res["skipped"]
    assert len(rows) == 2 * 2 * 2  # attributions x cells x batches
    keys = {(r["attributions"], r["cells"], r["batch"]) for r in rows}
    assert keys == {(a, c, b) for a in (True, False) for c in (8, 16) for b in (1, 2)}
    for r in rows:
        assert r["tokenizer"] == "patch" and r["tokens"] == r["cells"] * r["batch"]
        assert 1 <= r["repeats"] <= 3
        for eng in ("ort_ms", "eager_ms", "eager_folded_ms"):
            assert set(r[eng]) == {"p50", "p90", "p99", "mean"}
            assert 0 < r[eng]["p50"] <= r[eng]["p90"] <= r[eng]["p99"]
        assert (
            r["speedup_p50"] > 0
            and r["speedup_paired_median"] > 0
            and r["speedup_vs_folded_eager_p50"] > 0
            and r["max_abs_diff_logits"] < 1e-4
        )
    assert res["settings"]["block"] == 10

    sp = res["checks"]["patch_speedup"]
    assert sp["target"] == 3.0 and sp["measured_configs"] == 8
    assert len(sp["meets"]) + len(sp["fails"]) == 8
    budget = res["checks"]["patch_512_budget"]
    assert budget["budget_ms"] == 3.3 and budget["measured"] is False  # no 512-cell config

    md = out_md.read_text()
    assert "| tokenizer | attributions |" in md and md.count("| patch |") == 8
    printed = capsys.readouterr().out
    assert "check 1" in printed and "check 2" in printed and "eager/ORT" in printed
    assert "folded eager" in printed and "folded eager" in md


def test_plan_counts_poyo_tokens_and_skips_above_the_budget():
    args = be.parse_args(
        TINY + ["--cells", "8,16", "--batches", "1,4", "--max-tokens", "900", "--fs", "30"]
    )
    dec = be.build_decoder("poyo", 16, args)
    models = [be.ExplainedDecoder(dec, _sae(), 4, attributions=a) for a in (True, False)]
    variants = [be.Variant("poyo", m.attributions, m, m, None, 0, 0, {}) for m in models]
    todo, skipped = be.plan(args, variants)
    # 1 s at 30 Hz: 30 frames x cells tokens per window
    tokens = {(c["cells"], c["batch"], c["attributions"]): c["tokens"] for c in todo + skipped}
    assert tokens[(8, 1, True)] == 240 and tokens[(16, 4, False)] == 1920
    assert {(c["cells"], c["batch"]) for c in skipped} == {(8, 4), (16, 4)}
    assert all("--max-tokens" in c["reason"] for c in skipped)
    assert [c["tokens"] for c in todo] == sorted(c["tokens"] for c in todo)


def test_quick_defaults_yield_to_explicit_flags():
    a = be.parse_args(["--quick"])
    assert a.tokenizers == "patch" and a.cells == "64,512" and a.max_seconds < 60
    b = be.parse_args(["--quick", "--tokenizers", "poyo", "--max-seconds", "5"])
    assert b.tokenizers == "poyo" and b.max_seconds == 5 and b.batches == "1,4"
    full = be.parse_args([])
    assert full.cells == "64,128,256,512,1024,2048" and full.batches == "1,4,16,64"
    assert full.tokenizers == "patch,poyo" and full.attributions == "on,off"


def _sae():
    from models.sae import SAEConfig, build_sae

    return build_sae(SAEConfig(d_in=16, n_units=32, k=4)).eval()
