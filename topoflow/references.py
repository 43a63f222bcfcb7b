"""Reference forecasts fitted on the training split: climatology and damped anomaly persistence.

Persistence needs no fitting (the state at init time, `topoflow.metrics.ForecastMetrics`). The
climatology is the training-split mean per cell x month x UTC hour of day
(`topoflow.metrics.Climatology`). Damped anomaly persistence forecasts

    climatology(valid time) + factor[lead, variable] * (state at init - climatology(init time))

with one factor per target variable x lead time, the least-squares fit on the training split:
factor = sum(a_init * a_valid) / sum(a_init ** 2) over every (init, lead) pair the loader builds
from the split (init in a shard's own rows, target up to its halo) and every region cell where
both anomalies are finite. A factor of 0 is climatology, 1 is persistence of the anomaly.

Shards are read with `topoflow.corpus.shards.read_shard` (sha256, Parquet page checksums, schema,
rows), so a damaged training shard fails with its name instead of skewing the references.
`References.fit(corpus, ...)` builds both; `save(folder)` / `References.load(folder)` keep them
beside an evaluation so that every model is scored against the very same references.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from topoflow.corpus.schema import STATIC_FILE, CorpusMetadata, ShardInfo, resolve_corpus_file
from topoflow.corpus.shards import read_shard, read_static
from topoflow.metrics import Climatology, decode_sample_ids

__all__ = [
    "CLIMATOLOGY_FILE",
    "DAMPED_PERSISTENCE_FILE",
    "DampedPersistence",
    "References",
    "build_climatology",
    "fit_damped_persistence",
]

CLIMATOLOGY_FILE = "climatology.safetensors"
DAMPED_PERSISTENCE_FILE = "damped_persistence.safetensors"
_FORMAT = "topoflow-damped-persistence-v1"


class DampedPersistence:
    """Damped anomaly persistence on top of `climatology` (see the module docstring).

    Fitting streams: `add_pairs` accumulates, per lead x variable, the sums of init anomaly times
    valid anomaly and of init anomaly squared (float64); `factors` is their ratio.
    """

    def __init__(self, climatology: Climatology, lead_times_hours: Sequence[int]) -> None:
        leads = [int(h) for h in lead_times_hours]
        if not leads or len(set(leads)) != len(leads) or min(leads) <= 0:
            raise ValueError(f"lead_times_hours must be positive and unique, got {leads}")
        self.climatology = climatology
        self.target_variables = list(climatology.target_variables)
        self.lead_times_hours = leads
        shape = (len(leads), len(self.target_variables))
        self.cross = torch.zeros(shape, dtype=torch.float64)  # sum a_init * a_valid
        self.energy = torch.zeros(shape, dtype=torch.float64)  # sum a_init ** 2
        self.valid_energy = torch.zeros(shape, dtype=torch.float64)  # sum a_valid ** 2
        self.count = torch.zeros(shape, dtype=torch.float64)  # cells that entered the sums

    def add_pairs(
        self,
        init_anomaly: torch.Tensor,
        valid_anomaly: torch.Tensor,
        lead_hours: int,
        region_mask: torch.Tensor | None = None,
    ) -> None:
        """Accumulate anomalies `(N, V, H, W)` at init and valid time of N pairs of one lead;
        only cells inside `region_mask` `(H, W)` where both anomalies are finite count."""
        if lead_hours not in self.lead_times_hours:
            raise ValueError(f"lead {lead_hours} h not in {self.lead_times_hours}")
        if init_anomaly.shape != valid_anomaly.shape or init_anomaly.ndim != 4:
            raise ValueError(
                f"anomalies: expected two equal (N, V, H, W) shapes, got "
                f"{tuple(init_anomaly.shape)} and {tuple(valid_anomaly.shape)}"
            )
        # numpy: torch.isfinite on float64 is several times slower on CPU, and this runs over
        # every training pair.
        a0 = init_anomaly.detach().cpu().numpy().astype(np.float64, copy=False)
        a1 = valid_anomaly.detach().cpu().numpy().astype(np.float64, copy=False)
        valid = np.isfinite(a0) & np.isfinite(a1)
        if region_mask is not None:
            valid &= np.asarray(region_mask, dtype=bool)[None, None]
        a0, a1 = np.where(valid, a0, 0.0), np.where(valid, a1, 0.0)
        index = self.lead_times_hours.index(int(lead_hours))
        self.cross[index] += torch.from_numpy(np.einsum("nvhw,nvhw->v", a0, a1))
        self.energy[index] += torch.from_numpy(np.einsum("nvhw,nvhw->v", a0, a0))
        self.valid_energy[index] += torch.from_numpy(np.einsum("nvhw,nvhw->v", a1, a1))
        self.count[index] += torch.from_numpy(valid.sum((0, 2, 3)).astype(np.float64))

    @property
    def factors(self) -> torch.Tensor:
        """(L, V) least-squares factors; a lead x variable without any training pair is an error,
        never a silent 0 or 1."""
        empty = [
            f"{var} at {lead} h"
            for l_idx, lead in enumerate(self.lead_times_hours)
            for v_idx, var in enumerate(self.target_variables)
            if float(self.energy[l_idx, v_idx]) <= 0
        ]
        if empty:
            raise ValueError(f"damped persistence has no training anomaly for {', '.join(empty)}")
        return self.cross / self.energy

    def residual_mean_square(self, factors: torch.Tensor | None = None) -> torch.Tensor:
        """(L, V) mean over the fitting cells of (a_valid - factor x a_init) ** 2: what damped
        persistence leaves, from the same sums (the fitted factors by default)."""
        factors = self.factors if factors is None else factors
        total = self.valid_energy - 2 * factors * self.cross + factors**2 * self.energy
        return total.clamp(min=0) / self.count.clamp(min=1)

    def forecast(self, init_state: torch.Tensor, sample_ids: torch.Tensor) -> torch.Tensor:
        """Forecast `(B, V, H, W)` float64 in physical units from the state at init time (physical
        units) of each sample; NaN where the climatology is undefined."""
        init_hour, lead = decode_sample_ids(sample_ids)
        unknown = sorted(set(lead.tolist()) - set(self.lead_times_hours))
        if unknown:
            raise ValueError(f"damped persistence has no factor for lead times {unknown} h")
        factor = self.factors[[self.lead_times_hours.index(h) for h in lead.tolist()]]  # (B, V)
        clim_init = self.climatology.forecast(init_hour * 1000)  # lead 0: the init time itself
        clim_valid = self.climatology.forecast(sample_ids)
        anomaly = init_state.detach().double().cpu() - clim_init
        return clim_valid + factor[:, :, None, None] * anomaly

    def save(self, path: str | os.PathLike) -> Path:
        """Write the fitting sums (the factors follow from them) to a safetensors file."""
        metadata = {
            "format": _FORMAT,
            "target_variables": json.dumps(self.target_variables),
            "lead_times_hours": json.dumps(self.lead_times_hours),
        }
        tensors = {"cross": self.cross, "energy": self.energy, "count": self.count,
                   "valid_energy": self.valid_energy}
        path = Path(path)
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, climatology: Climatology) -> DampedPersistence:
        """Read what `save` wrote; `climatology` must be the one it was fitted with."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"damped persistence file {path} does not exist")
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
        if metadata.get("format") != _FORMAT:
            raise ValueError(f"{path} is not a TopoFlow damped persistence (metadata {metadata})")
        variables = json.loads(metadata["target_variables"])
        if variables != climatology.target_variables:
            raise ValueError(
                f"{path}: fitted for {variables}, the climatology has "
                f"{climatology.target_variables}"
            )
        fitted = cls(climatology, json.loads(metadata["lead_times_hours"]))
        tensors = load_file(str(path))
        for name in ("cross", "energy", "count", "valid_energy"):
            if name not in tensors or tensors[name].shape != fitted.cross.shape:
                raise ValueError(f"{path}: tensor {name!r} missing or of the wrong shape")
            setattr(fitted, name, tensors[name].double())
        return fitted


