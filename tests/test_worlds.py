"""Terrain worlds (topoflow/corpus/worlds.py): determinism, paired controls, disjoint splits, and
per-sample elevation through the loader and the model."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from topoflow.corpus.atmosphere import simulate
from topoflow.corpus.build import main as build_main
from topoflow.corpus.schema import CorpusMetadata
from topoflow.corpus.shards import read_shard
from topoflow.corpus.worlds import (
    WORLD_SIZES,
    WorldWeather,
    simulate_world,
    split_of_worlds,
    world_params,
    world_terrain,
    write_worlds_corpus,
)
from topoflow.data import make_forecast_dataset

TINY = WORLD_SIZES["worlds-tiny"]
START = int(np.datetime64("2015-03-01", "h").astype(np.int64))
POLLUTANTS = ("pm25", "pm10", "so2", "no2", "co", "o3")
SHARED = ("u", "v", "temp", "rh", "psfc", "elevation", "population")


@pytest.fixture(scope="module")
def worlds_on(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("worlds") / "on"
    build_main(["--size", "worlds-tiny", "--out", str(folder)])  # the build command's path
    return folder


@pytest.fixture(scope="module")
def worlds_off(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("worlds") / "off"
    write_worlds_corpus(folder, size="worlds-tiny", terrain_blocking=0.0)
    return folder


def _worlds(folder: Path) -> dict[str, dict[str, np.ndarray]]:
    """Every shard's fields by file name."""
    meta = CorpusMetadata.load(folder)
    return {s.file: read_shard(folder, s, meta)[2] for s in meta.shards}


def test_same_seed_same_bytes_other_seed_other_worlds(worlds_on: Path, tmp_path: Path) -> None:
    again = write_worlds_corpus(tmp_path / "again", size="worlds-tiny", seed=0)
    first = CorpusMetadata.load(worlds_on)
    assert [s.sha256 for s in again.shards] == [s.sha256 for s in first.shards]
    assert again.normalization == first.normalization
    other = world_terrain(1, 0, TINY.height, TINY.width).elevation
    assert not np.allclose(other, world_terrain(0, 0, TINY.height, TINY.width).elevation)


def test_blocking_on_and_off_share_every_draw(worlds_on: Path, worlds_off: Path) -> None:
    on, off = _worlds(worlds_on), _worlds(worlds_off)
    assert on.keys() == off.keys()
    for file in on:
        for name in SHARED:  # terrain, sources and the winds they are carried by
            np.testing.assert_array_equal(on[file][name], off[file][name], err_msg=f"{file} {name}")
    # ... and blocking changes the pollution in every world, well beyond rounding.
    for file in on:
        own = slice(0, TINY.own_rows)
        assert np.abs(on[file]["pm25"][own] - off[file]["pm25"][own]).max() > 1.0, file


def test_blocking_off_means_elevation_moves_no_tracer() -> None:
    terrain = world_terrain(0, 3, TINY.height, TINY.width)
    flat = dataclasses.replace(terrain, elevation=np.full_like(terrain.elevation, 100.0))

    def tracers(blocking: float, ground: object) -> np.ndarray:
        params = world_params(TINY, 0, 3, START, blocking)
        chunks = list(simulate(params, terrain=ground, weather_type=WorldWeather))
        return np.stack([np.concatenate([c[v] for _, c in chunks]) for v in POLLUTANTS])

    np.testing.assert_allclose(tracers(0.0, terrain), tracers(0.0, flat), rtol=1e-5, atol=1e-5)
    assert np.abs(tracers(1.0, terrain) - tracers(1.0, flat)).max() > 1.0


def test_splits_share_no_terrain(worlds_on: Path) -> None:
    meta = CorpusMetadata.load(worlds_on)
    terrains = {split: [] for split in meta.splits}
    for shard in meta.shards:
        elevation = read_shard(worlds_on, shard, meta)[2]["elevation"]
        assert (elevation == elevation[0]).all(), f"{shard.file}: terrain changes within a world"
        terrains[shard.split].append(elevation[0].ravel())
    assert {k: len(v) for k, v in terrains.items()} == TINY.worlds
    everything = np.stack([t for split in terrains.values() for t in split])
    correlation = np.corrcoef(everything)
    np.fill_diagonal(correlation, 0.0)
    # No two worlds (across or within splits) share a terrain, not even a scaled copy of one.
    assert correlation.max() < 0.9, correlation.max()


