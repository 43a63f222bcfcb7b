"""`python -m topoflow.experiment`: train (or adopt) arms x seeds, evaluate, write the report.

    python -m topoflow.experiment --output-dir outputs/experiment-positive \\
        --model topoflow-base --arms control topoflow --seeds 0 1 2 --max-steps 300
    python -m topoflow.experiment --output-dir outputs/exp --run control:0=runs/c0 \\
        --run topoflow:0=runs/t0        # finished runs, no training

See docs/experiment.md for every option and what the report contains.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from topoflow.seed_stats import DEFAULT_MARGIN

from .arms import KNOWN_ARMS, ArmSpec, parse_arm, parse_arms
from .evaluate import evaluate_forecasters, evaluate_models, load_evaluation
from .runner import Budget, RunRecord, adopt_run, check_runs, parse_run_argument, train_arms
from .subset import make_corpus_view

__all__ = ["build_parser", "main", "run_experiment"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m topoflow.experiment",
        description="Controlled experiment: arms fine-tuned from one baseline with one budget, "
                    "compared with the control on paired per-sample losses.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--output-dir", required=True, help="experiment folder")
    p.add_argument("--title", default="does the elevation bias help?")
    g = p.add_argument_group("what to compare")
    g.add_argument("--model", default="topoflow-base", help="baseline checkpoint every arm "
                   "fine-tunes (folder, short name or Hub id)")
    g.add_argument("--arms", nargs="+", default=None,
                   help=f"arm names ({', '.join(KNOWN_ARMS)}) or specs "
                        "'name:blocks=0,1;scale=500;alpha=2;trainable=all' (default: control "
                        "topoflow; with --run, the arms of the runs given)")
    g.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    g.add_argument("--run", action="append", default=[], metavar="ARM:SEED=PATH",
                   help="a finished train_accelerate.py run to use instead of training "
                        "(repeat for every arm x seed); --arms/--seeds are then ignored")
    g = p.add_argument_group("data")
    g.add_argument("--corpus", default=None, help="corpus folder; default: the embedded corpus")
    g.add_argument("--corpus-size", default="default")
    g.add_argument("--terrain-blocking", type=float, default=1.0,
                   help="embedded corpus only: 1 = terrain blocks upslope transport, 0 = no effect")
    g.add_argument("--val-shards", type=int, default=0,
                   help="train on a view of the corpus whose validation split keeps this many "
                        "shards, spread over the year (0: all); bounds the validation cost")
    g = p.add_argument_group("budget (identical for every arm)")
    g.add_argument("--max-steps", type=int, default=100)
    g.add_argument("--batch-size", type=int, default=8)
    g.add_argument("--learning-rate", type=float, default=3e-4)
    g.add_argument("--eval-every", type=int, default=25)
    g.add_argument("--eval-batches", type=int, default=4)
    g.add_argument("--train-arg", action="append", default=[], metavar="ARG",
                   help="extra train_accelerate.py argument for every arm, e.g. "
                        "--train-arg=--warmup-steps=10")
    g = p.add_argument_group("execution")
    g.add_argument("--launcher", choices=("subprocess", "inprocess"), default="subprocess")
    g.add_argument("--jobs", type=int, default=1, help="runs trained at the same time")
    g.add_argument("--threads", type=int, default=None, help="torch threads per subprocess run")
    g = p.add_argument_group("evaluation")
    g.add_argument("--eval-split", default="test")
    g.add_argument("--eval-init-stride", type=int, default=1,
                   help="score every k-th initialization time only (all its leads)")
    g.add_argument("--eval-batch-size", type=int, default=32)
    g.add_argument("--no-climatology", action="store_true",
                   help="skip the climatology and damped persistence references (they read the "
                        "whole training split); persistence is always scored")
    g.add_argument("--n-boot", type=int, default=2000, help="bootstrap resamples")
    g = p.add_argument_group("verdict (training seed as the unit; docs/experiment.md)")
    g.add_argument("--margin", type=_fraction("--margin"), default=DEFAULT_MARGIN,
                   help="equivalence margin as a fraction of the control's test loss "
                        "(0.01: arms within +/-1%% are equivalent)")
    g.add_argument("--target-mde", type=_fraction("--target-mde"), default=None,
                   help="minimum detectable effect (fraction of the loss) for which the report "
                        "says how many seeds are needed; default: the margin")
    g.add_argument("--versus", action="append", default=[], metavar="ARM:REFERENCE",
                   help="also judge ARM against another arm REFERENCE at seed level (repeat), "
                        "e.g. upslope:placebo for the terrain-worlds protocol")
    g.add_argument("--pilot", action="store_true",
                   help="pilot: run --seeds, then print per arm how many seeds reach "
                        "--target-mde at 80%% power; the report is marked as a pilot")
    return p


def _fraction(flag: str) -> Any:
    """argparse type for a fraction of the loss in (0, 1), naming the flag when it is not."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{flag} must be a number, got {text!r}") from None
        if not 0 < value < 1:
            raise argparse.ArgumentTypeError(
                f"{flag} is a fraction of the loss in (0, 1) (0.01 = 1%), got {text}")
        return value

    return parse


