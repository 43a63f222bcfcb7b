"""Convert a ClimaX or TopoFlow-paper Lightning checkpoint into a TopoFlow model folder.

    python -m topoflow.convert_climax climax.ckpt out_folder --config config.json \
        --climax-variables u,v,temp,...

ClimaX (microsoft/ClimaX, src/climax/arch.py) names its tensors `token_embeds.<i>.proj.*` (one
timm PatchEmbed per variable) or `token_embeds.proj_weights/proj_biases` (grouped), `var_embed`,
`var_query`, `var_agg.*`, `pos_embed`, `lead_time_embed.*`, `blocks.<i>.*` (timm Block), `norm.*`
and `head.<k>.*`; a Lightning checkpoint holds them under `state_dict` with a `net.` (or `climax.`)
prefix. Its head predicts every ClimaX variable; the rows of the targets are kept. Released
checkpoints (`channel_*` names) and the TopoFlow paper code's checkpoints are first read under these
names (topoflow/convert_sources.py). The checkpoint is read with `torch.load(weights_only=True)`
only: no pickled code is ever executed.

No weight is ever left silently random: source keys that cannot be converted exactly are refused,
and model keys the source does not provide are refused too unless `--allow-missing`, which leaves
them out of the weights file so that `from_pretrained` reports them missing (and
train_accelerate.py refuses them like any other missing key).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from configuration_topoflow import TopoFlowConfig
from modeling_topoflow import TopoFlowForForecasting
from topoflow.convert_report import REPORT_FILENAME, ConversionReport
from topoflow.convert_sources import read_source_keys, recorded_variables
from topoflow.safety import check_finite_state_dict, refuse_pickle_files

__all__ = [
    "REPORT_FILENAME",
    "ConversionReport",
    "convert_climax_checkpoint",
    "convert_climax_state_dict",
    "load_climax_state_dict",
    "load_source_checkpoint",
    "main",
]

CLIMAX_PREFIXES = ("net.", "climax.", "model.net.", "model.")
# Elevation-bias tensors a source may not provide: the config sets them (never random), and why.
_FROM_CONFIG = {
    "elevation_alpha": ("elevation_alpha_init", "the source has no elevation bias in this block"),
    "H_scale": ("elevation_scale", "the source has no H_scale buffer (metres)"),
}

# ClimaX names whose TopoFlow name is the same under a new parent module.
_RENAMES = (
    (re.compile(r"^(var_query|pos_embed)$"), "topoflow.embeddings.{0}"),
    (re.compile(r"^(var_agg\.(in_proj_weight|in_proj_bias|out_proj\.weight|out_proj\.bias))$"),
     "topoflow.embeddings.{0}"),
    (re.compile(r"^(lead_time_embed\.(weight|bias))$"), "topoflow.embeddings.{0}"),
    (re.compile(r"^(blocks\.\d+\.(norm1|norm2|attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2)\.(weight|bias))$"),
     "topoflow.{0}"),
    (re.compile(r"^(norm\.(weight|bias))$"), "topoflow.{0}"),
    (re.compile(r"^(patch_embed_norm\.(weight|bias))$"), "topoflow.embeddings.{0}"),
    (re.compile(r"^(blocks\.\d+\.attn\.elevation_alpha)$"), "topoflow.{0}"),
)  # fmt: skip
_PER_VARIABLE_TOKEN = re.compile(r"^token_embeds\.(\d+)\.proj\.(weight|bias)$")
_HEAD = re.compile(r"^head\.(\d+)\.(weight|bias)$")


def load_climax_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a Lightning checkpoint (or a bare state dict), prefixes removed."""
    return load_source_checkpoint(path)[0]


def load_source_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The tensors of a Lightning checkpoint (or a bare state dict), prefixes removed, and its
    `hyper_parameters` (empty when it has none)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist.")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises pickle.UnpicklingError or RuntimeError here
        raise ValueError(
            f"{path}: cannot be read with torch.load(weights_only=True) ({error}). Only plain "
            f"tensors and containers are accepted; re-save the checkpoint's state_dict alone."
        ) from error
    state = checkpoint.get("state_dict", checkpoint) if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict) or not all(
        isinstance(value, torch.Tensor) for value in state.values()
    ):
        raise ValueError(f"{path}: expected a Lightning checkpoint or a dict of tensors.")
    hparams = checkpoint.get("hyper_parameters") if "state_dict" in checkpoint else None
    stripped = {_strip_prefix(key): value for key, value in state.items()}
    if len(stripped) != len(state):
        raise ValueError(f"{path}: two keys are the same tensor once their prefixes are removed.")
    return stripped, dict(hparams) if isinstance(hparams, dict) else {}


