"""Train every arm x seed with train_accelerate.py under one budget, or adopt finished runs.

Layout of an experiment folder:

    experiment.json          the plan: arms, seeds, budget, baseline, corpus, training arguments
    runs/<arm>/seed<k>/      one train_accelerate.py output dir per arm and seed
    eval/<arm>/seed<k>/      its scores on the evaluation split (topoflow/experiment/evaluate.py)

Identical data order: every arm of seed k runs with `--seed k` and the same corpus, batch size and
step budget, so the shard order, sample order and dropout masks match; only the arm's
elevation-bias settings differ. Runs already complete in their folder (report.json and model/) are
reused, so an interrupted experiment continues where it stopped.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .arms import CONTROL, ArmSpec

__all__ = [
    "Budget",
    "RunRecord",
    "TrainingFailed",
    "adopt_run",
    "parse_run_argument",
    "run_dir",
    "train_arms",
    "check_runs",
]


class TrainingFailed(RuntimeError):
    """train_accelerate.py exited with an error for one arm x seed."""


@dataclass
class Budget:
    """What every arm gets: optimizer steps, batch size, learning rate, validation cadence."""

    max_steps: int
    batch_size: int = 8
    learning_rate: float = 3e-4
    eval_every: int = 25
    eval_batches: int = 4
    extra_args: list[str] = field(default_factory=list)

    def train_args(self) -> list[str]:
        return ["--max-steps", str(self.max_steps), "--batch-size", str(self.batch_size),
                "--learning-rate", repr(self.learning_rate), "--eval-every", str(self.eval_every),
                "--eval-batches", str(self.eval_batches), *self.extra_args]


@dataclass
class RunRecord:
    """One finished run: which arm and seed, where, and how long training took."""

    arm: str
    seed: int
    path: str
    wall_time_s: float | None = None
    adopted: bool = False

    def to_dict(self) -> dict:
        return asdict(self)


def run_dir(experiment_dir: str | Path, arm: str, seed: int) -> Path:
    return Path(experiment_dir) / "runs" / arm / f"seed{seed}"


def _complete(path: Path) -> bool:
    return (path / "report.json").is_file() and (path / "model" / "config.json").is_file()


def _train_argv(arm: ArmSpec, seed: int, *, model: str, corpus: str, budget: Budget,
                output_dir: Path) -> list[str]:
    return ["--model", model, "--corpus", corpus, "--seed", str(seed), "--output-dir",
            str(output_dir), "--overwrite", "--report-to", "none", "--no-progress-bar",
            *budget.train_args(), *arm.train_args()]


def _run_one(argv: list[str], output_dir: Path, launcher: str, threads: int | None) -> float:
    """Train one arm x seed; return its wall time. Raise TrainingFailed on a non-zero exit."""
    output_dir.mkdir(parents=True, exist_ok=True)
    started = time.time()
    if launcher == "inprocess":
        import train_accelerate

        code = train_accelerate.main(argv)
        _reset_accelerate_state()
        if code:
            raise TrainingFailed(f"train_accelerate.main({' '.join(argv)}) returned {code}")
        return time.time() - started
    env = dict(os.environ)
    if threads:
        # Several runs in parallel on few cores: one intra-op thread each avoids oversubscription.
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    log = output_dir / "train.log"
    with open(log, "w") as handle:
        done = subprocess.run([sys.executable, "-m", "train_accelerate", *argv], env=env,
                              stdout=handle, stderr=subprocess.STDOUT, check=False)
    if done.returncode:
        tail = log.read_text(errors="replace")[-2000:]
        raise TrainingFailed(f"training {output_dir} failed (exit {done.returncode}); end of "
                             f"{log}:\n{tail}")
    return time.time() - started


def _reset_accelerate_state() -> None:
    """Forget accelerate's process-wide singletons so the next in-process run starts clean."""
    from accelerate.state import AcceleratorState, GradientState, PartialState

    AcceleratorState._reset_state(reset_partial_state=True)
    PartialState._reset_state()
    GradientState._reset_state()


