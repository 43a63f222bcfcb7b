"""The training-split statistics of `forecast_target="anomaly"`: climatology, damping and scale.

An anomaly model forecasts damped anomaly persistence plus a learned correction (see
`TopoFlowConfig.forecast_target`). Its climatology is harmonic (`climatology_basis` in
modeling_topoflow.py: 13 terms of the times of day and year), fitted per cell and target by least
squares on every time stamp of the training split, so the model can evaluate it at any calendar
time from the batch's `time_features` alone. The damping factors are the least-squares fit of
`topoflow.references.fit_damped_persistence` on that climatology, and the head's scale per target
and lead is the root-mean-square of what damped persistence leaves over the same pairs: a head
output of 0 is damped anomaly persistence, and the head learns unit-scale corrections.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from configuration_topoflow import TopoFlowConfig
from modeling_topoflow import CLIMATOLOGY_TERMS, climatology_basis
from topoflow.corpus.schema import CorpusMetadata
from topoflow.corpus.shards import read_shard
from topoflow.data.time_features import encode_time_features
from topoflow.metrics import decode_sample_ids
from topoflow.references import fit_damped_persistence, split_shards, stack_targets

__all__ = ["AnomalyBase", "HarmonicClimatology", "calendar_terms", "fit_anomaly_base"]

# Fewer valid time stamps than this at a cell and the harmonics are not fitted there (the
# constant term, its mean, stays): 13 terms need far more than 13 samples to be stable.
MIN_SAMPLES_PER_TERM = 4
# Ridge on the normal equations, relative to the sample count: a term the sampling cannot see
# (sin of twice the day phase is 0 at 0, 6, 12 and 18 UTC) gets coefficient 0 instead of a
# singular solve; for the resolved terms (Gram diagonal ~ count / 2) the shrinkage is ~1e-6.
RIDGE = 1e-6


def calendar_terms(hours: Sequence[int] | np.ndarray) -> torch.Tensor:
    """(T, CLIMATOLOGY_TERMS) float64 harmonic terms at each hour (hours since 1970-01-01T00),
    from the same (sin, cos) phases the data pipeline gives the model."""
    names = ("init_time_of_day", "init_time_of_year")
    phases = np.stack([encode_time_features(names, int(hour), 0) for hour in hours])
    phases = torch.from_numpy(phases.astype(np.float64))
    return climatology_basis(phases[:, 0:2], phases[:, 2:4])


class HarmonicClimatology:
    """Per-cell least-squares harmonic climatology of the targets, in physical units.

    Offers `target_variables` and `forecast(sample_ids)` as `topoflow.metrics.Climatology` does, so
    `fit_damped_persistence` fits damping factors on it unchanged.
    """

    def __init__(self, target_variables: Sequence[str], grid_shape: tuple[int, int]) -> None:
        self.target_variables = list(target_variables)
        cells = len(self.target_variables) * grid_shape[0] * grid_shape[1]
        self.shape = (len(self.target_variables), *grid_shape)
        self.gram = torch.zeros(cells, CLIMATOLOGY_TERMS, CLIMATOLOGY_TERMS, dtype=torch.float64)
        self.moment = torch.zeros(cells, CLIMATOLOGY_TERMS, dtype=torch.float64)
        self.count = torch.zeros(cells, dtype=torch.float64)
        self._coefficients: torch.Tensor | None = None

    def add_physical(self, values: torch.Tensor, hours: np.ndarray) -> None:
        """Accumulate fields `(T, V, H, W)` (physical units) at `hours` (T,); NaN cells skipped."""
        terms = calendar_terms(hours)  # (T, K)
        flat = values.double().reshape(values.shape[0], -1)  # (T, cells)
        valid = torch.isfinite(flat).double()
        self.gram += torch.einsum("tk,tl,tc->ckl", terms, terms, valid)
        self.moment += torch.einsum("tk,tc->ck", terms, torch.nan_to_num(flat) * valid)
        self.count += valid.sum(0)
        self._coefficients = None

    @property
    def coefficients(self) -> torch.Tensor:
        """(V, K, H, W) float64 physical coefficients; a cell with too few samples keeps its mean
        (its constant term), one with none gets NaN (undefined, as the binned climatology)."""
        if self._coefficients is None:
            fitted = self.count >= MIN_SAMPLES_PER_TERM * CLIMATOLOGY_TERMS
            coefficients = torch.zeros_like(self.moment)
            coefficients[:, 0] = self.moment[:, 0] / self.count.clamp(min=1)
            coefficients[self.count == 0] = float("nan")
            if fitted.any():
                ridge = RIDGE * self.count[fitted, None, None] * torch.eye(CLIMATOLOGY_TERMS)
                coefficients[fitted] = torch.linalg.solve(
                    self.gram[fitted] + ridge, self.moment[fitted][..., None])[..., 0]
            self._coefficients = coefficients.reshape(
                self.shape[0], *self.shape[1:], CLIMATOLOGY_TERMS).permute(0, 3, 1, 2)  # fmt: skip
        return self._coefficients

    def at_hours(self, hours: Sequence[int] | np.ndarray) -> torch.Tensor:
        """(T, V, H, W) float64 physical climatology at each hour."""
        return torch.einsum("tk,vkhw->tvhw", calendar_terms(hours), self.coefficients)

    def forecast(self, sample_ids: torch.Tensor | np.ndarray) -> torch.Tensor:
        """(B, V, H, W) float64 physical climatology at each sample's valid time."""
        init_hour, lead = decode_sample_ids(sample_ids)
        return self.at_hours(init_hour + lead)


