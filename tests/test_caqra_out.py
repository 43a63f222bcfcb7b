"""The CAQRA converter: monthly shards of splits that cross no month boundary, and an --out that
holds someone else's files is refused rather than replaced."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.test_caqra import GRID, _year_file
from topoflow.corpus import CorpusError
from topoflow.corpus.build import hours_since_epoch, monthly_edges
from topoflow.corpus.caqra import convert_caqra

SPLITS = {"train": ("2017-01-01", "2017-01-02"), "validation": ("2017-01-02", "2017-01-03")}


def test_monthly_edges_of_a_split_inside_one_month_and_across_months():
    assert monthly_edges("2017-01-01", "2017-01-02") == [hours_since_epoch("2017-01-01"),
                                                         hours_since_epoch("2017-01-02")]
    edges = monthly_edges("2016-12-15", "2017-02-01")
    assert edges == [hours_since_epoch(d) for d in ("2016-12-15", "2017-01-01", "2017-02-01")]
    assert np.all(np.diff(edges) > 0)


def test_monthly_shards_of_sub_month_splits_convert(tmp_path: Path) -> None:
    source = _year_file(tmp_path, 2017, fmt="netcdf")
    meta = convert_caqra([source], tmp_path / "out", grid=GRID, splits=SPLITS, halo_hours=6)
    assert [s.split for s in meta.shards] == ["train", "validation"]


def test_out_holding_user_files_is_refused_and_left_alone(tmp_path: Path) -> None:
    source = _year_file(tmp_path, 2017, fmt="netcdf")
    out = tmp_path / "out"
    out.mkdir()
    (out / "thesis.tex").write_text("years of work")
    with pytest.raises(CorpusError, match="holds no TopoFlow corpus"):
        convert_caqra([source], out, grid=GRID, splits=SPLITS, halo_hours=6, shards_per_split=1)
    assert (out / "thesis.tex").read_text() == "years of work"
