"""TopoFlow: a ClimaX-style Vision Transformer for air-quality forecasting whose attention can be
biased by terrain elevation.

The file reads in the order data flows: embeddings, attention, block, PreTrainedModel,
TopoFlowModel (encoder), TopoFlowForForecasting (head + loss). The elevation bias and the attention
kernels live in attention_topoflow.py; their names are re-exported here so that
`from modeling_topoflow import ...` keeps working.

Hub remote code: imports torch and transformers only (never `topoflow/`, datasets or accelerate).
"""

from __future__ import annotations

import hashlib
import math
import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AttentionInterface, PreTrainedModel
from transformers import initialization as init
from transformers.utils import ModelOutput

try:
    from .attention_topoflow import (
        ATTENTION_IMPLEMENTATIONS,
        chunked_elevation_attention,
        clamp_is_inactive,
        dense_elevation_attention,
        eager_elevation_attention,
        elevation_bias_between,
        elevation_bias_matrix,
        elevation_biased_attention,
        endpoint_rise,
        oriented_ascent,
        oriented_elevation,
        path_ascent_matrix,
        plain_attention,
        rise_bias,
        rise_biased_attention,
        sorted_elevation_attention,
    )
    from .configuration_topoflow import TopoFlowConfig
except ImportError:
    from attention_topoflow import (
        ATTENTION_IMPLEMENTATIONS,
        chunked_elevation_attention,
        clamp_is_inactive,
        dense_elevation_attention,
        eager_elevation_attention,
        elevation_bias_between,
        elevation_bias_matrix,
        elevation_biased_attention,
        endpoint_rise,
        oriented_ascent,
        oriented_elevation,
        path_ascent_matrix,
        plain_attention,
        rise_bias,
        rise_biased_attention,
        sorted_elevation_attention,
    )
    from configuration_topoflow import TopoFlowConfig

__all__ = [
    "ATTENTION_IMPLEMENTATIONS",
    "MANIFEST_FILENAME",
    "ManifestError",
    "NonFiniteWeightsError",
    "PickleFileError",
    "check_finite_state_dict",
    "read_manifest",
    "refuse_nonfinite_keys",
    "refuse_pickle_files",
    "verify_manifest",
    "verify_pretrained_files",
    "write_manifest",
    "CLIMATOLOGY_TERMS",
    "TopoFlowClimatology",
    "TopoFlowForForecasting",
    "TopoFlowForecastOutput",
    "TopoFlowModel",
    "TopoFlowModelOutput",
    "TopoFlowPreTrainedModel",
    "chunked_elevation_attention",
    "clamp_is_inactive",
    "climatology_basis",
    "dense_elevation_attention",
    "eager_elevation_attention",
    "elevation_bias_between",
    "elevation_bias_matrix",
    "oriented_elevation",
    "sorted_elevation_attention",
    "elevation_biased_attention",
    "masked_mse",
    "patch_mean_elevation",
    "plain_attention",
    "shuffle_patch_heights",
    "sincos_position_embedding_2d",
    "sincos_embedding_1d",
]


def sincos_embedding_1d(dim: int, positions: torch.Tensor) -> torch.Tensor:
    """(len(positions), dim) sin-cos table: half sines, half cosines (zero-padded if dim is odd)."""
    half = dim // 2
    omega = 1.0 / 10000 ** (torch.arange(half, dtype=torch.float64) / max(half, 1))
    angles = positions.double()[:, None] * omega[None, :]  # (P, half)
    table = torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)
    return F.pad(table, (0, dim - table.shape[1])).float()


def sincos_position_embedding_2d(dim: int, grid_height: int, grid_width: int) -> torch.Tensor:
    """(grid_height * grid_width, dim) table, row-major patches: half the channels encode the row,
    half the column (MAE / ClimaX style)."""
    half = dim // 2
    rows = torch.arange(grid_height).repeat_interleave(grid_width)
    cols = torch.arange(grid_width).repeat(grid_height)
    table = torch.cat([sincos_embedding_1d(half, rows), sincos_embedding_1d(half, cols)], dim=1)
    return F.pad(table, (0, dim - table.shape[1]))


