"""Seed-level verdicts: tests with answers computed independently, the decision rule, and the
calibration by simulation (the fast version of benchmarks/seed_stats_calibration.py)."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from topoflow.seed_stats import (
    DEFAULT_MARGIN,
    minimum_detectable_effect,
    seed_verdict_from_losses,
    seed_verdict_from_means,
    seeds_needed,
    sign_flip_test,
    tost_pvalue,
    two_level_bootstrap,
)
from topoflow.seed_stats_calibration import NoiseModel, calibrate, simulate_seed_losses
from topoflow.stats import paired_samples

FAST = NoiseModel(n_init_times=60, n_leads=2, sample_noise=0.03)


def _from_gains(gains: list[float]) -> dict:
    """Per-seed means whose relative changes are exactly `gains` (control 1.0 in every seed)."""
    return {s: 1.0 for s in range(len(gains))}, {s: 1.0 - g for s, g in enumerate(gains)}


def test_sign_flip_test_is_the_exact_enumeration():
    gains = np.array([0.01, -0.02, 0.015, 0.03, 0.005, -0.004])
    observed = abs(gains.mean())
    flips = [abs((gains * np.array(signs)).mean()) >= observed - 1e-15
             for signs in itertools.product([1, -1], repeat=gains.size)]
    p, exact = sign_flip_test(gains)
    assert exact and p == pytest.approx(np.mean(flips))
    assert sign_flip_test(np.array([0.01, 0.02, 0.03]))[0] == pytest.approx(2 / 8)
    assert sign_flip_test(np.zeros(4)) == (1.0, True)


def test_minimum_detectable_effect_has_80_percent_power_by_monte_carlo():
    sd, n = 0.013, 8
    mde = minimum_detectable_effect(sd, n)
    rng = np.random.default_rng(0)
    draws = mde + sd * rng.standard_normal((40_000, n))
    t = draws.mean(1) / (draws.std(1, ddof=1) / math.sqrt(n))
    assert np.mean(np.abs(t) > 2.3646) == pytest.approx(0.80, abs=0.01)  # t_{0.975, 7}
    # Large n: the normal formula (z_0.975 + z_0.8) sd / sqrt(n).
    assert minimum_detectable_effect(sd, 400) == pytest.approx(2.8016 * sd / 20, rel=0.01)
    assert minimum_detectable_effect(sd, 1) is None
    assert minimum_detectable_effect(0.0, 5) == 0.0


def test_seeds_needed_is_the_first_count_reaching_the_target():
    sd = 0.013  # the positive control's per-seed spread
    n = seeds_needed(sd, 0.005)
    assert minimum_detectable_effect(sd, n) <= 0.005 < minimum_detectable_effect(sd, n - 1)
    assert 50 <= n <= 62  # the "about 60 seeds" for 0.5%
    assert seeds_needed(sd, 1.0) == 2
    with pytest.raises(ValueError, match="must be > 0"):
        seeds_needed(sd, 0.0)


def test_tost_rejects_exactly_when_the_90_percent_t_interval_is_inside_the_margin():
    rng = np.random.default_rng(1)
    for _ in range(200):
        gains = rng.normal(rng.uniform(-0.01, 0.01), rng.uniform(0.001, 0.01), size=5)
        se = gains.std(ddof=1) / math.sqrt(5)
        lo, hi = gains.mean() - 2.1318 * se, gains.mean() + 2.1318 * se  # t_{0.95, 4}
        inside = lo > -0.01 and hi < 0.01
        assert (tost_pvalue(gains, 0.01) < 0.05) == inside


def test_two_level_bootstrap_reduces_to_the_seed_bootstrap_without_sample_noise():
    # Every sample of seed s has the arm at exactly (1 - g_s) x the control, so any block resample
    # gives g_s and the replicate is the mean of n seeds drawn with replacement: its exact
    # distribution enumerates the 4^4 equally likely draws.
    gains = np.array([0.02, -0.01, 0.005, 0.03])
    ids = (420_000 + 6 * np.arange(50))[:, None] * 1000 + np.array([12, 24])
    ids = ids.ravel()
    control = np.random.default_rng(2).uniform(0.5, 1.5, size=ids.size)
    paired = {s: paired_samples(ids, control, ids, control * (1 - g)) for s, g in enumerate(gains)}
    boot = two_level_bootstrap(paired, n_boot=40_000, block_length=5)
    means = [gains[list(draw)].mean() for draw in itertools.product(range(4), repeat=4)]
    expected = np.quantile(means, [0.025, 0.975])
    np.testing.assert_allclose(boot.interval_95, expected, atol=1.5e-3)
    assert boot.block_length == 5 and boot.n_init_times == 50


def test_identical_arms_are_equivalent_never_better_or_worse():
    rng = np.random.default_rng(3)
    control, _ = simulate_seed_losses(rng, 3, 0.0, FAST)
    v = seed_verdict_from_losses(control, control, arm_name="twin", n_boot=200)
    assert v.verdict == "equivalent" and not v.difference_detected
    assert v.gain_per_seed == [0.0, 0.0, 0.0] and v.interval_95 == (0.0, 0.0)
    assert v.t_pvalue == 1.0 and v.sign_flip_pvalue == 1.0
    assert v.text.startswith("Equivalent within +/-1%")


def test_planted_gain_is_better_with_what_is_excluded():
    rng = np.random.default_rng(4)
    control, arm = simulate_seed_losses(rng, 8, 0.05, FAST)
    v = seed_verdict_from_losses(control, arm, arm_name="topoflow", n_boot=500)
    assert v.verdict == "better" and v.difference_detected
    lo, hi = v.interval_95
    assert 0 < lo < 0.05 < hi
    # The decisive interval is the hull of the t interval and the two-level bootstrap's.
    assert lo <= min(v.t_interval_95[0], v.bootstrap.interval_95[0]) + 1e-15
    assert v.text.startswith("Better: topoflow") and "any loss" in v.text
    assert "Minimum detectable effect" in v.text and v.mde is not None and v.mde < 0.05


def test_planted_loss_is_worse():
    control, arm = _from_gains([-0.04, -0.05, -0.03, -0.06])
    v = seed_verdict_from_means(control, arm)
    assert v.verdict == "worse" and v.interval_95[1] < 0 and v.bootstrap is None
    assert "t interval only" in v.text and "any gain" in v.text


def test_noisy_small_effect_is_inconclusive_and_says_what_is_excluded():
    control, arm = _from_gains([0.02, -0.015, 0.01, -0.005, 0.012])
    v = seed_verdict_from_means(control, arm)
    assert v.verdict == "inconclusive"
    lo, hi = v.interval_95
    assert f"gains above +{100 * hi:.2g}%" in v.text
    assert f"losses beyond {100 * -lo:.2g}%" in v.text
    assert f"Minimum detectable effect {100 * v.mde:.2g}% at 80% power with 5 seeds" in v.text
    assert "cannot go below 0.062" in v.text  # 5 seeds: the sign-flip floor is 2 / 32


def test_precise_negligible_difference_is_equivalent_and_says_it_is_real():
    control, arm = _from_gains([-0.0003, -0.0002, -0.00025, -0.0003])
    v = seed_verdict_from_means(control, arm)
    assert v.verdict == "equivalent" and v.difference_detected
    assert "distinguishably higher" in v.text and "less than the margin" in v.text
    wide = seed_verdict_from_means(control, arm, margin=0.0001)
    assert wide.verdict == "worse"  # the same numbers against a margin they exceed


def test_one_seed_gives_no_seed_level_inference():
    v = seed_verdict_from_means({0: 1.0}, {0: 0.9})
    assert v.verdict == "inconclusive" and v.interval_95 is None and v.mde is None
    assert "run at least 3 seeds" in v.text


def test_bad_inputs_name_what_is_wrong():
    ids = np.array([1012, 2012, 3012])
    good = (ids, np.ones(3))
    with pytest.raises(ValueError, match=r"seeds differ: control \[0, 1\], arm \[0\]"):
        seed_verdict_from_losses({0: good, 1: good}, {0: good})
    with pytest.raises(ValueError, match="seed 1: loss is NaN on one side only"):
        seed_verdict_from_losses({0: good, 1: good}, {0: good, 1: (ids, [1.0, np.nan, 1.0])})
    with pytest.raises(ValueError, match="seed 1 was scored on other samples than seed 0"):
        seed_verdict_from_losses({0: good, 1: (ids + 1000, np.ones(3))},
                                 {0: good, 1: (ids + 1000, np.ones(3))})
    with pytest.raises(ValueError, match="margin must be > 0"):
        seed_verdict_from_means({0: 1.0, 1: 1.0}, {0: 1.0, 1: 1.0}, margin=0.0)
    with pytest.raises(ValueError, match="finite"):
        seed_verdict_from_means({0: 1.0, 1: np.nan}, {0: 1.0, 1: 1.0})


def test_calibration_false_positives_and_detection_at_the_reported_mde():
    null = calibrate(1000, 8, 0.0, noise=FAST, n_boot=200, seed=1)
    assert 0.03 <= null.false_positive_rate <= 0.07
    planted = calibrate(1000, 8, null.mean_mde, noise=FAST, n_boot=200, seed=2)
    assert 0.72 <= planted.detection_rate <= 0.88
    assert planted.detected_worse == 0


def test_calibration_equivalence_with_enough_seeds_and_never_at_twice_the_margin():
    # Fewer experiments with 30 seeds: beyond 16 seeds the (reported) sign-flip test draws 9999
    # random patterns per experiment; the benchmark runs 1000 of each.
    many = calibrate(100, 30, 0.0, noise=FAST, n_boot=200, seed=3)
    assert many.rate("equivalent") >= 0.9
    # At twice the margin, TOST at 5% passes only when the seed sd comes out far too small by
    # chance: 0.32% of experiments with 3 seeds, 0.014% with 8 (integrating the normal mean over the
    # chi-square sd, per-seed sd 1.3%). So: at most a handful of 500 with 3 seeds, none beyond.
    for seeds, n, most in ((3, 500, 5), (8, 500, 0), (30, 100, 0)):
        far = calibrate(n, seeds, 2 * DEFAULT_MARGIN, noise=FAST, n_boot=200, seed=4 + seeds)
        assert far.verdicts.get("equivalent", 0) <= most
