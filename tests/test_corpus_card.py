"""The dataset card is rendered from the real metadata and parses as a Hub dataset card."""

from __future__ import annotations

from pathlib import Path

from huggingface_hub import DatasetCard

from topoflow.corpus import CorpusMetadata
from topoflow.corpus.card import render_dataset_card


def test_card_parses_and_configs_match_the_shards(synthetic_corpus: Path) -> None:
    card = DatasetCard.load(synthetic_corpus / "README.md")
    meta = CorpusMetadata.load(synthetic_corpus)
    (config,) = card.data.configs
    assert config["config_name"] == "default"
    mapping = {entry["split"]: entry["path"] for entry in config["data_files"]}
    assert mapping == {s: [shard.file for shard in meta.split_shards(s)] for s in meta.splits}
    for files in mapping.values():
        assert all((synthetic_corpus / f).is_file() for f in files)
    assert card.data.license == "other"  # not the embedded generator: third-party terms apply
    assert card.data.pretty_name == meta.name


def test_card_text_carries_the_metadata(synthetic_corpus: Path) -> None:
    meta = CorpusMetadata.load(synthetic_corpus)
    text = (synthetic_corpus / "README.md").read_text()
    for v in (*meta.variables, *meta.static_variables):
        assert f"| `{v}` |" in text
        assert f"{meta.normalization[v]['mean']:.6g}" in text
    assert f"{meta.height} x {meta.width}" in text
    for split, period in meta.splits.items():
        assert f"| {split} | {period['start']} | {period['end']} | 4 |" in text
    assert '"seed": 0' in text  # provenance


def test_embedded_corpus_card_license(tiny_corpus: Path) -> None:
    meta = CorpusMetadata.load(tiny_corpus)
    card = render_dataset_card(meta)
    assert card.data.license == "apache-2.0"
    assert DatasetCard(str(card)).data.configs == card.data.configs
    assert "sichuan_basin" in str(card)


def test_usage_snippet_names_a_folder_or_a_hub_id_never_a_bare_name(tiny_corpus: Path) -> None:
    meta = CorpusMetadata.load(tiny_corpus)
    local = str(render_dataset_card(meta))
    # A bare name such as "topoflow-tiny" is neither a path nor an org/name repo id.
    assert f'"{meta.name}"' not in local
    assert f'corpus = "path/to/{meta.name}"' in local
    pushed = str(render_dataset_card(meta, repo_or_path="org/topoflow-tiny"))
    assert 'corpus = "org/topoflow-tiny"' in pushed
    assert "load_dataset(corpus," in pushed
