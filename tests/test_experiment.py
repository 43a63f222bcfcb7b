"""`python -m topoflow.experiment` end to end on the tiny embedded corpus, in-process, tiny budgets.

One baseline (trained from scratch for a few steps) is shared; the experiments fine-tune it for
3 steps per arm and seed, so the numbers mean nothing, but every file of the report must be there
and the statistics must behave: identical arms are equivalent, never better or worse.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from topoflow.experiment import load_evaluation, main
from topoflow.seed_stats import format_percent

STEPS = ["--max-steps", "3", "--batch-size", "4", "--eval-every", "2", "--eval-batches", "1",
         "--launcher", "inprocess", "--n-boot", "200", "--eval-batch-size", "16"]


@pytest.fixture(scope="module")
def baseline(tiny_corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    import train_accelerate

    out = tmp_path_factory.mktemp("baseline") / "run"
    code = train_accelerate.main([
        "--from-scratch", "--config", "tiny", "--corpus", str(tiny_corpus), "--output-dir",
        str(out), "--max-steps", "4", "--batch-size", "4", "--eval-every", "100",
        "--eval-batches", "1", "--learning-rate", "3e-3", "--report-to", "none",
        "--no-progress-bar"])
    assert code == 0
    from topoflow.experiment.runner import _reset_accelerate_state

    _reset_accelerate_state()
    return out / "model"


@pytest.fixture(scope="module")
def experiment(baseline: Path, tiny_corpus: Path, tmp_path_factory: pytest.TempPathFactory
               ) -> Path:
    out = tmp_path_factory.mktemp("experiment") / "exp"
    code = main(["--output-dir", str(out), "--model", str(baseline), "--corpus", str(tiny_corpus),
                 "--arms", "control", "topoflow", "--seeds", "0", "1", "--val-shards", "2",
                 "--train-arg=--debug-log-sample-ids", *STEPS])
    assert code == 0
    return out


def test_report_verdict_recomputed_from_the_saved_per_sample_errors(experiment: Path) -> None:
    # Independently of topoflow.stats: each sample's loss from its saved squared-error sums, the
    # mean over the two seeds by sample id, then the pooled mean reduction and relative gain.
    import numpy as np

    def seed_averaged(arm: str) -> dict[int, float]:
        by_id: dict[int, list[float]] = {}
        for seed in (0, 1):
            rows = load_evaluation(experiment / "eval" / arm / f"seed{seed}").per_sample
            totals = rows.sq_err_sum.sum(1) / rows.count.sum(1)
            for sample_id, loss in zip(rows.sample_ids.tolist(), totals.tolist(), strict=True):
                by_id.setdefault(sample_id, []).append(loss)
        return {i: float(np.mean(v)) for i, v in by_id.items() if np.isfinite(v).all()}

    control, arm = seed_averaged("control"), seed_averaged("topoflow")
    assert control.keys() == arm.keys()
    ids = sorted(control)
    reduction = np.array([control[i] - arm[i] for i in ids])
    # The sample-level view (secondary to the seed-level verdict) pools the seed-averaged samples.
    boot = json.loads((experiment / "report" / "report.json").read_text())[
        "comparisons"]["topoflow"]["sample_level"]["bootstrap"]
    assert boot["n_samples"] == len(ids)
    assert boot["mean_reduction"] == pytest.approx(reduction.mean(), rel=1e-9, abs=1e-12)
    assert boot["relative_gain"] == pytest.approx(
        reduction.sum() / sum(control[i] for i in ids), rel=1e-9, abs=1e-12)


def test_two_arms_two_seeds_write_a_complete_report(experiment: Path) -> None:
    report_dir = experiment / "report"
    report = json.loads((report_dir / "report.json").read_text())
    assert sorted((r["arm"], r["seed"]) for r in report["runs"]) == [
        ("control", 0), ("control", 1), ("topoflow", 0), ("topoflow", 1)]
    comparison = report["comparisons"]["topoflow"]
    verdict = comparison["verdict"]
    assert verdict["seeds"] == [0, 1] and len(verdict["gain_per_seed"]) == 2
    assert verdict["verdict"] in ("better", "worse", "equivalent", "inconclusive")
    lo, hi = verdict["interval_95"]
    assert lo <= verdict["mean_gain"] <= hi
    assert lo <= min(verdict["bootstrap"]["interval_95"][0], verdict["t_interval_95"][0])
    assert verdict["margin"] == 0.01 and verdict["mde"] is not None
    boot = comparison["sample_level"]["bootstrap"]
    assert boot["ci"][0] <= boot["mean_reduction"] <= boot["ci"][1]
    assert 0.0 <= comparison["sample_level"]["wilcoxon_block_means"]["pvalue"] <= 1.0
    # The per-sample losses of every arm x seed are kept beside the report for re-scoring.
    from safetensors.numpy import load_file

    stored = load_file(str(report_dir / "per_seed_losses.safetensors"))
    assert set(stored) == {f"{arm}/seed{s}/{k}" for arm in ("control", "topoflow")
                           for s in (0, 1) for k in ("sample_ids", "loss")}
    # 6 pollutants x the tiny corpus's lead times, each with an interval.
    leads = report["scores"]["control"]["lead_times_hours"]
    assert len(comparison["gains_by_variable_and_lead"]) == 6 * len(leads)
    assert {r["region"] for r in comparison["regions"]["region"]} >= {"sichuan_basin", "plateau"}
    assert len(comparison["regions"]["elevation_band"]) == 6 * 4
    assert set(report["learned_alpha"]["topoflow"]["0"]) == {"0"}
    assert report["learned_alpha"]["control"]["0"] == {}
    for figure in report["figures"]:
        png = report_dir / figure["file"]
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    names = {f["file"] for f in report["figures"]}
    assert {"val_loss_curves.png", "gain_map_topoflow.png", "gain_bars_topoflow.png",
            "attention_bias_topoflow.png"} <= names
    md = (report_dir / "report.md").read_text()
    for heading in ("## Verdict: topoflow vs control", "### Per seed", "### Sample-level view",
                    "### Per pollutant and lead time", "| elevation band |", "| region |",
                    "## Learned elevation alpha", "## Figures"):
        assert heading in md
    assert "95% CI" in md and "Wilcoxon" in md
    # The training view kept 2 of the 4 validation shards; evaluation used the full corpus.
    view = json.loads((experiment / "corpus-view" / "topoflow_corpus.json").read_text())
    assert sum(s["split"] == "validation" for s in view["shards"]) == 2
    assert report["plan"]["eval"]["n_samples"] > 0
    # The three references, scored like the arms on the same samples, beside them.
    references = ["persistence", "climatology", "damped_persistence"]
    losses = report["test_loss"]
    assert list(losses) == ["control", "topoflow", *(f"reference: {r}" for r in references)]
    per_seed = comparison["per_seed_test_loss"]
    assert losses["control"]["all"] == pytest.approx(
        sum(v["control"] for v in per_seed.values()) / len(per_seed))
    assert set(losses["control"]) == {"all", *(str(h) for h in leads)}
    for name in references:
        saved = load_evaluation(experiment / "eval" / "references" / name)
        assert losses[f"reference: {name}"]["all"] == saved.per_sample.test_loss()
        own = report["scores"][f"reference: {name}"]["variables"]["o3"]["all"]
        assert own[f"skill_{name}"] == pytest.approx(0.0, abs=1e-12)
        assert report["scores"]["control"]["variables"]["o3"]["all"][f"skill_{name}"] is not None
    assert "## Test loss of every arm and reference forecast" in md
    beaten = any(losses[f"reference: {r}"]["all"] <= losses["control"]["all"] for r in references)
    assert ("**Warning:** the control's test loss" in md) == beaten
    assert "| reference: damped_persistence |" in md and "skill vs damped persistence" in md


def test_rerun_reuses_runs_and_drops_figures_of_arms_no_longer_compared(
        experiment: Path, baseline: Path, tiny_corpus: Path) -> None:
    stale = experiment / "report" / "gain_map_dropped-arm.png"
    stale.write_bytes(b"\x89PNG\r\n\x1a\n old")
    run_report = experiment / "runs" / "topoflow" / "seed0" / "report.json"
    trained = run_report.stat().st_mtime_ns
    reference = experiment / "eval" / "references" / "damped_persistence" / "metrics.json"
    scored = reference.stat().st_mtime_ns
    code = main(["--output-dir", str(experiment), "--model", str(baseline), "--corpus",
                 str(tiny_corpus), "--arms", "control", "topoflow", "--seeds", "0", "1",
                 "--val-shards", "2", "--train-arg=--debug-log-sample-ids", *STEPS])
    assert code == 0
    assert not stale.exists()
    assert (experiment / "report" / "gain_map_topoflow.png").is_file()
    assert run_report.stat().st_mtime_ns == trained  # the run was reused, not retrained
    assert reference.stat().st_mtime_ns == scored  # and the references were not scored again


def test_runs_share_data_order_across_arms(experiment: Path) -> None:
    """Arm and control of one seed train on the same batches in the same order; seeds differ."""

    def order(arm: str, seed: int) -> list[list[int]]:
        log = experiment / "runs" / arm / f"seed{seed}" / "debug" / "sample_ids_rank0.jsonl"
        return [json.loads(line)["ids"] for line in log.read_text().splitlines()]

    assert len(order("control", 0)) == 3
    assert order("control", 0) == order("topoflow", 0)
    assert order("control", 1) == order("topoflow", 1)
    assert order("control", 0) != order("control", 1)


def test_identical_arms_are_never_better_or_worse(baseline: Path, tiny_corpus: Path,
                                                   tmp_path: Path) -> None:
    """Two arms with the same recipe, trained for real: every seed gives exactly the same loss,
    so the verdict is 'equivalent', never 'better' or 'worse'."""
    out = tmp_path / "twins"
    code = main(["--output-dir", str(out), "--model", str(baseline), "--corpus", str(tiny_corpus),
                 "--arms", "control", "twin:blocks=none", "--seeds", "0", "1", "--no-climatology",
                 "--eval-init-stride", "2", *STEPS])
    assert code == 0
    report = json.loads((out / "report" / "report.json").read_text())
    verdict = report["comparisons"]["twin"]["verdict"]
    assert verdict["gain_per_seed"] == [0.0, 0.0]
    assert verdict["verdict"] == "equivalent" and verdict["difference_detected"] is False
    assert report["comparisons"]["twin"]["sample_level"]["bootstrap"]["mean_reduction"] == 0.0
    md = (out / "report" / "report.md").read_text()
    assert "**Verdict (equivalent, training seed as the unit):** Equivalent within +/-1%" in md
    # Without the training-split references only persistence is scored, and said so.
    assert list(report["test_loss"]) == ["control", "twin", "reference: persistence"]
    assert report["scores"]["control"]["variables"]["o3"]["all"]["skill_climatology"] is None


def test_finished_runs_are_adopted_without_training(experiment: Path, tiny_corpus: Path,
                                                    tmp_path: Path,
                                                    capsys: pytest.CaptureFixture) -> None:
    runs = [f"{arm}:{seed}={experiment / 'runs' / arm / f'seed{seed}'}"
            for arm in ("control", "topoflow") for seed in (0, 1)]
    out = tmp_path / "adopted"
    # The scores of these exact run folders are reused (same models, split and options).
    shutil.copytree(experiment / "eval", out / "eval")
    argv = ["--output-dir", str(out), "--corpus", str(tiny_corpus), "--n-boot", "200",
            "--pilot", "--target-mde", "0.005"]
    for run in runs:
        argv += ["--run", run]
    assert main(argv) == 0
    assert not (out / "runs").exists()  # nothing was trained
    adopted = json.loads((out / "report" / "report.json").read_text())
    original = json.loads((experiment / "report" / "report.json").read_text())
    assert all(r["adopted"] for r in adopted["runs"])
    assert (adopted["comparisons"]["topoflow"]["verdict"]["gain_per_seed"]
            == original["comparisons"]["topoflow"]["verdict"]["gain_per_seed"])
    # Pilot mode: the seeds needed for the target are printed and the report says it is a pilot.
    verdict = adopted["comparisons"]["topoflow"]["verdict"]
    assert verdict["target_mde"] == 0.005
    printed = capsys.readouterr().out
    sd = format_percent(verdict["sd_gain"], sign=False)
    assert f"pilot: topoflow: per-seed change sd {sd}" in printed
    assert f"{verdict['seeds_needed']} seeds reach 0.5% at 80% power" in printed
    assert "**Pilot:** this run sizes the experiment" in (out / "report" / "report.md").read_text()


def test_bad_margin_is_refused_naming_the_flag(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--output-dir", "unused", "--margin", "5"])
    assert exit_info.value.code == 2
    assert "--margin is a fraction of the loss in (0, 1)" in capsys.readouterr().err


def test_control_missing_is_a_clear_error(baseline: Path, tiny_corpus: Path, tmp_path: Path,
                                          capsys: pytest.CaptureFixture) -> None:
    code = main(["--output-dir", str(tmp_path / "x"), "--model", str(baseline), "--corpus",
                 str(tiny_corpus), "--arms", "topoflow", "alpha2", *STEPS])
    assert code == 2
    assert "lack the 'control' arm" in capsys.readouterr().err


def test_unknown_arm_is_a_clear_error(baseline: Path, tiny_corpus: Path, tmp_path: Path,
                                      capsys: pytest.CaptureFixture) -> None:
    code = main(["--output-dir", str(tmp_path / "x"), "--model", str(baseline), "--corpus",
                 str(tiny_corpus), "--arms", "control", "topoflw", *STEPS])
    assert code == 2
    err = capsys.readouterr().err
    assert "unknown arm 'topoflw'" in err and "topoflow" in err


def test_adopted_runs_without_control_or_folder_fail_clearly(experiment: Path, tiny_corpus: Path,
                                                             tmp_path: Path,
                                                             capsys: pytest.CaptureFixture
                                                             ) -> None:
    base = ["--output-dir", str(tmp_path / "x"), "--corpus", str(tiny_corpus)]
    code = main([*base, "--run", f"topoflow:0={experiment / 'runs' / 'topoflow' / 'seed0'}"])
    assert code == 2
    assert "no run of the 'control' arm" in capsys.readouterr().err
    code = main([*base, "--run", f"control:0={tmp_path / 'nowhere'}"])
    assert code == 2
    assert "does not exist" in capsys.readouterr().err
    # --run trains nothing: an arm asked for without a run is refused, not silently dropped.
    runs = [f"--run={arm}:0={experiment / 'runs' / arm / 'seed0'}"
            for arm in ("control", "topoflow")]
    code = main([*base, *runs, "--arms", "control", "topoflow", "upslope"])
    assert code == 2
    assert "--arms ['upslope']: no --run given for them" in capsys.readouterr().err


def test_mismatched_sample_ids_are_refused(experiment: Path, tiny_corpus: Path, tmp_path: Path,
                                           capsys: pytest.CaptureFixture) -> None:
    """An arm scored on other samples (here: one sample dropped from a stored evaluation) must
    not be paired with the control."""
    from safetensors.torch import load_file, save_file

    out = tmp_path / "tampered"
    shutil.copytree(experiment / "eval", out / "eval")
    per_sample = out / "eval" / "topoflow" / "seed0" / "per_sample.safetensors"
    rows = load_file(str(per_sample))
    save_file({k: v[1:].contiguous() for k, v in rows.items()}, str(per_sample))
    argv = ["--output-dir", str(out), "--corpus", str(tiny_corpus), "--n-boot", "200"]
    for arm in ("control", "topoflow"):
        for seed in (0, 1):
            argv += ["--run", f"{arm}:{seed}={experiment / 'runs' / arm / f'seed{seed}'}"]
    assert main(argv) == 2
    assert "sample ids of topoflow seed 0 differ" in capsys.readouterr().err
