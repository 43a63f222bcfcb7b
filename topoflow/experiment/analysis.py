"""The numbers of an experiment report, computed from evaluated runs (no figures, no Markdown).

For each arm against the control:
- the verdict with the training seed as the unit (`topoflow.seed_stats`): per-seed paired change
  of the mean test loss, t and sign-flip tests, two-level bootstrap interval, minimum detectable
  effect, equivalence against the margin;
- the sample-level view, labelled secondary: seed-averaged per-sample losses paired with the
  control's, with block-bootstrap interval and Wilcoxon p-values;
- the gain per target variable x lead time with intervals, on seed-averaged per-variable MSEs;
- the region tables from the per-cell error sums pooled over seeds;
- the pooled scores (RMSE, MAE, bias, skill against persistence and climatology) of every arm.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from topoflow.metrics import ForecastMetrics
from topoflow.regions import format_region_table, gain_map, region_report
from topoflow.seed_stats import DEFAULT_MARGIN, SeedLosses, SeedVerdict, seed_verdict_from_losses
from topoflow.stats import (
    SampleLevelView,
    gains_by_variable_and_lead,
    mean_over_seeds,
    paired_samples,
    sample_level_view,
)

from .arms import CONTROL
from .evaluate import EvaluationResult
from .terrain import band_rows

__all__ = ["ArmComparison", "compare_arm", "per_seed_losses", "pooled_scores", "pooled_state",
           "seed_mean_loss"]

Evaluations = Mapping[str, Mapping[int, EvaluationResult]]


def seed_mean_loss(result: EvaluationResult) -> float:
    """Mean per-sample test loss (normalized MSE) of one run, samples without data left out."""
    loss = result.per_sample.loss.numpy()
    return float(np.nanmean(loss))


def _check_same_samples(evals: Evaluations) -> None:
    """Every run must have been scored on the same sample ids, or nothing pairs."""
    reference_name, reference = None, None
    for arm, by_seed in evals.items():
        for seed, result in by_seed.items():
            ids = np.sort(result.per_sample.sample_ids.numpy())
            if reference is None:
                reference_name, reference = f"{arm} seed {seed}", ids
            elif not np.array_equal(ids, reference):
                only = np.setdiff1d(ids, reference)[:5].tolist()
                missing = np.setdiff1d(reference, ids)[:5].tolist()
                raise ValueError(
                    f"sample ids of {arm} seed {seed} differ from those of {reference_name} "
                    f"(extra {only}, missing {missing}): runs were evaluated on other samples")


def _seed_averaged_variable_mse(by_seed: Mapping[int, EvaluationResult]
                                ) -> tuple[np.ndarray, np.ndarray]:
    """(ids sorted, (N, V) per-variable MSE averaged over seeds)."""
    stacks, ids = [], None
    for seed in sorted(by_seed):
        rows = by_seed[seed].per_sample
        order = np.argsort(rows.sample_ids.numpy())
        ids = rows.sample_ids.numpy()[order]
        stacks.append(rows.variable_mse().numpy()[order])
    return ids, np.mean(stacks, axis=0)


def pooled_state(by_seed: Mapping[int, EvaluationResult]) -> dict[str, torch.Tensor]:
    """ForecastMetrics sums added over seeds (each seed scored the same samples)."""
    seeds = sorted(by_seed)
    state = {k: v.clone() for k, v in by_seed[seeds[0]].state.items()}
    for seed in seeds[1:]:
        for key, value in by_seed[seed].state.items():
            state[key] += value
    return state


def pooled_scores(by_seed: Mapping[int, EvaluationResult], config: Any,
                  units: Mapping[str, str]) -> dict:
    """ForecastMetrics.compute() on the sums pooled over seeds."""
    metrics = ForecastMetrics(
        target_variables=config.target_variables, lead_times_hours=config.lead_times_hours,
        normalization={"mean": config.variable_mean, "std": config.variable_std},
        grid_shape=tuple(config.img_size), units=units)
    metrics.load_state(pooled_state(by_seed))
    return metrics.compute()


class ArmComparison:
    """Everything the report says about one arm against the control."""

    def __init__(self, arm: str, verdict_: SeedVerdict, sample_level: SampleLevelView,
                 gains: list[dict], regions: dict, gain_map_: np.ndarray,
                 per_seed: dict[int, dict[str, float]]) -> None:
        self.arm = arm
        self.verdict = verdict_
        self.sample_level = sample_level
        self.gains = gains
        self.regions = regions
        self.gain_map = gain_map_
        self.per_seed = per_seed

    def to_dict(self) -> dict:
        regions = {k: v for k, v in self.regions.items() if k != "markdown"}
        return {"arm": self.arm, "verdict": self.verdict.to_dict(),
                "sample_level": self.sample_level.to_dict(),
                "gains_by_variable_and_lead": self.gains, "regions": regions,
                "per_seed_test_loss": {str(s): v for s, v in self.per_seed.items()}}


def per_seed_losses(by_seed: Mapping[int, EvaluationResult]) -> SeedLosses:
    """{seed: (sample ids, per-sample test loss)} of one arm."""
    return {s: (r.per_sample.sample_ids.numpy(), r.per_sample.loss.numpy())
            for s, r in sorted(by_seed.items())}


def compare_arm(evals: Evaluations, arm: str, *, variables: Sequence[str],
                elevation_m: np.ndarray | None, region_codes: np.ndarray | None,
                region_names: Mapping[int, str] | None, n_boot: int = 2000,
                block_length: int | None = None, margin: float = DEFAULT_MARGIN,
                target_mde: float | None = None,
                map_worlds: Sequence[str] = ()) -> ArmComparison:
    """The verdict, the sample-level view, gains, region tables and gain map of `arm`.

    With `elevation_m` None (a terrain per sample, `terrain.TerrainMetrics` sums in the states)
    the elevation bands come from each sample's own elevation and the gain map is one panel per
    held-out world of `map_worlds` (pooled over targets and leads in normalized units)."""
    if CONTROL not in evals:
        raise ValueError(f"no '{CONTROL}' arm among the evaluated arms {sorted(evals)}")
    if arm not in evals:
        raise ValueError(f"unknown arm {arm!r}; evaluated arms are {sorted(evals)}")
    _check_same_samples(evals)
    control, treated = evals[CONTROL], evals[arm]
    if sorted(control) != sorted(treated):
        raise ValueError(f"arm {arm!r} has seeds {sorted(treated)}, the control "
                         f"{sorted(control)}: seeds must pair up")
    per_seed = {s: {"control": seed_mean_loss(control[s]), "arm": seed_mean_loss(treated[s])}
                for s in sorted(control)}
    result = seed_verdict_from_losses(per_seed_losses(control), per_seed_losses(treated),
                                      arm_name=arm, control_name=CONTROL, margin=margin,
                                      target_mde=target_mde, n_boot=n_boot,
                                      block_length=block_length)
    c_ids, c_loss = mean_over_seeds(list(per_seed_losses(control).values()))
    a_ids, a_loss = mean_over_seeds(list(per_seed_losses(treated).values()))
    view = sample_level_view(paired_samples(c_ids, c_loss, a_ids, a_loss), arm_name=arm,
                             control_name=CONTROL, block_length=block_length, n_boot=n_boot)
    cv_ids, cv_mse = _seed_averaged_variable_mse(control)
    av_ids, av_mse = _seed_averaged_variable_mse(treated)
    gains = gains_by_variable_and_lead(cv_ids, cv_mse, av_ids, av_mse, variables,
                                       block_length=block_length, n_boot=n_boot)
    c_state, a_state = pooled_state(control), pooled_state(treated)
    if elevation_m is None:
        regions, gmap = _per_sample_terrain_regions(c_state, a_state, variables, map_worlds)
    else:
        regions = region_report(c_state, a_state, variables, elevation_m=elevation_m,
                                region_codes=region_codes, region_names=region_names)
        gmap = gain_map(c_state["cell_sq_err"], c_state["cell_count"], a_state["cell_sq_err"],
                        a_state["cell_count"])
    return ArmComparison(arm, result, view, gains, regions, gmap, per_seed)


def _per_sample_terrain_regions(c_state: Mapping[str, torch.Tensor],
                                a_state: Mapping[str, torch.Tensor], variables: Sequence[str],
                                map_worlds: Sequence[str]) -> tuple[dict, np.ndarray]:
    """Band table from each sample's own elevation and the (M, H, W) gain map of the map worlds."""
    if "band_sq_err" not in c_state or "map_sq_err" not in c_state:
        raise ValueError("the corpus has a terrain per sample but the evaluation holds no "
                         "per-sample elevation sums (evaluated before they existed?): delete "
                         "the experiment's eval/ folder and rerun")
    rows = band_rows(c_state, a_state, variables)
    markdown = format_region_table(
        rows, title="elevation band (each sample's own terrain; cells: sample-cells, all seeds)")
    gmap = gain_map(c_state["map_sq_err"], c_state["map_count"], a_state["map_sq_err"],
                    a_state["map_count"])
    regions = {"elevation_band": [r.to_dict() for r in rows], "region": [],
               "map_worlds": list(map_worlds), "markdown": markdown}
    return regions, gmap
