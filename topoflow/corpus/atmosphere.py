"""A deterministic, physically motivated atmosphere on the synthetic terrain (default corpus).

A two-dimensional boundary-layer model, pure numpy, float64 inside and float32 out:

- Winds: a non-divergent synoptic flow (seasonal westerly jet, monsoon, eastward-travelling waves,
  random eddies) given by a streamfunction on cell corners, so the discrete flow conserves a
  uniform tracer exactly; plus a diurnal land-sea breeze. Scaled by ``terrain_blocking``, the
  terrain adds a seasonal circulation along the height contours (the plateau's winter cold high
  and summer thermal low), written as a streamfunction proportional to the smoothed elevation,
  so it steers air around mountains without creating convergence. (A divergent deflection of
  upslope wind was tried and dropped: it piled air, and with it ozone and dust, into basins.)
- Temperature (seasonal, diurnal, lapse rate, warm advection), humidity from a moisture field and
  the saturation pressure, surface pressure from the hypsometric equation.
- Six tracers held as surface concentration times a fixed reference depth ``H_REF`` (so the
  state is a conserved mass per area): flux-form upwind advection plus diffusion with
  CFL-limited sub-steps, emissions proportional to population with diurnal and seasonal cycles,
  dry and wet deposition, SO2 and NO2 oxidation into PM2.5, an ozone photochemical cycle
  (daylight production with NO2, titration at night), and exchange with a clean free troposphere.
  The diurnal/seasonal mixing height enters where it matters for the surface: emissions are
  diluted into it, deposition acts across it, and its daytime growth entrains free-tropospheric
  air. (Compressing the column into a collapsing night layer instead would put the afternoon's
  ozone into the surface at dusk, the wrong way round.)
- Terrain blocking: the pollution carried (by advection or diffusion) from a cell into a higher
  neighbour, in excess of the free-tropospheric background, is multiplied by
  ``exp(-terrain_blocking * dz / blocking_height_m)``: a stable layer keeps the polluted air
  below the ridge, and what crosses it is background air (see ``advect_diffuse``; blocking the
  whole flux would also pile clean background air into every basin). A parcel climbing a total
  height Z over several cells is attenuated by ``exp(-terrain_blocking * Z / H0)`` whatever the
  grid spacing, so the effect does not change with resolution. With ``terrain_blocking = 0`` the
  elevation influences no tracer anywhere: not transport, not deposition, not chemistry (these use
  sea-level-reduced humidity and the sun, never the local elevation).

Grid convention (see terrain.py): row index increases northward, column index eastward; ``v > 0``
is a wind towards larger row index.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from .schema import UNITS
from .terrain import Terrain, make_terrain

__all__ = [
    "GENERATOR_VERSION",
    "TRACERS",
    "UNITS",
    "VARIABLES",
    "Atmosphere",
    "AtmosphereParams",
    "TransportCoefficients",
    "advect_diffuse",
    "cfl_substeps",
    "make_terrain",
    "simulate",
    "transport_coefficients",
]

# Bump whenever the generated numbers change: build.py keys its corpus cache on it.
GENERATOR_VERSION = "3"

# Dynamic output variables in corpus order; the generator writes the corpus's canonical units
# (schema.UNITS, as in CAQRA: CO in mg/m^3).
VARIABLES = ("u", "v", "temp", "rh", "psfc", "pm25", "pm10", "so2", "no2", "co", "o3")

# Advected tracers. PM10 is not advected itself: it is PM2.5 plus the coarse fraction, which keeps
# PM10 >= PM2.5 by construction. State = concentration (output unit, CO in mg/m^3) x H_REF.
H_REF = 1000.0  # m
TRACERS = ("pm25", "pm_coarse", "so2", "no2", "co", "o3")
_PM25, _COARSE, _SO2, _NO2, _CO, _O3 = range(len(TRACERS))

R_EARTH = 6.371e6  # m
G = 9.80665  # m/s^2
R_DRY = 287.05  # J/(kg K)
OMEGA = 7.292e-5  # 1/s
LAPSE_RATE = 6.5e-3  # K/m
HOURS_PER_YEAR = 365.2425 * 24.0

# Per-capita emissions in ug/s per person (CO: mg/s per person): China's mid-2010s national totals
# (PM2.5 ~9 Mt/yr, SO2 ~18 Mt, NOx ~20 Mt, CO ~150 Mt) divided by its population.
_EMISSION_PER_CAPITA = np.array([200.0, 250.0, 400.0, 450.0, 3.4, 0.0])
# Dry deposition velocities (m/s); ozone's is the daytime value (stomata close at night).
_DEPOSITION_VELOCITY = np.array([1.0e-3, 1.0e-2, 6.0e-3, 3.0e-3, 0.0, 4.0e-3])
# Wet scavenging rates (1/s) at full "rain" (wet = 1).
_WET_SCAVENGING = np.array([3.0e-5, 5.0e-5, 4.0e-5, 1.0e-5, 0.0, 0.0])
# Free-troposphere background concentrations the boundary layer exchanges with (ozone: seasonal).
_BACKGROUND = np.array([4.0, 6.0, 1.0, 1.0, 0.12, 60.0])
# Exchange with the free troposphere (1/s): slow through the night inversion, fast when the
# growing daytime mixed layer entrains air from above.
_VENTILATION_NIGHT, _VENTILATION_DAY = 1.0 / (5.0 * 86400.0), 1.0 / 86400.0
# Mass of sulfate per mass of SO2 oxidized (96/64) and of particulate nitrate per NO2 oxidized,
# of which about 40 % stays in the particle phase (62/46 * 0.4).
_SULFATE_YIELD = 1.5
_NITRATE_YIELD = 0.54


@dataclass(frozen=True)
class AtmosphereParams:
    """Parameters of the generator. Grid box: 15-47 N, 70-134 E (the CAQRA China box).

    height, width: grid cells; the spacing is (47 - 15) / height degrees and must equal
        (134 - 70) / width (so width = 2 * height).
    start, end: output period [start, end), ISO dates or date-times in UTC.
    output_step_hours: spacing of the yielded time stamps (h); a multiple of physics_step_hours.
    seed: seeds the terrain details and the weather.
    terrain_blocking: dimensionless knob; 0 means the elevation has no effect on the tracers and
        winds, 1 the default strength.
    blocking_height_m: H0 (m) in the uphill flux factor exp(-terrain_blocking * dz / H0).
    terrain_circulation: m^2/s of streamfunction per metre of smoothed elevation at
        terrain_blocking = 1 (times the knob; positive = anticyclonic in winter, cyclonic in
        summer). 150 gives ~3 m/s along the plateau's flanks.
    physics_step_hours: meteorology and chemistry step (h); transport sub-steps inside it.
    spinup_days: days simulated before ``start`` (not output) so tracers start in equilibrium.
    diffusivity_m2_s: horizontal eddy diffusivity (m^2/s).
    cfl: largest fraction of a cell's mass that transport may move out in one sub-step (< 1).
    emission_scale: multiplies every anthropogenic emission. 1 is the national per-capita
        inventory; the default 1.5 compensates the 2-D model's strong ventilation so that winter
        concentrations over the northern plain reach the mid-2010s observed magnitude.
    """

    height: int = 32
    width: int = 64
    start: str = "2015-01-01"
    end: str = "2019-01-01"
    output_step_hours: int = 6
    seed: int = 0
    terrain_blocking: float = 1.0
    blocking_height_m: float = 1000.0
    terrain_circulation: float = 150.0
    physics_step_hours: int = 3
    spinup_days: int = 14
    diffusivity_m2_s: float = 2.0e4
    cfl: float = 0.9
    emission_scale: float = 1.5

    def __post_init__(self) -> None:
        if self.output_step_hours < 1 or self.output_step_hours % self.physics_step_hours:
            raise ValueError(
                f"AtmosphereParams: output_step_hours={self.output_step_hours} must be a positive "
                f"multiple of physics_step_hours={self.physics_step_hours}"
            )
        if self.end_hour <= self.start_hour:
            raise ValueError(
                f"AtmosphereParams: end={self.end!r} is not after start={self.start!r}"
            )
        if self.terrain_blocking < 0 or self.terrain_circulation < 0:
            raise ValueError(
                f"AtmosphereParams: terrain_blocking={self.terrain_blocking} and "
                f"terrain_circulation={self.terrain_circulation} must be >= 0"
            )
        if not 0 < self.cfl < 1:
            raise ValueError(f"AtmosphereParams: cfl={self.cfl} must be in (0, 1)")

    @property
    def start_hour(self) -> int:
        """``start`` in hours since 1970-01-01T00 UTC."""
        return int(np.datetime64(self.start, "h").astype(np.int64))

    @property
    def end_hour(self) -> int:
        """``end`` in hours since 1970-01-01T00 UTC."""
        return int(np.datetime64(self.end, "h").astype(np.int64))


@dataclass(frozen=True)
class _Geometry:
    """Spherical finite-volume geometry: lengths in m, areas in m^2."""

    dy: float  # north-south cell size and east-face length
    dx_centre: np.ndarray  # (H,) east-west cell size at the cell centres
    dx_face: np.ndarray  # (H+1,) length of the north/south faces
    area: np.ndarray  # (H,) cell area

    @classmethod
    def from_terrain(cls, terrain: Terrain) -> _Geometry:
        step = np.deg2rad(terrain.resolution_deg)
        height = terrain.elevation.shape[0]
        lat_edges = np.deg2rad(terrain.lat_min + np.arange(height + 1) * terrain.resolution_deg)
        lat_centres = 0.5 * (lat_edges[1:] + lat_edges[:-1])
        return cls(
            dy=R_EARTH * step,
            dx_centre=R_EARTH * np.cos(lat_centres) * step,
            dx_face=R_EARTH * np.cos(lat_edges) * step,
            area=R_EARTH**2 * step * (np.sin(lat_edges[1:]) - np.sin(lat_edges[:-1])),
        )


# ----------------------------------------------------------------------------- transport


@dataclass(frozen=True)
class TransportCoefficients:
    """One-way exchange coefficients (m^2/s: volume flux per metre of column) for one wind state.

    ``east_fwd[i, j]`` moves mass from cell (i, j) to (i, j+1), ``east_bwd[i, j]`` back;
    ``north_fwd[i, j]`` from (i, j) to (i+1, j). Each is upwind advection + diffusion; the
    ``*_blocked`` twin is the same times the terrain factor of that direction (1 downhill) and
    applies to the tracer in excess of the background. Boundary faces: ``out_*`` carry mass out
    of the edge cell, ``in_*`` bring background air in (all zero for a closed domain).
    """

    east_flux: np.ndarray  # (H, W+1) signed advective flux through east faces
    north_flux: np.ndarray  # (H+1, W) signed advective flux through north faces
    east_fwd: np.ndarray
    east_bwd: np.ndarray
    north_fwd: np.ndarray
    north_bwd: np.ndarray
    east_fwd_blocked: np.ndarray
    east_bwd_blocked: np.ndarray
    north_fwd_blocked: np.ndarray
    north_bwd_blocked: np.ndarray
    out_west: np.ndarray
    in_west: np.ndarray
    out_east: np.ndarray
    in_east: np.ndarray
    out_south: np.ndarray
    in_south: np.ndarray
    out_north: np.ndarray
    in_north: np.ndarray
    inv_area: np.ndarray  # (H, 1)
    max_out_rate: float  # 1/s: the largest fraction of a cell's mass leaving per second


def _uphill_factors(
    elevation: np.ndarray, terrain_blocking: float, blocking_height_m: float
) -> tuple[np.ndarray, ...]:
    """Terrain factors for the four flux directions: 1 downhill, exp(-b dz / H0) uphill."""
    z = elevation.astype(np.float64)
    dz_east = z[:, 1:] - z[:, :-1]
    dz_north = z[1:] - z[:-1]
    scale = terrain_blocking / blocking_height_m
    return (
        np.exp(-scale * np.maximum(dz_east, 0.0)),
        np.exp(-scale * np.maximum(-dz_east, 0.0)),
        np.exp(-scale * np.maximum(dz_north, 0.0)),
        np.exp(-scale * np.maximum(-dz_north, 0.0)),
    )


def transport_coefficients(
    geometry: _Geometry,
    east_flux: np.ndarray,
    north_flux: np.ndarray,
    uphill: tuple[np.ndarray, ...],
    diffusivity_m2_s: float,
    closed: bool = False,
) -> TransportCoefficients:
    """Exchange coefficients from face volume fluxes ``east_flux`` (H, W+1) = u * dy and
    ``north_flux`` (H+1, W) = v * dx (m^2/s) and the terrain factors of ``_uphill_factors``."""
    east_f, east_b, north_f, north_b = uphill
    diff_east = diffusivity_m2_s * geometry.dy / geometry.dx_centre[:, None]  # (H, 1)
    diff_north = diffusivity_m2_s * geometry.dx_face[1:-1, None] / geometry.dy  # (H-1, 1)
    interior_e = east_flux[:, 1:-1]
    interior_n = north_flux[1:-1]
    coeffs = {
        "east_fwd": np.maximum(interior_e, 0.0) + diff_east,
        "east_bwd": np.maximum(-interior_e, 0.0) + diff_east,
        "north_fwd": np.maximum(interior_n, 0.0) + diff_north,
        "north_bwd": np.maximum(-interior_n, 0.0) + diff_north,
    }
    directions = ("east_fwd", "east_bwd", "north_fwd", "north_bwd")
    for name, factor in zip(directions, uphill, strict=True):
        coeffs[name + "_blocked"] = coeffs[name] * factor
    gate = 0.0 if closed else 1.0
    edges = {
        "out_west": np.maximum(-east_flux[:, 0], 0.0) * gate,
        "in_west": np.maximum(east_flux[:, 0], 0.0) * gate,
        "out_east": np.maximum(east_flux[:, -1], 0.0) * gate,
        "in_east": np.maximum(-east_flux[:, -1], 0.0) * gate,
        "out_south": np.maximum(-north_flux[0], 0.0) * gate,
        "in_south": np.maximum(north_flux[0], 0.0) * gate,
        "out_north": np.maximum(north_flux[-1], 0.0) * gate,
        "in_north": np.maximum(-north_flux[-1], 0.0) * gate,
    }
    out = np.zeros(east_flux[:, 1:].shape)
    # Unblocked coefficients bound the blocked ones, so this rate is an upper bound.
    out[:, :-1] += coeffs["east_fwd"]
    out[:, 1:] += coeffs["east_bwd"]
    out[:-1] += coeffs["north_fwd"]
    out[1:] += coeffs["north_bwd"]
    out[:, 0] += edges["out_west"]
    out[:, -1] += edges["out_east"]
    out[0] += edges["out_south"]
    out[-1] += edges["out_north"]
    inv_area = 1.0 / geometry.area[:, None]
    return TransportCoefficients(
        east_flux=east_flux,
        north_flux=north_flux,
        inv_area=inv_area,
        max_out_rate=float((out * inv_area).max()),
        **coeffs,
        **edges,
    )


def cfl_substeps(coeffs: TransportCoefficients, dt_s: float, cfl: float) -> int:
    """Number of equal sub-steps of ``dt_s`` such that no cell loses more than ``cfl`` of its mass
    per sub-step. This bounds the Courant number |u| dt / dx of every face by ``cfl`` too, and it
    is what keeps the explicit upwind scheme positive: new mass is a non-negative combination."""
    return max(1, int(np.ceil(dt_s * coeffs.max_out_rate / cfl)))


def advect_diffuse(
    mass: np.ndarray,
    coeffs: TransportCoefficients,
    dt_s: float,
    n_substeps: int,
    background: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Advance column masses ``mass`` (n, H, W) by ``dt_s`` seconds in ``n_substeps`` steps.

    Flux form: every exchange removes from one cell exactly what it adds to its neighbour, so the
    total sum(mass * area) changes only through the boundary. ``background`` (n,) is the column
    mass of free-tropospheric air (default 0): air entering across the boundary carries it, and
    terrain blocking acts on the excess over it only. Air leaving a cell uphill carries
    ``min(m, b) + factor * max(m - b, 0)``: the pollution excess stays behind the stable layer
    while the air that crosses keeps background concentrations. That carried amount never
    exceeds ``m`` (positivity under the same CFL limit), and a uniform background field stays
    uniform under any non-divergent wind: blocking never piles clean air into basins.
    Returns the new masses and the mass (n,) that left and entered across the boundary, in
    concentration unit x m^3 (ug for ug/m^3; mg for CO).
    """
    m = mass.astype(np.float64, copy=True)
    n = m.shape[0]
    floor = np.zeros((n, 1, 1)) if background is None else np.asarray(background).reshape(n, 1, 1)
    dt = dt_s / n_substeps
    c = coeffs
    outflow = np.zeros(m.shape[0])
    inflow = np.zeros(m.shape[0])
    tend = np.empty_like(m)
    for _ in range(n_substeps):
        base = np.minimum(m, floor)
        excess = m - base
        east = (c.east_fwd * base[..., :-1] + c.east_fwd_blocked * excess[..., :-1]
                - c.east_bwd * base[..., 1:] - c.east_bwd_blocked * excess[..., 1:])  # (n, H, W-1)
        north = (c.north_fwd * base[..., :-1, :] + c.north_fwd_blocked * excess[..., :-1, :]
                 - c.north_bwd * base[..., 1:, :] - c.north_bwd_blocked * excess[..., 1:, :])
        tend.fill(0.0)
        tend[..., :-1] -= east
        tend[..., 1:] += east
        tend[..., :-1, :] -= north
        tend[..., 1:, :] += north
        out_w, out_e = c.out_west * m[..., :, 0], c.out_east * m[..., :, -1]
        out_s, out_n = c.out_south * m[..., 0, :], c.out_north * m[..., -1, :]
        tend[..., :, 0] -= out_w
        tend[..., :, -1] -= out_e
        tend[..., 0, :] -= out_s
        tend[..., -1, :] -= out_n
        outflow += dt * (out_w.sum(-1) + out_e.sum(-1) + out_s.sum(-1) + out_n.sum(-1))
        if background is not None:
            in_w, in_e = c.in_west * floor[:, :, 0], c.in_east * floor[:, :, 0]  # (n, H)
            in_s, in_n = c.in_south * floor[:, 0], c.in_north * floor[:, 0]  # (n, W)
            tend[..., :, 0] += in_w
            tend[..., :, -1] += in_e
            tend[..., 0, :] += in_s
            tend[..., -1, :] += in_n
            inflow += dt * (in_w.sum(-1) + in_e.sum(-1) + in_s.sum(-1) + in_n.sum(-1))
        m += (dt * c.inv_area) * tend
    return m, outflow, inflow


