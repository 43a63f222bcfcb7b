"""Terrain worlds: the positive and negative controls of the elevation bias (issue 14).

On the embedded default corpus the terrain never changes, so a learned position embedding can
stand in for any elevation bias. Here every world, and so every sample, has its own random
terrain (ridges and plateaus of 1-3 km, ring-shaped basins, plains), its own large-scale wind and
its own sources in the lowlands, and the test worlds' terrains were never seen in training.

The physics is the embedded atmosphere's own (atmosphere.py: transport, terrain blocking,
emissions, chemistry); a world only supplies a terrain and a uniform large-scale wind in place of
the China-like jet and monsoon (`WorldWeather`). The terrain circulation is switched off
(``terrain_circulation = 0``), so the winds do not depend on the terrain and the two controls differ
in one thing only: with ``terrain_blocking > 0`` (positive control) pollution is held back at
uphill faces, with ``terrain_blocking = 0`` (negative control) the elevation influences no
tracer. Both are built from identical random draws: same terrains, winds and sources.

Layout (same schema family as the default corpus, docs/CONTRACTS.md section 2): one shard per world,
``own_rows`` initial times every ``time_step_hours`` followed by ``halo_hours`` of target-only rows,
so no sample pairs two worlds. ``elevation`` and ``population`` are dynamic variables (a column per
row, constant within a world), so the loader hands every sample its own terrain; the static file
keeps lat/lon, land fraction and region id. Worlds follow one another in time (one world every
``rows * time_step_hours``), so sample ids stay unique and the seasons cycle through every split;
the splits interleave (``split_of_worlds``) so they sample the same seasons.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .atmosphere import R_EARTH, AtmosphereParams, _Weather, simulate
from .build import RunningStats, finalize_corpus
from .schema import DYNAMIC_VARIABLES, CorpusMetadata, ShardInfo
from .shards import shard_file_name, write_shard
from .terrain import Terrain, _block_mean, _gauss, _sigmoid, _smooth_noise

__all__ = [
    "WORLDS_VERSION",
    "WORLD_SIZES",
    "WORLD_STATIC_VARIABLES",
    "WORLD_VARIABLES",
    "WorldWeather",
    "WorldsSize",
    "split_of_worlds",
    "world_population",
    "world_seed",
    "world_terrain",
    "simulate_world",
    "write_worlds_corpus",
]

# Bump whenever the generated worlds change (the corpus cache is keyed on it).
WORLDS_VERSION = "1"

# Per-world fields are dynamic; what is left static is the grid itself.
WORLD_VARIABLES: tuple[str, ...] = (*DYNAMIC_VARIABLES, "elevation", "population")
WORLD_STATIC_VARIABLES: tuple[str, ...] = ("lat2d", "lon2d", "land_fraction")
_REGIONS = {0: "outside", 1: "world"}
_SUPERSAMPLE = 4
# A 1-degree box in the subtropics: no dust source, coal heating only in its northern rows.
_LAT_MIN, _LON_MIN, _RESOLUTION = 20.0, 100.0, 1.0


@dataclass(frozen=True)
class WorldsSize:
    """One preset: grid, worlds per split, and the time layout of a world."""

    height: int
    width: int
    worlds: dict[str, int]
    own_rows: int = 4  # initial times per world (one day at 6 h)
    halo_hours: int = 24  # the longest lead time served
    spinup_days: int = 4  # lets plumes form before the first output (about one advection time)
    time_step_hours: int = 6
    start: str = "2015-01-01"

    @property
    def rows(self) -> int:
        return self.own_rows + self.halo_hours // self.time_step_hours


WORLD_SIZES: dict[str, WorldsSize] = {
    # 16 x 32 cells of 1 degree: 128 tokens at patch 2. 288 training worlds = 2304 samples at
    # leads 12 and 24 h; the build takes about a minute of CPU.
    "worlds": WorldsSize(16, 32, {"train": 288, "validation": 48, "test": 48}),
    # For tests: 4 shards per split (2 ranks x 2 workers), one day of spin-up.
    "worlds-tiny": WorldsSize(16, 32, {"train": 4, "validation": 4, "test": 4}, spinup_days=1),
}


def world_seed(seed: int, index: int) -> int:
    """The generator seed of world `index`: distinct per (corpus seed, world), never per blocking,
    so the blocking-on and blocking-off corpora draw identical terrains, winds and sources."""
    if not 0 <= index < 1_000_000:
        raise ValueError(f"world index {index} out of range [0, 1000000)")
    return int(seed) * 1_000_000 + int(index)


def split_of_worlds(worlds: dict[str, int]) -> list[str]:
    """The split of each world in time order: the splits interleave evenly (world k of split s sits
    at fraction (k + 0.5) / n_s of the sequence), so every split covers every season."""
    keyed = [((k + 0.5) / n, order, split) for order, (split, n) in enumerate(worlds.items())
             for k in range(n)]  # fmt: skip
    return [split for _, _, split in sorted(keyed)]


# ----------------------------------------------------------------------------- terrain


def _ridges(rng: np.random.Generator, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """2-4 straight ridges, 1-3 km high, 6-16 degrees long, Gaussian cross-section."""
    out = np.zeros_like(x)
    for _ in range(rng.integers(2, 5)):
        cx, cy = rng.uniform(0.15, 0.85) * x.max(), rng.uniform(0.15, 0.85) * y.max()
        angle, half_length = rng.uniform(0.0, np.pi), rng.uniform(3.0, 8.0)
        width, height = rng.uniform(0.5, 1.0), rng.uniform(1000.0, 3000.0)
        along = (x - cx) * np.cos(angle) + (y - cy) * np.sin(angle)
        across = -(x - cx) * np.sin(angle) + (y - cy) * np.cos(angle)
        ridge = height * _gauss(across / width) * _sigmoid((half_length - np.abs(along)) / 0.7)
        out = np.maximum(out, ridge)
    return out


def _plateaus(rng: np.random.Generator, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """0-2 elliptic plateaus, 1-3 km high, with steep flanks."""
    out = np.zeros_like(x)
    for _ in range(rng.integers(0, 3)):
        cx, cy = rng.uniform(0.1, 0.9) * x.max(), rng.uniform(0.1, 0.9) * y.max()
        a, b, height = rng.uniform(1.5, 4.0), rng.uniform(1.5, 4.0), rng.uniform(1000.0, 3000.0)
        r = np.hypot((x - cx) / a, (y - cy) / b)
        out = np.maximum(out, height * _sigmoid((1.0 - r) / 0.12))
    return out


def _basins(rng: np.random.Generator, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """0-1 basins: a lowland floor ringed by mountains, 1-2.5 km, with one pass in the rim."""
    out = np.zeros_like(x)
    for _ in range(rng.integers(0, 2)):
        cx, cy = rng.uniform(0.25, 0.75) * x.max(), rng.uniform(0.25, 0.75) * y.max()
        radius, height = rng.uniform(2.0, 4.0), rng.uniform(1000.0, 2500.0)
        gap = rng.uniform(-np.pi, np.pi)
        r = np.hypot(x - cx, y - cy) / radius
        bearing = np.angle(np.exp(1j * (np.arctan2(y - cy, x - cx) - gap)))
        rim = height * _gauss((r - 1.0) / 0.18) * (1.0 - 0.85 * _gauss(bearing / 0.35))
        out = np.maximum(out, rim)
    return out


def world_terrain(seed: int, index: int, height: int, width: int) -> Terrain:
    """The terrain of world `index`: plains at 50-300 m with gentle relief, plus ridges,
    plateaus and basins (cell means of a 4x finer grid, as in terrain.py), and its population."""
    rng = np.random.default_rng([world_seed(seed, index), 10])
    n = _SUPERSAMPLE
    x = (np.arange(width * n) + 0.5) * _RESOLUTION / n  # degrees east of the box's west edge
    y = (np.arange(height * n) + 0.5) * _RESOLUTION / n
    x_fine, y_fine = np.meshgrid(x, y)
    base = rng.uniform(50.0, 300.0)
    relief = _smooth_noise(rng, y_fine, x_fine, 12, (2.0, 8.0))
    mountains = np.maximum.reduce(
        [_ridges(rng, x_fine, y_fine), _plateaus(rng, x_fine, y_fine), _basins(rng, x_fine, y_fine)]
    )
    z_fine = np.maximum(base + mountains + (40.0 + 0.05 * mountains) * relief, 5.0)
    elevation = _block_mean(z_fine, n)
    lat = _LAT_MIN + (np.arange(height) + 0.5) * _RESOLUTION
    lon = _LON_MIN + (np.arange(width) + 0.5) * _RESOLUTION
    lon2d, lat2d = np.meshgrid(lon, lat)
    return Terrain(
        elevation=elevation.astype(np.float32),
        population=world_population(rng, elevation, lat2d, lon2d).astype(np.float32),
        lat2d=lat2d.astype(np.float32),
        lon2d=lon2d.astype(np.float32),
        land_fraction=np.ones((height, width), np.float32),
        region_id=np.ones((height, width), np.int32),
        regions=dict(_REGIONS),
        lat_min=_LAT_MIN,
        lat_max=_LAT_MIN + height * _RESOLUTION,
        lon_min=_LON_MIN,
        lon_max=_LON_MIN + width * _RESOLUTION,
    )


def world_population(
    rng: np.random.Generator, elevation: np.ndarray, lat2d: np.ndarray, lon2d: np.ndarray
) -> np.ndarray:
    """People per km^2: a rural density that fades out above ~500 m plus 4-8 cities placed on
    lowland cells, so the sources (emissions follow people) lie in the lowlands."""
    rural = 150.0 * np.exp(0.5 * _smooth_noise(rng, lat2d, lon2d, 8, (3.0, 10.0)))
    density = rural * _sigmoid((500.0 - elevation) / 120.0)
    lowland = np.flatnonzero(elevation.ravel() < 400.0)
    if lowland.size == 0:  # a world that is all mountains keeps its rural sources only
        return density
    cities = rng.choice(lowland, size=min(int(rng.integers(4, 9)), lowland.size), replace=False)
    for cell in cities:
        extra = rng.uniform(800.0, 3000.0)
        distance = np.hypot(lat2d - lat2d.flat[cell], lon2d - lon2d.flat[cell])
        density = density + extra * _gauss(distance / 0.6)
    return density


# ----------------------------------------------------------------------------- winds


class WorldWeather(_Weather):
    """The embedded meteorology with a world's own large-scale flow.

    The China-like westerly jet, monsoon and plateau circulation give way to a uniform wind of
    2-7 m/s in a random direction (drawn per world), carried by a streamfunction so the discrete
    flow stays exactly non-divergent; the random eddies and travelling waves, temperature,
    humidity and pressure are the parent's.
    """

    def __init__(self, params: AtmosphereParams, terrain: Terrain, geometry: Any) -> None:
        super().__init__(params, terrain, geometry)
        rng = np.random.default_rng([params.seed, 2])
        speed, direction = rng.uniform(2.0, 7.0), rng.uniform(0.0, 2.0 * np.pi)
        self.mean_wind = (speed * np.cos(direction), speed * np.sin(direction))  # (u, v) m/s
        lat_ref = np.deg2rad(0.5 * (terrain.lat_min + terrain.lat_max))
        lon_ref = 0.5 * (terrain.lon_min + terrain.lon_max)
        # east-face flux = -(d psi / d row) = u dy; north-face flux = d psi / d column = v dx.
        u, v = self.mean_wind
        self.mean_psi = R_EARTH * (
            -u * np.deg2rad(self.lat_corner)
            + v * np.cos(lat_ref) * np.deg2rad(self.lon_corner - lon_ref)
        )

    def synoptic_psi(self, hour: float) -> tuple[np.ndarray, np.ndarray]:
        perturbation = self.perturbation_psi(hour)
        psi = perturbation + self.mean_psi + self.winter_index(hour) * self.topo_psi
        return psi, perturbation


# ----------------------------------------------------------------------------- one world


def _iso_hour(hour: int) -> str:
    return str(np.datetime64(int(hour), "h"))


def world_params(
    size: WorldsSize, seed: int, index: int, start_hour: int, terrain_blocking: float
) -> AtmosphereParams:
    """Generator parameters of one world; only ``terrain_blocking`` differs between controls."""
    return AtmosphereParams(
        height=size.height, width=size.width, start=_iso_hour(start_hour),
        end=_iso_hour(start_hour + size.rows * size.time_step_hours),
        output_step_hours=size.time_step_hours, seed=world_seed(seed, index),
        terrain_blocking=terrain_blocking, terrain_circulation=0.0, spinup_days=size.spinup_days,
    )  # fmt: skip


def simulate_world(
    size: WorldsSize, seed: int, index: int, start_hour: int, terrain_blocking: float
) -> tuple[np.ndarray, dict[str, np.ndarray], Terrain]:
    """(time_hour (rows,), {WORLD_VARIABLES: float32 (rows, H, W)}, terrain) of one world."""
    terrain = world_terrain(seed, index, size.height, size.width)
    params = world_params(size, seed, index, start_hour, terrain_blocking)
    chunks = list(simulate(params, terrain=terrain, weather_type=WorldWeather))
    time_hour = np.concatenate([hours for hours, _ in chunks])
    fields = {v: np.concatenate([chunk[v] for _, chunk in chunks]) for v in DYNAMIC_VARIABLES}
    for name in ("elevation", "population"):
        fields[name] = np.broadcast_to(getattr(terrain, name), fields["u"].shape).copy()
    assert len(time_hour) == size.rows, (len(time_hour), size.rows)
    return time_hour, fields, terrain


# ----------------------------------------------------------------------------- the corpus


@dataclass
class _WorldShards:
    """What `finalize_corpus` needs from a writer, for shards written one world at a time."""

    variables: list[str]
    step: int
    halo_hours: int
    stats: RunningStats = field(default_factory=RunningStats)
    written: list[ShardInfo] = field(default_factory=list)

    def write(self, folder: Path, file: str, split: str, time_hour: np.ndarray,
              fields: dict[str, np.ndarray], own_rows: int) -> None:
        is_halo = np.arange(len(time_hour)) >= own_rows
        sha = write_shard(folder / file, time_hour, is_halo, fields, self.variables)
        if split == "train":  # statistics from the training worlds' own rows only
            for v in self.variables:
                self.stats.update(v, fields[v][:own_rows])
        self.written.append(ShardInfo(
            file=file, split=split, rows=len(time_hour), own_rows=own_rows,
            first_hour=int(time_hour[0]), last_hour=int(time_hour[-1]), sha256=sha,
        ))  # fmt: skip

    def finish(self) -> list[ShardInfo]:
        return sorted(self.written, key=lambda s: (s.split, s.first_hour))


def write_worlds_corpus(
    folder: str | os.PathLike,
    *,
    size: str = "worlds",
    seed: int = 0,
    terrain_blocking: float = 1.0,
) -> CorpusMetadata:
    """Simulate every world of preset `size`; write the corpus into `folder` (empty or absent)."""
    if size not in WORLD_SIZES:
        raise ValueError(f"worlds size must be one of {sorted(WORLD_SIZES)}, got {size!r}")
    preset = WORLD_SIZES[size]
    folder = Path(folder)
    (folder / "data").mkdir(parents=True, exist_ok=True)
    writer = _WorldShards(list(WORLD_VARIABLES), preset.time_step_hours, preset.halo_hours)
    span = preset.rows * preset.time_step_hours
    first = int(np.datetime64(preset.start, "h").astype(np.int64))
    position = {split: 0 for split in preset.worlds}
    periods: dict[str, list[int]] = {}
    static: dict[str, np.ndarray] = {}
    for index, split in enumerate(split_of_worlds(preset.worlds)):
        start = first + index * span
        time_hour, fields, terrain = simulate_world(preset, seed, index, start, terrain_blocking)
        file = shard_file_name(split, position[split], preset.worlds[split])
        writer.write(folder, file, split, time_hour, fields, preset.own_rows)
        position[split] += 1
        periods.setdefault(split, [start, start + span])[1] = start + span
        static = {v: getattr(terrain, v) for v in (*WORLD_STATIC_VARIABLES, "region_id")}
    provenance = {
        "source": "embedded generator, terrain worlds (topoflow.corpus.worlds)",
        "size": size, "seed": seed, "terrain_blocking": terrain_blocking,
        "worlds_version": WORLDS_VERSION, "worlds": dict(preset.worlds),
        "world_layout": {k: v for k, v in asdict(preset).items() if k != "worlds"},
        "split_note": "Split by world: each world (terrain, winds, sources) is in one split "
                      "only, so no validation or test terrain is seen in training; the worlds of "
                      "the three splits interleave in time (topoflow.corpus.worlds).",
    }  # fmt: skip
    splits = {s: (_iso_hour(a), _iso_hour(b)) for s, (a, b) in periods.items()}
    return finalize_corpus(
        folder, name=f"topoflow-{size}", writer=writer, static=static, splits=splits,
        regions=_REGIONS, provenance=provenance, static_variables=WORLD_STATIC_VARIABLES,
    )  # fmt: skip

