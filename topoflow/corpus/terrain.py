"""China-like synthetic terrain for the embedded default corpus: elevation, land, regions, people.

The map is built from smooth analytic shapes placed in geographic coordinates (a high plateau in
the west, the Sichuan and Tarim basins ringed by mountains, the North China Plain, south-eastern
hills, a coast and sea in the east), so it looks the same at any grid size. Every shape is
evaluated on a grid ``_SUPERSAMPLE`` times finer than the output and block-averaged, so each cell
holds the *mean* over its area (as an avg-pooled reanalysis field would) and narrow ridges are not
missed on coarse grids. The seed moves features slightly and sets small-scale relief and towns.

Grid convention (shared with atmosphere.py): row ``i`` increases northward (latitude ascending),
column ``j`` increases eastward; cell centres sit at ``lat_min + (i + 0.5) * resolution_deg``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

__all__ = [
    "LAT_MAX",
    "LAT_MIN",
    "LON_MAX",
    "LON_MIN",
    "REGIONS",
    "GridSpec",
    "Terrain",
    "make_terrain",
]

# The reference box (CAQRA over China at 0.25 deg is 128 x 256 on exactly this box).
LAT_MIN, LAT_MAX = 15.0, 47.0
LON_MIN, LON_MAX = 70.0, 134.0

REGIONS: dict[int, str] = {
    0: "sea",
    1: "coast",
    2: "northern_plain",
    3: "sichuan_basin",
    4: "tarim_basin",
    5: "plateau",
    6: "mountains",
    7: "southeast_hills",
    8: "other_lowland",
    9: "highland",
}
_CODE = {name: code for code, name in REGIONS.items()}

_SUPERSAMPLE = 4

# Basins as ellipses (centre lat, centre lon, semi-axis lat, semi-axis lon in degrees, floor in m).
_SICHUAN = (30.5, 105.8, 2.3, 3.0, 450.0)
_TARIM = (39.8, 83.5, 1.9, 6.0, 1050.0)

# Population centres (lat, lon, extra people/km^2 at the centre): real megacity locations so the
# emission map has the familiar hot spots (Beijing, Shanghai, Guangzhou, Chengdu, ...).
_CITIES = (
    (39.9, 116.4, 2500.0), (39.1, 117.2, 1500.0), (38.0, 114.5, 1200.0), (36.7, 117.0, 1200.0),
    (34.7, 113.6, 1400.0), (31.2, 121.5, 3000.0), (32.1, 118.8, 1500.0), (30.3, 120.2, 1500.0),
    (30.6, 114.3, 1800.0), (23.1, 113.3, 2800.0), (22.6, 114.1, 2200.0), (30.7, 104.1, 2200.0),
    (29.6, 106.5, 2000.0), (34.3, 108.9, 1500.0), (41.8, 123.4, 1200.0), (28.2, 112.9, 1000.0),
    (26.1, 119.3, 900.0), (36.1, 103.8, 600.0), (28.6, 77.2, 2500.0), (22.6, 88.4, 2200.0),
)

# People per km^2 by region before towns and noise are added (orders of magnitude of China's
# census densities on a 1-degree grid).
_REGION_DENSITY = {
    "sea": 0.0, "coast": 700.0, "northern_plain": 650.0, "sichuan_basin": 550.0,
    "tarim_basin": 12.0, "plateau": 3.0, "mountains": 25.0, "southeast_hills": 300.0,
    "other_lowland": 250.0, "highland": 70.0,
}


class GridSpec(Protocol):
    """What make_terrain needs from the generator parameters (AtmosphereParams satisfies it)."""

    height: int
    width: int
    seed: int


@dataclass(frozen=True)
class Terrain:
    """Static fields of the synthetic domain, each float32 (H, W) unless noted.

    elevation: cell-mean surface height above sea level in metres (0 over the sea).
    population: people per km^2 of the whole cell.
    lat2d, lon2d: cell-centre latitude and longitude in degrees.
    land_fraction: fraction of the cell that is land, 0..1.
    region_id: int32 (H, W) codes named in ``regions``.
    """

    elevation: np.ndarray
    population: np.ndarray
    lat2d: np.ndarray
    lon2d: np.ndarray
    land_fraction: np.ndarray
    region_id: np.ndarray
    regions: dict[int, str] = field(default_factory=lambda: dict(REGIONS))
    lat_min: float = LAT_MIN
    lat_max: float = LAT_MAX
    lon_min: float = LON_MIN
    lon_max: float = LON_MAX

    @property
    def resolution_deg(self) -> float:
        """Grid spacing in degrees (the same in latitude and longitude)."""
        return (self.lat_max - self.lat_min) / self.elevation.shape[0]

    def static_fields(self) -> dict[str, np.ndarray]:
        """The static fields by their corpus names (docs/CONTRACTS.md section 2)."""
        return {
            "elevation": self.elevation,
            "population": self.population,
            "lat2d": self.lat2d,
            "lon2d": self.lon2d,
            "land_fraction": self.land_fraction,
            "region_id": self.region_id,
        }


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))


def _gauss(x: np.ndarray) -> np.ndarray:
    return np.exp(-0.5 * x * x)


def _smooth_noise(
    rng: np.random.Generator, lat: np.ndarray, lon: np.ndarray, n_modes: int, wavelength_deg: tuple
) -> np.ndarray:
    """Sum of random plane waves with unit variance: resolution-independent smooth relief."""
    out = np.zeros_like(lat)
    for _ in range(n_modes):
        wavelength = rng.uniform(*wavelength_deg)
        angle = rng.uniform(0.0, np.pi)
        phase = rng.uniform(0.0, 2.0 * np.pi)
        k = 2.0 * np.pi / wavelength
        out += np.cos(k * (np.cos(angle) * lon + np.sin(angle) * lat) + phase)
    return out * np.sqrt(2.0 / n_modes)


def _ellipse_radius(lat: np.ndarray, lon: np.ndarray, basin: tuple) -> np.ndarray:
    lat_c, lon_c, a, b, _ = basin
    return np.hypot((lat - lat_c) / a, (lon - lon_c) / b)


def _coast_lon(lat: np.ndarray) -> np.ndarray:
    """Longitude of the east coast at each latitude: the sea lies east of it.

    Control points follow China's coast (Gulf of Tonkin, Pearl River, Taiwan Strait, Yangtze mouth,
    Shandong peninsula, Bohai Bay, Liaodong) closely enough for a 1-degree grid.
    """
    lat_pts = [15.0, 19.0, 21.3, 22.3, 24.5, 27.0, 30.5, 32.5, 35.0, 37.0, 38.3, 39.3, 40.8, 47.0]
    lon_pts = [109.5, 108.6, 109.0, 113.0, 118.0, 120.5, 122.0, 121.0, 119.6, 122.6, 119.5, 118.3,
               121.5, 131.0]
    return np.interp(lat, lat_pts, lon_pts)


def _land_mask(lat: np.ndarray, lon: np.ndarray) -> np.ndarray:
    sea = lon > _coast_lon(lat)
    sea |= (lat < 21.5) & (lon > 80.5) & (lon < 92.5)  # Bay of Bengal
    sea |= (lat < 22.0) & (lon < 72.5)  # Arabian Sea
    return (~sea).astype(np.float64)


def _elevation(lat: np.ndarray, lon: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Surface height (m) on the fine grid, before the sea is applied."""
    shift = rng.uniform(-0.4, 0.4, size=(4,))
    # China's three steps: the eastern lowlands, the ~1200 m second step west of ~108 E (Loess,
    # Yunnan-Guizhou, Mongolian plateaus) and the Tibetan plateau.
    west = _sigmoid((107.5 + shift[0] - lon) / 1.2)
    z = 80.0 + 1150.0 * west * _sigmoid((lat - 22.0) / 1.0) * _sigmoid((lon - 96.0) / 1.5)
    z += 1050.0 * west * _sigmoid((lat - 37.0) / 0.8) * _sigmoid((96.0 - lon) / 1.5)  # Gobi, Tarim
    z += 1000.0 * _sigmoid((lat - 41.5) / 0.6) * (1.0 - west) * _sigmoid((121.0 - lon) / 1.0)
    plateau = (
        _sigmoid((lat - 28.3 - shift[1]) / 0.45)
        * _sigmoid((37.0 + shift[2] - lat) / 0.55)
        * _sigmoid((lon - 75.0) / 0.8)
        * _sigmoid((101.5 + shift[3] - lon) / 0.7)
    )
    z = z * (1.0 - plateau) + 4600.0 * plateau
    z += 1400.0 * _gauss((lat - 28.6 - shift[1] - 0.025 * (lon - 85.0)) / 0.5) * _sigmoid(
        (lon - 76.0) / 1.0
    ) * _sigmoid((97.5 - lon) / 1.0)  # Himalaya on the plateau's southern rim
    z += 3200.0 * _gauss((lat - 42.6) / 0.7) * _sigmoid((lon - 74.0) / 1.0) * _sigmoid(
        (95.0 - lon) / 1.5
    )  # Tian Shan
    z += 1400.0 * _gauss((lon - 113.6) / 0.5) * _sigmoid((lat - 34.5) / 0.5) * _sigmoid(
        (41.0 - lat) / 0.5
    )  # Taihang: the west wall of the northern plain
    z += 1300.0 * _gauss((lat - 33.8) / 0.5) * _sigmoid((lon - 104.0) / 0.8) * _sigmoid(
        (112.0 - lon) / 0.8
    )  # Qinling
    z += 450.0 * _sigmoid((lat - 21.5) / 0.5) * _sigmoid((30.0 - lat) / 0.8) * _sigmoid(
        (lon - 108.5) / 0.8
    ) * (1.0 + 0.6 * _smooth_noise(rng, lat, lon, 8, (2.0, 5.0)))  # south-eastern hills
    for basin in (_SICHUAN, _TARIM):
        r = _ellipse_radius(lat, lon, basin)
        inside = _sigmoid((1.0 - r) / 0.08)
        rim = _gauss((r - 1.18) / 0.16)
        z = z * (1.0 - inside) + basin[4] * inside + 2300.0 * rim * (1.0 - plateau)
    relief = _smooth_noise(rng, lat, lon, 24, (1.5, 8.0))
    z += (60.0 + 0.08 * z) * relief
    return np.maximum(z, 5.0)