def _resolve_corpus(args: argparse.Namespace) -> Path:
    if args.corpus is not None:
        corpus = Path(args.corpus)
        if not (corpus / "topoflow_corpus.json").is_file():
            raise FileNotFoundError(f"--corpus {corpus}: no topoflow_corpus.json there")
        return corpus
    from topoflow.corpus import build_default_corpus

    return build_default_corpus(size=args.corpus_size, terrain_blocking=args.terrain_blocking)


def _adopted_runs(texts: Sequence[str]
                  ) -> tuple[list[RunRecord], dict[str, float], dict[str, str]]:
    records, h_scales, directions = [], {}, {}
    for text in texts:
        arm, seed, path = parse_run_argument(text)
        records.append(adopt_run(arm, seed, path))
        config = json.loads((Path(path) / "model" / "config.json").read_text())
        h_scales[arm] = float(config.get("elevation_scale", 1000.0))
        directions[arm] = config.get("elevation_bias_direction", "downslope")
    return records, h_scales, directions


def _evaluate(out: Path, records: Sequence[RunRecord], corpus: Path, args: argparse.Namespace,
              log: Any) -> tuple[dict[str, dict[int, Any]], dict[str, Any]]:
    """Score every run and the reference forecasts (one pass over the split for all of them)
    unless already scored; returns ({arm: {seed: result}}, {reference: result})."""
    from configuration_topoflow import TopoFlowConfig
    from topoflow.metrics import REFERENCE_NAMES
    from topoflow.references import References

    fitted = not args.no_climatology
    spec = {"corpus": str(corpus), "split": args.eval_split, "init_stride": args.eval_init_stride,
            "climatology": fitted, "damped_persistence": fitted}
    folders = {(r.arm, r.seed): out / "eval" / r.arm / f"seed{r.seed}" for r in records}
    ref_folders = {name: out / "eval" / "references" / name for name in REFERENCE_NAMES
                   if fitted or name == "persistence"}

    def done(folder: Path, model: str) -> bool:
        metrics = folder / "metrics.json"
        if not metrics.is_file():
            return False
        evaluated = json.loads(metrics.read_text())["evaluated"]
        return {k: evaluated.get(k) for k in spec} == spec and evaluated["model"] == model

    todo = {f"{r.arm}/seed{r.seed}": Path(r.path) / "model" for r in records
            if not done(folders[(r.arm, r.seed)], str(Path(r.path) / "model"))}
    ref_todo = not all(done(f, f"reference: {n}") for n, f in ref_folders.items())
    if todo or ref_todo:
        config = TopoFlowConfig.from_pretrained(str(Path(records[0].path) / "model"))
        refs = None
        if fitted:
            log("fitting climatology and damped persistence on the training split")
            refs = References.fit(corpus, config.target_variables, config.lead_times_hours)
        kwargs = {"split": args.eval_split, "batch_size": args.eval_batch_size,
                  "init_stride": args.eval_init_stride, "score_references": ref_todo,
                  "climatology": refs.climatology if refs else None,
                  "damped_persistence": refs.damped_persistence if refs else None}
        started = time.time()
        log(f"evaluating {len(todo)} models{' and the references' if ref_todo else ''} on "
            f"{args.eval_split} (stride {args.eval_init_stride})")
        if todo:
            results = evaluate_models(todo, corpus, **kwargs)
        else:
            results = evaluate_forecasters({}, corpus, config=config, **kwargs)
        log(f"evaluation took {time.time() - started:.0f} s")
        for key, result in results.items():
            if key in ref_folders:
                result.save(ref_folders[key])
                continue
            arm, seed = key.split("/seed")
            result.save(folders[(arm, int(seed))])
    evals: dict[str, dict[int, Any]] = {}
    for (arm, seed), folder in folders.items():
        evals.setdefault(arm, {})[seed] = load_evaluation(folder)
    return evals, {name: load_evaluation(folder) for name, folder in ref_folders.items()}


