"""TopoFlow configuration: a ClimaX-style forecaster with elevation-biased attention.

Hub remote code: this file imports only the standard library and transformers, nothing
from `topoflow/`, so a Hub user needs torch + transformers only.
"""

from __future__ import annotations

import difflib
import inspect
import math
import numbers
from collections.abc import Mapping, Sequence
from typing import Any

from transformers import PretrainedConfig

__all__ = [
    "DEFAULT_LEAD_TIMES_HOURS",
    "DEFAULT_LEAD_TIME_SCALE_HOURS",
    "DEFAULT_TARGET_VARIABLES",
    "DEFAULT_VARIABLES",
    "ELEVATION_BIAS_DIRECTIONS",
    "FORECAST_TARGETS",
    "TIME_FEATURES",
    "TopoFlowConfig",
]

# The paper's 15 inputs, in the order the reference checkpoint was trained with.
DEFAULT_VARIABLES: tuple[str, ...] = (
    "u", "v", "temp", "rh", "psfc", "pm10", "so2", "no2", "co", "o3",
    "lat2d", "lon2d", "pm25", "elevation", "population",
)  # fmt: skip
DEFAULT_TARGET_VARIABLES: tuple[str, ...] = ("pm25", "pm10", "so2", "no2", "co", "o3")
DEFAULT_LEAD_TIMES_HOURS: tuple[int, ...] = (12, 24, 48, 96)
# ClimaX feeds the lead-time embedding hours / 100; checkpoints converted from ClimaX rely on it.
DEFAULT_LEAD_TIME_SCALE_HOURS = 100.0
# The transport an elevation bias penalizes (see `elevation_bias_direction` below).
ELEVATION_BIAS_DIRECTIONS: tuple[str, ...] = ("downslope", "upslope")
# What rise between two patches the bias reads (see `elevation_bias_rise` below).
ELEVATION_BIAS_RISES: tuple[str, ...] = ("endpoint", "path")
# What the prediction head outputs (see `forecast_target` below).
FORECAST_TARGETS: tuple[str, ...] = ("field", "increment", "anomaly")
# Calendar inputs the data pipeline can derive from a sample's time stamp; each is a phase in
# [0, 1) fed to the model as (sin, cos) of 2 pi x phase (see `time_features` below).
TIME_FEATURES: tuple[str, ...] = (
    "init_time_of_day", "init_time_of_year", "valid_time_of_day", "valid_time_of_year",
)  # fmt: skip


