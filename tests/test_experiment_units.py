"""Units of topoflow.experiment without training: arm specs, run arguments, the corpus view, and
the arm-vs-control analysis on synthetic evaluations with a known answer."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from topoflow.experiment.analysis import compare_arm
from topoflow.experiment.arms import ArmSpec, UnknownArmError, parse_arm, parse_arms
from topoflow.experiment.evaluate import EvaluationResult, load_evaluation
from topoflow.experiment.runner import RunRecord, check_runs, parse_run_argument
from topoflow.experiment.subset import make_corpus_view
from topoflow.metrics import PerSampleErrors


def test_known_arms_and_specs_give_training_arguments() -> None:
    assert parse_arm("control").train_args()[:2] == ["--elevation-blocks", "none"]
    alpha2 = parse_arm("alpha2")
    assert alpha2.elevation_blocks == (0,) and alpha2.alpha_init == 2.0
    custom = parse_arm("wide:blocks=1,0;scale=500;alpha=0.5")
    assert custom.train_args() == ["--elevation-blocks", "0,1", "--elevation-scale", "500.0",
                                   "--alpha-init", "0.5", "--trainable", "all",
                                   "--elevation-direction", "downslope"]
    assert custom.same_recipe(ArmSpec("other", (0, 1), 500.0, 0.5))
    assert not custom.same_recipe(parse_arm("blocks01"))
    upslope = parse_arm("up:blocks=0;direction=upslope")
    assert upslope.train_args()[-2:] == ["--elevation-direction", "upslope"]
    assert not upslope.same_recipe(parse_arm("topoflow"))
    assert parse_arm("upslope").same_recipe(upslope)
    with pytest.raises(ValueError, match="direction must be one of"):
        parse_arm("x:blocks=0;direction=sideways")


@pytest.mark.parametrize("text, message", [
    ("topoflw", "unknown arm 'topoflw'"),
    ("x:blocks=0;height=3", "keys ['alpha', 'blocks', 'direction', 'mask_input', 'per_head', "
                            "'placebo', 'rise', 'scale', 'trainable']"),
    ("x:scale=high", "could not convert"),
])
def test_bad_arm_names_and_specs_are_refused(text: str, message: str) -> None:
    with pytest.raises(UnknownArmError, match=message.replace("[", r"\[").replace("]", r"\]")):
        parse_arm(text)


def test_arm_lists_need_the_control_and_unique_names() -> None:
    with pytest.raises(ValueError, match="lack the 'control' arm"):
        parse_arms(["topoflow"])
    with pytest.raises(ValueError, match="unique"):
        parse_arms(["control", "topoflow", "topoflow"])
    with pytest.raises(ValueError, match="H_scale must be > 0"):
        parse_arm("bad:blocks=0;scale=0")


def test_run_arguments_and_seed_pairing() -> None:
    assert parse_run_argument("control:2=/tmp/a=b") == ("control", 2, Path("/tmp/a=b"))
    for bad in ("control=/tmp/a", "control:x=/tmp/a", ":0=/tmp"):
        with pytest.raises(ValueError, match="--run"):
            parse_run_argument(bad)
    runs = [RunRecord("control", 0, "a"), RunRecord("topoflow", 0, "b"),
            RunRecord("control", 1, "c")]
    with pytest.raises(ValueError, match="paired seeds"):
        check_runs(runs)
    with pytest.raises(ValueError, match="no run of the 'control' arm"):
        check_runs(runs[1:2])
    with pytest.raises(ValueError, match="given twice"):
        check_runs([runs[0], runs[0]])


def test_corpus_view_keeps_evenly_spread_shards(synthetic_corpus: Path, tmp_path: Path) -> None:
    from topoflow.corpus import CorpusMetadata
    from topoflow.data import make_forecast_dataset

    view = make_corpus_view(synthetic_corpus, tmp_path / "view", {"validation": 2})
    meta, source = CorpusMetadata.load(view), CorpusMetadata.load(synthetic_corpus)
    kept = [s.file for s in meta.split_shards("validation")]
    all_val = [s.file for s in source.split_shards("validation")]
    assert kept == [all_val[0], all_val[-1]]
    assert len(meta.split_shards("train")) == len(source.split_shards("train"))
    assert meta.normalization == source.normalization
    card = (view / "README.md").read_text()
    assert all_val[0] in card and all_val[1] not in card
    dataset = make_forecast_dataset(view, "validation", variables=["pm25"],
                                    target_variables=["pm25"], lead_times_hours=[6],
                                    shuffle=False)
    assert dataset.n_shards == 2 and sum(1 for _ in dataset) > 0
    # The same selection is reused; another one at the same place is refused.
    assert make_corpus_view(synthetic_corpus, tmp_path / "view", {"validation": 2}) == view
    with pytest.raises(FileExistsError, match="another corpus view"):
        make_corpus_view(synthetic_corpus, tmp_path / "view", {"validation": 1})
    with pytest.raises(ValueError, match="unknown splits"):
        make_corpus_view(synthetic_corpus, tmp_path / "view2", {"valid": 1})


VARIABLES = ["pm25", "o3"]
GRID = (3, 4)


def _evaluation(ids: np.ndarray, mse: np.ndarray, cell_scale: float) -> EvaluationResult:
    """A synthetic evaluation: per-sample per-variable MSE `mse` (N, V) over 12 cells each."""
    count = torch.full((len(ids), len(VARIABLES)), 12.0, dtype=torch.float64)
    rows = PerSampleErrors(torch.as_tensor(ids), torch.as_tensor(mse) * count, count)
    cells = (len(VARIABLES), *GRID)
    state = {"cell_sq_err": torch.full(cells, cell_scale, dtype=torch.float64),
             "cell_count": torch.full(cells, float(len(ids)), dtype=torch.float64)}
    return EvaluationResult({}, state, rows)


def _arms(effect: float, seeds: int = 3, n_init: int = 240) -> dict:
    """Control and arm evaluations; the arm's MSE is (1 - effect) x the control's, plus noise."""
    rng = np.random.default_rng(0)
    init_hours = 420_000 + 6 * np.arange(n_init)
    ids = (init_hours[:, None] * 1000 + np.array([12, 24])[None]).ravel()
    # A slowly varying "weather" signal shared by both arms, as in real paired evaluations.
    weather = 1.0 + 0.5 * np.sin(np.arange(ids.size) / 15.0)[:, None]
    evals: dict = {"control": {}, "arm": {}}
    for seed in range(seeds):
        base = weather * (1.0 + 0.05 * rng.standard_normal((ids.size, len(VARIABLES))))
        noise = 1.0 + 0.01 * rng.standard_normal(base.shape)
        evals["control"][seed] = _evaluation(ids, base, 1.0)
        evals["arm"][seed] = _evaluation(ids, base * (1.0 - effect) * noise, 1.0 - effect)
    return evals


def _compare(evals: dict):
    elevation = np.arange(12, dtype=np.float64).reshape(GRID) * 400.0
    codes = np.array([[0, 1, 1, 2]] * 3)
    return compare_arm(evals, "arm", variables=VARIABLES, elevation_m=elevation,
                       region_codes=codes, region_names={0: "sea", 1: "plain", 2: "plateau"},
                       n_boot=500)


def test_planted_gain_is_detected_with_an_interval_around_it() -> None:
    result = _compare(_arms(effect=0.05))
    verdict = result.verdict
    assert verdict.verdict == "better" and verdict.seeds == [0, 1, 2]
    lo, hi = verdict.interval_95
    assert lo < 0.05 < hi + 0.005 and lo > 0.04
    assert verdict.t_pvalue < 0.01 and verdict.bootstrap is not None
    view = result.sample_level
    assert view.interval_excludes_zero and view.wilcoxon_block_means.pvalue < 0.01
    assert view.bootstrap.relative_gain_ci[0] < 0.05 < view.bootstrap.relative_gain_ci[1] + 0.005
    assert all(g["ci_low"] > 0 for g in result.gains)
    # Region rows: RMSE gain 1 - sqrt(0.95) everywhere the synthetic cells have data.
    gains = [r["gain"] for r in result.regions["region"] if r["gain"] is not None]
    assert np.allclose(gains, 1 - np.sqrt(0.95))
    assert np.allclose(result.gain_map, 1 - np.sqrt(0.95))


def test_identical_arms_give_no_difference() -> None:
    evals = _arms(effect=0.0)
    evals["arm"] = evals["control"]
    result = _compare(evals)
    assert result.verdict.verdict == "equivalent" and not result.verdict.difference_detected
    assert result.verdict.mean_gain == 0.0 and result.verdict.interval_95 == (0.0, 0.0)
    assert result.sample_level.bootstrap.mean_reduction == 0.0
    assert result.sample_level.wilcoxon_block_means.pvalue == 1.0
    assert all(g["gain"] == 0.0 for g in result.gains)


def test_unpaired_inputs_are_refused() -> None:
    evals = _arms(effect=0.0, seeds=2)
    with pytest.raises(ValueError, match="unknown arm 'nope'"):
        compare_arm(evals, "nope", variables=VARIABLES, elevation_m=np.zeros(GRID),
                    region_codes=None, region_names=None)
    shifted = _arms(effect=0.0, seeds=2, n_init=241)
    evals["arm"][1] = shifted["arm"][1]
    with pytest.raises(ValueError, match="sample ids of arm seed 1 differ"):
        _compare(evals)
    del evals["control"]
    with pytest.raises(ValueError, match="no 'control' arm"):
        _compare(evals)


def test_evaluation_round_trips_through_its_folder(tmp_path: Path) -> None:
    original = _arms(effect=0.0, seeds=1)["control"][0]
    original.metrics = {"evaluated": {"split": "test"}}
    original.save(tmp_path / "e")
    loaded = load_evaluation(tmp_path / "e")
    assert torch.equal(loaded.per_sample.sample_ids, original.per_sample.sample_ids)
    assert torch.equal(loaded.state["cell_sq_err"], original.state["cell_sq_err"])
    assert json.loads((tmp_path / "e" / "metrics.json").read_text())["evaluated"]["split"] == "test"
    (tmp_path / "e" / "per_sample.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="lacks per_sample.safetensors"):
        load_evaluation(tmp_path / "e")
