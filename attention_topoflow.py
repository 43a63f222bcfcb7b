"""Elevation-biased attention kernels of TopoFlow: the bias formula, the eager reference, the fused
C++ CPU kernel (compiled on first use), the exact O(N)-memory sorted-token kernel, the dense kernel
for short sequences, the chunked fallback and FlexAttention.

`modeling_topoflow.py` calls `elevation_biased_attention` and `plain_attention`; everything else
here serves them. Hub remote code: imports torch only, and `save_pretrained` copies this file
beside `modeling_topoflow.py` (transformers' remote-code loader follows its relative import).
"""

from __future__ import annotations

import hashlib
import math
import os
import shutil
import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable
from torch.utils.checkpoint import checkpoint

__all__ = [
    "ATTENTION_IMPLEMENTATIONS",
    "chunked_elevation_attention",
    "clamp_is_inactive",
    "dense_elevation_attention",
    "eager_elevation_attention",
    "elevation_bias_between",
    "fused_elevation_attention",
    "fused_kernel_available",
    "elevation_bias_matrix",
    "elevation_biased_attention",
    "endpoint_rise",
    "oriented_ascent",
    "oriented_elevation",
    "path_ascent_matrix",
    "plain_attention",
    "prefers_dense_path",
    "prefers_fused_path",
    "rise_bias",
    "rise_biased_attention",
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



# The oracle's bias (config.elevation_bias_rise="path"). The endpoint bias above sees only the
# difference of two patch means, so a ridge between two low patches costs nothing, while the
# embedded generator attenuates pollution by exp(-Z / H0) with Z the total climb along the way
# (topoflow/corpus/atmosphere.py). This bias reads Z from the terrain itself.
_ASCENT_SAMPLES_PER_CELL = 2
# Bilinear samples per chunk of path_ascent_matrix (2**24 samples: about 200 MiB with the grid).
_ASCENT_CHUNK_SAMPLES = 2**24


def path_ascent_matrix(elevation_m: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(B, H, W) metres -> (B, N, N) total ascent Z[b, i, j] along the straight segment from patch
    j's centre (the source, a key) to patch i's centre (the receiver, a query), in metres.

    Z is the sum of the positive height increments of the cell-resolution terrain sampled
    bilinearly (cell centres are the grid nodes) at least `_ASCENT_SAMPLES_PER_CELL` times per
    cell of the longest segment; Z >= max(0, z_i - z_j) of the sampled centre heights, with
    equality on a terrain that only rises from j to i. The terrain is data: no gradient flows
    into it. Cost O(B * N^2 * (H + W)), computed in chunks of receivers.
    """
    batch, height, width = elevation_m.shape
    rows, cols = height // patch_size, width // patch_size
    count = rows * cols
    centre = (torch.arange(rows, dtype=torch.float32) + 0.5) * patch_size - 0.5
    centre_row = centre.repeat_interleave(cols).to(elevation_m.device)  # (N,)
    centre = (torch.arange(cols, dtype=torch.float32) + 0.5) * patch_size - 0.5
    centre_col = centre.repeat(rows).to(elevation_m.device)
    longest = math.hypot(patch_size * (rows - 1), patch_size * (cols - 1))
    steps = max(1, math.ceil(_ASCENT_SAMPLES_PER_CELL * longest))
    fraction = torch.linspace(0.0, 1.0, steps + 1, device=elevation_m.device)  # (K,)
    terrain = elevation_m.detach().float()[:, None]  # (B, 1, H, W)
    per_receiver = batch * count * (steps + 1)
    chunk = max(1, _ASCENT_CHUNK_SAMPLES // per_receiver)
    ascent = []
    for start in range(0, count, chunk):
        receivers = slice(start, min(start + chunk, count))

        def along(source: torch.Tensor, receiver: torch.Tensor, extent: int) -> torch.Tensor:
            """Positions (receivers, sources, K) on the segment, in grid_sample's [-1, 1]."""
            cell = source[None, :, None] + fraction * (receiver[:, None, None]
                                                       - source[None, :, None])
            return cell * (2.0 / max(extent - 1, 1)) - 1.0

        grid = torch.stack([along(centre_col, centre_col[receivers], width),
                            along(centre_row, centre_row[receivers], height)], dim=-1)
        grid = grid.flatten(0, 1)[None].expand(batch, -1, -1, -1)  # (B, n_i * N, K, 2)
        profile = F.grid_sample(terrain, grid, mode="bilinear", align_corners=True)[:, 0]
        climb = torch.relu(profile.diff(dim=-1)).sum(dim=-1)  # (B, n_i * N)
        ascent.append(climb.reshape(batch, -1, count))
    return torch.cat(ascent, dim=1)


def oriented_ascent(ascent_m: torch.Tensor, direction: str) -> torch.Tensor:
    """The path rise the bias penalizes, (B, N, N) query x key: Z as it is for "upslope" (the
    climb from the source up to the receiver), its transpose for "downslope" (the climb from the
    receiver up to the source, i.e. the descent the source's air makes to reach the receiver)."""
    if direction == "upslope":
        return ascent_m
    if direction == "downslope":
        return ascent_m.transpose(-1, -2)
    raise ValueError(
        f"elevation_bias_direction must be 'downslope' or 'upslope', got {direction!r}"
    )


def rise_bias(
    rise_m: torch.Tensor,
    *,
    alpha: torch.Tensor,
    h_scale: torch.Tensor | float,
    clamp_max: float,
) -> torch.Tensor:
    """(B, N, N) rise in metres (>= 0, query x key) -> (B, A, N, N) bias
    clamp(-alpha * rise / H_scale, -clamp_max, 0): A = 1 for a 0-dim alpha, A = heads for one
    alpha per head."""
    dtype = torch.promote_types(rise_m.dtype, torch.float32)
    alpha = alpha.to(dtype).reshape(1, -1, 1, 1)
    h_scale = torch.as_tensor(h_scale, dtype=dtype, device=rise_m.device)
    return torch.clamp(-alpha * rise_m.to(dtype)[:, None] / h_scale, min=-clamp_max, max=0.0)


def endpoint_rise(elevation_m: torch.Tensor) -> torch.Tensor:
    """(B, N) oriented heights -> (B, N, N) ReLU(z_j - z_i), query i x key j: the rise the
    endpoint bias reads, for the materialized path (one alpha per head)."""
    heights = elevation_m.float()
    return torch.relu(heights[:, None, :] - heights[:, :, None])


def rise_biased_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    rise_m: torch.Tensor,
    alpha: torch.Tensor,
    h_scale: torch.Tensor,
    clamp_max: float,
    implementation: str,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """Softmax attention with a materialized bias from a (B, N, N) rise matrix (the oracle's path
    ascent, or the endpoint rise with one alpha per head). O(N^2) memory per sample: an ablation
    for grids of moderate size, not the fast path."""
    bias = rise_bias(rise_m, alpha=alpha, h_scale=h_scale, clamp_max=clamp_max)  # (B, A, N, N)
    if implementation == "eager":
        return _eager_attention(query, key, value, bias=bias, dropout_p=dropout_p)
    if implementation == "sdpa":
        return F.scaled_dot_product_attention(query, key, value, attn_mask=bias.to(query.dtype),
                                              dropout_p=dropout_p)
    if implementation == "flex_attention":
        if dropout_p > 0:
            raise ValueError("flex_attention has no attention dropout; set attention_dropout=0.")
        bias = bias.to(query.dtype).expand(-1, query.shape[1], -1, -1)

        def rise_score_mod(score, batch, head, query_index, key_index):
            return score + bias[batch, head, query_index, key_index]

        return _flex_attention(query, key, value, rise_score_mod)
    raise ValueError(
        f"attn_implementation={implementation!r} is not supported by TopoFlow; expected one of "
        f"{ATTENTION_IMPLEMENTATIONS}."
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
        # (B, N, N) is shared by all heads; (B, A, N, N) is per head (A = heads) or broadcast.
        scores = scores + (bias if bias.ndim == 4 else bias[:, None]).to(scores.dtype)
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


# Exact elevation-biased attention for short sequences (the `sdpa` path where it measures faster).
#
# Below a few thousand tokens the sorted path's two causal calls each cost a full call (torch's CPU
# kernel skips masked keys only in blocks of 512) and its sorting and merging are a large share of
# the work. There the bias rows of a query block are materialized once per sample, (B, rows, N),
# shared by the heads, and given to the fused CPU kernel as an additive mask: the forward costs
# about one plain call. The fused backward cannot return the mask's gradient, so the backward is
# eager math one query block at a time, and the bias gradient (alpha, and z or H when they require
# grad) comes from autograd on the recomputed bias block: exact for every alpha, H and clamp.

# Logit elements (B x heads x rows x N) of one query block of the dense backward (16 MiB in fp32).
_DENSE_BACKWARD_ELEMENTS = 2**22
# Mask elements (B x rows x N) of one query block of the dense forward (16 MiB in fp32).
_DENSE_FORWARD_ELEMENTS = 2**22
# Where `sdpa` takes the dense path rather than the sorted one: CPU, no dropout, problems above
# the materialized shortcut, N <= 512 and head dim >= 32. Measured on the 2-core machine (one
# thread, CPU time, interleaved medians; biased / plain forward+backward): B=8, 8 heads, N=512,
# d=96: dense 1.89x, sorted 3.69x; N=1024: dense 2.10x, sorted 1.93x. At head dim 16 the dense
# path's N x N elementwise passes cost more than the fused kernel's whole work (B=8, 4 heads:
# N=256 4.06x vs 4.04x, N=512 6.03x vs 3.44x), so the sorted path stays there.
_DENSE_MAX_LENGTH = 512
_DENSE_MIN_HEAD_DIM = 32


def prefers_dense_path(query: torch.Tensor, dropout_p: float) -> bool:
    """Whether the `sdpa` implementation runs dense_elevation_attention for this query."""
    batch, heads, length, head_dim = query.shape
    return (
        query.device.type == "cpu"
        and dropout_p == 0
        and batch * heads * length * length > _SMALL_PROBLEM_ELEMENTS
        and length <= _DENSE_MAX_LENGTH
        and head_dim >= _DENSE_MIN_HEAD_DIM
    )


def _rows_per_block(budget: int, per_row: int, length: int) -> int:
    return max(1, min(length, budget // max(1, per_row)))


def dense_elevation_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    elevation_m: torch.Tensor,
    alpha: torch.Tensor,
    h_scale: torch.Tensor,
    clamp_max: float,
) -> torch.Tensor:
    """Elevation-biased attention, exact for every alpha, H and clamp; no dropout; CPU only.

    (B, heads, N, head_dim) in and out. Memory O(B * rows * N) per query block, rows chosen so a
    block stays within a fixed budget (linear in N). Gradients: query, key, value, and those of
    elevation_m, alpha and h_scale that require grad.
    """
    _check_shapes(query, key, value, elevation_m)
    if query.device.type != "cpu":
        raise ValueError(f"dense_elevation_attention runs on CPU; got {query.device.type} tensors.")
    bias_dtype = torch.promote_types(query.dtype, torch.float32)
    alpha = torch.as_tensor(alpha, dtype=bias_dtype, device=query.device)
    h_scale = torch.as_tensor(h_scale, dtype=bias_dtype, device=query.device)
    return _DenseElevationAttention.apply(
        query, key, value, elevation_m, alpha, h_scale, clamp_max
    )


class _DenseElevationAttention(torch.autograd.Function):
    """See the comment above dense_elevation_attention."""

    @staticmethod
    def forward(ctx, query, key, value, elevation_m, alpha, h_scale, clamp_max):  # noqa: ANN001, ANN205
        batch, heads, length, dim = query.shape
        rows = _rows_per_block(_DENSE_FORWARD_ELEMENTS, batch * length, length)
        outs, lses = [], []
        for start in range(0, length, rows):
            bias = elevation_bias_between(
                elevation_m[:, start : start + rows], elevation_m, alpha=alpha, h_scale=h_scale,
                clamp_max=clamp_max,
            )  # fmt: skip
            # The mask stays in at least fp32: in bf16 a bias of up to clamp_max would round.
            mask = bias[:, None] if query.dtype == torch.bfloat16 else bias[:, None].to(query.dtype)
            out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
                query[:, :, start : start + rows], key, value, 0.0, False, attn_mask=mask,
                scale=dim**-0.5,
            )  # fmt: skip
            outs.append(out)
            lses.append(lse)
        out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)
        lse = lses[0] if len(lses) == 1 else torch.cat(lses, dim=2)
        ctx.save_for_backward(query, key, value, elevation_m, alpha, h_scale, out, lse)
        ctx.clamp_max = clamp_max
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):  # noqa: ANN001, ANN205
        query, key, value, elevation_m, alpha, h_scale, out, lse = ctx.saved_tensors
        batch, heads, length, dim = query.shape
        compute = torch.promote_types(query.dtype, torch.float32)
        query, key, value, out, grad_output = (
            t.to(compute) for t in (query, key, value, out, grad_output)
        )
        scale = dim**-0.5
        scaled_query = query * scale
        grad_q = torch.empty_like(query)
        grad_k, grad_v = torch.zeros_like(key), torch.zeros_like(value)
        delta = (grad_output * out).sum(dim=-1, keepdim=True)  # (B, h, N, 1)
        needs = ctx.needs_input_grad[3:6]
        leaves = [t.detach().requires_grad_(wanted) for t, wanted in
                  zip((elevation_m, alpha, h_scale), needs, strict=True)]  # fmt: skip
        wanted = [t for t in leaves if t.requires_grad]
        bias_grads = [torch.zeros_like(t) for t in wanted]
        rows = _rows_per_block(_DENSE_BACKWARD_ELEMENTS, batch * heads * length, length)
        for start in range(0, length, rows):
            block = slice(start, start + rows)
            with torch.enable_grad():
                bias = elevation_bias_between(
                    leaves[0][:, block], leaves[0], alpha=leaves[1], h_scale=leaves[2],
                    clamp_max=ctx.clamp_max,
                )  # fmt: skip
            logits = torch.matmul(scaled_query[:, :, block], key.transpose(-1, -2))
            logits += bias.detach()[:, None].to(compute)
            probs = logits.sub_(lse[:, :, block, None].to(compute)).exp_()  # (B, h, rows, N)
            grad_block = grad_output[:, :, block]
            grad_v += torch.matmul(probs.transpose(-1, -2), grad_block)
            grad_logits = torch.matmul(grad_block, value.transpose(-1, -2))
            grad_logits = grad_logits.sub_(delta[:, :, block]).mul_(probs)  # dS
            grad_q[:, :, block] = torch.matmul(grad_logits, key).mul_(scale)
            grad_k += torch.matmul(grad_logits.transpose(-1, -2), scaled_query[:, :, block])
            if wanted:
                head_sum = grad_logits.sum(dim=1).to(bias.dtype)  # the bias is shared by heads
                for total, grad in zip(
                    bias_grads, torch.autograd.grad(bias, wanted, head_sum), strict=True
                ):
                    total += grad
        bias_grads_iter = iter(bias_grads)
        extra = [next(bias_grads_iter) if wanted_ else None for wanted_ in needs]
        dtype = ctx.saved_tensors[0].dtype
        return grad_q.to(dtype), grad_k.to(dtype), grad_v.to(dtype), *extra, None


# Fused elevation-biased attention for CPU (the `sdpa` path on CPU wherever it can run).
#
# No composition of torch's CPU kernels is exact and fast at once: the fused kernel accepts an
# additive mask but returns no gradient for it, so alpha's gradient costs extra passes over the
# N x N logits (2-6x plain SDPA below 4k tokens, issue 17). This kernel is flash attention with the
# bias computed on the fly from the per-token heights, in the tiles torch's own fused CPU kernel
# uses (query rows x 512 keys, through the same MKL/BLAS sgemm):
#     forward, per (sample, head, query block): S = scale Q K^T per key tile, + bias, online
#         softmax, O += P V; saves the log-sum-exp. No N x N tensor exists.
#     backward, per (sample, head), so that the dK and dV sums have no races: P recomputed per
#         tile, dV += P^T dO, dP = dO V^T, dS = P (dP - D) with D_i = dO_i . O_i, dQ += scale dS K,
#         dK += scale dS^T Q, and dalpha += sum dS * dB/dalpha in the same elementwise pass.
# Exact for every alpha, H and clamp (dB/dalpha = -relu(rise) where the clamp passes gradients,
# bounds included, as torch.clamp's). float32 and float64 inputs (bf16 runs in float32). Gradients
# of the heights and of H_scale are not computed: the model's heights are data and H_scale a
# buffer; when either requires grad the `sdpa` path takes the dense/sorted kernels instead.
#
# The C++ source is below (this file is Hub remote code and imports torch only). It is compiled
# on first use with torch.utils.cpp_extension (a C++ compiler and ninja are needed; 8 s
# on 2 cores) into torch's extension cache ($TORCH_EXTENSIONS_DIR, default
# ~/.cache/torch_extensions), keyed by a hash of the source, flags and torch version, so every
# later process loads the cached build. When the build is impossible, one warning names what is
# missing and the slower exact paths run instead.
_FUSED_KERNEL_SOURCE = r"""
#include <ATen/core/Tensor.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <vector>

extern "C" {
void sgemm_(const char*, const char*, const int*, const int*, const int*, const float*,
            const float*, const int*, const float*, const int*, const float*, float*, const int*);
void dgemm_(const char*, const char*, const int*, const int*, const int*, const double*,
            const double*, const int*, const double*, const int*, const double*, double*,
            const int*);
}

namespace {

// Row-major C (m x n) = alpha * op(A) (m x k) * op(B) (k x n) + beta * C, through the column-major
// BLAS: the row-major C is the column-major C^T = op(B)^T op(A)^T.
template <typename T>
void gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, T alpha, const T* a,
          int64_t lda, const T* b, int64_t ldb, T beta, T* c, int64_t ldc) {
  const char ta = trans_a ? 'T' : 'N', tb = trans_b ? 'T' : 'N';
  const int im = m, in = n, ik = k, ilda = lda, ildb = ldb, ildc = ldc;
  if constexpr (std::is_same_v<T, float>) {
    sgemm_(&tb, &ta, &in, &im, &ik, &alpha, b, &ildb, a, &ilda, &beta, c, &ildc);
  } else {
    dgemm_(&tb, &ta, &in, &im, &ik, &alpha, b, &ildb, a, &ilda, &beta, c, &ildc);
  }
}

// exp for x <= 0 (every exponent here is a logit minus its row's maximum or log-sum-exp): Cephes'
// polynomial after reduction by powers of 2, written so the compiler vectorizes the loops that
// call it. Relative error about 2e-7 in float; double uses std::exp.
inline float exp_nonpositive(float x) {
  x = x < -87.0f ? -87.0f : x;
  const float n = __builtin_floorf(x * 1.44269504088896341f + 0.5f);
  float r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}
inline double exp_nonpositive(double x) { return std::exp(x); }

template <typename T>
struct Bias {
  // inv_h = 1 / H: a product is cheaper than a quotient in the vector loops. It may round a bias
  // 1 ulp away from eager's (z_j - z_i) / H; ties still give exactly 0.
  T inv_h, alpha, clamp_max;
  // clamp(-alpha * relu((z_j - z_i) / H), -clamp_max, 0)
  inline T value(T zj, T zi) const {
    T rise = (zj - zi) * inv_h;
    rise = rise > T(0) ? rise : T(0);
    T x = -alpha * rise;
    x = x < -clamp_max ? -clamp_max : x;
    return x > T(0) ? T(0) : x;
  }
  // d value / d alpha: -relu(rise) where the clamp passes gradients (bounds included), else 0.
  inline T alpha_grad(T zj, T zi) const {
    T rise = (zj - zi) * inv_h;
    rise = rise > T(0) ? rise : T(0);
    const T x = -alpha * rise;
    return (x >= -clamp_max && x <= T(0)) ? -rise : T(0);
  }
};

struct Strides {
  int64_t batch, head, token;
};
inline Strides strides_of(const at::Tensor& t) { return {t.stride(0), t.stride(1), t.stride(2)}; }

// Query rows and key columns of one tile: torch's fused CPU kernel's choice (FlashAttentionKernel),
// which keeps a (rows x keys) tile and the key/value tiles in a 2 MiB L2.
int64_t query_rows(int64_t length) { return length >= 768 ? 256 : (length >= 192 ? 64 : 32); }
int64_t key_columns(int64_t length) { return length >= 512 ? 512 : length; }

template <typename T>
void forward_kernel(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                    const at::Tensor& heights, const Bias<T> bias, T scale, at::Tensor& out,
                    at::Tensor& lse) {
  const int64_t batch = q.size(0), heads = q.size(1), length = q.size(2), dim = q.size(3);
  const Strides sq = strides_of(q), sk = strides_of(k), sv = strides_of(v), so = strides_of(out);
  const T *qp = q.data_ptr<T>(), *kp = k.data_ptr<T>(), *vp = v.data_ptr<T>();
  const T* zp = heights.data_ptr<T>();
  T* op = out.data_ptr<T>();
  T* lp = lse.data_ptr<T>();
  const int64_t rows = std::min(length, query_rows(length));
  const int64_t cols = std::min(length, key_columns(length));
  const int64_t blocks = (length + rows - 1) / rows;
  at::parallel_for(0, batch * heads * blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> logits(rows * cols), row_max(rows), row_sum(rows);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / (heads * blocks), h = (task / blocks) % heads;
      const int64_t start = (task % blocks) * rows, m = std::min(rows, length - start);
      const T* qb = qp + b * sq.batch + h * sq.head + start * sq.token;
      const T* kb = kp + b * sk.batch + h * sk.head;
      const T* vb = vp + b * sv.batch + h * sv.head;
      const T* z = zp + b * length;
      T* ob = op + b * so.batch + h * so.head + start * so.token;
      T* lb = lp + (b * heads + h) * length + start;
      T* s = logits.data();
      for (int64_t key0 = 0; key0 < length; key0 += cols) {
        const int64_t n = std::min(cols, length - key0);
        const T* zk = z + key0;
        gemm<T>(false, true, m, n, dim, scale, qb, sq.token, kb + key0 * sk.token, sk.token, T(0),
                s, n);
        for (int64_t i = 0; i < m; ++i) {
          T* row = s + i * n;
          const T zi = z[start + i];
          T top = -INFINITY;
#pragma omp simd reduction(max : top)
          for (int64_t j = 0; j < n; ++j) {
            const T x = row[j] + bias.value(zk[j], zi);
            row[j] = x;
            top = x > top ? x : top;
          }
          const T previous = key0 == 0 ? top : row_max[i];
          top = top > previous ? top : previous;
          T total = 0;
#pragma omp simd reduction(+ : total)
          for (int64_t j = 0; j < n; ++j) {
            const T p = exp_nonpositive(row[j] - top);
            row[j] = p;
            total += p;
          }
          if (key0 == 0) {
            row_sum[i] = total;
          } else {
            const T factor = exp_nonpositive(previous - top);
            row_sum[i] = row_sum[i] * factor + total;
            T* orow = ob + i * so.token;
            for (int64_t c = 0; c < dim; ++c) orow[c] *= factor;
          }
          row_max[i] = top;
        }
        gemm<T>(false, false, m, dim, n, T(1), s, n, vb + key0 * sv.token, sv.token,
                key0 == 0 ? T(0) : T(1), ob, so.token);
      }
      for (int64_t i = 0; i < m; ++i) {
        const T inv = T(1) / row_sum[i];
        T* orow = ob + i * so.token;
        for (int64_t c = 0; c < dim; ++c) orow[c] *= inv;
        lb[i] = row_max[i] + std::log(row_sum[i]);
      }
    }
  });
}

template <typename T>
double backward_kernel(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k,
                       const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
                       const at::Tensor& heights, const Bias<T> bias, T scale, at::Tensor& dq,
                       at::Tensor& dk, at::Tensor& dv, bool need_alpha) {
  const int64_t batch = q.size(0), heads = q.size(1), length = q.size(2), dim = q.size(3);
  const Strides sq = strides_of(q), sk = strides_of(k), sv = strides_of(v), so = strides_of(out),
                sg = strides_of(grad_out), sdq = strides_of(dq), sdk = strides_of(dk),
                sdv = strides_of(dv);
  const T *qp = q.data_ptr<T>(), *kp = k.data_ptr<T>(), *vp = v.data_ptr<T>();
  const T *op = out.data_ptr<T>(), *gp = grad_out.data_ptr<T>(), *lp = lse.data_ptr<T>();
  const T* zp = heights.data_ptr<T>();
  T *dqp = dq.data_ptr<T>(), *dkp = dk.data_ptr<T>(), *dvp = dv.data_ptr<T>();
  const int64_t rows = std::min(length, query_rows(length));
  const int64_t cols = std::min(length, key_columns(length));
  std::vector<double> alpha_parts(batch * heads, 0.0);
  at::parallel_for(0, batch * heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> probs(rows * cols), grads(rows * cols), delta(length);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / heads, h = task % heads;
      const T* qb = qp + b * sq.batch + h * sq.head;
      const T* kb = kp + b * sk.batch + h * sk.head;
      const T* vb = vp + b * sv.batch + h * sv.head;
      const T* ob = op + b * so.batch + h * so.head;
      const T* gb = gp + b * sg.batch + h * sg.head;
      const T* lb = lp + task * length;
      const T* z = zp + b * length;
      T* dqb = dqp + b * sdq.batch + h * sdq.head;
      T* dkb = dkp + b * sdk.batch + h * sdk.head;
      T* dvb = dvp + b * sdv.batch + h * sdv.head;
      for (int64_t i = 0; i < length; ++i) {
        T dot = 0;
        const T* grow = gb + i * sg.token;
        const T* orow = ob + i * so.token;
#pragma omp simd reduction(+ : dot)
        for (int64_t c = 0; c < dim; ++c) dot += grow[c] * orow[c];
        delta[i] = dot;
      }
      double alpha_sum = 0;
      for (int64_t start = 0; start < length; start += rows) {
        const int64_t m = std::min(rows, length - start);
        const T* qs = qb + start * sq.token;
        const T* gs = gb + start * sg.token;
        for (int64_t key0 = 0; key0 < length; key0 += cols) {
          const int64_t n = std::min(cols, length - key0);
          const T* zk = z + key0;
          const T* kt = kb + key0 * sk.token;
          const T* vt = vb + key0 * sv.token;
          T* p = probs.data();
          T* ds = grads.data();
          gemm<T>(false, true, m, n, dim, scale, qs, sq.token, kt, sk.token, T(0), p, n);
          for (int64_t i = 0; i < m; ++i) {
            T* row = p + i * n;
            const T zi = z[start + i], shift = lb[start + i];
#pragma omp simd
            for (int64_t j = 0; j < n; ++j)
              row[j] = exp_nonpositive(row[j] + bias.value(zk[j], zi) - shift);
          }
          // dV += P^T dO; dP = dO V^T
          gemm<T>(true, false, n, dim, m, T(1), p, n, gs, sg.token, T(1),
                  dvb + key0 * sdv.token, sdv.token);
          gemm<T>(false, true, m, n, dim, T(1), gs, sg.token, vt, sv.token, T(0), ds, n);
          for (int64_t i = 0; i < m; ++i) {
            T* prow = p + i * n;
            T* drow = ds + i * n;
            const T zi = z[start + i], d = delta[start + i];
            if (need_alpha) {
              T acc = 0;
#pragma omp simd reduction(+ : acc)
              for (int64_t j = 0; j < n; ++j) {
                const T g = prow[j] * (drow[j] - d);
                drow[j] = g;
                acc += g * bias.alpha_grad(zk[j], zi);
              }
              alpha_sum += acc;
            } else {
#pragma omp simd
              for (int64_t j = 0; j < n; ++j) drow[j] = prow[j] * (drow[j] - d);
            }
          }
          // dQ += scale dS K; dK += scale dS^T Q
          gemm<T>(false, false, m, dim, n, scale, ds, n, kt, sk.token, key0 == 0 ? T(0) : T(1),
                  dqb + start * sdq.token, sdq.token);
          gemm<T>(true, false, n, dim, m, scale, ds, n, qs, sq.token, T(1),
                  dkb + key0 * sdk.token, sdk.token);
        }
      }
      alpha_parts[task] = alpha_sum;
    }
  });
  double total = 0;
  for (double part : alpha_parts) total += part;
  return total;
}

void check_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                  const at::Tensor& heights) {
  TORCH_CHECK(q.dim() == 4 && k.sizes() == q.sizes() && v.sizes() == q.sizes(),
              "topoflow attention: query, key and value must share one (B, heads, N, d) shape");
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type() &&
                  q.scalar_type() == heights.scalar_type(),
              "topoflow attention: one dtype expected");
  TORCH_CHECK(q.stride(3) == 1 && k.stride(3) == 1 && v.stride(3) == 1,
              "topoflow attention: head dim must be contiguous");
  TORCH_CHECK(heights.is_contiguous() && heights.size(0) == q.size(0) &&
                  heights.size(1) == q.size(2),
              "topoflow attention: heights must be contiguous (B, N)");
}

at::Tensor like_tokens(const at::Tensor& q) {
  // (B, N, heads, d) storage seen as (B, heads, N, d), as torch's fused CPU kernel returns.
  return at::empty({q.size(0), q.size(2), q.size(1), q.size(3)}, q.options()).transpose(1, 2);
}

std::tuple<at::Tensor, at::Tensor> elevation_attention_forward(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& heights,
    double h_scale, double alpha, double clamp_max, double scale) {
  check_inputs(q, k, v, heights);
  at::Tensor out = like_tokens(q);
  at::Tensor lse = at::empty({q.size(0), q.size(1), q.size(2)}, q.options());
  if (q.numel() == 0) return {out, lse};  // no tokens: no query blocks to size
  if (q.scalar_type() == at::kDouble) {
    const Bias<double> bias{1.0 / h_scale, alpha, clamp_max};
    forward_kernel<double>(q, k, v, heights, bias, scale, out, lse);
  } else {
    TORCH_CHECK(q.scalar_type() == at::kFloat, "topoflow attention: float32 or float64 expected");
    const Bias<float> bias{float(1.0 / h_scale), float(alpha), float(clamp_max)};
    forward_kernel<float>(q, k, v, heights, bias, float(scale), out, lse);
  }
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, double> elevation_attention_backward(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, const at::Tensor& heights, double h_scale,
    double alpha, double clamp_max, double scale, bool need_alpha) {
  check_inputs(q, k, v, heights);
  TORCH_CHECK(grad_out.stride(3) == 1 && out.stride(3) == 1 && lse.is_contiguous(),
              "topoflow attention: bad grad_out/out/lse layout");
  at::Tensor dq = like_tokens(q);
  at::Tensor dk = like_tokens(q).zero_();
  at::Tensor dv = like_tokens(q).zero_();
  double dalpha = 0;
  if (q.scalar_type() == at::kDouble) {
    const Bias<double> bias{1.0 / h_scale, alpha, clamp_max};
    dalpha = backward_kernel<double>(grad_out, q, k, v, out, lse, heights, bias, scale, dq, dk, dv,
                                     need_alpha);
  } else {
    TORCH_CHECK(q.scalar_type() == at::kFloat, "topoflow attention: float32 or float64 expected");
    const Bias<float> bias{float(1.0 / h_scale), float(alpha), float(clamp_max)};
    dalpha = backward_kernel<float>(grad_out, q, k, v, out, lse, heights, bias, float(scale), dq,
                                    dk, dv, need_alpha);
  }
  return {dq, dk, dv, dalpha};
}

}  // namespace

TORCH_LIBRARY(topoflow, m) {
  m.def("elevation_attention_forward(Tensor q, Tensor k, Tensor v, Tensor heights, float h_scale, "
        "float alpha, float clamp_max, float scale) -> (Tensor, Tensor)");
  m.def("elevation_attention_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, "
        "Tensor lse, Tensor heights, float h_scale, float alpha, float clamp_max, float scale, "
        "bool need_alpha) -> (Tensor, Tensor, Tensor, float)");
}

TORCH_LIBRARY_IMPL(topoflow, CPU, m) {
  m.impl("elevation_attention_forward", &elevation_attention_forward);
  m.impl("elevation_attention_backward", &elevation_attention_backward);
}
"""

# Outcome of the one build attempt per process: None untried, True loaded, False unavailable.
_fused_kernel_state: bool | None = None


def _fused_kernel_flags() -> list[str]:
    """Compiler flags: vector instructions only where torch itself found them on this CPU."""
    flags = ["-O3", "-fopenmp-simd", "-fno-math-errno", "-fno-trapping-math"]
    # AVX-512 measured 10-20% faster than AVX2 at head dim 16, where the elementwise passes
    # dominate (B=8, 4 heads, N=128 and 512; the GEMMs are MKL's either way).
    capability = torch.backends.cpu.get_cpu_capability()
    if capability == "AVX512":
        flags.append("-march=x86-64-v4")
    elif capability == "AVX2":
        flags.append("-march=x86-64-v3")
    return flags


def _missing_build_tools() -> str | None:
    """What torch.utils.cpp_extension needs and this machine lacks, in words, or None."""
    from torch.utils.cpp_extension import is_ninja_available

    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        return f"no C++ compiler: {compiler!r} (from $CXX, default 'c++') is not on PATH"
    if not is_ninja_available():
        try:  # PyPI's ninja (a dependency of this package) may sit outside PATH, e.g. in a venv
            import ninja

            os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
        except ImportError:
            pass
    if not is_ninja_available():
        return "no ninja build tool on PATH (pip install ninja)"
    return None


def fused_kernel_available() -> bool:
    """Build (first call of a process tree; cached on disk) and load the fused CPU kernel.

    Returns False, after one warning naming what is missing or what failed, when it cannot be
    built; callers then use the dense or sorted paths.
    """
    global _fused_kernel_state
    if _fused_kernel_state is not None:
        return _fused_kernel_state
    _fused_kernel_state = False
    missing = _missing_build_tools()
    if missing is None:
        try:
            _load_fused_kernel()
            _fused_kernel_state = True
        except Exception as error:  # noqa: BLE001 (any build or load failure means: fall back)
            missing = f"its build failed ({type(error).__name__}: {str(error).strip()[-500:]})"
    if missing is not None:
        warnings.warn(
            f"TopoFlow's fused CPU attention kernel is unavailable: {missing}. Biased attention "
            "falls back to the exact dense/sorted paths, 1.5-6x slower than plain SDPA.",
            RuntimeWarning,
            stacklevel=3,
        )
    return _fused_kernel_state


def _load_fused_kernel() -> None:
    from torch.utils.cpp_extension import get_default_build_root, load

    flags = _fused_kernel_flags()
    key = "\n".join([_FUSED_KERNEL_SOURCE, *flags, torch.__version__])
    name = "topoflow_attention_" + hashlib.sha256(key.encode()).hexdigest()[:16]
    # torch's own rule for the cache root, which get_default_build_root alone does not apply.
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root()
    folder = os.path.join(root, name)
    os.makedirs(folder, exist_ok=True)
    source = os.path.join(folder, "topoflow_attention.cpp")
    if not os.path.exists(source):  # the name is the content's hash: never rewrite (ninja mtimes)
        partial = f"{source}.{os.getpid()}.tmp"
        with open(partial, "w") as handle:
            handle.write(_FUSED_KERNEL_SOURCE)
        os.replace(partial, source)
    load(name, [source], extra_cflags=flags, build_directory=folder, is_python_module=False)


def prefers_fused_path(
    query: torch.Tensor, dropout_p: float, elevation_m: torch.Tensor, h_scale: torch.Tensor
) -> bool:
    """Whether `sdpa` can run fused_elevation_attention here (building it on first call).

    Measured on the 2-core machine (`benchmarks/attention.py`, one thread, CPU time, biased /
    plain SDPA forward+backward, B x heads x N x head dim): 8x4x128x16 1.24x, 8x4x512x16 1.02x,
    8x8x512x96 0.99x, 8x8x1024x96 1.01x, 8x8x2048x96 0.98x, 1x8x4096x96 1.04x, 1x8x8192x96 0.91x,
    where the dense/sorted paths took 3.27x, 3.56x, 2.07x, 2.14x, 1.94x, 1.57x, 1.78x. It wins at
    every size, so there is no size rule: CPU, no dropout, float inputs, no gradient wanted for
    the heights or H_scale (the kernel does not compute those).
    """
    wants_height_grads = torch.is_grad_enabled() and (
        elevation_m.requires_grad or (isinstance(h_scale, torch.Tensor) and h_scale.requires_grad)
    )
    # Under torch.compile and torch.export the op has no shape function and alpha's value is not
    # known; the traceable paths serve them.
    return (
        query.device.type == "cpu"
        and dropout_p == 0
        and query.dtype in (torch.float32, torch.float64, torch.bfloat16)
        and not wants_height_grads
        and not torch.compiler.is_compiling()
        and fused_kernel_available()
    )


def fused_elevation_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    elevation_m: torch.Tensor,
    alpha: torch.Tensor | float,
    h_scale: torch.Tensor | float,
    clamp_max: float,
) -> torch.Tensor:
    """Elevation-biased attention by the fused C++ CPU kernel; exact for every alpha, H and clamp.

    (B, heads, N, head_dim) in and out, memory O(N) beyond the inputs. Gradients: query, key,
    value and alpha (the heights and h_scale are treated as constants). Raises RuntimeError when
    the kernel cannot be built (see fused_kernel_available).
    """
    _check_shapes(query, key, value, elevation_m)
    if query.device.type != "cpu":
        raise ValueError(f"fused_elevation_attention runs on CPU; got {query.device.type} tensors.")
    if not fused_kernel_available():
        raise RuntimeError("the fused CPU attention kernel could not be built; see the warning")
    dtype = query.dtype
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    if not isinstance(alpha, torch.Tensor):
        alpha = torch.tensor(alpha, dtype=compute)
    heights = elevation_m.detach().to(compute).contiguous()
    h_value = float(h_scale.detach()) if isinstance(h_scale, torch.Tensor) else float(h_scale)
    out = _FusedElevationAttention.apply(
        *(t.to(compute) for t in (query, key, value)), heights, alpha, h_value, clamp_max
    )
    return out.to(dtype)


