"""The attention implementations compared where they could disagree: an active clamp, a negative
alpha, tied heights, and gradients at a nonzero alpha.

Inputs where every bias stays far inside the clamp let a kernel that forgets the clamp pass; these
inputs make the clamp change the answer (checked first, so the comparison means something).
"""

from __future__ import annotations

import warnings

import pytest
import torch

from modeling_topoflow import (
    elevation_bias_matrix,
    elevation_biased_attention,
    sorted_elevation_attention,
)

CLAMP_MAX = 10.0
H_SCALE = torch.tensor(1000.0)


def _inputs(dtype: torch.dtype = torch.float64, *, tied: bool = False, head_dim: int = 8):
    generator = torch.Generator().manual_seed(7)
    query, key, value = (
        torch.randn(2, 2, 20, head_dim, generator=generator, dtype=dtype) for _ in range(3)
    )
    if tied:  # three terraces: many exactly equal heights, where ReLU sits at its kink
        elevation = torch.randint(0, 3, (2, 20), generator=generator).to(dtype) * 1500.0
    else:
        elevation = torch.rand(2, 20, generator=generator, dtype=dtype) * 5000.0
    return query, key, value, elevation


def _attention(implementation: str, query, key, value, elevation, alpha):
    if implementation == "sdpa":
        # The sdpa path itself, with its small-problem shortcut (materialize the bias, as eager
        # does) switched off, so these small inputs reach the sorted fused kernels.
        return sorted_elevation_attention(
            query, key, value, elevation_m=elevation, alpha=alpha, h_scale=H_SCALE,
            clamp_max=CLAMP_MAX, small_problem_elements=0,
        )  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # flex_attention "called without torch.compile" on CPU
        return elevation_biased_attention(
            query, key, value, elevation_m=elevation, alpha=alpha, h_scale=H_SCALE,
            clamp_max=CLAMP_MAX, implementation=implementation,
        )  # fmt: skip


def _clamp_changes_the_bias(elevation: torch.Tensor, alpha: float) -> bool:
    clamped = elevation_bias_matrix(elevation, alpha=torch.tensor(alpha), h_scale=H_SCALE,
                                    clamp_max=CLAMP_MAX)
    rise = (elevation[:, None, :] - elevation[:, :, None]) / H_SCALE  # key minus query height
    unclamped = -alpha * torch.relu(rise)
    return not torch.equal(clamped, unclamped)


@pytest.mark.parametrize("alpha", [6.0, -1.0])
@pytest.mark.parametrize("implementation", ["sdpa", "flex_attention"])
def test_kernels_match_eager_where_the_clamp_is_active(implementation, alpha):
    # alpha 6 over 5000 m: biases up to 30 logits, clamped at 10. alpha -1: the clamp at 0 zeroes
    # every bias (plain attention), where the unclamped bias would favour uphill keys.
    query, key, value, elevation = _inputs()
    assert _clamp_changes_the_bias(elevation, alpha)
    alpha_tensor = torch.tensor(alpha, dtype=torch.float64)
    with torch.no_grad():
        expected = _attention("eager", query, key, value, elevation, alpha_tensor)
        result = _attention(implementation, query, key, value, elevation, alpha_tensor)
    torch.testing.assert_close(result, expected, atol=1e-6, rtol=1e-6)


def test_eager_clamp_golden_by_hand():
    # One query at 0 m, keys at 0 m and 20 km, alpha 1, H 1 km: the uphill bias is -20 clamped to
    # -10, so the weights are softmax([0, -10]) and the output is their mix of values 0 and 1.
    query = torch.zeros(1, 1, 2, 1, dtype=torch.float64)
    key = torch.zeros(1, 1, 2, 1, dtype=torch.float64)
    value = torch.tensor([0.0, 1.0], dtype=torch.float64).reshape(1, 1, 2, 1)
    elevation = torch.tensor([[0.0, 20_000.0]], dtype=torch.float64)
    for implementation in ("eager", "sdpa", "flex_attention"):
        output = _attention(implementation, query, key, value, elevation, torch.tensor(1.0))
        expected = torch.exp(torch.tensor(-10.0)) / (1 + torch.exp(torch.tensor(-10.0)))
        assert output[0, 0, 0, 0].item() == pytest.approx(expected.item(), rel=1e-6), implementation
        # the 20 km key looks downhill: no bias, plain mean of the two values
        assert output[0, 0, 1, 0].item() == pytest.approx(0.5, rel=1e-6), implementation


@pytest.mark.parametrize("alpha", [0.0, 1.5, 6.0])
def test_sdpa_gradients_match_eager_with_tied_heights(alpha):
    # Tied heights put rises exactly at 0 (ReLU's kink); alpha 6 makes the clamp active. Gradients
    # into q, k, v and alpha must agree.
    query, key, value, elevation = _inputs(tied=True)
    results = {}
    for implementation in ("eager", "sdpa"):
        alpha_tensor = torch.tensor(alpha, dtype=torch.float64, requires_grad=True)
        inputs = [tensor.clone().requires_grad_() for tensor in (query, key, value)]
        output = _attention(implementation, *inputs, elevation, alpha_tensor)
        (output * torch.linspace(-1, 1, output.shape[-1], dtype=output.dtype)).sum().backward()
        results[implementation] = (output, alpha_tensor.grad, *(t.grad for t in inputs))
    for name, sdpa, eager in zip(("output", "alpha", "q", "k", "v"), results["sdpa"],
                                 results["eager"], strict=True):
        torch.testing.assert_close(sdpa, eager, atol=1e-8, rtol=1e-7, msg=name)
    assert alpha == 0.0 or results["eager"][1].abs().item() > 0  # alpha really gets a gradient


@pytest.mark.skipif(not torch.cuda.is_available(), reason="FlexAttention backward needs CUDA")
@pytest.mark.parametrize("alpha", [1.5, 6.0])
def test_flex_gradients_match_eager_at_nonzero_alpha_on_cuda(alpha):
    query, key, value, elevation = (t.float().cuda() for t in _inputs(torch.float32, head_dim=16))
    results = {}
    for implementation in ("eager", "flex_attention"):
        alpha_tensor = torch.tensor(alpha, device="cuda", requires_grad=True)
        inputs = [tensor.clone().requires_grad_() for tensor in (query, key, value)]
        output = _attention(implementation, *inputs, elevation, alpha_tensor)
        output.square().sum().backward()
        results[implementation] = (output, alpha_tensor.grad, *(t.grad for t in inputs))
    for name, flex, eager in zip(("output", "alpha", "q", "k", "v"), results["flex_attention"],
                                 results["eager"], strict=True):
        torch.testing.assert_close(flex, eager, atol=1e-4, rtol=1e-4, msg=name)
