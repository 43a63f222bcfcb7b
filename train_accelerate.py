"""Pretrain or fine-tune TopoFlow with Accelerate, from one CPU to a multi-node GPU cluster.

    accelerate launch train_accelerate.py            # the researchers' experiment, defaults
    accelerate launch train_accelerate.py --help     # everything else

With no arguments: fine-tune `topoflow-base` with the elevation bias switched on in block 0
(alpha 0, so step 0 equals the baseline), one epoch on the embedded corpus, validate at step 0 and
every `--eval-every` steps, and write val_loss.csv, the val-loss curve, report.json and report.md
into `--output-dir`. `--from-scratch` trains a new model instead (how topoflow-base is made).

The script follows Accelerate's skeleton: argparse for infrastructure, one training function,
`accelerator.prepare`, `save_state`/`load_state` (made atomic in topoflow/training/checkpoints.py),
`accelerator.log`. Validation sums errors and counts locally and all-reduces once, so each sample
of the streamed validation split counts exactly once whatever the number of processes.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import (
    DataLoaderConfiguration,
    GradientAccumulationPlugin,
    ProjectConfiguration,
    broadcast_object_list,
    set_seed,
)
from transformers import get_cosine_schedule_with_warmup

from topoflow.corpus.schema import CorpusError
from topoflow.training.args import parse_args
from topoflow.training.checkpoints import (
    CheckpointError,
    load_checkpoint,
    resolve_checkpoint,
    save_checkpoint,
)
from topoflow.training.data import StatefulCollator, make_loader, min_samples_per_rank
from topoflow.training.evaluation import EvalResult, evaluate
from topoflow.training.guards import NonFiniteGuard, TrainingAborted
from topoflow.training.model_setup import (
    LoadingReport,
    MissingKeysError,
    build_from_scratch,
    check_corpus_matches_config,
    make_loading_report,
    select_trainable,
)
from topoflow.training.report import (
    CURVE_PNG,
    TRAIN_CSV,
    VAL_CSV,
    make_verdict,
    plot_val_curve,
    write_history_csv,
    write_report,
)
from topoflow.training.run_lock import OutputDirBusy, OutputDirLock, not_written_by_a_run

__all__ = ["OutputDirError", "main", "previous_run_outputs", "train"]

logger = logging.getLogger("train_accelerate")

RUN_INFO = "run_info.json"
# What a previous run leaves in --output-dir; --overwrite removes exactly these, nothing else.
RUN_OUTPUTS = (RUN_INFO, "report.json", "report.md", VAL_CSV, TRAIN_CSV, CURVE_PNG, "model",
               "checkpoints", "logs", "debug")
# Arguments that must not change across a resume, or the resumed run is another experiment.
RESUME_INVARIANTS = ("model", "from_scratch", "config", "corpus", "corpus_size", "train_split",
                     "batch_size", "gradient_accumulation_steps", "seed", "elevation_blocks",
                     "trainable", "learning_rate", "weight_decay", "no_shuffle",
                     # the model (a changed direction or H_scale would switch it mid-run)
                     "revision", "elevation_scale", "alpha_init", "elevation_direction",
                     # the schedule (a new --max-steps or warmup reshapes the learning rate)
                     "alpha_learning_rate", "warmup_steps", "max_grad_norm", "epochs",
                     "max_steps", "mixed_precision",
                     # the evaluation the verdict compares (step 0 against the final loss)
                     "eval_split", "eval_batches", "eval_batch_size")


# The process that started this one (accelerate launch, torchrun's agent, a shell). When it is
# killed, this process is re-parented; it then stops instead of training on unobserved.
LAUNCHER_PID = os.getppid()


class OutputDirError(FileExistsError):
    """--output-dir holds another run."""


def make_accelerator(args: Any) -> Accelerator:
    output_dir = Path(args.output_dir)
    kwargs: dict[str, Any] = {}
    if args.mixed_precision is not None:
        kwargs["mixed_precision"] = args.mixed_precision
    if _multi_process_without_gpu():
        # `accelerate launch --multi_gpu` on machines without CUDA (accelerate 1.15's `--cpu` runs a
        # single process unless MPI is set up): train on CPU with gloo instead of silently
        # running N independent copies of the job.
        kwargs["cpu"] = True
    return Accelerator(
        # Batches are counted by the loop, not by the end of the loader: ranks that reach the end
        # of their shards at different batches must still agree on when gradients sync.
        gradient_accumulation_plugin=GradientAccumulationPlugin(
            num_steps=args.gradient_accumulation_steps, sync_with_dataloader=False),
        # Each rank reads its own shards; accelerate shards a datasets.IterableDataset itself.
        dataloader_config=DataLoaderConfiguration(dispatch_batches=False, split_batches=False),
        # The scheduler steps once per optimizer step we take (skipped steps do not advance it).
        step_scheduler_with_optimizer=False,
        log_with=args.report_to or None,
        project_config=ProjectConfiguration(project_dir=str(output_dir),
                                            logging_dir=str(output_dir / "logs")),
        **kwargs,
    )


def _multi_process_without_gpu() -> bool:
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    return world_size > 1 and not torch.cuda.is_available()


def previous_run_outputs(output_dir: Path, *, resuming: bool, overwrite: bool) -> list[str]:
    """Outputs of an earlier run in `output_dir` that --overwrite will remove; raise
    OutputDirError when there are some and the user neither resumes nor overwrites, or when
    --overwrite would remove something no run wrote."""
    previous = [name for name in RUN_OUTPUTS if (output_dir / name).exists()]
    if previous and not resuming and not overwrite:
        raise OutputDirError(
            f"--output-dir {output_dir} holds another run ({', '.join(previous)}); pass "
            "--overwrite to replace it, --resume-from-checkpoint latest to continue it, or "
            "choose another --output-dir"
        )
    if resuming or not previous:
        return []
    foreign = [] if (output_dir / RUN_INFO).is_file() else [
        f"{name} (no {RUN_INFO}: the folder does not hold a run)" for name in previous]
    for name in previous:
        foreign += not_written_by_a_run(output_dir / name)
    if foreign:
        raise OutputDirError(
            f"--overwrite: --output-dir {output_dir} holds files no run wrote ({foreign[:5]}); "
            "nothing was deleted: move them out or choose another --output-dir"
        )
    return previous


def prepare_output_dir(args: Any, accelerator: Accelerator) -> tuple[Path, OutputDirLock | None]:
    """Take the output folder's lock (main process), then refuse to mix two runs in one folder;
    every rank learns the outcome before the main rank deletes or writes anything."""
    output_dir = Path(args.output_dir)
    lock, problem = None, None
    if accelerator.is_main_process:
        lock = OutputDirLock(output_dir)
        try:
            lock.acquire()
        except OutputDirBusy as err:
            problem = str(err)
    problem = broadcast_object_list([problem])[0]
    if problem is not None:
        raise OutputDirError(problem)
    stale = previous_run_outputs(output_dir, resuming=bool(args.resume_from_checkpoint),
                                 overwrite=args.overwrite)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        for name in stale:
            target = output_dir / name
            shutil.rmtree(target) if target.is_dir() else target.unlink()
        output_dir.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    return output_dir, lock


def resolve_corpus(args: Any, accelerator: Accelerator) -> Path:
    if args.corpus is not None:
        corpus = Path(args.corpus)
        if not corpus.exists():
            raise FileNotFoundError(f"--corpus {args.corpus}: no such folder")
        return corpus
    from topoflow.corpus import build_default_corpus

    # The main process builds (or finds) the cached corpus first; the others then read the cache.
    with accelerator.main_process_first():
        return build_default_corpus(size=args.corpus_size)


def load_model(args: Any, meta: Any, accelerator: Accelerator, corpus: Path | None = None
               ) -> tuple[Any, LoadingReport, list]:
    """The model to train, the loading report, and the keys that did not come from a checkpoint."""
    import topoflow  # noqa: F401  (registers the topoflow-base name resolver)
    from modeling_topoflow import TopoFlowForForecasting

    extra = {} if args.attn_implementation is None else {
        "attn_implementation": args.attn_implementation}
    if args.elevation_direction is not None:
        extra["elevation_bias_direction"] = args.elevation_direction
    # The issue-14 ablation arms; set only when asked, so other runs' configs stay as they were.
    ablations = {key: True for key, wanted in (
        ("elevation_bias_placebo", args.elevation_placebo),
        ("elevation_input_masked", args.mask_elevation_input)) if wanted}
    if args.alpha_per_head:
        ablations["elevation_alpha_per_head"] = True
    if args.elevation_rise is not None:
        ablations["elevation_bias_rise"] = args.elevation_rise
    extra.update(ablations)
    if args.from_scratch:
        config, anomaly_base = build_from_scratch(
            args.config, meta, elevation_blocks=args.elevation_blocks,
            elevation_scale=args.elevation_scale, alpha_init=args.alpha_init,
            elevation_direction=args.elevation_direction, corpus=corpus)
        for key, value in ablations.items():
            setattr(config, key, value)
        model = TopoFlowForForecasting(config)
        if anomaly_base is not None:
            anomaly_base.load_into(model)
        if args.attn_implementation is not None:
            model.set_attn_implementation(args.attn_implementation)
        new_keys = [name for name, _ in model.named_parameters()]
        return model, LoadingReport(), new_keys
    from topoflow.hub import resolve_model_name

    resolve_model_name(args.model)  # UnknownModelNameError names the known models
    model, info = TopoFlowForForecasting.from_pretrained(
        args.model, revision=args.revision, elevation_bias_blocks=args.elevation_blocks,
        elevation_scale=args.elevation_scale, elevation_alpha_init=args.alpha_init,
        output_loading_info=True, **extra)
    report = make_loading_report(info, args.elevation_blocks, model_name=args.model,
                                 allow_missing=args.allow_missing_keys)
    return model, report, report.missing_expected + report.missing_other


ALPHA_GROUP = "elevation_alpha"


def make_optimizer(model: torch.nn.Module, args: Any) -> torch.optim.Optimizer:
    """AdamW with three groups: matrices (weight decay), other vectors and scalars (none), and the
    elevation alphas (none, their own learning rate, projected onto alpha >= 0 after each step)."""
    alphas = [p for p in model.elevation_alpha_parameters() if p.requires_grad]
    alpha_ids = {id(p) for p in alphas}
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad and id(param) not in alpha_ids:
            (decay if param.ndim >= 2 else no_decay).append(param)
    alpha_lr = alpha_learning_rate(args, model.config)
    groups = [{"params": decay, "weight_decay": args.weight_decay},
              {"params": no_decay, "weight_decay": 0.0},
              {"params": alphas, "weight_decay": 0.0, "lr": alpha_lr, "name": ALPHA_GROUP}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=args.learning_rate)


def alpha_learning_rate(args: Any, config: Any) -> float:
    """--alpha-learning-rate, else --learning-rate / initializer_range (see its --help)."""
    if args.alpha_learning_rate is not None:
        return args.alpha_learning_rate
    return args.learning_rate / config.initializer_range


def elevation_alphas(model: torch.nn.Module, per_head: bool = False) -> dict[str, Any]:
    """Current elevation_alpha of every biased block, keyed by block index: one number per block
    (the mean over heads where each head has its own), or with `per_head` the list of each
    block's values."""
    alphas = {}
    for name, param in model.named_parameters():
        if name.endswith("attn.elevation_alpha"):
            values = param.detach().float().flatten()
            block = name.split("blocks.")[-1].split(".")[0]
            alphas[block] = values.tolist() if per_head else float(values.mean())
    return alphas


