"""train_accelerate.py guards, in real subprocesses on the synthetic corpus: resume invariants
(settings, corpus content), no duplicated final validation, one run per output folder (a lock a
killed run cannot leave stuck), --overwrite that deletes only what a run wrote, orphaned workers
that stop, completion markers that cannot skip their checks, and numeric flags and config
fields validated where they enter."""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from configuration_topoflow import TopoFlowConfig
from tests.fixtures_corpus import write_synthetic_corpus
from tests.test_train_script import REPO, SCRIPT, TINY_CONFIG, _args, _csv_rows, _env, _run
from topoflow.training.args import parse_args
from topoflow.training.checkpoints import CheckpointError, validate_checkpoint
from topoflow.training.run_lock import LOCK_FILE


@pytest.fixture(scope="module")
def tiny_config(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("config") / "tiny.json"
    path.write_text(json.dumps(TINY_CONFIG))
    return path


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory, tiny_config) -> tuple[Path, Path, list[str]]:
    """A run stopped after 3 of 6 steps, on its own copy of a synthetic corpus."""
    root = tmp_path_factory.mktemp("stopped")
    corpus = root / "corpus"
    write_synthetic_corpus(corpus)
    out = root / "run"
    args = _args(corpus, tiny_config, out, "--checkpointing-steps", "3")
    _run([*args, "--stop-after-steps", "3"])
    return corpus, out, args


@pytest.mark.parametrize("changed, flag", [
    (["--eval-split", "test"], "--eval-split 'validation' (now 'test')"),
    (["--elevation-direction", "upslope"], "--elevation-direction None (now 'upslope')"),
    (["--max-steps", "8"], "--max-steps 6 (now 8)"),
    (["--alpha-learning-rate", "0.5"], "--alpha-learning-rate None (now 0.5)"),
])  # fmt: skip
def test_resume_with_changed_settings_is_refused_naming_the_flag(stopped_run, changed, flag):
    _, _, args = stopped_run
    done = _run([*args, *changed, "--resume-from-checkpoint", "latest"], expect=2)
    assert flag in done.stderr


def test_resume_on_a_corpus_rebuilt_in_place_is_refused(stopped_run, tmp_path):
    corpus, out, args = stopped_run
    saved = tmp_path / "saved"
    shutil.move(corpus, saved)
    try:
        write_synthetic_corpus(corpus, seed=1)  # same path, other data
        done = _run([*args, "--resume-from-checkpoint", "latest"], expect=2)
        assert "other corpus content" in done.stderr
    finally:
        shutil.rmtree(corpus, ignore_errors=True)
        shutil.move(saved, corpus)


def test_final_validation_is_not_written_twice_when_a_finished_run_is_resumed(stopped_run):
    _, out, args = stopped_run
    _run([*args, "--resume-from-checkpoint", "latest"])
    first = (out / "val_loss.csv").read_text()
    rows = _csv_rows(out / "val_loss.csv")
    assert [(r["step"], r["full"]) for r in rows].count(("6", "True")) == 1
    report = json.loads((out / "report.json").read_text())
    _run([*args, "--resume-from-checkpoint", "latest"])  # rerun of the finished run
    assert (out / "val_loss.csv").read_text() == first
    assert json.loads((out / "report.json").read_text())["final_eval"] == report["final_eval"]


def test_completion_marker_that_would_skip_checks_is_refused(stopped_run, tmp_path):
    _, out, _ = stopped_run
    source = sorted((out / "checkpoints").glob("checkpoint-*"))[0]
    for text, expected in [('{"format": 1, "step": 3', "unreadable completion marker"),
                           ("{}", "format None"),
                           ('{"format": 1, "step": 3, "world_size": 1, "files": {}}',
                            "'files' lists no file")]:  # fmt: skip
        copy = tmp_path / f"ckpt-{len(text)}"
        shutil.copytree(source, copy)
        (copy / "checkpoint_complete.json").write_text(text)
        with pytest.raises(CheckpointError, match=expected) as err:
            validate_checkpoint(copy, world_size=1)
        assert "checkpoint_complete.json" in str(err.value)
    copy = tmp_path / "unlisted"
    shutil.copytree(source, copy)
    marker = json.loads((copy / "checkpoint_complete.json").read_text())
    marker["files"].pop("optimizer.bin")
    (copy / "checkpoint_complete.json").write_text(json.dumps(marker))
    with pytest.raises(CheckpointError, match=r"\['optimizer.bin'\] not listed"):
        validate_checkpoint(copy, world_size=1)


