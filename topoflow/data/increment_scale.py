"""Per-variable, per-lead scale of the forecast increment, from the training split.

A model with `forecast_target="increment"` outputs the change of each target over its input
state; that change is small at 12 h and large at 96 h, and differs between pollutants. Dividing
it by its root-mean-square over the training split (`config.increment_scale`) gives the head
targets of unit scale at every lead, as normalization does for the fields themselves.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader

from topoflow.data.collate import collate_forecast_batch
from topoflow.data.streaming import make_forecast_dataset

__all__ = ["TRAIN_SPLIT_SCALE", "increment_scale"]

# What a preset or config.json writes in `increment_scale` to have it computed at build time.
TRAIN_SPLIT_SCALE = "train-split"


def increment_scale(
    corpus: str | os.PathLike,
    *,
    variables: Sequence[str],
    target_variables: Sequence[str],
    lead_times_hours: Sequence[int],
    normalization: Mapping[str, Any],
    split: str = "train",
    batch_size: int = 64,
) -> dict[str, dict[str, float]]:
    """{target: {str(lead): RMS of (normalized target at t + lead - its input at t)}}.

    Over the valid cells (region mask and finite target) of every sample of `split`; raises
    ValueError naming the target and lead that have no valid cell.
    """
    missing = [name for name in target_variables if name not in variables]
    if missing:
        raise ValueError(f"increment_scale: target variables {missing} are not inputs, so they "
                         f"have no input state to take an increment over")
    channels = [list(variables).index(name) for name in target_variables]
    leads = [int(lead) for lead in lead_times_hours]
    squares = torch.zeros(len(leads), len(channels), dtype=torch.float64)
    counts = torch.zeros_like(squares)
    dataset = make_forecast_dataset(
        corpus, split, variables=variables, target_variables=target_variables,
        lead_times_hours=leads, normalization=normalization, shuffle=False)  # fmt: skip
    for batch in DataLoader(dataset, batch_size=batch_size, collate_fn=collate_forecast_batch):
        increment = batch["labels"] - batch["fields"][:, channels]  # (B, V_out, H, W)
        valid = torch.isfinite(increment) & batch["region_mask"][:, None]
        squared = torch.where(valid, increment, 0.0).double().pow(2).flatten(2).sum(2)
        row = torch.tensor([leads.index(int(lead)) for lead in batch["lead_time_hours"]])
        squares.index_add_(0, row, squared)
        counts.index_add_(0, row, valid.flatten(2).sum(2).double())
    empty = [(name, lead) for i, lead in enumerate(leads) for j, name in enumerate(target_variables)
             if counts[i, j] == 0]  # fmt: skip
    if empty:
        raise ValueError(f"{corpus}: split {split!r} has no valid cell for (target, lead) {empty}; "
                         f"cannot compute increment_scale")
    rms = (squares / counts).sqrt()
    return {name: {str(lead): float(rms[i, j]) for i, lead in enumerate(leads)}
            for j, name in enumerate(target_variables)}  # fmt: skip
