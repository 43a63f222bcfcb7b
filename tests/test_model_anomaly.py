"""forecast_target="anomaly": the harmonic climatology fit, the damping and scale fitted on the
training split against direct computations, and the model's forecast against one by hand."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from configuration_topoflow import TIME_FEATURES, TopoFlowConfig
from modeling_topoflow import CLIMATOLOGY_TERMS, TopoFlowForForecasting, write_manifest
from tests.fixtures_model import make_tiny_batch, make_tiny_config
from topoflow.corpus.schema import CorpusMetadata
from topoflow.corpus.shards import read_shard, read_static
from topoflow.data.anomaly_base import HarmonicClimatology, fit_anomaly_base

TARGETS = ["pm25", "pm10", "so2", "no2", "co", "o3"]
LEADS = [12, 24, 48, 96]


def _phases(hours: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Day and year phases written out independently of the library (calendar years)."""
    stamps = hours.astype("datetime64[h]")
    year = stamps.astype("datetime64[Y]")
    start = year.astype("datetime64[h]").astype(np.int64)
    length = (year + 1).astype("datetime64[h]").astype(np.int64) - start
    return (hours % 24) / 24.0, (hours - start) / length


def _terms(hours: np.ndarray) -> np.ndarray:
    """(T, 13): 1, day k=1,2 (sin, cos), year k=1,2 (sin, cos), day1 x year1 products."""
    day, year = _phases(np.asarray(hours, dtype=np.int64))
    d, y = 2 * np.pi * day, 2 * np.pi * year
    return np.stack([np.ones_like(d), np.sin(d), np.cos(d), np.sin(2 * d), np.cos(2 * d),
                     np.sin(y), np.cos(y), np.sin(2 * y), np.cos(2 * y),
                     np.sin(d) * np.sin(y), np.sin(d) * np.cos(y), np.cos(d) * np.sin(y),
                     np.cos(d) * np.cos(y)], axis=1)  # fmt: skip


def test_harmonic_climatology_recovers_known_coefficients_around_holes():
    rng = np.random.default_rng(0)
    hours = np.arange(394_464, 394_464 + 2 * 8760, 6)  # two years from 2015, 6-hourly
    true = rng.normal(size=(2, CLIMATOLOGY_TERMS, 2, 3))
    true[:, 3] = 0.0  # sin(2 x day phase) is 0 at 0, 6, 12, 18 UTC: no sample can see it
    values = np.einsum("tk,vkhw->tvhw", _terms(hours), true)
    values[rng.random(values.shape) < 0.1] = np.nan
    values[:, 1, 0, 0] = np.nan  # a cell never observed
    values[20:, 0, 1, 2] = np.nan  # a cell observed 20 times: too few for 13 terms
    clim = HarmonicClimatology(["a", "b"], (2, 3))
    for chunk in np.array_split(np.arange(len(hours)), 5):
        clim.add_physical(torch.from_numpy(values[chunk]), hours[chunk])
    fitted = clim.coefficients.numpy()
    fitted_cells = np.ones((2, 2, 3), dtype=bool)
    fitted_cells[1, 0, 0] = fitted_cells[0, 1, 2] = False
    for v, h, w in zip(*np.nonzero(fitted_cells), strict=True):
        np.testing.assert_allclose(fitted[v, :, h, w], true[v, :, h, w], atol=1e-4)
    assert np.isnan(fitted[1, :, 0, 0]).all()
    few = fitted[0, :, 1, 2]
    assert few[0] == pytest.approx(np.nanmean(values[:20, 0, 1, 2])) and not few[1:].any()
    at = clim.at_hours(hours[:50]).numpy()
    expected = np.einsum("tk,vkhw->tvhw", _terms(hours[:50]), true)
    np.testing.assert_allclose(at[:, 0, 0, 0], expected[:, 0, 0, 0], atol=1e-4)


def test_damping_and_scale_match_a_direct_computation(synthetic_corpus: Path):
    """From the Parquet rows: the climatology (a per-cell mean: 6 training days are too few for
    the harmonics), the least-squares factor and the residual RMS over region cells."""
    targets, leads = ["pm25", "o3"], [6, 24]
    meta = CorpusMetadata.load(synthetic_corpus)
    norm = {"mean": {v: meta.normalization[v]["mean"] for v in targets},
            "std": {v: meta.normalization[v]["std"] for v in targets}}  # fmt: skip
    base = fit_anomaly_base(synthetic_corpus, target_variables=targets, lead_times_hours=leads,
                            normalization=norm)  # fmt: skip
    region = read_static(synthetic_corpus / "static.safetensors", meta)["region_id"] != 0
    shards = [read_shard(synthetic_corpus, shard, meta) for shard in meta.split_shards("train")]
    for j, v in enumerate(targets):
        rows = [(hour, (f[v][k] - norm["mean"][v]) / norm["std"][v])
                for hours, _, f in shards for k, hour in enumerate(hours)]
        own = np.stack([(f[v][~halo] - norm["mean"][v]) / norm["std"][v]
                        for _, halo, f in shards])  # fmt: skip
        mean = np.nanmean(own.reshape(-1, *own.shape[2:]), axis=0)
        np.testing.assert_allclose(base.coefficients[j, 0].numpy(), mean, rtol=1e-5, atol=1e-6)
        assert not base.coefficients[j, 1:].any()
        by_hour = dict(rows)
        own_hours = [hour for hours, halo, _ in shards for hour in hours[~halo]]
        for lead in leads:
            a0, a1 = [], []
            for hours, halo, _f in shards:
                # pairs inside one shard: init in its own rows, target up to its halo
                for k in np.nonzero(~halo)[0]:
                    if hours[k] + lead in set(hours.tolist()):
                        first, second = by_hour[hours[k]] - mean, by_hour[hours[k] + lead] - mean
                        keep = region & np.isfinite(first) & np.isfinite(second)
                        a0.append(first[keep])
                        a1.append(second[keep])
            a0, a1 = np.concatenate(a0), np.concatenate(a1)
            factor = (a0 * a1).sum() / (a0 * a0).sum()
            assert base.damping[v][str(lead)] == pytest.approx(factor, rel=1e-6)
            rms = math.sqrt(((a1 - factor * a0) ** 2).mean())
            assert base.scale[v][str(lead)] == pytest.approx(rms, rel=1e-6)
        assert len(own_hours) < 4 * CLIMATOLOGY_TERMS  # what makes the climatology a mean here


