"""Masking and weighting checked on fixtures where the wrong average gives another number.

Equal valid counts make a mean of per-sample means equal the pooled mean, equal cell counts make a
mean of cell RMSEs equal the pooled RMSE, and a reference defined everywhere hides "skill on the
same cells". Every fixture here is unequal on purpose, with the answer worked out by hand.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from modeling_topoflow import TopoFlowForForecasting, masked_mse
from tests.fixtures_model import make_tiny_batch, make_tiny_config
from topoflow.metrics import ForecastMetrics
from topoflow.regions import region_table

NORM = {"mean": {"pm25": 50.0, "o3": 80.0}, "std": {"pm25": 20.0, "o3": 10.0}}


def test_masked_mse_pools_cells_across_samples_with_unequal_counts():
    # Sample 0: one valid cell, error 3. Sample 1: three valid cells, error 1 each (a NaN hole in
    # its labels). Pooled MSE (9 + 3) / 4 = 3; the mean of per-sample means would be (9 + 1) / 2.
    forecast = torch.zeros(2, 1, 2, 2)
    labels = torch.tensor([[[[3.0, 0.0], [0.0, 0.0]]], [[[1.0, 1.0], [1.0, math.nan]]]])
    valid = torch.isfinite(labels)
    valid[0, 0, 0, 1:] = False
    valid[0, 0, 1, :] = False
    loss, per_sample, num_valid = masked_mse(forecast, labels, valid)
    assert num_valid.tolist() == [1, 3]
    assert per_sample.tolist() == pytest.approx([9.0, 1.0])
    assert loss.item() == pytest.approx(3.0)


def test_model_loss_is_the_pooled_mse_of_its_own_forecast():
    # The model's loss recomputed independently from its forecast, on a batch whose two samples
    # have different region masks (so different valid counts).
    torch.manual_seed(0)
    model = TopoFlowForForecasting(make_tiny_config(depth=2)).eval()
    batch = make_tiny_batch(model.config)
    batch["region_mask"][1, :, :5] = False
    with torch.no_grad():
        output = model(**batch)
    forecast = output.forecast.double()
    labels = batch["labels"].double()
    valid = torch.isfinite(labels) & batch["region_mask"][:, None]
    counts = valid.flatten(1).sum(1)
    assert counts[0] != counts[1]
    squared = torch.where(valid, forecast - labels, 0.0).pow(2)
    assert output.loss.item() == pytest.approx((squared.sum() / counts.sum()).item(), rel=1e-5)


def test_region_rmse_pools_values_not_cell_rmses():
    # One region of two cells: cell A has 1 value with squared error 9 (RMSE 3), cell B has 3
    # values with squared error 1 each (RMSE 1). Pooled RMSE sqrt(12 / 4); mean of cell RMSEs 2.
    control_sq = np.array([[[9.0, 3.0]]])
    count = np.array([[[1.0, 3.0]]])
    arm_sq = np.array([[[0.0, 3.0]]])  # the arm fixes cell A only
    codes = np.array([[1, 1]])
    (row,) = region_table(control_sq, count, arm_sq, count, codes, {1: "all"}, ["pm25"])
    assert row.n_values == 4
    assert row.rmse_control == pytest.approx(math.sqrt(3.0))
    assert row.rmse_arm == pytest.approx(math.sqrt(3.0 / 4.0))
    assert row.gain == pytest.approx(0.5)


def test_skill_compares_with_a_reference_only_where_the_reference_exists():
    # The reference (climatology) is undefined (NaN) on half the grid; there the model is far off
    # (error 10 std). Where the reference exists, the model misses by 0.5 std and the reference by
    # 3 std: skill 1 - 0.25 / 9 on those cells only. Counting the model's other cells would make
    # the skill negative.
    metrics = ForecastMetrics(target_variables=["pm25", "o3"], lead_times_hours=[24],
                              normalization=NORM, grid_shape=(2, 4))
    labels = torch.zeros(1, 2, 2, 4, dtype=torch.float64)
    forecast = torch.full_like(labels, 0.5)
    forecast[..., 2:] = 10.0
    std = torch.tensor([20.0, 10.0], dtype=torch.float64)[None, :, None, None]
    mean = torch.tensor([50.0, 80.0], dtype=torch.float64)[None, :, None, None]
    reference = labels * std + mean + 3.0 * std
    reference[..., 2:] = math.nan
    ids = torch.tensor([420_000 * 1000 + 24])
    mask = torch.ones(1, 2, 4, dtype=torch.bool)
    metrics.add(forecast, labels, mask, ids, references={"climatology": reference})
    row = metrics.compute()["variables"]["o3"]["24"]
    assert row["n"] == 8
    assert row["rmse"] == pytest.approx(10.0 * math.sqrt((4 * 0.25 + 4 * 100.0) / 8))
    assert row["rmse_climatology"] == pytest.approx(30.0)
    assert row["skill_climatology"] == pytest.approx(1 - 0.25 / 9)
