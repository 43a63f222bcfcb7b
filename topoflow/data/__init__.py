"""Streaming forecast samples from a TopoFlow corpus."""

from .collate import collate_forecast_batch
from .streaming import check_world_size, make_forecast_dataset

__all__ = ["make_forecast_dataset", "check_world_size", "collate_forecast_batch"]
