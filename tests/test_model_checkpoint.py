"""Checkpoint contract (DESIGN.md section 3): baseline -> biased loads, exact round trips, partial
loads fully initialized, mismatched heads fail loudly."""

from __future__ import annotations

import json
import types

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import initialization

import modeling_topoflow
from modeling_topoflow import (
    TopoFlowForForecasting,
    TopoFlowModel,
    sincos_position_embedding_2d,
    write_manifest,
)
from tests.fixtures_model import make_tiny_batch, make_tiny_config


def _fill_with_sentinels(model: torch.nn.Module) -> None:
    """Give every tensor distinct values no initializer would produce."""
    with torch.no_grad():
        for index, (_, tensor) in enumerate(sorted(model.state_dict(keep_vars=True).items())):
            values = torch.arange(tensor.numel(), dtype=torch.float64).reshape(tensor.shape)
            tensor.copy_(torch.sin(values * 0.37 + index) * 0.5 + 0.01 * index)


@pytest.mark.parametrize(
    ("blocks", "expected_missing"),
    [
        ([0], {"blocks.0.attn.elevation_alpha", "blocks.0.attn.H_scale"}),
        (
            [0, 3],
            {
                "blocks.0.attn.elevation_alpha",
                "blocks.0.attn.H_scale",
                "blocks.3.attn.elevation_alpha",
                "blocks.3.attn.H_scale",
            },
        ),
    ],
)
def test_baseline_loads_into_biased_config_with_exactly_the_bias_keys_missing(
    tmp_path, blocks, expected_missing
):
    torch.manual_seed(0)
    baseline = TopoFlowForForecasting(make_tiny_config()).eval()
    baseline.save_pretrained(tmp_path)
    biased, info = TopoFlowForForecasting.from_pretrained(
        tmp_path, elevation_bias_blocks=blocks, elevation_alpha_init=0.0, output_loading_info=True
    )
    biased.eval()

    assert set(info["missing_keys"]) == {f"topoflow.{key}" for key in expected_missing}
    assert not info["unexpected_keys"]
    assert not info["mismatched_keys"]
    for index in blocks:
        attention = biased.topoflow.blocks[index].attn
        assert attention.elevation_alpha.item() == 0.0
        assert attention.H_scale.item() == 1000.0
        assert attention.elevation_alpha.requires_grad
    assert "H_scale" in dict(biased.topoflow.blocks[blocks[0]].attn.named_buffers())

    batch = make_tiny_batch(biased.config)
    with torch.no_grad():
        before = baseline(**batch)
        after = biased(**batch)
    assert (before.forecast - after.forecast).abs().max().item() <= 1e-6
    assert after.loss.item() == before.loss.item()


def test_full_round_trip_restores_every_tensor_exactly(tmp_path):
    config = make_tiny_config(elevation_bias_blocks=[1, 2])
    model = TopoFlowForForecasting(config)
    _fill_with_sentinels(model)
    model.save_pretrained(tmp_path)
    loaded, info = TopoFlowForForecasting.from_pretrained(tmp_path, output_loading_info=True)

    assert not info["missing_keys"] and not info["unexpected_keys"]
    expected = model.state_dict()
    restored = loaded.state_dict()
    assert restored.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(restored[key], value), key
    # Buffers that are not saved must equal what the config defines, not leftover memory.
    fresh = dict(TopoFlowForForecasting(config).named_buffers())
    for name, buffer in loaded.named_buffers():
        if name not in expected:
            assert torch.equal(buffer, fresh[name]), name


def test_partial_load_initializes_every_missing_tensor(tmp_path):
    config = make_tiny_config(elevation_bias_blocks=[0], elevation_alpha_init=2.0)
    model = TopoFlowForForecasting(config)
    _fill_with_sentinels(model)
    model.save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    dropped = {
        "topoflow.embeddings.pos_embed",
        "topoflow.embeddings.var_query",
        "topoflow.embeddings.var_agg.in_proj_weight",
        "topoflow.blocks.0.attn.elevation_alpha",
        "topoflow.blocks.0.attn.H_scale",
        "topoflow.blocks.1.norm1.weight",
        "topoflow.blocks.2.attn.qkv.bias",
    }
    save_file(
        {key: value for key, value in weights.items() if key not in dropped},
        tmp_path / "model.safetensors",
        metadata={"format": "pt"},
    )
    write_manifest(tmp_path)  # the edited folder is the one meant to load
    loaded, info = TopoFlowForForecasting.from_pretrained(tmp_path, output_loading_info=True)

    assert set(info["missing_keys"]) == dropped
    for name, tensor in loaded.state_dict().items():
        assert torch.isfinite(tensor).all(), name
    state = loaded.state_dict()
    grid = config.grid_size
    assert torch.equal(
        state["topoflow.embeddings.pos_embed"],
        sincos_position_embedding_2d(config.embed_dim, *grid)[None],
    )
    assert torch.equal(state["topoflow.embeddings.var_query"], torch.zeros(1, 1, config.embed_dim))
    assert state["topoflow.blocks.0.attn.elevation_alpha"].item() == 2.0
    assert state["topoflow.blocks.0.attn.H_scale"].item() == 1000.0
    assert torch.equal(state["topoflow.blocks.1.norm1.weight"], torch.ones(config.embed_dim))
    assert torch.equal(state["topoflow.blocks.2.attn.qkv.bias"], torch.zeros(3 * config.embed_dim))
    in_proj = state["topoflow.embeddings.var_agg.in_proj_weight"]
    bound = (6 / (in_proj.shape[0] + in_proj.shape[1])) ** 0.5  # xavier_uniform
    assert in_proj.abs().max() <= bound and in_proj.std() > bound / 4
    # A tensor that was loaded keeps its checkpoint value (the init did not overwrite it).
    assert torch.equal(state["topoflow.norm.weight"], weights["topoflow.norm.weight"])


