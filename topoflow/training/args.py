"""Command-line arguments of `train_accelerate.py` (infrastructure only; the model config is JSON).

Defaults reproduce the researchers' experiment (DESIGN.md section 1) on the embedded corpus:
fine-tune `topoflow-base` with the elevation bias switched on in block 0 (alpha 0, H_scale 1000 m)
for one epoch, validating at step 0 and every `--eval-every` steps.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence

__all__ = ["build_parser", "parse_args", "parse_block_list", "TRAINABLE_CHOICES"]

# What `--trainable` may name; anything else must be `prefix:<name>,<name>`.
TRAINABLE_CHOICES = ("all", "new", "head", "bias-blocks", "elevation")


def parse_block_list(text: str) -> list[int]:
    """Parse `--elevation-blocks`: "0", "0,3,5", or "none"/"" for the baseline (no bias)."""
    text = text.strip().lower()
    if text in ("", "none", "off"):
        return []
    try:
        blocks = sorted({int(part) for part in text.split(",") if part.strip()})
    except ValueError as err:
        raise argparse.ArgumentTypeError(
            f"--elevation-blocks expects comma-separated block indices or 'none', got {text!r}"
        ) from err
    if any(block < 0 for block in blocks):
        raise argparse.ArgumentTypeError(f"--elevation-blocks must be >= 0, got {blocks}")
    return blocks


def _trainable(text: str) -> str:
    if text in TRAINABLE_CHOICES or (text.startswith("prefix:") and len(text) > len("prefix:")):
        return text
    raise argparse.ArgumentTypeError(
        f"--trainable expects one of {', '.join(TRAINABLE_CHOICES)} or 'prefix:<name>,<name>', "
        f"got {text!r}"
    )


def _add_model_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model")
    group.add_argument("--model", default="topoflow-base",
                       help="model folder, packaged short name (topoflow-base) or Hub id org/name")
    group.add_argument("--revision", default=None, help="Hub revision when --model is a Hub id")
    group.add_argument("--from-scratch", action="store_true",
                       help="build a fresh model from --config instead of loading --model")
    group.add_argument("--config", default=None,
                       help="with --from-scratch: a config.json path or a preset name (tiny, "
                            "base); default base")
    group.add_argument("--elevation-blocks", type=parse_block_list, default=None,
                       help="blocks whose attention gets the elevation bias, e.g. 0 or 0,3, or "
                            "'none'; default 0 when fine-tuning, none with --from-scratch (the "
                            "baseline)")
    group.add_argument("--elevation-scale", type=float, default=1000.0,
                       help="H_scale in metres for newly biased blocks")
    group.add_argument("--alpha-init", type=float, default=0.0,
                       help="initial elevation_alpha of newly biased blocks (0: same function)")
    group.add_argument("--elevation-direction", choices=("downslope", "upslope"), default=None,
                       help="transport the bias penalizes: downslope (attending to a higher "
                            "source, DESIGN.md) or upslope (to a lower source); default: the "
                            "checkpoint's, else downslope")
    group.add_argument("--elevation-placebo", action="store_true",
                       help="placebo arm: the bias from a per-sample shuffle of the patch heights "
                            "(same values, no geography; config.elevation_bias_placebo)")
    group.add_argument("--elevation-rise", choices=("endpoint", "path"), default=None,
                       help="the rise the bias reads: endpoint (difference of the patch means, "
                            "DESIGN.md) or path (the oracle: total ascent along the segment "
                            "between the patch centres; config.elevation_bias_rise); default: "
                            "the checkpoint's, else endpoint")
    group.add_argument("--alpha-per-head", action="store_true",
                       help="one learnable elevation_alpha per attention head instead of one per "
                            "block (config.elevation_alpha_per_head)")
    group.add_argument("--mask-elevation-input", action="store_true",
                       help="set the elevation input channel to 0 so the terrain reaches the "
                            "model only through the bias (config.elevation_input_masked)")
    group.add_argument("--allow-missing-keys", action="store_true",
                       help="train even if keys other than the new bias keys are missing")
    group.add_argument("--trainable", type=_trainable, default="all",
                       help="all | new (only keys missing from the checkpoint) | head | "
                            "bias-blocks (the biased blocks) | elevation (alpha only) | "
                            "prefix:<a>,<b>")
    group.add_argument("--attn-implementation", default=None,
                       help="eager | sdpa | flex_attention (transformers' names), or a name "
                       "registered with transformers.AttentionInterface")
    group.add_argument("--gradient-checkpointing", action="store_true")


def _add_data_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("data")
    group.add_argument("--corpus", default=None,
                       help="corpus folder or Hub dataset id; default: the embedded corpus (built "
                            "once and cached)")
    group.add_argument("--corpus-size", default="default", help="size of the embedded corpus")
    group.add_argument("--train-split", default="train")
    group.add_argument("--eval-split", default="validation")
    group.add_argument("--batch-size", type=int, default=8, help="per process")
    group.add_argument("--eval-batch-size", type=int, default=16, help="per process")
    group.add_argument("--no-shuffle", action="store_true", help="keep the training order fixed")


def _add_optim_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("optimisation")
    group.add_argument("--learning-rate", type=float, default=3e-4)
    group.add_argument("--weight-decay", type=float, default=0.01)
    group.add_argument("--alpha-learning-rate", type=float, default=None,
                       help="peak learning rate of every elevation_alpha; default: "
                            "--learning-rate / initializer_range (50x with 0.02), so alpha, "
                            "whose useful values are O(1), moves as fast relative to its scale "
                            "as a weight initialized at std 0.02; at the shared rate it could "
                            "move at most max_steps x lr (0.24 in 800 steps at 3e-4)")
    group.add_argument("--warmup-steps", type=int, default=None,
                       help="linear warmup steps; default: 5%% of the planned steps")
    group.add_argument("--max-grad-norm", type=float, default=1.0, help="0 disables clipping")
    group.add_argument("--gradient-accumulation-steps", type=int, default=1)
    group.add_argument("--epochs", type=int, default=1)
    group.add_argument("--max-steps", type=int, default=None,
                       help="stop after this many optimizer steps (overrides --epochs)")
    group.add_argument("--mixed-precision", choices=("no", "fp16", "bf16"), default=None,
                       help="default: what `accelerate launch`/config says")
    group.add_argument("--seed", type=int, default=0)
    group.add_argument("--max-nonfinite-steps", type=int, default=5,
                       help="abort after this many consecutive steps with a NaN/Inf loss or grad")


def _add_run_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("evaluation, checkpoints and reports")
    group.add_argument("--eval-every", type=int, default=100, help="validate every N steps")
    group.add_argument("--eval-batches", type=int, default=8,
                       help="batches per process for the periodic validation: the first N batches "
                            "of the unshuffled validation stream, the same subset every time; 0 = "
                            "the full split. The final validation always uses the full split.")
    group.add_argument("--output-dir", default=None,
                       help="default outputs/topoflow-finetune (outputs/topoflow-pretrain with "
                            "--from-scratch)")
    group.add_argument("--overwrite", action="store_true",
                       help="replace the outputs of another run in --output-dir")
    group.add_argument("--checkpointing-steps", type=int, default=0,
                       help="save a resumable checkpoint every N steps (0: only at the end)")
    group.add_argument("--save-total-limit", type=int, default=2,
                       help="complete checkpoints kept; older ones are deleted after a new one "
                            "is complete")
    group.add_argument("--resume-from-checkpoint", default=None,
                       help="checkpoint folder, or 'latest' for the newest complete one in "
                            "<output-dir>/checkpoints")
    group.add_argument("--stop-after-steps", type=int, default=None,
                       help="save a checkpoint and exit after this many steps in this process; "
                            "the schedule still follows --max-steps/--epochs (time-limited jobs: "
                            "rerun with --resume-from-checkpoint latest)")
    group.add_argument("--report-to", default="tensorboard",
                       help="Accelerate trackers: tensorboard, wandb, all, none (comma-separated)")
    group.add_argument("--success-threshold", type=float, default=None,
                       help="val loss the fine-tune must beat; default: step-0 val loss x "
                            "--success-ratio")
    group.add_argument("--success-ratio", type=float, default=0.956,
                       help="default threshold as a fraction of the step-0 val loss (the paper's "
                            "0.34 / 0.3557)")
    group.add_argument("--no-progress-bar", action="store_true")
    group.add_argument("--debug-log-sample-ids", action="store_true",
                       help="write the sample ids each rank trained on to "
                            "<output-dir>/debug/sample_ids_rank<r>.jsonl")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="accelerate launch train_accelerate.py",
        description="Pretrain or fine-tune TopoFlow; with no arguments, fine-tune topoflow-base "
                    "with the elevation bias on block 0 on the embedded corpus and write a report.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    _add_model_args(parser)
    _add_data_args(parser)
    _add_optim_args(parser)
    _add_run_args(parser)
    return parser


def _validate(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.config is not None and not args.from_scratch:
        parser.error("--config only applies with --from-scratch (a loaded model has its config)")
    if args.from_scratch and args.config is None:
        args.config = "base"
    if args.elevation_blocks is None:
        args.elevation_blocks = [] if args.from_scratch else [0]
    if args.output_dir is None:
        args.output_dir = ("outputs/topoflow-pretrain" if args.from_scratch
                           else "outputs/topoflow-finetune")
    positive = ("batch_size", "eval_batch_size", "gradient_accumulation_steps", "epochs",
                "eval_every", "max_nonfinite_steps", "save_total_limit")
    for name in positive:
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    for name in ("eval_batches", "checkpointing_steps"):
        if getattr(args, name) < 0:
            parser.error(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    if args.stop_after_steps is not None and args.stop_after_steps < 1:
        parser.error(f"--stop-after-steps must be >= 1, got {args.stop_after_steps}")
    if args.max_steps is not None and args.max_steps < 1:
        parser.error(f"--max-steps must be >= 1, got {args.max_steps}")
    _validate_numbers(parser, args)
    if args.trainable in ("new", "elevation", "bias-blocks") and not args.elevation_blocks:
        parser.error(f"--trainable {args.trainable} needs --elevation-blocks (got none)")


# Real-valued flags: (lowest allowed, whether the lowest is allowed itself, why). NaN and Inf are
# refused for all of them: they would surface steps later as NaN weights or a silently disabled
# clip, naming the weights instead of the flag.
_NUMBER_RULES: dict[str, tuple[float, bool, str]] = {
    "learning_rate": (0.0, False, ""),
    "alpha_learning_rate": (0.0, True, ""),
    "weight_decay": (0.0, True, "a negative decay grows the weights"),
    "max_grad_norm": (0.0, True, "0 disables clipping"),
    "elevation_scale": (0.0, False, "a height in metres"),
    "alpha_init": (0.0, True, "alpha < 0 switches the bias off for good"),
    "success_threshold": (0.0, False, "a validation loss"),
    "success_ratio": (0.0, False, "a fraction of the step-0 loss"),
    "warmup_steps": (0.0, True, ""),
}


def _validate_numbers(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    for name, (lowest, inclusive, why) in _NUMBER_RULES.items():
        value = getattr(args, name)
        if value is None:
            continue
        ok = math.isfinite(value) and (value >= lowest if inclusive else value > lowest)
        if not ok:
            bound = f">= {lowest:g}" if inclusive else f"> {lowest:g}"
            reason = f" ({why})" if why else ""
            parser.error(f"--{name.replace('_', '-')} must be a finite number {bound}{reason}, "
                         f"got {value}")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse and check the command line; errors exit with argparse's usage message."""
    parser = build_parser()
    args = parser.parse_args(argv)
    _validate(parser, args)
    args.report_to = [] if args.report_to.strip().lower() in ("", "none") else [
        name.strip() for name in args.report_to.split(",") if name.strip()]
    return args
