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

from topoflow.metrics import ForecastMetrics
from topoflow.training.report import make_verdict

__all__ = ["TARGETS", "LEADS", "GRID", "NORMALIZATION", "make_metrics_block", "write_run_outputs"]

TARGETS = ["pm25", "o3"]
LEADS = [12, 24]
GRID = (4, 8)
NORMALIZATION = {
    "mean": {"pm25": 50.0, "o3": 80.0},
    "std": {"pm25": 30.0, "o3": 25.0},
    "units": {"pm25": "ug/m3", "o3": "ug/m3"},
}


def make_metrics_block(seed: int = 0) -> dict[str, Any]:
    """ForecastMetrics.compute() of random forecasts vs random labels, persistence included."""
    generator = torch.Generator().manual_seed(seed)
    metrics = ForecastMetrics(
        target_variables=TARGETS,
        lead_times_hours=LEADS,
        normalization=NORMALIZATION,
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
