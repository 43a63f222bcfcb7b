"""End-of-run outputs: val_loss.csv, train_log.csv, the val-loss curve, report.json and report.md.

The verdict compares the *full* validation loss after training with the *full* validation loss
at step 0 (before any update), and with the success threshold. The periodic curve uses the bounded
validation subset (`--eval-batches`) and is drawn for the trend only.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

__all__ = [
    "VAL_CSV",
    "TRAIN_CSV",
    "CURVE_PNG",
    "REPORT_JSON",
    "REPORT_MD",
    "make_verdict",
    "plot_val_curve",
    "write_history_csv",
    "write_report",
]

VAL_CSV = "val_loss.csv"
TRAIN_CSV = "train_log.csv"
CURVE_PNG = "val_loss_curve.png"
REPORT_JSON = "report.json"
REPORT_MD = "report.md"


def write_history_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    """Write history rows (flat dicts; `alpha` dicts become alpha_block<i> columns)."""
    flat = []
    for row in rows:
        entry = {key: value for key, value in row.items() if key != "alpha"}
        for block, value in sorted(row.get("alpha", {}).items(), key=lambda kv: int(kv[0])):
            entry[f"alpha_block{block}"] = value
        flat.append(entry)
    columns: list[str] = []
    for entry in flat:
        columns += [key for key in entry if key not in columns]
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        # repr-exact floats, so two runs can be compared bit for bit from their CSVs.
        writer.writerows({key: repr(value) if isinstance(value, float) else value
                          for key, value in entry.items()} for entry in flat)


def make_verdict(step0_loss: float, final_loss: float, threshold: float) -> dict[str, Any]:
    """Final full val loss against the step-0 full val loss and the success threshold."""
    improved = final_loss < step0_loss
    below = final_loss < threshold
    if not math.isfinite(final_loss):
        verdict = "failed: final validation loss is not finite"
    elif improved and below:
        verdict = "success: val loss below step 0 and below the threshold"
    elif improved:
        verdict = "partial: val loss below step 0 but not below the threshold"
    else:
        verdict = "no improvement: val loss not below step 0"
    return {
        "step0_val_loss": step0_loss,
        "final_val_loss": final_loss,
        "success_threshold": threshold,
        "improved_vs_step0": improved,
        "below_threshold": below,
        "relative_change_vs_step0": (final_loss - step0_loss) / step0_loss,
        "verdict": verdict,
    }


def plot_val_curve(path: Path, val_rows: list[dict[str, Any]], step0_loss: float,
                   threshold: float, title: str) -> None:
    """Val loss against optimizer steps, with the step-0 baseline and the threshold drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bounded = [row for row in val_rows if not row["full"]]
    full = [row for row in val_rows if row["full"]]
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    if bounded:
        ax.plot([r["step"] for r in bounded], [r["val_loss"] for r in bounded], "o-",
                color="tab:blue", label="val loss (fixed validation subset)")
    if full:
        ax.plot([r["step"] for r in full], [r["val_loss"] for r in full], "s", color="tab:red",
                markersize=8, label="val loss (full validation split)")
    ax.axhline(step0_loss, color="gray", linestyle="--",
               label=f"step 0 (before any update): {step0_loss:.4f}")
    ax.axhline(threshold, color="tab:green", linestyle=":",
               label=f"success threshold: {threshold:.4f}")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("validation loss (normalized MSE)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_report(output_dir: Path, report: dict[str, Any]) -> None:
    """report.json (everything) and report.md (what a researcher reads first)."""
    (output_dir / REPORT_JSON).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    verdict = report["verdict"]
    lines = [
        f"# TopoFlow training report: {report['run']['model']}",
        "",
        f"**Verdict: {verdict['verdict']}.**",
        "",
        "| quantity | value |",
        "|---|---|",
        f"| val loss at step 0 (full split) | {verdict['step0_val_loss']:.6f} |",
        f"| val loss after training (full split) | {verdict['final_val_loss']:.6f} |",
        f"| change vs step 0 | {100 * verdict['relative_change_vs_step0']:+.2f} % |",
        f"| success threshold | {verdict['success_threshold']:.6f} "
        f"({report['run']['threshold_source']}) |",
        f"| optimizer steps | {report['run']['steps']} |",
        f"| skipped non-finite steps | {report['run']['skipped_nonfinite_steps']} |",
        f"| processes | {report['run']['world_size']} |",
        f"| wall time | {report['run']['wall_time_s']:.1f} s |",
    ]
    for block, value in sorted(report["run"].get("final_alpha", {}).items()):
        lines.append(f"| elevation_alpha, block {block} | {value:.6f} |")
    lines += [
        "",
        f"Elevation bias blocks: {report['run']['elevation_blocks'] or 'none'}; trainable: "
        f"{report['run']['trainable']}; validation split: {report['run']['eval_split']} "
        f"({verdict['n_val_samples']} samples).",
        "",
        f"![validation loss]({CURVE_PNG})",
        "",
        "This compares one run with its own starting point. Whether the elevation bias helps needs "
        "the baseline fine-tuned with the same budget, several seeds and a paired test (the "
        "experiment tool).",
        "",
    ]
    (output_dir / REPORT_MD).write_text("\n".join(lines), encoding="utf-8")
