"""Turn a training run's output folder into a Hub-ready model folder, and push it.

    python -m topoflow.export RUN_DIR --out EXPORT_DIR --repo-id org/name [--private]
        [--revision BRANCH] [--create-pr] [--dry-run]

The exported folder holds config.json, the safetensors weights, the Hub files
(attention_topoflow.py, configuration_topoflow.py, modeling_topoflow.py), a README.md model card
rendered from the run's report.json and val_loss.csv, the val-loss plot, the run's report as
training_report.json, and a SHA256SUMS manifest. Weights with NaN/Inf and pickle files are refused
before anything is written. With --dry-run nothing leaves the machine; otherwise the folder is
uploaded with huggingface_hub.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from huggingface_hub import CommitInfo, HfApi
from safetensors import safe_open

from topoflow.hub import PACKAGED_MODELS_DIR
from topoflow.model_card import (
    find_metrics_block,
    load_report,
    read_val_loss_csv,
    render_model_card,
)
from topoflow.safety import (
    ManifestError,
    read_manifest,
    sha256_file,
    verify_model_folder,
    write_manifest,
)

__all__ = [
    "HUB_FILES",
    "find_model_dir",
    "find_val_loss_plot",
    "count_weight_elements",
    "regenerate_command",
    "score_model",
    "RECIPE_KEYS",
    "export_run",
    "push_folder",
    "main",
]

# modeling_topoflow.py imports attention_topoflow.py relatively: remote code needs all three.
HUB_FILES = ("attention_topoflow.py", "configuration_topoflow.py", "modeling_topoflow.py")
RUN_INFO = "run_info.json"
# train_accelerate.py arguments that make up the recipe shown on the card.
RECIPE_KEYS = (
    "from_scratch",
    "config",
    "model",
    "revision",
    "corpus",
    "corpus_size",
    "train_split",
    "batch_size",
    "gradient_accumulation_steps",
    "learning_rate",
    "weight_decay",
    "warmup_steps",
    "max_grad_norm",
    "epochs",
    "max_steps",
    "mixed_precision",
    "attn_implementation",
)
# Arguments about where and how verbosely a run writes, not about what it computes.
_NOT_REPRODUCED = (
    "output_dir",
    "overwrite",
    "report_to",
    "no_progress_bar",
    "debug_log_sample_ids",
    "resume_from_checkpoint",
    "stop_after_steps",
)
_PREFERRED_MODEL_DIRS = ("final_model", "model", "final")


def _is_model_dir(path: Path) -> bool:
    return (path / "config.json").is_file() and any(path.glob("*.safetensors"))


def find_model_dir(run_dir: str | os.PathLike) -> Path:
    """The saved model folder of a run: the run folder itself, or its one child folder (outside
    checkpoints/) holding config.json and safetensors weights."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run output folder {run_dir} does not exist")
    if _is_model_dir(run_dir):
        return run_dir
    candidates = sorted(
        child
        for child in run_dir.iterdir()
        if child.is_dir() and child.name != "checkpoints" and _is_model_dir(child)
    )
    for name in _PREFERRED_MODEL_DIRS:
        if run_dir / name in candidates:
            return run_dir / name
    if len(candidates) != 1:
        found = [c.name for c in candidates]
        raise FileNotFoundError(
            f"run output folder {run_dir}: expected one model folder "
            "(config.json + *.safetensors), "
            f"found {found or 'none'}; pass --model-dir"
        )
    return candidates[0]


def find_val_loss_plot(run_dir: Path) -> Path | None:
    """The run's val-loss PNG: val_loss.png, else the one PNG whose name mentions val and loss."""
    if (run_dir / "val_loss.png").is_file():
        return run_dir / "val_loss.png"
    pngs = sorted(p for p in run_dir.glob("*.png") if "val" in p.name and "loss" in p.name)
    return pngs[0] if pngs else None


def count_weight_elements(model_dir: Path) -> int:
    """Number of stored tensor elements (parameters and persistent buffers), read from the
    safetensors headers only."""
    total = 0
    for path in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as handle:
            for name in handle.keys():  # noqa: SIM118 (safe_open is not a Mapping)
                shape = handle.get_slice(name).get_shape()
                count = 1
                for dim in shape:
                    count *= dim
                total += count
    return total


