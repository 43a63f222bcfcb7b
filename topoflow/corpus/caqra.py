"""Convert CAQRA-style yearly reanalysis files into a TopoFlow corpus (the default's schema).

Input: one file per year, Zarr (`data_YYYY_china_masked.zarr`) or NetCDF (`.nc`), with variables
u, v, temp, rh, psfc, pm25, pm10, so2, no2, co, o3 on (time, y, x) and static elevation,
population, lat2d, lon2d on (y, x) (a leading time axis on statics is tolerated). The source grid
must be rectilinear (lat2d constant along rows, lon2d along columns).

What the conversion does, and why:
- `_FillValue` / `missing_value` (decoded by xarray) and the sentinels -999, -99, -9999 become NaN:
  NaN is the corpus's only "missing" marker, so labels are masked out of the loss.
- Values are regridded bilinearly onto the target grid, NaN-aware: a target cell is the weighted
  mean of its valid source neighbours, and NaN where less than half of the bilinear weight is valid
  or the cell lies outside the source grid. Linear fields are reproduced exactly.
- The land fraction is the regridded 0/1 mask of valid source cells (or the file's own
  `land_fraction`/`lsm`); `region_id` is 1 where it is >= `land_threshold`, else 0 (no loss).
- Physical-range checks run on every chunk in the corpus's units and name the variable and file:
  a CO field in ug/m3 where mg/m3 is expected fails instead of training on nonsense. Declared
  source units (`source_units={"co": "ug/m3"}`) are converted.
- Time stamps are sub-sampled to `time_step_hours` (instantaneous values, no averaging).

Needs the optional extras `pip install topoflow[caqra]` (xarray with zarr or h5netcdf).
"""

from __future__ import annotations

import argparse
import os
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .build import (
    CorpusWriter,
    build_atomically,
    check_replaceable,
    even_edges,
    finalize_corpus,
    monthly_edges,
)
from .schema import (
    DYNAMIC_VARIABLES,
    POLLUTANTS,
    SENTINELS,
    UNITS,
    CorpusError,
    CorpusMetadata,
)

__all__ = [
    "SENTINELS",
    "PLAUSIBLE_RANGES",
    "UNIT_CONVERSIONS",
    "TargetGrid",
    "BilinearRegridder",
    "convert_caqra",
    "main",
]

# Plausible (min, max) in the corpus's units (schema.UNITS); generous, they catch unit mistakes.
PLAUSIBLE_RANGES: dict[str, tuple[float, float]] = {
    "u": (-120.0, 120.0), "v": (-120.0, 120.0), "temp": (150.0, 350.0), "rh": (0.0, 105.0),
    "psfc": (300.0, 1100.0), "pm25": (0.0, 3000.0), "pm10": (0.0, 6000.0), "so2": (0.0, 3000.0),
    "no2": (0.0, 1000.0), "co": (0.0, 60.0), "o3": (0.0, 1000.0), "elevation": (-500.0, 9000.0),
    "population": (0.0, 1.0e5),
}  # fmt: skip

UNIT_CONVERSIONS: dict[tuple[str, str], Callable[[np.ndarray], np.ndarray]] = {
    ("psfc", "Pa"): lambda x: x / 100.0,
    ("co", "ug/m3"): lambda x: x / 1000.0,
    ("temp", "degC"): lambda x: x + 273.15,
    ("rh", "1"): lambda x: x * 100.0,
}

_STATIC_SOURCE = ("elevation", "population")
_LAND_NAMES = ("land_fraction", "lsm", "landmask", "land_mask")


@dataclass(frozen=True)
class TargetGrid:
    """A regular lat/lon grid by its outer box edges; cell centres at min + (i + 0.5) * res."""

    height: int
    width: int
    lat_min: float
    lat_max: float
    lon_min: float
    lon_max: float

    def __post_init__(self) -> None:
        res_lat = (self.lat_max - self.lat_min) / self.height
        res_lon = (self.lon_max - self.lon_min) / self.width
        if self.height <= 0 or self.width <= 0 or not np.isclose(res_lat, res_lon) or res_lat <= 0:
            raise ValueError(f"TargetGrid needs equal positive lat/lon spacing, got {self}")

    @property
    def resolution_deg(self) -> float:
        return (self.lat_max - self.lat_min) / self.height

    def centres(self) -> tuple[np.ndarray, np.ndarray]:
        res = self.resolution_deg
        lat = self.lat_min + (np.arange(self.height) + 0.5) * res
        lon = self.lon_min + (np.arange(self.width) + 0.5) * res
        return lat, lon


