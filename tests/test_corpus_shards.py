"""Hostile shards and metadata fail loudly, naming the file (and the column or key at fault)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from topoflow.corpus.schema import METADATA_FILE, CorpusError, CorpusMetadata
from topoflow.corpus.shards import file_sha256, read_shard, validate_shard_file
from topoflow.data import make_forecast_dataset


@pytest.fixture
def corpus(synthetic_corpus: Path, tmp_path: Path) -> Path:
    """A private copy of the synthetic corpus that a test may damage."""
    return Path(shutil.copytree(synthetic_corpus, tmp_path / "corpus"))


def _first_train_shard(corpus: Path) -> Path:
    return corpus / CorpusMetadata.load(corpus).split_shards("train")[1].file


def _iterate(corpus: Path) -> None:
    ds = make_forecast_dataset(corpus, "train", variables=["u"], target_variables=["pm25"],
                               lead_times_hours=[6], shuffle=False)  # fmt: skip
    for _ in ds:
        pass


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 3] ^= 0x10
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    "damage",
    [
        lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]),
        lambda p: p.write_bytes(b""),
        lambda p: p.write_bytes(b"not a parquet file, just text\n" * 40),
        lambda p: p.unlink(),
    ],
    ids=["truncated", "empty", "not-parquet", "missing"],
)
def test_damaged_shard_fails_at_open_naming_the_file(corpus: Path, damage) -> None:
    shard = _first_train_shard(corpus)
    damage(shard)
    with pytest.raises(CorpusError, match=shard.name):
        _iterate(corpus)


def test_bit_flip_fails_naming_the_file(corpus: Path) -> None:
    shard = _first_train_shard(corpus)
    _flip_byte(shard)
    meta = CorpusMetadata.load(corpus)
    info = next(s for s in meta.shards if s.file.endswith(shard.name))
    validate_shard_file(corpus, info, meta, check_sha256=False)  # the footer is still fine ...
    with pytest.raises(CorpusError, match=f"{shard.name}.*sha256"):
        _iterate(corpus)  # ... so the sha256 check while streaming must catch it


def test_bit_flip_caught_by_page_checksums_without_sha256(corpus: Path) -> None:
    shard = _first_train_shard(corpus)
    _flip_byte(shard)
    meta = CorpusMetadata.load(corpus)
    info = next(s for s in meta.shards if s.file.endswith(shard.name))
    with pytest.raises(CorpusError, match=shard.name):
        read_shard(corpus, info, meta, check_sha256=False)
    # A corpus whose metadata was "fixed" to the damaged file's hash (as a Hub corpus, where the
    # loader cannot hash whole files, effectively is): the datasets read path must still fail.
    raw = json.loads((corpus / METADATA_FILE).read_text())
    for entry in raw["shards"]:
        if entry["file"] == info.file:
            entry["sha256"] = file_sha256(shard)
    (corpus / METADATA_FILE).write_text(json.dumps(raw))
    with pytest.raises(CorpusError, match=shard.name):
        _iterate(corpus)


def _rewrite(path: Path, transform) -> None:
    table = pq.read_table(path)
    pq.write_table(transform(table), path, write_page_checksum=True)


@pytest.mark.parametrize(
    ("transform", "column"),
    [
        (lambda t: t.rename_columns(["ozone" if n == "o3" else n for n in t.column_names]), "o3"),
        (lambda t: t.set_column(t.schema.get_field_index("pm25"), "pm25",
                                t.column("pm25").cast(pa.list_(pa.float64(), 24))), "pm25"),
        (lambda t: t.append_column("extra", pa.array(np.zeros(t.num_rows))), "extra"),
    ],
    ids=["renamed", "retyped", "added"],
)
def test_schema_drift_names_file_and_column(corpus: Path, transform, column: str) -> None:
    shard = _first_train_shard(corpus)
    _rewrite(shard, transform)
    with pytest.raises(CorpusError, match=f"{shard.name}.*column '{column}'"):
        _iterate(corpus)


def test_rows_that_disagree_with_metadata_fail(corpus: Path) -> None:
    raw = json.loads((corpus / METADATA_FILE).read_text())
    train = sorted((s for s in raw["shards"] if s["split"] == "train"), key=lambda s: s["file"])
    train[1]["first_hour"] += 6
    train[1]["last_hour"] += 6
    (corpus / METADATA_FILE).write_text(json.dumps(raw))
    with pytest.raises(CorpusError, match=f"{Path(train[1]['file']).name}.*time_hour"):
        _iterate(corpus)


@pytest.mark.parametrize(
    ("edit", "key"),
    [
        (lambda m: m["normalization"]["pm25"].update(std=0.0), "normalization.pm25.std"),
        (lambda m: m.pop("grid"), "grid"),
        (lambda m: m["units"].pop("o3"), "units"),
        (lambda m: m.update(schema_version=99), "schema_version"),
        (lambda m: m.update(surprise=1), "surprise"),
    ],
    ids=["zero-std", "missing-grid", "missing-unit", "version", "unknown-key"],
)
def test_bad_metadata_names_file_and_key(corpus: Path, edit, key: str) -> None:
    raw = json.loads((corpus / METADATA_FILE).read_text())
    edit(raw)
    (corpus / METADATA_FILE).write_text(json.dumps(raw))
    with pytest.raises(CorpusError, match=f"{METADATA_FILE}.*{key}"):
        CorpusMetadata.load(corpus)
