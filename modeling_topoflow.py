"""TopoFlow: a ClimaX-style Vision Transformer for air-quality forecasting whose attention can be
biased by terrain elevation.

The file reads in the order data flows: embeddings, attention, block, PreTrainedModel,
TopoFlowModel (encoder), TopoFlowForForecasting (head + loss). The elevation bias and the attention
kernels live in attention_topoflow.py; their names are re-exported here so that
`from modeling_topoflow import ...` keeps working.

Hub remote code: imports torch and transformers only (never `topoflow/`, datasets or accelerate).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.utils import ModelOutput

try:
    from .attention_topoflow import (
        ATTENTION_IMPLEMENTATIONS,
        chunked_elevation_attention,
        clamp_is_inactive,
        eager_elevation_attention,
        elevation_bias_between,
        elevation_bias_matrix,
        elevation_biased_attention,
        oriented_elevation,
        plain_attention,
        sorted_elevation_attention,
    )
    from .configuration_topoflow import TopoFlowConfig
except ImportError:
    from attention_topoflow import (
        ATTENTION_IMPLEMENTATIONS,
        chunked_elevation_attention,
        clamp_is_inactive,
        eager_elevation_attention,
        elevation_bias_between,
        elevation_bias_matrix,
        elevation_biased_attention,
        oriented_elevation,
        plain_attention,
        sorted_elevation_attention,
    )
    from configuration_topoflow import TopoFlowConfig

__all__ = [
    "ATTENTION_IMPLEMENTATIONS",
    "TopoFlowForForecasting",
    "TopoFlowForecastOutput",
    "TopoFlowModel",
    "TopoFlowModelOutput",
    "TopoFlowPreTrainedModel",
    "chunked_elevation_attention",
    "clamp_is_inactive",
    "eager_elevation_attention",
    "elevation_bias_between",
    "elevation_bias_matrix",
    "oriented_elevation",
    "sorted_elevation_attention",
    "elevation_biased_attention",
    "masked_mse",
    "patch_mean_elevation",
    "plain_attention",
    "sincos_position_embedding_2d",
    "sincos_embedding_1d",
]

# ClimaX feeds lead times as hours / 100; checkpoints converted from ClimaX rely on the same scale.
LEAD_TIME_SCALE_HOURS = 100.0


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


@dataclass
class TopoFlowModelOutput(ModelOutput):
    """Encoder output.

    Args:
        last_hidden_state (`torch.Tensor` of shape `(B, N, D)`): tokens after the final LayerNorm.
        hidden_states (`tuple[torch.Tensor]`, *optional*): `depth + 1` tensors of shape `(B, N, D)`:
            the embeddings, then each block's output; returned with `output_hidden_states=True`.
    """

    last_hidden_state: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None


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
    """

    loss: torch.Tensor | None = None
    per_sample_loss: torch.Tensor | None = None
    num_valid: torch.Tensor | None = None
    forecast: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    sample_ids: torch.Tensor | None = None


class TopoFlowEmbeddings(nn.Module):
    """Per-variable patch embedding, variable embedding, variable aggregation by a learnable query,
    position and lead-time embeddings: (B, V, H, W) fields -> (B, N, D) tokens."""

    def __init__(self, config: TopoFlowConfig) -> None:
        super().__init__()
        self.config = config
        num_variables, dim = len(config.variables), config.embed_dim
        # One kernel per input variable: a conv with groups=V is V independent patch embeddings.
        self.token_embed = nn.Conv2d(
            num_variables, num_variables * dim, kernel_size=config.patch_size,
            stride=config.patch_size, groups=num_variables,
        )  # fmt: skip
        self.var_embed = nn.Parameter(torch.zeros(1, num_variables, dim))
        self.var_query = nn.Parameter(torch.zeros(1, 1, dim))
        self.var_agg = nn.MultiheadAttention(dim, config.num_heads, batch_first=True)
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
        tokens = tokens.transpose(2, 3) + self.var_embed[:, :, None]  # (B, V, N, D)
        tokens = self._aggregate_variables(tokens)  # (B, N, D)
        tokens = tokens + self.pos_embed
        lead = (lead_time_hours.to(tokens.dtype) / LEAD_TIME_SCALE_HOURS)[:, None]  # (B, 1)
        tokens = tokens + self.lead_time_embed(lead)[:, None]  # (B, 1, D) broadcast over N
        if self.time_embed is not None:
            tokens = tokens + self.time_embed(time_features.to(tokens.dtype))[:, None]
        return self.dropout(tokens)

    def _aggregate_variables(self, tokens: torch.Tensor) -> torch.Tensor:
        batch, _, num_patches, dim = tokens.shape
        per_patch = tokens.transpose(1, 2).reshape(batch * num_patches, -1, dim)  # (B*N, V, D)
        query = self.var_query.expand(per_patch.shape[0], -1, -1)  # (B*N, 1, D)
        aggregated, _ = self.var_agg(query, per_patch, per_patch, need_weights=False)
        return aggregated.reshape(batch, num_patches, dim)


