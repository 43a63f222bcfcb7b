"""Model name resolution: local path wins, short names, unknown names, Hub ids (topoflow/hub.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.fixtures_hub import tiny_forecaster
from topoflow import TopoFlowForForecasting, hub
from topoflow.hub import UnknownModelNameError, known_model_names, resolve_model_name
from topoflow.safety import (
    ManifestError,
    NonFiniteWeightsError,
    PickleFileError,
    save_model_folder,
    write_manifest,
)

REPO_ROOT = Path(__file__).resolve().parents[1]


def _model_folder(folder: Path, value: float = 0.0) -> Path:
    folder.mkdir(parents=True)
    save_file({"w": torch.full((2, 2), value)}, folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps({"model_type": "topoflow"}))
    write_manifest(folder)
    return folder


@pytest.fixture
def packaged(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A packaged-models directory holding topoflow-base and one variant."""
    root = tmp_path / "pretrained"
    _model_folder(root / "topoflow-base")
    _model_folder(root / "topoflow-h2000")
    monkeypatch.setattr(hub, "PACKAGED_MODELS_DIR", root)
    return root


def test_known_names_are_the_documented_and_the_shipped_ones(packaged: Path) -> None:
    assert known_model_names() == ["topoflow-base", "topoflow-h2000"]


def test_known_short_name_resolves_to_the_verified_packaged_folder(packaged: Path) -> None:
    assert resolve_model_name("topoflow-base") == str(packaged / "topoflow-base")
    assert resolve_model_name("topoflow-h2000") == str(packaged / "topoflow-h2000")


def test_packaged_folder_with_a_corrupted_weight_file_is_refused(packaged: Path) -> None:
    weights = packaged / "topoflow-base" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x10
    weights.write_bytes(bytes(data))
    with pytest.raises(ManifestError, match="model.safetensors"):
        resolve_model_name("topoflow-base")


