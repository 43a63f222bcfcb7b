"""train_accelerate.py end to end, in real subprocesses, on the synthetic 4 x 6 corpus.

One reference run (6 steps, dropout on, so RNG state matters) is shared: the resumed runs and the
run killed in the middle of a checkpoint save must reproduce it bit for bit, and it is the
baseline that the fine-tune test loads.
"""

from __future__ import annotations

import csv
import json
import math
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]
SCRIPT = str(REPO / "train_accelerate.py")
# Dropout on (drop_path, drop_rate) so that a resume that lost the RNG state would diverge.
TINY_CONFIG = {"patch_size": 2, "embed_dim": 16, "depth": 2, "num_heads": 2, "mlp_ratio": 2.0,
               "decoder_depth": 2, "drop_path": 0.1, "drop_rate": 0.1}
STEPS = 6
# The lock file stays after a run: it is the flock target, and removing it would race a waiter.
RUN_FILES = (".topoflow-run.lock", "checkpoints", "debug", "model", "report.json", "report.md",
             "run_info.json", "train_log.csv", "val_loss.csv", "val_loss_curve.png")


def _env(**extra: str) -> dict[str, str]:
    # One thread per process: the models are tiny and the test machine has two cores.
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), **extra}


def _args(corpus: Path, config: Path, output_dir: Path, *extra: str) -> list[str]:
    return ["--from-scratch", "--config", str(config), "--corpus", str(corpus),
            "--output-dir", str(output_dir), "--max-steps", str(STEPS), "--eval-every", "2",
            "--batch-size", "4", "--eval-batch-size", "8", "--eval-batches", "1",
            "--learning-rate", "3e-3", "--no-progress-bar", "--report-to", "none", *extra]


def _run(args: list[str], *, env: dict[str, str] | None = None, expect: int = 0,
         launcher: list[str] | None = None) -> subprocess.CompletedProcess:
    command = (launcher or [sys.executable]) + [SCRIPT, *args]
    done = subprocess.run(command, cwd=REPO, env=env or _env(), capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == expect, (
        f"exit {done.returncode}\n{done.stdout}\n{done.stderr[-4000:]}")
    return done


def _launch(num_processes: int, *more: str) -> list[str]:
    """`accelerate launch` with explicit flags (the loopback two-machine test)."""
    # accelerate 1.15's `--cpu` starts a single process unless MPI is set up; `--multi_gpu` starts
    # torchrun workers, and the script picks CPU + gloo when there is no CUDA.
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu",
            "--num_processes", str(num_processes), "--mixed_precision", "no",
            "--dynamo_backend", "no", *more]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _assert_same_run(a: Path, b: Path) -> None:
    for name in ("train_log.csv", "val_loss.csv"):
        assert (a / name).read_text() == (b / name).read_text(), f"{name} differs"
    weights_a, weights_b = (load_file(d / "model" / "model.safetensors") for d in (a, b))
    assert weights_a.keys() == weights_b.keys()
    for key in weights_a:
        assert weights_a[key].equal(weights_b[key]), f"weight {key} differs"


def _csv_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def _ids_by_rank(output_dir: Path) -> dict[int, list[int]]:
    found = {}
    for path in sorted((output_dir / "debug").glob("sample_ids_rank*.jsonl")):
        rank = int(path.stem.removeprefix("sample_ids_rank"))
        records = {}
        for line in path.read_text().splitlines():
            record = json.loads(line)
            records[(record["epoch"], record["step"])] = record["ids"]  # a re-run step wins
        found[rank] = [i for key in sorted(records) for i in records[key]]
    return found


