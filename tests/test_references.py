"""Reference forecasts against hand-computed answers: persistence, climatology with NaN holes,
damped anomaly persistence, skill on the same cells, and the references scored like a model."""

import json
from datetime import datetime, timezone

import numpy as np
import pytest
import torch

from topoflow.metrics import Climatology, ForecastMetrics, PerSampleErrors
from topoflow.references import (
    DampedPersistence,
    References,
    build_climatology,
    fit_damped_persistence,
)

TARGETS = ["pm25", "o3"]
INPUTS = ["u", "o3", "pm25"]
NORM = {"mean": {"pm25": 50.0, "o3": 80.0, "u": 0.0}, "std": {"pm25": 20.0, "o3": 10.0, "u": 3.0}}


def _hour(year: int, month: int, day: int, hour: int) -> int:
    return int(datetime(year, month, day, hour, tzinfo=timezone.utc).timestamp()) // 3600


def _hand_climatology() -> Climatology:
    """On a 1 x 3 grid: January 00 UTC and 12 UTC means; cell 2 never had data (NaN hole)."""
    clim = Climatology(TARGETS, (1, 3))
    nan = np.nan
    jan_00 = torch.tensor([[[[40.0, 50.0, nan]], [[70.0, 90.0, nan]]]])
    jan_12 = torch.tensor([[[[60.0, 50.0, nan]], [[100.0, 80.0, nan]]]])
    # Two training years at half and one and a half times these values: their means are these.
    clim.add_physical(torch.cat([jan_00 * 0.5, jan_00 * 1.5]), [_hour(2015, 1, 3, 0)] * 2)
    clim.add_physical(torch.cat([jan_12 * 0.5, jan_12 * 1.5]), [_hour(2015, 1, 3, 12)] * 2)
    return clim


def _hand_damped(clim: Climatology) -> DampedPersistence:
    """Lead 12 h factors 0.6 (pm25) and 0.5 (o3) from hand-picked anomaly pairs."""
    damped = DampedPersistence(clim, [12, 24])
    nan = np.nan
    # pm25: pairs (2, 1) and (-1, -1) -> 3 / 5; o3: pair (1, 0.5); a NaN pair and a cell outside
    # the region (huge values) must not count.
    a0 = torch.tensor([[[[2.0, 1e6, nan]], [[1.0, 1e6, 3.0]]], [[[-1.0, 1e6, 0.0]], [[nan] * 3]]])
    a1 = torch.tensor([[[[1.0, 1e6, 5.0]], [[0.5, 1e6, nan]]], [[[-1.0, 1e6, nan]], [[2.0] * 3]]])
    region = torch.tensor([[True, False, True]])
    damped.add_pairs(a0, a1, 12, region)
    damped.add_pairs(a0, 0.25 * a0, 24, region)  # valid anomaly = a quarter of the init one
    return damped


def _metrics(**kwargs) -> ForecastMetrics:
    return ForecastMetrics(target_variables=TARGETS, lead_times_hours=[12, 24], normalization=NORM,
                           grid_shape=(1, 3), input_variables=INPUTS, **kwargs)  # fmt: skip


def test_damped_factors_are_the_least_squares_fit_on_valid_region_cells():
    damped = _hand_damped(_hand_climatology())
    np.testing.assert_allclose(damped.factors.numpy(), [[0.6, 0.5], [0.25, 0.25]], rtol=1e-12)
    np.testing.assert_array_equal(damped.count.numpy(), [[2, 1], [3, 2]])


