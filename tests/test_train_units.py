"""The pieces of train_accelerate.py that need no subprocess: arguments, loading report,
trainable selection, corpus/model checks, output-dir guard, non-finite guard, verdict, and the
streamed evaluation's arithmetic on a real model and corpus."""

from __future__ import annotations

import json
import math

import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState

import train_accelerate
from configuration_topoflow import TopoFlowConfig
from modeling_topoflow import TopoFlowForForecasting
from topoflow.corpus import CorpusMetadata
from topoflow.data import make_forecast_dataset
from topoflow.training.args import parse_args
from topoflow.training.data import make_loader
from topoflow.training.evaluation import evaluate
from topoflow.training.guards import NonFiniteGuard, TrainingAborted
from topoflow.training.model_setup import (
    MissingKeysError,
    build_from_scratch_config,
    check_corpus_matches_config,
    make_loading_report,
    select_trainable,
)
from topoflow.training.report import make_verdict

TINY = {"patch_size": 2, "embed_dim": 16, "depth": 2, "num_heads": 2, "mlp_ratio": 2.0,
        "decoder_depth": 2, "drop_path": 0.0, "drop_rate": 0.0}


def test_defaults_are_the_researchers_experiment():
    args = parse_args([])
    assert (args.model, args.elevation_blocks, args.alpha_init, args.elevation_scale) == (
        "topoflow-base", [0], 0.0, 1000.0)
    assert args.epochs == 1 and args.max_steps is None and args.trainable == "all"
    assert args.output_dir == "outputs/topoflow-finetune" and args.report_to == ["tensorboard"]
    scratch = parse_args(["--from-scratch"])
    assert scratch.config == "base" and scratch.elevation_blocks == []
    assert scratch.output_dir == "outputs/topoflow-pretrain"


@pytest.mark.parametrize("argv", [
    ["--config", "tiny"],  # a loaded model has its own config
    ["--elevation-blocks", "0,x"],
    ["--trainable", "everything"],
    ["--elevation-scale", "0"],
    ["--elevation-blocks", "none", "--trainable", "new"],
])
def test_bad_arguments_exit_with_usage(argv):
    with pytest.raises(SystemExit) as exit_info:
        parse_args(argv)
    assert exit_info.value.code == 2


def test_loading_report_accepts_exactly_the_new_bias_keys():
    info = {"missing_keys": ["topoflow.blocks.0.attn.elevation_alpha",
                             "topoflow.blocks.0.attn.H_scale"],
            "unexpected_keys": [], "mismatched_keys": []}
    report = make_loading_report(info, [0], model_name="base", allow_missing=False)
    assert len(report.missing_expected) == 2 and report.missing_other == []
    info["missing_keys"].append("head.0.weight")
    with pytest.raises(MissingKeysError, match=r"head\.0\.weight"):
        make_loading_report(info, [0], model_name="base", allow_missing=False)
    report = make_loading_report(info, [0], model_name="base", allow_missing=True)
    assert report.missing_other == ["head.0.weight"]
    # Block 10 is not block 0: its keys are not "expected" when block 0 was asked for.
    info = {"missing_keys": ["topoflow.blocks.10.attn.H_scale"]}
    with pytest.raises(MissingKeysError):
        make_loading_report(info, [0], model_name="base", allow_missing=False)


@pytest.fixture(scope="module")
def corpus_meta(synthetic_corpus):
    return CorpusMetadata.load(synthetic_corpus)


@pytest.fixture(scope="module")
def tiny_model(corpus_meta, tmp_path_factory):
    path = tmp_path_factory.mktemp("config") / "tiny.json"
    path.write_text(json.dumps(TINY))
    config = build_from_scratch_config(str(path), corpus_meta, elevation_blocks=[0],
                                       elevation_scale=1000.0, alpha_init=0.0)
    torch.manual_seed(0)
    return TopoFlowForForecasting(config).eval()


def test_from_scratch_config_comes_from_the_corpus(corpus_meta, tiny_model):
    config = tiny_model.config
    assert config.img_size == [corpus_meta.height, corpus_meta.width]
    assert config.lead_times_hours == [12, 24]  # the synthetic corpus's halo is 24 h
    assert config.variable_mean["pm25"] == corpus_meta.normalization["pm25"]["mean"]
    check_corpus_matches_config(config, corpus_meta)


def test_corpus_that_cannot_feed_the_model_is_refused(corpus_meta, tiny_model):
    config = TopoFlowConfig(**{**tiny_model.config.to_dict(), "variables": ["u", "nox"],
                               "variable_mean": {**tiny_model.config.variable_mean, "nox": 0.0},
                               "variable_std": {**tiny_model.config.variable_std, "nox": 1.0}})
    with pytest.raises(ValueError, match=r"lacks the model's input variables \['nox'\]"):
        check_corpus_matches_config(config, corpus_meta)
    config = TopoFlowConfig(**{**tiny_model.config.to_dict(), "img_size": [8, 6]})
    with pytest.raises(ValueError, match="grid is 4x6"):
        check_corpus_matches_config(config, corpus_meta)


@pytest.mark.parametrize("mode, expected", [
    ("new", {"topoflow.blocks.0.attn.elevation_alpha"}),
    ("elevation", {"topoflow.blocks.0.attn.elevation_alpha"}),
])
def test_trainable_selection_freezes_the_rest(tiny_model, mode, expected):
    chosen = select_trainable(tiny_model, mode, blocks=[0],
                              new_keys=["topoflow.blocks.0.attn.elevation_alpha",
                                        "topoflow.blocks.0.attn.H_scale"])
    assert set(chosen) == expected
    assert {n for n, p in tiny_model.named_parameters() if p.requires_grad} == expected
    head = select_trainable(tiny_model, "head", blocks=[0], new_keys=[])
    assert head and all(name.startswith("head.") for name in head)
    block = select_trainable(tiny_model, "bias-blocks", blocks=[0], new_keys=[])
    assert all(".blocks.0." in name for name in block)
    select_trainable(tiny_model, "all", blocks=[0], new_keys=[])


