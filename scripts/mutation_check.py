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


GUARDS = "tests/test_entry_point_guards.py"
ASYMMETRIC = "tests/test_asymmetric_fixtures.py"
INTEGRITY = "tests/test_integrity_entry_points.py"
REGIMES = "tests/test_attention_regimes.py"
BY_HAND = "tests/test_model_golden_by_hand.py"
ANOMALY = "tests/test_model_anomaly.py"
ORACLE = "tests/test_oracle_bias.py"
PER_HEAD = "tests/test_alpha_per_head.py"

# (name, file, original snippet, planted bug, pytest arguments: test files and -k selections)
MUTANTS: tuple[Mutant, ...] = (
    # Safety rules through the entry points.
    Mutant("trainer-drops-alpha-projection", "train_accelerate.py",
           "accelerator.unwrap_model(model).project_elevation_alpha_()", "pass",
           (GUARDS, "-k", "pushes_it_below")),
    Mutant("report-ignores-mismatched", "topoflow/training/model_setup.py",
           "problems = report.missing_other + report.mismatched",
           "problems = report.missing_other", (GUARDS, "-k", "loading")),
    Mutant("report-ignores-missing", "topoflow/training/model_setup.py",
           "problems = report.missing_other + report.mismatched",
           "problems = report.mismatched", (GUARDS, "-k", "refuses")),
    Mutant("trainable-never-freezes", "topoflow/training/model_setup.py",
           "param.requires_grad_(name in keep)",
           "param.requires_grad_(name in keep or param.requires_grad)",
           (GUARDS, "-k", "trainable")),
    # Masking and weighting.
    Mutant("loss-mean-of-sample-means", "modeling_topoflow.py",
           "loss = squared.sum() / total if total > 0",
           "loss = per_sample.nanmean() if total > 0", (ASYMMETRIC,)),
    Mutant("region-mean-of-cell-rmse", "topoflow/regions.py",
           "rmse_c = float(np.sqrt(c_sq[v][inside].sum() / n)) if n > 0 else None",
           "rmse_c = float(np.mean(np.sqrt(c_sq[v][inside] / c_n[v][inside]))) if n > 0 "
           "else None", (ASYMMETRIC,)),
    Mutant("skill-on-all-model-cells", "topoflow/metrics.py",
           "model_sq = torch.where(valid, model_err, zero).pow(2).sum((2, 3))",
           "model_sq = model_err.pow(2).sum((2, 3))", (ASYMMETRIC,)),
    # Kernels where the clamp, ties and directions act.
    Mutant("flex-drops-clamp", "attention_topoflow.py",
           "return score + torch.clamp(bias, min=-clamp_max, max=0.0)",
           "return score + bias", (REGIMES, "-k", "flex")),
    Mutant("clamp-check-always-inactive", "attention_topoflow.py",
           "return alpha_value * height_range / h_value <= clamp_max", "return True",
           (REGIMES, "-k", "sdpa")),
    Mutant("bias-drops-lower-clamp", "attention_topoflow.py",
           "return torch.clamp(-alpha * torch.relu(rise), min=-clamp_max, max=0.0)",
           "return torch.clamp(-alpha * torch.relu(rise), max=0.0)",
           (BY_HAND,)),
    Mutant("bias-query-key-swapped", "attention_topoflow.py",
           "rise = key_elevation_m.to(dtype)[:, None, :] - query_elevation_m.to(dtype)[:, :, None]",
           "rise = query_elevation_m.to(dtype)[:, :, None] - key_elevation_m.to(dtype)[:, None, :]",
           (BY_HAND,)),
    Mutant("upslope-not-negated", "attention_topoflow.py",
           "return -elevation_m", "return elevation_m", (BY_HAND,)),
    # Statistics.
    Mutant("bootstrap-last-start", "topoflow/stats.py",
           "rng.integers(0, n_times - block_length + 1,",
           "rng.integers(0, n_times - block_length,",
           ("tests/test_stats_known_answers.py",)),
    Mutant("bootstrap-mean-of-init-means", "topoflow/stats.py",
           "mean_reduction=float(reduction.sum() / count.sum()),",
           "mean_reduction=float((reduction / count).mean()),",
           ("tests/test_stats_known_answers.py", "-k", "weigh")),
    # Integrity guards.
    Mutant("manifest-allows-escaping-paths", "modeling_topoflow.py",
           'if malformed or name.startswith("/") or ".." in Path(name).parts:', "if malformed:",
           (INTEGRITY, "-k", "outside")),
    Mutant("manifest-hashes-weights-only", "modeling_topoflow.py",
           "elif sha256_file(path) != digest:",
           'elif path.suffix == ".safetensors" and sha256_file(path) != digest:',
           (INTEGRITY, "-k", "damaged")),
    Mutant("manifest-ignores-unlisted-files", "modeling_topoflow.py",
           "if rel.suffix in COVERED_SUFFIXES and rel.as_posix() not in expected:", "if False:",
           (INTEGRITY, "-k", "damaged")),
    Mutant("model-skips-local-manifest", "modeling_topoflow.py",
           "            verify_manifest(name_or_path)\n        else:",
           "            pass\n        else:", (INTEGRITY, "-k", "damaged")),
    Mutant("local-folder-not-verified", "topoflow/hub.py",
           "verify_model_folder(path, require_manifest=False)", "pass",
           (INTEGRITY, "-k", "damaged")),
    # The anomaly head (issue 12): the climatology at the wrong moment, the missing-buffer guard.
    Mutant("anomaly-clim-at-init-for-valid", "modeling_topoflow.py",
           'clim_valid = self.climatology(time_features, "valid")',
           'clim_valid = self.climatology(time_features, "init")', (ANOMALY,)),
    Mutant("anomaly-missing-climatology-loads", "modeling_topoflow.py",
           'if any(key.startswith("climatology.") for key in info["missing_keys"]):',
           'if False:', (ANOMALY,)),
    # The oracle arm and per-head alpha (issue 14): the path read as its endpoints, one grid axis
    # misplaced, the bias dropped from the fast path, the heads sharing one alpha.
    Mutant("oracle-net-rise-not-ascent", "attention_topoflow.py",
           "climb = torch.relu(profile.diff(dim=-1)).sum(dim=-1)",
           "climb = torch.relu(profile[..., -1] - profile[..., 0])", (ORACLE,)),
    Mutant("oracle-centre-off-by-half-cell", "attention_topoflow.py",
           "centre = (torch.arange(cols, dtype=torch.float32) + 0.5) * patch_size - 0.5",
           "centre = (torch.arange(cols, dtype=torch.float32) + 0.5) * patch_size", (ORACLE,)),
    Mutant("oracle-sdpa-drops-bias", "attention_topoflow.py",
           "attn_mask=bias.to(query.dtype),", "attn_mask=None,", (ORACLE,)),
    Mutant("per-head-alpha-shared", "attention_topoflow.py",
           "alpha = alpha.to(dtype).reshape(1, -1, 1, 1)",
           "alpha = alpha.to(dtype).mean().reshape(1, 1, 1, 1)", (PER_HEAD,)),
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