def split_shards(
    corpus: str | os.PathLike, meta: CorpusMetadata, split: str, revision: str | None
) -> Iterator[tuple[ShardInfo, Path]]:
    """(shard, local corpus root) for each shard of `split`, downloading Hub shards."""
    for shard in meta.split_shards(split):
        path = resolve_corpus_file(corpus, shard.file, revision=revision)
        yield shard, path.parents[len(Path(shard.file).parts) - 1]


def stack_targets(fields: dict[str, np.ndarray], targets: Sequence[str]) -> torch.Tensor:
    return torch.from_numpy(np.stack([fields[v] for v in targets], axis=1)).double()


def _check_targets(meta: CorpusMetadata, target_variables: Sequence[str], what: str) -> None:
    missing = [v for v in target_variables if v not in meta.variables]
    if missing:
        raise ValueError(f"corpus {meta.source}: no dynamic variables {missing} for the {what}")


def build_climatology(
    corpus: str | os.PathLike,
    target_variables: Sequence[str],
    *,
    split: str = "train",
    revision: str | None = None,
    hours_per_bin: int = 1,
) -> Climatology:
    """Climatology of `split` (training) from the corpus shards, each time stamp counted once.

    Halo rows are skipped (they belong to the next shard); going through the forecast samples
    instead would count every row once per lead time.
    """
    meta = CorpusMetadata.load(corpus, revision=revision)
    _check_targets(meta, target_variables, "climatology")
    clim = Climatology(target_variables, (meta.height, meta.width), hours_per_bin=hours_per_bin)
    for shard, root in split_shards(corpus, meta, split, revision):
        time_hour, is_halo, fields = read_shard(root, shard, meta)
        own = ~is_halo
        clim.add_physical(stack_targets(fields, target_variables)[own], time_hour[own])
    return clim


