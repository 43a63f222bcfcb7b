"""Recognize a source checkpoint's layout and read its tensors under ClimaX's names.

Two layouts convert:

- "climax": microsoft/ClimaX (src/climax/arch.py). Released ClimaX checkpoints name the variable
  tensors `channel_embed`, `channel_query`, `channel_agg.*`; ClimaX's own loader
  (`load_pretrained_weights`) renames "channel" to "var", and so do we.
- "topoflow-paper": the TopoFlow paper code (AmmarKheder/TopoFlow, topoflow/model.py and
  wind_embed.py), a ClimaX derivative. Its differences, each a fact of that code, not a guess:
  the grouped patch weights are named `patch_embed.proj_weights/proj_biases`; a LayerNorm
  (`patch_embed.norm`) normalizes each variable's tokens before the variable embedding; the lead
  time enters in raw hours (its dataset yields `forecast_h`), not hours / 100; its Lightning
  module holds a `china_mask` loss buffer; its full model adds to block 0 an elevation bias
  `attn.alpha` and a relative position bias `attn.rel_pos_bias.bias_table`;
  `parallel_patch_embed: true` reorders the patch tokens along the mean wind (a scan with no
  weights, so the checkpoint's `hyper_parameters` or the user must say whether it was on).
"""

from __future__ import annotations

import copy
import re
from collections.abc import Mapping
from typing import Any

import torch

from configuration_topoflow import TopoFlowConfig
from topoflow.convert_report import ConversionReport

__all__ = [
    "CLIMAX",
    "LAYOUT_CONFIG_FIELDS",
    "PAPER",
    "PAPER_ELEVATION_SCALE",
    "apply_layout_config",
    "detect_layout",
    "read_source_keys",
    "recorded_variables",
]

CLIMAX = "climax"
PAPER = "topoflow-paper"
# The forward of each layout depends on these config fields; conversion sets them.
LAYOUT_CONFIG_FIELDS: dict[str, dict[str, Any]] = {
    CLIMAX: {"lead_time_scale_hours": 100.0, "patch_embed_norm": False},
    PAPER: {"lead_time_scale_hours": 1.0, "patch_embed_norm": True},
}
# The paper code divides the *normalized* elevation by this (TopoFlowAttention.elevation_scale).
PAPER_ELEVATION_SCALE = 1000.0
# Its bias clamp and direction (TopoFlowAttention._compute_elevation_bias).
PAPER_ELEVATION_CLAMP = 10.0
PAPER_ELEVATION_DIRECTION = "downslope"

_PAPER_RENAMES = {
    "patch_embed.proj_weights": "token_embeds.proj_weights",
    "patch_embed.proj_biases": "token_embeds.proj_biases",
    "patch_embed.norm.weight": "patch_embed_norm.weight",
    "patch_embed.norm.bias": "patch_embed_norm.bias",
}
_PAPER_DROPPED = {
    "china_mask": "the paper code's Lightning loss mask (an H x W buffer of "
    "TopoFlowLightningModule), not a forecaster weight; the region a run scores lives with its "
    "corpus",
}
_PAPER_ALPHA = re.compile(r"^blocks\.(\d+)\.attn\.alpha$")
_PAPER_REL_POS = re.compile(r"^blocks\.\d+\.attn\.rel_pos_bias\.")
_CHANNEL = re.compile(r"^channel_")


def detect_layout(state: Mapping[str, torch.Tensor]) -> str:
    """The layout name: "topoflow-paper" for the paper code's keys, else "climax" (not both)."""
    paper = sorted(key for key in state if key in _PAPER_RENAMES or key in _PAPER_DROPPED)
    climax = sorted(key for key in state if key.startswith("token_embeds."))
    if paper and climax:
        raise ValueError(
            f"the checkpoint mixes the TopoFlow paper code's keys {paper[:3]} with ClimaX's "
            f"{climax[:3]}; it is neither layout."
        )
    return PAPER if paper else CLIMAX


