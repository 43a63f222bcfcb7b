"""The name-resolution hook of TopoFlowPreTrainedModel.from_pretrained: registered resolvers map
short names to folders, and an existing local path always wins."""

from __future__ import annotations

import pytest
import torch

from modeling_topoflow import TopoFlowForForecasting, TopoFlowModel, TopoFlowPreTrainedModel
from tests.fixtures_model import make_tiny_config


@pytest.fixture
def isolated_resolvers(monkeypatch):
    """An empty resolver list for the test (the library's own resolver is restored afterwards)."""
    resolvers: list = []
    monkeypatch.setattr(TopoFlowPreTrainedModel, "_name_resolvers", resolvers)
    return resolvers


def _saved(folder, seed) -> None:
    torch.manual_seed(seed)
    TopoFlowForForecasting(make_tiny_config()).save_pretrained(folder)


def test_registered_resolver_maps_a_short_name(tmp_path, isolated_resolvers):
    folder = tmp_path / "packaged"
    _saved(folder, seed=1)
    seen = []

    def resolver(name):
        seen.append(name)
        return str(folder) if name == "tiny-packaged" else None

    TopoFlowPreTrainedModel.register_name_resolver(resolver)
    TopoFlowPreTrainedModel.register_name_resolver(resolver)  # registering twice is harmless
    assert isolated_resolvers == [resolver]

    forecaster = TopoFlowForForecasting.from_pretrained("tiny-packaged")
    encoder = TopoFlowModel.from_pretrained("tiny-packaged")  # the hook is shared by all classes
    reference = TopoFlowForForecasting.from_pretrained(folder)
    assert torch.equal(forecaster.head[0].weight, reference.head[0].weight)
    assert torch.equal(encoder.norm.weight, reference.topoflow.norm.weight)
    assert seen[:2] == ["tiny-packaged", "tiny-packaged"]


def test_local_path_wins_over_a_resolver(tmp_path, monkeypatch, isolated_resolvers):
    packaged = tmp_path / "packaged"
    _saved(packaged, seed=1)
    monkeypatch.chdir(tmp_path)
    _saved(tmp_path / "tiny-packaged", seed=2)  # the user's own folder with the same name
    seen = []

    def resolver(name):
        seen.append(name)
        return str(packaged)

    TopoFlowPreTrainedModel.register_name_resolver(resolver)
    loaded = TopoFlowForForecasting.from_pretrained("tiny-packaged")
    local = TopoFlowForForecasting.from_pretrained(tmp_path / "tiny-packaged")
    other = TopoFlowForForecasting.from_pretrained(packaged)
    assert torch.equal(loaded.head[0].weight, local.head[0].weight)
    assert not torch.equal(loaded.head[0].weight, other.head[0].weight)
    assert seen[0] == "tiny-packaged"  # resolvers still see local paths (to verify them)
