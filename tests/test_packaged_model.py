"""The packaged topoflow-base folder is a complete, current Hub model repo."""

from __future__ import annotations

from pathlib import Path

import pytest

from topoflow.safety import verify_manifest

REPO_ROOT = Path(__file__).resolve().parents[1]
PACKAGED = REPO_ROOT / "topoflow" / "pretrained" / "topoflow-base"


@pytest.mark.parametrize("hub_file", ["configuration_topoflow.py", "modeling_topoflow.py"])
def test_packaged_hub_files_are_the_current_ones(hub_file: str) -> None:
    # A stale copy would make trust_remote_code users run older model code than `import topoflow`.
    packaged = (PACKAGED / hub_file).read_text(encoding="utf-8")
    current = (REPO_ROOT / hub_file).read_text(encoding="utf-8")
    assert packaged == current, (
        f"{PACKAGED / hub_file} differs from {hub_file}: copy it over, then rewrite the manifest: "
        "`python -c \"from topoflow.safety import write_manifest; "
        "write_manifest('topoflow/pretrained/topoflow-base')\"`"
    )


def test_packaged_folder_is_complete_and_its_manifest_holds() -> None:
    for name in ("config.json", "model.safetensors", "README.md", "SHA256SUMS"):
        assert (PACKAGED / name).is_file(), f"{PACKAGED / name} is missing"
    verify_manifest(PACKAGED)
