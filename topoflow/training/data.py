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
from torch.utils.data import DataLoader, default_collate

__all__ = ["BATCH_DTYPES", "StatefulCollator", "make_loader"]

# Contract dtypes (docs/CONTRACTS.md section 1); default_collate would turn python floats into
# float64 and python bools into int64.
BATCH_DTYPES = {
    "fields": torch.float32,
    "lead_time_hours": torch.float32,
    "labels": torch.float32,
    "region_mask": torch.bool,
    "sample_ids": torch.int64,
    "elevation": torch.float32,
}


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
        batch = default_collate(rows)
        unknown = set(batch) - set(BATCH_DTYPES)
        if unknown:
            raise KeyError(f"data rows carry keys {sorted(unknown)} that are not forward() "
                           f"arguments of the batch contract {sorted(BATCH_DTYPES)}")
        batch = {key: torch.as_tensor(value).to(BATCH_DTYPES[key]) for key, value in batch.items()}
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
    """A single-process DataLoader over an iterable dataset (to be passed to `prepare`)."""
    return DataLoader(dataset, batch_size=batch_size, num_workers=0,
                      collate_fn=collator or StatefulCollator(), drop_last=False)
