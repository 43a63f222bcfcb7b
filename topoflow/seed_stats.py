"""Seed-level inference: does *training with* the arm's setting change the test loss?

The unit of replication is the training seed. Arm and control trained with seed s share data
order and initialization and are scored on the same evaluation samples, so each seed gives one
paired number, the relative change of the mean test loss

    gain_s = 1 - mean(arm_s) / mean(control_s)        (positive: the arm has the lower loss)

and everything here is about the mean of those numbers over seeds:

- a paired t-test and its interval (`scipy.stats.ttest_1samp`), and an exact sign-flip
  permutation test of the mean (`scipy.stats.permutation_test`, all 2^n flips up to 16 seeds);
- a two-level bootstrap interval: seeds drawn with replacement, then, within each drawn seed,
  moving blocks of initialization times (`topoflow.stats.moving_block_draws`), so the interval
  carries the test-period noise as well as the seed-to-seed noise;
- the minimum detectable effect at 80% power of the t-test from the observed seed spread
  (noncentral t), the number of seeds that would reach a target effect, and an equivalence test
  (two one-sided t-tests) against a margin.

The decision rule (docs/experiment.md states it before any number it judges): with the seed-level
interval at a confidence level being the hull of the t interval and the two-level bootstrap
interval at that level,

1. *equivalent within +/- margin* if the 90% seed-level interval lies inside (-margin, +margin)
   (TOST at 5%, the bootstrap agreeing);
2. otherwise *better* if the 95% interval lies above 0, *worse* if below 0;
3. otherwise *inconclusive*, stating which effects the 95% interval excludes and the minimum
   detectable effect.

The sign-flip test is reported beside the t-test and never decides: with fewer than 6 seeds it
cannot reach p < 0.05 at all. Calibration by simulation: tests/test_seed_stats.py (fast) and
benchmarks/seed_stats_calibration.py (1000+ experiments per setting).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field

import numpy as np
from scipy import optimize, special
from scipy import stats as scipy_stats

from topoflow.stats import (
    PairedSamples,
    init_time_sums,
    moving_block_draws,
    optimal_block_length,
    paired_samples,
)

__all__ = [
    "ALPHA",
    "DEFAULT_MARGIN",
    "SeedLosses",
    "SeedVerdict",
    "TwoLevelBootstrap",
    "format_p",
    "format_percent",
    "minimum_detectable_effect",
    "seed_verdict_from_losses",
    "seed_verdict_from_means",
    "seeds_needed",
    "sign_flip_test",
    "t_test_power",
    "tost_pvalue",
    "two_level_bootstrap",
]

# docs/experiment.md justifies it: a quarter of the gain the researchers' own success threshold
# asks for (0.3557 -> 0.34 is 4.4% of the loss), and below the seed-to-seed std of the loss.
DEFAULT_MARGIN = 0.01

# The decision rule's level: its 95% and 90% intervals are the 5%-level two-sided and TOST tests.
ALPHA = 0.05

# Every seed of one arm: {seed: (sample_ids, per-sample losses)}.
SeedLosses = Mapping[int, tuple[np.ndarray, np.ndarray]]

_EXACT_SIGN_FLIP_SEEDS = 16  # 2^16 sign patterns; beyond that 9999 random ones


@dataclass
class TwoLevelBootstrap:
    """Percentile intervals of the mean per-seed gain: seeds, then blocks of init times."""

    interval_95: tuple[float, float]
    interval_90: tuple[float, float]
    block_length: int
    block_rule: str
    n_init_times: int
    n_boot: int


def _paired_per_seed(control: SeedLosses, arm: SeedLosses) -> dict[int, PairedSamples]:
    """Each seed's control and arm losses aligned by sample id; every seed on the same samples."""
    if set(control) != set(arm):
        raise ValueError(f"seeds differ: control {sorted(control)}, arm {sorted(arm)}")
    if not control:
        raise ValueError("no seeds given")
    paired = {}
    for s in sorted(control):
        try:
            paired[s] = paired_samples(*control[s], *arm[s])
        except ValueError as err:
            raise ValueError(f"seed {s}: {err}") from err
    first = next(iter(paired))
    for s, p in paired.items():
        if not np.array_equal(p.sample_ids, paired[first].sample_ids):
            raise ValueError(f"seed {s} was scored on other samples than seed {first}: the "
                             "seed-level comparison needs the same evaluation samples")
    return paired