def _population_density(
    lat: np.ndarray, lon: np.ndarray, region_fine: np.ndarray, rng: np.random.Generator
) -> np.ndarray:
    density = np.zeros_like(lat)
    for code, name in REGIONS.items():
        density[region_fine == code] = _REGION_DENSITY[name]
    density *= np.exp(0.45 * _smooth_noise(rng, lat, lon, 16, (2.0, 10.0)))
    for city_lat, city_lon, extra in _CITIES:
        density += extra * _gauss(np.hypot(lat - city_lat, lon - city_lon) / 0.35)
    return density


def _regions(
    lat: np.ndarray, lon: np.ndarray, elevation: np.ndarray, land: np.ndarray
) -> np.ndarray:
    """Region code of every cell, decided in priority order (first matching rule wins)."""
    region = np.full(elevation.shape, _CODE["highland"], dtype=np.int32)
    region[elevation < 500.0] = _CODE["other_lowland"]
    region[elevation >= 2000.0] = _CODE["mountains"]
    hills = (lat >= 21.0) & (lat <= 30.5) & (lon >= 108.5) & (elevation < 1500.0)
    region[hills] = _CODE["southeast_hills"]
    plain = (lat >= 33.0) & (lat <= 41.0) & (lon >= 113.5) & (elevation < 300.0)
    region[plain] = _CODE["northern_plain"]
    for basin, name in ((_SICHUAN, "sichuan_basin"), (_TARIM, "tarim_basin")):
        inside = _ellipse_radius(lat, lon, basin) < 1.0
        region[inside & (elevation < basin[4] + 600.0)] = _CODE[name]
    region[(elevation >= 3500.0) & (lon < 103.0) & (lat < 38.0)] = _CODE["plateau"]
    sea = land < 0.5
    near_sea = np.zeros_like(sea)
    padded = np.pad(sea, 1, mode="edge")
    for di in (0, 1, 2):
        for dj in (0, 1, 2):
            near_sea |= padded[di : di + sea.shape[0], dj : dj + sea.shape[1]]
    region[near_sea & ~sea] = _CODE["coast"]
    region[sea] = _CODE["sea"]
    return region


