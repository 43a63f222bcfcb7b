"""Forecast metrics against hand computations on tiny grids with NaN labels and masks."""

from datetime import datetime, timezone

import numpy as np
import pytest
import torch

from topoflow.metrics import Climatology, ForecastMetrics, decode_sample_ids

TARGETS = ["pm25", "o3"]
INPUTS = ["u", "o3", "pm25"]
NORM = {"mean": {"pm25": 50.0, "o3": 80.0, "u": 0.0}, "std": {"pm25": 20.0, "o3": 10.0, "u": 3.0}}
STD = np.array([20.0, 10.0])
MEAN = np.array([50.0, 80.0])


def _hour(year: int, month: int, day: int, hour: int) -> int:
    return int(datetime(year, month, day, hour, tzinfo=timezone.utc).timestamp()) // 3600


def _batch(seed: int = 0, batch: int = 4):
    rng = np.random.default_rng(seed)
    forecast = rng.normal(size=(batch, 2, 3, 4))
    labels = rng.normal(size=(batch, 2, 3, 4))
    labels[0, 0, 1, 2] = np.nan
    labels[2, 1, :, 0] = np.nan
    mask = rng.random((batch, 3, 4)) > 0.3
    mask[3] = False  # a sample with no valid cell
    init = _hour(2017, 3, 1, 0) + 6 * np.arange(batch)
    ids = init * 1000 + np.array([12, 24, 12, 24])[:batch]
    return forecast, labels, mask, ids


def _torch(*arrays):
    return [torch.as_tensor(a) for a in arrays]


def _metrics(**kwargs) -> ForecastMetrics:
    return ForecastMetrics(
        target_variables=TARGETS,
        lead_times_hours=[12, 24],
        normalization=NORM,
        grid_shape=(3, 4),
        **kwargs,
    )


def test_rmse_mae_bias_match_hand_computation_with_nan_and_mask():
    forecast, labels, mask, ids = _batch()
    metrics = _metrics(units={"pm25": "ug/m3", "o3": "ug/m3"})
    metrics.add(*_torch(forecast.astype(np.float32), labels.astype(np.float32), mask, ids))
    assert metrics.compute()["units"] == {"pm25": "ug/m3", "o3": "ug/m3"}
    scores = metrics.compute()["variables"]
    leads = ids % 1000
    for v, var in enumerate(TARGETS):
        for lead in (12, 24):
            errs = []
            for b in range(len(ids)):
                if leads[b] != lead:
                    continue
                for i in range(3):
                    for j in range(4):
                        if mask[b, i, j] and np.isfinite(labels[b, v, i, j]):
                            f32 = np.float32(forecast[b, v, i, j]) - np.float32(labels[b, v, i, j])
                            errs.append(float(f32) * STD[v])
            errs = np.array(errs)
            row = scores[var][str(lead)]
            assert row["n"] == len(errs)
            assert row["rmse"] == pytest.approx(np.sqrt(np.mean(errs**2)), rel=1e-6)
            assert row["mae"] == pytest.approx(np.mean(np.abs(errs)), rel=1e-6)
            assert row["bias"] == pytest.approx(np.mean(errs), rel=1e-6, abs=1e-9)


def test_per_sample_loss_is_normalized_mse_over_valid_cells():
    forecast, labels, mask, ids = _batch()
    metrics = _metrics()
    metrics.add(*_torch(forecast, labels, mask, ids))
    rows = metrics.per_sample()
    assert rows.sample_ids.tolist() == ids.tolist()
    for b in range(3):
        valid = mask[b][None] & np.isfinite(labels[b])
        expected = np.mean((forecast[b] - labels[b])[valid] ** 2)
        assert float(rows.loss[b]) == pytest.approx(expected, rel=1e-12)
    assert torch.isnan(rows.loss[3])


def test_summed_states_equal_single_process_result():
    forecast, labels, mask, ids = _batch(batch=4)
    whole = _metrics()
    whole.add(*_torch(forecast, labels, mask, ids))
    ranks = [_metrics(), _metrics()]
    ranks[0].add(*_torch(forecast[:2], labels[:2], mask[:2], ids[:2]))
    ranks[1].add(*_torch(forecast[2:], labels[2:], mask[2:], ids[2:]))
    reduced = {k: ranks[0].state()[k] + ranks[1].state()[k] for k in ranks[0].state()}
    merged = _metrics()
    merged.load_state(reduced)
    assert merged.compute() == whole.compute()
    assert torch.equal(merged.cell_rmse().nan_to_num(-1), whole.cell_rmse().nan_to_num(-1))


