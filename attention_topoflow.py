"""Elevation-biased attention kernels of TopoFlow: the bias formula, the eager reference, the exact
O(N)-memory sorted-token kernel, the chunked fallback and FlexAttention.

`modeling_topoflow.py` calls `elevation_biased_attention` and `plain_attention`; everything else
here serves them. Hub remote code: imports torch only, and `save_pretrained` copies this file
beside `modeling_topoflow.py` (transformers' remote-code loader follows its relative import).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable
from torch.utils.checkpoint import checkpoint

__all__ = [
    "ATTENTION_IMPLEMENTATIONS",
    "chunked_elevation_attention",
    "clamp_is_inactive",
    "eager_elevation_attention",
    "elevation_bias_between",
    "elevation_bias_matrix",
    "elevation_biased_attention",
    "oriented_elevation",
    "plain_attention",
    "sorted_elevation_attention",
]

# transformers' names for the attention kernels this model implements.
ATTENTION_IMPLEMENTATIONS = ("eager", "sdpa", "flex_attention")


def elevation_bias_between(
    query_elevation_m: torch.Tensor,
    key_elevation_m: torch.Tensor,
    *,
    alpha: torch.Tensor | float,
    h_scale: torch.Tensor | float,
    clamp_max: float,
) -> torch.Tensor:
    """The elevation bias between queries and keys: (B, Nq), (B, Nk) metres -> (B, Nq, Nk).

    B[b, i, j] = clamp(-alpha * ReLU((z_j - z_i) / H_scale), -clamp_max, 0): i is the query
    (receiver) and j the key (source), so attending to a higher source is penalized. Computed in at
    least float32 (bf16 heights would round 1000 m steps), in float64 for float64 inputs.
    """
    dtype = torch.promote_types(query_elevation_m.dtype, torch.float32)
    alpha = torch.as_tensor(alpha, dtype=dtype, device=query_elevation_m.device)
    h_scale = torch.as_tensor(h_scale, dtype=dtype, device=query_elevation_m.device)
    rise = key_elevation_m.to(dtype)[:, None, :] - query_elevation_m.to(dtype)[:, :, None]
    rise = rise / h_scale
    return torch.clamp(-alpha * torch.relu(rise), min=-clamp_max, max=0.0)  # (B, Nq, Nk)


def oriented_elevation(elevation_m: torch.Tensor, direction: str) -> torch.Tensor:
    """The heights the bias formula is applied to: z for "downslope", -z for "upslope".

    ReLU((-z_j) - (-z_i)) = ReLU(z_i - z_j), so negating the heights turns the penalty on higher
    sources into one on lower sources, and every kernel (eager, sorted, flex) serves both
    directions unchanged.
    """
    if direction == "downslope":
        return elevation_m
    if direction == "upslope":
        return -elevation_m
    raise ValueError(
        f"elevation_bias_direction must be 'downslope' or 'upslope', got {direction!r}"
    )


def elevation_bias_matrix(
    elevation_m: torch.Tensor,
    *,
    alpha: torch.Tensor | float,
    h_scale: torch.Tensor | float,
    clamp_max: float,
) -> torch.Tensor:
    """The (B, N, N) elevation bias among the tokens of `elevation_m` (B, N) metres per patch."""
    return elevation_bias_between(
        elevation_m, elevation_m, alpha=alpha, h_scale=h_scale, clamp_max=clamp_max
    )


def _eager_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    bias: torch.Tensor | None,
    dropout_p: float,
) -> torch.Tensor:
    """The readable reference: builds the (B, heads, N, N) scores explicitly."""
    scores = torch.matmul(query, key.transpose(-1, -2)) * query.shape[-1] ** -0.5
    if bias is not None:
        scores = scores + bias[:, None].to(scores.dtype)  # shared by all heads
    # Softmax in at least float32 (bf16 logits lose the bias), in float64 for float64 inputs.
    softmax_dtype = torch.promote_types(scores.dtype, torch.float32)
    probs = torch.softmax(scores.to(softmax_dtype), dim=-1).to(query.dtype)
    probs = F.dropout(probs, p=dropout_p, training=dropout_p > 0)
    return torch.matmul(probs, value)


# Exact elevation-biased attention in O(N) memory (the `sdpa` path of biased blocks).
#
# The bias of DESIGN.md section 3, shared by all heads and added to the logits q.k/sqrt(d),
#
#     B[b, i, j] = clamp(-alpha * relu((z[b, j] - z[b, i]) / H), -clamp_max, 0)    (i query, j key)
#
# has exact structure once the tokens are sorted by elevation z. With u = alpha * z / H and the
# clamp inactive (alpha >= 0, H > 0, alpha * (max z - min z) / H <= clamp_max), a key ranked at
# or below its query costs nothing and a key ranked above costs u_i - u_j. Sorting tokens by
# *descending* z turns the biased keys into a causal pattern (rank j <= rank i; the diagonal and
# tied heights get u_i - u_j = 0, which is still exact), and the unbiased keys into a strictly
# causal pattern in the ascending order. So biased attention is two causal calls of the fused
# kernel, merged by their log-sum-exp:
#
#     part B (descending order, causal, diagonal included): logits s_ij - u_j, key-only bias given
#         to the kernel as a broadcast (B, 1, 1, N) mask; +u_i is constant per row, so it is
#         added to part B's log-sum-exp afterwards instead of to every logit.
#     part A (ascending order, strictly causal): plain logits s_ij.
#
# The backward calls the fused backward kernel of each part with the *merged* output and
# log-sum-exp (each part's probabilities are then the merged softmax's), and sums the gradients.
# u's gradient needs, per token, the row sum over its biased keys and the column sum over the
# queries that see it as a biased key of dL/dlogit: the row sum follows from the forward's part-B
# output, the column sum comes out of the key gradient of a padding head column (query 1, key 0)
# that leaves the logits unchanged. Autograd carries u's gradient on to alpha (and to z or H if they
# require grad; at exactly tied heights the z-gradient is a valid subgradient but not eager's
# relu'(0) = 0 choice, so only alpha's gradient is claimed equal to eager's).
#
# Small problems (at most 2**22 logits) materialize the bias and call SDPA instead: there the
# sorted path's fixed cost exceeds the N x N work.
#
# Outside the exact range of the decomposition, or with attention dropout, a chunked path over
# query blocks applies the clamp and the dropout exactly with O(N * block) memory.
#
# Kernels: on CPU torch's flash kernel (`_scaled_dot_product_flash_attention_for_cpu` and its
# backward, which accept a broadcast per-key mask and any out/log-sum-exp); on CUDA the
# memory-efficient kernel (`_efficient_attention_forward/backward`), written but never run (no GPU
# on the development machine). Other devices take the chunked path.

# Logit elements (batch x heads x queries x keys) of one query block of the chunked fallback;
# 2**24 float32 logits are 64 MiB.
_CHUNK_LOGIT_ELEMENTS = 2**24
# Up to this many logits (16 MiB in fp32) the bias is materialized: see sorted_elevation_attention.
_SMALL_PROBLEM_ELEMENTS = 2**22


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
    bias = elevation_bias_matrix(elevation_m, alpha=alpha, h_scale=h_scale, clamp_max=clamp_max)
    return _eager_attention(query, key, value, bias=bias, dropout_p=dropout_p)


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
    bias = elevation_bias_between(
        query_elevation_m, key_elevation_m, alpha=alpha, h_scale=h_scale, clamp_max=clamp_max
    )
    return _eager_attention(query, key, value, bias=bias, dropout_p=dropout_p)


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
    small_problem_elements: int = _SMALL_PROBLEM_ELEMENTS,
) -> torch.Tensor:
    """Elevation-biased attention, exact, O(N) memory; (B, heads, N, head_dim) in and out.

    elevation_m: (B, N) metres per token; alpha, h_scale: 0-dim tensors (or floats). Uses the
    sorted-token fused kernels when the clamp is inactive and dropout_p == 0 on CPU or CUDA (the
    CUDA branch is untested: no GPU was available), else the chunked exact path. Problems of at
    most small_problem_elements logits (B x heads x N x N) materialize the bias and call SDPA:
    there the sorted path's fixed cost (sorting, two kernel calls, merging) exceeds the N x N
    work (at the default model size, N = 128, it was 1.5x slower). Pass 0 to force the sorted path.
    """
    _check_shapes(query, key, value, elevation_m)
    batch, heads, length, _ = query.shape
    if batch * heads * length * length <= small_problem_elements:
        bias = elevation_bias_matrix(
            elevation_m, alpha=alpha, h_scale=h_scale, clamp_max=clamp_max
        )
        return F.scaled_dot_product_attention(
            query, key, value, attn_mask=bias[:, None].to(query.dtype), dropout_p=dropout_p
        )
    if (
        dropout_p > 0
        or query.device.type not in _FUSED_DEVICES
        or not clamp_is_inactive(elevation_m, alpha=alpha, h_scale=h_scale, clamp_max=clamp_max)
    ):
        return chunked_elevation_attention(
            query, key, value, elevation_m=elevation_m, alpha=alpha, h_scale=h_scale,
            clamp_max=clamp_max, dropout_p=dropout_p,
        )  # fmt: skip
    bias_dtype = torch.promote_types(query.dtype, torch.float32)
    heights = elevation_m.to(bias_dtype)
    # Measuring u from each sample's lowest token keeps u in [0, clamp_max]; only differences of u
    # enter the logits, so the offset changes nothing but the rounding.
    alpha = torch.as_tensor(alpha, device=query.device).to(bias_dtype)
    relative = heights - heights.amin(dim=-1, keepdim=True)
    token_bias = alpha * relative / torch.as_tensor(h_scale, device=query.device)
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


def _token_rows(tokens: torch.Tensor) -> torch.Tensor | None:
    """(B, h, N, d) as a (B * N, h, d) view when its memory allows, else None."""
    rows = tokens.transpose(1, 2)
    try:
        return rows.view(-1, *rows.shape[2:])
    except RuntimeError:
        return None


def _flat_index(order: torch.Tensor, length: int) -> torch.Tensor:
    """(B, M) token indices -> (B * M,) row indices into (B * N, ...) rows."""
    offsets = torch.arange(order.shape[0], device=order.device)[:, None] * length
    return (order + offsets).reshape(-1)


def _take_tokens(
    tokens: torch.Tensor,
    order: torch.Tensor,
    *,
    padded_width: int | None = None,
    first_pad: float = 0.0,
) -> torch.Tensor:
    """(B, h, N, d) reordered along N: out[:, :, r] = tokens[:, :, order[:, r]].

    With padded_width, the result is (B, h, N, padded_width): column d holds first_pad and the
    rest of the padding 0. The result is laid out (B, N, h, width) in memory like the model's
    fused qkv projection and the CPU kernel's gradients, so all samples move in one call.
    """
    batch, heads, length, dim = tokens.shape
    width = dim if padded_width is None else padded_width
    taken = tokens.new_empty(batch, length, heads, width)
    rows = _token_rows(tokens)
    if rows is not None:
        destination = taken.view(batch * length, heads, width)[..., :dim]
        torch.index_select(rows, 0, _flat_index(order, length), out=destination)
    else:
        for sample in range(batch):
            destination = taken[sample].transpose(0, 1)[..., :dim]
            torch.index_select(tokens[sample], 1, order[sample], out=destination)
    if width > dim:
        taken[..., dim + 1 :] = 0.0
        taken[..., dim] = first_pad
    return taken.transpose(1, 2)


def _padded_width(dim: int) -> int:
    """Head width with one spare column, rounded up to a multiple of 8: the CPU kernel's backward
    runs about 30% slower at d = 97 than at 96, but only about 9% slower at 104."""
    return (dim + 1 + 7) // 8 * 8


def _put_tokens(
    destination: torch.Tensor, taken: torch.Tensor, order: torch.Tensor, *, accumulate: bool
) -> None:
    """Inverse of _take_tokens for the tokens listed in order: destination[:, :, order[:, r]]
    = (or +=) taken[:, :, r]. destination comes from _new_like_tokens."""
    length = destination.shape[2]
    target, source = _token_rows(destination), _token_rows(taken)
    if target is not None and source is not None:
        index = _flat_index(order, length)
        if accumulate:
            target.index_add_(0, index, source)
        else:
            target.index_copy_(0, index, source)
        return
    for sample in range(destination.shape[0]):
        if accumulate:
            destination[sample].index_add_(1, order[sample], taken[sample])
        else:
            destination[sample].index_copy_(1, order[sample], taken[sample])


def _new_like_tokens(tokens: torch.Tensor) -> torch.Tensor:
    batch, heads, length, dim = tokens.shape
    return tokens.new_empty(batch, length, heads, dim).transpose(1, 2)


def _row_dot(first: torch.Tensor, second: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Per-row dot product over the head dimension, accumulated in dtype: (B, h, N)."""
    return (first.to(dtype) * second.to(dtype)).sum(dim=-1)


