"""Convert a ClimaX PyTorch Lightning checkpoint into a TopoFlow model folder (safetensors).

    python -m topoflow.convert_climax climax.ckpt out_folder --config config.json \
        --climax-variables u,v,temp,...

ClimaX (microsoft/ClimaX, src/climax/arch.py) names its tensors `token_embeds.<i>.proj.*` (one
timm PatchEmbed per variable) or `token_embeds.proj_weights/proj_biases` (grouped), `var_embed`,
`var_query`, `var_agg.*`, `pos_embed`, `lead_time_embed.*`, `blocks.<i>.*` (timm Block), `norm.*`
and `head.<k>.*`; a Lightning checkpoint holds them under `state_dict` with a `net.` (or `climax.`)
prefix. Its head predicts every ClimaX variable; the rows of the targets are kept. The checkpoint is
read with `torch.load(weights_only=True)` only: no pickled code is ever executed.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from configuration_topoflow import TopoFlowConfig
from modeling_topoflow import TopoFlowForForecasting

__all__ = [
    "ConversionReport",
    "convert_climax_checkpoint",
    "convert_climax_state_dict",
    "load_climax_state_dict",
    "main",
]

CLIMAX_PREFIXES = ("net.", "climax.", "model.net.", "model.")
REPORT_FILENAME = "conversion_report.json"

# ClimaX names whose TopoFlow name is the same under a new parent module.
_RENAMES = (
    (re.compile(r"^(var_query|pos_embed)$"), "topoflow.embeddings.{0}"),
    (re.compile(r"^(var_agg\.(in_proj_weight|in_proj_bias|out_proj\.weight|out_proj\.bias))$"),
     "topoflow.embeddings.{0}"),
    (re.compile(r"^(lead_time_embed\.(weight|bias))$"), "topoflow.embeddings.{0}"),
    (re.compile(r"^(blocks\.\d+\.(norm1|norm2|attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2)\.(weight|bias))$"),
     "topoflow.{0}"),
    (re.compile(r"^(norm\.(weight|bias))$"), "topoflow.{0}"),
)  # fmt: skip
_PER_VARIABLE_TOKEN = re.compile(r"^token_embeds\.(\d+)\.proj\.(weight|bias)$")
_HEAD = re.compile(r"^head\.(\d+)\.(weight|bias)$")


@dataclass
class ConversionReport:
    """What happened to every key.

    mapped: ClimaX key -> TopoFlow key it was written to (several ClimaX keys may feed one).
    dropped: ClimaX key -> why it was deliberately not used (e.g. a variable not in the config).
    unmapped: ClimaX keys no rule knows; conversion refuses them unless allowed.
    missing: TopoFlow keys the checkpoint did not provide; they keep their config initialization
        (the elevation-bias `elevation_alpha` and `H_scale` of biased blocks, typically).
    """

    mapped: dict[str, str] = field(default_factory=dict)
    dropped: dict[str, str] = field(default_factory=dict)
    unmapped: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)

    def summary(self) -> str:
        lines = [
            f"mapped {len(self.mapped)}, dropped {len(self.dropped)}, "
            f"unmapped {len(self.unmapped)}, missing {len(self.missing)}"
        ]
        lines += [f"  dropped  {key}: {why}" for key, why in sorted(self.dropped.items())]
        lines += [f"  unmapped {key}" for key in self.unmapped]
        lines += [f"  missing  {key} (initialized from the config)" for key in self.missing]
        return "\n".join(lines)


def load_climax_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The ClimaX tensors of a Lightning checkpoint (or a bare state dict), prefixes removed."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"ClimaX checkpoint {path} does not exist.")
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
    return {_strip_prefix(key): value for key, value in state.items()}


def _strip_prefix(key: str) -> str:
    for prefix in CLIMAX_PREFIXES:
        if key.startswith(prefix):
            return key[len(prefix) :]
    return key


def convert_climax_state_dict(
    climax_state: dict[str, torch.Tensor],
    config: TopoFlowConfig,
    climax_variables: Sequence[str] | None = None,
) -> tuple[dict[str, torch.Tensor], ConversionReport]:
    """ClimaX tensors -> TopoFlowForForecasting state dict for `config`, and the report.

    `climax_variables` are ClimaX's `default_vars` in its order (token embeddings, variable
    embeddings and head outputs follow it); default `config.variables`.
    """
    climax_variables = list(config.variables if climax_variables is None else climax_variables)
    missing_names = [name for name in config.variables if name not in climax_variables]
    if missing_names:
        raise ValueError(
            f"config.variables {missing_names} are not among the ClimaX variables "
            f"{climax_variables}; pass --climax-variables in the checkpoint's order."
        )
    input_ids = [climax_variables.index(name) for name in config.variables]
    report = ConversionReport()
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
    return converted, report


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
    """Keys the model lacks become unmapped, wrong shapes raise, unfilled model keys are missing."""
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
    report.missing = sorted(set(expected) - set(converted))
    report.unmapped.sort()


def convert_climax_checkpoint(
    checkpoint_path: str | Path,
    output_dir: str | Path,
    config: TopoFlowConfig,
    climax_variables: Sequence[str] | None = None,
    allow_unmapped: bool = False,
) -> ConversionReport:
    """Convert and save a TopoFlowForForecasting folder (config, safetensors, Hub files, report)."""
    state = load_climax_state_dict(checkpoint_path)
    converted, report = convert_climax_state_dict(state, config, climax_variables)
    if report.unmapped and not allow_unmapped:
        raise ValueError(
            f"{checkpoint_path}: {len(report.unmapped)} keys have no TopoFlow counterpart: "
            f"{report.unmapped}. Pass allow_unmapped=True (--allow-unmapped) to drop them."
        )
    model = TopoFlowForForecasting(config)
    model.load_state_dict(converted, strict=False)
    output_dir = Path(output_dir)
    # The report first, so the SHA256SUMS that save_pretrained writes covers it too.
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / REPORT_FILENAME).write_text(json.dumps(asdict(report), indent=2) + "\n")
    model.save_pretrained(output_dir)
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
    parser.add_argument("checkpoint", help="ClimaX Lightning .ckpt (or a saved state dict)")
    parser.add_argument("output_dir", help="folder to write the TopoFlow model into")
    parser.add_argument(
        "--config",
        help="TopoFlowConfig as a JSON file of its arguments or a model folder "
        "(default: the reference TopoFlowConfig())",
    )
    parser.add_argument(
        "--climax-variables",
        help="comma-separated ClimaX default_vars in checkpoint order (default: config.variables)",
    )
    parser.add_argument(
        "--allow-unmapped", action="store_true", help="drop keys with no TopoFlow counterpart"
    )
    args = parser.parse_args(argv)
    climax_variables = args.climax_variables.split(",") if args.climax_variables else None
    report = convert_climax_checkpoint(
        args.checkpoint,
        args.output_dir,
        _load_config(args.config),
        climax_variables=climax_variables,
        allow_unmapped=args.allow_unmapped,
    )
    print(report.summary())
    print(f"wrote {args.output_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