def fit_harmonic_climatology(
    corpus: str | os.PathLike,
    target_variables: Sequence[str],
    *,
    split: str = "train",
    revision: str | None = None,
) -> HarmonicClimatology:
    """Fit on every own (non-halo) time stamp of `split`, read through `read_shard` (checksums,
    schema), so each time counts once."""
    meta = CorpusMetadata.load(corpus, revision=revision)
    missing = [name for name in target_variables if name not in meta.variables]
    if missing:
        raise ValueError(f"corpus {meta.source}: no dynamic variables {missing} for the "
                         f"harmonic climatology")  # fmt: skip
    clim = HarmonicClimatology(target_variables, (meta.height, meta.width))
    for shard, root in split_shards(corpus, meta, split, revision):
        time_hour, is_halo, fields = read_shard(root, shard, meta)
        own = ~is_halo
        clim.add_physical(stack_targets(fields, target_variables)[own], time_hour[own])
    return clim


@dataclass
class AnomalyBase:
    """What `forecast_target="anomaly"` takes from the training split."""

    coefficients: torch.Tensor  # (V_out, K, H, W) float32, normalized units: the model's buffer
    damping: dict[str, dict[str, float]]  # config.anomaly_damping
    scale: dict[str, dict[str, float]]  # config.increment_scale

    def load_into(self, model: torch.nn.Module) -> None:
        """Copy the climatology into an anomaly model's buffer, checking its shape."""
        buffer = model.climatology.coefficients
        if tuple(buffer.shape) != tuple(self.coefficients.shape):
            raise ValueError(f"climatology coefficients: the model expects {tuple(buffer.shape)}, "
                             f"fitted {tuple(self.coefficients.shape)}")  # fmt: skip
        with torch.no_grad():
            buffer.copy_(self.coefficients)


def fit_anomaly_base(
    corpus: str | os.PathLike,
    *,
    target_variables: Sequence[str],
    lead_times_hours: Sequence[int],
    normalization: Mapping[str, Mapping[str, Any]],
    split: str = "train",
    revision: str | None = None,
) -> AnomalyBase:
    """Two passes over `split`: the harmonic climatology, then damping factors and residual RMS.

    `normalization` is `{"mean": {name: m}, "std": {name: s}}` (the config's); the climatology is
    stored normalized, as the model sees its fields. A cell the split never covers gets the
    variable's mean (normalized 0): it lies outside every region the loss or the scores count.
    """
    clim = fit_harmonic_climatology(corpus, target_variables, split=split, revision=revision)
    damped = fit_damped_persistence(corpus, clim, lead_times_hours, split=split, revision=revision)
    factors = damped.factors  # (L, V)
    residual = damped.residual_mean_square(factors)  # (L, V), physical units squared
    mean = torch.tensor([float(normalization["mean"][v]) for v in target_variables])
    std = torch.tensor([float(normalization["std"][v]) for v in target_variables])
    coefficients = clim.coefficients.clone()
    coefficients[:, 0] -= mean.double()[:, None, None]
    coefficients = torch.nan_to_num(coefficients / std.double()[:, None, None, None], nan=0.0)
    rms = residual.sqrt() / std.double()[None, :]
    bad = [(name, lead) for i, lead in enumerate(damped.lead_times_hours)
           for j, name in enumerate(target_variables) if not float(rms[i, j]) > 0]  # fmt: skip
    if bad:
        raise ValueError(f"{corpus}: damped persistence leaves no residual for (target, lead) "
                         f"{bad}; cannot scale the anomaly head")  # fmt: skip
    table = lambda values: {  # noqa: E731
        name: {str(lead): float(values[i, j]) for i, lead in enumerate(damped.lead_times_hours)}
        for j, name in enumerate(target_variables)}  # fmt: skip
    return AnomalyBase(coefficients.float(), table(factors), table(rms))


def fit_anomaly_base_for(config: TopoFlowConfig, corpus: str | os.PathLike) -> AnomalyBase:
    """`fit_anomaly_base` with the targets, leads and normalization of `config`."""
    return fit_anomaly_base(
        corpus, target_variables=config.target_variables,
        lead_times_hours=config.lead_times_hours,
        normalization={"mean": config.variable_mean, "std": config.variable_std})  # fmt: skip
