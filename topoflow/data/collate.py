"""Stack streamed samples into a batch with the contract's dtypes (docs/CONTRACTS.md section 1)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

__all__ = ["BATCH_DTYPES", "OPTIONAL_BATCH_DTYPES", "collate_forecast_batch"]

BATCH_DTYPES: dict[str, torch.dtype] = {
    "fields": torch.float32,
    "lead_time_hours": torch.float32,
    "labels": torch.float32,
    "region_mask": torch.bool,
    "sample_ids": torch.int64,
}
# Keys a batch carries only when the data was asked for them (the model's config.time_features).
OPTIONAL_BATCH_DTYPES: dict[str, torch.dtype] = {"time_features": torch.float32}


def collate_forecast_batch(samples: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
    """Stack samples (numpy or torch values) into tensors, casting to the contract's dtypes.

    torch's default collate would already stack numpy samples, but it keeps whatever dtype a
    sample carries (float64 after a user's own numpy arithmetic, for example); the model's
    contract is exact, so this cast makes it hold.
    """
    if not samples:
        raise ValueError("collate_forecast_batch got an empty list of samples")
    batch = {}
    for key, dtype in BATCH_DTYPES.items():
        if key not in samples[0]:
            raise KeyError(f"sample lacks key {key!r}; it has {sorted(samples[0])}")
        values = [torch.as_tensor(np.asarray(s[key])) for s in samples]
        batch[key] = torch.stack(values).to(dtype)
    for key, dtype in OPTIONAL_BATCH_DTYPES.items():
        if key in samples[0]:
            values = [torch.as_tensor(np.asarray(s[key])) for s in samples]
            batch[key] = torch.stack(values).to(dtype)
    return batch
