"""The datasets-streamed forecast samples: contents, coverage, shuffling, ranks, resume."""

from __future__ import annotations

from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from datasets.distributed import split_dataset_by_node

from topoflow.corpus.schema import CorpusMetadata
from topoflow.corpus.shards import read_shard, read_static
from topoflow.data import check_world_size, collate_forecast_batch, make_forecast_dataset

VARIABLES = ["u", "pm25", "elevation", "lat2d", "o3"]
TARGETS = ["pm25", "o3"]
LEADS = [6, 24]


def _dataset(corpus: Path, split: str = "train", **kwargs) -> datasets.IterableDataset:
    args = {"variables": VARIABLES, "target_variables": TARGETS, "lead_times_hours": LEADS}
    return make_forecast_dataset(corpus, split, **{**args, **kwargs})


def _ids(dataset) -> list[int]:
    return [int(s["sample_ids"]) for s in dataset]


def _expected_ids(corpus: Path, split: str, leads=LEADS) -> set[int]:
    """Every (init, lead) whose init is an own row and whose target is inside the split."""
    meta = CorpusMetadata.load(corpus)
    shards = meta.split_shards(split)
    hours = [s.first_hour + k * meta.time_step_hours for s in shards for k in range(s.own_rows)]
    end = max(hours)
    return {h * 1000 + lead for h in hours for lead in leads if h + lead <= end}


def test_every_sample_once_and_n_shards(synthetic_corpus: Path) -> None:
    ds = _dataset(synthetic_corpus)
    meta = CorpusMetadata.load(synthetic_corpus)
    assert ds.n_shards == len(meta.split_shards("train")) == 4
    ids = _ids(ds)
    assert len(ids) == len(set(ids))
    assert set(ids) == _expected_ids(synthetic_corpus, "train")


def test_sample_contents_match_the_shards(synthetic_corpus: Path) -> None:
    meta = CorpusMetadata.load(synthetic_corpus)
    static = read_static(synthetic_corpus / "static.safetensors", meta)
    rows = {}
    for shard in meta.split_shards("validation"):
        time_hour, _, fields = read_shard(synthetic_corpus, shard, meta)
        for k, hour in enumerate(time_hour.tolist()):
            rows[hour] = {v: f[k] for v, f in fields.items()}
    norm = meta.normalization
    seen_nan_label = seen_nan_input = False
    for sample in _dataset(synthetic_corpus, "validation", shuffle=False):
        sid, lead = int(sample["sample_ids"]), float(sample["lead_time_hours"])
        init, lead_h = divmod(sid, 1000)
        assert lead == lead_h and sample["lead_time_hours"].dtype == np.float32
        for c, v in enumerate(VARIABLES):
            raw = static[v] if v in meta.static_variables else rows[init][v]
            expected = (raw - norm[v]["mean"]) / norm[v]["std"]
            seen_nan_input |= bool(np.isnan(expected).any())
            np.testing.assert_allclose(sample["fields"][c], np.nan_to_num(expected), rtol=1e-5,
                                       atol=1e-6)  # fmt: skip
        for c, v in enumerate(TARGETS):
            expected = (rows[init + lead_h][v] - norm[v]["mean"]) / norm[v]["std"]
            seen_nan_label |= bool(np.isnan(expected).any())
            np.testing.assert_allclose(sample["labels"][c], expected, rtol=1e-5, atol=1e-6)
        assert np.isfinite(sample["fields"]).all()
        np.testing.assert_array_equal(sample["region_mask"], static["region_id"] != 0)
    assert seen_nan_input and seen_nan_label  # the fixture has NaNs, so both paths ran