_FUSED_DEVICES = ("cpu", "cuda")
# The CUDA memory-efficient kernel pads its log-sum-exp rows to a multiple of this.
_CUDA_LSE_ALIGNMENT = 32
_CAUSAL_FROM_TOP_LEFT = 1  # custom_mask_type of the CUDA memory-efficient kernel


def _fused_forward(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    key_bias: torch.Tensor | None,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal fused attention (key j <= query i) plus a per-key logit bias (B, 1, 1, N).

    Returns (out (B, h, L, d), log-sum-exp (B, h, L)). CPU: the flash kernel. CUDA: the
    memory-efficient kernel, which takes a bias and returns the log-sum-exp; written against
    torch 2.13's op schema but never run here (no GPU on the development machine).
    """
    if query.device.type == "cpu":
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            query, key, value, 0.0, True, attn_mask=key_bias, scale=scale
        )
    batch, heads, length, _ = query.shape
    bias = None if key_bias is None else key_bias.to(query.dtype).expand(-1, heads, length, -1)
    # The CUDA op takes (B, L, h, d): our tensors are stored that way, so these are views.
    out, lse, *_ = torch.ops.aten._efficient_attention_forward(
        query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), bias, None, None,
        None, None, 0.0, _CAUSAL_FROM_TOP_LEFT, True, scale=scale,
    )  # fmt: skip
    return out.transpose(1, 2), lse[..., :length]


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
    batch, heads, length, _ = query.shape
    padded = -(-length // _CUDA_LSE_ALIGNMENT) * _CUDA_LSE_ALIGNMENT
    lse = logsumexp.new_zeros(batch, heads, padded)
    lse[..., :length] = logsumexp
    bias = None if key_bias is None else key_bias.to(query.dtype).expand(-1, heads, length, -1)
    unused_rng = torch.zeros((), dtype=torch.int64, device=query.device)  # dropout is 0
    grad_q, grad_k, grad_v, _ = torch.ops.aten._efficient_attention_backward(
        grad_out.transpose(1, 2), query.transpose(1, 2), key.transpose(1, 2),
        value.transpose(1, 2), bias, out.transpose(1, 2), None, None, length, key.shape[2], lse,
        0.0, unused_rng, unused_rng, _CAUSAL_FROM_TOP_LEFT, False, scale=scale,
    )  # fmt: skip
    return grad_q.transpose(1, 2), grad_k.transpose(1, 2), grad_v.transpose(1, 2)


class _SortedElevationAttention(torch.autograd.Function):
    """Attention with logits q.k/sqrt(d) + (u_i - u_j if z_j > z_i else 0); see the module doc.

    Inputs: query/key/value (B, h, N, d), token_bias u (B, N), order (B, N) = tokens by descending
    elevation. Working tensors are in that descending order ("down", part B) or its reverse
    ("up", part A). Part B's tensors carry the padded head dimension (query column d = 1, other
    padding 0) from the start, so the backward reuses them; the forward reads them without it.
    """

    @staticmethod
    def forward(ctx, query, key, value, token_bias, order):  # noqa: ANN001, ANN205
        length, dim = query.shape[2], query.shape[3]
        scale = dim**-0.5
        width = _padded_width(dim)
        q_x = _take_tokens(query, order, padded_width=width, first_pad=1.0)
        k_x = _take_tokens(key, order, padded_width=width)
        v_x = _take_tokens(value, order, padded_width=width)
        u_down = token_bias.gather(1, order)  # (B, N)
        # At least fp32: in bf16 a bias of up to clamp_max logits would lose ~0.03 to rounding.
        key_bias = (-u_down)[:, None, None, :]  # (B, 1, 1, N)
        out_b, lse_b = _fused_forward(
            q_x[..., :dim], k_x[..., :dim], v_x[..., :dim], key_bias=key_bias, scale=scale
        )
        lse_b = lse_b + u_down[:, None, :].to(lse_b.dtype)  # the +u_i of every part-B logit
        result = _new_like_tokens(query)
        q_up = k_up = v_up = None
        if length == 1:
            lse = lse_b
        else:
            order_up = order.flip(-1)
            q_up, k_up, v_up = (_take_tokens(t, order_up) for t in (query, key, value))
            out_a, lse_a = _fused_forward(
                q_up[:, :, 1:], k_up[:, :, :-1], v_up[:, :, :-1], key_bias=None, scale=scale
            )
            # Part A's rows are ascending ranks 1..N-1, i.e. descending positions N-2..0.
            lse = lse_b.clone()
            lse[..., :-1] = torch.logaddexp(lse_b[..., :-1], lse_a.flip(-1))
        weight_b = torch.exp(lse_b - lse)  # part B's share of each row's softmax mass
        out_b.mul_(weight_b.to(out_b.dtype)[..., None])
        _put_tokens(result, out_b, order, accumulate=False)
        if length > 1:
            out_a.mul_(torch.exp(lse_a - lse.flip(-1)[..., 1:]).to(out_a.dtype)[..., None])
            _put_tokens(result, out_a, order_up[:, 1:], accumulate=True)
        # The ascending copies are kept (3 x (B, h, N, d)) rather than rebuilt in the backward.
        ctx.save_for_backward(
            q_x, k_x, v_x, q_up, k_up, v_up, u_down, order, result, lse, out_b, weight_b
        )
        ctx.scale = scale
        return result

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):  # noqa: ANN001, ANN205
        q_x, k_x, v_x, q_up, k_up, v_up, u_down, order, result, lse, out_b, weight_b = (
            ctx.saved_tensors
        )
        scale, length, dim, width = ctx.scale, *result.shape[2:], q_x.shape[3]
        g_x = _take_tokens(grad_output, order, padded_width=width)
        o_x = _take_tokens(result, order, padded_width=width)
        key_bias = (-u_down)[:, None, None, :]
        # With the padding (query column d = 1, key padding 0) the logits are unchanged and
        # grad_key[..., d] = scale * sum_i dL/dlogit_ij: the column sums u_j's gradient needs.
        dq_x, dk_x, dv_x = _fused_backward(
            g_x, q_x, k_x, v_x, o_x, lse - u_down[:, None, :].to(lse.dtype), key_bias=key_bias,
            scale=scale,
        )  # fmt: skip
        column_sum = dk_x[..., dim].to(lse.dtype).sum(dim=1) / scale  # (B, N)
        # Row sums over part B: sum_j P_ij (dO_i.v_j - D_i) = dO_i.(w_i out_b_i) - w_i D_i, with
        # w_i part B's share of row i (out_b was saved already scaled by it), D_i = dO_i.out_i.
        delta = _row_dot(g_x, o_x, lse.dtype)
        row_sum = (_row_dot(g_x[..., :dim], out_b, lse.dtype) - weight_b * delta).sum(dim=1)
        grads = [_new_like_tokens(g_x[..., :dim]) for _ in range(3)]
        for grad, part_b in zip(grads, (dq_x, dk_x, dv_x), strict=True):
            _put_tokens(grad, part_b[..., :dim], order, accumulate=False)
        if length > 1:
            order_up = order.flip(-1)
            g_up, o_up = (t[..., :dim].flip(2) for t in (g_x, o_x))
            dq_a, dk_a, dv_a = _fused_backward(
                g_up[:, :, 1:], q_up[:, :, 1:], k_up[:, :, :-1], v_up[:, :, :-1], o_up[:, :, 1:],
                lse.flip(-1)[..., 1:], key_bias=None, scale=scale,
            )  # fmt: skip
            _put_tokens(grads[0], dq_a, order_up[:, 1:], accumulate=True)
            _put_tokens(grads[1], dk_a, order_up[:, :-1], accumulate=True)
            _put_tokens(grads[2], dv_a, order_up[:, :-1], accumulate=True)
        du_down = row_sum - column_sum  # (B, N)
        du = torch.empty_like(du_down).scatter_(1, order, du_down)
        return (*grads, du.to(u_down.dtype), None)


_compiled_flex_attention: Callable[..., torch.Tensor] | None = None


def _flex_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    score_mod: Callable[..., torch.Tensor] | None,
) -> torch.Tensor:
    """FlexAttention, compiled on CUDA (where it is fused) and unfused elsewhere (CPU tests)."""
    global _compiled_flex_attention
    from torch.nn.attention.flex_attention import flex_attention

    if not query.is_cuda:
        return flex_attention(query, key, value, score_mod=score_mod)
    if _compiled_flex_attention is None:
        _compiled_flex_attention = torch.compile(flex_attention, dynamic=False)
    return _compiled_flex_attention(query, key, value, score_mod=score_mod)


def _flex_elevation_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    elevation_m: torch.Tensor,
    alpha: torch.Tensor,
    h_scale: torch.Tensor,
    clamp_max: float,
) -> torch.Tensor:
    """FlexAttention whose score_mod computes the bias from per-token heights on the fly.

    Capturing u = alpha * z / H_scale and using ReLU(u_j - u_i) would be wrong twice: ReLU'(0) = 0
    gives alpha no gradient at its default init 0, and for alpha < 0 the sign flips. So the
    score_mod captures the heights z / H_scale (no gradient) and alpha as a (B,) vector, never a
    0-dim tensor (FlexAttention mishandles gradients into 0-dim captured tensors); autograd then
    sums the (B,) gradient back into the scalar parameter.
    """
    heights = (elevation_m.float() / h_scale.float()).to(query.dtype)  # (B, N)
    alpha_per_sample = alpha.to(query.dtype).reshape(1).expand(query.shape[0])  # (B,)

    def elevation_score_mod(score, batch, head, query_index, key_index):
        rise = heights[batch, key_index] - heights[batch, query_index]
        bias = -alpha_per_sample[batch] * torch.relu(rise)
        return score + torch.clamp(bias, min=-clamp_max, max=0.0)

    return _flex_attention(query, key, value, elevation_score_mod)


def elevation_biased_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    elevation_m: torch.Tensor,
    alpha: torch.Tensor,
    h_scale: torch.Tensor,
    clamp_max: float,
    implementation: str,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """Softmax attention with the elevation bias added to the logits, for every implementation.

    query/key/value: (B, heads, N, head_dim); elevation_m: (B, N) per-patch mean metres; alpha
    and h_scale: 0-dim tensors. Returns (B, heads, N, head_dim). Every biased-attention call goes
    through here so a faster exact kernel can replace one branch without touching the model.
    """
    if implementation == "eager":
        bias = elevation_bias_matrix(elevation_m, alpha=alpha, h_scale=h_scale, clamp_max=clamp_max)
        return _eager_attention(query, key, value, bias=bias, dropout_p=dropout_p)
    if implementation == "sdpa":
        # Exact, O(N) memory: sorted tokens, two fused causal calls merged by log-sum-exp (or the
        # chunked exact path when the clamp is active or attention dropout is on).
        return sorted_elevation_attention(
            query, key, value, elevation_m=elevation_m, alpha=alpha, h_scale=h_scale,
            clamp_max=clamp_max, dropout_p=dropout_p,
        )  # fmt: skip
    if implementation == "flex_attention":
        if dropout_p > 0:
            raise ValueError("flex_attention has no attention dropout; set attention_dropout=0.")
        return _flex_elevation_attention(
            query, key, value, elevation_m=elevation_m, alpha=alpha, h_scale=h_scale,
            clamp_max=clamp_max,
        )  # fmt: skip
    raise ValueError(
        f"attn_implementation={implementation!r} is not supported by TopoFlow; expected one of "
        f"{ATTENTION_IMPLEMENTATIONS}."
    )


def plain_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    implementation: str,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """Unbiased softmax attention; (B, heads, N, head_dim) in and out."""
    if implementation == "eager":
        return _eager_attention(query, key, value, bias=None, dropout_p=dropout_p)
    if implementation == "sdpa":
        return F.scaled_dot_product_attention(query, key, value, dropout_p=dropout_p)
    if implementation == "flex_attention":
        if dropout_p > 0:
            raise ValueError("flex_attention has no attention dropout; set attention_dropout=0.")
        return _flex_attention(query, key, value, None)
    raise ValueError(
        f"attn_implementation={implementation!r} is not supported by TopoFlow; expected one of "
        f"{ATTENTION_IMPLEMENTATIONS}."
    )
