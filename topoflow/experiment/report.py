"""The experiment report folder: report.md, report.json and the PNG figures.

Everything in report.md is also in report.json, so a reader can check a number without running
code, and a script can read the same number without parsing Markdown.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from topoflow.figures import (
    plot_attention_bias,
    plot_gain_bars,
    plot_gain_maps,
    plot_val_loss_curves,
)
from topoflow.seed_stats import (
    DEFAULT_MARGIN,
    SeedVerdict,
    format_p,
    format_percent,
    seed_verdict_from_losses,
)

from .analysis import ArmComparison, compare_arm, per_seed_losses, pooled_scores
from .arms import CONTROL
from .evaluate import EvaluationResult, test_loss_row
from .runner import RunRecord
from .terrain import MapWorld, has_per_sample_elevation, map_worlds

__all__ = ["PER_SEED_LOSSES", "CorpusContext", "pilot_summary", "read_val_curve", "run_alphas",
           "seed_level_lines", "write_report"]


class CorpusContext:
    """What the report needs from the corpus: elevation, regions, extent, units, provenance.

    A corpus with one static terrain gives `elevation_m` (H, W) and its named regions. A corpus
    with a terrain per sample (the terrain worlds) has neither: `elevation_m` and the regions are
    None, the elevation bands come from each sample's own elevation (`terrain.TerrainMetrics`) and
    `map_worlds` are the held-out worlds of `split` drawn on the gain maps and bias panels."""

    def __init__(self, corpus: str | Path, split: str = "test") -> None:
        from topoflow.corpus import CorpusMetadata
        from topoflow.corpus.schema import STATIC_FILE
        from topoflow.corpus.shards import read_static
        from topoflow.regions import regions_from_corpus

        self.path = Path(corpus)
        self.meta = CorpusMetadata.load(self.path)
        self.per_sample_elevation = has_per_sample_elevation(self.meta)
        self.map_worlds: list[MapWorld] = []
        if self.per_sample_elevation:
            self.elevation_m = None
            self.region_codes, self.region_names = None, None
            self.map_worlds = map_worlds(self.path, split)
        else:
            static = read_static(self.path / STATIC_FILE, self.meta)
            self.elevation_m = static["elevation"].astype(np.float64)
            self.region_codes, self.region_names = regions_from_corpus(self.path)
        grid = self.meta.grid
        self.extent = (grid["lon_min"], grid["lon_max"], grid["lat_min"], grid["lat_max"])
        self.units = dict(self.meta.units)


def read_val_curve(run_path: str | Path) -> tuple[list[float], list[float]]:
    """(steps, losses) of the periodic validation subset from a run's val_loss.csv."""
    path = Path(run_path) / "val_loss.csv"
    if not path.is_file():
        raise FileNotFoundError(f"run {run_path} has no val_loss.csv")
    steps, losses = [], []
    with open(path, newline="") as handle:
        for row in csv.DictReader(handle):
            if row.get("full") == "True" and float(row["step"]) != 0:
                continue  # the final full-split value is on another sample set than the curve
            if row.get("full") == "True":
                continue
            steps.append(float(row["step"]))
            losses.append(float(row["val_loss"]))
    return steps, losses


def run_alphas(run_path: str | Path) -> dict[str, float]:
    """Learned elevation_alpha per biased block at the end of a run (report.json)."""
    report = json.loads((Path(run_path) / "report.json").read_text())
    return {str(k): float(v) for k, v in report.get("run", {}).get("final_alpha", {}).items()}


def _pct(x: float | None) -> str:
    return "n/a" if x is None or not math.isfinite(x) else f"{100 * x:+.2f}%"


def _num(x: float | None, digits: int = 4) -> str:
    return "n/a" if x is None or not math.isfinite(x) else f"{x:.{digits}g}"


def _p(p: float | None) -> str:
    if p is None:
        return "n/a"
    return f"{p:.2g}" if p >= 1e-4 else "< 1e-4"


