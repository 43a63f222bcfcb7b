"""Build or load the model for training, report how the checkpoint loaded, and pick what trains.

The loading report is the guard against the researchers' past failure (a prediction head that did
not load and was silently random): when a model is loaded with the elevation bias switched on for
some blocks, the only keys allowed to be missing are those blocks' `attn.elevation_alpha` and
`attn.H_scale`; anything else missing or mismatched stops the run unless the user says otherwise.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from configuration_topoflow import TIME_FEATURES
from topoflow.data.anomaly_base import AnomalyBase, fit_anomaly_base
from topoflow.data.increment_scale import TRAIN_SPLIT_SCALE, increment_scale

__all__ = [
    "CONFIG_PRESETS",
    "LoadingReport",
    "MissingKeysError",
    "build_from_scratch",
    "build_from_scratch_config",
    "check_corpus_matches_config",
    "expected_new_keys",
    "make_loading_report",
    "preset_for_timing",
    "select_trainable",
]

logger = logging.getLogger(__name__)

# Architecture presets for --from-scratch; the data-dependent fields (variables, grid, statistics)
# always come from the corpus. `base` is what topoflow-base is trained with: small enough that the
# default fine-tune runs in minutes on two CPU cores.
CONFIG_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {"patch_size": 4, "embed_dim": 32, "depth": 2, "num_heads": 2, "mlp_ratio": 2.0,
             "decoder_depth": 2, "drop_path": 0.0, "drop_rate": 0.0},
    # topoflow-base (issue 12): 128 tokens of patch 4 on the default 32 x 64 grid, each wide
    # enough (embed 96 = 6 targets x 16 cells) to carry its patch; the head predicts the
    # correction to damped anomaly persistence (climatology, damping and scale fitted on the
    # training split: topoflow/data/anomaly_base.py), so training starts from a forecaster that
    # beats persistence and climatology; the time of day and of year of the initialization and
    # the valid time are inputs (the climatology is evaluated at them).
    "base": {"patch_size": 4, "embed_dim": 96, "depth": 4, "num_heads": 4, "mlp_ratio": 4.0,
             "decoder_depth": 2, "drop_path": 0.1, "drop_rate": 0.0,
             "forecast_target": "anomaly", "anomaly_damping": TRAIN_SPLIT_SCALE,
             "increment_scale": TRAIN_SPLIT_SCALE, "time_features": list(TIME_FEATURES)},
    # The previous base (issue 12, first retrain): the increment over the input state.
    "base-increment": {"patch_size": 4, "embed_dim": 96, "depth": 4, "num_heads": 4,
                       "mlp_ratio": 4.0, "decoder_depth": 2, "drop_path": 0.1, "drop_rate": 0.0,
                       "forecast_target": "increment", "increment_scale": TRAIN_SPLIT_SCALE,
                       "time_features": list(TIME_FEATURES)},
    # The terrain-worlds controls (docs/experiment.md): patch 2, so the 16 x 32 worlds give 128
    # tokens of 2 x 2 cells (blocking that crosses patch faces is twice that at patch 4), with the
    # `base-increment` head and inputs: the full-field head without the hour lost to persistence
    # there, and a per-cell climatology (the anomaly head) means nothing when every sample is its
    # own world.
    "worlds": {"patch_size": 2, "embed_dim": 64, "depth": 4, "num_heads": 4, "mlp_ratio": 4.0,
               "decoder_depth": 2, "drop_path": 0.1, "drop_rate": 0.0,
               "forecast_target": "increment", "increment_scale": TRAIN_SPLIT_SCALE,
               "time_features": list(TIME_FEATURES)},
}


def preset_for_timing(name: str, lead_times_hours: Sequence[int] = (12, 24, 48, 96),
                      target_variables: Sequence[str] = ("pm25", "pm10", "so2", "no2", "co",
                                                         "o3")) -> dict[str, Any]:
    """A preset with its training-split statistics replaced by placeholders (scale 1, damping
    0.5): their values do not change the cost of a step, and fitting them takes a corpus pass."""
    preset = dict(CONFIG_PRESETS[name])
    for key, value in (("increment_scale", 1.0), ("anomaly_damping", 0.5)):
        if preset.get(key) == TRAIN_SPLIT_SCALE:
            preset[key] = {target: {str(lead): value for lead in lead_times_hours}
                           for target in target_variables}  # fmt: skip
    return preset


class MissingKeysError(RuntimeError):
    """The checkpoint lacks keys other than the expected new elevation-bias keys."""


def expected_new_keys(blocks: Sequence[int]) -> list[str]:
    """Key suffixes that loading a checkpoint without bias in `blocks` must report as missing."""
    return [f"blocks.{block}.attn.{name}" for block in blocks
            for name in ("elevation_alpha", "H_scale")]


def _matches(key: str, suffix: str) -> bool:
    return key == suffix or key.endswith("." + suffix)


@dataclass
class LoadingReport:
    """What `from_pretrained(..., output_loading_info=True)` said, sorted by expectation."""

    missing_expected: list[str] = field(default_factory=list)
    missing_other: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        return [
            f"missing keys, new elevation-bias keys (initialized from the config): "
            f"{self.missing_expected or 'none'}",
            f"missing keys, other: {self.missing_other or 'none'}",
            f"unexpected keys (in the checkpoint, not used): {self.unexpected or 'none'}",
            f"mismatched keys: {self.mismatched or 'none'}",
        ]

    def as_dict(self) -> dict[str, list[str]]:
        return {"missing_expected": self.missing_expected, "missing_other": self.missing_other,
                "unexpected": self.unexpected, "mismatched": self.mismatched}


def make_loading_report(info: Mapping[str, Any], blocks: Sequence[int], *, model_name: str,
                        allow_missing: bool) -> LoadingReport:
    """Sort the loading info; raise MissingKeysError when the load is not what fine-tuning needs."""
    suffixes = expected_new_keys(blocks)
    report = LoadingReport()
    for key in sorted(info.get("missing_keys", [])):
        expected = any(_matches(key, suffix) for suffix in suffixes)
        (report.missing_expected if expected else report.missing_other).append(key)
    report.unexpected = sorted(info.get("unexpected_keys", []))
    report.mismatched = sorted(str(item[0]) if isinstance(item, (tuple, list)) else str(item)
                               for item in info.get("mismatched_keys", []))
    problems = report.missing_other + report.mismatched
    if problems and not allow_missing:
        raise MissingKeysError(
            f"loading {model_name!r}: keys other than the new elevation-bias keys "
            f"{suffixes} are missing or mismatched: {problems}. They would start from random "
            "values (the bug behind a val loss of 2.27 instead of 0.36). Check the architecture "
            "flags, or pass --allow-missing-keys to train anyway."
        )
    return report


def build_from_scratch_config(config_arg: str, corpus_meta: Any, **kwargs: Any) -> Any:
    """The TopoFlowConfig of `build_from_scratch` (same arguments)."""
    return build_from_scratch(config_arg, corpus_meta, **kwargs)[0]


def build_from_scratch(config_arg: str, corpus_meta: Any, *, elevation_blocks: list[int],
                       elevation_scale: float, alpha_init: float,
                       elevation_direction: str | None = None,
                       corpus: str | Path | None = None) -> tuple[Any, AnomalyBase | None]:
    """TopoFlowConfig from a preset name or a config.json, completed from the corpus metadata,
    and the fitted anomaly base a `forecast_target="anomaly"` model must load (else None).

    `"train-split"` in `increment_scale` or `anomaly_damping` (the `base` preset) is computed
    from `corpus`'s training split (topoflow/data/increment_scale.py, anomaly_base.py) and stored
    in the config as numbers; the anomaly climatology goes into the weights
    (`AnomalyBase.load_into`).
    """
    from configuration_topoflow import (
        DEFAULT_LEAD_TIMES_HOURS,
        DEFAULT_TARGET_VARIABLES,
        DEFAULT_VARIABLES,
        TopoFlowConfig,
    )

    if config_arg in CONFIG_PRESETS:
        overrides = dict(CONFIG_PRESETS[config_arg])
    else:
        path = Path(config_arg)
        if not path.is_file():
            raise FileNotFoundError(f"--config {config_arg!r} is neither a preset "
                                    f"{sorted(CONFIG_PRESETS)} nor an existing config.json")
        overrides = json.loads(path.read_text(encoding="utf-8"))
    available = set(corpus_meta.variables) | set(corpus_meta.static_variables)
    variables = overrides.pop("variables", [v for v in DEFAULT_VARIABLES if v in available])
    targets = overrides.pop("target_variables",
                            [v for v in DEFAULT_TARGET_VARIABLES if v in corpus_meta.variables])
    norm = corpus_meta.normalization
    names = list(dict.fromkeys([*variables, *targets]))
    missing_stats = [name for name in names if name not in norm]
    if missing_stats:
        raise ValueError(f"corpus {corpus_meta.source}: no normalization statistics for "
                         f"{missing_stats}")
    # The reference lead times, minus those the corpus's halo cannot serve (small test corpora).
    servable = [lead for lead in DEFAULT_LEAD_TIMES_HOURS if lead <= corpus_meta.halo_hours]
    leads = overrides.pop("lead_times_hours", servable)
    fields = {
        "lead_times_hours": leads,
        "variables": variables,
        "target_variables": targets,
        "img_size": [corpus_meta.height, corpus_meta.width],
        "variable_mean": {name: float(norm[name]["mean"]) for name in names},
        "variable_std": {name: float(norm[name]["std"]) for name in names},
        "variable_units": {name: corpus_meta.units.get(name, "") for name in names},
        "grid": dict(corpus_meta.grid),
        "corpus": {"name": corpus_meta.name, "provenance": corpus_meta.provenance},
        "elevation_bias_blocks": elevation_blocks,
        "elevation_scale": elevation_scale,
        "elevation_alpha_init": alpha_init,
    }
    if elevation_direction is not None:
        fields["elevation_bias_direction"] = elevation_direction
    fields.update(overrides)
    normalization = {"mean": fields["variable_mean"], "std": fields["variable_std"]}
    fitted = [key for key in ("increment_scale", "anomaly_damping")
              if fields.get(key) == TRAIN_SPLIT_SCALE]  # fmt: skip
    if fitted and corpus is None:
        raise ValueError(f"--config {config_arg}: {fitted} {TRAIN_SPLIT_SCALE!r} needs the corpus "
                         f"to compute them from")
    anomaly_base = None
    if fields.get("forecast_target") == "anomaly":
        if fields.get("anomaly_damping") != TRAIN_SPLIT_SCALE:
            raise ValueError(f"--config {config_arg}: forecast_target 'anomaly' from scratch needs "
                             f"anomaly_damping {TRAIN_SPLIT_SCALE!r}: its climatology is fitted "
                             f"with the damping")  # fmt: skip
        anomaly_base = fit_anomaly_base(
            corpus, target_variables=targets, lead_times_hours=fields["lead_times_hours"],
            normalization=normalization)  # fmt: skip
        fields["anomaly_damping"] = anomaly_base.damping
        if fields.get("increment_scale") == TRAIN_SPLIT_SCALE:
            fields["increment_scale"] = anomaly_base.scale
    elif fields.get("increment_scale") == TRAIN_SPLIT_SCALE:
        fields["increment_scale"] = increment_scale(
            corpus, variables=variables, target_variables=targets,
            lead_times_hours=fields["lead_times_hours"], normalization=normalization)
    return TopoFlowConfig(**fields), anomaly_base


def check_corpus_matches_config(config: Any, corpus_meta: Any) -> None:
    """Raise ValueError when the corpus cannot feed this model (names, grid)."""
    available = set(corpus_meta.variables) | set(corpus_meta.static_variables)
    where = corpus_meta.source or corpus_meta.name
    missing = [name for name in config.variables if name not in available]
    if missing:
        raise ValueError(f"corpus {where} lacks the model's input variables {missing}; "
                         f"it has {sorted(available)}")
    missing = [name for name in config.target_variables if name not in corpus_meta.variables]
    if missing:
        raise ValueError(f"corpus {where} lacks the model's target variables {missing}; its "
                         f"dynamic variables are {corpus_meta.variables}")
    if list(config.img_size) != [corpus_meta.height, corpus_meta.width]:
        raise ValueError(f"corpus {where} grid is {corpus_meta.height}x{corpus_meta.width} but the "
                         f"model expects img_size {config.img_size}")
    _check_units_match(config, corpus_meta, where)
    _check_statistics_match(config, corpus_meta, where)


def _check_units_match(config: Any, corpus_meta: Any, where: str) -> None:
    """A model normalizes with statistics in its own units: data in other units is nonsense to
    it (CO in ug/m3 fed to a model trained on mg/m3 gave a val loss of 664,533)."""
    model_units = config.variable_units or {}
    names = list(dict.fromkeys([*config.variables, *config.target_variables]))
    unknown = [name for name in names if name not in model_units]
    if unknown:
        logger.warning("the model's config.variable_units does not name the units of %s: they "
                       "cannot be compared with corpus %s", unknown, where)
    differ = {name: (model_units[name], corpus_meta.units.get(name)) for name in names
              if name in model_units and model_units[name] != corpus_meta.units.get(name)}
    if differ:
        shown = ", ".join(f"{name}: model {a!r}, corpus {b!r}" for name, (a, b) in differ.items())
        raise ValueError(f"corpus {where} holds variables in other units than the model was "
                         f"trained on ({shown}); convert the corpus or use a matching model")


# How far the model's normalization statistics may lie from the corpus's before the corpus is
# taken for other data (a scaled unit, a wrong variable): a std ratio beyond this factor, or means
# this many model standard deviations apart.
STATISTICS_TOLERANCE = 10.0


def _check_statistics_match(config: Any, corpus_meta: Any, where: str) -> None:
    names = list(dict.fromkeys([*config.variables, *config.target_variables]))
    far = []
    for name in names:
        stats = corpus_meta.normalization.get(name)
        if stats is None:
            continue
        mean, std = float(config.variable_mean[name]), float(config.variable_std[name])
        ratio = float(stats["std"]) / std
        shift = abs(float(stats["mean"]) - mean) / std
        if not 1 / STATISTICS_TOLERANCE <= ratio <= STATISTICS_TOLERANCE or shift > (
                STATISTICS_TOLERANCE):
            far.append(f"{name}: model mean {mean:.4g} std {std:.4g}, corpus mean "
                       f"{float(stats['mean']):.4g} std {float(stats['std']):.4g}")
    if far:
        raise ValueError(f"corpus {where} does not look like the data the model was trained on "
                         f"(statistics {STATISTICS_TOLERANCE:g}x apart or more): {'; '.join(far)}")


def select_trainable(model: torch.nn.Module, mode: str, *, new_keys: Sequence[str],
                     blocks: Sequence[int]) -> list[str]:
    """Freeze every parameter `mode` does not name; return the trainable parameter names."""
    names = [name for name, _ in model.named_parameters()]
    if mode == "all":
        chosen = names
    elif mode == "new":
        chosen = [n for n in names if any(_matches(n, k) or n == k for k in new_keys)]
    elif mode == "elevation":
        chosen = [n for n in names if n.endswith("elevation_alpha")]
    elif mode == "head":
        chosen = [n for n in names if ".head." in f".{n}"]
    elif mode == "bias-blocks":
        chosen = [n for n in names if any(f"blocks.{b}." in f".{n}" for b in blocks)]
    else:
        prefixes = [p.strip() for p in mode[len("prefix:"):].split(",") if p.strip()]
        chosen = [n for n in names if any(n.startswith(p) for p in prefixes)]
    if not chosen:
        raise ValueError(f"--trainable {mode} selects no parameter of the model; parameter names "
                         f"look like {names[:5]}")
    keep = set(chosen)
    for name, param in model.named_parameters():
        param.requires_grad_(name in keep)
    return chosen