def _strip_prefix(key: str) -> str:
    for prefix in CLIMAX_PREFIXES:
        if key.startswith(prefix):
            return key[len(prefix) :]
    return key


def convert_climax_state_dict(
    source_state: dict[str, torch.Tensor],
    config: TopoFlowConfig,
    climax_variables: Sequence[str] | None = None,
    *,
    hparams: dict[str, Any] | None = None,
    wind_scan: bool | None = None,
) -> tuple[dict[str, torch.Tensor], TopoFlowConfig, ConversionReport]:
    """Source tensors -> (TopoFlowForForecasting state dict, the config it is for, the report).

    The returned config is `config` with the fields the source layout fixes (lead-time scale,
    patch-embedding LayerNorm, the paper code's elevation-bias blocks). `climax_variables` are the
    source's variables in its order (token embeddings, variable embeddings and head outputs follow
    it): ClimaX's `default_vars`; default the ones the checkpoint's `hparams` record, else
    `config.variables`. `wind_scan` says whether a TopoFlow-paper source ran its wind scan when its
    `hparams` do not record it.
    """
    report = ConversionReport()
    climax_state, config = read_source_keys(
        source_state, config, report, hparams=hparams, wind_scan=wind_scan
    )
    if climax_variables is None and recorded_variables(hparams):
        climax_variables = recorded_variables(hparams)
        report.notes.append(f"source variables from hyper_parameters: {climax_variables}")
    climax_variables = list(config.variables if climax_variables is None else climax_variables)
    missing_names = [name for name in config.variables if name not in climax_variables]
    if missing_names:
        raise ValueError(
            f"config.variables {missing_names} are not among the ClimaX variables "
            f"{climax_variables}; pass --climax-variables in the checkpoint's order."
        )
    input_ids = [climax_variables.index(name) for name in config.variables]
    converted: dict[str, torch.Tensor] = {}
    pending = dict(climax_state)

    _convert_token_embeddings(pending, converted, report, climax_variables, input_ids)
    if "var_embed" in pending:
        var_embed = pending.pop("var_embed")
        _check_variable_count("var_embed", var_embed.shape[1], climax_variables)
        converted["topoflow.embeddings.var_embed"] = var_embed[:, input_ids].clone()
        report.mapped["var_embed"] = "topoflow.embeddings.var_embed"
    _convert_head(pending, converted, report, climax_variables, config)
    for key in sorted(pending):
        target = _rename(key)
        if target is None:
            report.unmapped.append(key)
        else:
            converted[target] = pending[key].clone()
            report.mapped[key] = target
    _check_against_model(converted, report, config)
    _name_source_keys(report)
    return converted, config, report


def _name_source_keys(report: ConversionReport) -> None:
    """Report keys by the source's own names, not the names they were read under."""
    source = {name: key for key, name in report.renamed.items()}
    report.mapped = {source.get(key, key): target for key, target in report.mapped.items()}
    report.dropped = {source.get(key, key): why for key, why in report.dropped.items()}
    report.unmapped = sorted(source.get(key, key) for key in report.unmapped)


def _rename(key: str) -> str | None:
    for pattern, template in _RENAMES:
        if pattern.match(key):
            return template.format(key)
    return None


def _check_variable_count(key: str, count: int, climax_variables: list[str]) -> None:
    if count != len(climax_variables):
        raise ValueError(
            f"{key} has {count} variables but {len(climax_variables)} ClimaX variable names were "
            f"given ({climax_variables}); pass the checkpoint's default_vars with "
            f"--climax-variables."
        )