def regenerate_command(run_args: Mapping[str, Any], world_size: int = 1) -> str:
    """The train_accelerate.py command line that reproduces a run from its recorded arguments
    (run_info.json "args"): every argument that differs from the parser default, so
    `parse_args` of it gives back the recorded values (tests hold this)."""
    from topoflow.training.args import build_parser

    parser = build_parser()
    defaults = vars(parser.parse_args([]))
    options = {action.dest: action for action in parser._actions if action.option_strings}
    tokens: list[str] = []
    for dest, value in run_args.items():
        if dest in _NOT_REPRODUCED or dest not in options or value == defaults.get(dest):
            continue
        flag = options[dest].option_strings[-1]
        if isinstance(value, bool):
            tokens += [flag] if value else []
        elif isinstance(value, list | tuple):
            tokens += [flag, ",".join(str(v) for v in value) or "none"]
        elif value is not None:
            tokens += [flag, repr(value) if isinstance(value, float) else str(value)]
    launch = ["accelerate", "launch"]
    if world_size > 1:
        launch += ["--num_processes", str(world_size)]
    return shlex.join([*launch, "train_accelerate.py", *tokens, "--output-dir", "RUN"])


def score_model(
    model_dir: str | os.PathLike,
    corpus: str | os.PathLike,
    split: str = "validation",
    *,
    batch_size: int = 8,
    fit_split: str = "train",
) -> dict[str, Any]:
    """ForecastMetrics.compute() of the saved model on a corpus split, for runs whose report.json
    carries no per-pollutant scores: skill against persistence, and against climatology and
    damped persistence fitted on `fit_split`, plus a `test_loss` table of the model and the three
    references on the same samples. Every sample of the split is scored once, in stream order,
    in a single process."""
    from modeling_topoflow import TopoFlowForForecasting
    from topoflow.experiment.evaluate import evaluate_forecasters, test_loss_row
    from topoflow.references import References

    model = TopoFlowForForecasting.from_pretrained(model_dir).eval()
    config = model.config
    refs = References.fit(corpus, config.target_variables, config.lead_times_hours, split=fit_split)
    results = evaluate_forecasters(
        {"model": model},
        corpus,
        config=config,
        split=split,
        batch_size=batch_size,
        climatology=refs.climatology,
        damped_persistence=refs.damped_persistence,
        score_references=True,
    )
    metrics = {k: v for k, v in results["model"].metrics.items() if k != "evaluated"}
    metrics["units"] = {v: (config.variable_units or {}).get(v) for v in config.target_variables}
    metrics["test_loss"] = {
        name: test_loss_row(result.per_sample, config.lead_times_hours)
        for name, result in results.items()
    }
    # Through JSON so the card and training_report.json hold the very same Python floats.
    return json.loads(json.dumps(metrics))


def _dataset_fields(
    config: Mapping[str, Any],
    dataset_id: str | None,
    dataset_name: str | None,
    synthetic: bool | None,
) -> dict[str, Any]:
    """Card dataset fields; unset ones come from the corpus description in config.json. A corpus
    counts as synthetic when its provenance names the embedded generator (the rule of the
    dataset card, topoflow/corpus/card.py), or when config.json does not say."""
    corpus = config.get("corpus") or {}
    source = str((corpus.get("provenance") or {}).get("source", "embedded generator"))
    if synthetic is None:
        synthetic = "embedded generator" in source
    name = corpus.get("name") or "topoflow-embedded-default"
    kind = "synthetic, embedded generator" if synthetic else source
    return {
        "dataset_id": dataset_id or name,
        "dataset_name": dataset_name or f"TopoFlow corpus {name} ({kind})",
        "synthetic": synthetic,
    }


def _read_run_info(run_dir: Path) -> dict[str, Any]:
    path = run_dir / RUN_INFO
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _check_model_dir(model_dir: Path) -> dict:
    # The run's SHA256SUMS is checked first: a fresh manifest written over corrupted weights
    # would make them look intact to everyone who loads the export.
    verify_model_folder(model_dir, require_manifest=True)
    config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    if not config.get("auto_map"):
        raise ValueError(
            f"{model_dir / 'config.json'} has no auto_map: the folder would not load with "
            "trust_remote_code (save the model with TopoFlowForForecasting.save_pretrained)"
        )
    missing = [name for name in HUB_FILES if not (model_dir / name).is_file()]
    if missing:
        raise FileNotFoundError(f"model folder {model_dir} lacks the Hub files {missing}")
    return config