def test_reference_forecasts_and_skill_by_hand_on_the_cells_each_reference_defines():
    clim = _hand_climatology()
    metrics = _metrics(damped_persistence=_hand_damped(clim))
    assert metrics.climatology is clim
    init = _hour(2017, 1, 5, 0)
    ids = torch.tensor([init * 1000 + 12])
    state = torch.tensor([[[50.0, 30.0, 45.0]], [[80.0, 100.0, 60.0]]])  # pm25, o3 at init
    truth = torch.tensor([[[70.0, 40.0, 55.0]], [[95.0, 85.0, 70.0]]])
    model = torch.tensor([[[68.0, 43.0, 50.0]], [[95.0, 85.0, 66.0]]])
    mean = torch.tensor([50.0, 80.0])[:, None, None]
    std = torch.tensor([20.0, 10.0])[:, None, None]
    fields = torch.zeros((1, 3, 1, 3))
    fields[0, 1], fields[0, 2] = (state[1] - 80.0) / 10.0, (state[0] - 50.0) / 20.0
    refs = metrics.reference_forecasts(ids, fields)
    # damped = clim(Jan 12 UTC) + factor * (state - clim(Jan 00 UTC)); NaN in the climatology hole
    expected_damped = [[[60 + 0.6 * 10, 50 + 0.6 * -20, np.nan]], [[100 + 0.5 * 10, 80 + 0.5 * 10,
                                                                    np.nan]]]  # fmt: skip
    np.testing.assert_allclose(refs["damped_persistence"][0].numpy(), expected_damped, rtol=1e-12)
    np.testing.assert_allclose(refs["persistence"][0].numpy(), state.numpy(), rtol=1e-6)
    metrics.add(((model - mean) / std)[None], ((truth - mean) / std)[None],
                torch.ones((1, 1, 3), dtype=torch.bool), ids, fields=fields)  # fmt: skip
    pm25 = metrics.compute()["variables"]["pm25"]["12"]
    # Model errors -2, 3, -5. Persistence -20, -10, -10 on all 3 cells; climatology -10, 10 and
    # damped -4, -2 on cells 0 and 1 only, and the model is compared on those two cells.
    assert pm25["rmse"] == pytest.approx(np.sqrt(38 / 3))
    assert pm25["rmse_persistence"] == pytest.approx(np.sqrt(200.0))
    assert pm25["skill_persistence"] == pytest.approx(1 - (38 / 3) / 200)
    assert pm25["rmse_climatology"] == pytest.approx(10.0)
    assert pm25["skill_climatology"] == pytest.approx(1 - 6.5 / 100)
    assert pm25["rmse_damped_persistence"] == pytest.approx(np.sqrt(10.0))
    assert pm25["skill_damped_persistence"] == pytest.approx(1 - 6.5 / 10)
    o3 = metrics.compute()["variables"]["o3"]["12"]
    # o3: model errors 0, 0, -4; damped 10, 0 on cells 0, 1 -> model perfect there: skill 1.
    assert o3["skill_damped_persistence"] == pytest.approx(1.0)
    assert o3["rmse_damped_persistence"] == pytest.approx(np.sqrt(50.0))
    assert metrics.compute()["variables"]["o3"]["24"]["skill_damped_persistence"] is None


def test_test_loss_is_the_mean_of_per_sample_losses_with_unequal_valid_counts():
    ids = torch.tensor([1000 * 10 + 12, 1000 * 11 + 12, 1000 * 10 + 24, 1000 * 12 + 24])
    # Sample 0: 4 valid cells, squared errors 8 -> 2; sample 1: 1 cell, 5 -> 5 (it weighs as much
    # as sample 0: the loss averages samples, not cells); sample 2: 2 cells over two variables,
    # 1 + 3 -> 2; sample 3: no valid cell, left out.
    sq = torch.tensor([[6.0, 2.0], [5.0, 0.0], [1.0, 3.0], [0.0, 0.0]], dtype=torch.float64)
    count = torch.tensor([[3.0, 1.0], [1.0, 0.0], [1.0, 1.0], [0.0, 0.0]], dtype=torch.float64)
    rows = PerSampleErrors(ids, sq, count)
    assert rows.test_loss() == pytest.approx((2 + 5 + 2) / 3)
    assert rows.test_loss(12) == pytest.approx(3.5)
    assert rows.test_loss(24) == pytest.approx(2.0)
    assert np.isnan(rows.test_loss(48))


