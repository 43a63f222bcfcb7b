"""Forecast samples streamed from a corpus with `datasets`, shard by shard.

`make_forecast_dataset` opens the corpus with `datasets.load_dataset(<folder or Hub id>,
streaming=True)` (page checksums verified) and returns a `datasets.IterableDataset` with one data
source per Parquet shard of the split. Each source reads its whole shard (own rows plus halo rows),
normalizes it once, and yields every (init time, lead) sample whose target lies in the shard, in an
order permuted by (seed, epoch, shard). Nothing is buffered across shards, so:

- sharding (`.shard`, `split_dataset_by_node`, accelerate, dataloader workers) hands out whole
  shards: every sample is seen exactly once per epoch across ranks and workers;
- `state_dict()` / `load_state_dict()` resume exactly: `datasets` records (shard index, sample
  index) and the generator re-creates the same order from (seed, epoch, shard). Call `set_epoch`
  with the checkpoint's epoch before iterating a resumed dataset.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
from datasets.iterable_dataset import ExamplesIterable

from topoflow.corpus.schema import STATIC_FILE, CorpusError, CorpusMetadata, resolve_corpus_file
from topoflow.corpus.shards import (
    check_rows_match,
    file_sha256,
    read_static,
    table_to_arrays,
    validate_shard_file,
)

__all__ = ["make_forecast_dataset", "check_world_size", "ForecastSource"]


def check_world_size(n_shards: int, world_size: int) -> None:
    """Raise unless every rank can read the same number of whole shards."""
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if n_shards < world_size or n_shards % world_size:
        raise ValueError(
            f"the split has {n_shards} shards, which cannot be divided evenly among "
            f"{world_size} processes; use a world size that divides {n_shards} (ranks would "
            f"otherwise read unequal amounts or, below {n_shards} shards, the same data twice)"
        )


@dataclass
class ForecastSource:
    """Everything a shard's generator needs; picklable so dataloader workers get a copy."""

    raw: Any  # the datasets.IterableDataset of raw rows, one source per shard file
    meta: CorpusMetadata
    local_root: str | None  # corpus folder for sha256 checks; None for a Hub corpus
    variables: list[str]
    target_variables: list[str]
    lead_times_hours: list[int]
    mean: dict[str, float]
    std: dict[str, float]
    static_normalized: dict[str, np.ndarray]  # (H, W) float32, NaN -> 0
    region_mask: np.ndarray  # (H, W) bool
    seed: int
    shuffle: bool


def _read_shard_table(source: ForecastSource, task: Mapping[str, Any]) -> pa.Table:
    """All rows of one shard through `datasets`, after a sha256 check when the corpus is local."""
    name = task["file"]
    if source.local_root is not None:
        path = Path(source.local_root) / name
        if not path.is_file():
            raise CorpusError(f"{path}: shard is missing")
        if file_sha256(path) != task["sha256"]:
            raise CorpusError(
                f"{path}: sha256 does not match the metadata (truncated, modified or "
                f"bit-flipped shard)"
            )
        name = str(path)
    raw_shard = source.raw.shard(num_shards=source.raw.n_shards, index=task["position"])
    try:
        batches = list(raw_shard.with_format("arrow").iter(batch_size=task["rows"]))
    except (pa.ArrowException, OSError, ValueError) as e:
        raise CorpusError(f"{name}: cannot read shard: {e}") from e
    if not batches:
        raise CorpusError(f"{name}: shard has no rows")
    return pa.concat_tables(batches)


def _normalized_inputs(
    source: ForecastSource, raw: Mapping[str, np.ndarray], rows: int
) -> np.ndarray:
    """(T, V, H, W) float32 inputs: normalized once per shard, missing values -> 0 (the mean)."""
    height, width = source.region_mask.shape
    out = np.empty((rows, len(source.variables), height, width), dtype=np.float32)
    for c, v in enumerate(source.variables):
        if v in source.static_normalized:
            out[:, c] = source.static_normalized[v]  # static: broadcast over time
        else:
            out[:, c] = (raw[v] - source.mean[v]) / source.std[v]
    np.nan_to_num(out, copy=False, nan=0.0)
    return out