class TrainerState:
    """Counters and history that a checkpoint carries, so a resumed run logs what an uninterrupted
    one would have."""

    def __init__(self) -> None:
        self.global_step = 0
        self.epoch = 0
        self.batches_in_epoch = 0
        self.train_history: list[dict[str, Any]] = []
        self.val_history: list[dict[str, Any]] = []
        self.step0_full: dict[str, Any] | None = None
        self.empty_batches = 0
        # The full-split evaluation after the last step, kept so that a run resumed from the
        # checkpoint written after it reports it instead of evaluating (and logging) it twice.
        self.final_eval: dict[str, Any] | None = None
        # Content hash of the corpus metadata (it lists every shard's sha256): a corpus rebuilt
        # in place with other data must not be resumed on.
        self.corpus_fingerprint: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return dict(vars(self))

    def load(self, state: dict[str, Any]) -> None:
        for key, value in state.items():
            if key in vars(self):
                setattr(self, key, value)


def run_eval(model: Any, eval_dl: Any, accelerator: Accelerator, state: TrainerState,
             max_batches: int, stride: int = 1) -> EvalResult:
    result = evaluate(model, eval_dl, accelerator, max_batches=max_batches,
                      stride=stride if max_batches else 1)
    alphas = elevation_alphas(accelerator.unwrap_model(model))
    state.val_history.append({"step": state.global_step, "epoch": state.epoch,
                              "val_loss": result.loss, "n_samples": result.n_samples,
                              "n_cells": result.n_cells, "full": result.full, "alpha": alphas})
    name = "val/loss_full" if result.full else "val/loss"
    accelerator.log({name: result.loss, **{f"alpha/block{b}": v for b, v in alphas.items()}},
                    step=state.global_step)
    accelerator.print(f"step {state.global_step}: {'full ' if result.full else ''}val loss "
                      f"{result.loss:.6f} on {result.n_samples} samples")
    if not math.isfinite(result.loss):
        # Every rank holds the same all-reduced loss, so all ranks stop together.
        raise TrainingAborted(f"step {state.global_step}: the validation loss is {result.loss} "
                              f"on {result.n_samples} samples ({result.n_cells} valid cells); "
                              "a run whose evaluation is not finite cannot be judged")
    return result