def test_damped_persistence_save_load_round_trip_and_errors(tmp_path):
    clim = _hand_climatology()
    refs = References(clim, _hand_damped(clim))
    loaded = References.load(refs.save(tmp_path / "refs"))
    assert torch.equal(loaded.damped_persistence.factors, refs.damped_persistence.factors)
    ids = torch.tensor([_hour(2018, 1, 2, 0) * 1000 + 12, _hour(2018, 1, 2, 12) * 1000 + 24])
    state = torch.arange(12, dtype=torch.float64).reshape(2, 2, 1, 3)
    torch.testing.assert_close(
        loaded.damped_persistence.forecast(state, ids),
        refs.damped_persistence.forecast(state, ids),
        rtol=0,
        atol=0,
        equal_nan=True,
    )
    other = Climatology(["o3", "pm25"], (1, 3))
    with pytest.raises(ValueError, match="fitted for"):
        DampedPersistence.load(tmp_path / "refs" / "damped_persistence.safetensors", other)
    with pytest.raises(ValueError, match="not a TopoFlow damped persistence"):
        DampedPersistence.load(tmp_path / "refs" / "climatology.safetensors", clim)
    with pytest.raises(ValueError, match="pm25 at 96 h, o3 at 96 h"):
        _ = DampedPersistence(clim, [12, 96]).factors
    with pytest.raises(ValueError, match=r"lead times \[24\]"):
        _metrics(damped_persistence=DampedPersistence(clim, [12]))


def test_fit_on_a_corpus_matches_the_loaders_sample_pairs(tmp_path):
    """Factors fitted from the shards equal a least-squares fit over the loader's own training
    samples (init state from `fields`, truth from `labels`), halo targets included."""
    from tests.fixtures_corpus import write_synthetic_corpus
    from topoflow.corpus import CorpusMetadata
    from topoflow.data import make_forecast_dataset

    corpus = tmp_path / "corpus"
    write_synthetic_corpus(corpus, nan_fraction=0.0)
    leads = [6, 24]
    refs = References.fit(corpus, TARGETS, leads)
    dataset = make_forecast_dataset(corpus, "train", variables=TARGETS, target_variables=TARGETS,
                                    lead_times_hours=leads, shuffle=False)  # fmt: skip
    meta = CorpusMetadata.load(corpus)
    mean = np.array([meta.normalization[v]["mean"] for v in TARGETS])[:, None, None]
    std = np.array([meta.normalization[v]["std"] for v in TARGETS])[:, None, None]

    def anomaly(normalized: np.ndarray, sample_id: int) -> np.ndarray:
        return normalized * std + mean - refs.climatology.forecast(np.array([sample_id]))[0].numpy()

    cross, energy = np.zeros((2, 2)), np.zeros((2, 2))
    for sample in dataset:
        init_hour, lead = divmod(int(sample["sample_ids"]), 1000)
        region = np.asarray(sample["region_mask"])
        a0 = anomaly(np.asarray(sample["fields"]), init_hour * 1000)[:, region]
        a1 = anomaly(np.asarray(sample["labels"]), int(sample["sample_ids"]))[:, region]
        cross[leads.index(lead)] += (a0 * a1).sum(1)
        energy[leads.index(lead)] += (a0 * a0).sum(1)
    factors = refs.damped_persistence.factors.numpy()
    np.testing.assert_allclose(factors, cross / energy, rtol=1e-4)
    assert factors.min() > -1 and factors.max() < 1 and not np.allclose(factors, 0)


def test_fit_errors_name_the_variable_and_lead(tmp_path):
    from tests.fixtures_corpus import write_synthetic_corpus

    corpus = tmp_path / "corpus"
    write_synthetic_corpus(corpus)
    with pytest.raises(ValueError, match=r"no dynamic variables \['dust'\]"):
        build_climatology(corpus, ["pm25", "dust"])
    clim = build_climatology(corpus, TARGETS)
    with pytest.raises(ValueError, match=r"lead times \[9, 48\] h"):
        fit_damped_persistence(corpus, clim, [6, 9, 48])