def train_arms(experiment_dir: str | Path, arms: Sequence[ArmSpec], seeds: Sequence[int], *,
               model: str, corpus: str | Path, budget: Budget, launcher: str = "subprocess",
               jobs: int = 1, threads: int | None = None,
               log: Callable[[str], None] = print) -> list[RunRecord]:
    """Train every arm x seed that is not complete yet; return a record per run."""
    if launcher not in ("subprocess", "inprocess"):
        raise ValueError(f"launcher must be 'subprocess' or 'inprocess', got {launcher!r}")
    if launcher == "inprocess" and jobs > 1:
        raise ValueError("launcher 'inprocess' runs one training at a time; use jobs=1")
    tasks = []
    for seed in seeds:
        for arm in arms:
            out = run_dir(experiment_dir, arm.name, seed)
            argv = _train_argv(arm, seed, model=str(model), corpus=str(corpus), budget=budget,
                               output_dir=out)
            tasks.append((arm, seed, out, argv))

    def work(task: tuple) -> RunRecord:
        arm, seed, out, argv = task
        if _complete(out):
            log(f"reusing finished run {out}")
            return RunRecord(arm.name, seed, str(out), _recorded_wall_time(out))
        log(f"training arm {arm.name} seed {seed} -> {out}")
        wall = _run_one(argv, out, launcher, threads)
        log(f"arm {arm.name} seed {seed}: {wall:.0f} s")
        (out / "experiment_wall_time.json").write_text(json.dumps({"wall_time_s": wall}) + "\n")
        return RunRecord(arm.name, seed, str(out), wall)

    if jobs <= 1:
        return [work(t) for t in tasks]
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        return list(pool.map(work, tasks))


def _recorded_wall_time(path: Path) -> float | None:
    for name, key in (("experiment_wall_time.json", "wall_time_s"),):
        if (path / name).is_file():
            return float(json.loads((path / name).read_text())[key])
    report = json.loads((path / "report.json").read_text())
    return report.get("run", {}).get("wall_time_s")


def parse_run_argument(text: str) -> tuple[str, int, Path]:
    """`ARM:SEED=PATH` (e.g. `control:0=outputs/ft-control-0`) -> (arm, seed, path)."""
    head, sep, path = text.partition("=")
    arm, sep2, seed = head.partition(":")
    if not sep or not sep2 or not arm or not path:
        raise ValueError(f"--run expects ARM:SEED=PATH, got {text!r}")
    try:
        return arm.strip(), int(seed), Path(path.strip())
    except ValueError as err:
        raise ValueError(f"--run {text!r}: seed {seed!r} is not an integer") from err


def adopt_run(arm: str, seed: int, path: str | Path) -> RunRecord:
    """A finished train_accelerate.py run folder taken as arm x seed, after checking it is one."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"finished run for arm {arm!r} seed {seed}: {path} does not exist")
    if not _complete(path):
        raise FileNotFoundError(
            f"finished run for arm {arm!r} seed {seed}: {path} lacks report.json or "
            "model/config.json (not a complete train_accelerate.py output dir)")
    return RunRecord(arm, seed, str(path), _recorded_wall_time(path), adopted=True)


def check_runs(records: Sequence[RunRecord]) -> dict[str, dict[int, RunRecord]]:
    """Group records by arm and seed; the control must be there and every arm needs its seeds."""
    by_arm: dict[str, dict[int, RunRecord]] = {}
    for record in records:
        seeds = by_arm.setdefault(record.arm, {})
        if record.seed in seeds:
            raise ValueError(f"arm {record.arm!r} seed {record.seed} is given twice "
                             f"({seeds[record.seed].path} and {record.path})")
        seeds[record.seed] = record
    if CONTROL not in by_arm:
        raise ValueError(f"no run of the '{CONTROL}' arm among arms {sorted(by_arm)}: every arm "
                         "is compared against it")
    control_seeds = sorted(by_arm[CONTROL])
    for arm, seeds in by_arm.items():
        if sorted(seeds) != control_seeds:
            raise ValueError(f"arm {arm!r} has seeds {sorted(seeds)} but the control has "
                             f"{control_seeds}; paired seeds are required")
    return by_arm

