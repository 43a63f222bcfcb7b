"""Sample-level statistics on synthetic paired losses with known answers."""

import math

import numpy as np
import pytest

from topoflow.stats import (
    block_bootstrap,
    block_means,
    gains_by_variable_and_lead,
    mean_over_seeds,
    optimal_block_length,
    paired_samples,
    sample_level_view,
    wilcoxon_signed_rank,
)

LEADS = np.array([12, 24, 48, 96])


def _ar1(n: int, rho: float, rng: np.random.Generator) -> np.ndarray:
    x = np.empty(n)
    x[0] = rng.normal() / np.sqrt(1 - rho**2)
    for t in range(1, n):
        x[t] = rho * x[t - 1] + rng.normal()
    return x


def _control(n_init: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Losses with hourly init times (correlated in time) and four leads per init time."""
    init = 420_000 + np.arange(n_init)
    ids = (init[:, None] * 1000 + LEADS[None, :]).ravel()
    weather = _ar1(n_init, 0.9, rng)
    loss = 0.4 + 0.05 * weather[:, None] + 0.02 * rng.normal(size=(n_init, LEADS.size))
    return ids, loss.ravel()


def test_identical_arms_show_no_effect():
    ids, control = _control(300, np.random.default_rng(0))
    result = sample_level_view(paired_samples(ids, control, ids[::-1], control[::-1]))
    assert result.bootstrap.mean_reduction == 0.0
    assert result.bootstrap.ci[0] <= 0.0 <= result.bootstrap.ci[1]
    assert result.wilcoxon_samples.pvalue == 1.0 and result.wilcoxon_block_means.pvalue == 1.0
    assert not result.interval_excludes_zero
    assert result.direction == "no difference on these samples"
    assert result.text.startswith("Sample-level view (secondary") and "contains 0" in result.text


def test_noise_only_arm_is_not_significant():
    rng = np.random.default_rng(1)
    ids, control = _control(400, rng)
    arm = control + 0.01 * rng.normal(size=control.size)
    result = sample_level_view(paired_samples(ids, control, ids, arm))
    lo, hi = result.bootstrap.ci
    assert lo < 0 < hi
    assert result.wilcoxon_block_means.pvalue > 0.05
    assert "contains 0" in result.text


def test_planted_effect_is_detected_with_interval_covering_it():
    rng = np.random.default_rng(2)
    ids, control = _control(400, rng)
    delta = 0.004
    arm = control - delta + 0.01 * rng.normal(size=control.size)
    result = sample_level_view(paired_samples(ids, control, ids, arm), arm_name="TopoFlow")
    lo, hi = result.bootstrap.ci
    assert 0 < lo < delta < hi
    assert result.interval_excludes_zero
    assert result.direction == "TopoFlow lower loss on these samples"
    g_lo, g_hi = result.bootstrap.relative_gain_ci
    assert g_lo < delta / control.mean() < g_hi
    assert result.wilcoxon_block_means.pvalue < 0.01
    assert "excludes 0" in result.text


def test_worse_arm_is_reported_as_worse():
    rng = np.random.default_rng(3)
    ids, control = _control(200, rng)
    result = sample_level_view(paired_samples(ids, control, ids, control + 0.01), arm_name="arm")
    assert result.direction == "arm higher loss on these samples"
    assert result.bootstrap.ci[1] < 0


def test_block_bootstrap_is_wider_than_iid_on_ar1_differences():
    rng = np.random.default_rng(4)
    n_init = 1000
    ids = 420_000_000 + 1000 * np.arange(n_init) + 24
    reduction = 0.01 * _ar1(n_init, 0.9, rng)
    paired = paired_samples(ids, 1.0 + reduction, ids, np.ones(n_init))
    block = block_bootstrap(paired)
    iid = block_bootstrap(paired, block_length=1)
    assert block.block_length >= 8
    assert block.block_rule.startswith("Politis-White")
    width_ratio = (block.ci[1] - block.ci[0]) / (iid.ci[1] - iid.ci[0])
    # The long-run variance of an AR(1) with rho = 0.9 is (1 + rho) / (1 - rho) = 19 times the
    # i.i.d. one, so the honest interval is about 4.4 times wider.
    assert width_ratio > 2.5


def test_optimal_block_length_small_for_iid_and_long_for_ar1():
    rng = np.random.default_rng(5)
    assert optimal_block_length(rng.normal(size=2000)) <= 3
    assert optimal_block_length(_ar1(2000, 0.95, rng)) >= 15


def test_block_means_average_consecutive_init_times():
    ids = 1000 * np.arange(10) + 12
    paired = paired_samples(ids, np.arange(10.0), ids, np.zeros(10))
    np.testing.assert_allclose(block_means(paired, 4), [1.5, 5.5, 8.5])  # 2 left: half a block
    np.testing.assert_allclose(block_means(paired, 3), [1.0, 4.0, 7.0])  # 1 left: dropped


def test_wilcoxon_wrapper_drops_zeros_and_gives_p_one_without_differences():
    assert wilcoxon_signed_rank(np.zeros(10)).pvalue == 1.0
    assert wilcoxon_signed_rank(np.array([-2.0, -1.0, 1.0, 2.0])).pvalue == pytest.approx(1.0)
    # Zeros are dropped (scipy's "wilcox" rule): 12 positive differences remain, R+ = 78, and with
    # zeros present the p-value is the continuity-corrected normal approximation for n = 12.
    result = wilcoxon_signed_rank(np.concatenate([np.zeros(5), np.arange(1.0, 13.0)]))
    n = 12
    z = (n * (n + 1) / 4 - 0.5) / math.sqrt(n * (n + 1) * (2 * n + 1) / 24)
    assert result.n == n and result.pvalue == pytest.approx(math.erfc(z / math.sqrt(2)))
    with pytest.raises(ValueError, match="NaN"):
        wilcoxon_signed_rank(np.array([1.0, np.nan]))


def test_moving_block_bootstrap_variance_matches_the_closed_form():
    # Independent computation: with T = k b init times and equal counts, the moving-block
    # bootstrap mean is the average of k blocks drawn uniformly from the T - b + 1 overlapping
    # ones, so its variance is the population variance of the overlapping block means over k.
    rng = np.random.default_rng(11)
    n_init, b = 240, 12
    ids = 420_000_000 + 1000 * np.arange(n_init) + 24
    reduction = 0.01 * _ar1(n_init, 0.8, rng)
    paired = paired_samples(ids, 1.0 + reduction, ids, np.ones(n_init))
    overlapping = np.convolve(reduction, np.ones(b) / b, mode="valid")
    expected_sd = np.sqrt(overlapping.var() / (n_init // b))
    boot = block_bootstrap(paired, block_length=b, n_boot=20_000, confidence=0.6827)
    half_width = (boot.ci[1] - boot.ci[0]) / 2  # +-1 sd of a near-normal bootstrap distribution
    assert half_width == pytest.approx(expected_sd, rel=0.05)


def test_paired_samples_align_and_refuse_mismatches():
    ids = np.array([3012, 1012, 2012])
    paired = paired_samples(ids, [3.0, 1.0, 2.0], ids[[1, 2, 0]], [0.5, 1.0, 1.5])
    assert paired.sample_ids.tolist() == [1012, 2012, 3012]
    np.testing.assert_allclose(paired.reduction, [0.5, 1.0, 1.5])
    with pytest.raises(ValueError, match="only in control \\[3012\\]"):
        paired_samples(ids, [1.0, 1.0, 1.0], np.array([1012, 2012, 4012]), [1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match="duplicated sample ids \\[1012\\]"):
        paired_samples(np.array([1012, 1012]), [1.0, 1.0], np.array([1012, 2012]), [1.0, 1.0])
    both_nan = paired_samples(ids, [np.nan, 1.0, 1.0], ids, [np.nan, 2.0, 2.0])
    assert both_nan.sample_ids.tolist() == [1012, 2012]
    with pytest.raises(ValueError, match="NaN on one side"):
        paired_samples(ids, [np.nan, 1.0, 1.0], ids, [1.0, 2.0, 2.0])


def test_mean_over_seeds_aligns_by_id_and_refuses_other_samples():
    ids = np.array([2012, 1012, 3012])
    mean_ids, mean = mean_over_seeds([(ids, [2.0, 1.0, 3.0]), (ids[::-1], [5.0, 4.0, 6.0])])
    assert mean_ids.tolist() == [1012, 2012, 3012]
    np.testing.assert_allclose(mean, [2.5, 4.0, 4.0])  # 1012: (1+4)/2, 2012: (2+6)/2, 3012: (3+5)/2
    with pytest.raises(ValueError, match="run 1 covers other sample ids"):
        mean_over_seeds([(ids, [1.0] * 3), (ids + 1000, [1.0] * 3)])


def test_gains_by_variable_and_lead_find_the_planted_variable():
    rng = np.random.default_rng(7)
    ids, _ = _control(300, rng)
    control = 0.5 + 0.05 * rng.random(size=(ids.size, 2))
    arm = control.copy()
    arm[:, 0] *= 0.9  # 10% lower MSE on the first variable only
    arm[:, 1] += 0.01 * rng.normal(size=ids.size)
    entries = gains_by_variable_and_lead(ids, control, ids, arm, ["pm25", "o3"], n_boot=500)
    assert {(e["variable"], e["lead_hours"]) for e in entries} == {
        (v, int(h)) for v in ("pm25", "o3") for h in LEADS
    }
    for entry in entries:
        assert entry["n_samples"] == 300
        if entry["variable"] == "pm25":
            assert entry["gain"] == pytest.approx(0.1)
            assert 0.09 < entry["ci_low"] <= entry["ci_high"] < 0.11
        else:
            assert entry["ci_low"] < 0 < entry["ci_high"]
