"""`elevation_bias_direction` and keeping alpha >= 0 (docs/results/README.md: why both exist)."""

from __future__ import annotations

import pytest
import torch

from configuration_topoflow import TopoFlowConfig
from modeling_topoflow import TopoFlowAttention, TopoFlowForForecasting
from tests.fixtures_model import make_tiny_batch, make_tiny_config


def _attention(direction: str, alpha: float = 1.0) -> TopoFlowAttention:
    torch.manual_seed(0)
    config = make_tiny_config(elevation_bias_blocks=[0], elevation_alpha_init=alpha,
                              elevation_bias_direction=direction)
    config._attn_implementation = "eager"
    return TopoFlowAttention(config, layer_idx=0)


@pytest.mark.parametrize("direction, penalized", [("downslope", (0, 1)), ("upslope", (1, 0))])
def test_direction_chooses_which_source_is_penalized(direction, penalized):
    # Two tokens, 0 m and 1000 m, alpha 1, H_scale 1000 m: one pair costs exactly 1 logit.
    attention = _attention(direction)
    elevation = torch.tensor([[0.0, 1000.0]])
    hidden = torch.zeros(1, 2, attention.config.embed_dim)
    dim = attention.config.embed_dim
    with torch.no_grad():
        attention.qkv.weight.zero_()
        attention.qkv.bias.zero_()
        attention.proj.weight.zero_()
        attention.proj.bias.zero_()
        # Zero queries and keys leave the bias as the only logit; token j's value is the j-th
        # basis vector, so the output row of query i is its attention probabilities.
        attention.qkv.weight[2 * dim:2 * dim + 2, :2] = torch.eye(2)
        attention.proj.weight[:2, :2] = torch.eye(2)
        hidden[0, 0, 0] = 1.0
        hidden[0, 1, 1] = 1.0
        weights = attention(hidden, elevation)[0][0, :, :2]  # row i = attention of query i
    receiver, source = penalized
    low = torch.tensor(1.0).exp()
    expected_penalized = 1.0 / (1.0 + low)  # exp(-1) / (exp(-1) + exp(0))
    assert weights[receiver, source].item() == pytest.approx(expected_penalized.item(), abs=1e-6)
    assert weights[source, receiver].item() == pytest.approx(0.5, abs=1e-6)  # the free direction


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
def test_upslope_matches_between_implementations_with_alpha_gradient(implementation):
    torch.manual_seed(0)
    config = make_tiny_config(elevation_bias_blocks=[0, 2], elevation_alpha_init=1.5,
                              elevation_bias_direction="upslope")
    model = TopoFlowForForecasting(config).eval()
    batch = make_tiny_batch(config)
    results = {}
    for impl in ("eager", implementation):
        model.zero_grad()
        model.set_attn_implementation(impl)
        output = model(**batch)
        output.loss.backward()
        results[impl] = (output.forecast.detach(),
                         model.topoflow.blocks[0].attn.elevation_alpha.grad.clone())
    torch.testing.assert_close(results[implementation][0], results["eager"][0],
                               atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(results[implementation][1], results["eager"][1],
                               atol=1e-6, rtol=1e-4)
    # And the direction is not a no-op: the downslope encoder computes something else (encoder
    # tokens are O(1); the fresh head's forecasts are too small to show it).
    with torch.no_grad():
        upslope = model.topoflow(batch["fields"], batch["lead_time_hours"]).last_hidden_state
        model.config.elevation_bias_direction = "downslope"
        downslope = model.topoflow(batch["fields"], batch["lead_time_hours"]).last_hidden_state
    assert (upslope - downslope).abs().max() > 1e-2


def test_direction_is_validated_and_saved(tmp_path):
    with pytest.raises(ValueError, match="elevation_bias_direction"):
        make_tiny_config(elevation_bias_direction="uphill")
    model = TopoFlowForForecasting(make_tiny_config(elevation_bias_blocks=[0],
                                                    elevation_bias_direction="upslope"))
    model.save_pretrained(tmp_path)
    assert TopoFlowConfig.from_pretrained(tmp_path).elevation_bias_direction == "upslope"
    # A config.json written before the field existed means the DESIGN.md direction.
    assert TopoFlowConfig().elevation_bias_direction == "downslope"


def test_projection_puts_negative_alpha_back_at_zero_and_keeps_positive_ones():
    model = TopoFlowForForecasting(make_tiny_config(elevation_bias_blocks=[0, 2]))
    alphas = model.elevation_alpha_parameters()
    assert len(alphas) == 2
    with torch.no_grad():
        alphas[0].fill_(-0.3)
        alphas[1].fill_(0.7)
    model.project_elevation_alpha_()
    assert alphas[0].item() == 0.0 and alphas[1].item() == pytest.approx(0.7)
