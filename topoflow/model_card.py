"""Model cards rendered from a training run's real outputs with huggingface_hub's ModelCard.

The card's YAML carries `library_name: transformers`, tags, datasets, metrics and a `model-index`
with one metric per pollutant x lead time x score, read from the run's report.json (the dict of
`topoflow.metrics.ForecastMetrics.compute()`); `scores_from_card` reads them back, so a test can
check that a card says exactly what the run measured. The Markdown body comes from the Jinja
template hub_cards/model_card.md.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from topoflow.hub import is_hub_repo_id

__all__ = [
    "TEMPLATE_PATH",
    "CARD_METRICS",
    "TASK_TYPE",
    "ForecastScore",
    "find_metrics_block",
    "forecast_scores",
    "scores_from_card",
    "read_val_loss_csv",
    "load_report",
    "render_model_card",
]

TEMPLATE_PATH = Path(__file__).resolve().parent / "hub_cards" / "model_card.md"
# Scores of ForecastMetrics.compute() published per pollutant x lead; `n` and the reference RMSEs
# stay in report.json (they describe the evaluation, not the model).
CARD_METRICS = (
    "rmse",
    "mae",
    "bias",
    "skill_persistence",
    "skill_climatology",
    "skill_damped_persistence",
)
TASK_TYPE = "time-series-forecasting"
_METRICS_KEYS = ("test_metrics", "metrics", "val_metrics", "validation_metrics", "final_metrics")
_SPLIT_PREFERENCE = ("test", "validation", "val")
_MAX_VAL_LOSS_ROWS = 12


@dataclass(frozen=True)
class ForecastScore:
    """One published number: `metric` of `variable` at `lead_time_hours`, in `unit`."""

    variable: str
    lead_time_hours: int
    metric: str
    value: float
    unit: str | None

    @property
    def key(self) -> tuple[str, int, str]:
        return (self.variable, self.lead_time_hours, self.metric)


def _is_metrics_block(value: object) -> bool:
    return isinstance(value, Mapping) and isinstance(value.get("variables"), Mapping)


def find_metrics_block(report: Mapping[str, Any]) -> tuple[str, Mapping[str, Any]] | None:
    """The per-pollutant x lead scores of a report and their split name, or None if it has none.

    Accepted: `report[k]` is a ForecastMetrics.compute() dict (k one of test_metrics, metrics,
    val_metrics, ...; `metrics` takes its split from `report["metrics_split"]`, default
    validation), or `report[k]` maps split names to such dicts (test preferred).
    """
    for key in _METRICS_KEYS:
        value = report.get(key)
        if _is_metrics_block(value):
            split = key.removesuffix("_metrics") if key != "metrics" else None
            if split in (None, "final"):
                split = str(report.get("metrics_split", "validation"))
            return ("validation" if split == "val" else split), value
        if isinstance(value, Mapping):
            by_split = {name: block for name, block in value.items() if _is_metrics_block(block)}
            for split in (*_SPLIT_PREFERENCE, *by_split):
                if split in by_split:
                    return ("validation" if split == "val" else split), by_split[split]
    return None


def forecast_scores(block: Mapping[str, Any]) -> list[ForecastScore]:
    """Flatten a ForecastMetrics.compute() dict to finite per-lead scores (the `all` rows and
    scores that could not be computed, None, are left out)."""
    units = block.get("units") or {}
    scores = []
    for variable, per_lead in block["variables"].items():
        for lead, row in per_lead.items():
            if lead == "all":
                continue
            for metric in CARD_METRICS:
                value = row.get(metric)
                if value is not None and math.isfinite(float(value)):
                    scores.append(
                        ForecastScore(
                            variable, int(lead), metric, float(value), units.get(variable)
                        )
                    )
    return scores


def scores_from_card(card: ModelCard) -> dict[tuple[str, int, str], float]:
    """{(pollutant, lead hours, metric): value} from a card's model-index (see ForecastScore)."""
    found: dict[tuple[str, int, str], float] = {}
    for result in card.data.eval_results or []:
        args = result.metric_args or {}
        if "variable" not in args or "lead_time_hours" not in args:
            continue
        key = (str(args["variable"]), int(args["lead_time_hours"]), result.metric_type)
        found[key] = float(result.metric_value)
    return found


