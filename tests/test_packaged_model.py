"""The packaged topoflow-base: weights, config, card and manifest, loaded by the installed code."""

from __future__ import annotations

from pathlib import Path

from topoflow.safety import read_manifest, verify_manifest

REPO_ROOT = Path(__file__).resolve().parents[1]
PACKAGED = REPO_ROOT / "topoflow" / "pretrained" / "topoflow-base"


def test_packaged_folder_holds_no_copy_of_the_hub_code() -> None:
    # The installed classes load the packaged model; a copy of the Hub files would go stale with
    # every model change. `topoflow export` writes them for Hub repos, not into the package.
    assert not sorted(p.name for p in PACKAGED.glob("*.py"))
    assert not [name for name in read_manifest(PACKAGED) if name.endswith(".py")]


def test_packaged_model_loads_through_the_installed_classes(monkeypatch) -> None:
    from transformers import AutoModel

    import modeling_topoflow
    import topoflow

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = topoflow.TopoFlowForForecasting.from_pretrained("topoflow-base")
    assert type(model) is modeling_topoflow.TopoFlowForForecasting
    # trust_remote_code=True still uses the installed code: the folder has none to run.
    encoder = AutoModel.from_pretrained(PACKAGED, trust_remote_code=True)
    assert type(encoder) is modeling_topoflow.TopoFlowModel


def test_packaged_folder_is_complete_and_its_manifest_holds() -> None:
    for name in ("config.json", "model.safetensors", "README.md", "SHA256SUMS"):
        assert (PACKAGED / name).is_file(), f"{PACKAGED / name} is missing"
    verify_manifest(PACKAGED)
