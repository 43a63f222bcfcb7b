"""Helpers for the Hub tests: a small but real training-run output folder.

Plain functions rather than fixtures, so each Hub test module builds what it needs (and the
coordinator can register them as fixtures later without changing the helpers).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import torch

from modeling_topoflow import TopoFlowForForecasting
from tests.fixtures_model import make_tiny_batch, make_tiny_config
from topoflow.metrics import ForecastMetrics
from topoflow.safety import save_model_folder
from topoflow.training.report import make_verdict

__all__ = [
    "TARGETS",
    "LEADS",
    "GRID",
    "NORMALIZATION",
    "UNITS",
    "make_metrics_block",
    "write_run_outputs",
    "tiny_forecaster",
    "model_metrics_block",
    "make_tiny_run",
]

TARGETS = ["pm25", "o3"]
LEADS = [12, 24]
GRID = (4, 8)
NORMALIZATION = {
    "mean": {"pm25": 50.0, "o3": 80.0},
    "std": {"pm25": 30.0, "o3": 25.0},
}
UNITS = {"pm25": "ug/m3", "o3": "ug/m3"}


def make_metrics_block(seed: int = 0) -> dict[str, Any]:
    """ForecastMetrics.compute() of random forecasts vs random labels, persistence included."""
    generator = torch.Generator().manual_seed(seed)
    metrics = ForecastMetrics(
        target_variables=TARGETS,
        lead_times_hours=LEADS,
        normalization=NORMALIZATION,
        units=UNITS,
        grid_shape=GRID,
        input_variables=["u", *TARGETS],
    )
    batch = 4
    labels = torch.randn(batch, len(TARGETS), *GRID, generator=generator)
    labels[0, 0, 0, 0] = float("nan")
    metrics.add(
        forecast=labels + 0.3 * torch.randn(labels.shape, generator=generator),
        labels=labels,
        region_mask=torch.ones(batch, *GRID, dtype=torch.bool),
        sample_ids=torch.tensor([400_000 * 1000 + LEADS[i % 2] for i in range(batch)]),
        fields=torch.randn(batch, 1 + len(TARGETS), *GRID, generator=generator),
    )
    return json.loads(json.dumps(metrics.compute()))


def write_run_outputs(run_dir: Path, *, metrics_block: dict[str, Any] | None = None) -> dict:
    """report.json, val_loss.csv and a val-loss PNG as train_accelerate.py lays them out; the
    model folder is the caller's (save_pretrained). Returns the report."""
    run_dir.mkdir(parents=True, exist_ok=True)
    rows = [(0, 0.52, True), (5, 0.47, False), (10, 0.44, False), (10, 0.43, True)]
    with open(run_dir / "val_loss.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["step", "val_loss", "full"])
        writer.writerows(rows)
    report = {
        "run": {
            "model": "tiny",
            "steps": 10,
            "world_size": 1,
            "trainable": "all",
            "eval_split": "val",
            "threshold_source": "ratio",
        },
        "verdict": make_verdict(0.52, 0.43, 0.50),
        "metrics": metrics_block if metrics_block is not None else make_metrics_block(),
        "metrics_split": "validation",
    }
    (run_dir / "report.json").write_text(json.dumps(report, indent=2), encoding="utf-8")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(3, 2))
    ax.plot([r[0] for r in rows], [r[1] for r in rows])
    fig.savefig(run_dir / "val_loss_curve.png")
    plt.close(fig)
    return report


def tiny_forecaster(seed: int = 0, alpha: float = 0.5) -> TopoFlowForForecasting:
    """A tiny TopoFlow with the elevation bias on block 0 and a non-zero alpha, so the bias
    changes the forecast and a load that lost it would show."""
    torch.manual_seed(seed)
    config = make_tiny_config(elevation_bias_blocks=[0], elevation_alpha_init=alpha)
    return TopoFlowForForecasting(config).eval()


def model_metrics_block(model: TopoFlowForForecasting, batch: dict[str, Any]) -> dict[str, Any]:
    """ForecastMetrics.compute() of the model's own forecasts on `batch`."""
    config = model.config
    metrics = ForecastMetrics(
        target_variables=config.target_variables,
        lead_times_hours=config.lead_times_hours,
        normalization={"mean": config.variable_mean, "std": config.variable_std},
        units=config.variable_units,
        grid_shape=tuple(config.img_size),
        input_variables=config.variables,
    )
    with torch.no_grad():
        forecast = model(fields=batch["fields"], lead_time_hours=batch["lead_time_hours"]).forecast
    metrics.add(
        forecast, batch["labels"], batch["region_mask"], batch["sample_ids"], fields=batch["fields"]
    )
    return json.loads(json.dumps(metrics.compute()))


def make_tiny_run(run_dir: Path, seed: int = 0) -> tuple[TopoFlowForForecasting, dict, dict]:
    """A training-run output folder as train_accelerate.py writes it (model/ with SHA256SUMS,
    report.json with scores of the model's forecasts, val_loss.csv, the curve PNG).
    Returns (model, batch, report)."""
    model = tiny_forecaster(seed)
    batch = make_tiny_batch(model.config, batch_size=2, seed=seed)
    save_model_folder(model, run_dir / "model")
    report = write_run_outputs(run_dir, metrics_block=model_metrics_block(model, batch))
    return model, batch, report
