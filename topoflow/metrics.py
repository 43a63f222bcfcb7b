"""Forecast scores on a split: RMSE, MAE and bias per target variable x lead time in physical units,
skill against the persistence, climatology and damped anomaly persistence reference forecasts
(topoflow/references.py fits the last one), per-sample losses for paired comparisons, and per-cell
squared-error sums for gain maps.

Everything is a running sum, so evaluation streams: call `ForecastMetrics.add` once per batch, then
`compute()`. Under distributed evaluation each rank accumulates its own samples; `state()` returns
the sums and counts as float64 tensors that add across ranks (all-reduce them with "sum" and give
them back with `load_state`), and `per_sample()` returns variable-length per-sample rows to gather
and concatenate. Summed states give exactly the single-process result.

Conventions (docs/CONTRACTS.md section 1): forecasts and labels are normalized `(B, V_out, H, W)`,
labels are NaN where missing, `region_mask` is `(B, H, W)` bool, and
`sample_ids = init_hour * 1000 + lead_hours` with `init_hour` in hours since 1970-01-01T00 UTC.
A cell counts when `region_mask & isfinite(labels)`, the same rule as the model's loss.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

if TYPE_CHECKING:
    from topoflow.references import DampedPersistence

__all__ = [
    "REFERENCE_NAMES",
    "Climatology",
    "ForecastMetrics",
    "PerSampleErrors",
    "decode_sample_ids",
    "valid_hour_bins",
]

# The reference forecasts every model is scored against, in the order reports list them.
REFERENCE_NAMES = ("persistence", "climatology", "damped_persistence")

_SUM_KEYS = (
    "sq_err",
    "abs_err",
    "signed_err",
    "count",
    *(
        f"{kind}_{name}"
        for name in REFERENCE_NAMES
        for kind in ("sq_err", "count", "sq_err_model_on")
    ),
)


def decode_sample_ids(sample_ids: torch.Tensor | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Split sample ids into `(init_hour, lead_hours)` int64 arrays (hours since 1970-01-01T00)."""
    ids = np.asarray(
        sample_ids.cpu() if isinstance(sample_ids, torch.Tensor) else sample_ids, dtype=np.int64
    )
    return ids // 1000, ids % 1000