def test_cell_sums_give_per_cell_rmse_in_physical_units():
    forecast, labels, mask, ids = _batch()
    metrics = _metrics()
    metrics.add(*_torch(forecast, labels, mask, ids))
    cell = metrics.cell_rmse()
    valid = mask[:, None] & np.isfinite(labels)
    err = np.where(valid, forecast - labels, 0.0) * STD[None, :, None, None]
    count = valid.sum(0)
    expected = np.where(count > 0, np.sqrt((err**2).sum(0) / np.maximum(count, 1)), np.nan)
    np.testing.assert_allclose(cell.numpy(), expected, rtol=1e-12)


def test_persistence_reference_and_skill_on_toy_series():
    # Truth at t + lead is the value at t plus 2 normalized units everywhere; the model is off by 1.
    # Persistence error = 2 (x std), model error = 1 (x std): skill = 1 - 1/4 = 0.75.
    fields_t = np.zeros((2, 3, 3, 4))
    fields_t[:, 1] = 0.5  # o3 at init
    fields_t[:, 2] = -1.0  # pm25 at init
    labels = np.stack([fields_t[:, 2] + 2.0, fields_t[:, 1] + 2.0], axis=1)
    forecast = labels - 1.0
    mask = np.ones((2, 3, 4), dtype=bool)
    ids = np.array([_hour(2017, 1, 1, 0) * 1000 + 12, _hour(2017, 1, 1, 0) * 1000 + 24])
    metrics = _metrics(input_variables=INPUTS)
    metrics.add(*_torch(forecast, labels, mask, ids), fields=torch.as_tensor(fields_t))
    scores = metrics.compute()["variables"]
    for v, var in enumerate(TARGETS):
        row = scores[var]["12"]
        assert row["rmse_persistence"] == pytest.approx(2.0 * STD[v])
        assert row["rmse"] == pytest.approx(1.0 * STD[v])
        assert row["skill_persistence"] == pytest.approx(0.75)
        assert row["skill_climatology"] is None


def test_climatology_means_by_month_and_hour_with_fallback_and_round_trip(tmp_path):
    clim = Climatology(TARGETS, (3, 4), normalization=NORM)
    # January, valid 00 UTC: normalized values 1 and 3 -> mean 2 -> physical mean + 2 std.
    # January, valid 12 UTC: value -1.
    init = _hour(2016, 1, 10, 0)
    ids = torch.tensor([(init - 12) * 1000 + 12, (init - 24) * 1000 + 24, init * 1000 + 12])
    labels = torch.stack(
        [torch.full((2, 3, 4), 1.0), torch.full((2, 3, 4), 3.0), torch.full((2, 3, 4), -1.0)]
    )
    labels[1, 0, 0, 0] = torch.nan  # a missing value does not count
    clim.add(labels, ids)
    jan_00 = torch.tensor([_hour(2018, 1, 5, 0) * 1000])  # lead 0 here only to address a valid time
    feb_12 = torch.tensor([(_hour(2018, 2, 5, 12) - 24) * 1000 + 24])
    got_jan = clim.forecast(jan_00)[0]
    np.testing.assert_allclose(got_jan[:, 1, 1].numpy(), MEAN + 2.0 * STD)
    np.testing.assert_allclose(
        got_jan[:, 0, 0].numpy(), [MEAN[0] + 1.0 * STD[0], MEAN[1] + 2 * STD[1]]
    )
    # February never seen: falls back to the 12 UTC mean over all months.
    np.testing.assert_allclose(clim.forecast(feb_12)[0, :, 2, 3].numpy(), MEAN - STD)
    loaded = Climatology.load(clim.save(tmp_path / "clim.safetensors"))
    assert torch.equal(loaded.forecast(feb_12), clim.forecast(feb_12))
    assert torch.equal(loaded.forecast(jan_00), clim.forecast(jan_00))


def test_climatology_skill_compares_on_the_same_cells():
    clim = Climatology(TARGETS, (3, 4), normalization=NORM)
    valid_hour = _hour(2016, 3, 1, 12)
    clim.add(torch.zeros((1, 2, 3, 4)), torch.tensor([(valid_hour - 12) * 1000 + 12]))
    labels = torch.full((1, 2, 3, 4), 3.0)  # climatology (0) misses by 3, model (2.5) by 0.5
    ids = torch.tensor([(_hour(2017, 3, 1, 12) - 24) * 1000 + 24])
    metrics = _metrics(climatology=clim)
    metrics.add(labels - 0.5, labels, torch.ones((1, 3, 4), dtype=torch.bool), ids)
    row = metrics.compute()["variables"]["o3"]["24"]
    assert row["rmse_climatology"] == pytest.approx(3.0 * 10.0)
    assert row["skill_climatology"] == pytest.approx(1 - 0.25 / 9)