def read_val_loss_csv(path: str | Path) -> list[tuple[int, float, str]]:
    """(step, val loss, evaluated on) rows of a run's val_loss.csv: the first column named like
    `step`, the first other column whose name contains `loss`, and train_accelerate.py's `full`
    column (full split or the fixed validation subset) when present."""
    path = Path(path)
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        fields = reader.fieldnames or []
        step_col = next((f for f in fields if "step" in f.lower()), None)
        loss_col = next((f for f in fields if "loss" in f.lower() and f != step_col), None)
        if step_col is None or loss_col is None:
            raise ValueError(f"{path}: expected a step column and a loss column, got {fields}")
        return [
            (int(float(row[step_col])), float(row[loss_col]), _evaluated_on(row.get("full")))
            for row in reader
        ]


def _evaluated_on(full: str | None) -> str:
    if full is None:
        return "-"
    return "full split" if full.strip().lower() in ("true", "1") else "validation subset"


def _fmt(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list | tuple):
        return ", ".join(str(v) for v in value) if value else "none"
    return str(value)


def _sample_rows(rows: Sequence[tuple[int, float, str]]) -> list[tuple[int, str, str]]:
    """At most _MAX_VAL_LOSS_ROWS evenly spaced rows, always the first and the last."""
    if len(rows) > _MAX_VAL_LOSS_ROWS:
        last = len(rows) - 1
        picks = sorted(
            {round(i * last / (_MAX_VAL_LOSS_ROWS - 1)) for i in range(_MAX_VAL_LOSS_ROWS)}
        )
        rows = [rows[i] for i in picks]
    return [(step, _fmt(loss), where) for step, loss, where in rows]


def _score_rows(block: Mapping[str, Any]) -> list[dict[str, str]]:
    units = block.get("units") or {}
    rows = []
    for variable, per_lead in block["variables"].items():
        for lead, row in per_lead.items():
            if lead == "all":
                continue
            cells = {metric: _fmt(row.get(metric)) for metric in CARD_METRICS}
            rows.append({"variable": variable, "lead": lead, "unit": _fmt(units.get(variable))})
            rows[-1].update(cells)
    return rows


