"""The dense elevation-biased attention (short sequences, issue 17) equals the eager reference.

fp64 where exactness is claimed: outputs and the gradients of q, k, v, alpha, and of the heights
and H_scale when they require grad, within 1e-12 of the eager path, tied heights, the
clamp-active case and alpha < 0 included.
"""

from __future__ import annotations

import pytest
import torch

import attention_topoflow
from attention_topoflow import (
    dense_elevation_attention,
    eager_elevation_attention,
    elevation_biased_attention,
    prefers_dense_path,
)
from tests.test_fast_attention import (
    CLAMP_MAX,
    H_SCALE_M,
    _assert_all_close,
    _heights,
    _inputs,
    _largest_allocation_bytes,
    _run,
)


def _run_with_height_grads(function, tensors, heights, alpha_value) -> list[torch.Tensor]:
    """Output and the grads of q, k, v, alpha, heights and H_scale on fresh leaves."""
    query, key, value, grad_out = (t.clone().requires_grad_(i < 3) for i, t in enumerate(tensors))
    alpha = torch.tensor(alpha_value, dtype=query.dtype, requires_grad=True)
    h_scale = torch.tensor(H_SCALE_M, dtype=query.dtype, requires_grad=True)
    elevation = heights.to(query.dtype).clone().requires_grad_(True)
    out = function(
        query, key, value, elevation_m=elevation, alpha=alpha, h_scale=h_scale,
        clamp_max=CLAMP_MAX,
    )  # fmt: skip
    out.backward(grad_out)
    grads = [query.grad, key.grad, value.grad, alpha.grad, elevation.grad, h_scale.grad]
    return [out.detach(), *grads]


# 2.0 and 0.7 keep the clamp inactive for 4000 m of relief, 5.0 makes it active (20 > 10), and
# below 0 the clamp at 0 zeroes the bias and alpha's gradient.
@pytest.mark.parametrize("alpha_value", [2.0, 0.7, 0.0, 5.0, -0.5])
def test_dense_path_matches_eager_in_fp64(alpha_value: float) -> None:
    tensors = _inputs(3, 2, 61, 8, seed=1)
    heights = _heights(3, 61, seed=2)
    reference = _run_with_height_grads(eager_elevation_attention, tensors, heights, alpha_value)
    dense = _run_with_height_grads(dense_elevation_attention, tensors, heights, alpha_value)
    names = ["out", "dq", "dk", "dv", "dalpha", "dheights", "dH"]
    for name, got, want in zip(names, dense, reference, strict=True):
        difference = float((got - want).abs().max())
        assert difference <= 1e-12, f"{name}: max |diff| {difference:.3e}"
    if alpha_value < 0:
        assert float(dense[4]) == 0.0


def test_query_blocks_give_the_same_result(monkeypatch: pytest.MonkeyPatch) -> None:
    tensors = _inputs(2, 3, 50, 8, seed=3)
    heights = _heights(2, 50, seed=4)
    reference = _run(eager_elevation_attention, tensors, heights, 1.5)
    # 7-row forward blocks and 2-row backward blocks, neither dividing N = 50.
    monkeypatch.setattr(attention_topoflow, "_DENSE_FORWARD_ELEMENTS", 2 * 50 * 7)
    monkeypatch.setattr(attention_topoflow, "_DENSE_BACKWARD_ELEMENTS", 2 * 3 * 50 * 2)
    _assert_all_close(_run(dense_elevation_attention, tensors, heights, 1.5), reference, 1e-12)


@pytest.mark.parametrize("length", [1, 2, 3])
def test_tiny_sequences(length: int) -> None:
    tensors = _inputs(2, 2, length, 4, seed=5)
    heights = _heights(2, length, seed=6)
    reference = _run(eager_elevation_attention, tensors, heights, 2.0)
    _assert_all_close(_run(dense_elevation_attention, tensors, heights, 2.0), reference, 1e-12)


