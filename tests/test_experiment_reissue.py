"""scripts/reissue_results.py: a published report gets its seed-level verdict, keeps its
sample-level numbers as the labelled secondary view, and a second run changes nothing."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "reissue_results.py"


@pytest.fixture(scope="module")
def reissue():
    spec = importlib.util.spec_from_file_location("reissue_results", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.reissue


def _published(folder: Path) -> None:
    """A report as published before issue 13: sample-level verdict, per-seed means."""
    folder.mkdir()
    per_seed = {"0": {"control": 0.70, "arm": 0.69}, "1": {"control": 0.72, "arm": 0.71},
                "2": {"control": 0.71, "arm": 0.705}}
    comparison = {"arm": "topoflow", "per_seed_test_loss": per_seed,
                  "verdict": {"direction": "topoflow better", "text": "Topoflow better: old."}}
    (folder / "report.json").write_text(json.dumps({"comparisons": {"topoflow": comparison}}))
    (folder / "report.md").write_text("# Experiment\n\n## Verdict: topoflow vs control\n\n"
                                      "**Verdict:** Topoflow better: old.\n\n### Per pollutant\n")


def test_reissue_adds_the_seed_level_verdict_and_is_idempotent(reissue, tmp_path: Path) -> None:
    folder = tmp_path / "result"
    _published(folder)
    changes = reissue(folder, 0.01)
    assert changes == {"topoflow": ("topoflow better", "better")}
    report = json.loads((folder / "report.json").read_text())
    verdict = report["comparisons"]["topoflow"]["verdict"]
    # Per-seed changes 1 - arm / control: 1.43%, 1.39%, 0.70%.
    assert verdict["gain_per_seed"] == pytest.approx([0.01 / 0.70, 0.01 / 0.72, 0.005 / 0.71])
    assert verdict["bootstrap"] is None and "t interval only" in verdict["text"]
    assert report["comparisons"]["topoflow"]["sample_level"]["direction"] == "topoflow better"
    md = (folder / "report.md").read_text()
    assert "**Verdict (better, training seed as the unit; re-issued 2026-11-30):** Better" in md
    assert "published as the verdict on 2026-11-25" in md and "Topoflow better: old." in md
    before = {f: (folder / f).read_text() for f in ("report.json", "report.md")}
    assert reissue(folder, 0.01) == changes
    assert {f: (folder / f).read_text() for f in before} == before


def test_a_report_without_the_published_paragraph_is_refused(reissue, tmp_path: Path) -> None:
    folder = tmp_path / "result"
    _published(folder)
    (folder / "report.md").write_text("## Verdict: topoflow vs control\n\nsomething else\n")
    with pytest.raises(ValueError, match=r"report.md: no '\*\*Verdict:\*\* ' paragraph"):
        reissue(folder, 0.01)