class TopoFlowConfig(PretrainedConfig):
    r"""Configuration of a TopoFlow model. `TopoFlowConfig()` alone is the paper's reference setup.

    Args:
        variables (`Sequence[str]`, defaults to the 15 `DEFAULT_VARIABLES`):
            Input variable names, in the channel order of `fields` (`(B, V, H, W)`).
        target_variables (`Sequence[str]`, defaults to the 6 pollutants `DEFAULT_TARGET_VARIABLES`):
            Forecast variable names, in the channel order of `labels` and `forecast`.
        img_size (`Sequence[int]`, defaults to `(128, 256)`):
            Grid height and width in cells (H, W). Both must be divisible by `patch_size`.
        patch_size (`int`, defaults to 2):
            Side of a square patch in grid cells; one token per patch.
        embed_dim (`int`, defaults to 768):
            Token width D. Must be divisible by `num_heads`.
        depth (`int`, defaults to 6):
            Number of transformer blocks.
        num_heads (`int`, defaults to 8):
            Attention heads per block (also used by the variable-aggregation cross-attention).
        mlp_ratio (`float`, defaults to 4.0):
            Hidden width of each block's MLP, as a multiple of `embed_dim`.
        decoder_depth (`int`, defaults to 2):
            Hidden layers of the prediction head: `decoder_depth` x (Linear(D, D) + GELU), then
            Linear(D, len(target_variables) * patch_size**2). 2 gives the checkpoint's 3 Linear
            layers.
        drop_path (`float`, defaults to 0.1):
            Maximum stochastic-depth rate, increased linearly from 0 over the blocks (as ClimaX).
        drop_rate (`float`, defaults to 0.1):
            Dropout after the embeddings, after each attention projection and inside each MLP.
        attention_dropout (`float`, defaults to 0.0):
            Dropout on the attention probabilities (ClimaX uses none).
        lead_times_hours (`Sequence[int]`, defaults to `(12, 24, 48, 96)`):
            Lead times (hours) the model is trained and evaluated for. The model itself accepts any
            positive lead; this list tells the data pipeline and the model card what was used.
        lead_time_scale_hours (`float`, defaults to 100.0):
            Hours per unit of the lead-time embedding's input: it sees
            `lead_time_hours / lead_time_scale_hours`. 100 is ClimaX's scale; the TopoFlow paper
            code (AmmarKheder/TopoFlow) feeds raw hours, so its converted checkpoints use 1.0.
        patch_embed_norm (`bool`, defaults to `False`):
            Apply a LayerNorm (over `embed_dim`, one shared by all variables) to each variable's
            patch tokens after the patch projection and before the variable embedding is added.
            ClimaX has none; the TopoFlow paper code has one (`patch_embed.norm`), so its converted
            checkpoints set True. Adds the weights `embeddings.patch_embed_norm.{weight,bias}`.
        elevation_bias_blocks (`Sequence[int]`, defaults to `()`):
            Indices (0..depth-1) of the blocks whose attention gets the elevation bias.
            Empty = the baseline.
        elevation_scale (`float`, defaults to 1000.0):
            H_scale in metres: the height difference that costs `elevation_alpha` logits.
        elevation_alpha_init (`float`, defaults to 0.0):
            Initial value of each biased block's learnable `elevation_alpha`. 0 leaves the function
            of a baseline checkpoint unchanged at step 0; the paper used 2.0.
        elevation_bias_clamp (`float`, defaults to 10.0):
            The bias is clamped to [-elevation_bias_clamp, 0] logits.
        elevation_bias_direction (`str`, defaults to `"downslope"`):
            Which transport the bias penalizes, with query i the receiver and key j the source.
            `"downslope"` (DESIGN.md): attending to a higher source, B = clamp(-alpha *
            ReLU((z_j - z_i) / H_scale), -clamp, 0). `"upslope"`: attending to a lower source,
            the same formula with z_i - z_j; this is the direction the embedded corpus's terrain
            blocking acts in (docs/results/README.md). A checkpoint without the key is downslope.
        elevation_bias_placebo (`bool`, defaults to `False`):
            Compute the bias from a per-sample random shuffle of the patch heights instead of the
            heights themselves: the same values, no geography (the placebo arm of the controlled
            experiment, docs/experiment.md). A fresh permutation per sample and forward pass in
            training; in evaluation a fixed-seed one, so evaluation is repeatable. With
            `elevation_bias_rise="path"` the same permutation reorders both axes of the ascent
            matrix (the same ascent values, no geography).
        elevation_bias_rise (`str`, defaults to `"endpoint"`):
            The height difference the bias reads. `"endpoint"` (DESIGN.md): the difference of the
            two patch means. `"path"` (the oracle of docs/experiment.md): the total ascent along
            the straight segment between the two patch centres on the cell-resolution terrain,
            so a ridge between two low patches counts; `"upslope"` penalizes the climb from the
            source to the receiver, `"downslope"` the climb from the receiver to the source.
            Needs the full-resolution elevation and materializes a (B, N, N) bias: O(N^2 (H + W))
            work per sample, an ablation for moderate grids.
        elevation_alpha_per_head (`bool`, defaults to `False`):
            One learnable `elevation_alpha` per attention head (shape `(num_heads,)`) instead of
            one per block, so some heads can use the bias while others ignore it. The bias is
            then materialized per head (O(N^2) memory, like `elevation_bias_rise="path"`).
        elevation_input_masked (`bool`, defaults to `False`):
            Set the elevation input channel to 0 (its training mean) before the patch embedding,
            after the bias has read it: the model then sees the terrain only through the bias
            (with no bias block: not at all). An ablation separating the bias from the channel.
        elevation_variable (`str` or `None`, defaults to `"elevation"`):
            Input channel holding the terrain elevation (normalized like every input). When it is
            None or not among `variables`, `forward` needs `elevation=` (metres) if bias blocks
            are set.
        variable_mean (`Mapping[str, float]`, defaults to 0.0 for every variable):
            Mean used to normalize each input and target variable, in its physical unit.
        variable_std (`Mapping[str, float]`, defaults to 1.0 for every variable):
            Standard deviation used to normalize each variable (> 0). With the defaults the
            elevation channel is already in metres.
        variable_units (`Mapping[str, str]`, *optional*):
            Physical unit of each variable (e.g. `{"pm25": "ug/m3", "elevation": "m"}`).
        grid (`Mapping[str, float]`, *optional*):
            Description of the grid: `lat_min`, `lat_max`, `lon_min`, `lon_max` (degrees),
            `resolution_deg`.
        region_mask_description (`str`, *optional*):
            What the `region_mask` of the training corpus selects (e.g. "land cells inside China").
        corpus (`Mapping[str, Any]`, *optional*):
            Name and provenance of the training corpus (generator or converter, parameters,
            version).
        forecast_target (`str`, defaults to `"field"`):
            What the prediction head outputs. `"field"`: the normalized targets themselves
            (ClimaX; converted ClimaX checkpoints need it). `"increment"`: the change over the
            input state, forecast = input channel of each target + head output x
            `increment_scale[target][lead]`, so a head output of 0 is persistence. Needs every
            target variable among `variables`.
        increment_scale (`Mapping[str, Mapping[str, float]]`, *optional*):
            With `forecast_target="increment"`: per target variable and lead time (hours, as a
            string key, as JSON stores it), the root-mean-square of the normalized increment
            (target at t + lead minus input at t) over the valid cells of the training split, so
            the head outputs increments of unit scale at every lead. None = 1 everywhere. Must
            cover every target and every lead in `lead_times_hours`; `forward` refuses a lead
            it has no scale for.
        time_features (`Sequence[str]`, defaults to `()`):
            Calendar inputs, a subset of `TIME_FEATURES`, in the order of the batch's
            `time_features` tensor `(B, 2 * len(time_features))`: the time of day and of year of
            the initialization (`init_...`) and of the valid time t + lead (`valid_...`), each as
            (sin, cos) of its phase. The data pipeline derives them from each sample's time
            stamp (`make_forecast_dataset(time_features=config.time_features)`); a linear layer
            adds them to every token, like the lead time. Empty = no calendar input (ClimaX).
        initializer_range (`float`, defaults to 0.02):
            Standard deviation of the truncated normal used for Linear and patch-embedding weights.
    """

    model_type = "topoflow"
    # The names transformers' generic code and users read on every config (ViT's and BERT's).
    attribute_map = {
        "hidden_size": "embed_dim",
        "num_hidden_layers": "depth",
        "num_attention_heads": "num_heads",
    }

    def __init__(
        self,
        variables: Sequence[str] = DEFAULT_VARIABLES,
        target_variables: Sequence[str] = DEFAULT_TARGET_VARIABLES,
        img_size: Sequence[int] = (128, 256),
        patch_size: int = 2,
        embed_dim: int = 768,
        depth: int = 6,
        num_heads: int = 8,
        mlp_ratio: float = 4.0,
        decoder_depth: int = 2,
        drop_path: float = 0.1,
        drop_rate: float = 0.1,
        attention_dropout: float = 0.0,
        lead_times_hours: Sequence[int] = DEFAULT_LEAD_TIMES_HOURS,
        lead_time_scale_hours: float = DEFAULT_LEAD_TIME_SCALE_HOURS,
        patch_embed_norm: bool = False,
        elevation_bias_blocks: Sequence[int] = (),
        elevation_scale: float = 1000.0,
        elevation_alpha_init: float = 0.0,
        elevation_bias_clamp: float = 10.0,
        elevation_bias_direction: str = "downslope",
        elevation_variable: str | None = "elevation",
        elevation_bias_placebo: bool = False,
        elevation_bias_rise: str = "endpoint",
        elevation_alpha_per_head: bool = False,
        elevation_input_masked: bool = False,
        variable_mean: Mapping[str, float] | None = None,
        variable_std: Mapping[str, float] | None = None,
        variable_units: Mapping[str, str] | None = None,
        grid: Mapping[str, float] | None = None,
        region_mask_description: str | None = None,
        corpus: Mapping[str, Any] | None = None,
        forecast_target: str = "field",
        increment_scale: Mapping[str, Mapping[str, float]] | None = None,
        anomaly_damping: Mapping[str, Mapping[str, float]] | None = None,
        time_features: Sequence[str] = (),
        initializer_range: float = 0.02,
        **kwargs: Any,
    ) -> None:
        # Lists, not tuples: config.json stores lists, and a loaded config must equal a fresh one.
        self.variables = list(variables)
        self.target_variables = list(target_variables)
        # Integers from numpy (a corpus's grid) become plain ints; anything else is left for
        # check_topoflow to refuse by name.
        self.img_size = [int(s) if isinstance(s, numbers.Integral) else s for s in img_size]
        self.patch_size = patch_size
        self.embed_dim = embed_dim
        self.depth = depth
        self.num_heads = num_heads
        self.mlp_ratio = mlp_ratio
        self.decoder_depth = decoder_depth
        self.drop_path = drop_path
        self.drop_rate = drop_rate
        self.attention_dropout = attention_dropout
        self.lead_times_hours = list(lead_times_hours)
        self.lead_time_scale_hours = lead_time_scale_hours
        self.patch_embed_norm = patch_embed_norm
        self.elevation_bias_blocks = sorted(int(index) for index in elevation_bias_blocks)
        self.elevation_scale = _as_float("elevation_scale", elevation_scale)
        self.elevation_alpha_init = _as_float("elevation_alpha_init", elevation_alpha_init)
        self.elevation_bias_clamp = _as_float("elevation_bias_clamp", elevation_bias_clamp)
        self.elevation_bias_direction = elevation_bias_direction
        self.elevation_variable = elevation_variable
        self.elevation_bias_placebo = elevation_bias_placebo
        self.elevation_bias_rise = elevation_bias_rise
        self.elevation_alpha_per_head = elevation_alpha_per_head
        self.elevation_input_masked = elevation_input_masked
        all_names = dict.fromkeys([*self.variables, *self.target_variables])
        self.variable_mean = (
            {name: 0.0 for name in all_names} if variable_mean is None else dict(variable_mean)
        )
        self.variable_std = (
            {name: 1.0 for name in all_names} if variable_std is None else dict(variable_std)
        )
        self.variable_units = None if variable_units is None else dict(variable_units)
        self.grid = None if grid is None else dict(grid)
        self.region_mask_description = region_mask_description
        self.corpus = None if corpus is None else dict(corpus)
        self.forecast_target = forecast_target
        self.increment_scale = _per_target_lead_table(increment_scale)
        self.anomaly_damping = _per_target_lead_table(anomaly_damping)
        self.time_features = list(time_features)
        self.initializer_range = initializer_range
        _refuse_misspelled_fields(kwargs)
        super().__init__(**kwargs)
        self.check_topoflow()

    @property
    def grid_size(self) -> tuple[int, int]:
        """Patches along (height, width)."""
        return self.img_size[0] // self.patch_size, self.img_size[1] // self.patch_size

    @property
    def num_patches(self) -> int:
        """Tokens per sample, N."""
        height, width = self.grid_size
        return height * width

    @property
    def elevation_channel(self) -> int | None:
        """Index of the elevation input channel, or None when the inputs carry no elevation."""
        if self.elevation_variable is None or self.elevation_variable not in self.variables:
            return None
        return self.variables.index(self.elevation_variable)

    @property
    def target_input_channels(self) -> list[int]:
        """Input channel of each target variable (the state an increment is added to)."""
        return [self.variables.index(name) for name in self.target_variables]

    def validate(self) -> None:
        # transformers runs `validate()` before saving; ours adds the TopoFlow checks so a config
        # edited after construction (e.g. `from_pretrained(..., elevation_bias_blocks=[9])`, which
        # transformers applies with setattr) cannot be saved or built into a model silently broken.
        super().validate()
        self.check_topoflow()

    def check_topoflow(self) -> None:
        """Raise `ValueError` naming the field at fault if the TopoFlow fields are inconsistent."""
        self._check_types()
        self._check_names()
        self._check_geometry()
        self._check_elevation()
        self._check_statistics()
        self._check_forecast_target()
        self._check_time_features()

    def _check_types(self) -> None:
        # A size from a hand-edited config.json as "4" would otherwise fail deep inside torch with
        # a TypeError that names no field.
        for field in _INT_FIELDS:
            _check_int(field, getattr(self, field))
        for index, size in enumerate(self.img_size):
            _check_int(f"img_size[{index}]", size)
        for index, hours in enumerate(self.lead_times_hours):
            _check_int(f"lead_times_hours[{index}]", hours)
        for field in _REAL_FIELDS:
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise ValueError(
                    f"TopoFlowConfig.{field} must be a number, got {value!r} "
                    f"({type(value).__name__})."
                )

    def _check_names(self) -> None:
        for field in ("variables", "target_variables"):
            names = list(getattr(self, field))
            if not names:
                raise ValueError(f"TopoFlowConfig.{field} is empty; expected at least one name.")
            duplicates = sorted({name for name in names if names.count(name) > 1})
            if duplicates:
                raise ValueError(f"TopoFlowConfig.{field} has duplicate names {duplicates}.")
        if any(hours <= 0 for hours in self.lead_times_hours):
            raise ValueError(
                f"TopoFlowConfig.lead_times_hours must be positive, got {self.lead_times_hours}."
            )

    def _check_geometry(self) -> None:
        for field in ("patch_size", "embed_dim", "depth", "num_heads"):
            if int(getattr(self, field)) < 1:
                raise ValueError(
                    f"TopoFlowConfig.{field} must be >= 1, got {getattr(self, field)}."
                )
        if self.decoder_depth < 0:
            raise ValueError(
                f"TopoFlowConfig.decoder_depth must be >= 0, got {self.decoder_depth}."
            )
        if len(self.img_size) != 2 or any(size % self.patch_size for size in self.img_size):
            raise ValueError(
                f"TopoFlowConfig.img_size must be (H, W) divisible by "
                f"patch_size={self.patch_size}, "
                f"got {self.img_size}."
            )
        if self.embed_dim % self.num_heads:
            raise ValueError(
                f"TopoFlowConfig.embed_dim={self.embed_dim} is not divisible by "
                f"num_heads={self.num_heads}."
            )
        if not isinstance(self.patch_embed_norm, bool):
            raise ValueError(
                f"TopoFlowConfig.patch_embed_norm must be true or false, got "
                f"{self.patch_embed_norm!r}."
            )
        scale = self.lead_time_scale_hours
        if (
            isinstance(scale, bool)
            or not isinstance(scale, (int, float))
            or not (math.isfinite(scale) and scale > 0)
        ):
            raise ValueError(
                f"TopoFlowConfig.lead_time_scale_hours (hours per unit of the lead-time "
                f"embedding's input) must be a finite number > 0, got {scale!r}."
            )
        for field in ("drop_path", "drop_rate", "attention_dropout"):
            if not 0.0 <= getattr(self, field) < 1.0:
                raise ValueError(
                    f"TopoFlowConfig.{field} must be in [0, 1), got {getattr(self, field)}."
                )

    def _check_elevation(self) -> None:
        blocks = list(self.elevation_bias_blocks)
        bad = [index for index in blocks if not 0 <= int(index) < self.depth]
        if bad:
            raise ValueError(
                f"TopoFlowConfig.elevation_bias_blocks {bad} out of range: blocks are "
                f"0..{self.depth - 1} (depth={self.depth})."
            )
        if len(set(blocks)) != len(blocks):
            raise ValueError(f"TopoFlowConfig.elevation_bias_blocks has duplicates: {blocks}.")
        if not (math.isfinite(self.elevation_scale) and self.elevation_scale > 0):
            raise ValueError(
                f"TopoFlowConfig.elevation_scale (H_scale, metres) must be > 0, got "
                f"{self.elevation_scale}."
            )
        if not self.elevation_bias_clamp >= 0:
            raise ValueError(
                f"TopoFlowConfig.elevation_bias_clamp must be >= 0, got "
                f"{self.elevation_bias_clamp}."
            )
        if self.elevation_bias_direction not in ELEVATION_BIAS_DIRECTIONS:
            raise ValueError(
                f"TopoFlowConfig.elevation_bias_direction must be one of "
                f"{list(ELEVATION_BIAS_DIRECTIONS)}, got {self.elevation_bias_direction!r}."
            )
        if self.elevation_bias_rise not in ELEVATION_BIAS_RISES:
            raise ValueError(
                f"TopoFlowConfig.elevation_bias_rise must be one of {list(ELEVATION_BIAS_RISES)}, "
                f"got {self.elevation_bias_rise!r}."
            )
        for field in ("elevation_bias_placebo", "elevation_input_masked",
                      "elevation_alpha_per_head"):
            if not isinstance(getattr(self, field), bool):
                raise ValueError(
                    f"TopoFlowConfig.{field} must be true or false, got {getattr(self, field)!r}."
                )
        if self.elevation_input_masked and self.elevation_channel is None:
            raise ValueError(
                f"TopoFlowConfig.elevation_input_masked=True needs the elevation channel "
                f"elevation_variable={self.elevation_variable!r} among the variables."
            )
        if not (math.isfinite(self.elevation_alpha_init) and self.elevation_alpha_init >= 0):
            raise ValueError(
                f"TopoFlowConfig.elevation_alpha_init must be finite and >= 0 (below 0 the "
                f"clamped bias and alpha's gradient are both 0 for good), got "
                f"{self.elevation_alpha_init}."
            )

    def _check_statistics(self) -> None:
        needed = list(dict.fromkeys([*self.variables, *self.target_variables]))
        for field in ("variable_mean", "variable_std"):
            stats = getattr(self, field)
            missing = [name for name in needed if name not in stats]
            if missing:
                raise ValueError(
                    f"TopoFlowConfig.{field} has no entry for {missing}; it must cover every input "
                    f"and target variable."
                )
            not_finite = [name for name in needed if not math.isfinite(float(stats[name]))]
            if not_finite:
                raise ValueError(f"TopoFlowConfig.{field} is not finite for {not_finite}.")
        not_positive = [name for name in needed if not float(self.variable_std[name]) > 0]
        if not_positive:
            raise ValueError(
                f"TopoFlowConfig.variable_std must be > 0, got <= 0 for {not_positive}."
            )


    def _check_forecast_target(self) -> None:
        if self.forecast_target not in FORECAST_TARGETS:
            raise ValueError(
                f"TopoFlowConfig.forecast_target must be one of {list(FORECAST_TARGETS)}, got "
                f"{self.forecast_target!r}."
            )
        if self.forecast_target != "anomaly" and self.anomaly_damping is not None:
            raise ValueError(
                f"TopoFlowConfig.anomaly_damping is set but forecast_target="
                f"{self.forecast_target!r}; it only applies to forecast_target='anomaly'."
            )
        if self.forecast_target == "field":
            if self.increment_scale is not None:
                raise ValueError(
                    "TopoFlowConfig.increment_scale is set but forecast_target='field'; it only "
                    "applies to forecast_target='increment' or 'anomaly'."
                )
            return
        not_inputs = [name for name in self.target_variables if name not in self.variables]
        if not_inputs:
            raise ValueError(
                f"TopoFlowConfig.forecast_target={self.forecast_target!r} adds the head's output "
                f"to the input state, but target variables {not_inputs} are not among variables."
            )
        if self.forecast_target == "anomaly":
            missing = [name for name in TIME_FEATURES if name not in self.time_features]
            if missing:
                raise ValueError(
                    f"TopoFlowConfig.forecast_target='anomaly' evaluates the climatology at the "
                    f"init and valid times, but time_features lacks {missing}."
                )
            if self.anomaly_damping is None:
                raise ValueError(
                    "TopoFlowConfig.forecast_target='anomaly' needs anomaly_damping (per target "
                    "and lead, fitted on the training split: topoflow/data/anomaly_base.py)."
                )
            self._check_table("anomaly_damping", lambda v: math.isfinite(v), "finite")
        if self.increment_scale is not None:
            self._check_table("increment_scale", lambda v: math.isfinite(v) and v > 0,
                              "finite and > 0")  # fmt: skip

    def _check_table(self, field: str, accept: Any, meaning: str) -> None:
        """A {target: {lead: value}} field covers every target and lead, each value accepted."""
        table = getattr(self, field)
        leads = [str(int(lead)) for lead in self.lead_times_hours]
        for name in self.target_variables:
            per_lead = table.get(name)
            if per_lead is None:
                raise ValueError(f"TopoFlowConfig.{field} has no entry for {name!r}.")
            missing = [lead for lead in leads if lead not in per_lead]
            if missing:
                raise ValueError(
                    f"TopoFlowConfig.{field}[{name!r}] has no value for lead(s) {missing} h of "
                    f"lead_times_hours."
                )
            bad = {lead: v for lead, v in per_lead.items() if not accept(v)}
            if bad:
                raise ValueError(f"TopoFlowConfig.{field}[{name!r}] must be {meaning}, got {bad}.")

    def _check_time_features(self) -> None:
        unknown = [name for name in self.time_features if name not in TIME_FEATURES]
        if unknown:
            raise ValueError(
                f"TopoFlowConfig.time_features {unknown} unknown; expected names from "
                f"{list(TIME_FEATURES)}."
            )
        if len(set(self.time_features)) != len(self.time_features):
            raise ValueError(f"TopoFlowConfig.time_features has duplicates: {self.time_features}.")


