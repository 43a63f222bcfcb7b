"""Plant realistic bugs one at a time in a temporary copy of the repository and run the tests.

    python scripts/mutation_check.py            # every mutant
    python scripts/mutation_check.py --only bootstrap-last-start flex-no-clamp

Each mutant replaces one exact snippet of one file (it must occur exactly once, so a refactor
that moves the code makes the script fail loudly instead of planting nothing), then runs only the
test files listed with it. A mutant is caught when those tests fail. The working tree is never
touched: the repository's files (tracked and untracked, not ignored) are copied to a temporary
folder first, and every mutant is reverted there before the next. Prints caught / planted.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]

__all__ = ["MUTANTS", "Mutant", "main"]


@dataclass(frozen=True)
class Mutant:
    name: str
    path: str
    original: str
    mutated: str
    tests: tuple[str, ...]


MUTANTS: tuple[Mutant, ...] = (
    Mutant("bootstrap-last-start", "topoflow/stats.py",
           "rng.integers(0, n_times - block_length + 1,",
           "rng.integers(0, n_times - block_length,",
           ("tests/test_stats_known_answers.py",)),
)


def _copy_repository(destination: Path) -> None:
    """Tracked and untracked-but-not-ignored files, as the working tree has them now."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO_ROOT, check=True, capture_output=True).stdout.decode().split("\0")
    for relative in filter(None, listed):
        source = REPO_ROOT / relative
        if not source.is_file():
            continue  # deleted in the working tree but still in the index
        target = destination / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, target)


def _run_mutant(copy: Path, mutant: Mutant, timeout_s: float) -> tuple[bool, float, str]:
    """(caught, seconds, last lines of the pytest output) for one mutant planted in `copy`."""
    target = copy / mutant.path
    original_text = target.read_text()
    occurrences = original_text.count(mutant.original)
    if occurrences != 1:
        raise SystemExit(f"mutant {mutant.name}: the snippet occurs {occurrences} times in "
                         f"{mutant.path} (expected exactly once); update MUTANTS")
    target.write_text(original_text.replace(mutant.original, mutant.mutated))
    env = {**os.environ, "PYTHONPATH": str(copy), "OMP_NUM_THREADS": "1",
           "PYTHONDONTWRITEBYTECODE": "1"}
    start = time.perf_counter()
    try:
        done = subprocess.run(
            [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *mutant.tests],
            cwd=copy, env=env, capture_output=True, text=True, timeout=timeout_s)
        caught, output = done.returncode != 0, done.stdout + done.stderr
    except subprocess.TimeoutExpired:
        caught, output = True, f"timed out after {timeout_s} s (counted as caught)"
    finally:
        target.write_text(original_text)
    tail = "\n".join(output.strip().splitlines()[-3:])
    return caught, time.perf_counter() - start, tail


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", default=None, help="mutant names to run")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per mutant")
    args = parser.parse_args(argv)
    names = {mutant.name for mutant in MUTANTS}
    unknown = sorted(set(args.only or ()) - names)
    if unknown:
        parser.error(f"--only: unknown mutants {unknown}; known: {sorted(names)}")
    chosen = [m for m in MUTANTS if args.only is None or m.name in args.only]
    caught_count = 0
    with tempfile.TemporaryDirectory(prefix="topoflow-mutants-") as folder:
        copy = Path(folder)
        _copy_repository(copy)
        for mutant in chosen:
            caught, seconds, tail = _run_mutant(copy, mutant, args.timeout)
            caught_count += caught
            status = "caught" if caught else "MISSED"
            print(f"{status:6s} {mutant.name:32s} {seconds:6.1f} s  {mutant.path}", flush=True)
            if not caught:
                print("       " + tail.replace("\n", "\n       "), flush=True)
    print(f"{caught_count} / {len(chosen)} mutants caught")
    return 0 if caught_count == len(chosen) else 1


if __name__ == "__main__":
    sys.exit(main())