def recorded_variables(hparams: Mapping[str, Any] | None) -> list[str] | None:
    """The input variables a paper-code Lightning checkpoint records (`config.data.variables`)."""
    variables = _recorded(hparams, "data", "variables")
    return None if variables is None else [str(name) for name in variables]


def _recorded(hparams: Mapping[str, Any] | None, section: str, name: str) -> Any:
    config = (hparams or {}).get("config")
    if not isinstance(config, Mapping) or not isinstance(config.get(section), Mapping):
        return None
    return config[section].get(name)


def apply_layout_config(
    config: TopoFlowConfig, fields: Mapping[str, Any], report: ConversionReport
) -> TopoFlowConfig:
    """A copy of `config` with the fields the source layout fixes, recorded in the report."""
    config = copy.deepcopy(config)
    for name, value in fields.items():
        setattr(config, name, value)
        report.config_fields[name] = value
    config.check_topoflow()
    return config


def read_source_keys(
    state: Mapping[str, torch.Tensor],
    config: TopoFlowConfig,
    report: ConversionReport,
    *,
    hparams: Mapping[str, Any] | None = None,
    wind_scan: bool | None = None,
) -> tuple[dict[str, torch.Tensor], TopoFlowConfig]:
    """The source tensors under ClimaX's names (plus `patch_embed_norm.*` and
    `blocks.<i>.attn.elevation_alpha` for the paper code), and `config` with the layout's fields.

    Renames and drops are recorded in `report`; anything that cannot be converted exactly raises
    `ValueError` naming the keys and why.
    """
    report.layout = detect_layout(state)
    state = _rename_channel_keys(state, report)
    fields = dict(LAYOUT_CONFIG_FIELDS[report.layout])
    if report.layout == CLIMAX:
        return state, apply_layout_config(config, fields, report)
    _check_paper_wind_scan(hparams, wind_scan)
    _refuse_relative_position_bias(state)
    read: dict[str, torch.Tensor] = {}
    alpha_blocks: dict[int, torch.Tensor] = {}
    for key, tensor in state.items():
        if key in _PAPER_DROPPED:
            report.dropped[key] = _PAPER_DROPPED[key]
        elif key in _PAPER_RENAMES:
            read[_PAPER_RENAMES[key]] = tensor
            report.renamed[key] = _PAPER_RENAMES[key]
        elif _PAPER_ALPHA.match(key):
            block = int(_PAPER_ALPHA.match(key).group(1))
            alpha_blocks[block] = tensor
            report.renamed[key] = f"blocks.{block}.attn.elevation_alpha"
        else:
            read[key] = tensor
    if alpha_blocks:
        blocks = set(config.elevation_bias_blocks) | set(alpha_blocks)
        fields["elevation_bias_blocks"] = sorted(blocks)
        fields["elevation_bias_direction"] = PAPER_ELEVATION_DIRECTION
        fields["elevation_bias_clamp"] = PAPER_ELEVATION_CLAMP
    config = apply_layout_config(config, fields, report)
    report.notes.append(
        "lead_time_scale_hours = 1: the paper code feeds the lead time in raw hours (ClimaX: / 100)"
    )
    for block, alpha in sorted(alpha_blocks.items()):
        read[f"blocks.{block}.attn.elevation_alpha"] = _paper_alpha_in_metres(
            alpha, block, config, report
        )
    return read, config


def _rename_channel_keys(
    state: Mapping[str, torch.Tensor], report: ConversionReport
) -> dict[str, torch.Tensor]:
    renamed: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        name = _CHANNEL.sub("var_", key)
        if name != key:
            report.renamed[key] = name
        if name in renamed:
            raise ValueError(f"the checkpoint holds both {key} and {name}, the same tensor twice.")
        renamed[name] = tensor
    if any(_CHANNEL.match(key) for key in report.renamed):
        report.notes.append(
            "channel_* keys read as var_*: released ClimaX checkpoints use the older names, and "
            "ClimaX's load_pretrained_weights renames them the same way"
        )
    return renamed