def test_errors_name_the_problem():
    forecast, labels, mask, ids = _batch()
    metrics = _metrics()
    with pytest.raises(ValueError, match="lead times \\[6\\]"):
        metrics.add(*_torch(forecast, labels, mask, ids - ids % 1000 + 6))
    with pytest.raises(ValueError, match="region_mask"):
        metrics.add(*_torch(forecast, labels, mask[:, :2], ids))
    by_variable = {v: {"mean": NORM["mean"][v], "std": NORM["std"][v]} for v in NORM["mean"]}
    other_layout = ForecastMetrics(
        target_variables=TARGETS,
        lead_times_hours=[12, 24],
        normalization=by_variable,
        grid_shape=(3, 4),
    )
    assert torch.equal(other_layout.std, metrics.std) and torch.equal(
        other_layout.mean, metrics.mean
    )
    with pytest.raises(KeyError, match="pm25"):
        ForecastMetrics(
            target_variables=TARGETS,
            lead_times_hours=[12],
            grid_shape=(3, 4),
            normalization={"mean": {"o3": 1.0}, "std": {"o3": 1.0}},
        )
    with pytest.raises(ValueError, match="persistence"):
        _metrics(input_variables=["u"])


def test_decode_sample_ids():
    init, lead = decode_sample_ids(np.array([_hour(2017, 1, 1, 6) * 1000 + 48]))
    assert lead.tolist() == [48] and init.tolist() == [_hour(2017, 1, 1, 6)]


def test_per_sample_loss_matches_the_real_model(tiny_config, tiny_batch):
    from modeling_topoflow import TopoFlowForForecasting

    torch.manual_seed(0)
    model = TopoFlowForForecasting(tiny_config).eval()
    with torch.no_grad():
        output = model(**tiny_batch)
    normalization = {"mean": dict(tiny_config.variable_mean), "std": dict(tiny_config.variable_std)}
    metrics = ForecastMetrics(
        target_variables=tiny_config.target_variables,
        lead_times_hours=tiny_config.lead_times_hours,
        normalization=normalization,
        grid_shape=tuple(tiny_config.img_size),
        input_variables=tiny_config.variables,
    )
    metrics.add(
        output.forecast,
        tiny_batch["labels"],
        tiny_batch["region_mask"],
        tiny_batch["sample_ids"],
        fields=tiny_batch["fields"],
    )
    rows = metrics.per_sample()
    torch.testing.assert_close(rows.loss.float(), output.per_sample_loss, rtol=1e-5, atol=1e-7)
    assert rows.count.sum(1).long().tolist() == output.num_valid.tolist()
    scores = metrics.compute()["variables"][tiny_config.target_variables[0]]
    assert scores["12"]["rmse_persistence"] is not None and scores["12"]["rmse"] > 0


def test_climatology_hour_bins_pool_hours_and_survive_round_trip(tmp_path):
    clim = Climatology(TARGETS, (3, 4), normalization=NORM, hours_per_bin=3)
    day = _hour(2016, 5, 2, 0)
    ids = torch.tensor([(day + 0 - 12) * 1000 + 12, (day + 2 - 12) * 1000 + 12])
    clim.add(torch.stack([torch.zeros(2, 3, 4), torch.full((2, 3, 4), 2.0)]), ids)
    at_01 = torch.tensor([(_hour(2017, 5, 9, 1) - 24) * 1000 + 24])
    np.testing.assert_allclose(clim.forecast(at_01)[0, :, 0, 0].numpy(), MEAN + STD)
    loaded = Climatology.load(clim.save(tmp_path / "c.safetensors"))
    assert loaded.hours_per_bin == 3 and torch.equal(loaded.forecast(at_01), clim.forecast(at_01))
    with pytest.raises(ValueError, match="divide 24"):
        Climatology(TARGETS, (3, 4), hours_per_bin=5)


def _sync_worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    """One rank of a real 2-process gloo run: half of the batch each, then `sync`."""
    import os

    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        ACCELERATE_USE_CPU="yes",
    )
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    forecast, labels, mask, ids = _batch(batch=4)
    part = slice(0, 1) if rank == 0 else slice(1, 4)  # unequal sample counts per rank
    metrics = _metrics()
    metrics.add(*_torch(forecast[part], labels[part], mask[part], ids[part]))
    rows = metrics.sync(accelerator)
    torch.save({"scores": metrics.compute(), "ids": rows.sample_ids}, f"{out_dir}/rank{rank}.pt")
    accelerator.end_training()


def test_sync_across_two_real_processes_equals_one_process(tmp_path):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.spawn(_sync_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    forecast, labels, mask, ids = _batch(batch=4)
    single = _metrics()
    single.add(*_torch(forecast, labels, mask, ids))
    for rank in range(2):
        result = torch.load(tmp_path / f"rank{rank}.pt", weights_only=False)
        assert result["ids"].tolist() == ids.tolist()
        got, want = result["scores"]["variables"], single.compute()["variables"]
        for var in TARGETS:
            for lead in ("12", "24", "all"):
                assert got[var][lead]["n"] == want[var][lead]["n"]
                assert got[var][lead]["rmse"] == pytest.approx(want[var][lead]["rmse"], rel=1e-12)