def _interp_matrix(source: np.ndarray, target: np.ndarray) -> np.ndarray:
    """(len(target), len(source)) linear interpolation weights; zero rows outside the source."""
    order = np.argsort(source)
    src = source[order]
    weights = np.zeros((len(target), len(source)))
    for t, x in enumerate(target):
        if x < src[0] or x > src[-1]:
            continue
        hi = min(int(np.searchsorted(src, x, side="right")), len(src) - 1)
        lo = max(hi - 1, 0)
        span = src[hi] - src[lo]
        frac = 0.0 if span == 0 else (x - src[lo]) / span
        weights[t, order[lo]] += 1.0 - frac
        weights[t, order[hi]] += frac
    return weights


class BilinearRegridder:
    """NaN-aware separable bilinear regridding from a rectilinear source to a TargetGrid."""

    def __init__(self, source_lat: np.ndarray, source_lon: np.ndarray, grid: TargetGrid) -> None:
        lat, lon = grid.centres()
        self.wy = _interp_matrix(np.asarray(source_lat, np.float64), lat)  # (H, Ny)
        self.wx = _interp_matrix(np.asarray(source_lon, np.float64), lon)  # (W, Nx)

    def __call__(self, field: np.ndarray, min_valid_weight: float = 0.5) -> np.ndarray:
        """(..., Ny, Nx) -> float32 (..., H, W); NaN where too little valid source weight."""
        valid = np.isfinite(field)
        values = np.where(valid, field, 0.0).astype(np.float64)
        total = np.einsum("hy,...yx,wx->...hw", self.wy, values, self.wx)
        weight = np.einsum("hy,...yx,wx->...hw", self.wy, valid.astype(np.float64), self.wx)
        out = np.full(total.shape, np.nan)
        ok = weight >= min_valid_weight
        out[ok] = total[ok] / weight[ok]
        return out.astype(np.float32)


def _open(path: Path) -> Any:
    try:
        import xarray as xr
    except ImportError as e:
        raise ImportError("the CAQRA converter needs xarray: pip install 'topoflow[caqra]'") from e
    engine = "zarr" if path.suffix == ".zarr" or path.is_dir() else "h5netcdf"
    try:
        return xr.open_dataset(path, engine=engine, mask_and_scale=True)
    except (OSError, ValueError, KeyError) as e:
        raise CorpusError(f"{path}: cannot open as {engine}: {e}") from e


def _clean(values: np.ndarray, var: str, path: Path, source_units: Mapping[str, str]) -> np.ndarray:
    """Sentinels -> NaN, declared units -> corpus units, then the physical-range check."""
    x = np.asarray(values, dtype=np.float64)
    x = np.where(np.isin(x, SENTINELS), np.nan, x)
    unit = source_units.get(var, UNITS[var])
    if unit != UNITS[var]:
        if (var, unit) not in UNIT_CONVERSIONS:
            raise ValueError(f"no conversion for {var!r} from {unit!r} to {UNITS[var]!r}")
        x = UNIT_CONVERSIONS[(var, unit)](x)
    lo, hi = PLAUSIBLE_RANGES.get(var, (-np.inf, np.inf))
    if np.isfinite(x).any():
        xmin, xmax = float(np.nanmin(x)), float(np.nanmax(x))
        if xmin < lo or xmax > hi:
            raise CorpusError(
                f"{path}: variable {var!r} spans [{xmin:.4g}, {xmax:.4g}] {UNITS[var]}, outside "
                f"the plausible [{lo:g}, {hi:g}]; wrong units? (declare them with "
                f"source_units={{{var!r}: '<unit>'}}; known: {sorted(UNIT_CONVERSIONS)})"
            )
    return x


