"""One learnable elevation_alpha per attention head (config.elevation_alpha_per_head)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import train_accelerate
from attention_topoflow import elevation_biased_attention, endpoint_rise, rise_biased_attention
from modeling_topoflow import TopoFlowForForecasting
from tests.fixtures_model import make_tiny_batch, make_tiny_config, model_for_arm


def test_each_head_gets_the_bias_of_its_own_alpha() -> None:
    """Per head, the materialized per-head bias equals the one-alpha kernel run with that head's
    alpha (an independent path: the per-token-height formula)."""
    generator = torch.Generator().manual_seed(0)
    query, key, value = (torch.randn(2, 4, 24, 8, generator=generator) for _ in range(3))
    heights = torch.rand(2, 24, generator=generator) * 3000.0
    alphas = torch.tensor([0.0, 1.5, 4.0, 0.3])
    h_scale = torch.tensor(1000.0)
    per_head = rise_biased_attention(query, key, value, rise_m=endpoint_rise(heights), alpha=alphas,
                                     h_scale=h_scale, clamp_max=10.0, implementation="sdpa")
    for head, alpha in enumerate(alphas):
        one = elevation_biased_attention(
            query[:, head:head + 1], key[:, head:head + 1], value[:, head:head + 1],
            elevation_m=heights, alpha=alpha, h_scale=h_scale, clamp_max=10.0,
            implementation="eager")  # fmt: skip
        torch.testing.assert_close(per_head[:, head:head + 1], one, atol=1e-5, rtol=1e-5)


def _model(alpha: float = 0.0, **overrides: object) -> TopoFlowForForecasting:
    torch.manual_seed(0)
    return TopoFlowForForecasting(make_tiny_config(
        elevation_bias_blocks=[0], elevation_alpha_init=alpha, elevation_alpha_per_head=True,
        elevation_bias_direction="upslope", **overrides)).eval()  # fmt: skip


def _encode(model: TopoFlowForForecasting, batch: dict) -> torch.Tensor:
    with torch.no_grad():
        return model.topoflow(batch["fields"], batch["lead_time_hours"]).last_hidden_state


def test_per_head_alphas_equal_to_one_value_are_the_one_alpha_model() -> None:
    per_head = _model(2.0)
    alpha = per_head.topoflow.blocks[0].attn.elevation_alpha
    assert alpha.shape == (per_head.config.num_heads,) and torch.all(alpha == 2.0)
    torch.manual_seed(0)
    shared = TopoFlowForForecasting(make_tiny_config(
        elevation_bias_blocks=[0], elevation_alpha_init=2.0,
        elevation_bias_direction="upslope")).eval()  # fmt: skip
    state = {k: v for k, v in shared.state_dict().items() if not k.endswith("elevation_alpha")}
    per_head.load_state_dict(state, strict=False)
    batch = make_tiny_batch(shared.config, batch_size=2)
    torch.testing.assert_close(_encode(per_head, batch), _encode(shared, batch),
                               atol=1e-5, rtol=1e-5)
    # One head's alpha moves the output; the others' stay where they were.
    alpha.data[1] = 6.0
    assert (_encode(per_head, batch) - _encode(shared, batch)).abs().max() > 1e-3


def test_per_head_bias_is_the_same_in_every_implementation_and_trains_per_head() -> None:
    batch = make_tiny_batch(make_tiny_config(), batch_size=2)
    outputs = {}
    for implementation in ("eager", "sdpa", "flex_attention"):
        model = _model(1.0)
        model.topoflow.blocks[0].attn.elevation_alpha.data = torch.tensor([0.0, 1.0, 3.0, 6.0])
        model.set_attn_implementation(implementation)
        outputs[implementation] = _encode(model, batch)
    torch.testing.assert_close(outputs["sdpa"], outputs["eager"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(outputs["flex_attention"], outputs["eager"], atol=1e-5, rtol=1e-5)
    model = _model(0.0).train()
    model(**{k: batch[k] for k in ("fields", "lead_time_hours", "labels")}).loss.backward()
    grad = model.topoflow.blocks[0].attn.elevation_alpha.grad
    assert grad.shape == (4,) and (grad != 0).all() and len(set(grad.tolist())) == 4


def test_per_head_alphas_are_saved_logged_and_refused_when_malformed(tmp_path: Path) -> None:
    model = _model(0.5)
    model.topoflow.blocks[0].attn.elevation_alpha.data = torch.tensor([0.0, 1.0, 2.0, 3.0])
    assert train_accelerate.elevation_alphas(model) == {"0": 1.5}
    assert train_accelerate.elevation_alphas(model, per_head=True) == {"0": [0.0, 1.0, 2.0, 3.0]}
    model.save_pretrained(tmp_path)
    loaded = TopoFlowForForecasting.from_pretrained(tmp_path)
    assert loaded.topoflow.blocks[0].attn.elevation_alpha.tolist() == [0.0, 1.0, 2.0, 3.0]
    with pytest.raises(ValueError, match="elevation_alpha_per_head"):
        make_tiny_config(elevation_alpha_per_head="yes")


def test_the_per_head_arm_reaches_the_model_config(synthetic_corpus: Path, tmp_path: Path) -> None:
    for arm, expected in (("upslope-heads", True), ("upslope", False),
                          ("x:blocks=0;per_head=true", True)):
        model = model_for_arm(arm, synthetic_corpus, tmp_path)
        assert model.config.elevation_alpha_per_head is expected
        shape = model.topoflow.blocks[0].attn.elevation_alpha.shape
        assert shape == ((2,) if expected else ())
