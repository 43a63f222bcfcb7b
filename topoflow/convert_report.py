"""The key report of a checkpoint conversion: what happened to every source key and every model key.

Written beside the converted weights as `conversion_report.json` and printed by
`python -m topoflow.convert_climax`, for every source layout (ClimaX, released ClimaX with
`channel_*` names, the TopoFlow paper code).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["REPORT_FILENAME", "ConversionReport"]

REPORT_FILENAME = "conversion_report.json"


@dataclass
class ConversionReport:
    """What happened to every key (source keys with their checkpoint prefix removed).

    layout: the source layout recognized from the key names ("climax" or "topoflow-paper").
    renamed: source key -> the name it was read under (e.g. `channel_embed` -> `var_embed`, as
        ClimaX's own loader renames released checkpoints), with why in `notes`.
    mapped: source key -> TopoFlow key it was written to (several source keys may feed one).
    dropped: source key -> why it was deliberately not used (not a forecaster weight, or a variable
        not in the config).
    unmapped: source keys no rule knows, or whose module the config lacks: conversion refuses them.
    from_config: TopoFlow key -> why it is set from the config (the elevation-bias scalars of a
        block the source has no bias in; deterministic, never random).
    missing: TopoFlow keys the source does not provide: conversion refuses them unless allowed, and
        then leaves them out of the weights file so `from_pretrained` reports them missing.
    config_fields: config field -> value the source layout fixes (the forward depends on it).
    notes: sentences that say what a mapping means (units, rescaling, renaming).
    """

    layout: str = "climax"
    renamed: dict[str, str] = field(default_factory=dict)
    mapped: dict[str, str] = field(default_factory=dict)
    dropped: dict[str, str] = field(default_factory=dict)
    unmapped: list[str] = field(default_factory=list)
    from_config: dict[str, str] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)
    config_fields: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        lines = [
            f"layout {self.layout}: mapped {len(self.mapped)} (renamed {len(self.renamed)}), "
            f"dropped {len(self.dropped)}, unmapped {len(self.unmapped)}, "
            f"from config {len(self.from_config)}, missing {len(self.missing)}"
        ]
        lines += [f"  config   {name} = {value!r}" for name, value in self.config_fields.items()]
        lines += [f"  renamed  {key} -> {name}" for key, name in sorted(self.renamed.items())]
        lines += [f"  dropped  {key}: {why}" for key, why in sorted(self.dropped.items())]
        lines += [f"  unmapped {key}" for key in self.unmapped]
        lines += [f"  config   {key}: {why}" for key, why in sorted(self.from_config.items())]
        lines += [f"  missing  {key} (not in the weights file)" for key in self.missing]
        lines += [f"  note     {note}" for note in self.notes]
        return "\n".join(lines)
