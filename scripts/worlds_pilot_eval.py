"""Score terrain-worlds pilot runs on the test worlds and pair them by seed.

Until `topoflow experiment`'s report reads per-sample elevation (its elevation bands and bias
panels take the corpus's static elevation, which the worlds do not have), this scores finished
`train_accelerate.py` runs named `<arm>-s<seed>` with the experiment's own evaluator (persistence
and training-split climatology skill) and prints each arm's per-seed paired difference with the
control and with the placebo (positive = the arm has the lower test loss).

    python scripts/worlds_pilot_eval.py CORPUS RUNS_DIR   # RUNS_DIR/<arm>-s<seed>/model
"""

from __future__ import annotations

import argparse
import json
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from topoflow.corpus.schema import POLLUTANTS
from topoflow.experiment.evaluate import build_climatology, evaluate_models

__all__ = ["main"]

_RUN = re.compile(r"^(?P<arm>.+)-s(?P<seed>\d+)$")


def main(argv: Sequence[str] | None = None) -> dict[str, dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("corpus", type=Path)
    parser.add_argument("runs", type=Path)
    parser.add_argument("--split", default="test")
    args = parser.parse_args(argv)
    models = {p.parent.name: p for p in sorted(args.runs.glob("*/model"))
              if _RUN.match(p.parent.name)}  # fmt: skip
    if not models:
        raise FileNotFoundError(f"{args.runs}: no <arm>-s<seed>/model folder")
    climatology = build_climatology(args.corpus, list(POLLUTANTS))
    results = evaluate_models(models, args.corpus, split=args.split, climatology=climatology)
    table: dict[str, dict] = {}
    for name, result in results.items():
        rows = result.per_sample
        scores = result.metrics["variables"]
        table[name] = {
            "loss": float((rows.sq_err_sum.sum(1) / rows.count.sum(1)).mean()),
            **{f"skill_{ref}": {v: scores[v]["all"][f"skill_{ref}"] for v in POLLUTANTS}
               for ref in ("persistence", "climatology")},
        }  # fmt: skip
        print(f"{name:24s} loss {table[name]['loss']:.5f}  skill vs persistence "
              + " ".join(f"{v} {s:+.2f}" for v, s in table[name]["skill_persistence"].items()))
    _print_pairs(table)
    (args.runs / f"pilot_eval_{args.split}.json").write_text(json.dumps(table, indent=1))
    return table


def _print_pairs(table: dict[str, dict]) -> None:
    loss: dict[str, dict[int, float]] = {}
    for name, row in table.items():
        match = _RUN.match(name)
        loss.setdefault(match["arm"], {})[int(match["seed"])] = row["loss"]
    for arm in sorted(loss):
        for reference in ("control", "placebo"):
            if arm == reference or reference not in loss:
                continue
            seeds = sorted(set(loss[arm]) & set(loss[reference]))
            diff = np.array([loss[reference][s] - loss[arm][s] for s in seeds])
            if diff.size:
                relative = diff / np.array([loss[reference][s] for s in seeds])
                print(f"{arm} vs {reference}: per-seed gain {np.round(diff, 5).tolist()} "
                      f"({np.round(100 * relative, 2).tolist()} %)")


if __name__ == "__main__":
    main()
