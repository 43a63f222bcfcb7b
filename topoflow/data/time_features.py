"""Calendar inputs of a forecast sample, derived from its time stamp (`config.time_features`).

A sample initialized at `init_hour` (hours since 1970-01-01T00 UTC, the corpus's `time_hour`) for
a lead of `lead_hours` has four calendar phases in [0, 1): the time of day and the time of year of
its initialization and of its valid time (init + lead). The model sees each as (sin, cos) of
2 pi x phase, so 23:00 and 00:00, or 31 December and 1 January, are neighbours. Every corpus
(embedded generator, CAQRA converter) stores `time_hour`, so every source gets the same features.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from configuration_topoflow import TIME_FEATURES

__all__ = ["TIME_FEATURES", "calendar_phase", "check_time_features", "encode_time_features"]

_HOURS_PER_DAY = 24


def check_time_features(names: Sequence[str]) -> list[str]:
    """The names as a list; ValueError naming the unknown ones."""
    unknown = [name for name in names if name not in TIME_FEATURES]
    if unknown:
        raise ValueError(f"time_features {unknown} unknown; expected names from {TIME_FEATURES}")
    return list(names)


def calendar_phase(hour: int, kind: str) -> float:
    """Phase in [0, 1) of `hour` (hours since 1970-01-01T00 UTC) in the day or the year.

    The year phase counts from 1 January 00 UTC of the calendar year and divides by that year's
    length (365 or 366 days), so the same date maps to the same phase every year.
    """
    if kind == "day":
        return (hour % _HOURS_PER_DAY) / _HOURS_PER_DAY
    stamp = np.datetime64(int(hour), "h")
    year = stamp.astype("datetime64[Y]")
    start, end = year.astype("datetime64[h]"), (year + 1).astype("datetime64[h]")
    return float((stamp - start) / (end - start))


def encode_time_features(names: Sequence[str], init_hour: int, lead_hours: int) -> np.ndarray:
    """(2 * len(names),) float32: (sin, cos) of each named phase, in the order of `names`."""
    values = []
    for name in names:
        moment, _, span = name.partition("_time_of_")
        hour = init_hour if moment == "init" else init_hour + lead_hours
        angle = 2.0 * np.pi * calendar_phase(hour, span)
        values += [np.sin(angle), np.cos(angle)]
    return np.asarray(values, dtype=np.float32)
