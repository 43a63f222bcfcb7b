"""The moving-block bootstrap against answers derived by hand, not by running it twice.

Losses are chosen so that which init times a replicate can contain decides the interval exactly:
an off-by-one in the block starts (the last start never drawn) changes the answer, not only its
noise.
"""

from __future__ import annotations

import numpy as np
import pytest

from topoflow.stats import block_bootstrap, paired_samples


def _one_sample_per_init_time(reduction: np.ndarray) -> object:
    """Paired losses with one sample per init time (hourly) and control - arm == reduction."""
    ids = (420_000 + np.arange(reduction.size)) * 1000 + 24
    control = np.full(reduction.size, 2.0)
    return paired_samples(ids, control, ids, control - reduction)


def test_last_init_time_is_reachable_by_a_block_start():
    # T = 5, b = 2: blocks start at 0..3; only the start 3 covers the last init time (the cut last
    # block of length 1 covers its start only). A replicate holds 2 full blocks, so it contains the
    # last init time with probability 1 - (3/4)^2 = 7/16, and then its mean reduction is >= 1/5.
    reduction = np.array([0.0, 0.0, 0.0, 0.0, 1.0])
    result = block_bootstrap(_one_sample_per_init_time(reduction), block_length=2, n_boot=4000)
    assert result.mean_reduction == pytest.approx(0.2)
    assert result.ci[0] == 0.0
    # 7/16 of the replicates are >= 0.2, so the 97.5% quantile is too; with start 3 missing every
    # replicate is 0 and the interval collapses to (0, 0).
    assert result.ci[1] >= 0.2


def test_one_block_spanning_the_series_reproduces_it_exactly():
    # b = T: the only start is 0, every replicate is the series itself, the interval is a point.
    reduction = np.array([0.3, -0.1, 0.5, 0.2])
    result = block_bootstrap(_one_sample_per_init_time(reduction), block_length=4, n_boot=50)
    assert result.ci == pytest.approx((0.225, 0.225))
    assert result.relative_gain == pytest.approx(0.9 / 8.0)
    assert result.relative_gain_ci == pytest.approx((0.9 / 8.0, 0.9 / 8.0))


def test_iid_bootstrap_interval_matches_the_normal_approximation():
    # b = 1 is the i.i.d. bootstrap: the replicate mean of T values drawn with replacement from
    # 0..T-1 has mean (T-1)/2 and standard deviation sqrt((T^2 - 1) / 12 / T). With the last value
    # never drawn the centre would move down by 1/2.
    n_times = 40
    reduction = np.arange(n_times, dtype=np.float64)
    result = block_bootstrap(_one_sample_per_init_time(reduction), block_length=1, n_boot=20000)
    sd = np.sqrt((n_times**2 - 1) / 12.0 / n_times)
    low, high = result.ci
    assert (low + high) / 2 == pytest.approx((n_times - 1) / 2, abs=0.1)
    assert high - low == pytest.approx(2 * 1.96 * sd, rel=0.05)


def test_init_times_with_more_samples_weigh_more():
    # Two leads at the first init time, one at the second: the pooled mean reduction is
    # (1 + 1 + 4) / 3 = 2, not the mean of per-init-time means (1 + 4) / 2 = 2.5.
    ids = np.array([420_000_012, 420_000_024, 420_001_012])
    control = np.array([5.0, 5.0, 5.0])
    paired = paired_samples(ids, control, ids, control - np.array([1.0, 1.0, 4.0]))
    result = block_bootstrap(paired, block_length=2, n_boot=20)
    assert result.mean_reduction == pytest.approx(2.0)
    assert result.ci == pytest.approx((2.0, 2.0))
    assert result.n_samples == 3 and result.n_init_times == 2
