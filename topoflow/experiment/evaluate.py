"""Score one or more models on a corpus split, streaming the split once for all of them.

For every model: `ForecastMetrics` with the persistence, climatology and damped persistence
references (RMSE, MAE, bias per target x lead in physical units, skill scores), the per-sample
errors for paired comparisons, and the per-cell error sums for gain maps. With
`score_references=True` the reference forecasts are scored exactly like a model, on the same
samples, under their own names (`REFERENCE_NAMES`). Each result can go to its own folder:

    <dest>/metrics.json              ForecastMetrics.compute() + what was evaluated
    <dest>/metrics_state.safetensors the running sums (ForecastMetrics.state())
    <dest>/per_sample.safetensors    sample_ids (N,), sq_err_sum (N, V), count (N, V)

Streaming once matters on small machines: reading and normalizing a shard costs about as much as
a forward pass of a small model, and every arm must be scored on exactly the same samples anyway.
`init_stride` keeps every k-th initialization time (all its leads) to bound the cost; the kept
set depends only on the sample ids, so it is the same for every model and every run.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from topoflow.metrics import REFERENCE_NAMES, Climatology, ForecastMetrics, PerSampleErrors
from topoflow.references import DampedPersistence, build_climatology

from .terrain import TerrainMetrics, has_per_sample_elevation, map_worlds

__all__ = [
    "METRICS_JSON",
    "METRICS_STATE",
    "PER_SAMPLE",
    "EvaluationResult",
    "build_climatology",
    "evaluate_forecasters",
    "evaluate_models",
    "load_evaluation",
    "test_loss_row",
]

METRICS_JSON = "metrics.json"
METRICS_STATE = "metrics_state.safetensors"
PER_SAMPLE = "per_sample.safetensors"


class EvaluationResult:
    """One model's evaluation, as written to (or read back from) its folder."""

    def __init__(self, metrics: dict[str, Any], state: dict[str, torch.Tensor],
                 per_sample: PerSampleErrors, folder: Path | None = None) -> None:
        self.metrics = metrics
        self.state = state
        self.per_sample = per_sample
        self.folder = folder

    def save(self, folder: str | Path) -> Path:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in self.state.items()},
                  str(folder / METRICS_STATE))
        rows = self.per_sample
        save_file({"sample_ids": rows.sample_ids.contiguous(),
                   "sq_err_sum": rows.sq_err_sum.contiguous(), "count": rows.count.contiguous()},
                  str(folder / PER_SAMPLE))
        (folder / METRICS_JSON).write_text(json.dumps(self.metrics, indent=2) + "\n")
        self.folder = folder
        return folder


def load_evaluation(folder: str | Path) -> EvaluationResult:
    """Read what `EvaluationResult.save` wrote; a clear error names the missing file."""
    folder = Path(folder)
    for name in (METRICS_JSON, METRICS_STATE, PER_SAMPLE):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"evaluation folder {folder} lacks {name}")
    rows = load_file(str(folder / PER_SAMPLE))
    per_sample = PerSampleErrors(rows["sample_ids"], rows["sq_err_sum"], rows["count"])
    return EvaluationResult(json.loads((folder / METRICS_JSON).read_text()),
                            load_file(str(folder / METRICS_STATE)), per_sample, folder)


def test_loss_row(per_sample: Sequence[PerSampleErrors] | PerSampleErrors,
                  lead_times_hours: Sequence[int]) -> dict[str, float]:
    """{"all": test loss, "<lead>": test loss at that lead, ...} of one forecaster; given several
    runs (seeds), each value is the mean over them (the experiment's per-seed test loss)."""
    runs = [per_sample] if isinstance(per_sample, PerSampleErrors) else list(per_sample)
    keys: list[int | None] = [None, *lead_times_hours]
    return {("all" if lead is None else str(lead)): float(np.mean([r.test_loss(lead)
                                                                   for r in runs]))
            for lead in keys}


def _load_models(model_dirs: Mapping[str, str | Path]) -> dict[str, Any]:
    import topoflow  # noqa: F401  (registers the Auto classes and the name resolver)
    from modeling_topoflow import TopoFlowForForecasting

    models = {}
    for name, folder in model_dirs.items():
        if not Path(folder).is_dir():
            raise FileNotFoundError(f"model folder of {name!r} does not exist: {folder}")
        models[name] = TopoFlowForForecasting.from_pretrained(str(folder)).eval()
    return models


def _check_same_data_contract(models: Mapping[str, Any]) -> Any:
    """All models must read and predict the same variables, leads and normalization."""
    keys = ("variables", "target_variables", "lead_times_hours", "variable_mean", "variable_std",
            "img_size", "time_features")
    names = list(models)
    first = models[names[0]].config
    for name in names[1:]:
        config = models[name].config
        differing = [k for k in keys if getattr(config, k) != getattr(first, k)]
        if differing:
            raise ValueError(f"model {name!r} differs from {names[0]!r} in {differing}: they "
                             "cannot be scored on the same batches")
    return first


