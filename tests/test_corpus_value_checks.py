"""Bad values in a correctly signed corpus are refused where they are read, naming the shard and
the variable: fill values such as -999, Inf, flipped static bytes; and a corpus whose units or
statistics are not the model's is refused before training."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from configuration_topoflow import TopoFlowConfig
from topoflow.corpus import CorpusError, CorpusMetadata
from topoflow.corpus.shards import read_shard, write_shard
from topoflow.data import make_forecast_dataset
from topoflow.training.model_setup import build_from_scratch_config, check_corpus_matches_config


@pytest.fixture
def corpus(synthetic_corpus: Path, tmp_path: Path) -> Path:
    folder = tmp_path / "corpus"
    shutil.copytree(synthetic_corpus, folder)
    return folder


def _rewrite_first_validation_shard(corpus: Path, edit: Callable[[dict], None]) -> str:
    """Rewrite a shard with edited fields and re-sign it in the metadata, as a converter that
    wrote those values would have: the shard's sha256 matches, only its values are bad."""
    meta = CorpusMetadata.load(corpus)
    shard = meta.split_shards("validation")[0]
    time_hour, is_halo, fields = read_shard(corpus, shard, meta)
    fields = {name: values.copy() for name, values in fields.items()}
    edit(fields)
    shard.sha256 = write_shard(corpus / shard.file, time_hour, is_halo, fields, meta.variables)
    meta.save(corpus)
    return shard.file


def _stream(corpus: Path) -> None:
    meta = CorpusMetadata.load(corpus)
    dataset = make_forecast_dataset(
        corpus, "validation", variables=["u", "v", "pm25", "elevation"],
        target_variables=["pm25", "co"], lead_times_hours=[6], shuffle=False,
    )  # fmt: skip
    assert meta.split_shards("validation")
    for _ in dataset:
        pass


def test_fill_value_in_a_target_is_refused_naming_shard_and_variable(corpus):
    def put_fill_value(fields: dict) -> None:
        fields["pm25"][3, 1, 2] = -999.0

    shard = _rewrite_first_validation_shard(corpus, put_fill_value)
    with pytest.raises(CorpusError, match=rf"{shard}: variable 'pm25' holds fill value\(s\) "
                                          r"\[-999\.0\]"):  # fmt: skip
        _stream(corpus)


def test_negative_concentration_is_refused(corpus):
    def put_negative(fields: dict) -> None:
        fields["co"][0, 0, 0] = -5.0

    _rewrite_first_validation_shard(corpus, put_negative)
    with pytest.raises(CorpusError, match="'co' holds 1 negative concentration"):
        _stream(corpus)


def test_inf_in_an_input_is_refused_naming_shard_and_variable(corpus):
    def put_inf(fields: dict) -> None:
        fields["u"][2, 0, 1] = np.inf

    shard = _rewrite_first_validation_shard(corpus, put_inf)
    with pytest.raises(CorpusError, match=rf"{shard}: variable 'u' holds 1 infinite value"):
        _stream(corpus)


def test_negative_wind_and_nan_stay_accepted(corpus):
    def put_legal(fields: dict) -> None:
        fields["u"][0, 0, 0] = -12.5
        fields["pm25"][0, 0, 0] = np.nan

    _rewrite_first_validation_shard(corpus, put_legal)
    _stream(corpus)


def test_flipped_static_byte_is_refused_when_streaming(corpus):
    static = corpus / "static.safetensors"
    data = bytearray(static.read_bytes())
    data[-2] ^= 0x10
    static.write_bytes(bytes(data))
    with pytest.raises(CorpusError, match="static.safetensors: sha256"):
        _stream(corpus)


@pytest.fixture
def tiny_config(synthetic_corpus: Path, tmp_path: Path) -> TopoFlowConfig:
    path = tmp_path / "tiny.json"
    path.write_text('{"patch_size": 2, "embed_dim": 16, "depth": 1, "num_heads": 2}')
    return build_from_scratch_config(str(path), CorpusMetadata.load(synthetic_corpus),
                                     elevation_blocks=[], elevation_scale=1000.0, alpha_init=0.0)


def test_corpus_in_other_units_than_the_model_is_refused(synthetic_corpus, tiny_config):
    meta = CorpusMetadata.load(synthetic_corpus)
    check_corpus_matches_config(tiny_config, meta)
    meta.units["co"] = "ug/m3"
    with pytest.raises(ValueError, match="co: model 'mg/m3', corpus 'ug/m3'"):
        check_corpus_matches_config(tiny_config, meta)


def test_corpus_with_statistics_far_from_the_model_is_refused(synthetic_corpus, tiny_config):
    meta = CorpusMetadata.load(synthetic_corpus)
    meta.normalization["no2"] = {"mean": meta.normalization["no2"]["mean"] * 1000,
                                 "std": meta.normalization["no2"]["std"] * 1000}
    with pytest.raises(ValueError, match="no2: model mean"):
        check_corpus_matches_config(tiny_config, meta)


def test_broken_dataset_card_yaml_names_the_card_file(corpus):
    card = corpus / "README.md"
    card.write_text(card.read_text().replace("---\n", "---\n  bad: [unclosed\n", 1))
    with pytest.raises(CorpusError, match=r"README\.md: the dataset card's YAML front matter"):
        _stream(corpus)