class TopoFlowAttention(nn.Module):
    """Multi-head self-attention (timm layout: fused qkv, proj) with the optional elevation bias."""

    def __init__(self, config: TopoFlowConfig, layer_idx: int) -> None:
        super().__init__()
        self.config = config
        self.num_heads = config.num_heads
        self.has_elevation_bias = layer_idx in config.elevation_bias_blocks
        self.qkv = nn.Linear(config.embed_dim, 3 * config.embed_dim)
        self.proj = nn.Linear(config.embed_dim, config.embed_dim)
        self.proj_drop = nn.Dropout(config.drop_rate)
        if self.has_elevation_bias:
            self.elevation_alpha = nn.Parameter(torch.tensor(config.elevation_alpha_init))
            # A persistent buffer: H_scale travels with the checkpoint but is not trained.
            self.register_buffer("H_scale", torch.tensor(config.elevation_scale), persistent=True)

    def forward(self, hidden: torch.Tensor, elevation_m: torch.Tensor | None) -> torch.Tensor:
        batch, num_tokens, dim = hidden.shape
        qkv = self.qkv(hidden).reshape(batch, num_tokens, 3, self.num_heads, dim // self.num_heads)
        query, key, value = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, heads, N, head_dim)
        implementation = self.config._attn_implementation or "sdpa"
        dropout_p = self.config.attention_dropout if self.training else 0.0
        if self.has_elevation_bias:
            heights = oriented_elevation(elevation_m, self.config.elevation_bias_direction)
            attended = elevation_biased_attention(
                query, key, value, elevation_m=heights, alpha=self.elevation_alpha,
                h_scale=self.H_scale, clamp_max=self.config.elevation_bias_clamp,
                implementation=implementation, dropout_p=dropout_p,
            )  # fmt: skip
        else:
            attended = plain_attention(
                query, key, value, implementation=implementation, dropout_p=dropout_p
            )
        attended = attended.transpose(1, 2).reshape(batch, num_tokens, dim)
        return self.proj_drop(self.proj(attended))


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

    def forward(self, hidden: torch.Tensor, elevation_m: torch.Tensor | None) -> torch.Tensor:
        hidden = hidden + self.drop_path(self.attn(self.norm1(hidden), elevation_m))
        return hidden + self.drop_path(self.mlp(self.norm2(hidden)))


