"""Every path that loads or writes model weights runs the integrity checks: the remote-code load
without `topoflow` imported checks SHA256SUMS, save_pretrained writes it and refuses NaN weights,
export refuses corrupted weights instead of re-signing them and never replaces a user's folder."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from modeling_topoflow import TopoFlowForForecasting
from tests.fixtures_hub import make_tiny_run
from tests.fixtures_model import make_tiny_config
from topoflow.export import export_run
from topoflow.safety import ManifestError, NonFiniteWeightsError, verify_manifest

REPO_ROOT = Path(__file__).resolve().parents[1]

# Loads a folder through transformers' Auto class with remote code in a process that cannot
# import this checkout (no `topoflow`, no Hub modules on the path); prints OK or the error.
CHILD = textwrap.dedent(
    """
    import sys, warnings
    from pathlib import Path

    repo = Path(sys.argv[1]).resolve()
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != repo]
    sys.meta_path[:] = [f for f in sys.meta_path
                        if "editable" not in getattr(f, "__name__", type(f).__name__).lower()]
    for name in ("topoflow", "modeling_topoflow", "configuration_topoflow"):
        sys.modules[name] = None
    from transformers import AutoModelForTimeSeriesPrediction

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            AutoModelForTimeSeriesPrediction.from_pretrained(sys.argv[2], trust_remote_code=True)
        except Exception as err:
            print("ERROR", type(err).__name__, err)
        else:
            print("OK")
    for warning in caught:
        print("WARNING", warning.message)
    """
)


def _load_without_the_package(folder: Path, tmp_path: Path) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": "",
           "HF_MODULES_CACHE": str(tmp_path / "hf_modules"), "HF_HUB_OFFLINE": "1"}  # fmt: skip
    command = [sys.executable, "-c", CHILD, str(REPO_ROOT), str(folder)]
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def _flip_byte(path: Path, offset: int = -1) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x04
    path.write_bytes(bytes(data))


def _saved_model(folder: Path) -> Path:
    torch.manual_seed(0)
    TopoFlowForForecasting(make_tiny_config(elevation_bias_blocks=[0])).save_pretrained(folder)
    return folder


def test_remote_code_load_checks_the_manifest_without_the_package(tmp_path):
    folder = _saved_model(tmp_path / "model")
    assert _load_without_the_package(folder, tmp_path).startswith("OK")
    _flip_byte(folder / "model.safetensors")
    out = _load_without_the_package(folder, tmp_path)
    assert out.startswith("ERROR ManifestError"), out
    assert "model.safetensors: sha256 differs" in out


def test_remote_code_load_of_a_folder_without_manifest_warns(tmp_path):
    folder = _saved_model(tmp_path / "model")
    (folder / "SHA256SUMS").unlink()
    out = _load_without_the_package(folder, tmp_path)
    assert out.startswith("OK")
    assert "has no SHA256SUMS" in out


def test_save_pretrained_writes_the_manifest_and_refuses_nan_weights(tmp_path):
    folder = _saved_model(tmp_path / "model")
    verify_manifest(folder)  # written by save_pretrained itself, and it matches
    model = TopoFlowForForecasting(make_tiny_config())
    with torch.no_grad():
        model.head[0].weight[0, 0] = float("nan")
    with pytest.raises(NonFiniteWeightsError, match=r"head\.0\.weight"):
        model.save_pretrained(tmp_path / "nan")
    assert not (tmp_path / "nan").exists()


def test_export_refuses_corrupted_run_weights_instead_of_re_signing_them(tmp_path):
    run = tmp_path / "run"
    make_tiny_run(run)
    _flip_byte(run / "model" / "model.safetensors", offset=-3)
    with pytest.raises(ManifestError, match="model.safetensors: sha256 differs"):
        export_run(run, tmp_path / "export", repo_id="acme/tiny")
    assert not (tmp_path / "export").exists()


def test_export_without_a_run_manifest_is_refused(tmp_path):
    run = tmp_path / "run"
    make_tiny_run(run)
    (run / "model" / "SHA256SUMS").unlink()
    with pytest.raises(ManifestError, match="SHA256SUMS is missing"):
        export_run(run, tmp_path / "export", repo_id="acme/tiny")


def test_export_overwrite_never_replaces_a_folder_it_did_not_write(tmp_path):
    run = tmp_path / "run"
    make_tiny_run(run)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    with pytest.raises(FileExistsError, match="not an earlier export"):
        export_run(run, mine, repo_id="acme/tiny", overwrite=True)
    assert (mine / "thesis.tex").read_text() == "years of work"

    export = export_run(run, tmp_path / "export", repo_id="acme/tiny")
    (export / "notes.txt").write_text("added by hand")
    with pytest.raises(FileExistsError, match="notes.txt"):
        export_run(run, export, repo_id="acme/tiny", overwrite=True)
    assert (export / "notes.txt").is_file()
    (export / "notes.txt").unlink()
    assert export_run(run, export, repo_id="acme/tiny", overwrite=True) == export
