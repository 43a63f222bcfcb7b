"""Streamed validation: every sample counted exactly once across ranks.

Each rank reads distinct shards of the validation stream (accelerate shards the
`datasets.IterableDataset`; `check_world_size` made sure every rank has shards), sums the squared
error and the number of valid cells locally, and one `accelerator.reduce(..., "sum")` at the end
combines them. Accelerate's `gather_for_metrics` is not used: for an iterable dataset of unknown
length it cannot trim the padding `IterableDatasetShard` adds, so the last batch can count twice.
A single reduce after the loop also lets ranks run different numbers of batches without deadlock.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from accelerate import Accelerator

__all__ = ["EvalResult", "evaluate"]


@dataclass
class EvalResult:
    """Validation loss (MSE in normalized space over valid cells) and what it was computed on."""

    loss: float
    n_samples: int
    n_cells: int
    n_empty_samples: int
    full: bool

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def evaluate(
    model: torch.nn.Module,
    dataloader: Any,
    accelerator: Accelerator,
    max_batches: int = 0,
    stride: int = 1,
) -> EvalResult:
    """Validate `model` on every `stride`-th batch, at most `max_batches` per rank (0: all).

    With a stride the subset is spread over the whole split (the first batches alone would all
    come from the first weeks of the validation period) and is the same at every call. The loss
    pools all valid cells of all samples, as the training loss does within a batch, so it does
    not depend on the batch size or on how samples are spread over ranks.
    """
    # The unwrapped module runs no collective in forward (DDP would sync buffers), so ranks may
    # stop after different numbers of batches.
    module = accelerator.unwrap_model(model)
    was_training = module.training
    module.eval()
    # (sum of squared errors, valid cells, samples, samples without any valid cell)
    sums = torch.zeros(4, dtype=torch.float64, device=accelerator.device)
    # Epoch 0 always: datasets reshuffles shard order for epoch > 0, which would change the subset.
    if hasattr(dataloader, "set_epoch"):
        dataloader.set_epoch(0)
    iterator = iter(dataloader)
    try:
        with torch.no_grad():
            used = 0
            for index, batch in enumerate(iterator):
                if max_batches and used >= max_batches:
                    break
                if index % stride:
                    continue
                used += 1
                out = module(**batch)
                valid = out.num_valid > 0
                sse = out.per_sample_loss[valid].double() * out.num_valid[valid].double()
                sums[0] += sse.sum()
                sums[1] += out.num_valid.sum().double()
                sums[2] += out.num_valid.numel()
                sums[3] += (~valid).sum().double()
    finally:
        if hasattr(iterator, "close"):
            iterator.close()
        # A generator closed early never reaches DataLoaderShard.end(); unregister it ourselves.
        if hasattr(dataloader, "end"):
            dataloader.end()
        module.train(was_training)
    totals = accelerator.reduce(sums, reduction="sum")
    sse, cells, samples, empty = (float(value) for value in totals.cpu())
    if cells == 0:
        raise ValueError("validation split has no valid cell (every label NaN or masked)")
    return EvalResult(loss=sse / cells, n_samples=int(samples), n_cells=int(cells),
                      n_empty_samples=int(empty), full=max_batches == 0)