def test_shuffle_is_deterministic_by_seed_and_epoch(synthetic_corpus: Path) -> None:
    first = _ids(_dataset(synthetic_corpus, seed=3))
    assert _ids(_dataset(synthetic_corpus, seed=3)) == first
    other_seed = _ids(_dataset(synthetic_corpus, seed=4))
    ds = _dataset(synthetic_corpus, seed=3)
    ds.set_epoch(1)
    epoch1 = _ids(ds)
    assert other_seed != first and epoch1 != first
    assert set(other_seed) == set(epoch1) == set(first)
    ordered = _ids(_dataset(synthetic_corpus, shuffle=False))
    assert ordered == sorted(ordered, key=lambda i: (i // 1000, LEADS.index(i % 1000)))
    unshuffled = _dataset(synthetic_corpus, shuffle=False)
    unshuffled.set_epoch(5)
    assert _ids(unshuffled) == ordered  # evaluation order never changes


def _resume_check(make, take: int) -> tuple[list[int], list[int]]:
    """(ids before + after a state_dict resume, ids of an uninterrupted pass)."""
    full = _ids(make())
    ds = make()
    it = iter(ds)
    before = [int(next(it)["sample_ids"]) for _ in range(take)]
    state = ds.state_dict()
    resumed = make()
    resumed.load_state_dict(state)
    return before + _ids(resumed), full


@pytest.mark.parametrize("epoch", [0, 2])
def test_two_ranks_disjoint_complete_and_resumable(synthetic_corpus: Path, epoch: int) -> None:
    check_world_size(4, 2)
    expected = _expected_ids(synthetic_corpus, "train")
    per_rank = []
    for rank in range(2):
        def make(rank=rank):
            ds = _dataset(synthetic_corpus, seed=7).shard(num_shards=2, index=rank)
            ds.set_epoch(epoch)
            return ds

        ids, uninterrupted = _resume_check(make, take=5 + rank)  # mid-shard checkpoint
        assert ids == uninterrupted
        per_rank.append(set(ids))
        assert len(ids) == len(set(ids))
    assert not per_rank[0] & per_rank[1]
    assert per_rank[0] | per_rank[1] == expected


def test_split_dataset_by_node_disjoint_complete(synthetic_corpus: Path) -> None:
    per_rank = [set(_ids(split_dataset_by_node(_dataset(synthetic_corpus), rank=r, world_size=2)))
                for r in range(2)]  # fmt: skip
    assert not per_rank[0] & per_rank[1]
    assert per_rank[0] | per_rank[1] == _expected_ids(synthetic_corpus, "train")


def test_resume_across_a_shard_boundary(synthetic_corpus: Path) -> None:
    shard_len = len(_expected_ids(synthetic_corpus, "train")) // 4
    ids, full = _resume_check(lambda: _dataset(synthetic_corpus, seed=1), take=shard_len + 3)
    assert ids == full


def test_check_world_size_errors() -> None:
    check_world_size(24, 4)
    with pytest.raises(ValueError, match="cannot be divided evenly among 5"):
        check_world_size(24, 5)
    with pytest.raises(ValueError, match="4 shards"):
        check_world_size(4, 8)


def test_dataloader_workers_and_collate(synthetic_corpus: Path) -> None:
    loader = torch.utils.data.DataLoader(
        _dataset(synthetic_corpus), batch_size=8, num_workers=2, collate_fn=collate_forecast_batch
    )
    ids = []
    for batch in loader:
        assert batch["fields"].dtype == torch.float32 and batch["fields"].shape[1:] == (5, 4, 6)
        assert batch["labels"].shape[1] == 2 and batch["region_mask"].dtype == torch.bool
        assert batch["sample_ids"].dtype == torch.int64
        assert batch["lead_time_hours"].dtype == torch.float32
        ids += batch["sample_ids"].tolist()
    assert sorted(ids) == sorted(_expected_ids(synthetic_corpus, "train"))


def test_default_collate_keeps_contract_dtypes(synthetic_corpus: Path) -> None:
    samples = list(_dataset(synthetic_corpus, "test"))[:3]
    batch = torch.utils.data.default_collate(samples)
    ours = collate_forecast_batch(samples)
    for key, value in ours.items():
        assert batch[key].dtype == value.dtype
        torch.testing.assert_close(batch[key], value, equal_nan=True)


def test_config_style_normalization_and_bad_requests(synthetic_corpus: Path) -> None:
    meta = CorpusMetadata.load(synthetic_corpus)
    names = list(meta.normalization)
    stats = {"mean": dict.fromkeys(names, 0.0), "std": dict.fromkeys(names, 2.0)}
    sample = next(iter(_dataset(synthetic_corpus, shuffle=False, normalization=stats)))
    time_hour, _, fields = read_shard(synthetic_corpus, meta.split_shards("train")[0], meta)
    np.testing.assert_allclose(sample["fields"][0], np.nan_to_num(fields["u"][0] / 2.0))
    with pytest.raises(ValueError, match="halo"):
        _dataset(synthetic_corpus, lead_times_hours=[48])
    with pytest.raises(ValueError, match="multiple"):
        _dataset(synthetic_corpus, lead_times_hours=[5])
    with pytest.raises(ValueError, match="nope"):
        _dataset(synthetic_corpus, variables=["u", "nope"])
    with pytest.raises(ValueError, match="elevation"):
        _dataset(synthetic_corpus, target_variables=["elevation"])


def test_load_dataset_reads_the_raw_rows(synthetic_corpus: Path) -> None:
    raw = datasets.load_dataset(str(synthetic_corpus), split="test", streaming=True)
    meta = CorpusMetadata.load(synthetic_corpus)
    assert raw.n_shards == 4
    hours = [row["time_hour"] for row in raw]
    assert len(hours) == sum(s.rows for s in meta.split_shards("test"))
    assert len(next(iter(raw))["pm25"]) == meta.height * meta.width