def _wait_for(proc: subprocess.Popen, text: str, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    for line in proc.stderr:
        if text in line or time.time() > deadline:
            return


def test_one_run_owns_an_output_folder_and_a_killed_run_releases_it(
    synthetic_corpus, tiny_config, tmp_path
):
    out = tmp_path / "run"
    args = _args(synthetic_corpus, tiny_config, out, "--checkpointing-steps", "2")
    first = subprocess.Popen([sys.executable, SCRIPT, *args], cwd=REPO, text=True,
                             env=_env(TOPOFLOW_TEST_PAUSE_IN_SAVE_AT_STEP="4"),
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip
    try:
        _wait_for(first, "paused in save of step 4")
        second = _run([*args, "--resume-from-checkpoint", "latest"], expect=2)
        assert "is in use by another run" in second.stderr
        assert f'"pid": {first.pid}' in second.stderr
    finally:
        first.kill()  # SIGKILL: the lock goes with the process
        first.wait()
    _run([*args, "--resume-from-checkpoint", "latest"])
    assert (out / "report.json").is_file()


def test_overwrite_never_deletes_a_users_folders(synthetic_corpus, tiny_config, tmp_path):
    out = tmp_path / "run"
    (out / "model").mkdir(parents=True)
    (out / "model" / "my_weights.safetensors").write_bytes(b"mine")
    (out / "logs").mkdir()
    (out / "logs" / "lab_notebook.txt").write_text("mine")
    done = _run([*_args(synthetic_corpus, tiny_config, out), "--overwrite"], expect=2)
    assert "holds files no run wrote" in done.stderr and "nothing was deleted" in done.stderr
    assert (out / "model" / "my_weights.safetensors").read_bytes() == b"mine"
    assert (out / "logs" / "lab_notebook.txt").read_text() == "mine"


def test_killing_the_launcher_stops_its_worker(synthetic_corpus, tiny_config, tmp_path):
    out = tmp_path / "run"
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1",
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    args = _args(synthetic_corpus, tiny_config, out, "--eval-every", "1000")
    args[args.index("--max-steps") + 1] = "100000"
    proc = subprocess.Popen([*launcher, SCRIPT, *args], cwd=REPO, env=_env(), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        for line in proc.stdout:
            if "step 0: full val loss" in line or "step 0: val loss" in line:
                break
        worker = json.loads((out / LOCK_FILE).read_text())["pid"]
        assert worker != proc.pid
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            os.kill(worker, 0)
        except ProcessLookupError:
            break
        time.sleep(0.5)
    else:
        os.kill(worker, signal.SIGKILL)
        pytest.fail(f"worker {worker} kept running after its launcher was killed")


@pytest.mark.parametrize("argv, message", [
    (["--alpha-learning-rate", "-10"], "--alpha-learning-rate must be a finite number >= 0"),
    (["--weight-decay", "-0.1"], "--weight-decay must be a finite number >= 0"),
    (["--weight-decay", "nan"], "--weight-decay must be a finite number >= 0"),
    (["--learning-rate", "inf"], "--learning-rate must be a finite number > 0"),
    (["--max-grad-norm", "-1"], "--max-grad-norm must be a finite number >= 0"),
    (["--max-grad-norm", "nan"], "--max-grad-norm must be a finite number >= 0"),
    (["--warmup-steps", "-5"], "--warmup-steps must be a finite number >= 0"),
    (["--alpha-init", "-5"], "--alpha-init must be a finite number >= 0"),
    (["--success-threshold", "nan"], "--success-threshold must be a finite number > 0"),
    (["--elevation-scale", "nan"], "--elevation-scale must be a finite number > 0"),
])  # fmt: skip
def test_numeric_flags_are_validated_naming_the_flag(argv, message, capsys):
    with pytest.raises(SystemExit):
        parse_args(argv)
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("fields, message", [
    ({"patch_size": "4"}, "TopoFlowConfig.patch_size must be an int, got '4' (str)"),
    ({"img_size": [128, "256"]}, "TopoFlowConfig.img_size[1] must be an int"),
    ({"elevation_scale": "1000"}, "TopoFlowConfig.elevation_scale must be a number"),
    ({"elevation_alpha_init": -5.0}, "TopoFlowConfig.elevation_alpha_init must be finite and >= 0"),
    ({"elevation_bias_block": [0]}, "unknown field 'elevation_bias_block'; did you mean "
                                    "'elevation_bias_blocks'"),
])  # fmt: skip
def test_config_fields_are_validated_naming_the_field(fields, message):
    with pytest.raises(ValueError) as err:
        TopoFlowConfig(**fields)
    assert message in str(err.value)


def _small_file_size_limit() -> None:
    # Writes past 60 kB fail with EFBIG as on a full disk (SIGXFSZ ignored so the write returns
    # the error instead of killing the process): the 100 kB optimizer state cannot be saved.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (60_000, 60_000))


def test_failed_checkpoint_write_names_the_checkpoint_and_free_space(
    synthetic_corpus, tiny_config, tmp_path
):
    out = tmp_path / "run"
    args = _args(synthetic_corpus, tiny_config, out, "--checkpointing-steps", "3")
    done = subprocess.run([sys.executable, SCRIPT, *args], cwd=REPO, env=_env(), text=True,
                          capture_output=True, timeout=600, preexec_fn=_small_file_size_limit)
    assert done.returncode == 2, done.stderr[-3000:]
    assert "saving the checkpoint of step 3 into" in done.stderr
    assert "free on that file system" in done.stderr
    assert not (out / "checkpoints" / "checkpoint-00000003").exists()