def test_inference_without_grad_matches_eager() -> None:
    query, key, value, _ = _inputs(2, 2, 33, 8, seed=7)
    heights = _heights(2, 33, seed=8)
    arguments = dict(elevation_m=heights, alpha=torch.tensor(2.0, dtype=torch.float64),
                     h_scale=torch.tensor(H_SCALE_M, dtype=torch.float64), clamp_max=CLAMP_MAX)
    with torch.no_grad():
        dense = dense_elevation_attention(query, key, value, **arguments)
        eager = eager_elevation_attention(query, key, value, **arguments)
    assert float((dense - eager).abs().max()) <= 1e-12


def test_bfloat16_error_comparable_to_eager_in_bfloat16() -> None:
    tensors = _inputs(2, 2, 64, 16, seed=9)
    heights = _heights(2, 64, seed=10)
    reference = _run(eager_elevation_attention, tensors, heights, 2.0)
    half = [t.bfloat16() for t in tensors]
    dense = _run(dense_elevation_attention, half, heights, 2.0)
    eager = _run(eager_elevation_attention, half, heights, 2.0)
    for got, baseline, want in zip(dense, eager, reference, strict=True):
        assert got.dtype == torch.bfloat16 or got.dim() == 0
        dense_error = float((got.double() - want).abs().max())
        eager_error = float((baseline.double() - want).abs().max())
        assert dense_error <= max(3 * eager_error, 2e-2)


def test_memory_stays_within_the_block_budget() -> None:
    length = 4096
    quadratic = length * length * 4  # one fp32 N x N matrix: 64 MiB
    # Forward mask blocks and backward logit blocks each hold at most this many fp32 elements, so
    # the largest allocation stays a quarter of one N x N matrix here, whatever N.
    budget = 4 * max(attention_topoflow._DENSE_BACKWARD_ELEMENTS,
                     attention_topoflow._DENSE_FORWARD_ELEMENTS)  # fmt: skip
    largest = _largest_allocation_bytes(dense_elevation_attention, length)
    assert largest <= budget < quadratic


def test_sdpa_takes_the_dense_path_where_it_measured_faster(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def query(batch: int, heads: int, length: int, head_dim: int) -> torch.Tensor:
        return torch.empty(batch, heads, length, head_dim)

    assert prefers_dense_path(query(8, 8, 512, 96), dropout_p=0.0)
    assert not prefers_dense_path(query(8, 8, 512, 96), dropout_p=0.1)
    assert not prefers_dense_path(query(8, 8, 1024, 96), dropout_p=0.0)  # sorted wins
    assert not prefers_dense_path(query(8, 4, 512, 16), dropout_p=0.0)  # small head dim
    assert not prefers_dense_path(query(8, 8, 128, 96), dropout_p=0.0)  # materialized shortcut
    assert not prefers_dense_path(query(8, 8, 512, 96).to("meta"), dropout_p=0.0)

    # And the model's entry point then agrees with eager (small sizes: shortcut switched off).
    monkeypatch.setattr(attention_topoflow, "_SMALL_PROBLEM_ELEMENTS", 0)
    tensors = _inputs(2, 2, 40, 32, seed=11)
    heights = _heights(2, 40, seed=12)
    assert prefers_dense_path(tensors[0], dropout_p=0.0)
    reference = _run(eager_elevation_attention, tensors, heights, 2.0)
    sdpa = _run(elevation_biased_attention, tensors, heights, 2.0, implementation="sdpa")
    _assert_all_close(sdpa, reference, 1e-12)


def test_errors_name_the_argument() -> None:
    query, key, value, _ = _inputs(1, 2, 8, 4, seed=13)
    arguments = dict(alpha=torch.tensor(1.0), h_scale=torch.tensor(H_SCALE_M), clamp_max=CLAMP_MAX)
    with pytest.raises(ValueError, match="elevation_m"):
        dense_elevation_attention(query, key, value, elevation_m=torch.zeros(1, 7), **arguments)
    meta = [t.to("meta") for t in (query, key, value)]
    with pytest.raises(ValueError, match="CPU"):
        dense_elevation_attention(*meta, elevation_m=torch.zeros(1, 8, device="meta"),
                                  **arguments)  # fmt: skip