def valid_hour_bins(valid_hours: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Month (1..12) and UTC hour of day (0..23) of each valid time given in hours since 1970."""
    valid_hours = np.asarray(valid_hours, dtype=np.int64)
    months = np.array(
        [datetime.fromtimestamp(int(h) * 3600, tz=timezone.utc).month for h in valid_hours],
        dtype=np.int64,
    )
    return months, valid_hours % 24


def _normalization_tables(
    normalization: Mapping[str, Mapping[str, float]],
) -> tuple[Mapping[str, float], Mapping[str, float]]:
    """`(mean by variable, std by variable)` from either layout in use:
    `{mean: {var: ..}, std: {var: ..}}` or the corpus metadata's `{var: {mean: .., std: ..}}`."""
    if "mean" in normalization and "std" in normalization:
        return normalization["mean"], normalization["std"]
    if all(isinstance(v, Mapping) and {"mean", "std"} <= set(v) for v in normalization.values()):
        means = {var: stats["mean"] for var, stats in normalization.items()}
        return means, {var: stats["std"] for var, stats in normalization.items()}
    raise KeyError(
        "normalization: expected {mean: {var: ..}, std: {var: ..}} or {var: {mean: .., std: ..}}, "
        f"got keys {sorted(normalization)[:8]}"
    )


def _normalization_vectors(
    normalization: Mapping[str, Mapping[str, float]], variables: Sequence[str]
) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, std) float64 vectors in the order of `variables`."""
    means, stds = _normalization_tables(normalization)
    missing = [v for v in variables if v not in means or v not in stds]
    if missing:
        raise KeyError(f"normalization lacks mean/std for variables {missing}")
    mean = torch.tensor([float(means[v]) for v in variables], dtype=torch.float64)
    std = torch.tensor([float(stds[v]) for v in variables], dtype=torch.float64)
    if not bool((std > 0).all()):
        raise ValueError(f"normalization std must be > 0 for {list(variables)}, got {std.tolist()}")
    return mean, std


class Climatology:
    """Training-split mean of each target variable per cell for each (month, UTC hour of day).

    Build it by streaming training samples through `add` (normalized labels and their sample ids;
    the valid time is init + lead), or `add_physical` (fields in physical units and valid hours).
    Means are kept in physical units. A (month, hour) bin with no training data at a cell falls back
    to the mean over all months for that hour, then to the all-time mean, because a short training
    split may not cover the evaluation months; `forecast` reports NaN only where a cell never had
    data. Saved as safetensors (one sum and one count tensor per bin, variables in the metadata).

    Memory: two float64 (V, H, W) tensors per (month, hour) bin seen, 2 x 12 x 24 bins at most;
    for the reference 6 x 128 x 256 grid that is 0.9 GB with hourly bins, so `hours_per_bin`
    (a divisor of 24) groups the hours of day, e.g. 3 gives 8 bins per day.
    """

    def __init__(
        self,
        target_variables: Sequence[str],
        grid_shape: tuple[int, int],
        normalization: Mapping[str, Mapping[str, float]] | None = None,
        hours_per_bin: int = 1,
    ) -> None:
        if hours_per_bin < 1 or 24 % hours_per_bin:
            raise ValueError(f"hours_per_bin must divide 24, got {hours_per_bin}")
        self.hours_per_bin = int(hours_per_bin)
        self.target_variables = list(target_variables)
        self.grid_shape = (int(grid_shape[0]), int(grid_shape[1]))
        self._mean_std = (
            _normalization_vectors(normalization, self.target_variables) if normalization else None
        )
        self.sums: dict[tuple[int, int], torch.Tensor] = {}
        self.counts: dict[tuple[int, int], torch.Tensor] = {}
        self._means: dict[str, torch.Tensor] | None = None

    def add(self, labels: torch.Tensor, sample_ids: torch.Tensor) -> None:
        """Accumulate normalized labels `(B, V, H, W)` (NaN = missing) at their valid times."""
        if self._mean_std is None:
            raise ValueError(
                "Climatology.add needs `normalization` at construction to un-normalize"
            )
        mean, std = self._mean_std
        physical = (
            labels.detach().double().cpu() * std[None, :, None, None] + mean[None, :, None, None]
        )
        init_hour, lead = decode_sample_ids(sample_ids)
        self.add_physical(physical, init_hour + lead)

    def add_physical(self, values: torch.Tensor, valid_hours: torch.Tensor | np.ndarray) -> None:
        """Accumulate fields `(B, V, H, W)` in physical units valid at `valid_hours` (B,)."""
        values = values.detach().double().cpu()
        expected = (len(self.target_variables), *self.grid_shape)
        if values.ndim != 4 or tuple(values.shape[1:]) != expected:
            raise ValueError(
                f"Climatology values: expected (B, {expected}), got {tuple(values.shape)}"
            )
        months, hours = self._bins(np.asarray(valid_hours))
        finite = torch.isfinite(values)
        values = torch.where(finite, values, torch.zeros((), dtype=torch.float64))
        for b, key in enumerate(zip(months.tolist(), hours.tolist(), strict=True)):
            if key not in self.sums:
                self.sums[key] = torch.zeros(expected, dtype=torch.float64)
                self.counts[key] = torch.zeros(expected, dtype=torch.float64)
            self.sums[key] += values[b]
            self.counts[key] += finite[b]
        self._means = None

    def _bins(self, valid_hours: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(month, first hour of the hour-of-day bin) of each valid time."""
        months, hours = valid_hour_bins(valid_hours)
        return months, hours - hours % self.hours_per_bin

    def _finalize(self) -> dict[str, torch.Tensor]:
        """Per-bin, per-hour and all-time means (NaN where no data) for the fallback chain."""
        if not self.sums:
            raise ValueError("Climatology is empty: add training samples before forecasting")
        shape = (len(self.target_variables), *self.grid_shape)
        hour_sum = torch.zeros((24, *shape), dtype=torch.float64)
        hour_count = torch.zeros((24, *shape), dtype=torch.float64)
        for (_, hour), total in self.sums.items():
            hour_sum[hour] += total
        for (_, hour), count in self.counts.items():
            hour_count[hour] += count
        all_mean = hour_sum.sum(0) / hour_count.sum(0)
        hour_mean = hour_sum / hour_count
        hour_mean = torch.where(hour_count > 0, hour_mean, all_mean)
        bins = {k: self.sums[k] / self.counts[k] for k in self.sums}
        bins = {k: torch.where(self.counts[k] > 0, m, hour_mean[k[1]]) for k, m in bins.items()}
        return {"hour": hour_mean, **{f"{m:02d}-{h:02d}": v for (m, h), v in bins.items()}}

    def forecast(self, sample_ids: torch.Tensor | np.ndarray) -> torch.Tensor:
        """Climatological forecast `(B, V, H, W)`, float64 physical units, at each valid time."""
        if self._means is None:
            self._means = self._finalize()
        init_hour, lead = decode_sample_ids(sample_ids)
        months, hours = self._bins(init_hour + lead)
        out = [
            self._means.get(f"{m:02d}-{h:02d}", self._means["hour"][h])
            for m, h in zip(months.tolist(), hours.tolist(), strict=True)
        ]
        return torch.stack(out)

    def save(self, path: str | Path) -> Path:
        """Write the sums and counts to a safetensors file; return its path."""
        tensors = {}
        for (m, h), total in self.sums.items():
            tensors[f"sum_{m:02d}_{h:02d}"] = total.contiguous()
            tensors[f"count_{m:02d}_{h:02d}"] = self.counts[(m, h)].contiguous()
        metadata = {
            "format": "topoflow-climatology-v1",
            "target_variables": json.dumps(self.target_variables),
            "grid_shape": json.dumps(list(self.grid_shape)),
            "units": "physical",
            "hours_per_bin": str(self.hours_per_bin),
        }
        path = Path(path)
        save_file(tensors, str(path), metadata=metadata)
        return path

    @classmethod
    def load(cls, path: str | Path) -> Climatology:
        """Read a climatology written by `save`."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"climatology file {path} does not exist")
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
        if metadata.get("format") != "topoflow-climatology-v1":
            raise ValueError(f"{path} is not a TopoFlow climatology (metadata {metadata})")
        clim = cls(
            json.loads(metadata["target_variables"]),
            tuple(json.loads(metadata["grid_shape"])),
            hours_per_bin=int(metadata.get("hours_per_bin", "1")),
        )
        for name, tensor in load_file(str(path)).items():
            kind, month, hour = name.split("_")
            target = clim.sums if kind == "sum" else clim.counts
            target[(int(month), int(hour))] = tensor.double()
        return clim


@dataclass
class PerSampleErrors:
    """Per-sample squared-error sums in normalized space, one row per sample.

    `sample_ids` (N,) int64; `sq_err_sum` (N, V) float64 and `count` (N, V) float64 over valid
    cells. `loss` matches the model's `per_sample_loss`: all variables weighted equally per cell.
    """

    sample_ids: torch.Tensor
    sq_err_sum: torch.Tensor
    count: torch.Tensor

    @property
    def loss(self) -> torch.Tensor:
        """(N,) normalized MSE over valid cells and variables; NaN for a sample without one."""
        total = self.count.sum(1)
        return torch.where(total > 0, self.sq_err_sum.sum(1) / total, torch.nan)

    @classmethod
    def concatenate(cls, parts: Sequence[PerSampleErrors]) -> PerSampleErrors:
        """Rows of several parts (batches, or ranks after `gather_object`) in the given order."""
        if not parts:
            raise ValueError("PerSampleErrors.concatenate: no parts given")
        return cls(
            torch.cat([p.sample_ids for p in parts]),
            torch.cat([p.sq_err_sum for p in parts]),
            torch.cat([p.count for p in parts]),
        )

    def variable_mse(self) -> torch.Tensor:
        """(N, V) normalized MSE per variable; NaN where a variable had no valid cell."""
        return torch.where(self.count > 0, self.sq_err_sum / self.count, torch.nan)

    def test_loss(self, lead_hours: int | None = None) -> float:
        """Mean of the per-sample losses, samples without a valid cell left out: the "test loss"
        of `topoflow experiment`. With `lead_hours`, over the samples of that lead time only;
        NaN when no sample counts."""
        loss = self.loss
        if lead_hours is not None:
            _, leads = decode_sample_ids(self.sample_ids)
            loss = loss[torch.from_numpy(leads == int(lead_hours))]
        loss = loss[torch.isfinite(loss)]
        return float(loss.mean()) if loss.numel() else float("nan")


class ForecastMetrics:
    """Streaming accumulator of forecast scores; see the module docstring for the conventions.

    `normalization` is the corpus metadata's `{mean: {var: ..}, std: {var: ..}}` (training split);
    `units` its `units` table, copied into the results. `input_variables` (the order of the
    `fields` channels) enables persistence: the forecast "value at init time" is the target's own
    input channel, un-normalized, where missing inputs were filled with the mean by the loader.
    `damped_persistence` (which carries its climatology, used as `climatology` when that is not
    given) needs the same input channel for its anomaly at init time.
    """

    def __init__(
        self,
        *,
        target_variables: Sequence[str],
        lead_times_hours: Sequence[int],
        normalization: Mapping[str, Mapping[str, float]],
        grid_shape: tuple[int, int],
        input_variables: Sequence[str] | None = None,
        climatology: Climatology | None = None,
        units: Mapping[str, str] | None = None,
        damped_persistence: DampedPersistence | None = None,
    ) -> None:
        self.target_variables = list(target_variables)
        self.lead_times_hours = [int(h) for h in lead_times_hours]
        self.grid_shape = (int(grid_shape[0]), int(grid_shape[1]))
        self.mean, self.std = _normalization_vectors(normalization, self.target_variables)
        self.units = dict(units or {})
        self.persistence_channels = self._persistence_channels(input_variables)
        if climatology is None and damped_persistence is not None:
            climatology = damped_persistence.climatology
        for name, ref in (("climatology", climatology), ("damped_persistence", damped_persistence)):
            if ref is not None and ref.target_variables != self.target_variables:
                raise ValueError(
                    f"{name} variables {ref.target_variables} differ from "
                    f"target_variables {self.target_variables}"
                )
        if damped_persistence is not None:
            unfitted = sorted(set(self.lead_times_hours) - set(damped_persistence.lead_times_hours))
            if unfitted:
                raise ValueError(f"damped_persistence has no factor for lead times {unfitted} h")
        self.climatology = climatology
        self.damped_persistence = damped_persistence
        self.reset()

    def _persistence_channels(self, input_variables: Sequence[str] | None) -> list[int] | None:
        """Index of each target variable among the inputs; None disables persistence."""
        if input_variables is None:
            return None
        inputs = list(input_variables)
        missing = [v for v in self.target_variables if v not in inputs]
        if missing:
            raise ValueError(f"persistence needs target variables {missing} among input_variables")
        return [inputs.index(v) for v in self.target_variables]

    def reset(self) -> None:
        """Zero every sum and forget every per-sample row."""
        shape = (len(self.lead_times_hours), len(self.target_variables))
        self.sums = {key: torch.zeros(shape, dtype=torch.float64) for key in _SUM_KEYS}
        cell_shape = (len(self.target_variables), *self.grid_shape)
        self.sums["cell_sq_err"] = torch.zeros(cell_shape, dtype=torch.float64)
        self.sums["cell_count"] = torch.zeros(cell_shape, dtype=torch.float64)
        self._rows: list[PerSampleErrors] = []

    def _lead_index(self, sample_ids: torch.Tensor) -> torch.Tensor:
        _, leads = decode_sample_ids(sample_ids)
        unknown = sorted(set(leads.tolist()) - set(self.lead_times_hours))
        if unknown:
            raise ValueError(
                f"sample_ids encode lead times {unknown} h not in lead_times_hours "
                f"{self.lead_times_hours}"
            )
        return torch.tensor([self.lead_times_hours.index(h) for h in leads.tolist()])

    def _check_shapes(
        self,
        forecast: torch.Tensor,
        labels: torch.Tensor,
        region_mask: torch.Tensor,
        sample_ids: torch.Tensor,
    ) -> None:
        expected = (len(self.target_variables), *self.grid_shape)
        if forecast.ndim != 4 or tuple(forecast.shape[1:]) != expected:
            raise ValueError(f"forecast: expected (B, {expected}), got {tuple(forecast.shape)}")
        if labels.shape != forecast.shape:
            raise ValueError(
                f"labels shape {tuple(labels.shape)} != forecast {tuple(forecast.shape)}"
            )
        if tuple(region_mask.shape) != (forecast.shape[0], *self.grid_shape):
            raise ValueError(f"region_mask: expected (B, H, W), got {tuple(region_mask.shape)}")
        if tuple(sample_ids.shape) != (forecast.shape[0],):
            raise ValueError(
                f"sample_ids: expected ({forecast.shape[0]},), got {tuple(sample_ids.shape)}"
            )

    def _add_lead_sums(self, name: str, lead_index: torch.Tensor, per_sample: torch.Tensor) -> None:
        """Add a (B, V) per-sample quantity into the (L, V) sum `name`."""
        self.sums[name].index_add_(0, lead_index, per_sample)

    @torch.no_grad()
    def add(
        self,
        forecast: torch.Tensor,
        labels: torch.Tensor,
        region_mask: torch.Tensor,
        sample_ids: torch.Tensor,
        fields: torch.Tensor | None = None,
    ) -> None:
        """Accumulate one batch; `fields` (normalized inputs at init time) enables persistence."""
        self._check_shapes(forecast, labels, region_mask, sample_ids)
        forecast, labels = forecast.detach().double().cpu(), labels.detach().double().cpu()
        sample_ids = sample_ids.detach().cpu().long().clone()  # kept in the per-sample rows
        lead_index = self._lead_index(sample_ids)
        std = self.std[None, :, None, None]
        valid = region_mask.detach().cpu().bool()[:, None] & torch.isfinite(labels)  # (B, V, H, W)
        zero = torch.zeros((), dtype=torch.float64)
        err_norm = torch.where(valid, forecast - labels, zero)
        err = err_norm * std
        count = valid.sum((2, 3)).double()  # (B, V)
        self._rows.append(PerSampleErrors(sample_ids, err_norm.pow(2).sum((2, 3)), count))
        self._add_lead_sums("sq_err", lead_index, err.pow(2).sum((2, 3)))
        self._add_lead_sums("abs_err", lead_index, err.abs().sum((2, 3)))
        self._add_lead_sums("signed_err", lead_index, err.sum((2, 3)))
        self._add_lead_sums("count", lead_index, count)
        self.sums["cell_sq_err"] += err.pow(2).sum(0)
        self.sums["cell_count"] += valid.sum(0).double()
        physical_labels = labels * std + self.mean[None, :, None, None]
        for name, reference in self.reference_forecasts(sample_ids, fields).items():
            # A cell where the reference is undefined counts for neither side of the skill.
            ref_valid = valid & torch.isfinite(reference)
            ref_err = torch.where(ref_valid, reference - physical_labels, zero)
            self._add_reference(name, lead_index, ref_err, err, ref_valid)

    def reference_forecasts(
        self, sample_ids: torch.Tensor, fields: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """Each reference forecast this accumulator can make, `{name: (B, V, H, W)}` float64 in
        physical units (NaN where undefined); persistence and damped persistence need `fields`."""
        refs: dict[str, torch.Tensor] = {}
        state = None
        if fields is not None and self.persistence_channels is not None:
            normalized = fields.detach().double().cpu()[:, self.persistence_channels]
            state = normalized * self.std[None, :, None, None] + self.mean[None, :, None, None]
            refs["persistence"] = state
        if self.climatology is not None:
            refs["climatology"] = self.climatology.forecast(sample_ids)
        if self.damped_persistence is not None and state is not None:
            refs["damped_persistence"] = self.damped_persistence.forecast(state, sample_ids)
        return refs

    def normalize(self, physical: torch.Tensor) -> torch.Tensor:
        """Physical-unit target fields `(B, V, H, W)` in the normalized space of `add`."""
        return (physical - self.mean[None, :, None, None]) / self.std[None, :, None, None]

    def _add_reference(
        self,
        name: str,
        lead_index: torch.Tensor,
        ref_err: torch.Tensor,
        model_err: torch.Tensor,
        valid: torch.Tensor,
    ) -> None:
        """Reference squared errors, and the model's on the same cells (like-for-like skill)."""
        zero = torch.zeros((), dtype=torch.float64)
        self._add_lead_sums(f"sq_err_{name}", lead_index, ref_err.pow(2).sum((2, 3)))
        self._add_lead_sums(f"count_{name}", lead_index, valid.sum((2, 3)).double())
        model_sq = torch.where(valid, model_err, zero).pow(2).sum((2, 3))
        self._add_lead_sums(f"sq_err_model_on_{name}", lead_index, model_sq)

    def state(self) -> dict[str, torch.Tensor]:
        """The running sums (float64, CPU); summing states of disjoint sample sets is exact."""
        return {key: value.clone() for key, value in self.sums.items()}

    def load_state(self, state: Mapping[str, torch.Tensor]) -> None:
        """Replace the sums with `state` (e.g. after an all-reduce of every tensor with "sum")."""
        missing = set(self.sums) - set(state)
        if missing:
            raise KeyError(f"metrics state lacks {sorted(missing)}")
        for key, value in self.sums.items():
            if tuple(state[key].shape) != tuple(value.shape):
                raise ValueError(
                    f"metrics state '{key}': shape {tuple(state[key].shape)}, "
                    f"expected {tuple(value.shape)}"
                )
            self.sums[key] = state[key].detach().double().cpu().clone()

    def per_sample(self) -> PerSampleErrors:
        """All per-sample rows added so far, in arrival order (gather, concatenate over ranks)."""
        n_var = len(self.target_variables)
        if not self._rows:
            empty = torch.zeros((0, n_var), dtype=torch.float64)
            return PerSampleErrors(torch.zeros(0, dtype=torch.int64), empty, empty.clone())
        return PerSampleErrors.concatenate(self._rows)

    def sync(self, accelerator: Any) -> PerSampleErrors:
        """Combine every rank's sums and rows; call on all ranks after the evaluation loop.

        Sums are all-reduced with `accelerator.reduce(..., "sum")` and loaded back, so `compute()`
        gives the same totals on every rank; per-sample rows are gathered with
        `accelerate.utils.gather_object` (ranks may hold different numbers of samples) and
        returned, rank by rank. One reduce per sum after the loop, never per batch, so ranks may
        have run different numbers of batches.
        """
        from accelerate.utils import gather_object

        device = accelerator.device
        reduced = {
            k: accelerator.reduce(v.to(device), reduction="sum") for k, v in self.sums.items()
        }
        self.load_state(reduced)
        parts = gather_object([self.per_sample()])
        return PerSampleErrors.concatenate(parts)

    def cell_rmse(self) -> torch.Tensor:
        """(V, H, W) RMSE per cell in physical units over all leads; NaN where no data."""
        count = self.sums["cell_count"]
        return torch.where(count > 0, (self.sums["cell_sq_err"] / count).sqrt(), torch.nan)

    def compute(self) -> dict:
        """JSON-ready scores `{units, lead_times_hours, variables: {var: {lead | "all": {..}}}}`.

        Each entry has rmse, mae, bias (forecast - truth) in physical units, n (valid cells), and
        for each of REFERENCE_NAMES: rmse_<name> and skill_<name> (None when the reference did not
        run), with skill = 1 - MSE_model / MSE_reference on the cells where the reference exists.
        """
        s = self.sums
        out: dict = {
            "units": {v: self.units.get(v) for v in self.target_variables},
            "lead_times_hours": self.lead_times_hours,
            "variables": {},
        }
        for v_idx, var in enumerate(self.target_variables):
            per_lead = {}
            for l_idx, lead in enumerate(self.lead_times_hours):
                per_lead[str(lead)] = _scores(
                    {k: t[l_idx, v_idx] for k, t in s.items() if t.ndim == 2}
                )
            per_lead["all"] = _scores({k: t[:, v_idx].sum() for k, t in s.items() if t.ndim == 2})
            out["variables"][var] = per_lead
        return out


def _ratio(numerator: torch.Tensor, denominator: torch.Tensor) -> float | None:
    return float(numerator / denominator) if float(denominator) > 0 else None


def _scores(sums: Mapping[str, torch.Tensor]) -> dict[str, float | int | None]:
    """Scores of one (variable, lead) cell of the sums; None where nothing was counted."""
    mse = _ratio(sums["sq_err"], sums["count"])
    row: dict[str, float | int | None] = {
        "n": int(sums["count"]),
        "rmse": None if mse is None else mse**0.5,
        "mae": _ratio(sums["abs_err"], sums["count"]),
        "bias": _ratio(sums["signed_err"], sums["count"]),
    }
    for ref in REFERENCE_NAMES:
        ref_mse = _ratio(sums[f"sq_err_{ref}"], sums[f"count_{ref}"])
        model_mse = _ratio(sums[f"sq_err_model_on_{ref}"], sums[f"count_{ref}"])
        row[f"rmse_{ref}"] = None if ref_mse is None else ref_mse**0.5
        skill = None
        if ref_mse is not None and model_mse is not None and ref_mse > 0:
            skill = 1.0 - model_mse / ref_mse
        row[f"skill_{ref}"] = skill
    return row
