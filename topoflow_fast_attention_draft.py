"""Exact elevation-biased attention in O(N) memory, at about the cost of plain fused attention.

The bias of DESIGN.md section 3, shared by all heads and added to the logits q.k/sqrt(d),

    B[b, i, j] = clamp(-alpha * relu((z[b, j] - z[b, i]) / H), -clamp_max, 0)    (i query, j key)

has exact structure once the tokens are sorted by elevation z. With u = alpha * z / H and the clamp
inactive (alpha >= 0, H > 0, alpha * (max z - min z) / H <= clamp_max), a key ranked at or below
its query costs nothing and a key ranked above costs u_i - u_j. Sorting tokens by *descending* z
turns the biased keys into a causal pattern (rank j <= rank i; the diagonal and tied heights get
u_i - u_j = 0, which is still exact), and the unbiased keys into a strictly causal pattern in the
ascending order. So biased attention is two causal calls of the fused kernel, merged by their
log-sum-exp:

    part B (descending order, causal, diagonal included): logits s_ij - u_j, key-only bias given
        to the kernel as a broadcast (B, 1, 1, N) mask; +u_i is constant per row, so it is added to
        part B's log-sum-exp afterwards instead of to every logit.
    part A (ascending order, strictly causal): plain logits s_ij.

The backward calls the fused backward kernel of each part with the *merged* output and
log-sum-exp (each part's probabilities are then the merged softmax's), and sums the gradients.
u's gradient needs, per token, the row sum over its biased keys and the column sum over the
queries that see it as a biased key of dL/dlogit: the row sum follows from the forward's part-B
output, the column sum comes out of the key gradient of one extra head dimension (query 1, key 0)
that leaves the logits unchanged. Autograd carries u's gradient on to alpha (and to z or H if they
require grad).

Outside the exact range of the decomposition, or with attention dropout, a chunked path over
query blocks applies the clamp and the dropout exactly with O(N * block) memory.

Only torch is imported: the coordinator folds this file into modeling_topoflow.py.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

__all__ = [
    "chunked_elevation_attention",
    "clamp_is_inactive",
    "eager_elevation_attention",
    "elevation_bias_block",
    "sorted_elevation_attention",
]

# Logit elements (batch x heads x queries x keys) of one query block of the chunked fallback;
# 2**24 float32 logits are 64 MiB.
_CHUNK_LOGIT_ELEMENTS = 2**24


def elevation_bias_block(
    query_elevation_m: torch.Tensor,
    key_elevation_m: torch.Tensor,
    *,
    alpha: torch.Tensor,
    h_scale: torch.Tensor,
    clamp_max: float,
) -> torch.Tensor:
    """The bias between some queries and some keys: (B, Nq) and (B, Nk) metres -> (B, Nq, Nk)."""
    rise = (key_elevation_m[:, None, :] - query_elevation_m[:, :, None]) / h_scale  # (B, Nq, Nk)
    return torch.clamp(-alpha * torch.relu(rise), min=-clamp_max, max=0.0)


def _softmax_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    bias: torch.Tensor,
    dropout_p: float,
) -> torch.Tensor:
    """Eager softmax(q.k/sqrt(d) + bias) v with dropout on the probabilities; bias (B, Nq, Nk)."""
    logits = query @ key.transpose(-2, -1) / math.sqrt(query.shape[-1])  # (B, h, Nq, Nk)
    probabilities = torch.softmax(logits + bias[:, None].to(logits.dtype), dim=-1)
    if dropout_p > 0:
        probabilities = F.dropout(probabilities, p=dropout_p, training=True)
    return probabilities @ value


def eager_elevation_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    elevation_m: torch.Tensor,
    alpha: torch.Tensor,
    h_scale: torch.Tensor,
    clamp_max: float,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """Reference: materializes the (B, N, N) bias. For tests and small N only."""
    bias = elevation_bias_block(
        elevation_m, elevation_m, alpha=alpha, h_scale=h_scale, clamp_max=clamp_max
    )
    return _softmax_attention(query, key, value, bias, dropout_p)


def chunked_elevation_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    elevation_m: torch.Tensor,
    alpha: torch.Tensor,
    h_scale: torch.Tensor,
    clamp_max: float,
    dropout_p: float = 0.0,
    block_size: int | None = None,
) -> torch.Tensor:
    """Exact for every alpha, H and clamp, with dropout: eager math one query block at a time.

    Each block is checkpointed, so training keeps only the block outputs and recomputes the
    (B, heads, block, N) probabilities in the backward (the checkpoint replays the dropout mask
    from the saved RNG state). Memory O(N * block), time about that of SDPA's math kernel.
    """
    batch, heads, length, _ = query.shape
    if block_size is None:
        block_size = max(16, _CHUNK_LOGIT_ELEMENTS // max(1, batch * heads * length))
    needs_graph = torch.is_grad_enabled() and any(
        tensor.requires_grad for tensor in (query, key, value, elevation_m, alpha, h_scale)
    )
    blocks = []
    for start in range(0, length, block_size):
        stop = min(start + block_size, length)
        arguments = (query[:, :, start:stop], key, value, elevation_m[:, start:stop], elevation_m,
                     alpha, h_scale, clamp_max, dropout_p)  # fmt: skip
        if needs_graph:
            blocks.append(checkpoint(_chunk, *arguments, use_reentrant=False))
        else:
            blocks.append(_chunk(*arguments))
    return torch.cat(blocks, dim=2)


def _chunk(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    query_elevation_m: torch.Tensor,
    key_elevation_m: torch.Tensor,
    alpha: torch.Tensor,
    h_scale: torch.Tensor,
    clamp_max: float,
    dropout_p: float,
) -> torch.Tensor:
    bias = elevation_bias_block(
        query_elevation_m, key_elevation_m, alpha=alpha, h_scale=h_scale, clamp_max=clamp_max
    )
    return _softmax_attention(query, key, value, bias, dropout_p)


def clamp_is_inactive(
    elevation_m: torch.Tensor,
    *,
    alpha: torch.Tensor | float,
    h_scale: torch.Tensor | float,
    clamp_max: float,
) -> bool:
    """True when the clamp changes no bias value, so the sorted decomposition is exact.

    That needs alpha >= 0 (for alpha < 0 the clamp at 0 zeroes the whole bias), H > 0, and the
    largest bias magnitude alpha * (max z - min z) / H of every sample within clamp_max (at equality
    the clamp is the identity and passes gradients, as torch.clamp does). Reads alpha: one device
    synchronization per call on GPU.
    """
    alpha_value = float(alpha.detach()) if isinstance(alpha, torch.Tensor) else float(alpha)
    h_value = float(h_scale.detach()) if isinstance(h_scale, torch.Tensor) else float(h_scale)
    if not (alpha_value >= 0 and h_value > 0 and math.isfinite(alpha_value)):
        return False
    if elevation_m.numel() == 0 or alpha_value == 0:
        return True
    detached = elevation_m.detach()
    height_range = float((detached.amax(dim=-1) - detached.amin(dim=-1)).max())
    return alpha_value * height_range / h_value <= clamp_max


def sorted_elevation_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    elevation_m: torch.Tensor,
    alpha: torch.Tensor,
    h_scale: torch.Tensor,
    clamp_max: float,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """Elevation-biased attention, exact, O(N) memory; (B, heads, N, head_dim) in and out.

    elevation_m: (B, N) metres per token; alpha, h_scale: 0-dim tensors (or floats). Uses the
    sorted-token fused kernels when the clamp is inactive and dropout_p == 0, else the chunked
    exact path (see the module docstring).
    """
    _check_shapes(query, key, value, elevation_m)
    if dropout_p > 0 or not clamp_is_inactive(
        elevation_m, alpha=alpha, h_scale=h_scale, clamp_max=clamp_max
    ):
        return chunked_elevation_attention(
            query, key, value, elevation_m=elevation_m, alpha=alpha, h_scale=h_scale,
            clamp_max=clamp_max, dropout_p=dropout_p,
        )  # fmt: skip
    bias_dtype = torch.promote_types(query.dtype, torch.float32)
    heights = elevation_m.to(bias_dtype)
    # Measuring u from each sample's lowest token keeps u in [0, clamp_max]; only differences of u
    # enter the logits, so the offset changes nothing but the rounding.
    token_bias = alpha.to(bias_dtype) * (heights - heights.amin(dim=-1, keepdim=True)) / h_scale
    with torch.no_grad():
        order = torch.argsort(heights, dim=-1, descending=True, stable=True)  # (B, N)
    return _SortedElevationAttention.apply(query, key, value, token_bias, order)


def _check_shapes(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, elevation_m: torch.Tensor
) -> None:
    if query.dim() != 4 or key.shape != query.shape or value.shape != query.shape:
        raise ValueError(
            "sorted_elevation_attention expects query, key and value of one shape (B, heads, N, "
            f"head_dim); got query {tuple(query.shape)}, key {tuple(key.shape)}, "
            f"value {tuple(value.shape)}."
        )
    batch, _, length, _ = query.shape
    if tuple(elevation_m.shape) != (batch, length):
        raise ValueError(
            f"elevation_m must be (B, N) = ({batch}, {length}) metres per token; "
            f"got {tuple(elevation_m.shape)}."
        )


def _take_tokens(tokens: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """(B, h, N, d) reordered along N by order (B, N): out[:, :, r] = tokens[:, :, order[r]]."""
    index = order[:, None, :, None].expand(-1, tokens.shape[1], -1, tokens.shape[3])
    return torch.gather(tokens, 2, index)


def _put_tokens(sorted_tokens: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """Inverse of _take_tokens: out[:, :, order[r]] = sorted_tokens[:, :, r]."""
    index = order[:, None, :, None].expand(-1, sorted_tokens.shape[1], -1, sorted_tokens.shape[3])
    return torch.empty_like(sorted_tokens).scatter_(2, index, sorted_tokens)


def _with_extra_dim(tokens: torch.Tensor, fill: float) -> torch.Tensor:
    """(B, h, N, d) -> (B, h, N, d + 1) with the new last column set to fill."""
    extended = tokens.new_empty(*tokens.shape[:-1], tokens.shape[-1] + 1)
    extended[..., :-1] = tokens
    extended[..., -1] = fill
    return extended


def _fused_forward(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    key_bias: torch.Tensor | None,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal fused attention (key j <= query i): (out (B, h, N, d), log-sum-exp (B, h, N))."""
    if query.device.type == "cpu":
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            query, key, value, 0.0, True, attn_mask=key_bias, scale=scale
        )
    raise NotImplementedError(
        f"sorted_elevation_attention has no fused kernel for device {query.device}; "
        "use chunked_elevation_attention."
    )