def train_step(model: Any, group: list[dict[str, torch.Tensor]], optimizer: Any, scheduler: Any,
               accelerator: Accelerator, args: Any, guard: NonFiniteGuard, state: TrainerState
               ) -> dict[str, Any]:
    """One optimizer step over `group` (gradient_accumulation_steps micro-batches)."""
    losses, nonfinite, valid_cells, grad_norm = [], False, 0.0, float("nan")
    for batch in group:
        with accelerator.accumulate(model):
            loss = model(**batch).loss
            # One all-reduce per micro-batch gives every rank the same verdict on NaN/Inf and on
            # empty batches, so all ranks skip together and no collective is left waiting.
            local = torch.stack([torch.nan_to_num(loss.detach().float(), 0.0, 0.0, 0.0),
                                 (~torch.isfinite(loss.detach())).float(),
                                 torch.tensor(float(batch["labels"].isfinite().sum()),
                                              device=loss.device)])
            total = accelerator.reduce(local, reduction="sum")
            if total[1] > 0 or _injected_nan(state.global_step + 1):
                nonfinite = True
            else:
                losses.append(float(total[0]) / accelerator.num_processes)
                valid_cells += float(total[2])
            # Backward even for a non-finite loss: DDP expects every forward in sync mode to be
            # followed by a backward on every rank; the gradients are discarded below.
            accelerator.backward(loss)
            if accelerator.sync_gradients and not nonfinite and args.max_grad_norm > 0:
                grad_norm = float(accelerator.clip_grad_norm_(model.parameters(),
                                                              args.max_grad_norm))
                nonfinite = not math.isfinite(grad_norm)
    step = state.global_step + 1
    empty = valid_cells == 0 and not nonfinite
    skip = guard.observe(not nonfinite, step) or empty
    if empty:
        state.empty_batches += 1
        logger.warning("step %d: no valid target cell in the whole batch; step skipped", step)
    if not skip:
        optimizer.step()
        # Below 0 the clamped bias and alpha's gradient are both 0: keep alpha >= 0. The unwrapped
        # module holds the very parameters the optimizer updates (also under DDP and FSDP2).
        accelerator.unwrap_model(model).project_elevation_alpha_()
        scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return {"step": step, "epoch": state.epoch,
            "loss": sum(losses) / len(losses) if losses and not nonfinite else float("nan"),
            "lr": float(scheduler.get_last_lr()[0]), "grad_norm": grad_norm, "skipped": skip,
            "alpha": elevation_alphas(accelerator.unwrap_model(model))}