def _block_mean(fine: np.ndarray, factor: int) -> np.ndarray:
    h, w = fine.shape[0] // factor, fine.shape[1] // factor
    return fine.reshape(h, factor, w, factor).mean(axis=(1, 3))


def make_terrain(params: GridSpec) -> Terrain:
    """Static fields on a ``params.height`` x ``params.width`` grid, seeded by ``params.seed``."""
    if params.height < 8 or params.width < 8:
        raise ValueError(
            f"make_terrain: grid must be at least 8 x 8, got height={params.height}, "
            f"width={params.width}"
        )
    res_lat = (LAT_MAX - LAT_MIN) / params.height
    res_lon = (LON_MAX - LON_MIN) / params.width
    if not np.isclose(res_lat, res_lon):
        raise ValueError(
            f"make_terrain: height x width = {params.height} x {params.width} gives unequal "
            f"spacing ({res_lat} deg lat, {res_lon} deg lon); use width = 2 * height"
        )
    rng = np.random.default_rng([params.seed, 0])
    n = _SUPERSAMPLE
    lat_f = LAT_MIN + (np.arange(params.height * n) + 0.5) * res_lat / n
    lon_f = LON_MIN + (np.arange(params.width * n) + 0.5) * res_lon / n
    lat_fine, lon_fine = np.meshgrid(lat_f, lon_f, indexing="ij")
    land_fine = _land_mask(lat_fine, lon_fine)
    z_fine = _elevation(lat_fine, lon_fine, rng) * land_fine
    region_fine = _regions(lat_fine, lon_fine, z_fine, land_fine)
    pop_fine = _population_density(lat_fine, lon_fine, region_fine, rng) * land_fine

    lat_c = LAT_MIN + (np.arange(params.height) + 0.5) * res_lat
    lon_c = LON_MIN + (np.arange(params.width) + 0.5) * res_lon
    lat2d, lon2d = np.meshgrid(lat_c, lon_c, indexing="ij")
    land = _block_mean(land_fine, n)
    elevation = _block_mean(z_fine, n)
    return Terrain(
        elevation=elevation.astype(np.float32),
        population=_block_mean(pop_fine, n).astype(np.float32),
        lat2d=lat2d.astype(np.float32),
        lon2d=lon2d.astype(np.float32),
        land_fraction=land.astype(np.float32),
        region_id=_regions(lat2d, lon2d, elevation, land),
    )