def _fused_backward(
    grad_out: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    out: torch.Tensor,
    logsumexp: torch.Tensor,
    *,
    key_bias: torch.Tensor | None,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward of _fused_forward given any (out, log-sum-exp): (grad q, grad k, grad v)."""
    if query.device.type == "cpu":
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            grad_out, query, key, value, out, logsumexp, 0.0, True, attn_mask=key_bias,
            scale=scale,
        )  # fmt: skip
    raise NotImplementedError(
        f"sorted_elevation_attention has no fused kernel for device {query.device}."
    )


def _merge_parts(
    out_b: torch.Tensor, lse_b: torch.Tensor, out_a: torch.Tensor, lse_a: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax over the union of two disjoint key sets from each part's normalized output and LSE.

    Part A covers rows 0..N-2 only (the lowest token has no key strictly below it).
    """
    lse = lse_b.clone()
    lse[..., :-1] = torch.logaddexp(lse_b[..., :-1], lse_a)
    merged = out_b.to(lse.dtype) * torch.exp(lse_b - lse)[..., None]
    merged[..., :-1, :] += out_a.to(lse.dtype) * torch.exp(lse_a - lse[..., :-1])[..., None]
    return merged.to(out_b.dtype), lse


class _SortedElevationAttention(torch.autograd.Function):
    """Attention with logits q.k/sqrt(d) + (u_i - u_j if z_j > z_i else 0); see the module doc.

    Inputs: query/key/value (B, h, N, d), token_bias u (B, N), order (B, N) = tokens by descending
    elevation. Working tensors are in that descending order ("down"); "up" is its reverse.
    """

    @staticmethod
    def forward(ctx, query, key, value, token_bias, order):  # noqa: ANN001, ANN205
        scale = query.shape[-1] ** -0.5
        q_down, k_down, v_down = (_take_tokens(t, order) for t in (query, key, value))
        u_down = token_bias.gather(1, order)  # (B, N)
        key_bias = (-u_down).to(query.dtype)[:, None, None, :]  # (B, 1, 1, N)
        out_b, lse_b = _fused_forward(q_down, k_down, v_down, key_bias=key_bias, scale=scale)
        lse_b = lse_b + u_down[:, None, :].to(lse_b.dtype)  # the +u_i of every part-B logit
        out, lse = out_b, lse_b
        if query.shape[2] > 1:
            q_up, k_up, v_up = (t.flip(2) for t in (q_down, k_down, v_down))
            out_a, lse_a = _fused_forward(
                q_up[:, :, 1:], k_up[:, :, :-1], v_up[:, :, :-1], key_bias=None, scale=scale
            )
            # Ascending ranks 1..N-1 are descending positions N-2..0.
            out, lse = _merge_parts(out_b, lse_b, out_a.flip(2), lse_a.flip(-1))
        ctx.save_for_backward(q_down, k_down, v_down, u_down, order, out, lse, out_b, lse_b)
        ctx.scale = scale
        return _put_tokens(out, order)

    @staticmethod
    def backward(ctx, grad_output):  # noqa: ANN001, ANN205
        q_down, k_down, v_down, u_down, order, out, lse, out_b, lse_b = ctx.saved_tensors
        scale = ctx.scale
        g_down = _take_tokens(grad_output.contiguous(), order)
        key_bias = (-u_down).to(q_down.dtype)[:, None, None, :]
        # Part B through one extra head dimension, query 1 and key 0: the logits do not change and
        # grad_key[..., -1] = scale * sum_i dL/dlogit_ij, the column sums that u_j's gradient needs.
        dq_x, dk_x, dv_x = _fused_backward(
            _with_extra_dim(g_down, 0.0), _with_extra_dim(q_down, 1.0),
            _with_extra_dim(k_down, 0.0), _with_extra_dim(v_down, 0.0),
            _with_extra_dim(out, 0.0), lse - u_down[:, None, :].to(lse.dtype),
            key_bias=key_bias, scale=scale,
        )  # fmt: skip
        column_sum = dk_x[..., -1].to(lse.dtype).sum(dim=1) / scale  # (B, N)
        dq, dk, dv = dq_x[..., :-1], dk_x[..., :-1], dv_x[..., :-1]
        if q_down.shape[2] > 1:
            q_up, k_up, v_up, g_up, o_up = (
                t.flip(2) for t in (q_down, k_down, v_down, g_down, out)
            )
            dq_a, dk_a, dv_a = _fused_backward(
                g_up[:, :, 1:], q_up[:, :, 1:], k_up[:, :, :-1], v_up[:, :, :-1], o_up[:, :, 1:],
                lse.flip(-1)[..., 1:], key_bias=None, scale=scale,
            )  # fmt: skip
            dq[:, :, :-1] += dq_a.flip(2)
            dk[:, :, 1:] += dk_a.flip(2)
            dv[:, :, 1:] += dv_a.flip(2)
        # Row sums over part B: sum_j P_ij (dO_i.v_j - D_i) = w_i (dO_i.out_b_i - D_i), where
        # w_i = exp(lse_b_i - lse_i) is part B's share of row i and D_i = dO_i.out_i.
        g_wide = g_down.to(lse.dtype)
        delta = (g_wide * out.to(lse.dtype)).sum(-1)
        row_sum = torch.exp(lse_b - lse) * ((g_wide * out_b.to(lse.dtype)).sum(-1) - delta)
        du_down = row_sum.sum(dim=1) - column_sum  # (B, N)
        du = torch.empty_like(du_down).scatter_(1, order, du_down)
        return (
            _put_tokens(dq, order), _put_tokens(dk, order), _put_tokens(dv, order),
            du.to(u_down.dtype), None,
        )  # fmt: skip
