"""Arm specifications: what differs between the models an experiment compares.

An arm is a fine-tuning recipe applied to the same baseline checkpoint with the same data order and
step budget; only the elevation-bias settings (and optionally what trains) differ. The control is
the baseline fine-tuned with no bias at all: the honest comparison, since fine-tuning for more
steps lowers the loss by itself.

Arms are named on the command line either by a known name (`control`, `topoflow`, `alpha2`,
`hscale500`, ...) or by a spec string `name:blocks=0,1;scale=500;alpha=2.0;trainable=all`.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

from configuration_topoflow import ELEVATION_BIAS_DIRECTIONS as DIRECTIONS
from configuration_topoflow import ELEVATION_BIAS_RISES as RISES

__all__ = [
    "CONTROL",
    "KNOWN_ARMS",
    "ArmSpec",
    "UnknownArmError",
    "parse_arm",
    "parse_arms",
]

CONTROL = "control"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class UnknownArmError(ValueError):
    """An arm name that is neither known nor a spec string."""


@dataclass(frozen=True)
class ArmSpec:
    """One arm: elevation-bias blocks (empty = no bias), H_scale (m), alpha init, trainable set,
    and the transport direction the bias penalizes (config.elevation_bias_direction)."""

    name: str
    elevation_blocks: tuple[int, ...] = ()
    elevation_scale: float = 1000.0
    alpha_init: float = 0.0
    trainable: str = "all"
    direction: str = "downslope"
    placebo: bool = False
    mask_elevation_input: bool = False
    rise: str = "endpoint"
    alpha_per_head: bool = False
    description: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        if not _NAME.match(self.name):
            raise ValueError(
                f"arm name {self.name!r}: use letters, digits, '_', '-', '.' (it names a folder)"
            )
        if any(b < 0 for b in self.elevation_blocks):
            raise ValueError(f"arm {self.name!r}: block indices must be >= 0, got "
                             f"{list(self.elevation_blocks)}")
        if self.elevation_scale <= 0:
            raise ValueError(f"arm {self.name!r}: H_scale must be > 0 m, got "
                             f"{self.elevation_scale}")
        if self.direction not in DIRECTIONS:
            raise ValueError(f"arm {self.name!r}: direction must be one of {list(DIRECTIONS)}, "
                             f"got {self.direction!r}")
        if self.rise not in RISES:
            raise ValueError(f"arm {self.name!r}: rise must be one of {list(RISES)}, got "
                             f"{self.rise!r}")
        if self.placebo and not self.elevation_blocks:
            raise ValueError(f"arm {self.name!r}: a placebo needs bias blocks (blocks=...)")

    def train_args(self) -> list[str]:
        """The train_accelerate.py arguments that make this arm."""
        blocks = ",".join(str(b) for b in self.elevation_blocks) or "none"
        return ["--elevation-blocks", blocks, "--elevation-scale", repr(self.elevation_scale),
                "--alpha-init", repr(self.alpha_init), "--trainable", self.trainable,
                "--elevation-direction", self.direction,
                *(["--elevation-placebo"] if self.placebo else []),
                *(["--elevation-rise", self.rise] if self.rise != "endpoint" else []),
                *(["--alpha-per-head"] if self.alpha_per_head else []),
                *(["--mask-elevation-input"] if self.mask_elevation_input else [])]

    def recipe(self) -> dict:
        """JSON-ready settings, without the free-text description."""
        out = asdict(self)
        out.pop("description")
        out["elevation_blocks"] = list(self.elevation_blocks)
        return out

    def same_recipe(self, other: ArmSpec) -> bool:
        return {**self.recipe(), "name": ""} == {**other.recipe(), "name": ""}


KNOWN_ARMS: dict[str, ArmSpec] = {
    arm.name: arm
    for arm in (
        ArmSpec(CONTROL, description="baseline fine-tuned with the same budget, no elevation bias"),
        ArmSpec("topoflow", (0,), description="elevation bias on block 0, alpha init 0"),
        ArmSpec("upslope", (0,), direction="upslope",
                description="elevation bias on block 0 penalizing attention to lower sources "
                            "(upslope transport), alpha init 0"),
        ArmSpec("alpha2", (0,), alpha_init=2.0,
                description="elevation bias on block 0, alpha init 2.0 (the paper's)"),
        ArmSpec("hscale500", (0,), elevation_scale=500.0,
                description="elevation bias on block 0, H_scale 500 m"),
        ArmSpec("hscale2000", (0,), elevation_scale=2000.0,
                description="elevation bias on block 0, H_scale 2000 m"),
        ArmSpec("blocks01", (0, 1), description="elevation bias on blocks 0 and 1"),
        ArmSpec("allblocks4", (0, 1, 2, 3),
                description="elevation bias on blocks 0-3 (every block of the base preset)"),
        # The terrain-worlds controls (docs/experiment.md): "upslope" is the direction the
        # embedded generator blocks, "topoflow" the other one.
        ArmSpec("placebo", (0,), direction="upslope", placebo=True,
                description="upslope bias on block 0 from a per-sample shuffle of the patch "
                            "heights: same values, no geography"),
        # Issue 14 item 4: the best an attention bias of this form can know (docs/experiment.md).
        ArmSpec("oracle", (0,), direction="upslope", rise="path",
                description="upslope bias on block 0 from the total ascent along the path "
                            "between the patch centres (the generator's own blocking)"),
        ArmSpec("oracle-placebo", (0,), direction="upslope", rise="path", placebo=True,
                description="the oracle's bias with each sample's patches shuffled on both "
                            "axes: same ascent values, no geography"),
        ArmSpec("upslope-heads", (0,), direction="upslope", alpha_per_head=True,
                description="upslope bias on block 0 with one learnable alpha per head"),
        ArmSpec("upslope-all", (0, 1, 2, 3), direction="upslope",
                description="upslope bias on blocks 0-3"),
        ArmSpec("upslope-bias-only", (0,), direction="upslope", mask_elevation_input=True,
                description="upslope bias on block 0, elevation input channel masked: the "
                            "terrain reaches the model only through the bias"),
        ArmSpec("control-no-elevation", mask_elevation_input=True,
                description="no bias and the elevation input channel masked: does the model "
                            "use the terrain at all?"),
    )
}

_SPEC_KEYS = {"blocks", "scale", "alpha", "trainable", "direction", "placebo", "mask_input",
              "rise", "per_head"}
_BOOLEANS = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}


def _parse_spec(name: str, body: str) -> ArmSpec:
    settings: dict[str, str] = {}
    for part in filter(None, (p.strip() for p in body.split(";"))):
        key, sep, value = part.partition("=")
        key = key.strip()
        if not sep or key not in _SPEC_KEYS:
            raise UnknownArmError(
                f"arm spec {name}:{body!r}: expected key=value pairs with keys "
                f"{sorted(_SPEC_KEYS)} separated by ';', got {part!r}")
        settings[key] = value.strip()
    blocks_text = settings.get("blocks", "none").lower()
    try:
        blocks = () if blocks_text in ("", "none") else tuple(
            sorted({int(b) for b in blocks_text.split(",") if b.strip()}))
        scale = float(settings.get("scale", 1000.0))
        alpha = float(settings.get("alpha", 0.0))
    except ValueError as err:
        raise UnknownArmError(f"arm spec {name}:{body!r}: {err}") from err
    flags = {}
    for key in ("placebo", "mask_input", "per_head"):
        value = settings.get(key, "false").lower()
        if value not in _BOOLEANS:
            raise UnknownArmError(f"arm spec {name}:{body!r}: {key} must be true or false, got "
                                  f"{value!r}")
        flags[key] = _BOOLEANS[value]
    return ArmSpec(name, blocks, scale, alpha, settings.get("trainable", "all"),
                   settings.get("direction", "downslope"), placebo=flags["placebo"],
                   mask_elevation_input=flags["mask_input"],
                   rise=settings.get("rise", "endpoint"), alpha_per_head=flags["per_head"],
                   description=f"custom: {body}")


def parse_arm(text: str) -> ArmSpec:
    """A known arm name, or `name:key=value;...` (keys blocks, scale, alpha, trainable,
    direction, placebo, mask_input, rise, per_head)."""
    text = text.strip()
    name, sep, body = text.partition(":")
    if sep:
        return _parse_spec(name.strip(), body)
    if text not in KNOWN_ARMS:
        raise UnknownArmError(
            f"unknown arm {text!r}; known arms: {', '.join(KNOWN_ARMS)}, or give a spec such as "
            f"'{text}:blocks=0;scale=1000;alpha=0'")
    return KNOWN_ARMS[text]


def parse_arms(texts: Sequence[str]) -> list[ArmSpec]:
    """Parse arm names/specs; the control must be among them and names must be unique."""
    arms = [parse_arm(t) for t in texts]
    names = [a.name for a in arms]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"arm names must be unique, got {duplicates} more than once")
    if CONTROL not in names:
        raise ValueError(f"the arms {names} lack the '{CONTROL}' arm every other arm is compared "
                         "against")
    return arms