@pytest.fixture(scope="module")
def tiny_config(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("config") / "tiny.json"
    path.write_text(json.dumps(TINY_CONFIG))
    return path


@pytest.fixture(scope="module")
def reference_run(synthetic_corpus, tiny_config, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("reference") / "run"
    _run(_args(synthetic_corpus, tiny_config, out, "--checkpointing-steps", "3",
               "--debug-log-sample-ids"))
    return out


def test_reference_run_writes_one_complete_report(reference_run):
    report = json.loads((reference_run / "report.json").read_text())
    assert report["run"]["steps"] == STEPS
    assert report["verdict"]["final_val_loss"] == pytest.approx(
        report["final_eval"]["loss"])
    rows = _csv_rows(reference_run / "val_loss.csv")
    assert [int(r["step"]) for r in rows if r["full"] == "False"] == [0, 2, 4, 6]
    assert [int(r["step"]) for r in rows if r["full"] == "True"] == [0, STEPS]
    assert all(float(r["val_loss"]) > 0 for r in rows)
    for name in ("report.md", "val_loss_curve.png", "train_log.csv", "model/config.json",
                 "model/SHA256SUMS", "model/modeling_topoflow.py"):
        assert (reference_run / name).is_file(), name
    config = json.loads((reference_run / "model" / "config.json").read_text())
    assert config["variable_std"]["pm25"] > 0 and config["lead_times_hours"] == [12, 24]


def test_stop_and_resume_is_bit_identical(reference_run, synthetic_corpus, tiny_config,
                                          tmp_path):
    out = tmp_path / "run"
    args = _args(synthetic_corpus, tiny_config, out, "--checkpointing-steps", "3",
                 "--debug-log-sample-ids")
    _run([*args, "--stop-after-steps", str(STEPS // 2)])
    assert not (out / "report.json").exists()
    done = _run([*args, "--resume-from-checkpoint", "latest"])
    assert f"at step {STEPS // 2}" in done.stdout
    _assert_same_run(reference_run, out)
    assert _ids_by_rank(out) == _ids_by_rank(reference_run)


def test_sigkill_in_the_middle_of_a_save_then_resume(reference_run, synthetic_corpus,
                                                     tiny_config, tmp_path):
    out = tmp_path / "run"
    args = _args(synthetic_corpus, tiny_config, out, "--checkpointing-steps", "2")
    proc = subprocess.Popen([sys.executable, SCRIPT, *args], cwd=REPO, text=True,
                            env=_env(TOPOFLOW_TEST_PAUSE_IN_SAVE_AT_STEP="4"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 300
    for line in proc.stderr:
        if "paused in save of step 4" in line or time.time() > deadline:
            break
    proc.kill()  # SIGKILL: no handler, no cleanup
    proc.wait()
    half_written = out / "checkpoints" / ".tmp-checkpoint-00000004"
    assert (half_written / "model.safetensors").is_file()
    assert not (half_written / "checkpoint_complete.json").exists()
    assert not (out / "checkpoints" / "checkpoint-00000004").exists()
    done = _run([*args, "--resume-from-checkpoint", "latest"])
    assert "at step 2" in done.stdout
    assert not half_written.exists()
    _assert_same_run(reference_run, out)


def test_finetune_with_bias_on_block_0(reference_run, synthetic_corpus, tmp_path):
    out = tmp_path / "finetune"
    _run(["--model", str(reference_run / "model"), "--corpus", str(synthetic_corpus),
          "--output-dir", str(out), "--max-steps", "8", "--eval-every", "4", "--batch-size", "4",
          "--eval-batches", "1", "--learning-rate", "3e-3", "--no-progress-bar",
          "--report-to", "none", "--gradient-checkpointing"],
         env=_env(TOPOFLOW_TEST_NAN_AT_STEPS="3"))
    report = json.loads((out / "report.json").read_text())
    loading = report["loading_report"]
    assert sorted(loading["missing_expected"]) == ["topoflow.blocks.0.attn.H_scale",
                                                  "topoflow.blocks.0.attn.elevation_alpha"]
    assert loading["missing_other"] == [] and loading["mismatched"] == []
    baseline = json.loads((reference_run / "report.json").read_text())
    # Alpha = 0: the bias-on model is the baseline's function at step 0.
    assert report["verdict"]["step0_val_loss"] == pytest.approx(
        baseline["verdict"]["final_val_loss"], rel=1e-6)
    assert report["verdict"]["final_val_loss"] < report["verdict"]["step0_val_loss"]
    assert report["run"]["skipped_nonfinite_steps"] == 1
    step3 = next(r for r in _csv_rows(out / "train_log.csv") if r["step"] == "3")
    assert step3["skipped"] == "True" and step3["loss"] == "nan"
    assert "0" in report["run"]["final_alpha"]


def test_nonfinite_losses_in_a_row_abort_without_saving(synthetic_corpus, tiny_config, tmp_path):
    out = tmp_path / "run"
    done = _run(_args(synthetic_corpus, tiny_config, out, "--checkpointing-steps", "1",
                      "--max-nonfinite-steps", "2"),
                env=_env(TOPOFLOW_TEST_NAN_AT_STEPS="2,3"), expect=2)
    assert "2 consecutive steps with a non-finite loss" in done.stderr
    saved = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert saved == ["checkpoint-00000001", "checkpoint-00000002"]  # 2 = step skipped, finite
    assert not (out / "model").exists()


def test_two_cpu_processes_distinct_shards_and_exact_resume(reference_run, synthetic_corpus,
                                                           tiny_config, tmp_path):
    out = tmp_path / "ddp"
    # Through the shipped example config, so the config is tested too.
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                str(REPO / "configs" / "accelerate" / "cpu_2proc.yaml")]
    args = _args(synthetic_corpus, tiny_config, out, "--debug-log-sample-ids",
                 "--checkpointing-steps", "3")
    _run([*args, "--stop-after-steps", "3"], launcher=launcher)
    _run([*args, "--resume-from-checkpoint", "latest"], launcher=launcher)
    report = json.loads((out / "report.json").read_text())
    assert report["run"]["world_size"] == 2
    # Every validation sample counted exactly once: the same count as one process.
    single = json.loads((reference_run / "report.json").read_text())
    assert report["final_eval"]["n_samples"] == single["final_eval"]["n_samples"]
    assert report["final_eval"]["loss"] > 0
    # Before and after the resume each rank saw exactly the batches its own shards give, in
    # order; the ranks' shards are disjoint.
    records = _records_by_rank(out)
    expected = _expected_batches(synthetic_corpus, reference_run / "model", steps=STEPS)
    assert records == expected
    shard_of = _shard_of_init_hour(synthetic_corpus)
    shards = [{shard_of(i // 1000) for ids in records[rank].values() for i in ids}
              for rank in (0, 1)]
    assert not shards[0] & shards[1]
    # One set of outputs, written by the main process; only the debug logs are per rank.
    assert sorted(p.name for p in out.iterdir()) == sorted(RUN_FILES)
    assert len(list(out.rglob("report.json"))) == 1
    assert sorted(p.name for p in (out / "debug").iterdir()) == [
        "sample_ids_rank0.jsonl", "sample_ids_rank1.jsonl"]


def _records_by_rank(output_dir: Path) -> dict[int, dict[tuple[int, int], list[int]]]:
    found = {}
    for path in sorted((output_dir / "debug").glob("sample_ids_rank*.jsonl")):
        records = {}
        for line in path.read_text().splitlines():
            record = json.loads(line)
            records[(record["epoch"], record["step"])] = record["ids"]
        found[int(path.stem.removeprefix("sample_ids_rank"))] = records
    return found


def _expected_batches(corpus: Path, model_dir: Path, steps: int, world_size: int = 2,
                      batch_size: int = 4) -> dict[int, dict[tuple[int, int], list[int]]]:
    """What each rank must train on: its `shard(world_size, rank)` of the shuffled stream,
    epoch by epoch, an epoch ending when the first rank runs out of batches."""
    from topoflow.data import make_forecast_dataset

    config = json.loads((model_dir / "config.json").read_text())
    dataset = make_forecast_dataset(
        corpus, "train", variables=config["variables"],
        target_variables=config["target_variables"],
        lead_times_hours=config["lead_times_hours"], seed=0, shuffle=True)
    expected: dict[int, dict[tuple[int, int], list[int]]] = {r: {} for r in range(world_size)}
    step, epoch = 0, 0
    while step < steps:
        batches = []
        for rank in range(world_size):
            shard = dataset.shard(num_shards=world_size, index=rank)
            shard.set_epoch(epoch)
            ids = [int(row["sample_ids"]) for row in shard]
            batches.append([ids[k:k + batch_size] for k in range(0, len(ids), batch_size)])
        for index in range(min(len(b) for b in batches)):
            if step == steps:
                break
            step += 1
            for rank in range(world_size):
                expected[rank][(epoch, step)] = batches[rank][index]
        epoch += 1
    return expected


def _shard_of_init_hour(corpus: Path):
    meta = json.loads((corpus / "topoflow_corpus.json").read_text())
    step = meta["time_step_hours"]
    shards = [(s["first_hour"], s["first_hour"] + s["own_rows"] * step, s["file"])
              for s in meta["shards"] if s["split"] == "train"]

    def which(hour: int) -> str:
        return next(name for start, end, name in shards if start <= hour < end)

    return which


def test_example_accelerate_configs_parse():
    from accelerate.commands.config.config_args import load_config_from_file

    kinds = {path.stem: load_config_from_file(str(path)).distributed_type
             for path in (REPO / "configs" / "accelerate").glob("*.yaml")}
    assert kinds == {"cpu_2proc": "MULTI_GPU", "single_gpu": "NO", "multi_gpu_ddp": "MULTI_GPU",
                     "fsdp": "FSDP"}


def test_two_machines_on_loopback(synthetic_corpus, tiny_config, tmp_path):
    out, port = tmp_path / "nodes", str(_free_port())
    procs = []
    for rank in (0, 1):
        launcher = _launch(2, "--num_machines", "2", "--machine_rank", str(rank),
                           "--main_process_ip", "127.0.0.1", "--main_process_port", port)
        # bf16 autocast here too, so the mixed-precision flag runs under DDP in the suite.
        args = _args(synthetic_corpus, tiny_config, out, "--mixed-precision", "bf16")
        procs.append(subprocess.Popen(
            [*launcher, SCRIPT, *args], cwd=REPO,
            env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outputs = [proc.communicate(timeout=600)[0] for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    report = json.loads((out / "report.json").read_text())
    assert report["run"]["world_size"] == 2 and report["run"]["steps"] == STEPS
    assert math.isfinite(report["verdict"]["final_val_loss"])
