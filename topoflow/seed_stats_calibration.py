"""Simulated experiments with a known answer, to calibrate `topoflow.seed_stats` verdicts.

`simulate_seed_losses` draws per-seed, per-sample test losses of a control and an arm with the
noise structure of the real runs (docs/results): a weather signal shared by every model
(AR(1) over initialization times), a seed-to-seed spread of the control's loss level, a per-seed
multiplicative arm-vs-control factor (the seed noise of the paired gain) and per-sample noise of
the ratio that is autocorrelated over initialization times within a seed (the sample noise). A
planted `effect` lowers the arm's loss by that fraction in expectation. `calibrate` runs many such
experiments through `seed_verdict_from_losses` and counts the verdicts.

The defaults reproduce the positive control (8 seeds there): a per-seed gain std of about 1.3% of
the loss, of which about 0.2% comes from the test samples (5810 samples at 1458 init times there;
fewer here by default, which `sample_noise` compensates through `time_correlation`).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np
from scipy import signal

from topoflow.seed_stats import DEFAULT_MARGIN, SeedLosses, seed_verdict_from_losses

__all__ = ["CalibrationResult", "NoiseModel", "calibrate", "simulate_seed_losses"]


@dataclass(frozen=True)
class NoiseModel:
    """The noise of one simulated experiment; fractions are relative to the loss."""

    n_init_times: int = 240
    n_leads: int = 4
    loss_level: float = 0.6
    weather_std: float = 0.3  # log-loss std of the shared weather signal
    weather_correlation: float = 0.9  # AR(1) coefficient between consecutive init times
    seed_level_std: float = 0.034  # control's loss level across seeds (3.4% in the controls)
    seed_gain_std: float = 0.013  # arm / control factor across seeds
    sample_noise: float = 0.02  # per-sample std of the arm / control ratio
    time_correlation: float = 0.8  # its AR(1) coefficient between consecutive init times


def _ar1(rng: np.random.Generator, shape: tuple[int, ...], rho: float) -> np.ndarray:
    """Unit-variance AR(1) series along the last axis (stationary from the first value)."""
    shocks = rng.standard_normal(shape) * np.sqrt(1.0 - rho**2)
    shocks[..., 0] /= np.sqrt(1.0 - rho**2)
    return signal.lfilter([1.0], [1.0, -rho], shocks, axis=-1)


def simulate_seed_losses(rng: np.random.Generator, n_seeds: int, effect: float,
                         noise: NoiseModel = NoiseModel()) -> tuple[SeedLosses, SeedLosses]:
    """Control and arm losses `{seed: (sample_ids, losses)}` of one simulated experiment."""
    leads = np.array([12, 24, 48, 96, 120, 144][: noise.n_leads])
    init_hours = 420_000 + 6 * np.arange(noise.n_init_times)
    ids = (init_hours[:, None] * 1000 + leads[None, :]).ravel()
    weather = _ar1(rng, (noise.n_init_times,), noise.weather_correlation)
    base = noise.loss_level * np.exp(noise.weather_std * weather)[:, None]  # (T, 1)
    control, arm = {}, {}
    for s in range(n_seeds):
        level = 1.0 + noise.seed_level_std * rng.standard_normal()
        c = base * level * np.exp(0.2 * rng.standard_normal((noise.n_init_times, leads.size)))
        ratio_noise = _ar1(rng, (leads.size, noise.n_init_times), noise.time_correlation).T
        factor = (1.0 + noise.seed_gain_std * rng.standard_normal()) * (
            1.0 + noise.sample_noise * ratio_noise)
        control[s] = (ids, c.ravel())
        arm[s] = (ids, (c * (1.0 - effect) * factor).ravel())
    return control, arm


@dataclass
class CalibrationResult:
    """Verdict counts over `n_experiments` simulated experiments of one setting."""

    n_seeds: int
    effect: float
    n_experiments: int
    verdicts: dict[str, int]
    detected_better: int  # 95% interval above 0 (verdict better, or equivalent with it)
    detected_worse: int
    mean_mde: float  # the minimum detectable effect at the pooled sd of all experiments
    mean_sd: float

    def rate(self, verdict: str) -> float:
        return self.verdicts.get(verdict, 0) / self.n_experiments

    @property
    def detection_rate(self) -> float:
        return self.detected_better / self.n_experiments

    @property
    def false_positive_rate(self) -> float:
        return (self.detected_better + self.detected_worse) / self.n_experiments


def calibrate(n_experiments: int, n_seeds: int, effect: float, *, noise: NoiseModel = NoiseModel(),
              margin: float = DEFAULT_MARGIN, n_boot: int = 500, seed: int = 0
              ) -> CalibrationResult:
    """Run `n_experiments` simulated experiments and count the verdicts."""
    from topoflow.seed_stats import minimum_detectable_effect

    rng = np.random.default_rng(seed)
    verdicts: Counter[str] = Counter()
    better = worse = 0
    variances = []
    for k in range(n_experiments):
        control, arm = simulate_seed_losses(rng, n_seeds, effect, noise)
        # The sign-flip test is reported, never decides; beyond 16 seeds it costs more than the
        # rest of the verdict together, so the simulations leave it out there.
        v = seed_verdict_from_losses(control, arm, margin=margin, n_boot=n_boot, seed=k,
                                     sign_flip=n_seeds <= 16)
        verdicts[v.verdict] += 1
        better += v.difference_detected and v.interval_95[0] > 0
        worse += v.difference_detected and v.interval_95[1] < 0
        variances.append(v.sd_gain**2)
    sd = float(np.sqrt(np.mean(variances)))
    return CalibrationResult(n_seeds, effect, n_experiments, dict(verdicts), int(better),
                             int(worse), minimum_detectable_effect(sd, n_seeds), sd)