def _keep_init_stride(batch: dict[str, torch.Tensor], stride: int, step_hours: int
                      ) -> dict[str, torch.Tensor] | None:
    if stride <= 1:
        return batch
    init_index = (batch["sample_ids"] // 1000) // step_hours
    keep = init_index % stride == 0
    if not bool(keep.any()):
        return None
    return {k: v[keep] for k, v in batch.items()}


def evaluate_models(model_dirs: Mapping[str, str | Path], corpus: str | Path, *,
                    split: str = "test", batch_size: int = 32, init_stride: int = 1,
                    climatology: Climatology | None = None, max_batches: int = 0,
                    damped_persistence: DampedPersistence | None = None,
                    score_references: bool = False) -> dict[str, EvaluationResult]:
    """Score every model of `model_dirs` ({name: folder}) on the same samples of `split`."""
    models = _load_models(model_dirs)
    if not models:
        raise ValueError("evaluate_models: no model given")
    config = _check_same_data_contract(models)
    results = evaluate_forecasters(
        models, corpus, config=config, split=split, batch_size=batch_size,
        init_stride=init_stride, climatology=climatology, damped_persistence=damped_persistence,
        max_batches=max_batches, score_references=score_references)
    for name, folder in model_dirs.items():
        results[name].metrics["evaluated"]["model"] = str(folder)
    return results


@torch.no_grad()
def evaluate_forecasters(models: Mapping[str, Any], corpus: str | Path, *, config: Any,
                         split: str = "test", batch_size: int = 32, init_stride: int = 1,
                         climatology: Climatology | None = None,
                         damped_persistence: DampedPersistence | None = None,
                         score_references: bool = False, max_batches: int = 0
                         ) -> dict[str, EvaluationResult]:
    """Score loaded models ({name: model}) and, with `score_references`, the reference forecasts
    on the same samples of `split`; `config` (a TopoFlowConfig) fixes variables, leads and
    normalization. References are keyed by their REFERENCE_NAMES; climatology and damped
    persistence are scored only when given."""
    from torch.utils.data import DataLoader

    from topoflow.corpus import CorpusMetadata
    from topoflow.data import collate_forecast_batch, make_forecast_dataset

    if init_stride < 1:
        raise ValueError(f"init_stride must be >= 1, got {init_stride}")
    clashing = sorted(set(models) & set(REFERENCE_NAMES)) if score_references else []
    if clashing:
        raise ValueError(f"model names {clashing} are the names of reference forecasts")
    if not models and not score_references:
        raise ValueError("evaluate_forecasters: no model given and score_references is off")
    meta = CorpusMetadata.load(corpus)
    normalization = {"mean": config.variable_mean, "std": config.variable_std}
    dataset = make_forecast_dataset(
        corpus, split, variables=config.variables, target_variables=config.target_variables,
        lead_times_hours=config.lead_times_hours, normalization=normalization, shuffle=False,
        time_features=config.time_features)

    common = {"target_variables": config.target_variables,
              "lead_times_hours": config.lead_times_hours, "normalization": normalization,
              "grid_shape": (meta.height, meta.width), "input_variables": config.variables,
              "climatology": climatology, "units": meta.units,
              "damped_persistence": damped_persistence}
    worlds = map_worlds(corpus, split) if has_per_sample_elevation(meta) else None

    def new_metrics() -> ForecastMetrics:
        if worlds is None:
            return ForecastMetrics(**common)
        # A terrain per sample: elevation bands and maps follow each sample's own terrain.
        return TerrainMetrics(**common, worlds=worlds,
                              elevation_mean=config.variable_mean["elevation"],
                              elevation_std=config.variable_std["elevation"])

    metrics = {name: new_metrics() for name in models}
    references: dict[str, ForecastMetrics] = {}
    reference_maker = ForecastMetrics(**common)  # computes each batch's references once for all
    loader = DataLoader(dataset, batch_size=batch_size, collate_fn=collate_forecast_batch)
    for index, batch in enumerate(loader):
        if max_batches and index >= max_batches:
            break
        batch = _keep_init_stride(batch, init_stride, meta.time_step_hours)
        if batch is None:
            continue
        forecasts = reference_maker.reference_forecasts(batch["sample_ids"], batch["fields"])
        for name, model in models.items():
            out = model(**batch)
            metrics[name].add(out.forecast, batch["labels"], batch["region_mask"],
                              batch["sample_ids"], fields=batch["fields"], references=forecasts)
        if not score_references:
            continue
        for name, forecast in forecasts.items():
            metric = references.setdefault(name, new_metrics())
            metric.add_physical_forecast(forecast, batch["labels"], batch["region_mask"],
                                         batch["sample_ids"], batch["fields"], forecasts)
    info = {"corpus": str(corpus), "split": split, "init_stride": init_stride,
            "max_batches": max_batches, "climatology": climatology is not None,
            "damped_persistence": damped_persistence is not None}
    results = {}
    for name, metric in {**metrics, **references}.items():
        rows = metric.per_sample()
        if rows.sample_ids.numel() == 0:
            raise ValueError(f"split {split!r} of {corpus} gave no sample to evaluate")
        what = f"reference: {name}" if name in references else name
        scores = {**metric.compute(), "evaluated": {**info, "model": what,
                                                    "n_samples": int(rows.sample_ids.numel())}}
        results[name] = EvaluationResult(scores, metric.state(), rows)
    return results
