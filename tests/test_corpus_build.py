"""Corpus building: halos, training-only statistics, determinism, caching, the CLI."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from topoflow.corpus import POLLUTANTS, CorpusError, CorpusMetadata
from topoflow.corpus.build import CorpusWriter, build_default_corpus, main
from topoflow.corpus.shards import read_shard
from topoflow.data import make_forecast_dataset

from .fixtures_corpus import write_synthetic_corpus


def _file_bytes(folder: Path) -> dict[str, bytes]:
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    return {str(p.relative_to(folder)): p.read_bytes() for p in files}


def _read_split(corpus: Path, split: str, own_only: bool = True) -> dict[str, np.ndarray]:
    meta = CorpusMetadata.load(corpus)
    parts: dict[str, list[np.ndarray]] = {}
    for shard in meta.split_shards(split):
        _, is_halo, fields = read_shard(corpus, shard, meta)
        for v, f in fields.items():
            parts.setdefault(v, []).append(f[~is_halo] if own_only else f)
    return {v: np.concatenate(p) for v, p in parts.items()}


def test_halo_rows_repeat_the_next_shard_and_stop_at_the_split_end(synthetic_corpus: Path) -> None:
    meta = CorpusMetadata.load(synthetic_corpus)
    for split in meta.splits:
        shards = meta.split_shards(split)
        for shard, following in zip(shards, shards[1:], strict=False):
            assert shard.rows - shard.own_rows == meta.halo_hours // meta.time_step_hours
            hours, is_halo, fields = read_shard(synthetic_corpus, shard, meta)
            next_hours, _, next_fields = read_shard(synthetic_corpus, following, meta)
            halo = len(hours) - shard.own_rows
            assert is_halo[shard.own_rows:].all() and not is_halo[: shard.own_rows].any()
            np.testing.assert_array_equal(hours[shard.own_rows:], next_hours[:halo])
            np.testing.assert_array_equal(fields["o3"][shard.own_rows:], next_fields["o3"][:halo])
        assert shards[-1].rows == shards[-1].own_rows  # no halo across the split's end


def test_normalization_uses_the_training_split_only(synthetic_corpus: Path) -> None:
    meta = CorpusMetadata.load(synthetic_corpus)
    train = _read_split(synthetic_corpus, "train")
    test = _read_split(synthetic_corpus, "test")
    for v in ("u", "pm25"):
        values = train[v].astype(np.float64)
        assert meta.normalization[v]["mean"] == pytest.approx(np.nanmean(values), rel=1e-9)
        assert meta.normalization[v]["std"] == pytest.approx(np.nanstd(values), rel=1e-9)
        both = np.concatenate([values, test[v]])
        assert abs(np.nanmean(both) - meta.normalization[v]["mean"]) > 0.1  # the trend shows


def test_synthetic_writes_are_byte_identical_and_seed_sensitive(tmp_path: Path) -> None:
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        write_synthetic_corpus(tmp_path / name, seed=seed)
    a, b, c = (_file_bytes(tmp_path / n) for n in "abc")
    assert a == b
    assert a.keys() == c.keys() and a["data/train-00000-of-00004.parquet"] != c[
        "data/train-00000-of-00004.parquet"]


def test_writer_refuses_gaps_and_missing_rows(tmp_path: Path) -> None:
    fields = {"u": np.zeros((2, 2, 2), np.float32)}
    writer = CorpusWriter(tmp_path / "gap", variables=["u"], time_step_hours=6,
                          split_edges={"train": [0, 24]}, halo_hours=0)  # fmt: skip
    with pytest.raises(CorpusError, match="advance by 6 h"):
        writer.add(np.array([0, 12]), fields)
    writer = CorpusWriter(tmp_path / "short", variables=["u"], time_step_hours=6,
                          split_edges={"train": [0, 24]}, halo_hours=0)  # fmt: skip
    writer.add(np.array([0, 6]), fields)
    with pytest.raises(CorpusError, match="train-00000-of-00001.parquet.*expected 4 rows"):
        writer.finish()


def test_tiny_corpus_layout_and_physical_values(tiny_corpus: Path) -> None:
    meta = CorpusMetadata.load(tiny_corpus)
    assert meta.provenance["seed"] == 0 and meta.provenance["terrain_blocking"] == 1.0
    for split in ("train", "validation", "test"):
        assert len(meta.split_shards(split)) == 4
    train = _read_split(tiny_corpus, "train")
    for v, field in train.items():
        assert np.isfinite(field).all(), v
    for v in POLLUTANTS:
        assert (train[v] >= 0).all(), v
    ds = make_forecast_dataset(tiny_corpus, "train", variables=["u", "elevation"],
                               target_variables=["pm25"], lead_times_hours=[12, 96])  # fmt: skip
    assert ds.n_shards == 4


def test_build_is_deterministic_cached_and_cli_writes_the_same(
    tiny_corpus: Path, tmp_path: Path
) -> None:
    out = main(["--size", "tiny", "--out", str(tmp_path / "cli")])
    assert _file_bytes(out) == _file_bytes(tiny_corpus)
    # Cached: a second call returns the same folder without rebuilding.
    mtime = os.stat(tiny_corpus / "topoflow_corpus.json").st_mtime_ns
    assert build_default_corpus(root=tiny_corpus.parent, size="tiny", seed=0) == tiny_corpus
    assert os.stat(tiny_corpus / "topoflow_corpus.json").st_mtime_ns == mtime
    assert not [p for p in tiny_corpus.parent.iterdir() if p.name.startswith(".")]


def test_different_seed_or_blocking_differs(tiny_corpus: Path, tmp_path: Path) -> None:
    other = build_default_corpus(root=tmp_path, size="tiny", seed=1)
    assert other.name != tiny_corpus.name
    ours, theirs = _file_bytes(tiny_corpus), _file_bytes(other)
    assert ours.keys() == theirs.keys()
    assert all(ours[k] != theirs[k] for k in ours if k.startswith("data/"))