def _convert_token_embeddings(
    pending: dict[str, torch.Tensor],
    converted: dict[str, torch.Tensor],
    report: ConversionReport,
    climax_variables: list[str],
    input_ids: list[int],
) -> None:
    """Stack the selected variables' kernels into the grouped conv: (V*D, 1, p, p), (V*D,)."""
    target = "topoflow.embeddings.token_embed"
    if "token_embeds.proj_weights" in pending:  # ClimaX's ParallelVarPatchEmbed
        weights = pending.pop("token_embeds.proj_weights")  # (V_c, D, 1, p, p)
        biases = pending.pop("token_embeds.proj_biases")  # (V_c, D)
        _check_variable_count("token_embeds.proj_weights", weights.shape[0], climax_variables)
        converted[f"{target}.weight"] = weights[input_ids].flatten(0, 1).clone()
        converted[f"{target}.bias"] = biases[input_ids].flatten().clone()
        report.mapped["token_embeds.proj_weights"] = f"{target}.weight"
        report.mapped["token_embeds.proj_biases"] = f"{target}.bias"
        return
    per_variable: dict[tuple[int, str], torch.Tensor] = {}
    for key in [key for key in pending if _PER_VARIABLE_TOKEN.match(key)]:
        index, kind = _PER_VARIABLE_TOKEN.match(key).groups()
        per_variable[int(index), kind] = pending.pop(key)
        if int(index) in input_ids:
            report.mapped[key] = f"{target}.{kind}"
        elif int(index) < len(climax_variables):
            report.dropped[key] = (
                f"variable {climax_variables[int(index)]!r} not in config.variables"
            )
        else:
            report.unmapped.append(key)
    if not per_variable:
        return
    absent = [climax_variables[i] for i in input_ids if (i, "weight") not in per_variable]
    if absent:
        raise ValueError(f"token_embeds has no patch embedding for variables {absent}.")
    converted[f"{target}.weight"] = torch.cat([per_variable[i, "weight"] for i in input_ids])
    converted[f"{target}.bias"] = torch.cat([per_variable[i, "bias"] for i in input_ids])


def _convert_head(
    pending: dict[str, torch.Tensor],
    converted: dict[str, torch.Tensor],
    report: ConversionReport,
    climax_variables: list[str],
    config: TopoFlowConfig,
) -> None:
    """Copy head.<k>; keep only the target rows of the output layer when it predicts every
    ClimaX variable (its rows are ordered (p, p, variable), variable fastest)."""
    layers = sorted({int(_HEAD.match(key).group(1)) for key in pending if _HEAD.match(key)})
    if not layers:
        return
    patch_area = config.patch_size**2
    num_targets = len(config.target_variables)
    for layer in layers:
        for kind in ("weight", "bias"):
            key = f"head.{layer}.{kind}"
            if key not in pending:
                continue
            tensor = pending.pop(key)
            if layer == layers[-1] and tensor.shape[0] == len(climax_variables) * patch_area:
                tensor = _select_target_rows(tensor, climax_variables, config)
            elif layer == layers[-1] and tensor.shape[0] != num_targets * patch_area:
                raise ValueError(
                    f"{key} has {tensor.shape[0]} outputs; expected {len(climax_variables)} ClimaX "
                    f"variables or {num_targets} targets times patch_size**2={patch_area}."
                )
            converted[f"head.{layer}.{kind}"] = tensor.clone()
            report.mapped[key] = f"head.{layer}.{kind}"


def _select_target_rows(
    tensor: torch.Tensor, climax_variables: list[str], config: TopoFlowConfig
) -> torch.Tensor:
    absent = [name for name in config.target_variables if name not in climax_variables]
    if absent:
        raise ValueError(f"config.target_variables {absent} are not predicted by the ClimaX head.")
    target_ids = [climax_variables.index(name) for name in config.target_variables]
    patch_area = config.patch_size**2
    rows = tensor.reshape(patch_area, len(climax_variables), *tensor.shape[1:])
    return rows[:, target_ids].reshape(patch_area * len(target_ids), *tensor.shape[1:])


def _check_against_model(
    converted: dict[str, torch.Tensor], report: ConversionReport, config: TopoFlowConfig
) -> None:
    """Keys the model lacks become unmapped, wrong shapes raise; unfilled elevation-bias scalars are
    set from the config, any other unfilled model key is missing."""
    with torch.device("meta"):  # shapes only
        expected = TopoFlowForForecasting(config).state_dict()
    for key in [key for key in converted if key not in expected]:
        converted.pop(key)
        sources = [source for source, target in report.mapped.items() if target == key]
        for source in sources:
            report.mapped.pop(source)
            report.unmapped.append(source)
    for key, tensor in converted.items():
        if tensor.shape != expected[key].shape:
            raise ValueError(
                f"{key}: the ClimaX checkpoint gives shape {tuple(tensor.shape)}, the config "
                f"expects {tuple(expected[key].shape)}; check embed_dim, depth, patch_size, "
                f"img_size, mlp_ratio and decoder_depth."
            )
    for key in sorted(set(expected) - set(converted)):
        module, _, name = key.rpartition(".")
        if name in _FROM_CONFIG and module.endswith(".attn"):
            field_name, why = _FROM_CONFIG[name]
            value = getattr(config, field_name)
            converted[key] = torch.full(expected[key].shape, value, dtype=expected[key].dtype)
            report.from_config[key] = f"{why}: config.{field_name} = {value}"
        else:
            report.missing.append(key)
    report.unmapped.sort()