def _check_paper_wind_scan(hparams: Mapping[str, Any] | None, wind_scan: bool | None) -> None:
    """Refuse a paper checkpoint trained with the wind scan, or one that does not say."""
    recorded = None
    if _recorded(hparams, "model", "img_size") is not None:  # a TopoFlowLightningModule config
        # TopoFlowLightningModule passes
        # enable_wind_scan=config["model"].get("parallel_patch_embed", True).
        recorded = bool(_recorded(hparams, "model", "parallel_patch_embed") in (None, True))
    if recorded is not None and wind_scan is not None and recorded != wind_scan:
        raise ValueError(
            f"--paper-wind-scan {'on' if wind_scan else 'off'} contradicts the checkpoint's "
            f"hyper_parameters (config.model.parallel_patch_embed gives wind scan "
            f"{'on' if recorded else 'off'})."
        )
    scan = recorded if recorded is not None else wind_scan
    if scan is None:
        raise ValueError(
            "the TopoFlow paper checkpoint does not record whether its wind scan was on "
            "(hyper_parameters.config.model.parallel_patch_embed, default true) and its weights "
            "cannot tell; pass --paper-wind-scan off (wind_scan=False) if it was trained with "
            "parallel_patch_embed: false."
        )
    if scan:
        raise ValueError(
            "the TopoFlow paper checkpoint was trained with the wind scan (parallel_patch_embed: "
            "true): WindPatchEmbed reorders the patch tokens by the mean wind's sector while the "
            "position embedding and the output grid stay in place. TopoFlow has no such reordering,"
            " so its forecasts would differ; refusing rather than converting inexactly."
        )


def _refuse_relative_position_bias(state: Mapping[str, torch.Tensor]) -> None:
    keys = sorted(key for key in state if _PAPER_REL_POS.match(key))
    if keys:
        raise ValueError(
            f"{keys}: the paper code's learned 2-D relative position bias (T5-style buckets of "
            f"the patch offset, one logit per head, added to the attention logits of its TopoFlow "
            f"block) has no counterpart in TopoFlow's attention; leaving it out would change "
            f"every forecast, so the checkpoint is refused. Its elevation bias (attn.alpha) alone "
            f"would convert."
        )


def _paper_alpha_in_metres(
    alpha: torch.Tensor, block: int, config: TopoFlowConfig, report: ConversionReport
) -> torch.Tensor:
    """The paper's alpha acts on normalized elevation / 1000; ours on metres / H_scale.

    Its bias is -alpha_p * ReLU((e_j - e_i) / 1000) with e = (z - mean) / std, i.e.
    -alpha_p * ReLU((z_j - z_i) / (1000 * std)); ours is -alpha * ReLU((z_j - z_i) / H_scale), equal
    for alpha = alpha_p * H_scale / (1000 * std). The clamp to [-10, 0] is the same.
    """
    name = config.elevation_variable
    if config.elevation_channel is None:
        raise ValueError(
            f"blocks.{block}.attn.alpha: the paper's elevation bias reads the input channel "
            f"'elevation', but config.elevation_variable={name!r} is not among config.variables."
        )
    std = float(config.variable_std[name])
    factor = config.elevation_scale / (PAPER_ELEVATION_SCALE * std)
    report.notes.append(
        f"blocks.{block}.attn.alpha = {alpha.item():.6g} acts on normalized elevation / "
        f"{PAPER_ELEVATION_SCALE:g}; elevation_alpha = alpha * H_scale / (1000 * std) = "
        f"{alpha.item() * factor:.6g} acts on metres / H_scale (H_scale = "
        f"{config.elevation_scale:g} m, std of {name!r} = {std:g} m): the same bias"
    )
    return (alpha.reshape(()) * factor).to(alpha.dtype)