def _injected_nan(step: int) -> bool:
    """Test-only fault injection: TOPOFLOW_TEST_NAN_AT_STEPS="3,4" makes those steps' loss NaN."""
    steps = os.environ.get("TOPOFLOW_TEST_NAN_AT_STEPS", "")
    return str(step) in steps.split(",")


def next_group(iterator: Any, size: int, accelerator: Accelerator) -> list | None:
    """The next `size` micro-batches, or None on every rank as soon as one rank runs out."""
    group = []
    for _ in range(size):
        batch = next(iterator, None)
        if batch is None:
            break
        group.append(batch)
    # One all-reduce carries both verdicts, so every rank stops at the same step.
    orphaned = os.getppid() != LAUNCHER_PID
    local = torch.tensor([1.0 if len(group) == size else 0.0, float(orphaned)],
                         device=accelerator.device)
    complete, orphans = accelerator.reduce(local, reduction="sum").tolist()
    if orphans > 0:
        raise TrainingAborted(
            f"the process that launched this run (pid {LAUNCHER_PID}, e.g. accelerate launch) is "
            "gone; stopping so that no orphaned worker keeps writing to --output-dir (continue "
            "with --resume-from-checkpoint latest)")
    if complete < accelerator.num_processes:
        return None
    return group


def log_sample_ids(output_dir: Path, accelerator: Accelerator, state: TrainerState,
                   group: list[dict[str, torch.Tensor]]) -> None:
    # Debug only (--debug-log-sample-ids): one file per rank, the exception to "main rank writes".
    folder = output_dir / "debug"
    folder.mkdir(exist_ok=True)
    ids = [int(i) for batch in group for i in batch["sample_ids"].tolist()]
    record = {"epoch": state.epoch, "step": state.global_step + 1, "ids": ids}
    with open(folder / f"sample_ids_rank{accelerator.process_index}.jsonl", "a") as handle:
        handle.write(json.dumps(record) + "\n")