class _FusedElevationAttention(torch.autograd.Function):
    """See the comment above _FUSED_KERNEL_SOURCE."""

    @staticmethod
    def forward(ctx, query, key, value, heights, alpha, h_scale, clamp_max):  # noqa: ANN001, ANN205
        scale = query.shape[-1] ** -0.5
        constants = (h_scale, float(alpha.detach()), float(clamp_max), scale)
        out, lse = torch.ops.topoflow.elevation_attention_forward(
            query, key, value, heights, *constants
        )
        ctx.save_for_backward(query, key, value, heights, out, lse, alpha)
        ctx.constants = constants
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):  # noqa: ANN001, ANN205
        query, key, value, heights, out, lse, alpha = ctx.saved_tensors
        if grad_output.stride(-1) != 1:
            grad_output = grad_output.contiguous()
        grad_q, grad_k, grad_v, grad_alpha = torch.ops.topoflow.elevation_attention_backward(
            grad_output, query, key, value, out, lse, heights, *ctx.constants,
            ctx.needs_input_grad[4],
        )  # fmt: skip
        grad_alpha = torch.tensor(grad_alpha, dtype=alpha.dtype).reshape(alpha.shape)
        return grad_q, grad_k, grad_v, None, grad_alpha, None, None


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
        if prefers_fused_path(query, dropout_p, elevation_m, h_scale):
            return fused_elevation_attention(
                query, key, value, elevation_m=elevation_m, alpha=alpha, h_scale=h_scale,
                clamp_max=clamp_max,
            )  # fmt: skip
        if prefers_dense_path(query, dropout_p):
            return dense_elevation_attention(
                query, key, value, elevation_m=elevation_m, alpha=alpha, h_scale=h_scale,
                clamp_max=clamp_max,
            )  # fmt: skip
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