def _copy_model_files(model_dir: Path, staging: Path, *, hub_code: bool = True) -> None:
    """Weights and config; with `hub_code`, every Python module save_pretrained wrote (the Hub
    files and any module they import relatively)."""
    for path in sorted(model_dir.iterdir()):
        wanted = path.suffix == ".safetensors" or path.name == "config.json"
        wanted = wanted or (hub_code and path.suffix == ".py")
        if path.name == "model.safetensors.index.json":
            wanted = True
        if path.is_file() and wanted:
            shutil.copy2(path, staging / path.name)


def _check_replaceable_export(out_dir: Path) -> None:
    """--overwrite replaces an earlier export only: a folder whose every file is listed in its
    SHA256SUMS or is one of the export's documentation files. Anything else is the user's."""
    if not out_dir.is_dir() or not (out_dir / "SHA256SUMS").is_file():
        raise FileExistsError(
            f"--out {out_dir} exists and is not an earlier export (no SHA256SUMS); refusing to "
            "replace it: choose another folder"
        )
    listed = set(read_manifest(out_dir))
    documentation = {"SHA256SUMS", "README.md", "val_loss.csv"}
    foreign = [
        rel for rel in (p.relative_to(out_dir).as_posix() for p in sorted(out_dir.rglob("*")))
        if rel not in listed and rel not in documentation and not rel.endswith(".png")
    ]  # fmt: skip
    if foreign:
        raise FileExistsError(
            f"--out {out_dir} holds files no export wrote ({foreign[:5]}); refusing to replace "
            "it: move them out or choose another folder"
        )


def _check_copies(model_dir: Path, staging: Path) -> None:
    """The staged copies must still match the run's manifest (a file could change between the
    check and the copy)."""
    expected = read_manifest(model_dir)
    copied = {p.name for p in staging.iterdir() if p.suffix in (".safetensors", ".py")}
    copied |= {"config.json"}
    for name in sorted(copied):
        if name not in expected or sha256_file(staging / name) != expected[name]:
            raise ManifestError(
                f"{model_dir / name} changed while it was exported (sha256 no longer matches "
                f"{model_dir / 'SHA256SUMS'}); nothing was written"
            )


