"""The elevation bias itself and the agreement of the attention implementations."""

from __future__ import annotations

import warnings

import pytest
import torch

from modeling_topoflow import (
    TopoFlowForForecasting,
    elevation_bias_matrix,
    elevation_biased_attention,
    patch_mean_elevation,
)
from tests.fixtures_model import make_terrain, make_tiny_batch, make_tiny_config


def _bias(elevation_m, alpha=1.0, h_scale=1000.0, clamp_max=10.0):
    return elevation_bias_matrix(
        torch.tensor(elevation_m, dtype=torch.float64),
        alpha=torch.tensor(alpha),
        h_scale=torch.tensor(h_scale),
        clamp_max=clamp_max,
    )


def test_one_km_uphill_costs_alpha_and_downhill_is_free():
    bias = _bias([[0.0, 1000.0]])
    assert bias.shape == (1, 2, 2)
    assert bias[0, 0, 1].item() == pytest.approx(-1.0)  # query at 0 m, key 1000 m higher
    assert bias[0, 1, 0].item() == 0.0  # looking downhill
    assert bias[0, 0, 0].item() == 0.0 and bias[0, 1, 1].item() == 0.0


def test_bias_scales_with_alpha_and_h_scale_and_is_clamped():
    assert _bias([[0.0, 1000.0]], alpha=2.0)[0, 0, 1].item() == pytest.approx(-2.0)
    assert _bias([[0.0, 1000.0]], h_scale=500.0)[0, 0, 1].item() == pytest.approx(-2.0)
    clamped = _bias([[0.0, 50_000.0, 3000.0]], clamp_max=10.0)
    assert clamped[0, 0, 1].item() == -10.0
    assert clamped[0, 0, 2].item() == pytest.approx(-3.0)
    assert clamped.min().item() >= -10.0 and clamped.max().item() <= 0.0


def test_patch_mean_elevation_pools_patches_row_major():
    elevation = torch.arange(16.0).reshape(1, 4, 4)
    pooled = patch_mean_elevation(elevation, patch_size=2)
    assert torch.equal(pooled, torch.tensor([[2.5, 4.5, 10.5, 12.5]]))


def _biased_model(**overrides):
    torch.manual_seed(0)
    defaults = dict(elevation_bias_blocks=[0, 2], elevation_alpha_init=2.0)
    defaults.update(overrides)
    return TopoFlowForForecasting(make_tiny_config(**defaults)).eval()


def test_bias_uses_metres_when_the_elevation_channel_arrives_normalized():
    model = _biased_model(
        variable_mean={**make_tiny_config().variable_mean, "elevation": 1500.0},
        variable_std={**make_tiny_config().variable_std, "elevation": 800.0},
    )
    batch = make_tiny_batch(model.config)
    fields, lead = batch["fields"], batch["lead_time_hours"]
    terrain = make_terrain(*model.config.img_size)
    # Encoder tokens (LayerNorm-ed, O(1)) show the bias better than the freshly initialized head.
    with torch.no_grad():
        from_channel = model.topoflow(fields, lead).last_hidden_state
        from_metres = model.topoflow(fields, lead, elevation=terrain).last_hidden_state
        normalized = (terrain - 1500.0) / 800.0
        from_normalized = model.topoflow(fields, lead, elevation=normalized).last_hidden_state
    torch.testing.assert_close(from_channel, from_metres, atol=1e-5, rtol=1e-5)
    # Feeding normalized heights as if they were metres is a different (much weaker) bias.
    assert (from_channel - from_normalized).abs().max() > 1e-2


def test_elevation_is_required_when_inputs_carry_none():
    model = _biased_model(elevation_variable=None)
    batch = make_tiny_batch(model.config)
    with pytest.raises(ValueError, match="elevation"):
        model(**batch)
    terrain = make_terrain(*model.config.img_size)
    assert torch.isfinite(model(**batch, elevation=terrain).forecast).all()


@pytest.mark.parametrize("alpha_init", [0.0, 2.0])
def test_gradient_reaches_alpha(alpha_init):
    model = _biased_model(elevation_alpha_init=alpha_init)
    model(**make_tiny_batch(model.config)).loss.backward()
    for index in (0, 2):
        grad = model.topoflow.blocks[index].attn.elevation_alpha.grad
        assert grad is not None and grad.abs().item() > 0


def _outputs_and_grads(model, batch, implementation):
    model.zero_grad()
    model.set_attn_implementation(implementation)
    output = model(**batch)
    output.loss.backward()
    grads = {name: param.grad.clone() for name, param in model.named_parameters()}
    return output.forecast.detach(), grads