def _parse_versus(texts: Sequence[str], evals: dict) -> list[tuple[str, str]]:
    """`ARM:REFERENCE` pairs, both arms evaluated; ValueError naming the one that is not."""
    pairs = []
    for text in texts:
        arm, sep, reference = text.partition(":")
        if not sep or not arm or not reference or arm == reference:
            raise ValueError(f"--versus expects ARM:REFERENCE of two different arms, got {text!r}")
        unknown = [name for name in (arm, reference) if name not in evals]
        if unknown:
            raise ValueError(f"--versus {text}: arms {unknown} were not run (arms: "
                             f"{sorted(evals)})")
        pairs.append((arm, reference))
    return pairs


def _log(message: str) -> None:
    print(message, flush=True)  # progress must reach a redirected log while runs go on


def run_experiment(args: argparse.Namespace, log: Any = _log) -> dict:
    """The whole experiment; returns report.json's content."""
    from modeling_topoflow import TopoFlowForForecasting  # noqa: F401  (fails early if missing)

    from .report import CorpusContext, write_report

    out = Path(args.output_dir)
    corpus = _resolve_corpus(args)
    plan: dict[str, Any] = {"title": args.title, "corpus": str(corpus), "pilot": args.pilot,
                            "margin": args.margin, "target_mde": args.target_mde or args.margin}
    if args.run:
        records, h_scales, directions = _adopted_runs(args.run)
        plan["baseline"] = "finished runs given with --run"
        # With --run nothing is trained: an arm asked for without a run would silently vanish.
        without_run = sorted({parse_arm(t).name for t in args.arms or []} - set(h_scales))
        if without_run:
            raise ValueError(f"--arms {without_run}: no --run given for them; with --run the "
                             f"experiment trains nothing and only scores the runs given")
    else:
        arms: list[ArmSpec] = parse_arms(args.arms or ["control", "topoflow"])
        h_scales = {a.name: a.elevation_scale for a in arms}
        directions = {a.name: a.direction for a in arms}
        train_corpus = corpus
        if args.val_shards:
            train_corpus = make_corpus_view(corpus, out / "corpus-view",
                                            {"validation": args.val_shards})
            plan["training_corpus"] = f"{train_corpus} (validation split: {args.val_shards} "\
                                      "shard(s) of the corpus)"
        budget = Budget(args.max_steps, args.batch_size, args.learning_rate, args.eval_every,
                        args.eval_batches, list(args.train_arg))
        plan.update(baseline=args.model, budget=vars(budget),
                    arms={a.name: {**a.recipe(), "description": a.description} for a in arms})
        out.mkdir(parents=True, exist_ok=True)
        (out / "experiment.json").write_text(json.dumps(plan, indent=2) + "\n")
        records = train_arms(out, arms, args.seeds, model=args.model, corpus=train_corpus,
                             budget=budget, launcher=args.launcher, jobs=args.jobs,
                             threads=args.threads, log=log)
    check_runs(records)
    ctx = CorpusContext(corpus, split=args.eval_split)
    plan["corpus_provenance"] = {k: ctx.meta.provenance.get(k)
                                 for k in ("source", "size", "seed", "terrain_blocking")}
    plan["eval"] = {"split": args.eval_split, "init_stride": args.eval_init_stride,
                    "climatology": not args.no_climatology,
                    "damped_persistence": not args.no_climatology}
    evals, references = _evaluate(out, records, corpus, args, log)
    from configuration_topoflow import TopoFlowConfig

    config = TopoFlowConfig.from_pretrained(str(Path(records[0].path) / "model"))
    first = next(iter(next(iter(evals.values())).values()))
    plan["eval"]["n_samples"] = first.metrics["evaluated"]["n_samples"]
    report = write_report(out / "report", plan=plan, records=records, evals=evals,
                          config=config, ctx=ctx, h_scales=h_scales, n_boot=args.n_boot,
                          directions=directions, references=references, margin=args.margin,
                          target_mde=args.target_mde, versus=_parse_versus(args.versus, evals))
    log(f"report written to {out / 'report' / 'report.md'}")
    return report


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        report = run_experiment(args)
    except (ValueError, FileNotFoundError, FileExistsError, RuntimeError) as err:
        print(f"python -m topoflow.experiment: error: {err}", file=sys.stderr)
        return 2
    for comparison in [*report["comparisons"].values(), *report["versus"].values()]:
        if args.pilot:
            print(f"pilot: {comparison['pilot_summary']}")
        else:
            print(comparison["verdict"]["text"])
    return 0