def _gain_table(gains: Sequence[Mapping]) -> str:
    # Sample-level intervals of seed-averaged models: descriptive, never a verdict.
    lines = ["| pollutant | lead (h) | MSE gain | 95% CI (sample level) | CI excludes 0 |",
             "|---|---:|---:|---|---|"]
    for g in gains:
        sig = "yes (lower)" if g["ci_low"] > 0 else "yes (higher)" if g["ci_high"] < 0 else "no"
        lines.append(f"| {g['variable']} | {g['lead_hours']} | {_pct(g['gain'])} | "
                     f"{_pct(g['ci_low'])} to {_pct(g['ci_high'])} | {sig} |")
    return "\n".join(lines)


def _seed_table(comparison: ArmComparison) -> str:
    v = comparison.verdict
    lines = ["| seed | control test loss | arm test loss | change (positive: arm lower) |",
             "|---:|---:|---:|---:|"]
    for seed, control, arm, gain in zip(v.seeds, v.control_loss, v.arm_loss, v.gain_per_seed,
                                        strict=True):
        lines.append(f"| {seed} | {control:.5f} | {arm:.5f} | {_pct(gain)} |")
    sd = "n/a" if v.sd_gain is None else f"{100 * v.sd_gain:.2f}%"
    lines.append(f"| mean (sd over seeds) | {np.mean(v.control_loss):.5f} | "
                 f"{np.mean(v.arm_loss):.5f} | {_pct(v.mean_gain)} ({sd}) |")
    return "\n".join(lines)


def _interval(x: Sequence[float] | None) -> str:
    return "n/a" if x is None else f"{format_percent(x[0])} to {format_percent(x[1])}"


def seed_level_lines(v: SeedVerdict) -> list[str]:
    """The bullet list under a verdict: intervals, tests, equivalence, power."""
    boot = v.bootstrap
    missing = ("fewer than 2 seeds" if len(v.seeds) < 2 else
               "the per-sample losses of each seed were not available")
    boot_text = f"n/a ({missing})" if boot is None else (
        f"{_interval(boot.interval_95)} (seeds, then blocks of {boot.block_length} init times, "
        f"{boot.block_rule}; {boot.n_boot} resamples)")
    flip = "n/a" if v.sign_flip_pvalue is None else (
        f"{format_p(v.sign_flip_pvalue)} ({'exact' if v.sign_flip_exact else 'random'} sign "
        "flips)")
    t_test = "n/a" if v.t_pvalue is None else format_p(v.t_pvalue)
    tost = "n/a" if v.tost_pvalue is None else format_p(v.tost_pvalue)
    mde = "n/a" if v.mde is None else format_percent(v.mde, sign=False)
    needed = "n/a" if v.sd_gain is None else (
        "more than a million" if v.seeds_needed is None else str(v.seeds_needed))
    margin, target = format_percent(v.margin, sign=False), format_percent(v.target_mde, False)
    return [
        f"- 95% seed-level interval (decides): {_interval(v.interval_95)}; 90%: "
        f"{_interval(v.interval_90)}",
        f"- paired t-test over seeds: {t_test}, 95% t interval {_interval(v.t_interval_95)}; "
        f"sign-flip test: {flip}",
        f"- two-level bootstrap 95% interval: {boot_text}",
        f"- equivalence within +/-{margin} (two one-sided t-tests): {tost}",
        f"- minimum detectable effect at {100 * v.power:.0f}% power with {len(v.seeds)} seeds: "
        f"{mde}; seeds for {target}: {needed}",
    ]