def convert_climax_checkpoint(
    checkpoint_path: str | Path,
    output_dir: str | Path,
    config: TopoFlowConfig,
    climax_variables: Sequence[str] | None = None,
    *,
    allow_missing: bool = False,
    wind_scan: bool | None = None,
) -> ConversionReport:
    """Convert and save a TopoFlowForForecasting folder (config, safetensors, Hub files, report).

    Refuses (ValueError) any source key it cannot convert exactly, and any model key the source
    does not provide unless `allow_missing`; those are then left out of the weights file, so
    `from_pretrained` reports them missing instead of loading them random.
    """
    state, hparams = load_source_checkpoint(checkpoint_path)
    converted, config, report = convert_climax_state_dict(
        state, config, climax_variables, hparams=hparams, wind_scan=wind_scan
    )
    if report.unmapped:
        raise ValueError(
            f"{checkpoint_path}: {len(report.unmapped)} keys have no TopoFlow counterpart in this "
            f"config: {report.unmapped}. Converting without them would change the forecasts; "
            f"check the config (embed_dim, depth, decoder_depth, patch_embed_norm) and layout."
        )
    if report.missing and not allow_missing:
        raise ValueError(
            f"{checkpoint_path}: the checkpoint does not provide {report.missing}; they would be "
            f"random. Pass allow_missing=True (--allow-missing) to write the folder without them "
            f"(from_pretrained then reports them missing)."
        )
    output_dir = Path(output_dir)
    if output_dir.exists() and any(output_dir.iterdir()):
        raise FileExistsError(f"output folder {output_dir} is not empty; choose a new folder.")
    # Written beside the target and renamed at the end, so a failure never leaves half a folder.
    staging = output_dir.with_name(f".{output_dir.name}.converting")
    if staging.exists():
        raise FileExistsError(f"{staging} exists (an interrupted conversion?); remove it first.")
    model = TopoFlowForForecasting(config)
    model.load_state_dict(converted, strict=False)
    # Only what the source (or the config, for elevation-bias scalars) provides is written.
    weights = {key: tensor for key, tensor in model.state_dict().items() if key in converted}
    check_finite_state_dict(weights, where=f"checkpoint {checkpoint_path}")
    # The report first, so the SHA256SUMS that save_pretrained writes covers it too.
    staging.mkdir(parents=True)
    (staging / REPORT_FILENAME).write_text(json.dumps(asdict(report), indent=2) + "\n")
    model.save_pretrained(staging, state_dict=weights)
    refuse_pickle_files(staging)
    if output_dir.exists():
        output_dir.rmdir()  # empty, checked above
    staging.rename(output_dir)
    return report


def _load_config(path: str | None) -> TopoFlowConfig:
    if path is None:
        return TopoFlowConfig()
    path_obj = Path(path)
    if path_obj.is_dir():
        return TopoFlowConfig.from_pretrained(path_obj)
    if not path_obj.is_file():
        raise FileNotFoundError(f"--config {path} is neither a config.json nor a model folder.")
    return TopoFlowConfig(**json.loads(path_obj.read_text()))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m topoflow.convert_climax", description=__doc__.splitlines()[0]
    )
    parser.add_argument(
        "checkpoint", help="ClimaX or TopoFlow-paper Lightning .ckpt (or a saved state dict)"
    )
    parser.add_argument("output_dir", help="folder to write the TopoFlow model into")
    parser.add_argument(
        "--config",
        help="TopoFlowConfig as a JSON file of its arguments or a model folder "
        "(default: the reference TopoFlowConfig())",
    )
    parser.add_argument(
        "--climax-variables",
        help="comma-separated ClimaX default_vars in checkpoint order (default: the variables "
        "the checkpoint records, else config.variables)",
    )
    parser.add_argument(
        "--allow-missing",
        action="store_true",
        help="write the folder even if the checkpoint lacks model weights; they are left out of "
        "the weights file, so from_pretrained reports them missing",
    )
    parser.add_argument(
        "--paper-wind-scan",
        choices=("on", "off"),
        help="for a TopoFlow-paper checkpoint without hyper_parameters: whether it was trained "
        "with the wind scan (parallel_patch_embed); 'on' is refused",
    )
    args = parser.parse_args(argv)
    climax_variables = args.climax_variables.split(",") if args.climax_variables else None
    report = convert_climax_checkpoint(
        args.checkpoint,
        args.output_dir,
        _load_config(args.config),
        climax_variables=climax_variables,
        allow_missing=args.allow_missing,
        wind_scan=None if args.paper_wind_scan is None else args.paper_wind_scan == "on",
    )
    print(report.summary())
    print(f"wrote {args.output_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