def test_local_path_wins_over_a_short_name(
    packaged: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    _model_folder(tmp_path / "topoflow-base", value=1.0)
    # None: transformers loads the user's own ./topoflow-base, not the packaged one.
    assert resolve_model_name("topoflow-base") is None
    assert resolve_model_name(tmp_path / "topoflow-base") is None


def test_local_folder_with_a_manifest_is_checked(tmp_path: Path) -> None:
    folder = _model_folder(tmp_path / "mine")
    (folder / "config.json").write_text(json.dumps({"model_type": "topoflow", "depth": 99}))
    with pytest.raises(ManifestError, match="config.json: sha256 differs"):
        resolve_model_name(str(folder))


def test_unknown_name_error_lists_the_known_names(packaged: Path) -> None:
    with pytest.raises(UnknownModelNameError) as error:
        resolve_model_name("topoflow-bse")
    message = str(error.value)
    assert "'topoflow-bse'" in message
    assert "topoflow-base, topoflow-h2000" in message
    assert "org/name" in message


def test_hub_ids_are_left_to_the_hub(packaged: Path) -> None:
    for name in ("acme/topoflow-base", "acme/topoflow.v2", "Org_1/model-name"):
        assert resolve_model_name(name) is None


def test_missing_paths_are_not_mistaken_for_hub_ids(tmp_path: Path) -> None:
    for name in (str(tmp_path / "nope"), "./nope", "a/b/c"):
        with pytest.raises(FileNotFoundError, match="does not exist"):
            resolve_model_name(name)


def test_documented_name_missing_from_the_installation_says_how_to_regenerate(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(hub, "PACKAGED_MODELS_DIR", tmp_path / "empty")
    assert "topoflow-base" in known_model_names()
    with pytest.raises(FileNotFoundError, match="does not ship it.*regenerate with"):
        resolve_model_name("topoflow-base")


def _assert_same_weights(model: torch.nn.Module, reference: torch.nn.Module) -> None:
    loaded, expected = model.state_dict(), reference.state_dict()
    assert loaded.keys() == expected.keys()
    assert all(torch.equal(loaded[key], expected[key]) for key in expected)


def test_from_pretrained_short_name_loads_the_packaged_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    shipped = tiny_forecaster(seed=1)
    save_model_folder(shipped, tmp_path / "pretrained" / "topoflow-base")
    monkeypatch.setattr(hub, "PACKAGED_MODELS_DIR", tmp_path / "pretrained")
    monkeypatch.chdir(tmp_path)  # no ./topoflow-base here
    _assert_same_weights(TopoFlowForForecasting.from_pretrained("topoflow-base"), shipped)


def test_from_pretrained_prefers_a_local_folder_named_like_a_short_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    save_model_folder(tiny_forecaster(seed=1), tmp_path / "pretrained" / "topoflow-base")
    monkeypatch.setattr(hub, "PACKAGED_MODELS_DIR", tmp_path / "pretrained")
    mine = tiny_forecaster(seed=2)
    work = tmp_path / "work"
    mine.save_pretrained(work / "topoflow-base")
    monkeypatch.chdir(work)
    _assert_same_weights(TopoFlowForForecasting.from_pretrained("topoflow-base"), mine)


def test_from_pretrained_unknown_name_lists_the_known_names(packaged: Path) -> None:
    with pytest.raises(UnknownModelNameError, match="Known names: topoflow-base, topoflow-h2000"):
        TopoFlowForForecasting.from_pretrained("topoflow-large")


_OFFLINE_HUB_ID = textwrap.dedent(
    """
    import topoflow
    from topoflow import TopoFlowForForecasting
    from topoflow.hub import UnknownModelNameError
    for name in ("acme/topoflow-variant", "topoflow-nonexistent"):
        try:
            TopoFlowForForecasting.from_pretrained(name, revision="v1")
        except Exception as error:
            chain, cause = [], error
            while cause is not None:
                chain.append(type(cause).__name__)
                cause = cause.__cause__ or cause.__context__
            print(name, " ".join(chain))
    """
)


def test_org_name_goes_to_the_hub_and_fails_with_the_hub_offline_error(tmp_path: Path) -> None:
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf_home"))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    done = subprocess.run(
        [sys.executable, "-c", _OFFLINE_HUB_ID],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    lines = dict(line.split(" ", 1) for line in done.stdout.strip().splitlines())
    # The Hub id reached huggingface_hub, which refused to download in offline mode ...
    assert lines["acme/topoflow-variant"].split() == ["OSError", "LocalEntryNotFoundError"]
    # ... while a bare unknown name in the same process is ours, so the resolver was active.
    assert lines["topoflow-nonexistent"] == "UnknownModelNameError"


def test_from_pretrained_checks_a_local_folder_manifest_weights_and_pickles(
    tmp_path: Path,
) -> None:
    model = tiny_forecaster(seed=1)
    with_manifest = save_model_folder(model, tmp_path / "with_manifest")
    weights = with_manifest / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x04
    weights.write_bytes(bytes(data))
    with pytest.raises(ManifestError, match="model.safetensors: sha256 differs"):
        TopoFlowForForecasting.from_pretrained(with_manifest)

    plain = tmp_path / "plain"  # a folder without manifest: still checked for NaN
    model.save_pretrained(plain)
    (plain / "SHA256SUMS").unlink()
    state = load_file(plain / "model.safetensors")
    key = next(k for k in state if k.endswith("attn.elevation_alpha"))
    state[key] = torch.full_like(state[key], float("nan"))
    save_file(state, plain / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(NonFiniteWeightsError, match=key.replace(".", r"\.")):
        TopoFlowForForecasting.from_pretrained(plain)

    pickled = tmp_path / "pickled"
    model.save_pretrained(pickled)
    torch.save(model.state_dict(), pickled / "pytorch_model.bin")
    with pytest.raises(PickleFileError, match="pytorch_model.bin"):
        TopoFlowForForecasting.from_pretrained(pickled)


def test_forecasting_auto_class_resolves_the_packaged_name(monkeypatch) -> None:
    import topoflow

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = topoflow.AutoModelForForecasting.from_pretrained("topoflow-base")
    assert isinstance(model, topoflow.TopoFlowForForecasting)
    assert model.config.elevation_bias_blocks == []
