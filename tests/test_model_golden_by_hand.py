"""The biased attention block against a second implementation written differently.

The recorded goldens guard against change, not for correctness, and topoflow-base has no biased
block. Here a plain Python/numpy loop over heads and query tokens, following DESIGN's formula
B[i, j] = clamp(-alpha * ReLU((z_j - z_i) / H), -clamp_max, 0) (z_i the query's height), recomputes
the block from its own weights, with alpha large enough that the clamp is active.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from modeling_topoflow import TopoFlowAttention
from tests.fixtures_model import make_tiny_config


def _reference_block(attention: TopoFlowAttention, hidden: np.ndarray, heights: np.ndarray,
                     *, alpha: float, h_scale: float, clamp_max: float) -> np.ndarray:
    """Softmax attention with the elevation bias, one head and one query at a time."""
    w_qkv = attention.qkv.weight.detach().double().numpy()
    b_qkv = attention.qkv.bias.detach().double().numpy()
    w_proj = attention.proj.weight.detach().double().numpy()
    b_proj = attention.proj.bias.detach().double().numpy()
    batch, tokens, dim = hidden.shape
    heads = attention.num_heads
    head_dim = dim // heads
    out = np.zeros_like(hidden)
    for b in range(batch):
        qkv = hidden[b] @ w_qkv.T + b_qkv  # (N, 3 * dim): q | k | v, heads contiguous in each
        for h in range(heads):
            cols = slice(h * head_dim, (h + 1) * head_dim)
            q, k, v = qkv[:, cols], qkv[:, dim:][:, cols], qkv[:, 2 * dim:][:, cols]
            for i in range(tokens):
                logits = []
                for j in range(tokens):
                    rise = max(heights[b, j] - heights[b, i], 0.0) / h_scale
                    bias = min(max(-alpha * rise, -clamp_max), 0.0)
                    logits.append(float(q[i] @ k[j]) / math.sqrt(head_dim) + bias)
                weights = np.exp(np.array(logits) - max(logits))
                out[b, i, cols] = (weights / weights.sum()) @ v
        out[b] = out[b] @ w_proj.T + b_proj
    return out


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
@pytest.mark.parametrize("direction", ["downslope", "upslope"])
def test_biased_block_matches_a_loop_written_from_the_formula(implementation, direction):
    config = make_tiny_config(embed_dim=8, num_heads=2, elevation_bias_blocks=[0],
                              elevation_alpha_init=4.0, elevation_bias_direction=direction)
    config._attn_implementation = implementation
    torch.manual_seed(3)
    attention = TopoFlowAttention(config, layer_idx=0).double().eval()
    generator = torch.Generator().manual_seed(4)
    hidden = torch.randn(2, 6, 8, generator=generator, dtype=torch.float64)
    # Heights up to 4 km with a tie: alpha 4 makes rises above 2.5 km hit the clamp at 10.
    elevation = torch.tensor([[0.0, 4000.0, 1000.0, 1000.0, 2600.0, 300.0],
                              [3900.0, 0.0, 50.0, 2000.0, 2000.0, 100.0]], dtype=torch.float64)
    with torch.no_grad():
        result, _ = attention(hidden, elevation)  # (output, attention probabilities or None)
    result = result.numpy()
    heights = elevation.numpy() * (1.0 if direction == "downslope" else -1.0)
    expected = _reference_block(attention, hidden.numpy(), heights, alpha=4.0,
                                h_scale=config.elevation_scale,
                                clamp_max=config.elevation_bias_clamp)
    assert config.elevation_bias_clamp < 4.0 * 3900.0 / config.elevation_scale  # clamp active
    np.testing.assert_allclose(result, expected, rtol=1e-10, atol=1e-12)