def _scores_table(scores: Mapping[str, dict], variables: Sequence[str]) -> str:
    lines = ["| arm | pollutant | unit | RMSE | MAE | bias | skill vs persistence | "
             "skill vs climatology | skill vs damped persistence |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for arm, result in scores.items():
        for var in variables:
            row = result["variables"][var]["all"]
            lines.append(f"| {arm} | {var} | {result['units'].get(var) or ''} | "
                         f"{_num(row['rmse'])} | {_num(row['mae'])} | {_num(row['bias'])} | "
                         f"{_pct(row['skill_persistence'])} | {_pct(row['skill_climatology'])} | "
                         f"{_pct(row.get('skill_damped_persistence'))} |")
    return "\n".join(lines)


def _test_losses(evals: Mapping[str, Mapping[int, EvaluationResult]],
                 references: Mapping[str, EvaluationResult], leads: Sequence[int]
                 ) -> dict[str, dict[str, float]]:
    """Test loss overall and per lead of every arm (mean over seeds) and every reference, after
    checking that the references were scored on the control's samples."""
    control_ids = np.sort(next(iter(evals[CONTROL].values())).per_sample.sample_ids.numpy())
    for name, result in references.items():
        if not np.array_equal(np.sort(result.per_sample.sample_ids.numpy()), control_ids):
            raise ValueError(f"reference {name!r} was scored on other samples than the control")
    table = {arm: test_loss_row([r.per_sample for r in by_seed.values()], leads)
             for arm, by_seed in evals.items()}
    return {**table, **{f"reference: {name}": test_loss_row(result.per_sample, leads)
                        for name, result in references.items()}}


def _test_loss_markdown(table: Mapping[str, Mapping[str, float]]) -> list[str]:
    columns = list(next(iter(table.values())))
    lines = ["| forecaster | " + " | ".join(c if c == "all" else f"{c} h" for c in columns) + " |",
             "|---|" + "---:|" * len(columns)]
    lines += [f"| {name} | " + " | ".join(_num(row[c]) for c in columns) + " |"
              for name, row in table.items()]
    control = table[CONTROL]["all"]
    beaten_by = [name for name, row in table.items()
                 if name.startswith("reference: ") and row["all"] <= control]
    if beaten_by:
        lines += ["", f"**Warning:** the control's test loss ({_num(control)}) is not below that "
                  f"of {', '.join(beaten_by)}: a baseline that does not beat every reference "
                  "forecast is not a baseline to ablate (DESIGN.md section 5)."]
    return lines


def _alpha_table(alphas: Mapping[str, Mapping[int, Mapping[str, float]]]) -> str:
    lines = ["| arm | seed | learned alpha per block |", "|---|---:|---|"]
    for arm, by_seed in alphas.items():
        for seed, per_block in sorted(by_seed.items()):
            text = ", ".join(f"block {b}: {v:.4f}" for b, v in sorted(per_block.items())) or "none"
            lines.append(f"| {arm} | {seed} | {text} |")
    return "\n".join(lines)


def _dead_alpha_runs(alphas: Mapping[str, Mapping[int, Mapping[str, float]]]) -> list[str]:
    """'arm seed s block b' for every biased block whose learned alpha ended below 0."""
    return [f"{arm} seed {seed} block {block}" for arm, by_seed in alphas.items()
            for seed, per_block in sorted(by_seed.items())
            for block, value in sorted(per_block.items()) if value < 0]


def _runs_table(records: Sequence[RunRecord]) -> str:
    lines = ["| arm | seed | run folder | training wall time |", "|---|---:|---|---:|"]
    for r in records:
        wall = "n/a" if r.wall_time_s is None else f"{r.wall_time_s:.0f} s"
        lines.append(f"| {r.arm} | {r.seed} | `{r.path}`{' (adopted)' if r.adopted else ''} | "
                     f"{wall} |")
    return "\n".join(lines)


PER_SEED_LOSSES = "per_seed_losses.safetensors"


def _save_per_seed_losses(path: Path, evals: Mapping[str, Mapping[int, EvaluationResult]]
                          ) -> None:
    """Per-sample test losses of every arm x seed beside the report, so a published report can
    be re-scored at seed level later without the run folders (a few MB for the default split)."""
    from safetensors.torch import save_file

    tensors = {}
    for arm, by_seed in evals.items():
        for seed, result in by_seed.items():
            tensors[f"{arm}/seed{seed}/sample_ids"] = result.per_sample.sample_ids.contiguous()
            tensors[f"{arm}/seed{seed}/loss"] = result.per_sample.loss.contiguous()
    save_file(tensors, str(path))


FIGURE_PATTERNS = ("val_loss_curves.png", "gain_map_*.png", "gain_bars_*.png",
                   "attention_bias_*.png")


def _figures(out: Path, comparisons: Mapping[str, ArmComparison], records: Sequence[RunRecord],
             ctx: CorpusContext, variables: Sequence[str], patch_size: int, h_scales: Mapping,
             alphas: Mapping, directions: Mapping[str, str]) -> list[dict[str, str]]:
    figures = []
    placebos = {r.arm: bool(_run_config(r.path).get("elevation_bias_placebo")) for r in records}
    rises = {r.arm: _run_config(r.path).get("elevation_bias_rise", "endpoint") for r in records}
    per_head = {r.arm: bool(_run_config(r.path).get("elevation_alpha_per_head")) for r in records}
    curves: dict[str, dict[int, tuple]] = {}
    for r in records:
        curves.setdefault(r.arm, {})[r.seed] = read_val_curve(r.path)
    path = plot_val_loss_curves(curves, out / "val_loss_curves.png")
    figures.append({"file": path.name, "caption": "Validation loss (normalized MSE, periodic "
                    "validation subset) of every arm during fine-tuning; line: mean over seeds, "
                    "band: min-max over seeds."})
    for arm, comp in comparisons.items():
        figures.append(_gain_map_figure(out, arm, comp, ctx, variables))
        path = plot_gain_bars(comp.gains, out / f"gain_bars_{arm}.png",
                              title=f"Relative MSE gain of {arm} over the control")
        figures.append({"file": path.name, "caption": f"Relative MSE gain of {arm} per "
                        "pollutant and lead time (seed-averaged), error bars: 95% block-bootstrap "
                        "intervals; bars above 0 favour the arm."})
        block0 = [v.get("0") for v in alphas.get(arm, {}).values() if "0" in v]
        if block0:
            alpha = float(np.mean(block0))
            direction = directions.get(arm, "downslope")
            # A terrain per sample: draw the bias on a held-out world's own terrain.
            world = ctx.map_worlds[0] if ctx.map_worlds else None
            elevation = ctx.elevation_m if world is None else world.elevation_m
            path = plot_attention_bias(elevation, out / f"attention_bias_{arm}.png",
                                       patch_size=patch_size, alpha=alpha,
                                       h_scale_m=float(h_scales.get(arm, 1000.0)),
                                       extent=ctx.extent, direction=direction,
                                       rise=rises.get(arm, "endpoint"))
            where = ("a low patch beside high terrain" if direction == "downslope"
                     else "a high patch above low terrain")
            what = "higher" if direction == "downslope" else "lower"
            caption = (f"Attention bias of block 0 of {arm} ({direction}) with its learned alpha "
                       f"(mean over seeds, {alpha:.4f}) for {where} (star): darker = stronger "
                       f"penalty on attending to that {what} patch.")
            if world is not None:
                caption += (f" Terrain: held-out world {world.name} of the evaluation split "
                            "(every sample has its own terrain; the bias is drawn on this one's).")
            if rises.get(arm) == "path":
                caption += (" The bias reads the total ascent along the straight path between "
                            "the patch centres (the oracle), not the two patch means.")
            if per_head.get(arm):
                caption += (" This arm learns one alpha per head; the panel uses their mean "
                            "(each head's value is in the runs' report.json).")
            if placebos.get(arm):
                caption += (" This is a placebo arm: the model computes this bias from a random "
                            "per-sample shuffle of the patch heights, not from this geography.")
            if alpha <= 0:
                caption += (" The learned alpha is <= 0, so the bias is zero everywhere and the "
                            "right panel is uniformly 0: this arm ended with no elevation bias.")
            figures.append({"file": path.name, "caption": caption})
    return figures


def _run_config(run_path: str | Path) -> dict:
    """The trained model's config.json of a run, or {} where the run has none."""
    config = Path(run_path) / "model" / "config.json"
    return json.loads(config.read_text()) if config.is_file() else {}


def _gain_map_figure(out: Path, arm: str, comp: ArmComparison, ctx: CorpusContext,
                     variables: Sequence[str]) -> dict[str, str]:
    """The gain map of one arm: per pollutant on a static terrain, per held-out world on a
    corpus with a terrain per sample (each panel with that world's elevation contours)."""
    path = out / f"gain_map_{arm}.png"
    if not ctx.map_worlds:
        plot_gain_maps(comp.gain_map, variables, path, elevation_m=ctx.elevation_m,
                       extent=ctx.extent, title=f"Relative RMSE gain of {arm} over the control "
                                                "per cell, pooled over seeds (blue: arm better)")
        return {"file": path.name, "caption": f"Per-cell relative RMSE gain 1 - RMSE_{arm} / "
                "RMSE_control on the evaluation split, per pollutant, with elevation contours; "
                "blue cells favour the arm."}
    names = [f"world {w.name}" for w in ctx.map_worlds]
    plot_gain_maps(comp.gain_map, names, path,
                   elevation_m=np.stack([w.elevation_m for w in ctx.map_worlds]),
                   extent=ctx.extent, title=f"Relative RMSE gain of {arm} over the control per "
                                            "cell on held-out worlds, pooled over seeds, "
                                            "pollutants and leads (blue: arm better)")
    return {"file": path.name, "caption": f"Per-cell relative RMSE gain 1 - RMSE_{arm} / "
            "RMSE_control (normalized units, all pollutants and leads) on the first "
            f"{len(names)} worlds of the evaluation split, terrains never seen in training, "
            "each with its own elevation contours; blue cells favour the arm. A world has only "
            "its few initialization times, so single cells are noisy."}


def write_report(out_dir: str | Path, *, plan: Mapping[str, Any], records: Sequence[RunRecord],
                 evals: Mapping[str, Mapping[int, EvaluationResult]], config: Any,
                 ctx: CorpusContext, h_scales: Mapping[str, float], n_boot: int = 2000,
                 directions: Mapping[str, str] | None = None,
                 references: Mapping[str, EvaluationResult] | None = None,
                 margin: float = DEFAULT_MARGIN, target_mde: float | None = None,
                 versus: Sequence[tuple[str, str]] = ()) -> dict:
    """Compute every comparison, draw the figures, write report.md and report.json.

    `references` ({name: result} of the reference forecasts scored on the same samples) add
    their test loss and scores beside the arms'. `versus` ((arm, reference arm) pairs) adds a
    seed-level verdict of an arm against another arm than the control (e.g. the placebo)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # A rerun with fewer arms must not leave the figures of the dropped arms beside the new report.
    for pattern in FIGURE_PATTERNS:
        for stale in out.glob(pattern):
            stale.unlink()
    variables = list(config.target_variables)
    if CONTROL not in evals:
        raise ValueError(f"no '{CONTROL}' arm among the evaluated arms {sorted(evals)}")
    comparisons = {
        arm: compare_arm(evals, arm, variables=variables, elevation_m=ctx.elevation_m,
                         region_codes=ctx.region_codes, region_names=ctx.region_names,
                         map_worlds=[w.name for w in ctx.map_worlds],
                         n_boot=n_boot, margin=margin, target_mde=target_mde)
        for arm in evals if arm != CONTROL}
    pairwise = {f"{arm} vs {reference}": seed_verdict_from_losses(
        per_seed_losses(evals[reference]), per_seed_losses(evals[arm]), arm_name=arm,
        control_name=reference, margin=margin, target_mde=target_mde, n_boot=n_boot)
        for arm, reference in versus}
    scores = {arm: pooled_scores(by_seed, config, ctx.units) for arm, by_seed in evals.items()}
    references = dict(references or {})
    test_losses = _test_losses(evals, references, list(config.lead_times_hours))
    scores.update({f"reference: {name}": pooled_scores({0: result}, config, ctx.units)
                   for name, result in references.items()})
    alphas: dict[str, dict[int, dict[str, float]]] = {}
    for r in records:
        alphas.setdefault(r.arm, {})[r.seed] = run_alphas(r.path)
    figures = _figures(out, comparisons, records, ctx, variables, int(config.patch_size),
                       h_scales, alphas, directions or {})
    report = {
        "plan": dict(plan),
        "runs": [r.to_dict() for r in records],
        "comparisons": {arm: {**c.to_dict(), "pilot_summary": pilot_summary(c.verdict)}
                        for arm, c in comparisons.items()},
        "versus": {name: {"verdict": v.to_dict(), "pilot_summary": f"{name}: {_pilot_line(v)}"}
                   for name, v in pairwise.items()},
        "scores": scores,
        "test_loss": test_losses,
        "learned_alpha": {a: {str(s): v for s, v in b.items()} for a, b in alphas.items()},
        "figures": figures,
    }
    (out / "report.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    _save_per_seed_losses(out / PER_SEED_LOSSES, evals)
    (out / "report.md").write_text(_markdown(plan, records, comparisons, scores, alphas,
                                             figures, variables, test_losses, pairwise))
    return report


def pilot_summary(v: SeedVerdict) -> str:
    """One line a pilot prints per arm: the seed spread and the seeds needed for the target."""
    return f"{v.arm}: {_pilot_line(v)}"


def _pilot_line(v: SeedVerdict) -> str:
    if v.sd_gain is None:
        return f"{len(v.seeds)} seed: no seed spread, run a pilot of at least 3 seeds"
    needed = "more than a million" if v.seeds_needed is None else str(v.seeds_needed)
    mde = "n/a" if v.mde is None else format_percent(v.mde, sign=False)
    return (f"per-seed change sd {format_percent(v.sd_gain, sign=False)} over {len(v.seeds)} "
            f"seeds; minimum detectable effect now {mde}; {needed} seeds reach "
            f"{format_percent(v.target_mde, sign=False)} at {100 * v.power:.0f}% power")


def _markdown(plan: Mapping[str, Any], records: Sequence[RunRecord],
              comparisons: Mapping[str, ArmComparison], scores: Mapping[str, dict],
              alphas: Mapping, figures: Sequence[Mapping[str, str]],
              variables: Sequence[str], test_losses: Mapping[str, Mapping[str, float]],
              pairwise: Mapping[str, SeedVerdict] | None = None) -> str:
    seeds = sorted({r.seed for r in records})
    md = [f"# Experiment: {plan.get('title', 'does the elevation bias help?')}", ""]
    md += ["## Setup", ""]
    for key, label in (("baseline", "Baseline checkpoint"), ("corpus", "Corpus"),
                       ("corpus_provenance", "Corpus provenance"),
                       ("training_corpus", "Training corpus (view)"),
                       ("eval", "Evaluation"), ("budget", "Budget per arm and seed"),
                       ("arms", "Arms")):
        if key in plan:
            md.append(f"- {label}: {json.dumps(plan[key], default=str)}")
    md.append(f"- Seeds: {seeds} (arm and control of one seed share data order and init)")
    md += ["", "Each arm is compared with the control: the baseline fine-tuned with the same "
           "budget and data order but no elevation bias. The training seed is the unit: each "
           "seed gives the relative change of the mean test loss, arm against control (positive: "
           "the arm is better), and the verdict follows the decision rule of docs/experiment.md "
           "(better, worse, equivalent within the margin, or inconclusive). The sample-level "
           "view (seed-averaged per-sample losses paired by sample id, moving-block bootstrap "
           "over initialization times) is secondary: it holds the trained models fixed.", ""]
    if plan.get("pilot"):
        md += ["**Pilot:** this run sizes the experiment; its verdicts are not results. Seeds "
               "needed for the target minimum detectable effect:", ""]
        md += [f"- {arm}: {_pilot_line(comp.verdict)}" for arm, comp in comparisons.items()]
        md += [f"- {name}: {_pilot_line(v)}" for name, v in (pairwise or {}).items()]
        md += [""]
    for arm, comp in comparisons.items():
        v = comp.verdict
        md += [f"## Verdict: {arm} vs control", "",
               f"**Verdict ({v.verdict}, training seed as the unit):** {v.text}", ""]
        md += [*seed_level_lines(v), ""]
        md += ["### Per seed (mean per-sample test loss)", "", _seed_table(comp), ""]
        view = comp.sample_level
        b = view.bootstrap
        md += ["### Sample-level view (secondary: the trained models held fixed)", "",
               view.text, "",
               f"- Effect size: mean reduction {b.mean_reduction:.3g} (95% CI "
               f"{b.ci[0]:.3g} to {b.ci[1]:.3g}); relative gain "
               f"{_pct(b.relative_gain)} (CI {_pct(b.relative_gain_ci[0])} "
               f"to {_pct(b.relative_gain_ci[1])})",
               f"- Wilcoxon signed-rank on {view.n_block_means} block means of "
               f"{view.block_means_length} init times: p = "
               f"{_p(view.wilcoxon_block_means.pvalue)} (on the raw samples: p = "
               f"{_p(view.wilcoxon_samples.pvalue)}, overstated by autocorrelation)", ""]
        md += ["### Per pollutant and lead time (sample level, descriptive)", "",
               _gain_table(comp.gains), ""]
        md += ["### By elevation band and named region (relative RMSE gain, pooled over seeds)",
               "", comp.regions["markdown"], ""]
    for name, v in (pairwise or {}).items():
        md += [f"## Verdict: {name}", "",
               f"**Verdict ({v.verdict}, training seed as the unit):** {v.text}", "",
               *seed_level_lines(v), "", "| seed | " f"{v.control} test loss | {v.arm} test "
               "loss | change (positive: arm lower) |", "|---:|---:|---:|---:|"]
        md += [f"| {s} | {c:.5f} | {a:.5f} | {_pct(g)} |" for s, c, a, g in
               zip(v.seeds, v.control_loss, v.arm_loss, v.gain_per_seed, strict=True)]
        md += [""]
    md += ["## Learned elevation alpha", "", _alpha_table(alphas), ""]
    dead = _dead_alpha_runs(alphas)
    if dead:
        md += [f"**Note:** learned alpha < 0 in {', '.join(dead)}. The bias is "
               "clamp(-alpha * ReLU(rise), -clamp_max, 0): with alpha < 0 it is 0 everywhere and "
               "alpha gets no gradient, so such a run computes an unbiased model and cannot "
               "recover; its comparison with the control measures only the first steps.", ""]
    md += ["## Test loss of every arm and reference forecast", "",
           "Normalized MSE over the valid region, all targets equally weighted, mean over samples "
           "(arms: mean over seeds); the references (persistence, climatology per cell x month x "
           "hour of day and damped anomaly persistence, both fitted on the training split) are "
           "scored on the same samples.", "", *_test_loss_markdown(test_losses), ""]
    md += ["## Scores of every arm and reference (pooled over seeds, all lead times)", "",
           _scores_table(scores, variables), ""]
    md += ["## Runs", "", _runs_table(records), ""]
    md += ["## Figures", ""]
    for fig in figures:
        md += [f"![{fig['file']}]({fig['file']})", "", f"*{fig['caption']}*", ""]
    return "\n".join(md)