def two_level_bootstrap(paired: Mapping[int, PairedSamples], *, n_boot: int = 2000,
                        block_length: int | None = None, seed: int = 0,
                        chunk: int = 250) -> TwoLevelBootstrap:
    """Seeds with replacement, then moving blocks of init times within each drawn seed.

    A replicate draws n seeds out of the n; for each drawn seed it draws its own moving-block
    resample of the init times (all leads of an init time together) and recomputes that seed's
    gain 1 - sum(arm) / sum(control); the replicate is the mean over the drawn seeds. The block
    length is Politis-White's on the seed-averaged per-init-time reduction unless given.
    """
    sums = [init_time_sums(paired[s]) for s in sorted(paired)]
    control = np.stack([c for c, _, _ in sums])  # (S, T)
    arm = np.stack([a for _, a, _ in sums])
    count = sums[0][2]
    n_seeds, n_times = control.shape
    if block_length is None:
        reduction = (control - arm).mean(0) / count
        block_length, rule = optimal_block_length(reduction), "Politis-White (auto)"
    else:
        rule = "given"
    if not 1 <= block_length <= n_times:
        raise ValueError(f"block_length must be in [1, {n_times}] init times, got {block_length}")
    cum_control = np.concatenate([np.zeros((n_seeds, 1)), np.cumsum(control, 1)], 1)
    cum_arm = np.concatenate([np.zeros((n_seeds, 1)), np.cumsum(arm, 1)], 1)
    rng = np.random.default_rng(seed)
    replicates = np.empty(n_boot)
    for begin in range(0, n_boot, chunk):
        size = min(chunk, n_boot - begin)
        rows = rng.integers(0, n_seeds, size=(size, n_seeds))[..., None]  # (m, S, 1)
        starts, ends = moving_block_draws(rng, n_times, block_length, (size, n_seeds))
        c = (cum_control[rows, ends] - cum_control[rows, starts]).sum(-1)  # (m, S)
        a = (cum_arm[rows, ends] - cum_arm[rows, starts]).sum(-1)
        replicates[begin:begin + size] = (1.0 - a / c).mean(1)
    q95 = np.quantile(replicates, [0.025, 0.975])
    q90 = np.quantile(replicates, [0.05, 0.95])
    return TwoLevelBootstrap((float(q95[0]), float(q95[1])), (float(q90[0]), float(q90[1])),
                             int(block_length), rule, int(n_times), int(n_boot))


def sign_flip_test(gains: np.ndarray) -> tuple[float, bool]:
    """Two-sided p of the mean under random signs, and whether it is exact (up to 16 seeds).

    Beyond 16 seeds scipy draws 9999 random sign patterns: the p-value is reported, never decides,
    so its Monte Carlo error (about 0.002 at p = 0.05) does not matter.
    """
    g = np.asarray(gains, dtype=np.float64)
    if not g.any():
        return 1.0, True
    exact = g.size <= _EXACT_SIGN_FLIP_SEEDS
    result = scipy_stats.permutation_test(
        (g,), lambda x, axis: np.mean(x, axis=axis), permutation_type="samples",
        vectorized=True, n_resamples=2**g.size if exact else 9999, random_state=0)
    return float(result.pvalue), exact


def t_test_power(effect: float, sd: float, n_seeds: int, *, alpha: float = 0.05) -> float:
    """Power of the two-sided one-sample t-test on n_seeds gains with this sd (noncentral t)."""
    # scipy.special's ufuncs are the same functions as scipy.stats.t / nct without their
    # per-call argument checking, which made the calibration simulations ten times slower.
    df = n_seeds - 1
    critical = special.stdtrit(df, 1.0 - alpha / 2.0)
    nc = effect * math.sqrt(n_seeds) / sd
    # P(T <= -c | nc) is written as P(T >= c | -nc): nctdtr returns NaN deep in the left tail.
    upper = 1.0 - special.nctdtr(df, nc, critical)
    lower = 1.0 - special.nctdtr(df, -nc, critical)
    if not math.isfinite(upper + lower):
        # nctdtr gives NaN for extreme noncentralities (effects of 1e6 sd and more, e.g. two
        # arms that differ by a nearly constant amount): the power there is 1.
        return 1.0 if abs(nc) > critical else 0.0
    return float(upper + lower)


