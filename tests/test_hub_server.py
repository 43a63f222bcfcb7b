"""Round trip through a real Hub-compatible server on 127.0.0.1: olah (PyPI) serving a local git
repository with two revisions as a Hub mirror in offline mode; `snapshot_download` by revision,
then load and forecast (topoflow/export.py, topoflow/hub.py)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from huggingface_hub import constants, snapshot_download
from safetensors.torch import load_file, save_file

from tests.fixtures_hub import make_tiny_run
from topoflow import TopoFlowForForecasting
from topoflow.export import export_run
from topoflow.safety import verify_model_folder

REPO_ROOT = Path(__file__).resolve().parents[1]
REPO_ID = "acme/topoflow-tiny"
SERVER_START_TIMEOUT_S = 90.0


def _git(repo: Path, *args: str) -> str:
    identity = ["-c", "user.name=TopoFlow tests", "-c", "user.email=tests@topoflow.invalid"]
    done = subprocess.run(
        ["git", *identity, *args], cwd=repo, capture_output=True, text=True, check=True
    )
    return done.stdout.strip()


def _commit_folder(repo: Path, folder: Path, message: str) -> str:
    """Replace the work tree of `repo` by the files of `folder`, commit, return the sha."""
    for path in repo.iterdir():
        if path.name != ".git":
            path.unlink()
    for path in folder.iterdir():
        shutil.copy2(path, repo / path.name)
    # Empty the index first: a file replaced by one of the same size, mtime (copy2 keeps it) and
    # recycled inode looks unchanged to git's stat cache, which then commits the old bytes.
    _git(repo, "read-tree", "--empty")
    _git(repo, "add", "-A")
    _git(repo, "commit", "-q", "-m", message)
    return _git(repo, "rev-parse", "HEAD")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _wait_until_serving(process: subprocess.Popen, url: str, log: Path) -> None:
    deadline = time.monotonic() + SERVER_START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"olah exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.5)
    pytest.fail(f"olah did not serve {url} within {SERVER_START_TIMEOUT_S} s:\n{log.read_text()}")


@pytest.fixture(scope="module")
def hub_repo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """Two exported revisions in a git repo served by olah; yields the endpoint and revisions.
    Module-scoped: both tests read the same server, which is stopped after the last one."""
    tmp_path = tmp_path_factory.mktemp("hub-server")
    runs = {}
    for name, seed in (("v1", 0), ("v2", 5)):
        model, batch, _ = make_tiny_run(tmp_path / f"run-{name}", seed=seed)
        export_run(tmp_path / f"run-{name}", tmp_path / f"export-{name}", repo_id=REPO_ID)
        runs[name] = (model, batch)
    repo = tmp_path / "mirrors" / "models" / REPO_ID
    repo.mkdir(parents=True)
    _git(repo, "init", "-q", "-b", "main")
    first = _commit_folder(repo, tmp_path / "export-v1", "first model")
    _git(repo, "tag", "v1")
    second = _commit_folder(repo, tmp_path / "export-v2", "second model")

    port = _free_port()
    config = tmp_path / "olah.toml"
    config.write_text(
        textwrap.dedent(
            f"""
            [basic]
            host = "127.0.0.1"
            port = {port}
            repos-path = "{tmp_path / "olah-cache"}"
            mirrors-path = ["{tmp_path / "mirrors"}"]
            [accessibility]
            offline = true
            """
        )
    )
    log = tmp_path / "olah.log"
    with open(log, "w") as log_handle:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "olah.server",
                "-c",
                str(config),
                "--log-path",
                str(tmp_path / "olah-logs"),
            ],
            cwd=tmp_path,
            stdout=log_handle,
            stderr=subprocess.STDOUT,
        )
    endpoint = f"http://127.0.0.1:{port}"
    try:
        _wait_until_serving(process, f"{endpoint}/api/models/{REPO_ID}/revision/main", log)
        yield {"endpoint": endpoint, "runs": runs, "first": first, "second": second}
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=15)


def _forecast(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(batch["fields"], batch["lead_time_hours"]).forecast


def test_snapshot_download_by_revision_then_load(
    hub_repo: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The server is local; a CI machine exporting HF_HUB_OFFLINE=1 must not block this test.
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    cases = {"v1": "v1", hub_repo["first"]: "v1", "main": "v2", hub_repo["second"]: "v2"}
    for revision, run in cases.items():
        folder = snapshot_download(
            REPO_ID,
            revision=revision,
            endpoint=hub_repo["endpoint"],
            cache_dir=tmp_path / "hf-cache",
        )
        expected_sha = hub_repo["first"] if run == "v1" else hub_repo["second"]
        assert Path(folder).name == expected_sha
        verify_model_folder(folder)  # the manifest holds after the round trip
        model, batch = hub_repo["runs"][run]
        loaded = TopoFlowForForecasting.from_pretrained(folder)
        torch.testing.assert_close(
            _forecast(loaded, batch), _forecast(model, batch), rtol=0, atol=0
        )
    v1, v2 = (hub_repo["runs"][name] for name in ("v1", "v2"))
    assert not torch.equal(_forecast(v1[0], v1[1]), _forecast(v2[0], v1[1]))


_LOAD_BY_HUB_ID = textwrap.dedent(
    """
    import sys
    import torch
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForTimeSeriesPrediction
    import topoflow
    from topoflow import TopoFlowForForecasting
    batch = load_file(sys.argv[1])
    out = {}
    for revision in ("v1", "main"):
        for name, load in (
            ("topoflow", lambda: TopoFlowForForecasting.from_pretrained(
                "acme/topoflow-tiny", revision=revision)),
            ("remote", lambda: AutoModelForTimeSeriesPrediction.from_pretrained(
                "acme/topoflow-tiny", revision=revision, trust_remote_code=True)),
        ):
            model = load().eval()
            with torch.no_grad():
                forecast = model(batch["fields"], batch["lead_time_hours"]).forecast
            out[f"{name}-{revision}"] = forecast.contiguous()
    save_file(out, sys.argv[2])
    """
)


def test_from_pretrained_with_a_hub_id_and_revision_downloads_from_the_server(
    hub_repo: dict, tmp_path: Path
) -> None:
    model_v1, batch = hub_repo["runs"]["v1"]
    model_v2, _ = hub_repo["runs"]["v2"]
    batch_path, out_path = tmp_path / "batch.safetensors", tmp_path / "out.safetensors"
    save_file({k: batch[k] for k in ("fields", "lead_time_hours")}, batch_path)
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    env.update(
        HF_ENDPOINT=hub_repo["endpoint"],
        HF_HOME=str(tmp_path / "hf_home"),
        PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")])),
    )
    done = subprocess.run(
        [sys.executable, "-c", _LOAD_BY_HUB_ID, str(batch_path), str(out_path)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    out = load_file(out_path)
    for name in ("topoflow", "remote"):
        torch.testing.assert_close(out[f"{name}-v1"], _forecast(model_v1, batch), rtol=0, atol=0)
        torch.testing.assert_close(out[f"{name}-main"], _forecast(model_v2, batch), rtol=0, atol=0)
