"""What the head predicts (full field or increment over the input state) and the calendar inputs:
validation, the checkpoint contract with the bias switched on, and the forecasts they imply."""

from __future__ import annotations

import pytest
import torch

from configuration_topoflow import TIME_FEATURES, TopoFlowConfig
from modeling_topoflow import TopoFlowForForecasting
from tests.fixtures_model import make_tiny_batch, make_tiny_config

LEADS = [12, 24, 48, 96]
TARGETS = ["pm25", "pm10", "so2", "no2", "co", "o3"]


def _scale(**per_target: float) -> dict[str, dict[str, float]]:
    return {name: {str(lead): per_target.get(name, 1.0) * lead / 12 for lead in LEADS}
            for name in TARGETS}  # fmt: skip


def _increment_config(**overrides) -> TopoFlowConfig:
    fields = {"forecast_target": "increment", "increment_scale": _scale(o3=3.0),
              "time_features": list(TIME_FEATURES), **overrides}  # fmt: skip
    return make_tiny_config(**fields)


def _zero_head_output_layer(model: TopoFlowForForecasting, bias: float = 0.0) -> None:
    with torch.no_grad():
        model.head[-1].weight.zero_()
        model.head[-1].bias.fill_(bias)


def test_increment_head_of_zero_forecasts_persistence_and_the_scale_applies_per_lead():
    torch.manual_seed(0)
    model = TopoFlowForForecasting(_increment_config()).eval()
    batch = make_tiny_batch(model.config, batch_size=4)
    state = batch["fields"][:, model.config.target_input_channels]
    _zero_head_output_layer(model)
    with torch.no_grad():
        forecast = model(**batch).forecast
    torch.testing.assert_close(forecast, state, rtol=0, atol=0)
    _zero_head_output_layer(model, bias=0.5)
    with torch.no_grad():
        forecast = model(**batch).forecast
    for sample, lead in enumerate(batch["lead_time_hours"].tolist()):
        for channel, name in enumerate(TARGETS):
            expected = 0.5 * (3.0 if name == "o3" else 1.0) * lead / 12
            increment = forecast[sample, channel] - state[sample, channel]
            torch.testing.assert_close(increment, torch.full_like(increment, expected))


def test_full_field_head_ignores_the_input_state():
    torch.manual_seed(0)
    model = TopoFlowForForecasting(make_tiny_config()).eval()
    _zero_head_output_layer(model)
    with torch.no_grad():
        forecast = model(**make_tiny_batch(model.config)).forecast
    assert forecast.abs().max().item() == 0.0


@pytest.mark.parametrize("forecast_target", ["field", "increment"])
def test_bias_switched_on_misses_exactly_two_keys_and_step_0_equals_the_baseline(
    tmp_path, forecast_target
):
    overrides = {"increment_scale": None} if forecast_target == "field" else {}
    torch.manual_seed(0)
    baseline = TopoFlowForForecasting(
        _increment_config(forecast_target=forecast_target, **overrides)).eval()
    baseline.save_pretrained(tmp_path)
    biased, info = TopoFlowForForecasting.from_pretrained(
        tmp_path, elevation_bias_blocks=[0], output_loading_info=True)
    biased.eval()
    assert set(info["missing_keys"]) == {"topoflow.blocks.0.attn.elevation_alpha",
                                         "topoflow.blocks.0.attn.H_scale"}
    assert not info["unexpected_keys"] and not info["mismatched_keys"]
    assert biased.config.forecast_target == forecast_target
    assert biased.config.increment_scale == baseline.config.increment_scale
    assert biased.config.time_features == list(TIME_FEATURES)
    batch = make_tiny_batch(biased.config, batch_size=4)
    with torch.no_grad():
        before, after = baseline(**batch), biased(**batch)
    assert (before.forecast - after.forecast).abs().max().item() <= 1e-6
    assert after.loss.item() == before.loss.item()


def test_time_features_change_the_forecast_and_are_checked():
    torch.manual_seed(0)
    model = TopoFlowForForecasting(_increment_config()).eval()
    batch = make_tiny_batch(model.config)
    with torch.no_grad():
        first = model(**batch).forecast
        shifted = model(**{**batch, "time_features": -batch["time_features"]}).forecast
    assert not torch.allclose(first, shifted)
    without = {k: v for k, v in batch.items() if k != "time_features"}
    with pytest.raises(ValueError, match="time_features: required"):
        model(**without)
    with pytest.raises(ValueError, match=r"time_features: expected shape \(2, 8\)"):
        model(**{**batch, "time_features": batch["time_features"][:, :4]})
    plain = TopoFlowForForecasting(make_tiny_config()).eval()
    with pytest.raises(ValueError, match="config.time_features is empty"):
        plain(**batch)


def test_lead_without_an_increment_scale_is_refused():
    model = TopoFlowForForecasting(_increment_config()).eval()
    batch = make_tiny_batch(model.config)
    batch["lead_time_hours"] = torch.tensor([12.0, 36.0])
    with pytest.raises(ValueError, match="36.0 h has no entry in config.increment_scale"):
        model(**batch)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"forecast_target": "delta"}, "forecast_target must be one of"),
        ({"forecast_target": "field"}, "increment_scale is set but forecast_target='field'"),
        ({"variables": ["u", "v", "pm25", "elevation"], "increment_scale": None},
         r"target variables \['pm10', 'so2', 'no2', 'co', 'o3'\] are not among variables"),
        ({"increment_scale": {**_scale(), "o3": {"12": 1.0}}},
         r"increment_scale\['o3'\] has no value for lead\(s\) \['24', '48', '96'\]"),
        ({"increment_scale": {k: v for k, v in _scale().items() if k != "co"}},
         "increment_scale has no entry for 'co'"),
        ({"increment_scale": {**_scale(), "co": {str(lead): 0.0 for lead in LEADS}}},
         r"increment_scale\['co'\] must be finite and > 0"),
        ({"time_features": ["init_time_of_week"]}, r"time_features \['init_time_of_week'\]"),
        ({"time_features": ["init_time_of_day", "init_time_of_day"]}, "duplicates"),
    ],
)
def test_invalid_head_and_time_settings_name_the_field(overrides, message):
    with pytest.raises(ValueError, match=message):
        _increment_config(**overrides)


def test_head_and_time_settings_survive_a_json_round_trip(tmp_path):
    config = _increment_config()
    config.save_pretrained(tmp_path)
    loaded = TopoFlowConfig.from_pretrained(tmp_path)
    assert loaded.forecast_target == "increment"
    assert loaded.increment_scale == config.increment_scale
    assert loaded.time_features == list(TIME_FEATURES)
    default = TopoFlowConfig()
    assert default.forecast_target == "field" and default.time_features == []
    assert default.increment_scale is None