def _rectilinear_axes(ds: Any, path: Path) -> tuple[np.ndarray, np.ndarray]:
    lat2d = np.asarray(ds["lat2d"].values, np.float64)
    lon2d = np.asarray(ds["lon2d"].values, np.float64)
    if lat2d.ndim == 3:
        lat2d, lon2d = lat2d[0], lon2d[0]
    if not (np.allclose(lat2d, lat2d[:, :1]) and np.allclose(lon2d, lon2d[:1, :])):
        raise CorpusError(f"{path}: lat2d/lon2d are not rectilinear; only regular grids convert")
    return lat2d[:, 0], lon2d[0, :]


def _file_year(path: Path) -> int:
    match = re.search(r"(\d{4})", path.name)
    return int(match.group(1)) if match else 0


def _static_fields(ds: Any, path: Path, regrid: BilinearRegridder, grid: TargetGrid,
                   land_threshold: float, source_units: Mapping[str, str]) -> dict[str, np.ndarray]:
    static = {}
    for var in _STATIC_SOURCE:
        if var not in ds:
            raise CorpusError(f"{path}: static variable {var!r} is missing")
        values = np.asarray(ds[var].values)
        static[var] = regrid(_clean(values[0] if values.ndim == 3 else values, var, path,
                                    source_units))  # fmt: skip
    land_name = next((n for n in _LAND_NAMES if n in ds), None)
    if land_name is not None:
        land = np.clip(np.nan_to_num(np.asarray(ds[land_name].values, np.float64)), 0.0, 1.0)
        land = land[0] if land.ndim == 3 else land
    else:
        # "china_masked" files: the data region is where any pollutant is valid at the first time,
        # so one variable's sentinel does not punch a hole into the region mask.
        valid = [np.isfinite(_clean(np.asarray(ds[v].isel(time=0).values), v, path, source_units))
                 for v in POLLUTANTS]  # fmt: skip
        land = np.logical_or.reduce(valid).astype(np.float64)
    land_fraction = np.nan_to_num(regrid(land, min_valid_weight=0.0), nan=0.0)
    lat, lon = grid.centres()
    lon2d, lat2d = np.meshgrid(lon, lat)
    static.update(
        lat2d=lat2d.astype(np.float32), lon2d=lon2d.astype(np.float32),
        land_fraction=land_fraction.astype(np.float32),
        region_id=(land_fraction >= land_threshold).astype(np.int32),
    )  # fmt: skip
    # Elevation and population must be finite everywhere: they are model inputs, and outside the
    # masked region the best statement is "sea level, nobody lives here".
    for var in _STATIC_SOURCE:
        static[var] = np.nan_to_num(static[var], nan=0.0)
    return static


def _iter_chunks(paths: Sequence[Path], regrid_for: Callable[[Any, Path], BilinearRegridder],
                 time_step_hours: int, source_units: Mapping[str, str], chunk_steps: int
                 ) -> Iterator[tuple[np.ndarray, dict[str, np.ndarray]]]:  # fmt: skip
    for path in paths:
        ds = _open(path)
        try:
            missing = [v for v in DYNAMIC_VARIABLES if v not in ds]
            if missing:
                raise CorpusError(f"{path}: missing variable(s) {missing}")
            hours = ds["time"].values.astype("datetime64[h]").astype(np.int64)
            keep = np.flatnonzero(hours % time_step_hours == 0)
            regrid = regrid_for(ds, path)
            for start in range(0, len(keep), chunk_steps):
                index = keep[start : start + chunk_steps]
                fields = {
                    v: regrid(_clean(ds[v].isel(time=index).values, v, path, source_units))
                    for v in DYNAMIC_VARIABLES
                }
                yield hours[index], fields
        finally:
            ds.close()