def save_final_model(model: Any, accelerator: Accelerator, output_dir: Path) -> Path:
    """save_pretrained (safetensors, remote code, config with statistics) + SHA256SUMS, atomically,
    from the main process; the full state dict is gathered collectively first (FSDP)."""
    from topoflow.safety import refuse_pickle_files

    state_dict = accelerator.get_state_dict(model)
    final = output_dir / "model"
    if accelerator.is_main_process:
        tmp = output_dir / ".tmp-model"
        shutil.rmtree(tmp, ignore_errors=True)
        # save_pretrained refuses NaN/Inf weights before writing and writes SHA256SUMS.
        accelerator.unwrap_model(model).save_pretrained(tmp, state_dict=state_dict)
        refuse_pickle_files(tmp)
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
    accelerator.wait_for_everyone()
    return final


def checkpoint(accelerator: Accelerator, model: Any, output_dir: Path, state: TrainerState,
               guard: NonFiniteGuard, dataset_state: dict[str, Any] | None, args: Any) -> None:
    from topoflow.safety import check_finite_state_dict

    # Non-finite weights are never written: refuse before any file of the checkpoint exists.
    check_finite_state_dict(accelerator.unwrap_model(model).state_dict(),
                            where=f"checkpoint of step {state.global_step}")
    data_state = {"epoch": state.epoch, "batches_in_epoch": state.batches_in_epoch,
                  "dataset_state": dataset_state}
    trainer_state = {**state.as_dict(), "guard": guard.state_dict(),
                     "args": {k: v for k, v in vars(args).items() if k in RESUME_INVARIANTS}}
    save_checkpoint(accelerator, output_dir / "checkpoints", state.global_step, trainer_state,
                    data_state, total_limit=args.save_total_limit)


def check_resume_args(saved: dict[str, Any], args: Any, path: Path) -> None:
    missing = [k for k in RESUME_INVARIANTS if k not in saved]
    if missing:
        raise CheckpointError(
            f"checkpoint {path} does not record the settings {missing} (written by an older "
            "train_accelerate.py); a resume cannot be checked against them, start a new run")
    changed = [k for k in RESUME_INVARIANTS if saved[k] != getattr(args, k)]
    if changed:
        flags = ", ".join(f"--{k.replace('_', '-')} {saved[k]!r} (now {getattr(args, k)!r})"
                          for k in changed)
        raise CheckpointError(
            f"checkpoint {path} was written with other settings: {flags}; resume with the same "
            "settings or start a new run")