def patch_mean_elevation(elevation_m: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(B, H, W) metres -> (B, N) mean metres per patch, row-major like the tokens."""
    pooled = F.avg_pool2d(elevation_m[:, None].float(), kernel_size=patch_size)  # (B, 1, h, w)
    return pooled.flatten(1)


# Terms of the harmonic climatology of `forecast_target="anomaly"` (see `climatology_basis`).
CLIMATOLOGY_TERMS = 13


def climatology_basis(day: torch.Tensor, year: torch.Tensor) -> torch.Tensor:
    """(..., 2) (sin, cos) of the day and year phases -> (..., CLIMATOLOGY_TERMS) terms.

    A constant, the first two harmonics of the day and of the year, and the products of the
    first harmonics (a diurnal cycle whose amplitude and phase change with the season). Two
    harmonics of the day are all a 6-hourly corpus can resolve (4 times of day); on the default
    corpus these 13 terms score 0.367 on the 2018 test split against 0.372 for the
    month x hour-of-day climatology, whose bins hold few samples each.
    """
    day_sin, day_cos = day.unbind(-1)
    year_sin, year_cos = year.unbind(-1)
    return torch.stack([
        torch.ones_like(day_sin),
        day_sin, day_cos, 2 * day_sin * day_cos, day_cos**2 - day_sin**2,
        year_sin, year_cos, 2 * year_sin * year_cos, year_cos**2 - year_sin**2,
        day_sin * year_sin, day_sin * year_cos, day_cos * year_sin, day_cos * year_cos,
    ], dim=-1)  # fmt: skip


class TopoFlowClimatology(nn.Module):
    """The normalized climatology of each target, per cell, at a calendar time.

    `coefficients` `(V_out, CLIMATOLOGY_TERMS, H, W)` is a buffer, saved with the weights: a
    statistic of the training split (fitted by `topoflow/data/anomaly_base.py`), like the
    normalization, so training never changes it and a checkpoint without it fails to load.
    """

    def __init__(self, config: TopoFlowConfig) -> None:
        super().__init__()
        shape = (len(config.target_variables), CLIMATOLOGY_TERMS, *config.img_size)
        self.register_buffer("coefficients", torch.zeros(shape))
        names = list(config.time_features)
        # Column of each (sin, cos) pair in the batch's time_features tensor.
        self.columns = {
            moment: {span: 2 * names.index(f"{moment}_time_of_{span}") for span in ("day", "year")}
            for moment in ("init", "valid")
        }  # fmt: skip

    def forward(self, time_features: torch.Tensor, moment: str) -> torch.Tensor:
        """(B, 2 * len(time_features)) -> (B, V_out, H, W) at the init or valid time."""
        day, year = (
            time_features[:, self.columns[moment][span] : self.columns[moment][span] + 2]
            for span in ("day", "year")
        )
        terms = climatology_basis(day.double(), year.double()).to(self.coefficients.dtype)
        return torch.einsum("bk,vkhw->bvhw", terms, self.coefficients)


# Seed of the placebo's permutations in evaluation, so a placebo model evaluates repeatably.
PLACEBO_EVAL_SEED = 0


def shuffle_patch_heights(
    elevation_m: torch.Tensor, generator: torch.Generator | None = None
) -> torch.Tensor:
    """The placebo's heights: each sample's (B, N) patch heights in an independent random order.

    The values (and so the height distribution, the spread, the mean rise) are kept; which patch
    has which height, the geography, is not. `generator` (a CPU generator) fixes the order.
    """
    keys = torch.rand(elevation_m.shape, generator=generator)  # (B, N) on the CPU
    order = keys.argsort(dim=1).to(elevation_m.device)
    return elevation_m.gather(1, order)


def shuffle_patch_pairs(
    ascent_m: torch.Tensor, generator: torch.Generator | None = None
) -> torch.Tensor:
    """The placebo of a (B, N, N) pairwise matrix: each sample's patches in an independent random
    order, the same order on both axes, so every value (and each patch's row and column of
    values) is kept and only which patch sits where is lost."""
    batch, count, _ = ascent_m.shape
    keys = torch.rand((batch, count), generator=generator)
    order = keys.argsort(dim=1).to(ascent_m.device)
    rows = ascent_m.gather(1, order[:, :, None].expand(-1, -1, count))
    return rows.gather(2, order[:, None, :].expand(-1, count, -1))


@dataclass
class TopoFlowModelOutput(ModelOutput):
    """Encoder output.

    Args:
        last_hidden_state (`torch.Tensor` of shape `(B, N, D)`): tokens after the final LayerNorm.
        hidden_states (`tuple[torch.Tensor]`, *optional*): `depth + 1` tensors of shape `(B, N, D)`:
            the embeddings, then each block's output; returned with `output_hidden_states=True`.
        attentions (`tuple[torch.Tensor]`, *optional*): `depth` tensors of shape
            `(B, heads, N, N)`: each block's attention probabilities after the softmax, elevation
            bias included; returned with `output_attentions=True`.
    """

    last_hidden_state: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None


@dataclass
class TopoFlowForecastOutput(ModelOutput):
    """Forecast output (docs/CONTRACTS.md section 1).

    Args:
        loss (`torch.Tensor`, scalar, *optional*): MSE over the valid cells
            (`region_mask & isfinite(labels)`) of the whole batch, every target weighted equally
            per cell; `0 * forecast.sum()` when no cell is valid. Returned when `labels` are given.
        per_sample_loss (`torch.Tensor` of shape `(B,)`, *optional*): the MSE of each sample, NaN
            for a sample with no valid cell.
        num_valid (`torch.Tensor` of shape `(B,)`, int64, *optional*): valid cells x variables per
            sample.
        forecast (`torch.Tensor` of shape `(B, V_out, H, W)`): the targets at the lead time,
            normalized.
        hidden_states (`tuple[torch.Tensor]`, *optional*): see `TopoFlowModelOutput`.
        sample_ids (`torch.Tensor` of shape `(B,)`, *optional*): echoed from the input.
        attentions (`tuple[torch.Tensor]`, *optional*): see `TopoFlowModelOutput`.
    """

    loss: torch.Tensor | None = None
    per_sample_loss: torch.Tensor | None = None
    num_valid: torch.Tensor | None = None
    forecast: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    sample_ids: torch.Tensor | None = None
    attentions: tuple[torch.Tensor, ...] | None = None


class TopoFlowVariableAggregation(nn.Module):
    """ClimaX's variable aggregation: one learnable query attends over the V variable tokens of each
    patch, (M, 1, D) query and (M, V, D) tokens -> (M, 1, D).

    The parameters and their names are nn.MultiheadAttention's (`in_proj_weight`, `in_proj_bias`,
    `out_proj`), so checkpoints load unchanged. It is written out because nn.MultiheadAttention
    reads `out_proj.weight` without calling `out_proj`, so accelerate's offload hooks (a
    `device_map` that offloads the embeddings) never load it ("Tensor on device meta").
    """

    def __init__(self, config: TopoFlowConfig) -> None:
        super().__init__()
        dim = config.embed_dim
        self.num_heads = config.num_heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim))
        self.in_proj_bias = nn.Parameter(torch.empty(3 * dim))
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, query: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        weight_q, weight_k, weight_v = self.in_proj_weight.chunk(3)
        bias_q, bias_k, bias_v = self.in_proj_bias.chunk(3)
        query = self._split_heads(F.linear(query, weight_q, bias_q))  # (M, heads, 1, head_dim)
        key = self._split_heads(F.linear(tokens, weight_k, bias_k))  # (M, heads, V, head_dim)
        value = self._split_heads(F.linear(tokens, weight_v, bias_v))
        attended = F.scaled_dot_product_attention(query, key, value)  # (M, heads, 1, head_dim)
        attended = attended.transpose(1, 2).reshape(query.shape[0], 1, -1)  # (M, 1, D)
        return self.out_proj(attended)

    def _split_heads(self, tokens: torch.Tensor) -> torch.Tensor:
        rows, length, dim = tokens.shape
        return tokens.reshape(rows, length, self.num_heads, dim // self.num_heads).transpose(1, 2)


class TopoFlowEmbeddings(nn.Module):
    """Per-variable patch embedding (optionally LayerNorm-ed), variable embedding, variable
    aggregation by a learnable query, position and lead-time embeddings: (B, V, H, W) fields ->
    (B, N, D) tokens."""

    def __init__(self, config: TopoFlowConfig) -> None:
        super().__init__()
        self.config = config
        num_variables, dim = len(config.variables), config.embed_dim
        # One kernel per input variable: a conv with groups=V is V independent patch embeddings.
        self.token_embed = nn.Conv2d(
            num_variables, num_variables * dim, kernel_size=config.patch_size,
            stride=config.patch_size, groups=num_variables,
        )  # fmt: skip
        # The TopoFlow paper code normalizes each variable's tokens before the variable embedding.
        self.patch_embed_norm = nn.LayerNorm(dim) if config.patch_embed_norm else None
        self.var_embed = nn.Parameter(torch.zeros(1, num_variables, dim))
        self.var_query = nn.Parameter(torch.zeros(1, 1, dim))
        self.var_agg = TopoFlowVariableAggregation(config)
        self.pos_embed = nn.Parameter(torch.zeros(1, config.num_patches, dim))
        self.lead_time_embed = nn.Linear(1, dim)
        # Calendar inputs (config.time_features), added to every token like the lead time; only
        # built when declared, so configs without them keep ClimaX's exact set of weights.
        self.time_embed = (
            nn.Linear(2 * len(config.time_features), dim) if config.time_features else None
        )
        self.dropout = nn.Dropout(config.drop_rate)

    def forward(
        self,
        fields: torch.Tensor,
        lead_time_hours: torch.Tensor,
        time_features: torch.Tensor | None = None,
    ) -> torch.Tensor:
        batch, num_variables = fields.shape[:2]
        tokens = self.token_embed(fields)  # (B, V * D, h, w)
        tokens = tokens.reshape(batch, num_variables, -1, self.config.num_patches)
        tokens = tokens.transpose(2, 3)  # (B, V, N, D)
        if self.patch_embed_norm is not None:
            tokens = self.patch_embed_norm(tokens)
        tokens = tokens + self.var_embed[:, :, None]
        tokens = self._aggregate_variables(tokens)  # (B, N, D)
        tokens = tokens + self.pos_embed
        scale = self.config.lead_time_scale_hours
        lead = (lead_time_hours.to(tokens.dtype) / scale)[:, None]  # (B, 1)
        tokens = tokens + self.lead_time_embed(lead)[:, None]  # (B, 1, D) broadcast over N
        if self.time_embed is not None:
            tokens = tokens + self.time_embed(time_features.to(tokens.dtype))[:, None]
        return self.dropout(tokens)

    def _aggregate_variables(self, tokens: torch.Tensor) -> torch.Tensor:
        batch, _, num_patches, dim = tokens.shape
        per_patch = tokens.transpose(1, 2).reshape(batch * num_patches, -1, dim)  # (B*N, V, D)
        query = self.var_query.expand(per_patch.shape[0], -1, -1)  # (B*N, 1, D)
        aggregated = self.var_agg(query, per_patch)
        return aggregated.reshape(batch, num_patches, dim)


def eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' eager attention signature: (B, heads, N, head_dim) in, (B, N, heads, head_dim)
    out with the (B, heads, N, N) probabilities, for `output_attentions=True`.

    `attention_mask` is additive (here the elevation bias, (B, 1, N, N)). The kernels above never
    return probabilities; this is the one path that does, so it materializes them.
    """
    scores = torch.matmul(query, key.transpose(-1, -2)) * scaling
    if attention_mask is not None:
        scores = scores + attention_mask.to(scores.dtype)
    # Softmax in at least float32, as the eager kernel above.
    softmax_dtype = torch.promote_types(scores.dtype, torch.float32)
    weights = torch.softmax(scores.to(softmax_dtype), dim=-1).to(query.dtype)
    dropped = F.dropout(weights, p=dropout, training=dropout > 0)
    return torch.matmul(dropped, value).transpose(1, 2), weights


