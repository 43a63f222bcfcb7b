"""`topoflow references`: the reference forecasts' scores on a corpus split, beside a model's.

    topoflow references --corpus DIR --split test [--model topoflow-base] [--json OUT]
        [--references-dir DIR]

Fits climatology and damped anomaly persistence on the training split (or loads them from
`--references-dir` when it holds them; a fresh fit is saved there), streams the split once, and
prints the test loss (normalized MSE over the valid region, all targets equally weighted, mean
over samples: what `topoflow experiment` reports) overall and per lead time for persistence,
climatology, damped persistence and the model if given, all on the same samples, then the fitted
damping factors. Without `--model`, the targets, lead times and normalization are the default
config's targets and leads with the corpus's training statistics. Scripts and other modules call
`score_references(corpus, split=..., model=...)`, which returns what the command prints.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

__all__ = ["build_parser", "format_table", "main", "score_references"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="topoflow references",
        description="Scores of persistence, climatology and damped anomaly persistence (and of a "
        "model) on one corpus split, on the same samples.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--corpus", default=None, help="corpus folder; default: the embedded corpus")
    p.add_argument("--split", default="test", help="split to score on")
    p.add_argument("--fit-split", default="train", help="split the references are fitted on")
    p.add_argument(
        "--model",
        default=None,
        help="also score this model (folder, short name "
        "or Hub id); its config fixes targets, leads and normalization",
    )
    p.add_argument(
        "--leads",
        type=int,
        nargs="+",
        default=None,
        help="lead times in hours (without --model; default: the default config's)",
    )
    p.add_argument(
        "--references-dir",
        default=None,
        help="load the fitted references from here, or save a fresh fit here",
    )
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument(
        "--init-stride",
        type=int,
        default=1,
        help="score every k-th initialization time only (all its leads)",
    )
    p.add_argument("--json", default=None, help="also write the scores to this JSON file")
    return p


def _resolve_corpus(corpus: str | os.PathLike | None) -> Path:
    if corpus is not None:
        if not (Path(corpus) / "topoflow_corpus.json").is_file():
            raise FileNotFoundError(f"--corpus {corpus}: no topoflow_corpus.json there")
        return Path(corpus)
    from topoflow.corpus import build_default_corpus

    return build_default_corpus()


def _contract(corpus: Path, leads: Sequence[int] | None) -> Any:
    """The data contract of the default config with the corpus's training statistics."""
    from configuration_topoflow import TopoFlowConfig
    from topoflow.corpus import CorpusMetadata

    meta = CorpusMetadata.load(corpus)
    default = TopoFlowConfig()
    variables = [v for v in default.variables if v in {*meta.variables, *meta.static_variables}]
    stats = meta.normalization
    return SimpleNamespace(
        variables=variables,
        target_variables=list(default.target_variables),
        lead_times_hours=list(leads or default.lead_times_hours),
        variable_mean={v: stats[v]["mean"] for v in stats},
        variable_std={v: stats[v]["std"] for v in stats},
        time_features=[],  # references read no calendar inputs
    )


def _references(corpus: Path, config: Any, folder: str | os.PathLike | None, fit_split: str) -> Any:
    from topoflow.references import CLIMATOLOGY_FILE, References

    if folder is not None and (Path(folder) / CLIMATOLOGY_FILE).is_file():
        refs = References.load(folder)
        if refs.climatology.target_variables != list(config.target_variables):
            raise ValueError(
                f"--references-dir {folder}: fitted for "
                f"{refs.climatology.target_variables}, not "
                f"{config.target_variables}"
            )
        return refs
    refs = References.fit(corpus, config.target_variables, config.lead_times_hours, split=fit_split)
    if folder is not None:
        refs.save(folder)
    return refs


def score_references(
    corpus: str | os.PathLike | None = None,
    *,
    split: str = "test",
    model: Any = None,
    leads: Sequence[int] | None = None,
    references_dir: str | os.PathLike | None = None,
    fit_split: str = "train",
    batch_size: int = 32,
    init_stride: int = 1,
) -> dict[str, Any]:
    """Test loss (overall, per lead), damping factors and ForecastMetrics scores of the three
    references and of `model` (a loaded TopoFlowForForecasting, or a folder / short name / Hub id
    to load) on the same samples of `split`; what the command prints, as a JSON-ready dict."""
    from topoflow.experiment.evaluate import evaluate_forecasters, test_loss_row

    corpus = _resolve_corpus(corpus)
    models: dict[str, Any] = {}
    if model is not None:
        if isinstance(model, str | os.PathLike):
            import topoflow  # noqa: F401  (registers the short-name resolver)
            from modeling_topoflow import TopoFlowForForecasting

            models[str(model)] = TopoFlowForForecasting.from_pretrained(str(model)).eval()
        else:
            models["model"] = model.eval()
        config = next(iter(models.values())).config
    else:
        config = _contract(corpus, leads)
    refs = _references(corpus, config, references_dir, fit_split)
    results = evaluate_forecasters(
        models,
        corpus,
        config=config,
        split=split,
        batch_size=batch_size,
        init_stride=init_stride,
        climatology=refs.climatology,
        damped_persistence=refs.damped_persistence,
        score_references=True,
    )
    lead_hours = list(config.lead_times_hours)
    factors = refs.damped_persistence.factors
    return {
        "corpus": str(corpus),
        "split": split,
        "fit_split": fit_split,
        "n_samples": len(next(iter(results.values())).per_sample.sample_ids),
        "test_loss": {name: test_loss_row(r.per_sample, lead_hours) for name, r in results.items()},
        "damping_factors": {
            var: {str(lead): float(factors[i, v]) for i, lead in enumerate(lead_hours)}
            for v, var in enumerate(config.target_variables)
        },
        "scores": {name: r.metrics for name, r in results.items()},
    }


def format_table(table: Mapping[str, Mapping[str, float]], first: str = "forecaster") -> str:
    """Plain-text table of rows x (all, each lead) numbers, e.g. forecaster x test loss."""
    columns = list(next(iter(table.values())))
    header = [first, *(c if c == "all" else f"{c} h" for c in columns)]
    rows = [[name, *(f"{row[c]:.4f}" for c in columns)] for name, row in table.items()]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    return "\n".join(
        "  ".join(
            cell.ljust(w) if i == 0 else cell.rjust(w)
            for i, (cell, w) in enumerate(zip(r, widths, strict=True))
        )
        for r in [header, *rows]
    )


def main(argv: Sequence[str] | None = None) -> int:
    from topoflow.corpus.schema import CorpusError

    args = build_parser().parse_args(argv)
    try:
        out = score_references(
            args.corpus,
            split=args.split,
            model=args.model,
            leads=args.leads,
            references_dir=args.references_dir,
            fit_split=args.fit_split,
            batch_size=args.batch_size,
            init_stride=args.init_stride,
        )
    except (ValueError, FileNotFoundError, KeyError, CorpusError) as err:
        print(f"topoflow references: error: {err}", file=sys.stderr)
        return 2
    print(
        f"test loss on {out['corpus']} split {out['split']!r} ({out['n_samples']} samples; "
        f"references fitted on {out['fit_split']!r}):"
    )
    print(format_table(out["test_loss"]))
    print("\ndamped persistence factors (pollutant x lead):")
    print(format_table(out["damping_factors"], first="pollutant"))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
        print(f"\nscores written to {args.json}")
    return 0
