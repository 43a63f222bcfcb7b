"""The CAQRA converter on small yearly Zarr and NetCDF files written in the test."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from topoflow.corpus import CorpusError, CorpusMetadata
from topoflow.corpus.caqra import TargetGrid, convert_caqra
from topoflow.corpus.shards import read_shard, read_static
from topoflow.data import make_forecast_dataset

try:  # the `caqra` extra, which `pip install -e .[tests]` installs: fail loudly, never skip
    import h5netcdf  # noqa: F401
    import xarray as xr
    import zarr  # noqa: F401
except ImportError as err:
    raise ImportError(
        f"tests/test_caqra.py needs the optional `caqra` extra ({err.name} is missing): "
        "pip install -e .[caqra] (or .[tests])"
    ) from err

SRC_LAT = np.arange(30.0, 34.01, 0.5)  # 9 rows
SRC_LON = np.arange(100.0, 106.01, 0.5)  # 13 columns
GRID = TargetGrid(height=4, width=7, lat_min=30.25, lat_max=33.25, lon_min=100.25, lon_max=105.5)
SPLITS = {"train": ("2016-12-30", "2017-01-01"), "validation": ("2017-01-01", "2017-01-02"),
          "test": ("2017-01-02", "2017-01-03")}  # fmt: skip


def _linear(lat: np.ndarray, lon: np.ndarray, hours: np.ndarray, offset: float, scale: float
            ) -> np.ndarray:  # fmt: skip
    """Fields linear in lat and lon, so bilinear regridding must reproduce them exactly."""
    return offset + scale * (2.0 + 0.5 * (lat - 30) + 0.25 * (lon - 100) + 0.01 * (hours % 24))


def _year_file(folder: Path, year: int, *, fmt: str, co_scale: float = 1.0) -> Path:
    times = np.arange(f"{year}-12-30" if year == 2016 else f"{year}-01-01",
                      f"{year + 1}-01-01" if year == 2016 else f"{year}-01-03",
                      dtype="datetime64[h]")  # fmt: skip
    hours = times.astype(np.int64)[:, None, None]
    lon2d, lat2d = np.meshgrid(SRC_LON, SRC_LAT)
    sea = lon2d > 104.6  # an eastern strip outside the "china_masked" data
    data = {}
    for k, (var, offset, scale) in enumerate([
        ("u", 0, 1), ("v", 0, -1), ("temp", 250, 10), ("rh", 0, 10), ("psfc", 800, 30),
        ("pm25", 0, 20), ("pm10", 0, 30), ("so2", 0, 5), ("no2", 0, 8), ("co", 0, 0.3 * co_scale),
        ("o3", 0, 25),
    ]):  # fmt: skip
        field = _linear(lat2d, lon2d, hours, offset, scale)
        field = np.broadcast_to(field, (len(times), *lat2d.shape))
        field = field.astype(np.float32).copy()
        if var not in ("u", "v", "temp", "rh", "psfc"):
            field[:, sea] = np.nan
        if var in ("u", "v") and k == 0:
            field[:, sea] = -999.0  # sentinel instead of NaN
        data[var] = (("time", "y", "x"), field)
    data["pm25"][1][:, 4, 6] = -999.0  # a sentinel inside the domain
    data["so2"][1][:, 2, 2] = -99.0
    data["elevation"] = (("y", "x"), (1000 * (lat2d - 30)).astype(np.float32))
    data["population"] = (("y", "x"), np.full(lat2d.shape, 100.0, np.float32))
    data["lat2d"] = (("y", "x"), lat2d.astype(np.float32))
    data["lon2d"] = (("y", "x"), lon2d.astype(np.float32))
    ds = xr.Dataset(data, coords={"time": times.astype("datetime64[ns]")})
    encoding = {"no2": {"_FillValue": -9999.0}}
    if fmt == "zarr":
        path = folder / f"data_{year}_china_masked.zarr"
        ds.to_zarr(path, encoding=encoding, zarr_format=2, consolidated=True)
    else:
        path = folder / f"data_{year}_china_masked.nc"
        ds.to_netcdf(path, engine="h5netcdf", encoding=encoding)
    return path


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    folder = tmp_path_factory.mktemp("caqra")
    return [_year_file(folder, 2016, fmt="zarr"), _year_file(folder, 2017, fmt="netcdf")]


@pytest.fixture(scope="module")
def converted(sources: list[Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("converted") / "corpus"
    meta = convert_caqra(sources, out, grid=GRID, splits=SPLITS, halo_hours=12,
                         shards_per_split=2)  # fmt: skip
    return Path(meta.source)


def test_regridding_is_exact_for_linear_fields(converted: Path) -> None:
    meta = CorpusMetadata.load(converted)
    lat, lon = GRID.centres()
    lon2d, lat2d = np.meshgrid(lon, lat)
    shard = meta.split_shards("validation")[0]
    hours, _, fields = read_shard(converted, shard, meta)
    expected = _linear(lat2d, lon2d, hours[:, None, None], 250, 10)
    np.testing.assert_allclose(fields["temp"], expected, rtol=1e-5)
    assert meta.grid["height"] == 4 and meta.grid["lat_min"] == pytest.approx(30.25)
    assert list(np.diff(hours)) == [6] * (len(hours) - 1)


def test_fill_values_and_sentinels_become_nan_and_mask(converted: Path) -> None:
    meta = CorpusMetadata.load(converted)
    static = read_static(converted / "static.safetensors", meta)
    land = static["region_id"] == 1
    assert land.any() and (~land).any()
    assert (static["land_fraction"][:, -1] < 0.5).all()  # the eastern strip is outside
    assert land[:, :-1].all()  # one variable's sentinel does not punch holes into the region
    for shard in meta.shards:
        _, _, fields = read_shard(converted, shard, meta)
        for var in ("pm25", "so2", "no2", "o3", "u"):
            values = fields[var]
            assert not (values <= -99).any(), var  # no sentinel survives
            assert np.isnan(values[:, :, -1]).all() or var == "u", var  # the masked sea strip
        # The -999 in pm25 dominates a target cell's weights: a NaN hole. The -99 in so2 has
        # less than half the weight anywhere, so valid neighbours fill it, never the sentinel.
        assert np.isnan(fields["pm25"][:, land]).any()
        assert np.isfinite(fields["so2"][:, land]).all() and (fields["so2"][:, land] > 0).all()
        assert np.isfinite(fields["temp"]).all()


def test_converted_corpus_streams(converted: Path) -> None:
    ds = make_forecast_dataset(converted, "train", variables=["u", "temp", "elevation", "co"],
                               target_variables=["co", "pm25"], lead_times_hours=[6, 12])
    assert ds.n_shards == 2
    samples = list(ds)
    assert len(samples) == 8 * 2 - 1 - 2  # 8 six-hourly inits, leads 6 and 12 within the split
    for s in samples:
        assert np.isfinite(s["fields"]).all()
        assert np.isnan(s["labels"][:, ~s["region_mask"]]).all()


def test_co_in_wrong_units_fails_naming_variable_and_file(tmp_path: Path) -> None:
    bad = _year_file(tmp_path, 2017, fmt="netcdf", co_scale=1000.0)  # ug/m3, not mg/m3
    splits = {"train": ("2017-01-01", "2017-01-02"), "validation": ("2017-01-02", "2017-01-03")}
    with pytest.raises(CorpusError, match=rf"{bad.name}.*'co'.*mg/m3"):
        convert_caqra([bad], tmp_path / "out", grid=GRID, splits=splits, halo_hours=6,
                      shards_per_split=1)  # fmt: skip
    assert not (tmp_path / "out").exists()  # nothing half-written
    meta = convert_caqra([bad], tmp_path / "out", grid=GRID, splits=splits, halo_hours=6,
                         shards_per_split=1, source_units={"co": "ug/m3"})  # fmt: skip
    assert meta.normalization["co"]["mean"] < 5.0