class TopoFlowAttention(nn.Module):
    """Multi-head self-attention (timm layout: fused qkv, proj) with the optional elevation bias.

    `config._attn_implementation` picks the kernel: this file's exact elevation-biased kernels for
    "eager", "sdpa" and "flex_attention"; any other name registered with transformers'
    `AttentionInterface` is called the transformers way, with the elevation bias as its additive
    (B, 1, N, N) `attention_mask` (materialized, so for moderate N only).
    """

    is_causal = False

    def __init__(self, config: TopoFlowConfig, layer_idx: int) -> None:
        super().__init__()
        self.config = config
        self.num_heads = config.num_heads
        self.has_elevation_bias = layer_idx in config.elevation_bias_blocks
        self.qkv = nn.Linear(config.embed_dim, 3 * config.embed_dim)
        self.proj = nn.Linear(config.embed_dim, config.embed_dim)
        self.proj_drop = nn.Dropout(config.drop_rate)
        if self.has_elevation_bias:
            shape = (config.num_heads,) if config.elevation_alpha_per_head else ()
            self.elevation_alpha = nn.Parameter(torch.full(shape, config.elevation_alpha_init))
            # A persistent buffer: H_scale travels with the checkpoint but is not trained. Always
            # float32 (also under from_pretrained(dtype=bfloat16), which builds the model with
            # bf16 as default dtype): bf16 reads 1500 m as 1504 m.
            self.register_buffer(
                "H_scale", torch.tensor(config.elevation_scale, dtype=torch.float32),
                persistent=True,
            )  # fmt: skip

    def forward(
        self,
        hidden: torch.Tensor,
        elevation_m: torch.Tensor | None,
        output_attentions: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(B, N, D) -> (B, N, D), and the (B, heads, N, N) probabilities if output_attentions."""
        batch, num_tokens, dim = hidden.shape
        qkv = self.qkv(hidden).reshape(batch, num_tokens, 3, self.num_heads, dim // self.num_heads)
        query, key, value = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, heads, N, head_dim)
        implementation = self.config._attn_implementation or "sdpa"
        dropout_p = self.config.attention_dropout if self.training else 0.0
        if output_attentions or implementation not in ATTENTION_IMPLEMENTATIONS:
            # Only eager attention has probabilities to return (transformers does the same).
            attended, weights = self._interface_attention(
                query, key, value, elevation_m, dropout_p,
                "eager" if output_attentions else implementation,
            )  # fmt: skip
            attended = attended.reshape(batch, num_tokens, dim)
            return self.proj_drop(self.proj(attended)), weights
        if self.has_elevation_bias and self.materializes_bias:
            attended = rise_biased_attention(
                query, key, value, rise_m=self._rise(elevation_m),
                alpha=self.nonnegative_alpha(), h_scale=self.H_scale,
                clamp_max=self.config.elevation_bias_clamp, implementation=implementation,
                dropout_p=dropout_p,
            )  # fmt: skip
        elif self.has_elevation_bias:
            heights = oriented_elevation(elevation_m, self.config.elevation_bias_direction)
            attended = elevation_biased_attention(
                query, key, value, elevation_m=heights, alpha=self.nonnegative_alpha(),
                h_scale=self.H_scale, clamp_max=self.config.elevation_bias_clamp,
                implementation=implementation, dropout_p=dropout_p,
            )  # fmt: skip
        else:
            attended = plain_attention(
                query, key, value, implementation=implementation, dropout_p=dropout_p
            )
        attended = attended.transpose(1, 2).reshape(batch, num_tokens, dim)
        return self.proj_drop(self.proj(attended)), None

    def _interface_attention(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        elevation_m: torch.Tensor | None,
        dropout_p: float,
        implementation: str,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Attention through transformers' interface: (B, N, heads, head_dim) and the weights."""
        bias = None
        if self.has_elevation_bias and self.materializes_bias:
            bias = rise_bias(
                self._rise(elevation_m), alpha=self.nonnegative_alpha(), h_scale=self.H_scale,
                clamp_max=self.config.elevation_bias_clamp,
            ).to(query.dtype)  # (B, 1 or heads, N, N)  # fmt: skip
        elif self.has_elevation_bias:
            heights = oriented_elevation(elevation_m, self.config.elevation_bias_direction)
            bias = elevation_bias_matrix(
                heights, alpha=self.nonnegative_alpha(), h_scale=self.H_scale,
                clamp_max=self.config.elevation_bias_clamp,
            )[:, None].to(query.dtype)  # (B, 1, N, N), shared by all heads  # fmt: skip
        if implementation == "eager":
            attention = eager_attention_forward
        else:
            attention = AttentionInterface().get_interface(implementation, None)
        return attention(
            self, query, key, value, bias, scaling=query.shape[-1] ** -0.5, dropout=dropout_p,
            is_causal=False,
        )  # fmt: skip

    @property
    def materializes_bias(self) -> bool:
        """Whether the bias is built as a (B, 1 or heads, N, N) tensor: the oracle's path ascent
        and one alpha per head do not fit the fast kernels' one-alpha, per-token-height form."""
        return self.config.elevation_bias_rise == "path" or self.config.elevation_alpha_per_head

    def _rise(self, elevation_m: torch.Tensor) -> torch.Tensor:
        """(B, N, N) rise in metres the materialized bias reads, oriented by the direction."""
        direction = self.config.elevation_bias_direction
        if self.config.elevation_bias_rise == "path":
            return oriented_ascent(elevation_m, direction)
        return endpoint_rise(oriented_elevation(elevation_m, direction))

    def nonnegative_alpha(self) -> torch.Tensor:
        """alpha as the bias uses it: max(alpha, 0) in value, with the gradient passed to alpha.

        For alpha < 0 the clamped bias is 0 everywhere and d(bias)/d(alpha) is exactly 0, so an
        alpha that one optimizer step pushes below 0 would stay there for good, in any training
        loop (plain optimizer, transformers' Trainer, ours). The model keeps its own bias alive
        instead of relying on the loop: the bias sees max(alpha, 0), whose value at 0 is what
        the loss's gradient is taken at, and that gradient reaches alpha unchanged (straight
        through), so alpha grows again as soon as the loss asks for it. In training the stored
        parameter is also projected back onto alpha >= 0 before use, so the checkpoint's
        `elevation_alpha` is the value the bias used (projected gradient descent); compiled or
        exported graphs skip the in-place projection and rely on the straight-through value.
        At alpha >= 0 both are the identity: step-0 forecasts and the checkpoint key are unchanged.
        """
        alpha = self.elevation_alpha
        if self.training and not torch.compiler.is_compiling():
            with torch.no_grad():
                alpha.clamp_(min=0.0)
        return alpha + (alpha.clamp(min=0.0) - alpha).detach()


class TopoFlowMLP(nn.Module):
    def __init__(self, config: TopoFlowConfig) -> None:
        super().__init__()
        hidden_dim = int(config.embed_dim * config.mlp_ratio)
        self.fc1 = nn.Linear(config.embed_dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, config.embed_dim)
        self.dropout = nn.Dropout(config.drop_rate)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.fc2(self.dropout(self.act(self.fc1(hidden)))))