def _anomaly_config(**overrides) -> TopoFlowConfig:
    damping = {name: {str(lead): 0.8 / (1 + i) - 0.1 * j for i, lead in enumerate(LEADS)}
               for j, name in enumerate(TARGETS)}  # fmt: skip
    scale = {name: {str(lead): 0.2 * (1 + i) for i, lead in enumerate(LEADS)} for name in TARGETS}
    fields = {"forecast_target": "anomaly", "anomaly_damping": damping, "increment_scale": scale,
              "time_features": list(TIME_FEATURES), **overrides}  # fmt: skip
    return make_tiny_config(**fields)


def _anomaly_model(seed: int = 0) -> TopoFlowForForecasting:
    torch.manual_seed(seed)
    model = TopoFlowForForecasting(_anomaly_config()).eval()
    with torch.no_grad():
        model.climatology.coefficients.normal_()
    return model


def test_zero_head_forecasts_damped_anomaly_persistence_and_the_head_adds_its_scale():
    model = _anomaly_model()
    config = model.config
    batch = make_tiny_batch(config, batch_size=4)
    with torch.no_grad():
        model.head[-1].weight.zero_()
        model.head[-1].bias.fill_(0.5)
        forecast = model(**batch).forecast.double()
    coefficients = model.climatology.coefficients.double().numpy()
    init_hours = (batch["sample_ids"] // 1000).numpy()
    leads = batch["lead_time_hours"].long().numpy()
    clim_init = np.einsum("tk,vkhw->tvhw", _terms(init_hours), coefficients)
    clim_valid = np.einsum("tk,vkhw->tvhw", _terms(init_hours + leads), coefficients)
    state = batch["fields"][:, config.target_input_channels].double().numpy()
    for b, lead in enumerate(leads):
        damping = np.array([config.anomaly_damping[v][str(lead)] for v in TARGETS])
        scale = np.array([config.increment_scale[v][str(lead)] for v in TARGETS])
        expected = (clim_valid[b] + damping[:, None, None] * (state[b] - clim_init[b])
                    + 0.5 * scale[:, None, None])  # fmt: skip
        np.testing.assert_allclose(forecast[b].numpy(), expected, atol=2e-5)


def test_bias_switched_on_misses_exactly_two_keys_and_step_0_equals_the_baseline(tmp_path):
    baseline = _anomaly_model()
    baseline.save_pretrained(tmp_path)
    biased, info = TopoFlowForForecasting.from_pretrained(
        tmp_path, elevation_bias_blocks=[0], output_loading_info=True)
    biased.eval()
    assert set(info["missing_keys"]) == {"topoflow.blocks.0.attn.elevation_alpha",
                                         "topoflow.blocks.0.attn.H_scale"}
    assert torch.equal(biased.climatology.coefficients, baseline.climatology.coefficients)
    assert biased.config.anomaly_damping == baseline.config.anomaly_damping
    batch = make_tiny_batch(biased.config, batch_size=4)
    with torch.no_grad():
        before, after = baseline(**batch), biased(**batch)
    assert (before.forecast - after.forecast).abs().max().item() <= 1e-6


def test_a_checkpoint_without_the_climatology_is_refused(tmp_path):
    _anomaly_model().save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    del weights["climatology.coefficients"]
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    write_manifest(tmp_path)  # a consistent folder: only the key is missing
    with pytest.raises(ValueError, match="no climatology.coefficients"):
        TopoFlowForForecasting.from_pretrained(tmp_path)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"anomaly_damping": None}, "forecast_target='anomaly' needs anomaly_damping"),
        ({"time_features": ["init_time_of_day", "valid_time_of_day"]},
         r"time_features lacks \['init_time_of_year', 'valid_time_of_year'\]"),
        ({"anomaly_damping": {name: {"12": 0.5} for name in TARGETS}},
         r"anomaly_damping\['pm25'\] has no value for lead\(s\) \['24', '48', '96'\]"),
        ({"anomaly_damping": {name: {str(h): math.nan for h in LEADS} for name in TARGETS}},
         r"anomaly_damping\['pm25'\] must be finite"),
        ({"forecast_target": "increment"}, "anomaly_damping is set but forecast_target="),
    ],
)
def test_invalid_anomaly_settings_name_the_field(overrides, message):
    with pytest.raises(ValueError, match=message):
        _anomaly_config(**overrides)
