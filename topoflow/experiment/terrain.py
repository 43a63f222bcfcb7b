"""Scores that follow each sample's own terrain, for corpora whose elevation changes per sample.

On the embedded default corpus the elevation is one static field, so "which elevation band gains"
and "where on the map" can be read from per-cell error sums pooled over all samples. In the
terrain worlds (topoflow/corpus/worlds.py) every world has its own terrain, elevation is a
per-sample dynamic column, and a cell index means nothing across worlds. There:

- the elevation bands are taken from each sample's own elevation (`band_sq_err`, `band_count`,
  `(K, V)` physical units, K bands of `DEFAULT_ELEVATION_EDGES_M`);
- the gain maps are drawn per held-out world: the first `MAP_WORLDS` shards of the evaluation
  split (one world per shard) keep their own per-cell sums (`map_sq_err`, `map_count`, `(M, H, W)`,
  normalized units summed over the targets and leads, so a map pools what the test loss pools),
  and their elevation is read back from the corpus for contours and attention-bias panels.

The sums live beside `ForecastMetrics`'s own in the same state dict, so they are saved with an
evaluation, added over seeds and ignored by code that does not know them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from topoflow.metrics import ForecastMetrics, decode_sample_ids
from topoflow.regions import DEFAULT_ELEVATION_EDGES_M, RegionRow, elevation_bands

__all__ = [
    "MAP_WORLDS",
    "MapWorld",
    "TerrainMetrics",
    "band_rows",
    "has_per_sample_elevation",
    "map_worlds",
]

MAP_WORLDS = 3
_ELEVATION = "elevation"


def has_per_sample_elevation(meta: Any) -> bool:
    """True when the corpus stores elevation as a dynamic (per-sample) column."""
    return _ELEVATION in meta.variables


@dataclass
class MapWorld:
    """One held-out world drawn on the gain maps: its shard, hours and elevation (m)."""

    name: str
    first_hour: int
    last_hour: int
    elevation_m: np.ndarray  # (H, W)


def map_worlds(corpus: str | Path, split: str, count: int = MAP_WORLDS) -> list[MapWorld]:
    """The first `count` shards (worlds) of `split`, each with its elevation at its first row."""
    from topoflow.corpus import CorpusMetadata
    from topoflow.corpus.shards import read_shard

    meta = CorpusMetadata.load(corpus)
    shards = [s for s in meta.shards if s.split == split][:count]
    worlds = []
    for shard in shards:
        _, _, fields = read_shard(corpus, shard, meta)
        name = Path(shard.file).stem.split("-of-")[0]
        worlds.append(MapWorld(name, int(shard.first_hour), int(shard.last_hour),
                               fields[_ELEVATION][0].astype(np.float64)))
    return worlds


class TerrainMetrics(ForecastMetrics):
    """`ForecastMetrics` plus elevation-band sums from each sample's own elevation (read from its
    input fields, un-normalized) and per-cell sums for the worlds of `worlds`."""

    def __init__(self, *, input_variables: Sequence[str], worlds: Sequence[MapWorld],
                 elevation_mean: float, elevation_std: float,
                 edges_m: Sequence[float] = DEFAULT_ELEVATION_EDGES_M, **kwargs: Any) -> None:
        if _ELEVATION not in input_variables:
            raise ValueError(f"per-sample elevation bands need '{_ELEVATION}' among the model's "
                             f"input variables, got {list(input_variables)}")
        self.elevation_channel = list(input_variables).index(_ELEVATION)
        self.elevation_mean, self.elevation_std = float(elevation_mean), float(elevation_std)
        self.edges_m = tuple(float(e) for e in edges_m)
        self.worlds = list(worlds)
        super().__init__(input_variables=input_variables, **kwargs)

    def reset(self) -> None:
        super().reset()
        n_bands, n_var = len(self.edges_m) + 1, len(self.target_variables)
        for key in ("band_sq_err", "band_count"):
            self.sums[key] = torch.zeros((n_bands, n_var), dtype=torch.float64)
        shape = (len(self.worlds), *self.grid_shape)
        for key in ("map_sq_err", "map_count"):
            self.sums[key] = torch.zeros(shape, dtype=torch.float64)

    @torch.no_grad()
    def add(self, forecast: torch.Tensor, labels: torch.Tensor, region_mask: torch.Tensor,
            sample_ids: torch.Tensor, fields: torch.Tensor | None = None,
            references: Mapping[str, torch.Tensor] | None = None) -> None:
        super().add(forecast, labels, region_mask, sample_ids, fields, references)
        if fields is None:
            raise ValueError("TerrainMetrics.add needs the input fields (each sample's elevation)")
        forecast, labels = forecast.detach().double().cpu(), labels.detach().double().cpu()
        valid = region_mask.detach().cpu().bool()[:, None] & torch.isfinite(labels)
        err_norm = torch.where(valid, forecast - labels, torch.zeros((), dtype=torch.float64))
        self._add_bands(err_norm, valid, fields)
        self._add_maps(err_norm, valid, sample_ids)

    def _add_bands(self, err_norm: torch.Tensor, valid: torch.Tensor, fields: torch.Tensor
                   ) -> None:
        elevation = fields.detach().double().cpu()[:, self.elevation_channel]
        elevation = elevation * self.elevation_std + self.elevation_mean  # (B, H, W) metres
        codes, _ = elevation_bands(elevation.numpy(), self.edges_m)
        codes = torch.from_numpy(codes)[:, None].expand_as(valid)  # (B, V, H, W)
        squared = (err_norm * self.std[None, :, None, None]).pow(2)
        for band in range(len(self.edges_m) + 1):
            inside = codes == band
            self.sums["band_sq_err"][band] += torch.where(inside, squared, 0.0).sum((0, 2, 3))
            self.sums["band_count"][band] += (inside & valid).sum((0, 2, 3)).double()

    def _add_maps(self, err_norm: torch.Tensor, valid: torch.Tensor, sample_ids: torch.Tensor
                  ) -> None:
        init_hours, _ = decode_sample_ids(sample_ids.detach().cpu())
        for index, world in enumerate(self.worlds):
            rows = (init_hours >= world.first_hour) & (init_hours <= world.last_hour)
            if not rows.any():
                continue
            rows = torch.from_numpy(rows)
            self.sums["map_sq_err"][index] += err_norm[rows].pow(2).sum((0, 1))
            self.sums["map_count"][index] += valid[rows].sum((0, 1)).double()


def band_rows(control_state: Mapping[str, Any], arm_state: Mapping[str, Any],
              variables: Sequence[str], edges_m: Sequence[float] = DEFAULT_ELEVATION_EDGES_M
              ) -> list[RegionRow]:
    """Elevation-band rows (as `regions.region_table`'s) from the per-sample band sums; a band's
    "cells" are sample-cells: a cell of one sample counts once per sample it falls in the band."""
    c_sq, c_n = (np.asarray(control_state[k], dtype=np.float64) for k in ("band_sq_err",
                                                                          "band_count"))
    a_sq, a_n = (np.asarray(arm_state[k], dtype=np.float64) for k in ("band_sq_err", "band_count"))
    if not np.array_equal(c_n, a_n):
        raise ValueError("control and arm band counts differ: arms were scored on other samples")
    _, names = elevation_bands(np.zeros(1), edges_m)
    rows = []
    for band, name in names.items():
        cells = int(c_n[band].max())
        for v, variable in enumerate(variables):
            n = float(c_n[band, v])
            rmse_c = float(np.sqrt(c_sq[band, v] / n)) if n > 0 else None
            rmse_a = float(np.sqrt(a_sq[band, v] / n)) if n > 0 else None
            gain = 1.0 - rmse_a / rmse_c if rmse_c else None
            rows.append(RegionRow(name, band, variable, cells, int(n), int(n), rmse_c, rmse_a,
                                  gain))
    return rows