def test_unknown_model_name_and_missing_corpus_are_clear_errors(tmp_path):
    from topoflow.hub import UnknownModelNameError

    args = parse_args(["--model", "no-such-model", "--output-dir", str(tmp_path)])
    with pytest.raises(UnknownModelNameError, match="no-such-model"):
        train_accelerate.load_model(args, None, None)
    args = parse_args(["--corpus", str(tmp_path / "nowhere")])
    with pytest.raises(FileNotFoundError, match="nowhere"):
        train_accelerate.resolve_corpus(args, None)


def test_output_dir_holding_another_run_is_refused(tmp_path):
    (tmp_path / "report.json").write_text("{}")
    (tmp_path / "run_info.json").write_text("{}")
    with pytest.raises(train_accelerate.OutputDirError, match="holds another run"):
        train_accelerate.previous_run_outputs(tmp_path, resuming=False, overwrite=False)
    assert train_accelerate.previous_run_outputs(tmp_path, resuming=False, overwrite=True) == [
        "run_info.json", "report.json"]
    assert train_accelerate.previous_run_outputs(tmp_path, resuming=True, overwrite=False) == []
    assert train_accelerate.previous_run_outputs(tmp_path / "new", resuming=False,
                                                 overwrite=False) == []


def test_nonfinite_guard_skips_counts_and_aborts():
    guard = NonFiniteGuard(limit=2)
    assert guard.observe(False, step=1) is True
    assert guard.observe(True, step=2) is False
    assert guard.observe(False, step=3) is True
    with pytest.raises(TrainingAborted, match="2 consecutive"):
        guard.observe(False, step=4)
    assert guard.total_skipped == 3


def test_verdict():
    verdict = make_verdict(step0_loss=0.3557, final_loss=0.33, threshold=0.34)
    assert verdict["verdict"].startswith("success") and verdict["below_threshold"]
    assert make_verdict(0.3557, 0.345, 0.34)["verdict"].startswith("partial")
    assert make_verdict(0.3557, 0.36, 0.34)["verdict"].startswith("no improvement")
    assert make_verdict(0.3557, math.nan, 0.34)["verdict"].startswith("failed")


@pytest.fixture
def accelerator():
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    yield Accelerator(cpu=True)
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def test_streamed_eval_pools_every_valid_cell_once(synthetic_corpus, tiny_model, accelerator):
    config = tiny_model.config
    dataset = make_forecast_dataset(
        synthetic_corpus, "validation", variables=config.variables,
        target_variables=config.target_variables, lead_times_hours=config.lead_times_hours,
        normalization={"mean": config.variable_mean, "std": config.variable_std}, shuffle=False)
    loader = make_loader(dataset, batch_size=5)
    sse, cells, samples = 0.0, 0, 0
    with torch.no_grad():
        for batch in loader:
            out = tiny_model(**batch)
            valid = torch.isfinite(batch["labels"]) & batch["region_mask"][:, None]
            sse += float(((out.forecast - batch["labels"].nan_to_num())[valid] ** 2).double().sum())
            cells += int(valid.sum())
            samples += len(batch["sample_ids"])
    result = evaluate(tiny_model, loader, accelerator)
    assert (result.n_samples, result.n_cells) == (samples, cells)
    assert result.loss == pytest.approx(sse / cells, rel=1e-6)
    # The bounded subset is spread over the split and the same at every call.
    subset = evaluate(tiny_model, loader, accelerator, max_batches=2, stride=3)
    assert subset.n_samples == 10 and not subset.full
    assert evaluate(tiny_model, loader, accelerator, max_batches=2, stride=3) == subset



def test_alpha_gets_its_own_rate_and_stays_nonnegative(tiny_model):
    """At the shared rate alpha (useful values O(1)) could move only ~lr per step; below 0 it would
    be dead for good, because the clamped bias and its gradient are both 0 there."""
    args = parse_args(["--learning-rate", "1e-3"])
    optimizer = train_accelerate.make_optimizer(tiny_model, args)
    alpha = tiny_model.topoflow.blocks[0].attn.elevation_alpha
    (group,) = [g for g in optimizer.param_groups if g.get("name") == train_accelerate.ALPHA_GROUP]
    assert group["params"] == [alpha] and group["weight_decay"] == 0.0
    assert group["lr"] == pytest.approx(1e-3 / tiny_model.config.initializer_range)
    others = [p for g in optimizer.param_groups if g is not group for p in g["params"]]
    assert all(p is not alpha for p in others)
    assert train_accelerate.make_optimizer(
        tiny_model, parse_args(["--alpha-learning-rate", "0.1"])).param_groups[-1]["lr"] == 0.1

    # A gradient that pushes alpha below 0: the projected step stops at 0 ...
    with torch.no_grad():
        alpha.fill_(0.0)
    alpha.grad = torch.tensor(1.0)
    optimizer.step()
    tiny_model.project_elevation_alpha_()
    assert alpha.item() == 0.0
    # ... and alpha grows again as soon as the gradient turns.
    for _ in range(3):
        alpha.grad = torch.tensor(-1.0)
        optimizer.step()
        tiny_model.project_elevation_alpha_()
    assert alpha.item() > 0.0
    with torch.no_grad():  # the fixture is shared with other tests
        alpha.fill_(0.0)
    alpha.grad = None