_INT_FIELDS = ("patch_size", "embed_dim", "depth", "num_heads", "decoder_depth")
_REAL_FIELDS = ("mlp_ratio", "drop_path", "drop_rate", "attention_dropout", "initializer_range")


def _per_target_lead_table(
    table: Mapping[str, Mapping[str, float]] | None,
) -> dict[str, dict[str, float]] | None:
    """{target: {lead: value}} with string leads (as JSON stores them) and float values."""
    if table is None:
        return None
    return {str(name): {str(lead): float(value) for lead, value in per_lead.items()}
            for name, per_lead in table.items()}  # fmt: skip


def _check_int(field: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(
            f"TopoFlowConfig.{field} must be an int, got {value!r} ({type(value).__name__})."
        )


def _as_float(field: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(
            f"TopoFlowConfig.{field} must be a number, got {value!r} ({type(value).__name__})."
        )
    return float(value)


def _refuse_misspelled_fields(kwargs: Mapping[str, Any]) -> None:
    """Unknown keys go to PretrainedConfig, which keeps them silently; one that is nearly the
    name of a TopoFlow field (`elevation_bias_block`) is a typo whose value would be ignored."""
    fields = [name for name in inspect.signature(TopoFlowConfig.__init__).parameters
              if name not in ("self", "kwargs")]  # fmt: skip
    for key in kwargs:
        close = difflib.get_close_matches(key, fields, n=1, cutoff=0.85)
        if close and key not in fields:
            raise ValueError(
                f"TopoFlowConfig got the unknown field {key!r}; did you mean {close[0]!r}? "
                f"(its value would be ignored)"
            )


# `save_pretrained` then records `AutoConfig` in config.json's auto_map and copies this file.
TopoFlowConfig.register_for_auto_class()