def test_references_are_scored_like_a_model_on_the_same_samples(synthetic_corpus):
    from modeling_topoflow import TopoFlowForForecasting
    from tests.fixtures_model import make_tiny_config
    from topoflow.corpus import CorpusMetadata
    from topoflow.data import make_forecast_dataset
    from topoflow.experiment.evaluate import evaluate_forecasters

    meta = CorpusMetadata.load(synthetic_corpus)
    stats = meta.normalization
    config = make_tiny_config(
        img_size=(4, 6), depth=1, lead_times_hours=[6, 24],
        variable_mean={v: stats[v]["mean"] for v in stats},
        variable_std={v: stats[v]["std"] for v in stats},
    )  # fmt: skip
    refs = References.fit(synthetic_corpus, config.target_variables, config.lead_times_hours)
    torch.manual_seed(0)
    results = evaluate_forecasters(
        {"model": TopoFlowForForecasting(config).eval()}, synthetic_corpus, config=config,
        split="test", batch_size=7, climatology=refs.climatology,
        damped_persistence=refs.damped_persistence, score_references=True,
    )  # fmt: skip
    assert list(results) == ["model", "persistence", "climatology", "damped_persistence"]
    ids = results["model"].per_sample.sample_ids
    for result in results.values():
        assert torch.equal(result.per_sample.sample_ids, ids)
    # Persistence's test loss, straight from the loader's samples.
    dataset = make_forecast_dataset(
        synthetic_corpus,
        "test",
        variables=config.variables,
        target_variables=config.target_variables,
        lead_times_hours=config.lead_times_hours,
        normalization={"mean": config.variable_mean, "std": config.variable_std},
        shuffle=False,
    )
    channels = [config.variables.index(v) for v in config.target_variables]
    losses = []
    for sample in dataset:
        labels = np.asarray(sample["labels"], dtype=np.float64)
        valid = np.isfinite(labels) & np.asarray(sample["region_mask"])[None]
        err = np.asarray(sample["fields"], dtype=np.float64)[channels] - labels
        losses.append(np.mean(err[valid] ** 2))
    assert results["persistence"].per_sample.test_loss() == pytest.approx(np.mean(losses))
    # A reference's own RMSE is the one the model's skill was computed against, cell for cell.
    model_scores = results["model"].metrics["variables"]
    for name in ("persistence", "climatology", "damped_persistence"):
        for var in config.target_variables:
            for lead in ("6", "24", "all"):
                own = results[name].metrics["variables"][var][lead]
                assert own["rmse"] == pytest.approx(model_scores[var][lead][f"rmse_{name}"])
                assert own[f"skill_{name}"] == pytest.approx(0.0, abs=1e-12)
    assert results["climatology"].metrics["evaluated"]["model"] == "reference: climatology"


def test_references_command_prints_and_saves_the_scores(synthetic_corpus, tmp_path, capsys):
    from topoflow.cli import main

    argv = ["references", "--corpus", str(synthetic_corpus), "--split", "test", "--leads", "6",
            "24", "--references-dir", str(tmp_path / "refs")]  # fmt: skip
    assert main([*argv, "--json", str(tmp_path / "a.json")]) == 0
    printed = capsys.readouterr().out
    first = json.loads((tmp_path / "a.json").read_text())
    assert list(first["test_loss"]) == ["persistence", "climatology", "damped_persistence"]
    for name, row in first["test_loss"].items():
        assert (
            f"{name}" in printed and f"{row['all']:.4f}" in printed and f"{row['6']:.4f}" in printed
        )
    assert (tmp_path / "refs" / "damped_persistence.safetensors").is_file()
    fitted = DampedPersistence.load(
        tmp_path / "refs" / "damped_persistence.safetensors",
        Climatology.load(tmp_path / "refs" / "climatology.safetensors"),
    )
    assert first["damping_factors"]["o3"]["24"] == pytest.approx(float(fitted.factors[1, 5]))
    # A second run loads the saved references and scores the same.
    assert main([*argv, "--json", str(tmp_path / "b.json")]) == 0
    assert json.loads((tmp_path / "b.json").read_text())["test_loss"] == first["test_loss"]
    assert main(["references", "--corpus", str(tmp_path / "nowhere")]) == 2
    assert f"--corpus {tmp_path / 'nowhere'}" in capsys.readouterr().err
