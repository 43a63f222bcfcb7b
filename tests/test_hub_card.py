"""Model cards rendered from a run's outputs parse back to the run's numbers (model_card.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
from huggingface_hub import ModelCard

from tests.fixtures_hub import LEADS, TARGETS, write_run_outputs
from topoflow.model_card import (
    CARD_METRICS,
    find_metrics_block,
    read_val_loss_csv,
    render_model_card,
    scores_from_card,
)

CONFIG = {
    "model_type": "topoflow",
    "variables": ["u", *TARGETS],
    "target_variables": TARGETS,
    "lead_times_hours": LEADS,
    "img_size": [4, 8],
    "elevation_bias_blocks": [0],
    "auto_map": {"AutoConfig": "configuration_topoflow.TopoFlowConfig"},
}


def _expected_scores(report: dict) -> dict[tuple[str, int, str], float]:
    expected = {}
    for variable, per_lead in report["metrics"]["variables"].items():
        for lead, row in per_lead.items():
            if lead == "all":
                continue
            for metric in CARD_METRICS:
                if row.get(metric) is not None:
                    expected[(variable, int(lead), metric)] = row[metric]
    return expected


def _render_and_reload(tmp_path: Path, report: dict, **kwargs) -> tuple[ModelCard, str]:
    card = render_model_card(
        config=CONFIG,
        report=report,
        repo_id="acme/topoflow-tiny",
        revision="v1.0",
        val_loss_rows=read_val_loss_csv(tmp_path / "run" / "val_loss.csv"),
        plot_filename="val_loss_curve.png",
        **kwargs,
    )
    card.save(tmp_path / "README.md")
    text = (tmp_path / "README.md").read_text(encoding="utf-8")
    return ModelCard.load(tmp_path / "README.md"), text


def test_card_metadata_and_model_index_equal_the_report(tmp_path: Path) -> None:
    report = write_run_outputs(tmp_path / "run")
    loaded, text = _render_and_reload(tmp_path, report)
    assert loaded.data.library_name == "transformers"
    assert {"topoflow", "air-quality", "synthetic-data"} <= set(loaded.data.tags)
    # A local corpus name is not a Hub dataset id: it stays out of `datasets:` (the model-index
    # still names it as the dataset type); an org/name id goes in.
    assert loaded.data.datasets is None
    assert loaded.data.eval_results[0].dataset_type == "topoflow-embedded-default"
    hub_card, _ = _render_and_reload(tmp_path, report, dataset_id="org/topoflow-corpus")
    assert hub_card.data.datasets == ["org/topoflow-corpus"]
    assert loaded.data.metrics == sorted({"rmse", "mae", "bias", "skill_persistence"})
    expected = _expected_scores(report)
    # every pollutant x lead x published score, with the report's exact float value
    assert {(v, lead) for v, lead, _ in expected} == {(v, h) for v in TARGETS for h in LEADS}
    assert scores_from_card(loaded) == expected
    assert all(r.dataset_split == "validation" for r in loaded.data.eval_results)
    assert "## Limitations" in text and "**synthetic**" in text


def test_card_tells_how_to_load_with_remote_code_and_a_pinned_revision(tmp_path: Path) -> None:
    report = write_run_outputs(tmp_path / "run")
    _, text = _render_and_reload(tmp_path, report)
    assert 'from_pretrained(\n    "acme/topoflow-tiny",\n    revision="v1.0"' in text
    assert "trust_remote_code=True" in text
    assert "![Validation loss during training](val_loss_curve.png)" in text
    assert report["verdict"]["verdict"] in text
    # the val-loss table comes from val_loss.csv, first and last rows included
    assert "| 0 | 0.52 |" in text and "| 10 | 0.43 |" in text
    # the scores table shows each pollutant x lead once
    for variable in TARGETS:
        for lead in LEADS:
            assert text.count(f"| {variable} | {lead} | ug/m3 |") == 1


def test_real_data_card_drops_the_synthetic_warning(tmp_path: Path) -> None:
    report = write_run_outputs(tmp_path / "run")
    loaded, text = _render_and_reload(
        tmp_path,
        report,
        synthetic=False,
        dataset_id="acme/caqra-2013-2018",
        dataset_name="CAQRA",
        base_model="acme/topoflow-base",
    )
    assert "synthetic-data" not in loaded.data.tags
    assert "**synthetic**" not in text and "Reanalysis is itself a model product" in text
    assert loaded.data.base_model == "acme/topoflow-base"
    assert loaded.data.eval_results[0].dataset_type == "acme/caqra-2013-2018"


def test_report_without_scores_renders_without_model_index(tmp_path: Path) -> None:
    report = write_run_outputs(tmp_path / "run")
    del report["metrics"]
    loaded, text = _render_and_reload(tmp_path, report)
    assert not loaded.data.eval_results
    assert "model-index" not in text
    assert "The run recorded no per-pollutant scores." in text


@pytest.mark.parametrize("key", ["test_metrics", "val_metrics"])
def test_metrics_block_is_found_under_split_keys(key: str, tmp_path: Path) -> None:
    report = write_run_outputs(tmp_path / "run")
    block = report.pop("metrics")
    report[key] = block
    split, found = find_metrics_block(report)
    assert found is block
    assert split == ("test" if key == "test_metrics" else "validation")
    nested = {"metrics": {"val": block, "test": {**block}}}
    assert find_metrics_block(nested)[0] == "test"
    loaded, _ = _render_and_reload(tmp_path, report)
    assert {r.dataset_split for r in loaded.data.eval_results} == {split}
    assert scores_from_card(loaded) == _expected_scores({"metrics": block})