class TopoFlowDropPath(nn.Module):
    """Stochastic depth: drops the whole residual branch of a sample with probability `rate`."""

    def __init__(self, rate: float) -> None:
        super().__init__()
        self.rate = rate

    def forward(self, branch: torch.Tensor) -> torch.Tensor:
        if not self.training or self.rate == 0.0:
            return branch
        keep = 1.0 - self.rate
        mask = branch.new_empty((branch.shape[0],) + (1,) * (branch.ndim - 1)).bernoulli_(keep)
        return branch * mask / keep


class TopoFlowBlock(nn.Module):
    """Pre-LN transformer block (timm `Block` layout, so ClimaX weights map by name)."""

    def __init__(self, config: TopoFlowConfig, layer_idx: int) -> None:
        super().__init__()
        # Linear stochastic-depth schedule from 0 to drop_path, as ClimaX; plain floats so building
        # on the meta device (transformers' loading path) never calls .item() on a meta tensor.
        rate = config.drop_path * layer_idx / max(config.depth - 1, 1)
        self.norm1 = nn.LayerNorm(config.embed_dim)
        self.attn = TopoFlowAttention(config, layer_idx)
        self.norm2 = nn.LayerNorm(config.embed_dim)
        self.mlp = TopoFlowMLP(config)
        self.drop_path = TopoFlowDropPath(rate)

    def forward(
        self,
        hidden: torch.Tensor,
        elevation_m: torch.Tensor | None,
        output_attentions: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        attended, weights = self.attn(self.norm1(hidden), elevation_m, output_attentions)
        hidden = hidden + self.drop_path(attended)
        return hidden + self.drop_path(self.mlp(self.norm2(hidden))), weights


# Weight integrity, here and not in `topoflow/` so that a Hub user's
# `AutoModel.from_pretrained(folder, trust_remote_code=True)` checks it with only torch and
# transformers installed. safetensors stores no checksum: a flipped byte in a weight file loads
# silently as a slightly different number. A model folder therefore carries a `SHA256SUMS` manifest
# in the format of coreutils' `sha256sum` (`<hex>  <relative path>` per line), covering the files
# that decide what a load produces: weights, configuration and metadata (*.json) and remote code
# (*.py). The model card (README.md) and plots are left out so a card edited in the Hub's browser
# editor does not make the weights unloadable.
MANIFEST_FILENAME = "SHA256SUMS"
COVERED_SUFFIXES = (".safetensors", ".json", ".py")
# Formats that torch.load / pickle would deserialize; loading one can execute arbitrary code.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")


class ManifestError(ValueError):
    """A model folder's SHA256SUMS is missing, malformed, or does not match the files."""


class NonFiniteWeightsError(ValueError):
    """A state dict or weight file holds NaN or Inf values."""


class PickleFileError(ValueError):
    """A model folder holds a pickle-based weight file, which this project never loads."""


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in chunks so multi-GB shards do not need to fit in memory."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _visible_files(folder: Path) -> list[Path]:
    """Regular files under `folder`, relative, skipping hidden entries such as `.git` or the
    `.cache` that `snapshot_download(local_dir=...)` creates."""
    found = []
    for path in sorted(folder.rglob("*")):
        relative = path.relative_to(folder)
        if not any(part.startswith(".") for part in relative.parts) and path.is_file():
            found.append(relative)
    return found


def find_pickle_files(folder: str | os.PathLike) -> list[str]:
    """Relative paths of pickle-format files (`.bin`, `.pt`, ...) in `folder`."""
    return [rel.as_posix() for rel in _visible_files(Path(folder)) if rel.suffix in PICKLE_SUFFIXES]


def refuse_pickle_files(folder: str | os.PathLike) -> None:
    """Raise PickleFileError if `folder` holds any pickle-format file."""
    found = find_pickle_files(folder)
    if found:
        raise PickleFileError(
            f"model folder {folder} holds pickle-format files {found}; TopoFlow loads and writes "
            "safetensors only (unpickling can run arbitrary code). Convert them to safetensors."
        )


def write_manifest(folder: str | os.PathLike) -> Path:
    """Write `folder`/SHA256SUMS over every weight, json and Python file; return its path."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"cannot write a manifest: model folder {folder} does not exist")
    refuse_pickle_files(folder)
    covered = [rel for rel in _visible_files(folder) if rel.suffix in COVERED_SUFFIXES]
    lines = [f"{sha256_file(folder / rel)}  {rel.as_posix()}\n" for rel in covered]
    if not any(rel.suffix == ".safetensors" for rel in covered):
        raise ManifestError(f"model folder {folder} holds no *.safetensors weight file")
    manifest = folder / MANIFEST_FILENAME
    temporary = manifest.with_name(MANIFEST_FILENAME + ".tmp")
    temporary.write_text("".join(lines), encoding="utf-8")
    os.replace(temporary, manifest)
    return manifest


def parse_manifest(text: str, source: str) -> dict[str, str]:
    """{relative posix path: hex digest} from the text of a SHA256SUMS file."""
    entries: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        digest, sep, name = line.partition("  ")
        malformed = not sep or len(digest) != 64 or not name
        if malformed or name.startswith("/") or ".." in Path(name).parts:
            raise ManifestError(f"{source} line {number} is malformed: {line!r}")
        entries[name] = digest.lower()
    if not entries:
        raise ManifestError(f"{source} lists no file")
    return entries


def read_manifest(folder: str | os.PathLike) -> dict[str, str]:
    """Parse `folder`/SHA256SUMS into {relative posix path: hex digest}."""
    manifest = Path(folder) / MANIFEST_FILENAME
    if not manifest.is_file():
        raise ManifestError(
            f"{manifest} is missing: the weights cannot be checked (write it with "
            "topoflow.safety.write_manifest, or export the model with python -m topoflow.export)"
        )
    return parse_manifest(manifest.read_text(encoding="utf-8"), str(manifest))


def manifest_problems(expected: dict[str, str], locate: Callable[[str], Path | None]) -> list[str]:
    """One line per listed file that `locate` cannot find or whose sha256 differs."""
    problems = []
    for name, digest in expected.items():
        path = locate(name)
        if path is None or not path.is_file():
            problems.append(f"{name}: listed in {MANIFEST_FILENAME} but missing")
        elif sha256_file(path) != digest:
            problems.append(
                f"{name}: sha256 differs from {MANIFEST_FILENAME} (file corrupted or altered)"
            )
    return problems


def verify_manifest(folder: str | os.PathLike) -> None:
    """Raise ManifestError naming every file whose bytes differ from SHA256SUMS, every listed
    file that is missing, and every weight/json/code file that the manifest does not list."""
    folder = Path(folder)
    expected = read_manifest(folder)
    problems = manifest_problems(expected, lambda name: folder / name)
    for rel in _visible_files(folder):
        if rel.suffix in COVERED_SUFFIXES and rel.as_posix() not in expected:
            problems.append(f"{rel.as_posix()}: present but not listed in {MANIFEST_FILENAME}")
    if problems:
        raise ManifestError(
            f"model folder {folder} fails its checksum manifest:\n  " + "\n  ".join(problems)
        )


def nonfinite_keys(tensors: Mapping[str, torch.Tensor]) -> list[str]:
    """Names of floating-point tensors holding any NaN or Inf, in the mapping's order.

    Tensors on the meta device (offloaded by a `device_map`) hold no values to check here; their
    bytes were checked against SHA256SUMS before loading.
    """
    return [
        name
        for name, tensor in tensors.items()
        if tensor.is_floating_point()
        and tensor.device.type != "meta"
        and not bool(torch.isfinite(tensor).all())
    ]


def check_finite_state_dict(
    state_dict: Mapping[str, torch.Tensor], *, where: str = "state dict"
) -> None:
    """Raise NonFiniteWeightsError listing every key of `state_dict` with NaN or Inf values."""
    refuse_nonfinite_keys(nonfinite_keys(state_dict), where)


def refuse_nonfinite_keys(keys: Sequence[str], where: str) -> None:
    """Raise NonFiniteWeightsError listing `keys` (tensors found to hold NaN or Inf) in `where`."""
    if keys:
        shown = ", ".join(keys[:20]) + (f" ... ({len(keys)} in all)" if len(keys) > 20 else "")
        raise NonFiniteWeightsError(f"{where} holds NaN or Inf weights in: {shown}")


def verify_pretrained_files(name_or_path: str | os.PathLike, **hub_kwargs: Any) -> None:
    """Check the SHA256SUMS of what `from_pretrained(name_or_path)` is about to load.

    A local folder is checked in full (every covered file listed and intact, no pickle files); a
    Hub repo has its manifest and every file it lists fetched through transformers' cache and
    checked. A folder or repo without a manifest loads with a warning: nothing can be checked.
    """
    if os.path.isdir(name_or_path):
        refuse_pickle_files(name_or_path)
        if (Path(name_or_path) / MANIFEST_FILENAME).is_file():
            verify_manifest(name_or_path)
        else:
            _warn_unchecked(f"model folder {name_or_path}")
        return
    from transformers.utils import cached_file

    def fetch(filename: str) -> Path | None:
        found = cached_file(
            name_or_path, filename, _raise_exceptions_for_missing_entries=False,
            _raise_exceptions_for_connection_errors=False, **hub_kwargs,
        )  # fmt: skip
        return None if found is None else Path(found)

    manifest = fetch(MANIFEST_FILENAME)
    if manifest is None:
        _warn_unchecked(f"model repo {name_or_path}")
        return
    source = f"{name_or_path}/{MANIFEST_FILENAME}"
    problems = manifest_problems(parse_manifest(manifest.read_text(encoding="utf-8"), source),
                                 fetch)  # fmt: skip
    if problems:
        raise ManifestError(
            f"model repo {name_or_path} fails its checksum manifest:\n  " + "\n  ".join(problems)
        )


def _warn_unchecked(what: str) -> None:
    warnings.warn(
        f"{what} has no {MANIFEST_FILENAME}: its weights cannot be checked for corruption "
        f"(save_pretrained writes one; add it with topoflow.safety.write_manifest if you trust "
        f"the files)",
        stacklevel=3,
    )


class TopoFlowPreTrainedModel(PreTrainedModel):
    config_class = TopoFlowConfig
    base_model_prefix = "topoflow"
    main_input_name = "fields"
    supports_gradient_checkpointing = True
    _no_split_modules = ["TopoFlowBlock"]
    _supports_sdpa = True
    _supports_flex_attn = True
    # H_scale in metres must stay exact under dtype=torch.bfloat16 (bf16 reads 1500 m as 1504).
    _keep_in_fp32_modules_strict = ["H_scale"]
    # Functions fn(name) -> local folder or None, tried by `from_pretrained` before the Hub (e.g.
    # the packaged "topoflow-base"); registered by the `topoflow` library, empty for Hub users.
    _name_resolvers: ClassVar[list[Callable[[str], str | os.PathLike | None]]] = []

    def __init__(self, config: TopoFlowConfig, *inputs: Any, **kwargs: Any) -> None:
        # from_pretrained applies config overrides with setattr, after TopoFlowConfig.__init__
        # validated; check again before building anything from them.
        config.check_topoflow()
        super().__init__(config, *inputs, **kwargs)

    @classmethod
    def _can_set_attn_implementation(cls) -> bool:
        # transformers guesses this from the source text; we read config._attn_implementation on
        # every forward, so `set_attn_implementation` works.
        return True

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        # transformers 5 leaves every tensor not set here uninitialized after a partial load, so
        # this sets every parameter and buffer; `init.*` skip the tensors that were loaded.
        std = self.config.initializer_range
        if isinstance(module, TopoFlowEmbeddings):
            grid_height, grid_width = self.config.grid_size
            position = sincos_position_embedding_2d(self.config.embed_dim, grid_height, grid_width)
            init.copy_(module.pos_embed, position[None])
            variable_ids = torch.arange(len(self.config.variables))
            init.copy_(
                module.var_embed, sincos_embedding_1d(self.config.embed_dim, variable_ids)[None]
            )
            init.zeros_(module.var_query)
        elif isinstance(module, TopoFlowAttention) and module.has_elevation_bias:
            init.constant_(module.elevation_alpha, self.config.elevation_alpha_init)
            init.constant_(module.H_scale, self.config.elevation_scale)
        elif isinstance(module, TopoFlowClimatology):
            # Zero until fitted; a checkpoint without it fails to load (a missing key).
            init.zeros_(module.coefficients)
        elif isinstance(module, TopoFlowVariableAggregation):
            init.xavier_uniform_(module.in_proj_weight)
            init.zeros_(module.in_proj_bias)
        elif isinstance(module, (nn.Linear, nn.Conv2d)):
            init.trunc_normal_(module.weight, std=std, a=-2 * std, b=2 * std)
            init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)

    def elevation_alpha_parameters(self) -> list[nn.Parameter]:
        """The learnable `elevation_alpha` of every biased block, in block order."""
        return [param for name, param in self.named_parameters()
                if name.endswith("attn.elevation_alpha")]

    @torch.no_grad()
    def project_elevation_alpha_(self) -> None:
        """Put every `elevation_alpha` back on alpha >= 0; call it after each optimizer step.

        For alpha < 0 the clamped bias is 0 everywhere and alpha's gradient is exactly 0, so an
        alpha that one step pushes below 0 stays there for good (all our alpha-init-0 runs died
        that way, docs/results/README.md). The projection keeps alpha at 0 while the loss wants it
        lower and lets it grow as soon as the gradient turns.
        """
        for param in self.elevation_alpha_parameters():
            param.clamp_(min=0.0)

    @classmethod
    def register_name_resolver(cls, resolver: Callable[[str], str | os.PathLike | None]) -> None:
        """Let `from_pretrained(name)` map a short name to a local folder (the resolver returns None
        if it does not know the name). Resolvers are shared by all TopoFlow model classes."""
        if resolver not in TopoFlowPreTrainedModel._name_resolvers:
            TopoFlowPreTrainedModel._name_resolvers.append(resolver)

    @classmethod
    def resolve_pretrained_name(cls, name_or_path: str | os.PathLike) -> str | os.PathLike:
        """The first resolver's answer, else the name itself; an existing local path always wins.

        Resolvers also see local paths, so they can check them (e.g. a checksum manifest)."""
        if name_or_path is None:  # from_pretrained(None, config=..., state_dict=...)
            return name_or_path
        for resolver in TopoFlowPreTrainedModel._name_resolvers:
            resolved = resolver(os.fspath(name_or_path))
            if resolved is not None and not os.path.exists(name_or_path):
                return resolved
        return name_or_path

    @classmethod
    def from_pretrained(
        cls, pretrained_model_name_or_path: str | os.PathLike, *args: Any, **kwargs: Any
    ):
        path = cls.resolve_pretrained_name(pretrained_model_name_or_path)
        if path is not None:
            hub_kwargs = {key: kwargs[key] for key in _HUB_FILE_KWARGS if key in kwargs}
            verify_pretrained_files(path, **hub_kwargs)
        wants_info = kwargs.pop("output_loading_info", False)
        model, info = super().from_pretrained(path, *args, output_loading_info=True, **kwargs)
        check_finite_state_dict(model.state_dict(), where=f"model loaded from {path}")
        model._check_loaded(info, overrides=kwargs)
        return (model, info) if wants_info else model

    def _check_loaded(self, info: dict[str, Any], overrides: dict[str, Any]) -> None:
        """Refuse a load whose result contradicts what the caller asked for (transformers would
        only warn)."""
        if "elevation_scale" not in overrides:
            return
        for name, buffer in self.named_buffers():
            requested = torch.tensor(overrides["elevation_scale"], dtype=buffer.dtype).item()
            if name.endswith("attn.H_scale") and buffer.item() != requested:
                raise ValueError(
                    f"elevation_scale={overrides['elevation_scale']} was requested but {name}="
                    f"{buffer.item()} m comes from the checkpoint: H_scale is saved with the "
                    f"weights. Start from a checkpoint without the bias (a baseline) to use "
                    f"another H_scale."
                )

    def save_pretrained(self, save_directory: str | os.PathLike, *args: Any, **kwargs: Any) -> None:
        # transformers records only the saving class in auto_map; list both so the one folder loads
        # with AutoModel (encoder) and with the forecasting auto class (full model).
        auto_map = dict(getattr(self.config, "auto_map", None) or {})
        auto_map.update(_AUTO_MAP)
        self.config.auto_map = auto_map
        # Refused before any file is written: a folder of NaN weights would only fail at load.
        state_dict = kwargs.get("state_dict")
        check_finite_state_dict(self.state_dict() if state_dict is None else state_dict,
                                where=f"model {type(self).__name__} saved to {save_directory}")
        super().save_pretrained(save_directory, *args, **kwargs)
        if kwargs.get("is_main_process", True):
            write_manifest(save_directory)


class TopoFlowModel(TopoFlowPreTrainedModel):
    """The encoder: fields (B, V, H, W) + lead time -> tokens (B, N, D)."""

    def __init__(self, config: TopoFlowConfig) -> None:
        super().__init__(config)
        self.embeddings = TopoFlowEmbeddings(config)
        self.blocks = nn.ModuleList(TopoFlowBlock(config, index) for index in range(config.depth))
        self.norm = nn.LayerNorm(config.embed_dim)
        self.gradient_checkpointing = False
        self.post_init()

    def forward(
        self,
        fields: torch.Tensor,
        lead_time_hours: torch.Tensor | float,
        elevation: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        variables: Sequence[str] | None = None,
        output_attentions: bool | None = None,
        time_features: torch.Tensor | None = None,
    ) -> TopoFlowModelOutput | tuple[torch.Tensor, ...]:
        r"""
        Args:
            fields: `(B, V, H, W)` inputs normalized with `config.variable_mean/std`, channels in
                the order of `config.variables`; must be finite.
            lead_time_hours: `(B,)` (or a scalar for the whole batch) lead time in hours, > 0.
            elevation: `(B, H, W)` or `(H, W)` terrain elevation in metres. Needed when bias
                blocks are set and the inputs carry no `config.elevation_variable` channel; when
                given it is used instead of that channel.
            variables: optional names of the `fields` channels, checked against `config.variables`.
            output_attentions: return each block's (B, heads, N, N) attention probabilities (the
                elevation bias included); computed with eager attention, so for moderate N.
            time_features: `(B, 2 * len(config.time_features))` (sin, cos) of each calendar phase
                the config declares, in its order; required exactly when it declares some.
        """
        output_attentions = (
            self.config.output_attentions if output_attentions is None else output_attentions
        )
        output_hidden_states = (
            self.config.output_hidden_states
            if output_hidden_states is None
            else output_hidden_states
        )
        return_dict = self.config.return_dict if return_dict is None else return_dict
        lead_time_hours = self._check_inputs(fields, lead_time_hours, variables)
        self._check_time_features(fields, time_features)
        elevation_m = self._patch_elevation(fields, elevation)
        if self.config.elevation_input_masked:
            # 0 is the channel's training mean: the embedding sees a flat world.
            fields = fields.index_fill(1, torch.tensor([self.config.elevation_channel],
                                                       device=fields.device), 0.0)

        hidden = self.embeddings(fields, lead_time_hours, time_features)  # (B, N, D)
        all_hidden = [hidden] if output_hidden_states else None
        all_attentions = [] if output_attentions else None
        for block in self.blocks:
            if self.gradient_checkpointing and self.training:
                hidden, weights = self._gradient_checkpointing_func(
                    block.__call__, hidden, elevation_m, output_attentions
                )
            else:
                hidden, weights = block(hidden, elevation_m, output_attentions)
            if all_hidden is not None:
                all_hidden.append(hidden)
            if all_attentions is not None:
                all_attentions.append(weights)
        output = TopoFlowModelOutput(
            last_hidden_state=self.norm(hidden),
            hidden_states=None if all_hidden is None else tuple(all_hidden),
            attentions=None if all_attentions is None else tuple(all_attentions),
        )
        return output if return_dict else output.to_tuple()

    def _check_inputs(
        self,
        fields: torch.Tensor,
        lead_time_hours: torch.Tensor | float,
        variables: Sequence[str] | None,
    ) -> torch.Tensor:
        config = self.config
        if variables is not None and list(variables) != list(config.variables):
            raise ValueError(
                f"variables: expected {list(config.variables)} (config.variables, in order), "
                f"received {list(variables)}."
            )
        expected = (len(config.variables), *config.img_size)
        if fields.ndim != 4 or tuple(fields.shape[1:]) != expected:
            raise ValueError(
                f"fields: expected shape (B, {expected[0]}, {expected[1]}, {expected[2]}) = "
                f"(batch, len(config.variables), *config.img_size), received "
                f"{tuple(fields.shape)}."
            )
        # Value checks need the data, which torch.export and torch.compile trace without
        # (GuardOnDataDependentSymNode); compiled graphs skip them, as transformers' models do.
        checking_values = not torch.compiler.is_compiling()
        if checking_values and not torch.isfinite(fields).all():
            bad = sorted(
                {config.variables[int(c)] for c in (~torch.isfinite(fields)).nonzero()[:, 1]}
            )
            raise ValueError(
                f"fields: expected finite normalized inputs (fill missing values with 0), received "
                f"NaN/inf in variables {bad}."
            )
        lead = torch.as_tensor(lead_time_hours, dtype=torch.float32, device=fields.device)
        if lead.ndim == 0:
            lead = lead.expand(fields.shape[0])
        if lead.shape != (fields.shape[0],):
            raise ValueError(
                f"lead_time_hours: expected shape ({fields.shape[0]},) or a scalar, received "
                f"{tuple(lead.shape)}."
            )
        if checking_values and not (torch.isfinite(lead).all() and (lead > 0).all()):
            raise ValueError(
                f"lead_time_hours: expected finite values > 0 hours, received {lead.tolist()}."
            )
        return lead

    def _check_time_features(
        self, fields: torch.Tensor, time_features: torch.Tensor | None
    ) -> None:
        declared = list(self.config.time_features)
        if not declared:
            if time_features is not None:
                raise ValueError(
                    "time_features: given, but config.time_features is empty (this model was not "
                    "built with calendar inputs); leave them out of the batch."
                )
            return
        expected = (fields.shape[0], 2 * len(declared))
        if time_features is None:
            raise ValueError(
                f"time_features: required, config.time_features={declared} declares "
                f"{expected[1]} inputs (sin, cos per feature); build the data with "
                f"make_forecast_dataset(..., time_features=config.time_features)."
            )
        if tuple(time_features.shape) != expected:
            raise ValueError(
                f"time_features: expected shape {expected} = (batch, 2 * len(config."
                f"time_features)) for {declared}, received {tuple(time_features.shape)}."
            )
        if not torch.isfinite(time_features).all():
            raise ValueError("time_features: expected finite values, received NaN/inf.")

    def _patch_elevation(
        self, fields: torch.Tensor, elevation: torch.Tensor | None
    ) -> torch.Tensor | None:
        """What the bias blocks read: (B, N) per-patch mean elevation in metres, or with
        `elevation_bias_rise="path"` the (B, N, N) path ascent in metres; None when no block is
        biased."""
        config = self.config
        if not config.elevation_bias_blocks:
            return None
        if elevation is None:
            channel = config.elevation_channel
            if channel is None:
                raise ValueError(
                    f"elevation: required because "
                    f"elevation_bias_blocks={config.elevation_bias_blocks} "
                    f"and config.elevation_variable={config.elevation_variable!r} is not among the "
                    f"inputs; pass elevation= (metres, (B, H, W) or (H, W))."
                )
            name = config.variables[channel]
            # The channel arrives normalized; the bias is defined in metres.
            elevation = fields[:, channel] * config.variable_std[name] + config.variable_mean[name]
        else:
            elevation = torch.as_tensor(elevation, device=fields.device)
            if elevation.ndim == 2:
                elevation = elevation.expand(fields.shape[0], -1, -1)
            if tuple(elevation.shape) != (fields.shape[0], *config.img_size):
                raise ValueError(
                    f"elevation: expected shape ({fields.shape[0]}, {config.img_size[0]}, "
                    f"{config.img_size[1]}) or {tuple(config.img_size)}, received "
                    f"{tuple(elevation.shape)}."
                )
            if not torch.compiler.is_compiling() and not torch.isfinite(elevation).all():
                raise ValueError("elevation: expected finite metres, received NaN/inf.")
        generator = None if self.training else torch.Generator().manual_seed(PLACEBO_EVAL_SEED)
        if config.elevation_bias_rise == "path":
            ascent = path_ascent_matrix(elevation, config.patch_size)
            if config.elevation_bias_placebo:
                ascent = shuffle_patch_pairs(ascent, generator)
            return ascent
        heights = patch_mean_elevation(elevation, config.patch_size)
        if config.elevation_bias_placebo:
            heights = shuffle_patch_heights(heights, generator)
        return heights


class TopoFlowForForecasting(TopoFlowPreTrainedModel):
    """Encoder + prediction head + unpatchify; the region-masked MSE when `labels` are given."""

    def __init__(self, config: TopoFlowConfig) -> None:
        super().__init__(config)
        self.topoflow = TopoFlowModel(config)
        dim = config.embed_dim
        layers: list[nn.Module] = []
        for _ in range(config.decoder_depth):
            layers += [nn.Linear(dim, dim), nn.GELU()]
        layers.append(nn.Linear(dim, len(config.target_variables) * config.patch_size**2))
        self.head = nn.Sequential(*layers)
        self.climatology = (
            TopoFlowClimatology(config) if config.forecast_target == "anomaly" else None
        )
        self.post_init()

    def _check_loaded(self, info: dict[str, Any], overrides: dict[str, Any]) -> None:
        super()._check_loaded(info, overrides)
        if any(key.startswith("climatology.") for key in info["missing_keys"]):
            # transformers would leave it at zero: the mean everywhere, a silently worse forecast.
            raise ValueError(
                "The checkpoint has no climatology.coefficients, which forecast_target='anomaly' "
                "needs (fitted on the training split: topoflow/data/anomaly_base.py); it was "
                "saved by another model or its weights file is incomplete."
            )
        # transformers only warns when head weights are missing or unexpected and then leaves them
        # random (the 2.27-instead-of-0.36 val loss); a head that does not match must fail instead.
        head_keys = sorted(
            key
            for key in [*info["missing_keys"], *info["unexpected_keys"]]
            if key.startswith("head.")
        )
        if head_keys and not overrides.get("ignore_mismatched_sizes", False):
            loaded_head = [key for key in self.state_dict() if key.startswith("head.")
                           and key not in info["missing_keys"]]  # fmt: skip
            if not loaded_head and not info["unexpected_keys"]:
                raise ValueError(
                    "The checkpoint has no prediction head (head.* keys): it is an encoder-only "
                    "checkpoint (TopoFlowModel / AutoModel). Load it with TopoFlowModel, or train "
                    "a head from it with TopoFlowForForecasting.from_pretrained(..., "
                    "ignore_mismatched_sizes=True), which initializes the head at random."
                )
            raise ValueError(
                f"The checkpoint's prediction head does not match decoder_depth="
                f"{self.config.decoder_depth} (missing or unexpected: {head_keys}); refusing to "
                f"leave the head randomly initialized. Check decoder_depth / target_variables."
            )

    def forward(
        self,
        fields: torch.Tensor,
        lead_time_hours: torch.Tensor | float,
        labels: torch.Tensor | None = None,
        region_mask: torch.Tensor | None = None,
        elevation: torch.Tensor | None = None,
        sample_ids: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        variables: Sequence[str] | None = None,
        output_attentions: bool | None = None,
        time_features: torch.Tensor | None = None,
    ) -> TopoFlowForecastOutput | tuple[torch.Tensor, ...]:
        r"""
        Args:
            fields, lead_time_hours, elevation, variables, output_attentions, time_features: see
                `TopoFlowModel.forward`.
            labels: `(B, V_out, H, W)` normalized targets in the order of `config.target_variables`,
                NaN where missing.
            region_mask: `(B, H, W)` or `(H, W)` bool, cells that count in the loss (default: all).
            sample_ids: `(B,)` int64, echoed in the output.
        """
        return_dict = self.config.return_dict if return_dict is None else return_dict
        encoded = self.topoflow(
            fields, lead_time_hours, elevation=elevation, output_hidden_states=output_hidden_states,
            return_dict=True, variables=variables, output_attentions=output_attentions,
            time_features=time_features,
        )  # fmt: skip
        forecast = self.unpatchify(self.head(encoded.last_hidden_state))  # (B, V_out, H, W)
        if self.config.forecast_target != "field":
            forecast = self._forecast_base(fields, lead_time_hours, time_features) + (
                forecast * self._per_lead("increment_scale", lead_time_hours, forecast))
        loss = per_sample_loss = num_valid = None
        if labels is not None:
            valid = self._valid_cells(forecast, labels, region_mask)
            loss, per_sample_loss, num_valid = masked_mse(forecast, labels, valid)
        output = TopoFlowForecastOutput(
            loss=loss, per_sample_loss=per_sample_loss, num_valid=num_valid, forecast=forecast,
            hidden_states=encoded.hidden_states, sample_ids=sample_ids,
            attentions=encoded.attentions,
        )  # fmt: skip
        return output if return_dict else output.to_tuple()

    def _forecast_base(
        self,
        fields: torch.Tensor,
        lead_time_hours: torch.Tensor | float,
        time_features: torch.Tensor | None,
    ) -> torch.Tensor:
        """What a head output of 0 forecasts: the input state of each target (increment), or
        damped anomaly persistence on the model's climatology (anomaly); (B, V_out, H, W)."""
        state = fields[:, self.config.target_input_channels]
        if self.config.forecast_target == "increment":
            return state
        clim_init = self.climatology(time_features, "init").to(state.dtype)
        clim_valid = self.climatology(time_features, "valid").to(state.dtype)
        damping = self._per_lead("anomaly_damping", lead_time_hours, state)
        return clim_valid + damping * (state - clim_init)

    def _per_lead(
        self, field: str, lead_time_hours: torch.Tensor | float, like: torch.Tensor
    ) -> torch.Tensor | float:
        """(B, V_out, 1, 1) values of a {target: {lead: value}} config field for each sample's
        lead (1.0 when the field is None)."""
        table = getattr(self.config, field)
        if table is None:
            return 1.0
        leads = torch.as_tensor(lead_time_hours, dtype=torch.float32).expand(like.shape[0])
        rows = []
        for lead in leads.tolist():
            key = str(int(lead))
            if lead != int(lead) or key not in table[self.config.target_variables[0]]:
                raise ValueError(
                    f"lead_time_hours: {lead} h has no entry in config.{field} (leads "
                    f"{sorted(table[self.config.target_variables[0]], key=int)} h); the "
                    f"{self.config.forecast_target} head is scaled per lead."
                )
            rows.append([table[name][key] for name in self.config.target_variables])
        values = torch.tensor(rows, dtype=like.dtype, device=like.device)  # (B, V_out)
        return values[:, :, None, None]

    def unpatchify(self, patches: torch.Tensor) -> torch.Tensor:
        """(B, N, p * p * V_out) -> (B, V_out, H, W); channel fastest, as ClimaX's head."""
        patch = self.config.patch_size
        grid_height, grid_width = self.config.grid_size
        num_out = len(self.config.target_variables)
        patches = patches.reshape(patches.shape[0], grid_height, grid_width, patch, patch, num_out)
        images = torch.einsum("bhwpqc->bchpwq", patches)
        return images.reshape(patches.shape[0], num_out, grid_height * patch, grid_width * patch)

    def _valid_cells(
        self, forecast: torch.Tensor, labels: torch.Tensor, region_mask: torch.Tensor | None
    ) -> torch.Tensor:
        if labels.shape != forecast.shape:
            raise ValueError(
                f"labels: expected shape {tuple(forecast.shape)} = (B, "
                f"len(config.target_variables), *config.img_size), received "
                f"{tuple(labels.shape)}."
            )
        valid = torch.isfinite(labels)
        if region_mask is None:
            return valid
        region_mask = torch.as_tensor(region_mask, device=labels.device)
        if region_mask.ndim == 2:
            region_mask = region_mask.expand(labels.shape[0], -1, -1)
        if tuple(region_mask.shape) != (labels.shape[0], *labels.shape[2:]):
            raise ValueError(
                f"region_mask: expected shape ({labels.shape[0]}, {labels.shape[2]}, "
                f"{labels.shape[3]}) or ({labels.shape[2]}, {labels.shape[3]}), received "
                f"{tuple(region_mask.shape)}."
            )
        return valid & region_mask.bool()[:, None]


