"""Pytest fixtures for the corpus (see tests/conftest.py).

`synthetic_corpus`: a 4 x 6 corpus written from seeded random arrays in well under a second (the
shard writer, card and loader without the physics generator). `tiny_corpus` and
`tiny_corpus_no_blocking`: the embedded generator's tiny size, built once per test session in a
temporary folder (never the user's cache).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest

from topoflow.corpus.build import CorpusWriter, build_default_corpus, even_edges, finalize_corpus
from topoflow.corpus.schema import DYNAMIC_VARIABLES, CorpusMetadata

__all__ = [
    "write_synthetic_corpus",
    "synthetic_corpus",
    "tiny_corpus",
    "tiny_corpus_no_blocking",
]

SYNTHETIC_SPLITS = {
    "train": ("2015-01-01", "2015-01-07"),
    "validation": ("2015-01-07", "2015-01-13"),
    "test": ("2015-01-13", "2015-01-19"),
}


def _synthetic_static(height: int, width: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    lat = 30.0 + np.arange(height, dtype=np.float32)
    lon = 100.0 + np.arange(width, dtype=np.float32)
    lon2d, lat2d = np.meshgrid(lon, lat)
    region_id = np.ones((height, width), np.int32)
    region_id[:, -1] = 0  # an eastern "sea" column that must not count in the loss
    return {
        "elevation": rng.uniform(0, 4000, (height, width)).astype(np.float32),
        "population": rng.uniform(0, 1000, (height, width)).astype(np.float32),
        "lat2d": lat2d, "lon2d": lon2d,
        "land_fraction": (region_id > 0).astype(np.float32),
        "region_id": region_id,
    }  # fmt: skip


def write_synthetic_corpus(
    folder: str | os.PathLike,
    *,
    seed: int = 0,
    height: int = 4,
    width: int = 6,
    shards_per_split: int = 4,
    halo_hours: int = 24,
    variables: Sequence[str] = DYNAMIC_VARIABLES,
    nan_fraction: float = 0.05,
) -> CorpusMetadata:
    """Write a corpus of seeded random fields (a few NaNs) through the real writer."""
    rng = np.random.default_rng(seed)
    edges = {s: even_edges(a, b, shards_per_split, 6) for s, (a, b) in SYNTHETIC_SPLITS.items()}
    writer = CorpusWriter(folder, variables=variables, time_step_hours=6, split_edges=edges,
                          halo_hours=halo_hours)  # fmt: skip
    first, last = edges["train"][0], edges["test"][-1]
    hours = np.arange(first, last, 6, dtype=np.int64)
    for chunk in np.array_split(hours, 7):  # chunks that straddle shard edges on purpose
        fields = {}
        # A trend in time makes the training split's statistics differ from the whole corpus's.
        trend = 0.05 * (chunk - first)[:, None, None] / 6
        for k, v in enumerate(variables):
            field = (k + 1) * 10 + trend + rng.standard_normal((len(chunk), height, width))
            field[rng.random(field.shape) < nan_fraction] = np.nan
            fields[v] = field.astype(np.float32)
        writer.add(chunk, fields)
    return finalize_corpus(
        folder, name="synthetic", writer=writer, static=_synthetic_static(height, width, rng),
        splits=SYNTHETIC_SPLITS, regions={0: "sea", 1: "land"},
        provenance={"source": "tests/fixtures_corpus.py synthetic", "seed": seed,
                    "terrain_blocking": None},
    )  # fmt: skip


@pytest.fixture(scope="session")
def synthetic_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("synthetic_corpus") / "corpus"
    write_synthetic_corpus(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The embedded generator's tiny corpus (terrain_blocking=1), built once per session."""
    return build_default_corpus(root=tmp_path_factory.mktemp("corpora"), size="tiny", seed=0)


@pytest.fixture(scope="session")
def tiny_corpus_no_blocking(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """As `tiny_corpus` with terrain_blocking=0 (terrain has no effect on transport)."""
    return build_default_corpus(
        root=tmp_path_factory.mktemp("corpora"), size="tiny", seed=0, terrain_blocking=0.0
    )
