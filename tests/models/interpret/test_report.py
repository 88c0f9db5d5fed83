"""The HTML report: self-contained (embedded PNGs), every section, a dashboard per labelled unit."""

from __future__ import annotations

import base64
import re

import numpy as np
import pytest

from models.interpret.report import write_report
from tests.models.interpret.test_pipeline import ckpt, recs, result  # noqa: F401  (fixtures)

PNG = b"\x89PNG\r\n\x1a\n"


def test_report_is_self_contained_with_all_sections(result, tmp_path):  # noqa: F811
    # make sure there are labelled units to show (the tiny untrained model may have none)
    lab = result.labelling
    saved = {k: v.copy() for k, v in lab.labelled.items()}
    lab.labelled["direction"][:3] = True
    try:
        path = write_report(result, tmp_path, n_top=3, max_unit_figures=3)
    finally:
        lab.labelled.update(saved)
    text = path.read_text()
    assert path.name == "report.html"
    for heading in (
        "What is and is not supported",
        "Decoding with the SAE spliced in",
        "Unit labels: real model vs controls",
        "Most selective units per variable",
        "Ablation",
        "Per-prediction attribution",
        "Unit dashboards",
    ):
        assert heading in text, heading
    imgs = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', text)
    assert len(imgs) >= 8
    assert all(base64.b64decode(b)[:8] == PNG for b in imgs)
    assert not re.search(r'src="(?!data:)', text)  # nothing referenced outside the file
    for u in range(3):
        assert f'id="unit-{u}"' in text
    pngs = sorted((tmp_path / "figures").glob("*.png"))
    names = {p.name for p in pngs}
    assert {"accuracy.png", "selectivity.png", "ablation.png"} <= names
    assert len([n for n in names if n.startswith("unit_")]) == 3
    assert all(p.read_bytes()[:8] == PNG for p in pngs)


@pytest.mark.slow
def test_report_caps_dashboards_and_handles_no_labels(result, tmp_path):  # noqa: F811
    lab = result.labelling
    saved = {k: v.copy() for k, v in lab.labelled.items()}
    for k in lab.labelled:
        lab.labelled[k] = np.zeros_like(lab.labelled[k])
    try:
        text = write_report(result, tmp_path / "none").read_text()
        assert "No unit was labelled." in text
        lab.labelled["direction"][:5] = True
        vr = lab.real.variables["direction"]
        top2 = np.argsort(-vr.primary_stat[:5])[:2]
        text = write_report(result, tmp_path / "cap", max_unit_figures=2).read_text()
        assert text.count('class="unit"') == 5 and "figures are drawn for the 2 most" in text
        drawn = sorted(p.name for p in (tmp_path / "cap" / "figures").glob("unit_*.png"))
        assert drawn == [f"unit_{u:05d}.png" for u in sorted(top2)]
    finally:
        lab.labelled.update(saved)
