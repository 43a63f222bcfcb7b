"""How much of the terrain-worlds blocking signal a patch-level bias could see.

Two measurements, in units of the blocking-on corpus's pollutant standard deviations:

1. corpora: the mean squared difference of the pollutant targets between the blocking-on and
   blocking-off worlds corpora (same terrains, winds and sources; the states differ too), over
   all cells and after averaging over patches of 1, 2 and 4 cells (what a bias on patch-mean
   heights could act on); with the persistence error of the blocking-on corpus for scale.
2. window: from the same blocking-on state at an initial time, the forecast-window effect of
   switching blocking off (the part a forecaster could learn from the inputs), for a few worlds.
3. hidden barriers: among patch pairs up to 4 patches apart, the share whose straight path
   climbs more than 500 m above the higher of the two patch means (a ridge between two lower
   patches), which an endpoint-height bias cannot see, next to the share whose endpoint rise
   exceeds 500 m (what it can see).

    python scripts/worlds_signal.py ON_CORPUS OFF_CORPUS [--split validation]
"""

from __future__ import annotations

import argparse
import copy
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from topoflow.corpus.atmosphere import Atmosphere, _uphill_factors
from topoflow.corpus.schema import POLLUTANTS, CorpusMetadata
from topoflow.corpus.shards import read_shard
from topoflow.corpus.worlds import WORLD_SIZES, WorldWeather, world_params, world_terrain

__all__ = ["main", "patch_mean"]


def patch_mean(field: np.ndarray, patch: int) -> np.ndarray:
    """(..., H, W) -> (..., H / patch, W / patch) block means."""
    *lead, height, width = field.shape
    blocks = field.reshape(*lead, height // patch, patch, width // patch, patch)
    return blocks.mean(axis=(-3, -1))


def window_effect(size: str, worlds: Sequence[int], std: dict[str, float]) -> dict[str, float]:
    """Forecast-window effect of blocking: run each world with blocking on to its first output
    time, then advance two copies of that state, one with the uphill factors switched off."""
    preset = WORLD_SIZES[size]
    sums: dict[str, list[float]] = {}
    for index in worlds:
        terrain = world_terrain(0, index, preset.height, preset.width)
        params = world_params(preset, 0, index, 394_464, 1.0)
        atmosphere = Atmosphere(params, terrain=terrain, weather_type=WorldWeather)
        while atmosphere.hour < params.start_hour:
            atmosphere.step()
        unblocked = copy.deepcopy(atmosphere)
        unblocked.uphill = _uphill_factors(terrain.elevation, 0.0, params.blocking_height_m)
        for hours in range(params.physics_step_hours, 25, params.physics_step_hours):
            atmosphere.step()
            unblocked.step()
            if hours not in (12, 24):
                continue
            on, off = atmosphere.fields(), unblocked.fields()
            diff = np.stack([(on[v] - off[v]) / std[v] for v in POLLUTANTS])  # (6, H, W)
            for patch in (1, 2, 4):
                key = f"window_msd_lead{hours}_patch{patch}"
                sums.setdefault(key, []).append(float((patch_mean(diff, patch) ** 2).mean()))
    return {key: float(np.mean(values)) for key, values in sums.items()}


def hidden_barriers(size: str, worlds: Sequence[int], patch: int = 2, radius: int = 4,
                    threshold_m: float = 500.0) -> dict[str, float]:
    """Shares of patch pairs with a path barrier / an endpoint rise above `threshold_m`."""
    preset = WORLD_SIZES[size]
    rows, cols = preset.height // patch, preset.width // patch
    hidden, visible, pairs = 0, 0, 0
    for index in worlds:
        z = world_terrain(0, index, preset.height, preset.width).elevation.astype(np.float64)
        means = patch_mean(z, patch)
        for i in range(rows * cols):
            for j in range(rows * cols):
                (ri, ci), (rj, cj) = divmod(i, cols), divmod(j, cols)
                if i == j or max(abs(ri - rj), abs(ci - cj)) > radius:
                    continue
                t = np.linspace(0.0, 1.0, 8 * radius + 1)
                path_r = ((ri + t * (rj - ri)) * patch + patch / 2).astype(int)
                path_c = ((ci + t * (cj - ci)) * patch + patch / 2).astype(int)
                top = max(means[ri, ci], means[rj, cj])
                pairs += 1
                hidden += z[path_r, path_c].max() - top > threshold_m
                visible += abs(means[ri, ci] - means[rj, cj]) > threshold_m
    return {f"pairs_with_hidden_barrier_over_{threshold_m:.0f}m": float(hidden / pairs),
            f"pairs_with_endpoint_rise_over_{threshold_m:.0f}m": float(visible / pairs)}


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("on", type=Path)
    parser.add_argument("off", type=Path)
    parser.add_argument("--split", default="validation")
    parser.add_argument("--window-worlds", type=int, default=8,
                        help="worlds re-simulated for the forecast-window measurement")
    args = parser.parse_args(argv)
    on_meta, off_meta = CorpusMetadata.load(args.on), CorpusMetadata.load(args.off)
    std = {v: on_meta.normalization[v]["std"] for v in POLLUTANTS}
    step = on_meta.time_step_hours
    sums: dict[str, list[float]] = {}
    for shard_on, shard_off in zip(on_meta.split_shards(args.split),
                                   off_meta.split_shards(args.split), strict=True):  # fmt: skip
        on = read_shard(args.on, shard_on, on_meta)[2]
        off = read_shard(args.off, shard_off, off_meta)[2]
        z = (np.stack([on[v] / std[v] for v in POLLUTANTS], axis=1),
             np.stack([off[v] / std[v] for v in POLLUTANTS], axis=1))  # (T, 6, H, W)
        for lead in (12, 24):
            targets = slice(lead // step, lead // step + shard_on.own_rows)
            diff = z[0][targets] - z[1][targets]
            persistence = z[0][targets] - z[0][: shard_on.own_rows]
            sums.setdefault(f"persistence_mse_lead{lead}", []).append(
                float((persistence**2).mean()))
            for patch in (1, 2, 4):
                key = f"on_vs_off_msd_lead{lead}_patch{patch}"
                sums.setdefault(key, []).append(float((patch_mean(diff, patch) ** 2).mean()))
    result = {key: float(np.mean(values)) for key, values in sums.items()}
    result.update(window_effect(on_meta.provenance["size"], range(args.window_worlds), std))
    result.update(hidden_barriers(on_meta.provenance["size"], range(args.window_worlds)))
    for key, value in result.items():
        print(f"{key:38s} {value:.4f}")
    return result


if __name__ == "__main__":
    main()
