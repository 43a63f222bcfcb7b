"""`python -m topoflow.experiment` on the terrain worlds, where elevation is a per-sample column:
elevation bands from each sample's own terrain, gain maps and bias panels on held-out worlds."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from topoflow.corpus.build import main as build_main
from topoflow.corpus.schema import CorpusMetadata
from topoflow.corpus.shards import read_shard
from topoflow.experiment import load_evaluation, main
from topoflow.experiment.terrain import TerrainMetrics, map_worlds

STEPS = ["--max-steps", "2", "--batch-size", "4", "--eval-every", "2", "--eval-batches", "1",
         "--launcher", "inprocess", "--n-boot", "50", "--eval-batch-size", "16",
         "--train-arg=--from-scratch", "--train-arg=--config=tiny"]


@pytest.fixture(scope="module")
def worlds(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("worlds") / "on"
    build_main(["--size", "worlds-tiny", "--out", str(folder)])
    return folder


@pytest.fixture(scope="module")
def experiment(worlds: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("experiment") / "exp"
    code = main(["--output-dir", str(out), "--corpus", str(worlds), "--arms", "control",
                 "upslope", "placebo", "--seeds", "0", "--no-climatology", "--versus",
                 "upslope:placebo", *STEPS])
    assert code == 0
    return out


def _metrics(worlds: list, edges: tuple[float, ...] = (200.0, 1000.0)) -> TerrainMetrics:
    return TerrainMetrics(
        target_variables=["pm25"], lead_times_hours=[12], grid_shape=(2, 2),
        normalization={"mean": {"pm25": 0.0}, "std": {"pm25": 2.0}},
        input_variables=["elevation", "pm25"], worlds=worlds, elevation_mean=500.0,
        elevation_std=100.0, edges_m=edges)


def test_bands_follow_each_samples_own_elevation() -> None:
    from topoflow.experiment.terrain import MapWorld

    world = MapWorld("w0", 10, 20, np.zeros((2, 2)))
    metrics = _metrics([world])
    # Sample A (init hour 10, in the map world) is low everywhere; sample B (hour 30) has one
    # cell of each band. Elevation enters normalized: (z - 500) / 100.
    z = torch.tensor([[[0.0, 100.0], [150.0, 199.0]], [[0.0, 500.0], [1000.0, 2500.0]]])
    fields = torch.stack([(z - 500.0) / 100.0, torch.zeros_like(z)], dim=1)  # (B, 2, H, W)
    forecast = torch.tensor([1.0, 2.0, 3.0, 4.0, 1.0, 1.0, 2.0, 3.0]).reshape(2, 1, 2, 2)
    labels = torch.zeros_like(forecast)
    ids = torch.tensor([10 * 1000 + 12, 30 * 1000 + 12])
    metrics.add(forecast, labels, torch.ones(2, 2, 2, dtype=torch.bool), ids, fields=fields)
    state = metrics.state()
    # Physical error = 2 x normalized. Band < 200 m: all of A (1+4+9+16) and B's first cell (1).
    sq = state["band_sq_err"][:, 0] / 4.0
    assert sq.tolist() == [31.0, 1.0, 4.0 + 9.0]
    assert state["band_count"][:, 0].tolist() == [5.0, 1.0, 2.0]
    # Only sample A lies in the map world's hours: its normalized squared errors, per cell.
    assert state["map_sq_err"][0].tolist() == [[1.0, 4.0], [9.0, 16.0]]
    assert state["map_count"][0].sum() == 4


def test_bands_refuse_a_model_without_elevation_input() -> None:
    with pytest.raises(ValueError, match="'elevation' among the model's input"):
        TerrainMetrics(target_variables=["pm25"], lead_times_hours=[12], grid_shape=(2, 2),
                       normalization={"mean": {"pm25": 0.0}, "std": {"pm25": 1.0}},
                       input_variables=["pm25"], worlds=[], elevation_mean=0.0,
                       elevation_std=1.0)


def test_map_worlds_are_the_held_out_worlds_with_their_own_terrain(worlds: Path) -> None:
    meta = CorpusMetadata.load(worlds)
    chosen = map_worlds(worlds, "test", count=2)
    test_shards = [s for s in meta.shards if s.split == "test"][:2]
    for world, shard in zip(chosen, test_shards, strict=True):
        assert (world.first_hour, world.last_hour) == (shard.first_hour, shard.last_hour)
        elevation = read_shard(worlds, shard, meta)[2]["elevation"]
        np.testing.assert_array_equal(world.elevation_m, elevation[-1])  # static within a world
    assert not np.allclose(chosen[0].elevation_m, chosen[1].elevation_m)


def test_worlds_experiment_reports_bands_maps_and_panels(experiment: Path) -> None:
    report = json.loads((experiment / "report" / "report.json").read_text())
    assert set(report["comparisons"]) == {"upslope", "placebo"}
    regions = report["comparisons"]["upslope"]["regions"]
    assert regions["region"] == []  # named regions of one static map mean nothing here
    bands = regions["elevation_band"]
    control = load_evaluation(experiment / "eval" / "control" / "seed0")
    # Every valid value of the split falls in exactly one band of its own sample's terrain.
    per_variable = {}
    for row in bands:
        per_variable[row["variable"]] = per_variable.get(row["variable"], 0) + row["n_values"]
    assert per_variable["pm25"] == int(control.state["cell_count"][0].sum())
    assert {row["region"] for row in bands if row["n_values"] > 0} >= {"< 200 m", "1000-3000 m"}
    n_worlds = len(regions["map_worlds"])
    assert n_worlds == 3
    assert control.state["map_sq_err"].shape[0] == n_worlds
    assert (control.state["map_count"].flatten(1).sum(1) > 0).all()
    files = {f["file"] for f in report["figures"]}
    assert {"gain_map_upslope.png", "gain_map_placebo.png", "attention_bias_upslope.png",
            "attention_bias_placebo.png"} <= files
    captions = {f["file"]: f["caption"] for f in report["figures"]}
    assert "held-out world" in captions["attention_bias_upslope.png"]
    assert "placebo arm" in captions["attention_bias_placebo.png"]
    assert "placebo arm" not in captions["attention_bias_upslope.png"]
    assert (experiment / "report" / "report.md").read_text().count("each sample's own terrain")


def test_versus_judges_the_arm_against_the_placebo_not_the_control(experiment: Path) -> None:
    report = json.loads((experiment / "report" / "report.json").read_text())
    verdict = report["versus"]["upslope vs placebo"]["verdict"]
    placebo = load_evaluation(experiment / "eval" / "placebo" / "seed0").per_sample.loss.mean()
    upslope = load_evaluation(experiment / "eval" / "upslope" / "seed0").per_sample.loss.mean()
    assert (verdict["control"], verdict["arm"]) == ("placebo", "upslope")
    assert verdict["gain_per_seed"][0] == pytest.approx(1 - float(upslope / placebo), rel=1e-9)
    assert "## Verdict: upslope vs placebo" in (experiment / "report" / "report.md").read_text()


def test_versus_naming_an_arm_not_run_is_refused(experiment: Path, worlds: Path,
                                                 capsys: pytest.CaptureFixture) -> None:
    code = main(["--output-dir", str(experiment), "--corpus", str(worlds), "--arms", "control",
                 "upslope", "placebo", "--seeds", "0", "--no-climatology", "--versus",
                 "upslope:topoflow", *STEPS])
    assert code == 2
    assert "arms ['topoflow'] were not run" in capsys.readouterr().err