def test_split_interleaving_covers_the_period() -> None:
    order = split_of_worlds({"train": 6, "validation": 2, "test": 2})
    assert sorted(order) == sorted(["train"] * 6 + ["validation"] * 2 + ["test"] * 2)
    assert order[:5].count("train") == 3 and order[5:].count("train") == 3


def test_world_terrain_has_mountains_and_lowland_sources() -> None:
    for index in range(6):
        terrain = world_terrain(0, index, 16, 32)
        z, people = terrain.elevation, terrain.population
        assert 1000.0 < z.max() < 3800.0, (index, z.max())  # 1-3 km above 50-300 m plains
        assert (z < 500.0).mean() > 0.3, index  # plains to put the sources in
        assert people[z < 500.0].sum() > 5 * people[z >= 1000.0].sum(), index


def test_loader_hands_every_sample_its_own_terrain(worlds_on: Path) -> None:
    meta = CorpusMetadata.load(worlds_on)
    stats = meta.normalization["elevation"]
    variables = ["u", "v", "pm25", "elevation"]
    dataset = make_forecast_dataset(worlds_on, "train", variables=variables,
                                    target_variables=["pm25"], lead_times_hours=[12, 24],
                                    shuffle=False)  # fmt: skip
    by_world = {}
    for sample in dataset:
        metres = sample["fields"][3] * stats["std"] + stats["mean"]
        hour = int(sample["sample_ids"]) // 1000
        by_world.setdefault(hour // (TINY.rows * TINY.time_step_hours), []).append(metres)
    assert len(by_world) == TINY.worlds["train"]
    fields = {s.first_hour // (TINY.rows * TINY.time_step_hours): read_shard(worlds_on, s, meta)
              for s in meta.split_shards("train")}  # fmt: skip
    for world, samples in by_world.items():
        assert len(samples) == TINY.own_rows * 2
        for metres in samples:
            np.testing.assert_allclose(metres, fields[world][2]["elevation"][0], atol=0.05)


def test_model_reads_per_sample_elevation_from_its_input_channel() -> None:
    from configuration_topoflow import TopoFlowConfig
    from modeling_topoflow import TopoFlowModel

    terrains = [world_terrain(0, i, 16, 32).elevation for i in (0, 1)]
    mean, std = 400.0, 550.0
    config = TopoFlowConfig(
        variables=["u", "elevation"], target_variables=["u"], img_size=(16, 32), patch_size=2,
        embed_dim=16, depth=1, num_heads=2, elevation_bias_blocks=[0],
        variable_mean={"u": 0.0, "elevation": mean}, variable_std={"u": 1.0, "elevation": std},
    )  # fmt: skip
    model = TopoFlowModel(config)
    fields = torch.zeros(2, 2, 16, 32)
    fields[:, 1] = (torch.from_numpy(np.stack(terrains)) - mean) / std
    heights = model._patch_elevation(fields, None)  # (B, N) metres
    for b, terrain in enumerate(terrains):
        expected = terrain.reshape(8, 2, 16, 2).mean(axis=(1, 3)).ravel()
        np.testing.assert_allclose(heights[b].numpy(), expected, rtol=1e-4, atol=0.05)
    assert not torch.allclose(heights[0], heights[1])


def test_simulate_world_rows_and_time(worlds_on: Path) -> None:
    time_hour, fields, terrain = simulate_world(TINY, 0, 0, START, 1.0)
    assert len(time_hour) == TINY.rows and np.all(np.diff(time_hour) == TINY.time_step_hours)
    assert fields["elevation"].shape == (TINY.rows, TINY.height, TINY.width)
    np.testing.assert_array_equal(fields["elevation"][-1], terrain.elevation)
    assert all(np.isfinite(f).all() for f in fields.values())


def test_dataset_card_describes_the_worlds(worlds_on: Path) -> None:
    card = (worlds_on / "README.md").read_text()
    assert "| `elevation` | dynamic | m |" in card and "| `lat2d` | static |" in card
    assert "Split by world" in card and "Split by time" not in card
    assert "license: apache-2.0" in card


def test_worlds_sizes_have_their_own_cache_names() -> None:
    from topoflow.corpus.build import corpus_cache_name

    names = {size: corpus_cache_name(size) for size in ("default", "worlds", "worlds-tiny")}
    assert len(set(names.values())) == 3 and names["worlds"].startswith("topoflow-worlds-")
    assert corpus_cache_name("worlds", terrain_blocking=0.0) != names["worlds"]
    with pytest.raises(ValueError, match="worlds-tiny"):
        corpus_cache_name("world")