@pytest.mark.parametrize("alpha_init", [0.0, 2.0])
def test_eager_and_sdpa_agree_in_outputs_and_gradients(alpha_init):
    model = _biased_model(elevation_alpha_init=alpha_init)
    batch = make_tiny_batch(model.config)
    eager_forecast, eager_grads = _outputs_and_grads(model, batch, "eager")
    sdpa_forecast, sdpa_grads = _outputs_and_grads(model, batch, "sdpa")
    assert model.config._attn_implementation == "sdpa"
    torch.testing.assert_close(sdpa_forecast, eager_forecast, atol=1e-5, rtol=1e-5)
    assert eager_grads.keys() == sdpa_grads.keys()
    for name, grad in eager_grads.items():
        torch.testing.assert_close(sdpa_grads[name], grad, atol=1e-5, rtol=1e-4, msg=name)
    assert "topoflow.blocks.0.attn.elevation_alpha" in eager_grads


def test_attention_implementation_is_chosen_the_transformers_way(tmp_path):
    _biased_model().save_pretrained(tmp_path)
    for implementation in ("eager", "sdpa"):
        model = TopoFlowForForecasting.from_pretrained(tmp_path, attn_implementation=implementation)
        assert model.config._attn_implementation == implementation
    with pytest.raises(ValueError):
        TopoFlowForForecasting.from_pretrained(tmp_path, attn_implementation="no_such_kernel")


def _random_attention_inputs(dtype=torch.float64):
    generator = torch.Generator().manual_seed(1)
    query, key, value = (
        torch.randn(2, 3, 24, 8, generator=generator, dtype=dtype) for _ in range(3)
    )
    elevation = torch.rand(2, 24, generator=generator, dtype=dtype) * 4000.0
    return query, key, value, elevation


def _call(implementation, query, key, value, elevation, alpha):
    return elevation_biased_attention(
        query, key, value, elevation_m=elevation, alpha=alpha, h_scale=torch.tensor(1000.0),
        clamp_max=10.0, implementation=implementation,
    )  # fmt: skip


def test_flex_attention_forward_matches_eager_on_cpu():
    # FlexAttention has no CPU backward (NotImplementedError in torch 2.13), so on CPU only the
    # forward is compared; the CUDA test below compares gradients.
    query, key, value, elevation = _random_attention_inputs()
    alpha = torch.tensor(1.5, dtype=torch.float64)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "called without torch.compile": expected on CPU
        flex = _call("flex_attention", query, key, value, elevation, alpha)
    eager = _call("eager", query, key, value, elevation, alpha)
    torch.testing.assert_close(flex, eager, atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="FlexAttention backward needs CUDA")
def test_flex_attention_gradients_match_eager_on_cuda():
    query, key, value, elevation = (
        tensor.float().cuda() for tensor in _random_attention_inputs(torch.float32)
    )
    query = torch.nn.functional.pad(query, (0, 8))  # head_dim 16: FlexAttention's minimum
    key = torch.nn.functional.pad(key, (0, 8))
    value = torch.nn.functional.pad(value, (0, 8))
    results = {}
    for implementation in ("eager", "flex_attention"):
        alpha = torch.tensor(0.0, device="cuda", requires_grad=True)
        inputs = [tensor.clone().requires_grad_() for tensor in (query, key, value)]
        output = _call(implementation, *inputs, elevation, alpha)
        output.square().sum().backward()
        results[implementation] = (output, alpha.grad, *(tensor.grad for tensor in inputs))
    for flex, eager in zip(results["flex_attention"], results["eager"], strict=True):
        torch.testing.assert_close(flex, eager, atol=1e-4, rtol=1e-4)


def test_unknown_implementation_is_refused():
    query, key, value, elevation = _random_attention_inputs()
    with pytest.raises(ValueError, match="not supported"):
        _call("flash_attention_2", query, key, value, elevation, torch.tensor(1.0))


def test_model_with_flex_attention_matches_eager_on_cpu():
    model = _biased_model()
    model.set_attn_implementation("eager")
    batch = make_tiny_batch(model.config)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        eager = model(**batch).forecast
        model.set_attn_implementation("flex_attention")
        assert model.config._attn_implementation == "flex_attention"
        flex = model(**batch).forecast
    torch.testing.assert_close(flex, eager, atol=1e-6, rtol=1e-5)