def masked_mse(
    forecast: torch.Tensor, labels: torch.Tensor, valid: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, per_sample_loss, num_valid) of the MSE over `valid` cells, all (B, V, H, W)."""
    # Zero the invalid cells before squaring so NaN labels cannot leak NaN into the gradient.
    error = torch.where(valid, forecast - torch.nan_to_num(labels), torch.zeros_like(forecast))
    squared = error.float().pow(2).flatten(1).sum(dim=1)  # (B,)
    num_valid = valid.flatten(1).sum(dim=1)  # (B,) int64
    per_sample = squared / num_valid.clamp(min=1)
    per_sample = torch.where(num_valid > 0, per_sample, torch.full_like(per_sample, math.nan))
    total = num_valid.sum()
    # An all-invalid batch gives a finite zero loss with zero gradient; the trainer skips it.
    loss = squared.sum() / total if total > 0 else 0.0 * forecast.sum()
    return loss, per_sample, num_valid


_AUTO_MAP = {
    "AutoModel": f"modeling_topoflow.{TopoFlowModel.__name__}",
    "AutoModelForTimeSeriesPrediction": f"modeling_topoflow.{TopoFlowForForecasting.__name__}",
}

# from_pretrained arguments that say where and how to fetch a Hub repo's files.
_HUB_FILE_KWARGS = ("revision", "cache_dir", "token", "local_files_only", "subfolder")

# `save_pretrained` copies this file and configuration_topoflow.py next to the weights.
TopoFlowModel.register_for_auto_class("AutoModel")
TopoFlowForForecasting.register_for_auto_class("AutoModelForTimeSeriesPrediction")
