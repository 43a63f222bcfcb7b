"""Training order that mixes months, and calendar inputs derived from each sample's time stamp."""

from __future__ import annotations

import datetime
from pathlib import Path

import numpy as np
import pytest
import torch

from configuration_topoflow import TIME_FEATURES
from topoflow.data import collate_forecast_batch
from topoflow.data.time_features import calendar_phase, encode_time_features

from .test_streaming import _dataset, _expected_ids, _ids, _resume_check


def _mixed(corpus: Path, **kwargs):
    return _dataset(corpus, mix_shards=True, **kwargs)


def _shard_index(corpus: Path):
    from topoflow.corpus.schema import CorpusMetadata

    meta = CorpusMetadata.load(corpus)
    step = meta.time_step_hours
    spans = [(s.first_hour, s.first_hour + s.own_rows * step) for s in meta.split_shards("train")]
    return lambda sample_id: next(k for k, (a, b) in enumerate(spans) if a <= sample_id // 1000 < b)


def test_mixed_order_covers_every_sample_once_and_mixes_shards(synthetic_corpus: Path) -> None:
    ids = _ids(_mixed(synthetic_corpus, seed=3))
    assert len(ids) == len(set(ids))
    assert set(ids) == _expected_ids(synthetic_corpus, "train")
    # The first 6 samples (less than any shard holds) already draw from at least 3 of the 4
    # shards; the shard-by-shard order draws them from one.
    shard_of = _shard_index(synthetic_corpus)
    assert len({shard_of(i) for i in ids[:6]}) >= 3
    by_shard = _ids(_dataset(synthetic_corpus, seed=3))
    assert len({shard_of(i) for i in by_shard[:6]}) == 1


def test_mixed_order_is_seeded_per_epoch(synthetic_corpus: Path) -> None:
    first = _ids(_mixed(synthetic_corpus, seed=3))
    assert _ids(_mixed(synthetic_corpus, seed=3)) == first
    again = _mixed(synthetic_corpus, seed=3)
    again.set_epoch(1)
    epoch1 = _ids(again)
    other_seed = _ids(_mixed(synthetic_corpus, seed=4))
    assert epoch1 != first and other_seed != first
    assert set(epoch1) == set(other_seed) == set(first)


@pytest.mark.parametrize("epoch", [0, 2])
def test_mixed_two_ranks_disjoint_complete_and_resumable(synthetic_corpus: Path, epoch: int):
    per_rank = []
    for rank in range(2):
        def make(rank=rank):
            ds = _mixed(synthetic_corpus, seed=7).shard(num_shards=2, index=rank)
            ds.set_epoch(epoch)
            return ds

        ids, uninterrupted = _resume_check(make, take=7 + 9 * rank)
        assert ids == uninterrupted
        assert len(ids) == len(set(ids))
        per_rank.append(set(ids))
    assert not per_rank[0] & per_rank[1]
    assert per_rank[0] | per_rank[1] == _expected_ids(synthetic_corpus, "train")


def test_mixed_resume_after_the_end_of_the_stream_yields_nothing(synthetic_corpus: Path):
    ds = _mixed(synthetic_corpus, seed=1)
    assert _ids(ds)
    finished = ds.state_dict()
    resumed = _mixed(synthetic_corpus, seed=1)
    resumed.load_state_dict(finished)
    assert _ids(resumed) == []


def test_mixing_needs_shuffle(synthetic_corpus: Path) -> None:
    with pytest.raises(ValueError, match="mix_shards"):
        _mixed(synthetic_corpus, shuffle=False)


def _hour(*args: int) -> int:
    stamp = datetime.datetime(*args, tzinfo=datetime.timezone.utc)
    return int(stamp.timestamp()) // 3600


def test_calendar_phases_of_known_dates() -> None:
    assert calendar_phase(_hour(2018, 3, 5, 18), "day") == 0.75
    assert calendar_phase(_hour(2018, 1, 1, 0), "year") == 0.0
    # 2 July 12:00 is the middle of a 365-day year; 2016 has 366 days, so 2 July 00:00 is.
    assert calendar_phase(_hour(2018, 7, 2, 12), "year") == 0.5
    assert calendar_phase(_hour(2016, 7, 2, 0), "year") == 0.5
    features = encode_time_features(
        ["init_time_of_day", "valid_time_of_day"], _hour(2018, 3, 5, 0), 18)
    np.testing.assert_allclose(features, [0.0, 1.0, -1.0, 0.0], atol=1e-7)
    with pytest.raises(ValueError, match="time_of_week"):
        _dataset(Path("."), time_features=["time_of_week"])


def test_samples_carry_the_time_features_of_their_time_stamp(synthetic_corpus: Path) -> None:
    names = list(TIME_FEATURES)
    samples = list(_mixed(synthetic_corpus, time_features=names))
    for sample in samples:
        init_hour, lead = divmod(int(sample["sample_ids"]), 1000)
        assert sample["time_features"].dtype == np.float32
        np.testing.assert_array_equal(sample["time_features"],
                                      encode_time_features(names, init_hour, lead))
    batch = collate_forecast_batch(samples[:4])
    assert batch["time_features"].shape == (4, 8) and batch["time_features"].dtype == torch.float32
    # init and valid phases differ whenever the lead is not a whole number of days
    assert any(not np.allclose(s["time_features"][:2], s["time_features"][4:6]) for s in samples)
    assert "time_features" not in next(iter(_dataset(synthetic_corpus)))