def _generate_samples(
    shards: list[dict[str, Any]], source: ForecastSource, epoch: int = 0
) -> Iterator[tuple[str, dict[str, Any]]]:
    """Yield the samples of the given shards (`datasets` calls this with one shard at a time)."""
    meta, step = source.meta, source.meta.time_step_hours
    needed = list(dict.fromkeys(v for v in (*source.variables, *source.target_variables)
                                if v in meta.variables))  # fmt: skip
    for task in shards:
        shard = meta.shards[task["meta_index"]]
        table = _read_shard_table(source, task)
        time_hour, is_halo, raw = table_to_arrays(table, meta, needed, task["file"])
        check_rows_match(time_hour, is_halo, shard, task["file"], step)
        inputs = _normalized_inputs(source, raw, len(time_hour))  # (T, V, H, W)
        labels = np.stack(
            [(raw[v] - source.mean[v]) / source.std[v] for v in source.target_variables], axis=1
        ).astype(np.float32, copy=False)  # (T, V_out, H, W), NaN kept
        pairs = [(i, lead) for i in range(shard.own_rows) for lead in source.lead_times_hours
                 if i + lead // step < shard.rows]  # fmt: skip
        order = np.arange(len(pairs))
        if source.shuffle:
            order = np.random.default_rng([source.seed, epoch, task["meta_index"]]).permutation(
                len(pairs)
            )
        for k in order.tolist():
            i, lead = pairs[k]
            sample_id = int(time_hour[i]) * 1000 + lead
            # Copies (about 0.1 MB per sample), so a consumer that edits a sample in place
            # cannot corrupt the shard buffer or the samples that share its rows.
            yield f"{task['file']}:{sample_id}", {
                "fields": inputs[i].copy(),
                "lead_time_hours": np.float32(lead),
                "labels": labels[i + lead // step].copy(),
                "region_mask": source.region_mask.copy(),
                "sample_ids": np.int64(sample_id),
            }


class _ShardExamplesIterable(ExamplesIterable):
    """`datasets`' generator-backed iterable, made aware of the epoch and of `shuffle=False`.

    `datasets` tells an iterable the epoch through `shift_rngs(epoch)` and permutes data sources
    with `shuffle_data_sources(rng(epoch))`; the stock class loses itself in both. This keeps it,
    passes the epoch to the generator (within-shard order), and keeps shard order fixed when the
    dataset was made with `shuffle=False` (evaluation).
    """

    def _with_kwargs(self, kwargs: dict[str, Any]) -> _ShardExamplesIterable:
        return _ShardExamplesIterable(self.generate_examples_fn, kwargs)

    def shift_rngs(self, value: int) -> _ShardExamplesIterable:
        return self._with_kwargs({**self.kwargs, "epoch": int(value)})

    def shuffle_data_sources(self, generator: np.random.Generator) -> _ShardExamplesIterable:
        if not self.kwargs["source"].shuffle:
            return self._with_kwargs(dict(self.kwargs))
        return self._with_kwargs(super().shuffle_data_sources(generator).kwargs)

    def shard_data_sources(
        self, num_shards: int, index: int, contiguous: bool = True
    ) -> _ShardExamplesIterable:
        return self._with_kwargs(super().shard_data_sources(num_shards, index, contiguous).kwargs)

    def reshard_data_sources(self) -> _ShardExamplesIterable:
        # A shard is the unit of the time-window buffer; splitting it would lose samples.
        return self._with_kwargs(dict(self.kwargs))


def _check_request(
    meta: CorpusMetadata,
    variables: Sequence[str],
    target_variables: Sequence[str],
    lead_times_hours: Sequence[int],
) -> list[int]:
    src = meta.source or "corpus"
    known = {*meta.variables, *meta.static_variables}
    unknown = [v for v in variables if v not in known]
    if unknown:
        raise ValueError(f"{src}: input variable(s) {unknown} not in the corpus {sorted(known)}")
    if len(set(variables)) != len(variables):
        raise ValueError(f"variables has duplicates: {list(variables)}")
    bad_targets = [v for v in target_variables if v not in meta.variables]
    if bad_targets or not target_variables:
        raise ValueError(
            f"{src}: target variable(s) {bad_targets or '[]'} must be dynamic corpus variables "
            f"{meta.variables}"
        )
    leads = []
    for lead in lead_times_hours:
        if lead != int(lead) or lead <= 0 or int(lead) % meta.time_step_hours:
            raise ValueError(
                f"lead time {lead} h must be a positive multiple of the corpus time step "
                f"({meta.time_step_hours} h)"
            )
        if lead > meta.halo_hours:
            raise ValueError(
                f"lead time {lead} h exceeds the corpus halo ({meta.halo_hours} h): samples near "
                f"shard edges would be lost; rebuild the corpus with a longer halo"
            )
        leads.append(int(lead))
    if not leads or len(set(leads)) != len(leads):
        raise ValueError(f"lead_times_hours must be non-empty and unique, got {lead_times_hours}")
    return leads


def _normalization_for(
    meta: CorpusMetadata, normalization: Mapping[str, Any] | None, names: Sequence[str]
) -> tuple[dict[str, float], dict[str, float]]:
    """Accepts the corpus layout {var: {mean, std}} or a config's {mean: {var}, std: {var}}."""
    stats = meta.normalization if normalization is None else normalization
    if set(stats) == {"mean", "std"} and isinstance(stats["mean"], Mapping):
        stats = {v: {"mean": stats["mean"][v], "std": stats["std"][v]}
                 for v in stats["mean"] if v in stats["std"]}  # fmt: skip
    missing = [v for v in names if v not in stats]
    if missing:
        raise ValueError(f"normalization lacks mean/std for {missing}")
    mean = {v: float(stats[v]["mean"]) for v in names}
    std = {v: float(stats[v]["std"]) for v in names}
    bad = [v for v in names if not (np.isfinite(std[v]) and std[v] > 0 and np.isfinite(mean[v]))]
    if bad:
        raise ValueError(f"normalization for {bad} is not finite with std > 0")
    return mean, std


def _open_raw_rows(corpus: str, split: str, revision: str | None) -> Any:
    import datasets
    import pyarrow.dataset as pads
    import yaml

    scan = pads.ParquetFragmentScanOptions(page_checksum_verification=True)
    try:
        return datasets.load_dataset(
            corpus, split=split, streaming=True, revision=revision, fragment_scan_options=scan
        )
    except yaml.YAMLError as e:
        # datasets parses the card's YAML front matter from a string, so yaml names
        # "<unicode string>" instead of the file.
        raise CorpusError(
            f"{corpus}/README.md: the dataset card's YAML front matter does not parse (yaml "
            f"counts lines from the one after the opening ---, one less than the file): {e}"
        ) from e
    except (pa.ArrowException, OSError, ValueError) as e:
        raise CorpusError(f"{corpus}: datasets cannot open split {split!r}: {e}") from e


def make_forecast_dataset(
    corpus: str | os.PathLike,
    split: str,
    *,
    variables: Sequence[str],
    target_variables: Sequence[str],
    lead_times_hours: Sequence[int],
    normalization: Mapping[str, Any] | None = None,
    seed: int = 0,
    shuffle: bool = True,
    revision: str | None = None,
) -> Any:
    """A `datasets.IterableDataset` of forecast samples (docs/CONTRACTS.md section 1, unbatched).

    `corpus` is a corpus folder or a Hub dataset repo id. `normalization` defaults to the corpus's
    training-split statistics; pass the model config's statistics to normalize as the model was
    trained. `n_shards` equals the split's shard count; do not shard it yourself when it goes
    through `accelerate.prepare` (accelerate calls `.shard` per rank); check the world size with
    `check_world_size(dataset.n_shards, world_size)`.
    """
    from datasets import DatasetInfo, IterableDataset, NamedSplit

    meta = CorpusMetadata.load(corpus, revision=revision)
    variables, targets = list(variables), list(target_variables)
    leads = _check_request(meta, variables, targets, lead_times_hours)
    shards = meta.split_shards(split)
    local_root = str(corpus) if Path(corpus).is_dir() else None
    if local_root is not None:
        for shard in shards:  # cheap footer checks now, so a bad corpus fails before training
            validate_shard_file(local_root, shard, meta, check_sha256=False)
    static = read_static(resolve_corpus_file(corpus, STATIC_FILE, revision=revision), meta)
    mean, std = _normalization_for(meta, normalization, list(dict.fromkeys([*variables, *targets])))
    static_normalized = {
        v: np.nan_to_num((static[v] - mean[v]) / std[v], nan=0.0).astype(np.float32)
        for v in variables if v in meta.static_variables
    }  # fmt: skip
    raw = _open_raw_rows(str(corpus), split, revision)
    if raw.n_shards != len(shards):
        raise CorpusError(
            f"{corpus}: datasets sees {raw.n_shards} data files for split {split!r}, the metadata "
            f"lists {len(shards)} shards (README.md configs out of date?)"
        )
    source = ForecastSource(
        raw=raw, meta=meta, local_root=local_root, variables=variables, target_variables=targets,
        lead_times_hours=leads, mean=mean, std=std, static_normalized=static_normalized,
        region_mask=np.asarray(static["region_id"]) != 0, seed=int(seed), shuffle=shuffle,
    )  # fmt: skip
    index_of = {s.file: i for i, s in enumerate(meta.shards)}
    tasks = [
        {"position": p, "meta_index": index_of[s.file], "file": s.file, "rows": s.rows,
         "sha256": s.sha256}
        for p, s in enumerate(shards)
    ]  # fmt: skip
    if shuffle:
        tasks = [tasks[i] for i in np.random.default_rng(seed).permutation(len(tasks))]
    ex_iterable = _ShardExamplesIterable(
        _generate_samples, {"shards": tasks, "source": source, "epoch": 0}
    )
    info = DatasetInfo(description=f"TopoFlow forecast samples from {meta.name} ({split})")
    return IterableDataset(ex_iterable, info=info, split=NamedSplit(split))