def _test_loss_rows(block: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Rows `{name, cells: [all, each lead]}` of the block's `test_loss` table (the model and the
    reference forecasts on the same samples), when the evaluation wrote one."""
    table = block.get("test_loss") or {}
    return [{"name": name, "cells": [_fmt(v) for v in row.values()]} for name, row in table.items()]


def _test_loss_columns(block: Mapping[str, Any]) -> list[str]:
    table = block.get("test_loss") or {}
    first = next(iter(table.values()), {})
    return [key if key == "all" else f"{key} h" for key in first]


def _eval_results(
    scores: Sequence[ForecastScore], *, dataset_id: str, dataset_name: str, split: str
) -> list[EvalResult]:
    results = []
    for score in scores:
        unit = f" ({score.unit})" if score.unit and not score.metric.startswith("skill") else ""
        results.append(
            EvalResult(
                task_type=TASK_TYPE,
                task_name="Air-quality forecasting",
                dataset_type=dataset_id,
                dataset_name=dataset_name,
                dataset_split=split,
                metric_type=score.metric,
                metric_value=score.value,
                metric_name=f"{score.metric} {score.variable} +{score.lead_time_hours}h{unit}",
                metric_args={
                    "variable": score.variable,
                    "lead_time_hours": score.lead_time_hours,
                    "unit": score.unit,
                },
            )
        )
    return results


_ARCHITECTURE_KEYS = (
    ("model type", "model_type"),
    ("input variables", "variables"),
    ("target variables", "target_variables"),
    ("lead times (h)", "lead_times_hours"),
    ("grid (H x W)", "img_size"),
    ("patch size", "patch_size"),
    ("embedding dim", "embed_dim"),
    ("depth", "depth"),
    ("heads", "num_heads"),
    ("decoder depth", "decoder_depth"),
    ("head predicts", "forecast_target"),
    ("calendar inputs", "time_features"),
    ("elevation-bias blocks", "elevation_bias_blocks"),
    ("H_scale (m)", "elevation_scale"),
    ("alpha init", "elevation_alpha_init"),
    ("bias direction", "elevation_bias_direction"),
    ("bias rise (endpoint / path)", "elevation_bias_rise"),
    ("one alpha per head", "elevation_alpha_per_head"),
    ("bias placebo", "elevation_bias_placebo"),
    ("elevation channel masked", "elevation_input_masked"),
)


def _architecture_rows(config: Mapping[str, Any], num_parameters: int | None) -> list[tuple]:
    rows = [(label, _fmt(config[key])) for label, key in _ARCHITECTURE_KEYS if key in config]
    rows = [
        (label, text.replace(", ", " x ") if label.startswith("grid") else text)
        for label, text in rows
    ]
    if num_parameters is not None:
        rows.append(("parameters", f"{num_parameters:,}"))
    return rows


def _flat_rows(section: object) -> list[tuple[str, str]]:
    """Scalar and short-list entries of a report section, as (key, text) rows."""
    if not isinstance(section, Mapping):
        return []
    rows = []
    for key, value in section.items():
        scalar = isinstance(value, str | int | float | bool) or value is None
        short_list = isinstance(value, list | tuple) and len(value) <= 16
        if scalar or short_list:
            rows.append((str(key), _fmt(value)))
    return rows


# Machine-local or bookkeeping entries of report["run"] that say nothing about the recipe.
_RUN_KEYS_SKIPPED = ("model_dir", "wall_time_s", "planned_steps", "epochs_started")


def _recipe_rows(run: object, recipe: Mapping[str, Any] | None) -> list[tuple[str, str]]:
    rows = [row for row in _flat_rows(run) if row[0] not in _RUN_KEYS_SKIPPED]
    known = {key for key, _ in rows}
    return rows + [row for row in _flat_rows(recipe) if row[0] not in known]


def _corpus_rows(corpus: object) -> list[tuple[str, str]]:
    """The corpus description that config.json carries: its name and generator/converter
    provenance, nested parameters flattened one level (`generator_params.seed`)."""
    if not isinstance(corpus, Mapping):
        return []
    flat: dict[str, Any] = {key: value for key, value in corpus.items() if key != "provenance"}
    for key, value in (corpus.get("provenance") or {}).items():
        if isinstance(value, Mapping):
            flat.update({f"{key}.{inner}": item for inner, item in value.items()})
        else:
            flat[key] = value
    return _flat_rows(flat)


def _verdict_text(verdict: object) -> str | None:
    # train_accelerate.py writes the verdict as a dict (topoflow.training.report.make_verdict).
    if isinstance(verdict, Mapping):
        verdict = verdict.get("verdict")
    return None if verdict is None else str(verdict)


def _auto_class(auto_map: Mapping[str, str]) -> str:
    # The task-specific class gives forecasts; AutoModel is the fallback every model has.
    specific = sorted(name for name in auto_map if name.startswith("AutoModelFor"))
    return specific[0] if specific else "AutoModel"


def _grid(config: Mapping[str, Any]) -> tuple[object, object]:
    size = config.get("img_size")
    if isinstance(size, list | tuple) and len(size) == 2:
        return size[0], size[1]
    return config.get("height", "H"), config.get("width", "W")


def render_model_card(
    *,
    config: Mapping[str, Any],
    report: Mapping[str, Any],
    repo_id: str,
    revision: str = "main",
    model_name: str | None = None,
    summary: str | None = None,
    dataset_id: str = "topoflow-embedded-default",
    dataset_name: str = "TopoFlow embedded default corpus (synthetic)",
    synthetic: bool = True,
    base_model: str | None = None,
    license: str = "apache-2.0",
    val_loss_rows: Sequence[tuple[int, float, str]] = (),
    recipe: Mapping[str, Any] | None = None,
    plot_filename: str | None = None,
    num_parameters: int | None = None,
    regenerate_command: str | None = None,
    short_name: str | None = None,
    template_path: str | Path = TEMPLATE_PATH,
) -> ModelCard:
    """Render a ModelCard from a run's config.json and report.json contents."""
    template_path = Path(template_path)
    if not template_path.is_file():
        raise FileNotFoundError(f"model-card template {template_path} is missing")
    found = find_metrics_block(report)
    split, block = found if found is not None else ("validation", None)
    scores = forecast_scores(block) if block is not None else []
    model_name = model_name or repo_id.rsplit("/", 1)[-1]
    card_data = ModelCardData(
        library_name="transformers",
        license=license,
        pipeline_tag=TASK_TYPE,
        tags=[
            "topoflow",
            "air-quality",
            "weather",
            "climax",
            "vision-transformer",
            "elevation-bias",
            "custom_code",
            *(["synthetic-data"] if synthetic else []),
        ],
        # `datasets:` lists Hub dataset repos (the Hub links them); a local corpus name is not one
        # and stays in the model-index's dataset type only.
        datasets=[dataset_id] if is_hub_repo_id(dataset_id) else None,
        metrics=sorted({score.metric for score in scores}) or None,
        base_model=base_model,
        model_name=model_name,
        eval_results=_eval_results(
            scores, dataset_id=dataset_id, dataset_name=dataset_name, split=split
        )
        or None,
    )
    height, width = _grid(config)
    bias_blocks = config.get("elevation_bias_blocks") or []
    default_summary = (
        f"Elevation-biased attention in blocks {_fmt(list(bias_blocks))}."
        if bias_blocks
        else "Baseline without elevation bias (no block biased)."
    )
    return ModelCard.from_template(
        card_data,
        template_path=str(template_path),
        model_name=model_name,
        summary=summary or default_summary,
        repo_id=repo_id,
        revision=revision,
        auto_class=_auto_class(config.get("auto_map") or {}),
        num_inputs=len(config.get("variables", [])) or "V",
        time_features=list(config.get("time_features") or []),
        forecast_target=config.get("forecast_target", "field"),
        height=height,
        width=width,
        lead_times=_fmt(config.get("lead_times_hours", "?")),
        architecture=_architecture_rows(config, num_parameters),
        synthetic=synthetic,
        training_data=_corpus_rows(config.get("corpus")),
        recipe=_recipe_rows(report.get("run"), recipe),
        regenerate_command=regenerate_command,
        verdict=_verdict_text(report.get("verdict")),
        verdict_rows=[row for row in _flat_rows(report.get("verdict")) if row[0] != "verdict"],
        val_loss_rows=_sample_rows(list(val_loss_rows)),
        plot_filename=plot_filename,
        split=split,
        metrics_source=report.get("metrics_source"),
        short_name=short_name,
        score_rows=_score_rows(block) if block is not None else [],
        test_loss_rows=_test_loss_rows(block) if block is not None else [],
        test_loss_columns=_test_loss_columns(block) if block is not None else [],
    )


def load_report(path: str | Path) -> dict[str, Any]:
    """report.json as a dict, with the file named in the error when it is missing or broken."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"run report {path} is missing") from None
    except json.JSONDecodeError as error:
        raise ValueError(f"run report {path} is not valid JSON: {error}") from None