def minimum_detectable_effect(sd: float, n_seeds: int, *, alpha: float = 0.05,
                              power: float = 0.8) -> float | None:
    """Smallest |mean gain| the t-test detects with `power` at `alpha`; None below 2 seeds."""
    if n_seeds < 2 or not math.isfinite(sd):
        return None
    if sd == 0:
        return 0.0
    high = sd
    while t_test_power(high, sd, n_seeds, alpha=alpha) < power:
        high *= 2.0
    return float(optimize.brentq(lambda d: t_test_power(d, sd, n_seeds, alpha=alpha) - power,
                                 0.0, high, xtol=1e-12 * sd))


def seeds_needed(sd: float, target_mde: float, *, alpha: float = 0.05, power: float = 0.8,
                 max_seeds: int = 1_000_000) -> int | None:
    """Fewest seeds whose minimum detectable effect is <= target_mde (None above max_seeds)."""
    if target_mde <= 0:
        raise ValueError(f"target minimum detectable effect must be > 0, got {target_mde}")
    if sd == 0:
        return 2

    def enough(n: int) -> bool:
        return t_test_power(target_mde, sd, n, alpha=alpha) >= power

    high = 2
    while not enough(high):
        if high >= max_seeds:
            return None
        high = min(2 * high, max_seeds)
    low = max(2, high // 2)
    if enough(low):
        return low
    while high - low > 1:  # enough(high) and not enough(low)
        middle = (low + high) // 2
        low, high = (low, middle) if enough(middle) else (middle, high)
    return high


def tost_pvalue(gains: np.ndarray, margin: float) -> float:
    """Two one-sided t-tests that the mean gain lies inside (-margin, +margin): max of both p."""
    g = np.asarray(gains, dtype=np.float64)
    mean, se = float(g.mean()), float(g.std(ddof=1) / math.sqrt(g.size))
    if se == 0:
        return 0.0 if abs(mean) < margin else 1.0
    df = g.size - 1
    above_lower = scipy_stats.t.sf((mean + margin) / se, df)
    below_upper = scipy_stats.t.cdf((mean - margin) / se, df)
    return float(max(above_lower, below_upper))


def _t_interval(gains: np.ndarray, confidence: float) -> tuple[float, float]:
    g = np.asarray(gains, dtype=np.float64)
    mean, se = float(g.mean()), float(g.std(ddof=1) / math.sqrt(g.size))
    half = float(scipy_stats.t.ppf(0.5 + confidence / 2.0, g.size - 1)) * se
    return mean - half, mean + half


def _hull(a: tuple[float, float], b: tuple[float, float] | None) -> tuple[float, float]:
    return a if b is None else (min(a[0], b[0]), max(a[1], b[1]))


@dataclass
class SeedVerdict:
    """The seed-level verdict of one arm against the control; gains are relative (0.01 = 1%).

    `verdict` is one of "better", "worse", "equivalent", "inconclusive" (the decision rule in the
    module docstring). `interval_95`/`interval_90` are the seed-level intervals that decide (hull
    of the t interval and the two-level bootstrap one; the t interval alone when per-sample losses
    of each seed are not available, `bootstrap` None). `difference_detected`: the 95% interval
    excludes 0 (also possible within an "equivalent" verdict, for a real but negligible effect).
    Undefined numbers (fewer than 2 seeds) are None.
    """

    arm: str
    control: str
    seeds: list[int]
    control_loss: list[float]
    arm_loss: list[float]
    gain_per_seed: list[float]
    mean_gain: float
    sd_gain: float | None
    t_pvalue: float | None
    t_interval_95: tuple[float, float] | None
    sign_flip_pvalue: float | None
    sign_flip_exact: bool | None
    bootstrap: TwoLevelBootstrap | None
    interval_95: tuple[float, float] | None
    interval_90: tuple[float, float] | None
    margin: float
    tost_pvalue: float | None
    alpha: float
    power: float
    mde: float | None
    target_mde: float
    seeds_needed: int | None
    difference_detected: bool
    verdict: str
    text: str = field(default="")

    def to_dict(self) -> dict:
        return asdict(self)


def _judge(interval_95: tuple[float, float], interval_90: tuple[float, float],
           margin: float) -> str:
    if -margin < interval_90[0] and interval_90[1] < margin:
        return "equivalent"
    if interval_95[0] > 0:
        return "better"
    if interval_95[1] < 0:
        return "worse"
    return "inconclusive"


def _verdict(means: dict[int, tuple[float, float]], bootstrap: TwoLevelBootstrap | None, *,
             arm_name: str, control_name: str, margin: float, power: float,
             target_mde: float | None, sign_flip: bool = True) -> SeedVerdict:
    """`means`: {seed: (control's mean test loss, arm's)}."""
    if not margin > 0:
        raise ValueError(f"equivalence margin must be > 0, got {margin}")
    alpha = ALPHA
    seeds = sorted(means)
    control = np.array([means[s][0] for s in seeds], dtype=np.float64)
    arm = np.array([means[s][1] for s in seeds], dtype=np.float64)
    if not (np.isfinite(control).all() and np.isfinite(arm).all()) or (control <= 0).any():
        raise ValueError(f"per-seed test losses must be finite and the control's > 0: control "
                         f"{control.tolist()}, {arm_name} {arm.tolist()} (seeds {seeds})")
    g = 1.0 - arm / control
    target = margin if target_mde is None else target_mde
    result = SeedVerdict(
        arm_name, control_name, seeds, control.tolist(), arm.tolist(), g.tolist(),
        float(g.mean()), None, None, None, None, None, bootstrap, None, None, float(margin), None,
        alpha, power, None, float(target), None, False, "inconclusive")
    if g.size >= 2:
        sd = float(g.std(ddof=1))
        result.sd_gain = sd
        if sd == 0:
            result.t_pvalue = 1.0 if result.mean_gain == 0 else 0.0
        else:
            result.t_pvalue = float(scipy_stats.ttest_1samp(g, 0.0).pvalue)
        result.t_interval_95 = _t_interval(g, 0.95) if sd > 0 else (result.mean_gain,) * 2
        t_90 = _t_interval(g, 0.90) if sd > 0 else (result.mean_gain,) * 2
        if sign_flip:
            result.sign_flip_pvalue, result.sign_flip_exact = sign_flip_test(g)
        result.interval_95 = _hull(result.t_interval_95, bootstrap and bootstrap.interval_95)
        result.interval_90 = _hull(t_90, bootstrap and bootstrap.interval_90)
        result.tost_pvalue = tost_pvalue(g, margin)
        result.mde = minimum_detectable_effect(sd, g.size, alpha=alpha, power=power)
        result.seeds_needed = seeds_needed(sd, target, alpha=alpha, power=power)
        lo, hi = result.interval_95
        result.difference_detected = lo > 0 or hi < 0
        result.verdict = _judge(result.interval_95, result.interval_90, margin)
    result.text = _text(result)
    return result


def seed_verdict_from_losses(control: SeedLosses, arm: SeedLosses, *, arm_name: str = "arm",
                             control_name: str = "control", margin: float = DEFAULT_MARGIN,
                             power: float = 0.8, target_mde: float | None = None,
                             n_boot: int = 2000,
                             block_length: int | None = None, seed: int = 0,
                             sign_flip: bool = True) -> SeedVerdict:
    """The verdict from per-seed, per-sample losses of two arms: `{seed: (sample_ids, losses)}`.

    Seeds pair by key; within a seed, samples pair by id (NaN on both sides dropped, on one side an
    error); every seed must cover the same samples. `target_mde` (default: the margin) is the
    effect for which `seeds_needed` is computed. `sign_flip=False` skips the sign-flip test, which
    is reported but never decides (simulations with many seeds use it to save time).
    """
    paired = _paired_per_seed(control, arm)
    means = {s: (float(p.control.mean()), float(p.arm.mean())) for s, p in paired.items()}
    bootstrap = None
    if len(paired) >= 2:
        bootstrap = two_level_bootstrap(paired, n_boot=n_boot, block_length=block_length,
                                        seed=seed)
    return _verdict(means, bootstrap, arm_name=arm_name, control_name=control_name,
                    margin=margin, power=power, target_mde=target_mde, sign_flip=sign_flip)


def seed_verdict_from_means(control: Mapping[int, float], arm: Mapping[int, float], *,
                            arm_name: str = "arm", control_name: str = "control",
                            margin: float = DEFAULT_MARGIN, power: float = 0.8,
                            target_mde: float | None = None) -> SeedVerdict:
    """The verdict from each seed's mean test loss alone (no two-level bootstrap: t interval).

    For results that stored only per-seed means; the text says the bootstrap is missing.
    """
    if set(control) != set(arm):
        raise ValueError(f"seeds differ: control {sorted(control)}, arm {sorted(arm)}")
    if not control:
        raise ValueError("no seeds given")
    means = {int(s): (float(control[s]), float(arm[s])) for s in control}
    return _verdict(means, None, arm_name=arm_name, control_name=control_name, margin=margin,
                    power=power, target_mde=target_mde)


def format_percent(x: float, sign: bool = True) -> str:
    """A fraction as a percentage with two significant digits: 0.0123 -> '+1.2%'."""
    value = 100.0 * x
    text = f"{value:+.0f}" if abs(value) >= 10 else f"{value:+.2g}"
    return (text if sign else text.lstrip("+-")) + "%"


def format_p(p: float) -> str:
    """'p = 0.032' or 'p < 1e-4'."""
    return f"p = {p:.2g}" if p >= 1e-4 else "p < 1e-4"


def _text(v: SeedVerdict) -> str:
    pct = format_percent
    n = len(v.seeds)
    effect = (f"{v.arm} vs {v.control}, relative change of the mean test loss per training seed "
              f"(positive: {v.arm} lower): mean {pct(v.mean_gain)} over {n} seed{'s' * (n > 1)}")
    if v.sd_gain is None or v.interval_95 is None or v.interval_90 is None:
        return (f"Inconclusive: {effect}. With one seed there is no seed-to-seed spread, so no "
                "seed-level inference: run at least 3 seeds (a pilot of 3 says how many are "
                "needed).")
    effect += f" (sd {pct(v.sd_gain, sign=False)})"
    lo, hi = v.interval_95
    which = "t and two-level bootstrap" if v.bootstrap is not None else (
        "t interval only: per-sample losses of each seed were not available for the two-level "
        "bootstrap")
    interval = f"95% seed-level interval {pct(lo)} to {pct(hi)} ({which})"
    tests = f"Paired t-test {format_p(v.t_pvalue)}"
    if v.sign_flip_pvalue is not None:
        tests += (f", {'exact ' if v.sign_flip_exact else ''}sign-flip test "
                  f"{format_p(v.sign_flip_pvalue)}")
        floor = 2.0 / 2**n
        if floor > v.alpha:
            tests += f" (with {n} seeds it cannot go below {floor:.2g})"
    power = f"{100 * v.power:.0f}%"
    mde = ("Minimum detectable effect: undefined" if v.mde is None else
           f"Minimum detectable effect {pct(v.mde, sign=False)} at {power} power with {n} seeds")
    needed = ("more than a million seeds" if v.seeds_needed is None else
              f"{v.seeds_needed} seeds")
    mde += f"; {needed} would reach {pct(v.target_mde, sign=False)}"
    margin = pct(v.margin, sign=False)
    lo90, hi90 = v.interval_90
    if v.verdict == "equivalent":
        head = (f"Equivalent within +/-{margin}: {effect}. The 90% seed-level interval "
                f"{pct(lo90)} to {pct(hi90)} lies inside +/-{margin} (TOST "
                f"{format_p(v.tost_pvalue)}): effects beyond +/-{margin} are excluded.")
        if v.difference_detected:
            side = "lower" if lo > 0 else "higher"
            head += (f" {v.arm}'s loss is distinguishably {side} ({interval}), but by less "
                     "than the margin.")
        else:
            head += f" {interval[0].upper()}{interval[1:]}."
    elif v.verdict in ("better", "worse"):
        if v.verdict == "better":
            excluded = f"any loss, gains below {pct(lo)} and gains above {pct(hi)} are excluded"
        else:
            excluded = (f"any gain, losses smaller than {pct(hi, sign=False)} and losses beyond "
                        f"{pct(lo, sign=False)} are excluded")
        head = (f"{v.verdict.capitalize()}: {effect}. {interval[0].upper()}{interval[1:]}: "
                f"{excluded}. Not shown equivalent within +/-{margin} (TOST "
                f"{format_p(v.tost_pvalue)}).")
    else:
        head = (f"Inconclusive: {effect}. {interval[0].upper()}{interval[1:]}: gains above "
                f"{pct(hi)} and losses beyond {pct(lo, sign=False)} are excluded; neither "
                f"a difference nor equivalence within +/-{margin} (TOST "
                f"{format_p(v.tost_pvalue)}) is shown.")
    return f"{head} {tests}. {mde}."