def fit_damped_persistence(
    corpus: str | os.PathLike,
    climatology: Climatology,
    lead_times_hours: Sequence[int],
    *,
    split: str = "train",
    revision: str | None = None,
) -> DampedPersistence:
    """Least-squares damping factors on `split` (see the module docstring) over region cells."""
    meta = CorpusMetadata.load(corpus, revision=revision)
    _check_targets(meta, climatology.target_variables, "damped persistence")
    step = meta.time_step_hours
    bad = [h for h in lead_times_hours if int(h) % step or int(h) > meta.halo_hours]
    if bad:
        raise ValueError(
            f"lead times {bad} h: must be multiples of the corpus time step ({step} h) and at "
            f"most its halo ({meta.halo_hours} h)"
        )
    static = read_static(resolve_corpus_file(corpus, STATIC_FILE, revision=revision), meta)
    region_mask = torch.from_numpy(np.asarray(static["region_id"]) != 0)
    fitted = DampedPersistence(climatology, lead_times_hours)
    for shard, root in split_shards(corpus, meta, split, revision):
        time_hour, _, fields = read_shard(root, shard, meta)
        values = stack_targets(fields, climatology.target_variables)
        anomaly = values - climatology.forecast(torch.from_numpy(time_hour * 1000))  # (T, V, H, W)
        for lead in fitted.lead_times_hours:
            k = lead // step
            pairs = min(shard.own_rows, shard.rows - k)  # init in own rows, target in the shard
            if pairs > 0:
                fitted.add_pairs(anomaly[:pairs], anomaly[k : k + pairs], lead, region_mask)
    fitted.factors  # noqa: B018  (fails now, naming the gap, rather than at the first forecast)
    return fitted


class References:
    """The fitted references of one corpus: climatology and damped anomaly persistence."""

    def __init__(self, climatology: Climatology, damped_persistence: DampedPersistence) -> None:
        if damped_persistence.climatology is not climatology:
            raise ValueError("damped_persistence must be fitted on this climatology")
        self.climatology = climatology
        self.damped_persistence = damped_persistence

    @classmethod
    def fit(
        cls,
        corpus: str | os.PathLike,
        target_variables: Sequence[str],
        lead_times_hours: Sequence[int],
        *,
        split: str = "train",
        revision: str | None = None,
        hours_per_bin: int = 1,
    ) -> References:
        """Fit both on `split`; `hours_per_bin` groups hours of day in the climatology (memory:
        see `Climatology`)."""
        clim = build_climatology(
            corpus, target_variables, split=split, revision=revision, hours_per_bin=hours_per_bin
        )
        damped = fit_damped_persistence(
            corpus, clim, lead_times_hours, split=split, revision=revision
        )
        return cls(clim, damped)

    def save(self, folder: str | os.PathLike) -> Path:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.climatology.save(folder / CLIMATOLOGY_FILE)
        self.damped_persistence.save(folder / DAMPED_PERSISTENCE_FILE)
        return folder

    @classmethod
    def load(cls, folder: str | os.PathLike) -> References:
        folder = Path(folder)
        clim = Climatology.load(folder / CLIMATOLOGY_FILE)
        return cls(clim, DampedPersistence.load(folder / DAMPED_PERSISTENCE_FILE, clim))
