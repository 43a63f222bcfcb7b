"""increment_scale: the training split's RMS increment per target and lead, against a direct
computation from the shard files, and its use by the `base` preset."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from topoflow.corpus.schema import CorpusMetadata
from topoflow.corpus.shards import read_shard, read_static
from topoflow.data.increment_scale import TRAIN_SPLIT_SCALE, increment_scale
from topoflow.training.model_setup import build_from_scratch_config

VARIABLES = ["u", "pm25", "o3", "elevation"]
TARGETS = ["pm25", "o3"]
LEADS = [6, 24]


def _direct_rms(corpus: Path) -> dict[str, dict[str, float]]:
    """From the Parquet rows: target row t + lead minus input row t, both normalized, over the
    region cells where both are finite (a missing input enters the model as 0, the mean)."""
    meta = CorpusMetadata.load(corpus)
    region = read_static(corpus / "static.safetensors", meta)["region_id"] != 0
    norm = meta.normalization
    rows, own = {}, set()
    for shard in meta.split_shards("train"):
        time_hour, is_halo, fields = read_shard(corpus, shard, meta)
        for k, hour in enumerate(time_hour.tolist()):
            rows[hour] = {v: (fields[v][k] - norm[v]["mean"]) / norm[v]["std"] for v in TARGETS}
            if not is_halo[k]:
                own.add(hour)
    out: dict[str, dict[str, float]] = {v: {} for v in TARGETS}
    for lead in LEADS:
        for v in TARGETS:
            squares = []
            for hour in sorted(own):
                if hour + lead in rows:
                    increment = rows[hour + lead][v] - np.nan_to_num(rows[hour][v])
                    squares.append(increment[region & np.isfinite(increment)] ** 2)
            out[v][str(lead)] = float(np.sqrt(np.concatenate(squares).mean()))
    return out


def test_increment_scale_matches_a_direct_computation(synthetic_corpus: Path) -> None:
    meta = CorpusMetadata.load(synthetic_corpus)
    scale = increment_scale(synthetic_corpus, variables=VARIABLES, target_variables=TARGETS,
                            lead_times_hours=LEADS, normalization=meta.normalization,
                            batch_size=5)  # fmt: skip
    expected = _direct_rms(synthetic_corpus)
    assert scale.keys() == expected.keys()
    for v in TARGETS:
        assert scale[v].keys() == {"6", "24"}
        for lead in ("6", "24"):
            assert scale[v][lead] == pytest.approx(expected[v][lead], rel=1e-5)
    # The fixture's fields are noise around a trend, so increments are about sqrt(2) in std
    # units at every lead, and the 24 h trend makes the 24 h increment larger.
    assert 1.0 < scale["pm25"]["6"] < scale["pm25"]["24"]


def test_targets_must_be_inputs(synthetic_corpus: Path) -> None:
    meta = CorpusMetadata.load(synthetic_corpus)
    with pytest.raises(ValueError, match=r"target variables \['o3'\] are not inputs"):
        increment_scale(synthetic_corpus, variables=["pm25"], target_variables=TARGETS,
                        lead_times_hours=LEADS, normalization=meta.normalization)


def test_a_preset_asking_for_the_train_split_scale_gets_numbers(synthetic_corpus: Path,
                                                                tmp_path: Path) -> None:
    meta = CorpusMetadata.load(synthetic_corpus)
    path = tmp_path / "config.json"
    path.write_text(json.dumps({
        "patch_size": 2, "embed_dim": 16, "depth": 1, "num_heads": 2, "variables": VARIABLES,
        "target_variables": TARGETS, "lead_times_hours": LEADS,
        "forecast_target": "increment", "increment_scale": TRAIN_SPLIT_SCALE,
    }))  # fmt: skip
    config = build_from_scratch_config(str(path), meta, elevation_blocks=[], elevation_scale=1e3,
                                       alpha_init=0.0, corpus=synthetic_corpus)  # fmt: skip
    expected = _direct_rms(synthetic_corpus)
    for v in TARGETS:
        assert config.increment_scale[v] == pytest.approx(expected[v], rel=1e-5)
    with pytest.raises(ValueError, match="needs the corpus"):
        build_from_scratch_config(str(path), meta, elevation_blocks=[], elevation_scale=1e3,
                                  alpha_init=0.0)