@pytest.mark.parametrize("decoder_depth", [1, 2])
def test_head_has_decoder_depth_hidden_layers_plus_output(decoder_depth):
    config = make_tiny_config(decoder_depth=decoder_depth)
    head = TopoFlowForForecasting(config).head
    linears = [layer for layer in head if isinstance(layer, torch.nn.Linear)]
    assert len(linears) == decoder_depth + 1
    assert linears[-1].out_features == len(config.target_variables) * config.patch_size**2
    assert all(layer.out_features == config.embed_dim for layer in linears[:-1])


@pytest.mark.parametrize(
    "overrides",
    [
        {"decoder_depth": 0},
        {"decoder_depth": 1},
        {"decoder_depth": 3},
        {"target_variables": ["o3"]},
    ],
)
def test_checkpoint_with_a_different_head_fails_loudly(tmp_path, overrides):
    TopoFlowForForecasting(make_tiny_config(decoder_depth=2)).save_pretrained(tmp_path)
    with pytest.raises((RuntimeError, ValueError)):
        TopoFlowForForecasting.from_pretrained(tmp_path, ignore_mismatched_sizes=False, **overrides)


def test_encoder_only_checkpoint_does_not_leave_a_silently_random_head(tmp_path):
    TopoFlowModel(make_tiny_config()).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="head"):
        TopoFlowForForecasting.from_pretrained(tmp_path)


def test_config_overrides_at_load_are_validated(tmp_path):
    TopoFlowForForecasting(make_tiny_config()).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="elevation_bias_blocks"):
        TopoFlowForForecasting.from_pretrained(tmp_path, elevation_bias_blocks=[4])


def test_saved_folder_is_self_describing(tmp_path):
    config = make_tiny_config(
        variable_units={"pm25": "ug/m3", "elevation": "m"},
        grid={"lat_min": 18.0, "lat_max": 22.0, "lon_min": 100.0, "lon_max": 108.0,
              "resolution_deg": 0.25},
        region_mask_description="land cells",
        corpus={"name": "tiny", "provenance": {"seed": 0}},
    )  # fmt: skip
    TopoFlowForForecasting(config).save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    for key in (
        "variables",
        "target_variables",
        "variable_mean",
        "variable_std",
        "img_size",
        "lead_times_hours",
        "variable_units",
        "grid",
        "region_mask_description",
        "corpus",
    ):
        assert saved[key] == getattr(config, key), key  # fmt: skip
    assert saved["auto_map"] == {
        "AutoConfig": "configuration_topoflow.TopoFlowConfig",
        "AutoModel": "modeling_topoflow.TopoFlowModel",
        "AutoModelForTimeSeriesPrediction": "modeling_topoflow.TopoFlowForForecasting",
    }
    assert (tmp_path / "model.safetensors").is_file()
    assert not list(tmp_path.glob("*.bin"))
    assert (tmp_path / "modeling_topoflow.py").is_file()
    assert (tmp_path / "configuration_topoflow.py").is_file()
    assert (tmp_path / "attention_topoflow.py").is_file()  # imported by modeling_topoflow.py


def test_elevation_scale_override_cannot_silently_disagree_with_saved_h_scale(tmp_path):
    TopoFlowForForecasting(make_tiny_config(elevation_bias_blocks=[0])).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="H_scale"):
        TopoFlowForForecasting.from_pretrained(tmp_path, elevation_scale=500.0)
    baseline = tmp_path / "baseline"
    TopoFlowForForecasting(make_tiny_config()).save_pretrained(baseline)
    swept = TopoFlowForForecasting.from_pretrained(
        baseline, elevation_bias_blocks=[0], elevation_scale=333.3
    )
    assert swept.topoflow.blocks[0].attn.H_scale.item() == pytest.approx(333.3)


def test_init_weights_sets_every_parameter_and_buffer(monkeypatch):
    """Structural guard: a new tensor that `_init_weights` forgets fails here, before a partial
    load leaves it holding whatever memory transformers allocated."""
    written: set[int] = set()

    def recording(function):
        def wrapper(tensor, *args, **kwargs):
            written.add(id(tensor))
            return function(tensor, *args, **kwargs)

        return wrapper

    names = [
        name for name in dir(initialization) if name.endswith("_") and not name.startswith("_")
    ]
    spy = types.SimpleNamespace(
        **{name: recording(getattr(initialization, name)) for name in names}
    )
    monkeypatch.setattr(modeling_topoflow, "init", spy)

    model = TopoFlowForForecasting(make_tiny_config(elevation_bias_blocks=[0, 3]))
    for module in model.modules():
        module._is_hf_initialized = False
    model.initialize_weights()
    tensors = dict(model.named_parameters()) | dict(model.named_buffers())
    forgotten = sorted(name for name, tensor in tensors.items() if id(tensor) not in written)
    assert forgotten == []