def convert_caqra(
    sources: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    *,
    grid: TargetGrid,
    splits: Mapping[str, tuple[str, str]],
    time_step_hours: int = 6,
    halo_hours: int = 96,
    shards_per_split: int | None = None,
    land_threshold: float = 0.5,
    source_units: Mapping[str, str] | None = None,
    name: str = "caqra",
    chunk_steps: int = 64,
) -> CorpusMetadata:
    """Convert yearly CAQRA files into a corpus at `out` (built atomically; an earlier corpus
    there is replaced, a folder holding anything a build did not write is refused).

    `splits` maps split names to [start, end) ISO dates (e.g. train 2013-01-01..2017-01-01);
    statistics come from the split named "train". Shards are calendar months unless
    `shards_per_split` asks for equal shares.
    """
    paths = sorted((Path(p) for p in sources), key=lambda p: (_file_year(p), p.name))
    if not paths:
        raise ValueError("convert_caqra needs at least one source file")
    units = dict(source_units or {})
    if shards_per_split is None:
        edges = {s: monthly_edges(a, b) for s, (a, b) in splits.items()}
    else:
        edges = {s: even_edges(a, b, shards_per_split, time_step_hours)
                 for s, (a, b) in splits.items()}  # fmt: skip
    axes = {}

    def regrid_for(ds: Any, path: Path) -> BilinearRegridder:
        lat, lon = _rectilinear_axes(ds, path)
        key = (lat.tobytes(), lon.tobytes())
        if key not in axes:
            axes[key] = BilinearRegridder(lat, lon, grid)
        return axes[key]

    def write(folder: Path) -> None:
        first = _open(paths[0])
        try:
            static = _static_fields(first, paths[0], regrid_for(first, paths[0]), grid,
                                    land_threshold, units)  # fmt: skip
        finally:
            first.close()
        writer = CorpusWriter(folder, variables=DYNAMIC_VARIABLES, time_step_hours=time_step_hours,
                              split_edges=edges, halo_hours=halo_hours)  # fmt: skip
        for hours, fields in _iter_chunks(paths, regrid_for, time_step_hours, units, chunk_steps):
            in_range = (hours >= min(e[0] for e in edges.values())) & (
                hours < max(e[-1] for e in edges.values()))
            if in_range.any():
                writer.add(hours[in_range], {v: f[in_range] for v, f in fields.items()})
        provenance = {
            "source": "CAQRA converter (topoflow.corpus.caqra)",
            "files": [p.name for p in paths], "source_units": units,
            "regridding": "bilinear, NaN-aware (NaN below 50% valid weight or outside the source)",
            "land_threshold": land_threshold, "time_sampling": "instantaneous",
            "seed": None, "terrain_blocking": None,
        }  # fmt: skip
        finalize_corpus(folder, name=name, writer=writer, static=static, splits=splits,
                        regions={0: "outside", 1: "domain"}, provenance=provenance)  # fmt: skip

    target = Path(out).resolve()
    check_replaceable(target, "--out")  # never replace what a corpus build did not write
    path = build_atomically(target, write, force=True)
    return CorpusMetadata.load(path)


def _period(text: str) -> tuple[str, str]:
    start, _, end = text.partition(":")
    if not end:
        raise argparse.ArgumentTypeError(f"expected START:END dates, got {text!r}")
    return start, end


def main(argv: Sequence[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(prog="python -m topoflow.corpus.caqra",
                                     description="Convert CAQRA-style yearly files to a corpus.")
    parser.add_argument("sources", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--height", type=int, default=128)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--box", type=float, nargs=4, default=(15.0, 47.0, 70.0, 134.0),
                        metavar=("LAT_MIN", "LAT_MAX", "LON_MIN", "LON_MAX"))
    parser.add_argument("--train", type=_period, default=("2013-01-01", "2017-01-01"))
    parser.add_argument("--validation", type=_period, default=("2017-01-01", "2018-01-01"))
    parser.add_argument("--test", type=_period, default=("2018-01-01", "2019-01-01"))
    parser.add_argument("--time-step-hours", type=int, default=6)
    parser.add_argument("--source-unit", action="append", default=[], metavar="VAR=UNIT")
    args = parser.parse_args(argv)
    grid = TargetGrid(args.height, args.width, *args.box)
    units = dict(item.split("=", 1) for item in args.source_unit)
    splits = {"train": args.train, "validation": args.validation, "test": args.test}
    meta = convert_caqra(args.sources, args.out, grid=grid, splits=splits,
                         time_step_hours=args.time_step_hours, source_units=units)  # fmt: skip
    print(meta.source)
    return Path(meta.source)


if __name__ == "__main__":
    main()