def export_run(
    run_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    repo_id: str,
    revision: str = "main",
    model_dir: str | os.PathLike | None = None,
    base_model: str | None = None,
    dataset_id: str | None = None,
    dataset_name: str | None = None,
    synthetic: bool | None = None,
    reproduce_command: str | None = None,
    overwrite: bool = False,
    evaluate_corpus: str | os.PathLike | None = None,
    evaluate_split: str = "validation",
) -> Path:
    """Write the Hub-ready folder of `run_dir` to `out_dir` (atomically: staged, then renamed)."""
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    model_dir = Path(model_dir) if model_dir is not None else find_model_dir(run_dir)
    config = _check_model_dir(model_dir)
    report = load_report(run_dir / "report.json")
    if evaluate_corpus is not None and find_metrics_block(report) is None:
        report["metrics"] = score_model(model_dir, evaluate_corpus, evaluate_split)
        report["metrics_split"] = evaluate_split
        report["metrics_source"] = "scored at export by topoflow.export.score_model"
    csv_path = run_dir / "val_loss.csv"
    val_loss_rows = read_val_loss_csv(csv_path) if csv_path.is_file() else []
    plot = find_val_loss_plot(run_dir)
    run_info = _read_run_info(run_dir)
    run_args = run_info.get("args") or {}
    if reproduce_command is None and run_args:
        reproduce_command = regenerate_command(run_args, int(run_info.get("world_size", 1)))
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"export folder {out_dir} exists; pass --overwrite to replace it")
    if out_dir.exists():
        _check_replaceable_export(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    packaged = out_dir.resolve().parent == PACKAGED_MODELS_DIR
    try:
        # A model shipped inside this package is loaded by the installed classes; a copy of the
        # Hub code there would only go stale (and repeat 1,500 lines in the repository).
        _copy_model_files(model_dir, staging, hub_code=not packaged)
        (staging / "training_report.json").write_text(
            json.dumps(report, indent=2) + "\n", encoding="utf-8"
        )
        if csv_path.is_file():
            shutil.copy2(csv_path, staging / "val_loss.csv")
        if plot is not None:
            shutil.copy2(plot, staging / plot.name)
        card = render_model_card(
            config=config,
            report=report,
            repo_id=repo_id,
            revision=revision,
            base_model=base_model,
            **_dataset_fields(config, dataset_id, dataset_name, synthetic),
            val_loss_rows=val_loss_rows,
            recipe={key: run_args[key] for key in RECIPE_KEYS if key in run_args},
            plot_filename=plot.name if plot is not None else None,
            num_parameters=count_weight_elements(staging),
            regenerate_command=reproduce_command,
            # A folder written into the package's pretrained/ resolves by its short name.
            short_name=out_dir.name if packaged else None,
        )
        card.save(staging / "README.md")
        _check_copies(model_dir, staging)
        write_manifest(staging)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out_dir


def push_folder(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    create_pr: bool = False,
    token: str | None = None,
    endpoint: str | None = None,
    commit_message: str = "Upload TopoFlow model",
) -> CommitInfo:
    """Upload an exported folder: creates the repo (and branch `revision`) if needed, or opens a
    pull request against `revision` with `create_pr`."""
    api = HfApi(endpoint=endpoint, token=token)
    api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    if revision and revision != "main" and not create_pr:
        api.create_branch(repo_id, branch=revision, exist_ok=True, repo_type="model")
    return api.upload_folder(
        repo_id=repo_id,
        folder_path=str(folder),
        repo_type="model",
        revision=revision,
        create_pr=create_pr,
        commit_message=commit_message,
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m topoflow.export",
        description="Export a training run to a Hub-ready model folder and push it.",
    )
    parser.add_argument("run_dir", help="output folder of train_accelerate.py")
    parser.add_argument("--out", required=True, help="folder to write the export to")
    parser.add_argument("--repo-id", help="Hub repo id org/name (required unless --dry-run)")
    parser.add_argument("--private", action="store_true", help="create the Hub repo private")
    parser.add_argument("--revision", default=None, help="branch to push to (created if needed)")
    parser.add_argument("--create-pr", action="store_true", help="open a pull request instead")
    parser.add_argument("--dry-run", action="store_true", help="write the folder, push nothing")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    parser.add_argument("--model-dir", help="model folder inside the run, if not found alone")
    parser.add_argument("--base-model", help="model this one was fine-tuned from (card metadata)")
    parser.add_argument("--dataset-id", help="dataset id for the card (default: corpus name)")
    parser.add_argument("--dataset-name", help="dataset display name for the card")
    parser.add_argument(
        "--real-data",
        action="store_true",
        help="trained on real reanalysis (default: inferred from the corpus provenance)",
    )
    parser.add_argument("--regenerate-command", help="command that reproduces the run (card)")
    parser.add_argument(
        "--evaluate",
        action="store_true",
        help="when report.json has no per-pollutant scores, score the model on the run's corpus "
        "(run_info.json) or --evaluate-corpus",
    )
    parser.add_argument("--evaluate-corpus", help="corpus folder or Hub dataset id to score on")
    parser.add_argument("--evaluate-split", default="validation")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if not args.dry_run and not args.repo_id:
        _parser().error("--repo-id is required unless --dry-run")
    repo_id = args.repo_id or f"your-org/{Path(args.out).name}"
    corpus = args.evaluate_corpus
    if args.evaluate and corpus is None:
        corpus = (_read_run_info(Path(args.run_dir)).get("args") or {}).get("corpus")
        corpus = corpus or _read_run_info(Path(args.run_dir)).get("corpus")
        if corpus is None:
            _parser().error("--evaluate: no corpus in run_info.json; pass --evaluate-corpus")
    folder = export_run(
        args.run_dir,
        args.out,
        repo_id=repo_id,
        revision=args.revision or "main",
        model_dir=args.model_dir,
        base_model=args.base_model,
        dataset_id=args.dataset_id,
        dataset_name=args.dataset_name,
        synthetic=False if args.real_data else None,
        reproduce_command=args.regenerate_command,
        overwrite=args.overwrite,
        evaluate_corpus=corpus,
        evaluate_split=args.evaluate_split,
    )
    print(f"exported {args.run_dir} -> {folder}")
    if args.dry_run:
        return 0
    info = push_folder(
        folder, repo_id, private=args.private, revision=args.revision, create_pr=args.create_pr
    )
    print(
        f"pushed to {info.commit_url}" + (f" (pull request {info.pr_url})" if info.pr_url else "")
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
