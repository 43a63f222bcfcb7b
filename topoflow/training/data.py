"""Data loaders for training: batches per docs/CONTRACTS.md and an exact, resumable position.

The position saved in a checkpoint is the `datasets.IterableDataset.state_dict()` of the rank's
shard, taken right after the last batch the optimizer consumed. Accelerate's `DataLoaderShard`
fetches one batch ahead, so the dataset's live state is one batch past the training loop; the
collator therefore snapshots the state as each batch is assembled and the loop asks for the
snapshot of the batch it actually consumed. This needs `num_workers=0` (the dataset is iterated in
the training process), which is what the trainer uses.
"""

from __future__ import annotations

from collections import deque
from typing import Any

import torch
from torch.utils.data import DataLoader

from topoflow.data import collate_forecast_batch

__all__ = ["StatefulCollator", "min_samples_per_rank", "make_loader"]


class StatefulCollator:
    """Collate rows into a contract batch and remember the dataset position after each batch."""

    def __init__(self, history: int = 8) -> None:
        self.dataset: Any = None
        self._count = 0
        self._snapshots: deque[tuple[int, dict[str, Any]]] = deque(maxlen=history)

    def bind(self, dataset: Any) -> None:
        """Point at the (sharded) dataset the prepared loader really iterates."""
        self.dataset = dataset

    def reset(self) -> None:
        """Call before creating a new iterator: batch numbering restarts at 0."""
        self._count = 0
        self._snapshots.clear()

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        batch = collate_forecast_batch(rows)
        if self.dataset is not None:
            self._count += 1
            self._snapshots.append((self._count, self.dataset.state_dict()))
        return batch

    def state_after(self, batches: int) -> dict[str, Any]:
        """Dataset position right after the `batches`-th batch since the last `reset()`."""
        for count, state in self._snapshots:
            if count == batches:
                return state
        raise RuntimeError(f"no dataset snapshot after batch {batches}; kept "
                           f"{[count for count, _ in self._snapshots]}")


def make_loader(dataset: Any, batch_size: int, collator: StatefulCollator | None = None
                ) -> DataLoader:
    """A single-process DataLoader over an iterable dataset (to be passed to `prepare`).

    It gets its own generator because creating a DataLoader iterator draws a seed from the
    global torch RNG otherwise: a resumed run creates its iterator at another point of the RNG
    stream than the uninterrupted run, and every dropout mask after it would differ.
    """
    return DataLoader(dataset, batch_size=batch_size, num_workers=0,
                      collate_fn=collator or StatefulCollator(), drop_last=False,
                      generator=torch.Generator().manual_seed(0))


def min_samples_per_rank(meta: Any, split: str, lead_times_hours: list[int],
                         world_size: int) -> int:
    """A lower bound on the samples any rank reads per epoch, from the shard table.

    A sample needs its target row inside its shard (own + halo rows). Which shards a rank gets
    depends on the shuffled shard order, so this sums the smallest `n_shards / world_size`.
    """
    step = meta.time_step_hours
    per_shard = sorted(
        sum(max(0, min(s.own_rows, s.rows - lead // step)) for lead in lead_times_hours)
        for s in meta.split_shards(split))
    return sum(per_shard[:len(per_shard) // world_size])