# ----------------------------------------------------------------------------- meteorology


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))


def _saturation_specific_humidity(temp_k: np.ndarray, pressure_hpa: np.ndarray) -> np.ndarray:
    """Bolton (1980) saturation vapour pressure over water, converted to specific humidity."""
    e_s = 6.112 * np.exp(17.67 * (temp_k - 273.15) / (temp_k - 29.65))
    return 0.622 * e_s / (pressure_hpa - 0.378 * e_s)


def _box_blur(field: np.ndarray, passes: int) -> np.ndarray:
    out = field
    for _ in range(passes):
        padded = np.pad(out, 1, mode="edge")
        out = sum(
            padded[di : di + field.shape[0], dj : dj + field.shape[1]]
            for di in range(3)
            for dj in range(3)
        ) / 9.0
    return out


class _Weather:
    """Meteorology at any hour: winds every physics step, temperature/humidity/pressure on output.

    The random part (eddy and wave amplitudes) is a set of AR(1) processes advanced once per
    physics step, so the weather is a deterministic function of the seed and the step sequence.
    """

    n_eddies = 6
    n_waves = 4

    def __init__(self, params: AtmosphereParams, terrain: Terrain, geometry: _Geometry) -> None:
        self.params, self.geometry = params, geometry
        rng = np.random.default_rng([params.seed, 1])
        self.rng = rng
        res = terrain.resolution_deg
        h, w = terrain.elevation.shape
        lat_e = terrain.lat_min + np.arange(h + 1) * res
        lon_e = terrain.lon_min + np.arange(w + 1) * res
        self.lat_corner, self.lon_corner = np.meshgrid(lat_e, lon_e, indexing="ij")
        self.lat = terrain.lat2d.astype(np.float64)
        self.lon = terrain.lon2d.astype(np.float64)
        self.elevation = terrain.elevation.astype(np.float64)
        self.land = terrain.land_fraction.astype(np.float64)
        self._init_synoptic_basis(rng)
        self._init_surface_effects(terrain, res)
        self.eddy_state = rng.standard_normal(2 * self.n_eddies)
        self.wave_state = rng.standard_normal(self.n_waves)

    def _init_synoptic_basis(self, rng: np.random.Generator) -> None:
        """Streamfunction patterns (m^2/s) on corners: eddies and travelling waves (cos, sin)."""
        lat, lon = self.lat_corner, self.lon_corner
        storm_track = 0.6 + 0.8 * np.exp(-(((lat - 40.0) / 10.0) ** 2))
        metres_per_deg = R_EARTH * np.pi / 180.0
        basis, amplitudes = [], []
        for count, speed, wavelength_km in ((self.n_eddies, 1.0, (1500, 4000)),
                                            (self.n_waves, 2.0, (3000, 6000))):
            for _ in range(count):
                wavelength = rng.uniform(*wavelength_km) * 1e3
                angle = rng.uniform(-0.35 * np.pi, 0.35 * np.pi)  # mostly zonal propagation
                k = 2.0 * np.pi / wavelength * metres_per_deg
                phase = k * (np.cos(angle) * lon * np.cos(np.deg2rad(32.0)) + np.sin(angle) * lat)
                amplitude = speed * wavelength / (2.0 * np.pi)  # wind speed U = A * 2 pi / L
                basis += [amplitude * storm_track * np.cos(phase),
                          amplitude * storm_track * np.sin(phase)]
                amplitudes.append(wavelength)
        self.psi_basis = np.stack(basis)  # (2 * (eddies + waves), H+1, W+1)
        wavelengths = np.array(amplitudes[self.n_eddies:])
        speed = rng.uniform(6.0, 12.0, size=self.n_waves)  # eastward phase speed, m/s
        self.wave_omega = 2.0 * np.pi * speed / wavelengths * 3600.0  # rad/h
        self.wave_phase = rng.uniform(0.0, 2.0 * np.pi, size=self.n_waves)

    def _init_surface_effects(self, terrain: Terrain, res: float) -> None:
        # Land-sea breeze direction: up the gradient of a smoothed land fraction (towards land).
        smooth_land = _box_blur(self.land, 2)
        gy, gx = np.gradient(smooth_land)
        norm = max(float(np.hypot(gx, gy).max()), 1e-12)
        self.breeze_x, self.breeze_y = gx / norm, gy / norm
        # Terrain circulation streamfunction on corners: elevation smoothed over ~2 degrees so
        # the flow follows the large-scale contours rather than single-cell bumps.
        smooth_z = np.pad(_box_blur(self.elevation, max(1, int(round(1.0 / res)))), 1, mode="edge")
        z_corner = 0.25 * (smooth_z[:-1, :-1] + smooth_z[1:, :-1] + smooth_z[:-1, 1:]
                           + smooth_z[1:, 1:])
        p = self.params
        self.topo_psi = p.terrain_blocking * p.terrain_circulation * z_corner  # (H+1, W+1)
        # Moisture supply: high near the sea and in the south, low deep inland.
        maritime = 1.0 - _box_blur(self.land, max(1, int(round(6.0 / res))))
        self.q_base = 0.05 * (0.35 + 0.65 * np.sqrt(maritime)) * np.exp(-(self.lat - 15.0) / 40.0)
        self.coriolis = 2.0 * OMEGA * np.sin(np.deg2rad(self.lat))

    # -- time helpers

    @staticmethod
    def winter_index(hour: float) -> float:
        """+1 in mid-January, -1 in mid-July (annual cycle, 20-day lag of the solstice)."""
        return float(np.cos(2.0 * np.pi * (hour / 24.0 - 20.0) / 365.2425))

    def sun(self, hour: float) -> tuple[np.ndarray, np.ndarray]:
        """Cosine of the solar zenith angle clipped at 0, and the local solar hour (H, W)."""
        day = hour / 24.0
        declination = np.deg2rad(-23.44) * np.cos(2.0 * np.pi * (day + 10.0) / 365.2425)
        local_hour = np.mod(hour + self.lon / 15.0, 24.0)
        hour_angle = 2.0 * np.pi * (local_hour - 12.0) / 24.0
        lat = np.deg2rad(self.lat)
        cos_zenith = np.sin(lat) * np.sin(declination) + np.cos(lat) * np.cos(declination) * np.cos(
            hour_angle
        )
        return np.maximum(cos_zenith, 0.0), local_hour

    def advance_random(self) -> None:
        """One physics step of the AR(1) amplitudes (memory 2.5 days for eddies, 5 for waves)."""
        dt = float(self.params.physics_step_hours)
        for state, memory_h in ((self.eddy_state, 60.0), (self.wave_state, 120.0)):
            rho = np.exp(-dt / memory_h)
            state *= rho
            state += np.sqrt(1.0 - rho * rho) * self.rng.standard_normal(state.shape)

    # -- winds

    def perturbation_psi(self, hour: float) -> np.ndarray:
        """Streamfunction (m^2/s) on corners of the random eddies and travelling waves."""
        wave_amp = 1.0 + 0.5 * self.wave_state
        angle = self.wave_omega * hour + self.wave_phase
        wave_coef = np.stack([wave_amp * np.cos(angle), wave_amp * np.sin(angle)], axis=1)
        coef = np.concatenate([self.eddy_state, wave_coef.ravel()])
        return np.tensordot(coef, self.psi_basis, axes=1)

    def synoptic_psi(self, hour: float) -> tuple[np.ndarray, np.ndarray]:
        """Total and perturbation (eddies + waves) streamfunction on corners, m^2/s."""
        perturbation = self.perturbation_psi(hour)
        winter = self.winter_index(hour)
        # Westerly jet u = U sech^2((lat - lat_jet) / width): further south and stronger in winter.
        jet_lat, jet_speed, width = 37.0 - 5.0 * winter, 4.0 + 2.0 * winter, 7.0
        psi = perturbation - jet_speed * R_EARTH * np.deg2rad(width) * np.tanh(
            (self.lat_corner - jet_lat) / width
        )
        # Plateau circulation: anticyclonic (cold high) in winter, cyclonic (thermal low) in summer.
        psi = psi + winter * self.topo_psi
        # Monsoon: northerly over eastern China in winter, southerly in summer.
        monsoon = 0.5 - 2.0 * winter
        scale = 4.0
        psi += monsoon * R_EARTH * np.cos(np.deg2rad(30.0)) * np.deg2rad(scale) * np.logaddexp(
            0.0, (self.lon_corner - 100.0) / scale
        )
        return psi, perturbation

    def winds(
        self, hour: float, sun: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Face fluxes (H, W+1), (H+1, W) in m^2/s, centre winds u, v (m/s), synoptic v (m/s)
        and the perturbation streamfunction at centres (m^2/s)."""
        g = self.geometry
        psi, perturbation = self.synoptic_psi(hour)
        east = -(psi[1:] - psi[:-1])  # u * dy: the discrete flow is exactly non-divergent
        north = psi[:, 1:] - psi[:, :-1]  # v * dx
        u_syn = 0.5 * (east[:, :-1] + east[:, 1:]) / g.dy
        v_syn = 0.5 * (north[:-1] / g.dx_face[:-1, None] + north[1:] / g.dx_face[1:, None])
        breeze = 2.5 * (sun - 0.2)
        du, dv = breeze * self.breeze_x, breeze * self.breeze_y
        east = east + g.dy * np.concatenate([du[:, :1], 0.5 * (du[:, 1:] + du[:, :-1]), du[:, -1:]],
                                            axis=1)
        dv_face = np.concatenate([dv[:1], 0.5 * (dv[1:] + dv[:-1]), dv[-1:]], axis=0)
        north = north + g.dx_face[:, None] * dv_face
        pert_centre = 0.25 * (perturbation[1:, 1:] + perturbation[1:, :-1] + perturbation[:-1, 1:]
                              + perturbation[:-1, :-1])
        return east, north, u_syn + du, v_syn + dv, v_syn, pert_centre

    # -- thermodynamics

    def sea_level_temperature(self, hour: float, v_syn: np.ndarray) -> np.ndarray:
        """Daily-mean temperature reduced to sea level (K): latitude, continental seasonality and
        warm advection by southerly synoptic wind."""
        amplitude = (1.5 + 0.5 * (self.lat - 15.0)) * (0.45 + 0.55 * self.land)
        return 299.5 - 0.42 * (self.lat - 15.0) - amplitude * self.winter_index(hour) + 0.4 * v_syn

    def sea_level_humidity(self, hour: float, v_syn: np.ndarray) -> np.ndarray:
        """Specific humidity (kg/kg) at sea level: moist summers, southerly flow brings moisture."""
        season = 0.6 - 0.4 * self.winter_index(hour)
        return self.q_base * season * np.exp(np.clip(0.05 * v_syn, -1.0, 1.0))

    def wetness(self, hour: float, v_syn: np.ndarray) -> np.ndarray:
        """Rain proxy 0..1 from sea-level relative humidity (no elevation: see module docstring)."""
        q_sat = _saturation_specific_humidity(self.sea_level_temperature(hour, v_syn), 1013.25)
        rh = self.sea_level_humidity(hour, v_syn) / q_sat
        return np.clip((rh - 0.8) / 0.2, 0.0, 1.0)

    def thermodynamics(
        self, hour: float, local_hour: np.ndarray, v_syn: np.ndarray, pert_centre: np.ndarray
    ) -> dict[str, np.ndarray]:
        """temp (K), rh (%), psfc (hPa) at the surface."""
        z = self.elevation
        diurnal = 4.5 * (0.3 + 0.7 * self.land) * np.cos(2.0 * np.pi * (local_hour - 14.5) / 24.0)
        temp = self.sea_level_temperature(hour, v_syn) + diurnal - LAPSE_RATE * z
        # Siberian high in winter over land; geostrophic pressure of the synoptic perturbation.
        p_sea = 1013.25 + 9.0 * self.winter_index(hour) * self.land * _sigmoid(
            (self.lat - 33.0) / 4.0
        )
        p_sea = p_sea + 1.2 * self.coriolis * pert_centre / 100.0
        mean_layer_temp = temp + 0.5 * LAPSE_RATE * z
        psfc = p_sea * np.exp(-G * z / (R_DRY * mean_layer_temp))
        q = self.sea_level_humidity(hour, v_syn) * np.exp(-z / 2500.0)  # moisture scale height
        rh = np.clip(100.0 * q / _saturation_specific_humidity(temp, psfc), 2.0, 100.0)
        return {"temp": temp, "rh": rh, "psfc": psfc}


# ----------------------------------------------------------------------------- the model


class Atmosphere:
    """The whole model state and its time step. ``step()`` advances ``physics_step_hours``."""

    def __init__(
        self,
        params: AtmosphereParams,
        start_hour: int | None = None,
        terrain: Terrain | None = None,
        weather_type: type[_Weather] | None = None,
    ) -> None:
        """``start_hour`` defaults to ``spinup_days`` before ``params.start``; ``terrain`` to
        ``make_terrain(params)`` (tests pass a modified one to isolate terrain effects);
        ``weather_type`` to the China-like meteorology (the terrain worlds, worlds.py, swap in
        their own large-scale flow and keep every other process of this model)."""
        self.params = params
        self.terrain = make_terrain(params) if terrain is None else terrain
        self.geometry = _Geometry.from_terrain(self.terrain)
        self.weather = (weather_type or _Weather)(params, self.terrain, self.geometry)
        self.uphill = _uphill_factors(
            self.terrain.elevation, params.terrain_blocking, params.blocking_height_m
        )
        if start_hour is None:
            start_hour = params.start_hour - 24 * params.spinup_days
        self.hour = start_hour
        self.population = self.terrain.population.astype(np.float64) * 1e-6  # people per m^2
        self.land = self.terrain.land_fraction.astype(np.float64)
        self._init_dust_source()
        sun, _ = self.weather.sun(self.hour)
        self.mass = np.broadcast_to(self.background(self.hour) * H_REF,
                                    (len(TRACERS), *self.land.shape)).copy()
        self.last_coefficients: TransportCoefficients | None = None
        self.last_substeps = 0

    def _init_dust_source(self) -> None:
        """Deserts: the Tarim basin and the dry, empty highlands north of 38 N and west of 112 E."""
        t = self.terrain
        tarim = [code for code, name in t.regions.items() if name == "tarim_basin"]
        desert = np.isin(t.region_id, tarim) | (
            (t.lat2d > 38.0) & (t.lon2d < 112.0) & (t.population < 30.0) & (t.land_fraction > 0.5)
        )
        self.dust_source = desert.astype(np.float64)

    def background(self, hour: float) -> np.ndarray:
        """Free-troposphere concentrations (n, 1, 1); ozone peaks in spring-summer."""
        bg = _BACKGROUND.copy()
        bg[_O3] = 65.0 - 15.0 * self.weather.winter_index(hour)
        return bg[:, None, None]

    def mixing_height(self, sun: np.ndarray, hour: float) -> np.ndarray:
        """Boundary-layer depth (m): deep convective days over land (deeper in summer), shallow
        night-time inversions, a steady marine layer over the sea."""
        winter = self.weather.winter_index(hour)
        day_land = 1100.0 - 400.0 * winter
        land = 350.0 + (day_land - 350.0) * np.minimum(sun / 0.6, 1.0)
        return self.land * land + (1.0 - self.land) * 600.0

    def total_mass(self) -> np.ndarray:
        """Total mass (n,) of each tracer in the domain (column mass x area)."""
        return (self.mass * self.geometry.area[None, :, None]).sum(axis=(1, 2))

    def _emissions(self, hour: float, local_hour: np.ndarray, wind: np.ndarray) -> np.ndarray:
        """Surface emission fluxes (n, H, W) in ug/m^2/s (CO: mg/m^2/s)."""
        winter = self.weather.winter_index(hour)
        traffic = 0.55 + 0.6 * np.exp(-0.5 * ((local_hour - 8.0) / 1.5) ** 2) + 0.7 * np.exp(
            -0.5 * ((local_hour - 18.0) / 2.0) ** 2
        )
        # Coal heating north of the Qinling-Huai line (~33 N) in winter.
        heating = 1.0 + 1.5 * max(winter, 0.0) * _sigmoid((self.weather.lat - 33.0) / 1.0)
        activity = self.population * self.params.emission_scale
        e = _EMISSION_PER_CAPITA[:, None, None] * activity[None]
        e[_PM25] *= 0.5 * heating + 0.5 * traffic
        e[_COARSE] *= 0.7 + 0.3 * traffic
        e[_SO2] *= 0.4 + 0.6 * heating
        e[_NO2] *= 0.5 + 0.5 * traffic
        e[_CO] *= 0.5 * heating + 0.5 * traffic
        # Dust lifted by winds above 5 m/s, mostly in spring (day of year ~100).
        day_of_year = np.mod(hour / 24.0, 365.2425)
        spring = 0.3 + np.exp(-0.5 * ((day_of_year - 100.0) / 25.0) ** 2)
        lifting = spring * self.dust_source * np.clip(wind - 6.0, 0.0, 10.0) ** 3
        e[_COARSE] += 0.02 * lifting
        e[_PM25] += 0.002 * lifting
        return e

    def _chemistry(
        self, dt: float, hour: float, sun: np.ndarray, wet: np.ndarray, h: np.ndarray
    ) -> dict[str, np.ndarray]:
        """Sources and sinks over ``dt`` seconds, applied to ``self.mass``; returns totals (n,)."""
        area = self.geometry.area[None, :, None]
        m = self.mass
        conc = m / H_REF
        night = 1.0 - np.minimum(sun / 0.3, 1.0)
        chem_rate = np.zeros_like(m)
        chem_rate[_SO2] = 2e-6 + 1e-5 * sun + 1.5e-5 * wet  # OH by day, aqueous in cloud/fog
        chem_rate[_NO2] = 5e-6 + 4e-5 * sun
        chem_rate[_CO] = 1.0 / (60.0 * 86400.0)  # OH lifetime of about two months
        # Night-time titration O3 + NO -> NO2, proportional to the fresh NOx (NO2 proxy).
        chem_rate[_O3] = 1.2e-6 * conc[_NO2] * (0.3 + 0.7 * night)
        deposition = _DEPOSITION_VELOCITY[:, None, None] / h[None]
        deposition[_O3] *= 0.25 + 0.75 * (1.0 - night)
        sink_rate = chem_rate + deposition + _WET_SCAVENGING[:, None, None] * wet[None]
        lost = m * (1.0 - np.exp(-sink_rate * dt))
        chem_fraction = np.divide(chem_rate, sink_rate, out=np.zeros_like(m), where=sink_rate > 0)
        produced = np.zeros_like(m)
        produced[_PM25] = (_SULFATE_YIELD * chem_fraction[_SO2] * lost[_SO2]
                           + _NITRATE_YIELD * chem_fraction[_NO2] * lost[_NO2])
        # Daylight ozone production with NO2, saturating at high NOx (VOC-limited regime);
        # about 25 ug/m^3 per hour at noon in a polluted summer boundary layer.
        uv = 0.7 - 0.3 * self.weather.winter_index(hour)
        produced[_O3] = 25.0 / 3600.0 * uv * sun * conc[_NO2] / (conc[_NO2] + 15.0) * H_REF * dt
        m -= lost
        m += produced
        target = self.background(hour) * H_REF
        daytime = np.minimum(sun / 0.6, 1.0)
        ventilation = _VENTILATION_NIGHT + (_VENTILATION_DAY - _VENTILATION_NIGHT) * daytime
        exchange = (target - m) * (1.0 - np.exp(-ventilation * dt))[None]
        m += exchange
        np.maximum(m, 0.0, out=m)  # exact no-op (all updates keep m >= 0); guards rounding only
        return {
            "production": (produced * area).sum(axis=(1, 2)),
            "loss": (lost * area).sum(axis=(1, 2)),
            "exchange": (exchange * area).sum(axis=(1, 2)),
        }

    def step(self) -> dict[str, np.ndarray]:
        """Advance one physics step; return the budget (n,) of each process in ug (CO: mg)
        (emission, production, loss, exchange, inflow, outflow)."""
        p = self.params
        dt = 3600.0 * p.physics_step_hours
        # Forcings at mid-step, so a 3-hour step samples the diurnal cycle without a lag.
        mid = self.hour + 0.5 * p.physics_step_hours
        sun, local_hour = self.weather.sun(mid)
        east, north, u, v, v_syn, _ = self.weather.winds(mid, sun)
        h = self.mixing_height(sun, mid)
        area = self.geometry.area[None, :, None]

        # Surface emissions spread through the mixing layer raise the concentration by E dt / h.
        emission = self._emissions(mid, local_hour, np.hypot(u, v)) * (dt * H_REF / h)[None]
        self.mass += emission
        coeffs = transport_coefficients(self.geometry, east, north, self.uphill, p.diffusivity_m2_s)
        n_sub = cfl_substeps(coeffs, dt, p.cfl)
        background = self.background(mid)[:, 0, 0] * H_REF
        self.mass, outflow, inflow = advect_diffuse(self.mass, coeffs, dt, n_sub, background)
        budget = self._chemistry(dt, mid, sun, self.weather.wetness(mid, v_syn), h)
        budget.update(emission=(emission * area).sum(axis=(1, 2)), inflow=inflow, outflow=outflow)
        self.last_coefficients, self.last_substeps = coeffs, n_sub
        self.weather.advance_random()
        self.hour += p.physics_step_hours
        return budget

    def fields(self) -> dict[str, np.ndarray]:
        """The output variables at the current hour, float32 (H, W) each, in VARIABLES units."""
        sun, local_hour = self.weather.sun(self.hour)
        _, _, u, v, v_syn, pert = self.weather.winds(self.hour, sun)
        out = {"u": u, "v": v}
        out.update(self.weather.thermodynamics(self.hour, local_hour, v_syn, pert))
        conc = self.mass / H_REF
        out.update(
            pm25=conc[_PM25], pm10=conc[_PM25] + conc[_COARSE], so2=conc[_SO2], no2=conc[_NO2],
            co=conc[_CO], o3=conc[_O3],
        )
        return {name: out[name].astype(np.float32) for name in VARIABLES}


def simulate(
    params: AtmosphereParams,
    terrain: Terrain | None = None,
    weather_type: type[_Weather] | None = None,
) -> Iterator[tuple[np.ndarray, dict[str, np.ndarray]]]:
    """Yield (time_hour int64 (t,), {variable: float32 (t, H, W)}) one calendar month at a time,
    in time order, covering [params.start, params.end) every ``output_step_hours``.

    Only one month of output is held at a time; the model state is a few (H, W) arrays.
    ``terrain`` and ``weather_type`` are passed to `Atmosphere` (defaults: the China-like map).
    """
    atmosphere = Atmosphere(params, terrain=terrain, weather_type=weather_type)
    while atmosphere.hour < params.start_hour:
        atmosphere.step()
    steps_per_output = params.output_step_hours // params.physics_step_hours
    hours: list[int] = []
    buffers: dict[str, list[np.ndarray]] = {name: [] for name in VARIABLES}
    month = None
    for out_hour in range(params.start_hour, params.end_hour, params.output_step_hours):
        this_month = np.datetime64(out_hour, "h").astype("datetime64[M]")
        if month is not None and this_month != month and hours:
            yield np.array(hours, dtype=np.int64), {k: np.stack(b) for k, b in buffers.items()}
            hours, buffers = [], {name: [] for name in VARIABLES}
        month = this_month
        hours.append(out_hour)
        for name, value in atmosphere.fields().items():
            buffers[name].append(value)
        for _ in range(steps_per_output):
            atmosphere.step()
    if hours:
        yield np.array(hours, dtype=np.int64), {k: np.stack(b) for k, b in buffers.items()}