def check_resume_corpus(saved: dict[str, Any], fingerprint: str, corpus: Path,
                        path: Path) -> None:
    """The corpus must hold the bytes the checkpoint was trained on, wherever it lies now."""
    if saved.get("corpus_fingerprint") != fingerprint:
        raise CheckpointError(
            f"checkpoint {path} was trained on other corpus content than {corpus} holds now "
            f"(metadata sha256 {str(saved.get('corpus_fingerprint'))[:12]}... then, "
            f"{fingerprint[:12]}... now: rebuilt or changed in place); resume on the same corpus")


def train(args: Any) -> dict[str, Any] | None:
    """The whole run; returns report.json's content (on every rank), None after
    --stop-after-steps."""
    started = time.time()
    accelerator = make_accelerator(args)
    logging.basicConfig(level=logging.INFO if accelerator.is_main_process else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # Accelerate logs every file of every save at INFO; keep the console for the training story.
    logging.getLogger("accelerate").setLevel(logging.WARNING)
    output_dir, _lock = prepare_output_dir(args, accelerator)  # held until this process exits
    set_seed(args.seed)
    corpus = resolve_corpus(args, accelerator)
    from topoflow.corpus import CorpusMetadata
    from topoflow.data import check_world_size, make_forecast_dataset

    meta = CorpusMetadata.load(corpus)
    fingerprint = meta.fingerprint()
    model, loading, new_keys = load_model(args, meta, accelerator, corpus)
    for line in loading.lines():
        accelerator.print(f"loading report: {line}")
    config = model.config
    check_corpus_matches_config(config, meta)
    datasets = {}
    for split, shuffle in ((args.train_split, not args.no_shuffle), (args.eval_split, False)):
        datasets[split] = make_forecast_dataset(
            corpus, split, variables=config.variables, target_variables=config.target_variables,
            lead_times_hours=config.lead_times_hours,
            normalization={"mean": config.variable_mean, "std": config.variable_std},
            seed=args.seed, shuffle=shuffle, time_features=config.time_features,
            # Training mixes each rank's months (seasons) in one seeded order per epoch.
            mix_shards=shuffle and split == args.train_split)
        check_world_size(datasets[split].n_shards, accelerator.num_processes)
    trainable = select_trainable(model, args.trainable, new_keys=new_keys,
                                 blocks=args.elevation_blocks)
    accelerator.print(f"trainable parameters ({args.trainable}): "
                      f"{sum(p.numel() for p in model.parameters() if p.requires_grad)} in "
                      f"{len(trainable)} tensors")
    if args.gradient_checkpointing:
        # transformers 5.x renamed gradient_checkpointing_enable (deprecated, removed in v6).
        enable = (getattr(model, "activation_checkpointing_enable", None)
                  or model.gradient_checkpointing_enable)
        enable()
    samples = min_samples_per_rank(meta, args.train_split, config.lead_times_hours,
                                   accelerator.num_processes)
    steps_per_epoch = max(1, samples // (args.batch_size * args.gradient_accumulation_steps))
    total_steps = args.max_steps or steps_per_epoch * args.epochs
    eval_samples = min_samples_per_rank(meta, args.eval_split, config.lead_times_hours,
                                        accelerator.num_processes)
    # The periodic validation subset: --eval-batches batches spread evenly over the split.
    eval_stride = max(1, eval_samples // args.eval_batch_size // max(1, args.eval_batches))
    warmup = args.warmup_steps if args.warmup_steps is not None else max(1, total_steps // 20)
    optimizer = make_optimizer(model, args)
    scheduler = get_cosine_schedule_with_warmup(optimizer, warmup, total_steps)
    collator = StatefulCollator()
    train_dl = make_loader(datasets[args.train_split], args.batch_size, collator)
    eval_dl = make_loader(datasets[args.eval_split], args.eval_batch_size)
    model, optimizer, train_dl, eval_dl, scheduler = accelerator.prepare(
        model, optimizer, train_dl, eval_dl, scheduler)
    collator.bind(train_dl.dataset)

    state, guard = TrainerState(), NonFiniteGuard(args.max_nonfinite_steps)
    state.corpus_fingerprint = fingerprint
    resume_state = None
    if args.resume_from_checkpoint:
        path = resolve_checkpoint(args.resume_from_checkpoint, output_dir / "checkpoints")
        saved, data_state = load_checkpoint(accelerator, path)
        check_resume_args(saved.get("args", {}), args, path)
        check_resume_corpus(saved, fingerprint, corpus, path)
        state.load(saved)
        guard.load_state_dict(saved["guard"])
        resume_state = data_state["dataset_state"]
        accelerator.print(f"resumed from {path} at step {state.global_step}, epoch {state.epoch}")
    run_config = {k: (v if isinstance(v, (int, float, str, bool)) else str(v))
                  for k, v in vars(args).items()}
    accelerator.init_trackers("topoflow", config=run_config)
    if accelerator.is_main_process and not args.resume_from_checkpoint:
        info = {"args": vars(args), "world_size": accelerator.num_processes,
                "corpus": str(corpus), "total_steps": total_steps,
                "steps_per_epoch_estimate": steps_per_epoch, "loading_report": loading.as_dict()}
        (output_dir / RUN_INFO).write_text(json.dumps(info, indent=2, default=str) + "\n")

    if state.global_step == 0 and not state.val_history:
        run_eval(model, eval_dl, accelerator, state, args.eval_batches, eval_stride)
        if args.eval_batches:
            run_eval(model, eval_dl, accelerator, state, 0)
        state.step0_full = state.val_history[-1]

    progress = None
    if accelerator.is_main_process and not args.no_progress_bar:
        from topoflow.training.progress import TrainingProgress

        # A bar on a terminal, periodic lines in a log (SLURM, CI, nohup).
        progress = TrainingProgress(total_steps, state.global_step)
    model.train()
    last_saved = state.global_step if args.resume_from_checkpoint else -1
    first_step, stopping = state.global_step, False
    # The data position after the last consumed batch: what a checkpoint stores.
    position = resume_state
    max_epochs = args.epochs if args.max_steps is None else sys.maxsize
    while state.global_step < total_steps and state.epoch < max_epochs:
        train_dl.set_epoch(state.epoch)
        if resume_state is not None:
            train_dl.dataset.load_state_dict(resume_state)
            resume_state = None
        collator.reset()
        iterator, consumed, steps_before = iter(train_dl), 0, state.global_step
        while state.global_step < total_steps:
            group = next_group(iterator, args.gradient_accumulation_steps, accelerator)
            if group is None:
                break
            if args.debug_log_sample_ids:
                log_sample_ids(output_dir, accelerator, state, group)
            record = train_step(model, group, optimizer, scheduler, accelerator, args, guard,
                                state)
            consumed += len(group)
            position = collator.state_after(consumed)
            state.global_step += 1
            state.batches_in_epoch += len(group)
            state.train_history.append(record)
            accelerator.log({"train/loss": record["loss"], "train/lr": record["lr"],
                             "train/grad_norm": record["grad_norm"],
                             **{f"alpha/block{b}": v for b, v in record["alpha"].items()}},
                            step=state.global_step)
            if progress is not None:
                progress.update(state.global_step, record["loss"], record["lr"])
            if state.global_step % args.eval_every == 0:
                run_eval(model, eval_dl, accelerator, state, args.eval_batches, eval_stride)
            if args.checkpointing_steps and state.global_step % args.checkpointing_steps == 0:
                checkpoint(accelerator, model, output_dir, state, guard, position, args)
                last_saved = state.global_step
            if args.stop_after_steps and state.global_step - first_step >= args.stop_after_steps:
                stopping = True
                break
        iterator.close()
        train_dl.end()
        if stopping or state.global_step >= total_steps:
            break
        if state.global_step == steps_before and state.batches_in_epoch == 0:
            raise ValueError(f"split {args.train_split!r} yields less than one batch of "
                             f"{args.batch_size} x {args.gradient_accumulation_steps} samples "
                             "per process")
        state.epoch += 1
        state.batches_in_epoch = 0
        position = None
    if progress is not None:
        progress.close()
    if stopping:
        if last_saved != state.global_step:
            checkpoint(accelerator, model, output_dir, state, guard, position, args)
        accelerator.print(f"stopped after {args.stop_after_steps} steps at step "
                          f"{state.global_step}; continue with --resume-from-checkpoint latest")
        accelerator.end_training()
        return None

    if state.final_eval is None:
        if state.val_history[-1]["step"] != state.global_step:
            run_eval(model, eval_dl, accelerator, state, args.eval_batches, eval_stride)
        final = run_eval(model, eval_dl, accelerator, state, 0)
        state.final_eval = final.as_dict()
    else:  # resumed from the checkpoint written after the final evaluation
        final = EvalResult(**state.final_eval)
    if last_saved != state.global_step:
        checkpoint(accelerator, model, output_dir, state, guard, position, args)
    model_dir = save_final_model(model, accelerator, output_dir)
    report = build_report(args, accelerator, model, state, guard, final, loading, model_dir,
                          time.time() - started, total_steps)
    if accelerator.is_main_process:
        write_outputs(output_dir, state, report)
    accelerator.end_training()
    return report


def build_report(args: Any, accelerator: Accelerator, model: Any, state: TrainerState,
                 guard: NonFiniteGuard, final: EvalResult, loading: LoadingReport,
                 model_dir: Path, wall_time: float, total_steps: int) -> dict[str, Any]:
    config = accelerator.unwrap_model(model).config
    step0 = state.step0_full["val_loss"]
    threshold = (args.success_threshold if args.success_threshold is not None
                 else step0 * args.success_ratio)
    verdict = make_verdict(step0, final.loss, threshold)
    verdict["n_val_samples"] = final.n_samples
    return {
        "verdict": verdict,
        "run": {
            "model": "from scratch: " + args.config if args.from_scratch else args.model,
            "elevation_blocks": args.elevation_blocks, "elevation_scale": args.elevation_scale,
            "alpha_init": args.alpha_init, "trainable": args.trainable,
            "elevation_direction": config.elevation_bias_direction,
            "elevation_placebo": config.elevation_bias_placebo,
            "elevation_rise": config.elevation_bias_rise,
            "elevation_alpha_per_head": config.elevation_alpha_per_head,
            "elevation_input_masked": config.elevation_input_masked,
            "alpha_learning_rate": alpha_learning_rate(args, config),
            "steps": state.global_step, "planned_steps": total_steps, "epochs_started":
            state.epoch + 1, "world_size": accelerator.num_processes,
            "eval_split": args.eval_split, "eval_batches": args.eval_batches,
            "threshold_source": ("--success-threshold" if args.success_threshold is not None
                                 else f"step-0 val loss x {args.success_ratio}"),
            "skipped_nonfinite_steps": guard.total_skipped, "empty_batches": state.empty_batches,
            "final_alpha": elevation_alphas(accelerator.unwrap_model(model)),
            "final_alpha_per_head": elevation_alphas(accelerator.unwrap_model(model),
                                                     per_head=True),
            "wall_time_s": wall_time, "model_dir": str(model_dir), "seed": args.seed,
        },
        "loading_report": loading.as_dict(),
        "final_eval": final.as_dict(),
    }


def write_outputs(output_dir: Path, state: TrainerState, report: dict[str, Any]) -> None:
    write_history_csv(output_dir / VAL_CSV, state.val_history)
    write_history_csv(output_dir / TRAIN_CSV, state.train_history)
    verdict = report["verdict"]
    plot_val_curve(output_dir / CURVE_PNG, state.val_history, verdict["step0_val_loss"],
                   verdict["success_threshold"],
                   title=f"{report['run']['model']}, elevation bias on blocks "
                         f"{report['run']['elevation_blocks'] or 'none'}")
    write_report(output_dir, report)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        report = train(args)
    except (MissingKeysError, CheckpointError, OutputDirError, TrainingAborted,
            CorpusError) as err:
        print(f"train_accelerate.py: error: {err}", file=sys.stderr)
        return 2
    if report is not None and int(os.environ.get("RANK", "0")) == 0:
        print(f"verdict: {report['verdict']['verdict']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
