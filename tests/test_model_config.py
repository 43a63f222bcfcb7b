"""TopoFlowConfig: the reference defaults, validation messages, serialization."""

from __future__ import annotations

import pytest
import torch

from configuration_topoflow import DEFAULT_TARGET_VARIABLES, DEFAULT_VARIABLES, TopoFlowConfig
from modeling_topoflow import TopoFlowForForecasting
from tests.fixtures_model import make_tiny_config

# Counted on the reference TopoFlowConfig() (README "Model" section quotes it).
REFERENCE_PARAMETER_COUNT = 52_453_656


def test_default_config_is_the_reference_setup():
    config = TopoFlowConfig()
    assert config.variables == list(DEFAULT_VARIABLES) and len(config.variables) == 15
    assert config.target_variables == ["pm25", "pm10", "so2", "no2", "co", "o3"]
    assert list(DEFAULT_TARGET_VARIABLES) == config.target_variables
    assert config.img_size == [128, 256] and config.patch_size == 2
    assert (config.embed_dim, config.depth, config.num_heads, config.decoder_depth) == (
        768,
        6,
        8,
        2,
    )
    assert config.elevation_bias_blocks == [] and config.elevation_scale == 1000.0
    assert config.elevation_alpha_init == 0.0 and config.elevation_bias_clamp == 10.0
    assert config.elevation_channel == DEFAULT_VARIABLES.index("elevation")
    assert config.variable_mean["elevation"] == 0.0 and config.variable_std["elevation"] == 1.0
    assert config.num_patches == 64 * 128


def test_reference_model_parameter_count():
    with torch.device("meta"):  # shapes only: no 200 MB allocation
        model = TopoFlowForForecasting(TopoFlowConfig())
    count = sum(param.numel() for param in model.parameters())
    print(f"TopoFlowConfig() parameters: {count:,}")
    assert count == REFERENCE_PARAMETER_COUNT


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"elevation_bias_blocks": [4]}, r"elevation_bias_blocks \[4\] out of range"),
        ({"elevation_bias_blocks": [-1]}, "out of range"),
        ({"elevation_bias_blocks": [1, 1]}, "duplicates"),
        ({"variables": ["u", "v", "u"]}, r"duplicate names \['u'\]"),
        ({"target_variables": []}, "target_variables is empty"),
        ({"img_size": (15, 32)}, "divisible by"),
        ({"embed_dim": 30}, "not divisible by num_heads=4"),
        ({"elevation_scale": 0.0}, "elevation_scale"),
        ({"elevation_scale": -1000.0}, "elevation_scale"),
        ({"elevation_bias_clamp": -1.0}, "elevation_bias_clamp"),
        ({"variable_mean": {"u": 0.0}}, "variable_mean has no entry for"),
        (
            {"variable_std": {**make_tiny_config().variable_std, "pm25": 0.0}},
            r"<= 0 for \['pm25'\]",
        ),
        ({"lead_times_hours": [0, 12]}, "lead_times_hours"),
        ({"decoder_depth": -1}, "decoder_depth"),
        ({"drop_path": 1.0}, "drop_path"),
    ],
)
def test_invalid_config_raises_naming_the_field(overrides, message):
    with pytest.raises(ValueError, match=message):
        make_tiny_config(**overrides)


def test_edited_config_is_rejected_before_save(tmp_path):
    config = make_tiny_config()
    config.elevation_bias_blocks = [7]
    with pytest.raises(ValueError, match="out of range"):
        config.save_pretrained(tmp_path)


def test_json_round_trip_keeps_every_field(tmp_path):
    config = make_tiny_config(
        elevation_bias_blocks=[2, 0],
        variable_units={"elevation": "m"},
        grid={"lat_min": 18.0, "lat_max": 50.0, "lon_min": 73.0, "lon_max": 137.0},
    )
    assert config.elevation_bias_blocks == [0, 2]  # sorted
    config.save_pretrained(tmp_path)
    loaded = TopoFlowConfig.from_pretrained(tmp_path)
    assert loaded.to_dict() == config.to_dict()


def test_statistics_cover_targets_not_among_inputs():
    config = make_tiny_config(variables=["u", "v", "elevation"], target_variables=["pm25"])
    assert set(config.variable_mean) == {"u", "v", "elevation", "pm25"}
