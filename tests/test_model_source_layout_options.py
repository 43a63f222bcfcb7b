"""The two config fields converted checkpoints need: `lead_time_scale_hours` and
`patch_embed_norm`. ClimaX's behaviour stays the default; both are validated, saved and loaded, and
act in the forward as documented."""

from __future__ import annotations

import json

import pytest
import torch

from configuration_topoflow import TopoFlowConfig
from modeling_topoflow import TopoFlowForForecasting
from tests.fixtures_model import make_tiny_batch, make_tiny_config


def randomized(model, seed=0):
    """Weights of order 0.2-1 (a fresh model's 0.02 would hide differences in rounding)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * 0.2)
    return model


def forecast(model, batch, lead_time_hours=None):
    lead = batch["lead_time_hours"] if lead_time_hours is None else lead_time_hours
    with torch.no_grad():
        return model.eval()(batch["fields"], lead).forecast


def test_defaults_are_climax():
    config = TopoFlowConfig()
    assert config.lead_time_scale_hours == 100.0 and config.patch_embed_norm is False
    keys = TopoFlowForForecasting(make_tiny_config()).state_dict()
    assert not any("patch_embed_norm" in key for key in keys)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"lead_time_scale_hours": 0.0}, "lead_time_scale_hours"),
        ({"lead_time_scale_hours": float("nan")}, "lead_time_scale_hours"),
        ({"lead_time_scale_hours": "100"}, "lead_time_scale_hours"),
        ({"lead_time_scale_hours": True}, "lead_time_scale_hours"),
        ({"patch_embed_norm": "yes"}, "patch_embed_norm"),
        ({"patch_embed_norm": 1}, "patch_embed_norm"),
    ],
)
def test_invalid_values_raise_naming_the_field(overrides, message):
    with pytest.raises(ValueError, match=message):
        make_tiny_config(**overrides)


def test_fields_are_saved_and_loaded(tmp_path):
    config = make_tiny_config(lead_time_scale_hours=1.0, patch_embed_norm=True)
    model = TopoFlowForForecasting(config)
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["lead_time_scale_hours"] == 1.0 and saved["patch_embed_norm"] is True

    loaded, info = TopoFlowForForecasting.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"]
    assert loaded.config.lead_time_scale_hours == 1.0 and loaded.config.patch_embed_norm is True
    batch = make_tiny_batch(config)
    torch.testing.assert_close(forecast(loaded, batch), forecast(model, batch))


def test_lead_time_scale_divides_the_lead_time():
    """Same weights: scale s at L hours forecasts what scale 100 does at L * 100 / s hours."""
    climax_like = randomized(TopoFlowForForecasting(make_tiny_config()))
    raw_hours = TopoFlowForForecasting(make_tiny_config(lead_time_scale_hours=4.0))
    raw_hours.load_state_dict(climax_like.state_dict())
    batch = make_tiny_batch(climax_like.config)
    lead = batch["lead_time_hours"]
    torch.testing.assert_close(
        forecast(raw_hours, batch, lead), forecast(climax_like, batch, lead * 25.0)
    )
    difference = forecast(raw_hours, batch, lead) - forecast(climax_like, batch, lead)
    assert difference.abs().max() > 1e-2


def test_patch_embed_norm_normalizes_each_variables_tokens():
    config = make_tiny_config(patch_embed_norm=True)
    model = randomized(TopoFlowForForecasting(config)).eval()
    embeddings = model.topoflow.embeddings
    with torch.no_grad():  # the identity affine part, to see the normalization itself
        embeddings.patch_embed_norm.weight.fill_(1.0)
        embeddings.patch_embed_norm.bias.zero_()
    captured = {}
    embeddings.patch_embed_norm.register_forward_hook(
        lambda module, inputs, output: captured.update(output=output)
    )
    batch = make_tiny_batch(config)
    forecast(model, batch)
    tokens = captured["output"]  # (B, V, N, D)
    assert tokens.shape == (2, len(config.variables), config.num_patches, config.embed_dim)
    torch.testing.assert_close(tokens.mean(-1), torch.zeros(tokens.shape[:-1]), atol=1e-5, rtol=0)
    torch.testing.assert_close(
        tokens.var(-1, unbiased=False), torch.ones(tokens.shape[:-1]), atol=1e-3, rtol=0
    )


def test_a_checkpoint_without_the_norm_reports_it_missing(tmp_path):
    TopoFlowForForecasting(make_tiny_config()).save_pretrained(tmp_path)
    _, info = TopoFlowForForecasting.from_pretrained(
        tmp_path, patch_embed_norm=True, output_loading_info=True
    )
    assert sorted(info["missing_keys"]) == [
        "topoflow.embeddings.patch_embed_norm.bias",
        "topoflow.embeddings.patch_embed_norm.weight",
    ]