class TopoFlowPreTrainedModel(PreTrainedModel):
    config_class = TopoFlowConfig
    base_model_prefix = "topoflow"
    main_input_name = "fields"
    supports_gradient_checkpointing = True
    _no_split_modules = ["TopoFlowBlock"]
    _supports_sdpa = True
    _supports_flex_attn = True
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
        elif isinstance(module, nn.MultiheadAttention):
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
        wants_info = kwargs.pop("output_loading_info", False)
        model, info = super().from_pretrained(path, *args, output_loading_info=True, **kwargs)
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
        super().save_pretrained(save_directory, *args, **kwargs)


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
            time_features: `(B, 2 * len(config.time_features))` (sin, cos) of each calendar phase
                the config declares, in its order; required exactly when it declares some.
        """
        output_hidden_states = (
            self.config.output_hidden_states
            if output_hidden_states is None
            else output_hidden_states
        )
        return_dict = self.config.return_dict if return_dict is None else return_dict
        lead_time_hours = self._check_inputs(fields, lead_time_hours, variables)
        self._check_time_features(fields, time_features)
        elevation_m = self._patch_elevation(fields, elevation)

        hidden = self.embeddings(fields, lead_time_hours, time_features)  # (B, N, D)
        all_hidden = [hidden] if output_hidden_states else None
        for block in self.blocks:
            if self.gradient_checkpointing and self.training:
                hidden = self._gradient_checkpointing_func(block.__call__, hidden, elevation_m)
            else:
                hidden = block(hidden, elevation_m)
            if all_hidden is not None:
                all_hidden.append(hidden)
        output = TopoFlowModelOutput(
            last_hidden_state=self.norm(hidden),
            hidden_states=None if all_hidden is None else tuple(all_hidden),
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
        if not torch.isfinite(fields).all():
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
        if not (torch.isfinite(lead).all() and (lead > 0).all()):
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
        """(B, N) per-patch mean elevation in metres, or None when no block is biased."""
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
            if not torch.isfinite(elevation).all():
                raise ValueError("elevation: expected finite metres, received NaN/inf.")
        return patch_mean_elevation(elevation, config.patch_size)


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
        self.post_init()

    def _check_loaded(self, info: dict[str, Any], overrides: dict[str, Any]) -> None:
        super()._check_loaded(info, overrides)
        # transformers only warns when head weights are missing or unexpected and then leaves them
        # random (the 2.27-instead-of-0.36 val loss); a head that does not match must fail instead.
        head_keys = sorted(
            key
            for key in [*info["missing_keys"], *info["unexpected_keys"]]
            if key.startswith("head.")
        )
        if head_keys and not overrides.get("ignore_mismatched_sizes", False):
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
        time_features: torch.Tensor | None = None,
    ) -> TopoFlowForecastOutput | tuple[torch.Tensor, ...]:
        r"""
        Args:
            fields, lead_time_hours, elevation, variables, time_features: see
                `TopoFlowModel.forward`.
            labels: `(B, V_out, H, W)` normalized targets in the order of `config.target_variables`,
                NaN where missing.
            region_mask: `(B, H, W)` or `(H, W)` bool, cells that count in the loss (default: all).
            sample_ids: `(B,)` int64, echoed in the output.
        """
        return_dict = self.config.return_dict if return_dict is None else return_dict
        encoded = self.topoflow(
            fields, lead_time_hours, elevation=elevation, output_hidden_states=output_hidden_states,
            return_dict=True, variables=variables, time_features=time_features,
        )  # fmt: skip
        forecast = self.unpatchify(self.head(encoded.last_hidden_state))  # (B, V_out, H, W)
        if self.config.forecast_target == "increment":
            forecast = self._add_increment(fields, lead_time_hours, forecast)
        loss = per_sample_loss = num_valid = None
        if labels is not None:
            valid = self._valid_cells(forecast, labels, region_mask)
            loss, per_sample_loss, num_valid = masked_mse(forecast, labels, valid)
        output = TopoFlowForecastOutput(
            loss=loss, per_sample_loss=per_sample_loss, num_valid=num_valid, forecast=forecast,
            hidden_states=encoded.hidden_states, sample_ids=sample_ids,
        )  # fmt: skip
        return output if return_dict else output.to_tuple()

    def _add_increment(
        self, fields: torch.Tensor, lead_time_hours: torch.Tensor | float, increment: torch.Tensor
    ) -> torch.Tensor:
        """Input state of each target + the head's increment x its per-lead scale."""
        state = fields[:, self.config.target_input_channels]  # (B, V_out, H, W)
        scale = self.config.increment_scale
        if scale is None:
            return state + increment
        leads = torch.as_tensor(lead_time_hours, dtype=torch.float32).expand(fields.shape[0])
        rows = []
        for lead in leads.tolist():
            key = str(int(lead))
            if lead != int(lead) or key not in scale[self.config.target_variables[0]]:
                raise ValueError(
                    f"lead_time_hours: {lead} h has no entry in config.increment_scale (leads "
                    f"{sorted(scale[self.config.target_variables[0]], key=int)} h); the increment "
                    f"head is scaled per lead."
                )
            rows.append([scale[name][key] for name in self.config.target_variables])
        factor = torch.tensor(rows, dtype=increment.dtype, device=increment.device)  # (B, V_out)
        return state + increment * factor[:, :, None, None]

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

# `save_pretrained` copies this file and configuration_topoflow.py next to the weights.
TopoFlowModel.register_for_auto_class("AutoModel")
TopoFlowForForecasting.register_for_auto_class("AutoModelForTimeSeriesPrediction")
