"""The embedded default atmosphere: terrain, determinism, conservation, blocking, numerics."""

import dataclasses

import numpy as np
import pytest

from topoflow.corpus.atmosphere import (
    TRACERS,
    UNITS,
    VARIABLES,
    Atmosphere,
    AtmosphereParams,
    advect_diffuse,
    cfl_substeps,
    simulate,
    transport_coefficients,
)
from topoflow.corpus.terrain import make_terrain

TINY = dict(height=16, width=32, start="2015-01-30", end="2015-02-02", spinup_days=1)


def _region(terrain, name: str) -> np.ndarray:
    (code,) = [c for c, n in terrain.regions.items() if n == name]
    return terrain.region_id == code


def _coefficients(atmosphere: Atmosphere, hour: float, closed: bool = False):
    sun, _ = atmosphere.weather.sun(hour)
    east, north, *_ = atmosphere.weather.winds(hour, sun)
    return transport_coefficients(
        atmosphere.geometry, east, north, atmosphere.uphill,
        atmosphere.params.diffusivity_m2_s, closed=closed,
    )


def test_terrain_is_china_like():
    terrain = make_terrain(AtmosphereParams(height=32, width=64))
    z, pop = terrain.elevation, terrain.population
    assert z.dtype == np.float32 and terrain.region_id.dtype == np.int32
    assert {"sea", "coast", "northern_plain", "sichuan_basin", "plateau", "southeast_hills"} <= set(
        terrain.regions.values()
    )
    plateau, basin = _region(terrain, "plateau"), _region(terrain, "sichuan_basin")
    plain, sea = _region(terrain, "northern_plain"), _region(terrain, "sea")
    assert 4000 < z[plateau].mean() < 5000
    assert z[basin].mean() < 700 and z[plain].max() < 300 and z[sea].mean() < 50
    # The basin is enclosed: every cell ringing it (one cell out) is much higher than its floor.
    ring = np.zeros_like(basin)
    for di, dj in ((-1, 0), (1, 0), (0, -1), (0, 1)):
        ring |= np.roll(basin, (di, dj), axis=(0, 1))
    ring &= ~basin
    assert z[ring].min() > z[basin].mean() + 500
    assert pop[plain].mean() > 20 * pop[plateau].mean()
    assert pop[sea].mean() < 0.05 * pop[plain].mean()
    assert np.all(np.diff(terrain.lat2d[:, 0]) > 0)  # row index increases northward


def test_simulate_is_deterministic_by_seed_and_chunks_by_month():
    chunks = list(simulate(AtmosphereParams(**TINY)))
    again = list(simulate(AtmosphereParams(**TINY)))
    other = list(simulate(AtmosphereParams(**TINY, seed=1)))
    assert [len(t) for t, _ in chunks] == [8, 4]  # Jan 30-31, then Feb 1 (6-hourly)
    hours = np.concatenate([t for t, _ in chunks])
    assert hours.dtype == np.int64 and np.all(np.diff(hours) == 6)
    assert hours[0] == np.datetime64("2015-01-30T00", "h").astype(np.int64)
    for (t1, f1), (t2, f2), (_, f3) in zip(chunks, again, other, strict=True):
        np.testing.assert_array_equal(t1, t2)
        assert set(f1) == set(VARIABLES) <= set(UNITS)
        for name in VARIABLES:
            assert f1[name].dtype == np.float32 and f1[name].shape == (len(t1), 16, 32)
            assert f1[name].tobytes() == f2[name].tobytes(), name
        assert not np.array_equal(f1["pm25"], f3["pm25"])
        assert not np.array_equal(f1["u"], f3["u"])


def test_closed_domain_transport_conserves_mass_and_positivity():
    atmosphere = Atmosphere(AtmosphereParams(**TINY))
    rng = np.random.default_rng(0)
    mass = rng.exponential(size=(len(TRACERS), 16, 32))
    area = atmosphere.geometry.area[None, :, None]
    before = (mass * area).sum(axis=(1, 2))
    for k in range(24):
        coeffs = _coefficients(atmosphere, atmosphere.hour + 3 * k, closed=True)
        n_sub = cfl_substeps(coeffs, 10800.0, 0.9)
        mass, outflow, inflow = advect_diffuse(mass, coeffs, 10800.0, n_sub)
        assert np.all(outflow == 0) and np.all(inflow == 0) and mass.min() >= 0
    after = (mass * area).sum(axis=(1, 2))
    np.testing.assert_allclose(after, before, rtol=1e-10)


def test_full_step_budget_closes():
    atmosphere = Atmosphere(AtmosphereParams(**TINY))
    for _ in range(16):
        before = atmosphere.total_mass()
        budget = atmosphere.step()
        change = atmosphere.total_mass() - before
        expected = (budget["emission"] + budget["production"] - budget["loss"]
                    + budget["exchange"] + budget["inflow"] - budget["outflow"])
        np.testing.assert_allclose(change, expected, rtol=0, atol=1e-9 * before.max())
        assert np.all(budget["outflow"] > 0) and np.all(budget["loss"] >= 0)
    assert budget["production"][TRACERS.index("pm25")] > 0  # secondary aerosol from SO2, NO2


def _basin_retention(terrain_blocking: float, hours: int = 12) -> float:
    """Fraction of a passive tracer filling the Sichuan basin still there after ``hours`` of
    January winds (transport only: no emission, chemistry or deposition)."""
    params = AtmosphereParams(height=32, width=64, start="2015-01-05", end="2015-01-10",
                              terrain_blocking=terrain_blocking, spinup_days=0)
    atmosphere = Atmosphere(params)
    basin = _region(atmosphere.terrain, "sichuan_basin")
    mass = basin[None].astype(np.float64)
    area = atmosphere.geometry.area[:, None]
    released = (mass[0] * area).sum()
    for hour in range(atmosphere.hour, atmosphere.hour + hours, 3):
        coeffs = _coefficients(atmosphere, hour)
        mass, _, _ = advect_diffuse(mass, coeffs, 10800.0, cfl_substeps(coeffs, 10800.0, 0.9))
    return float((mass[0] * area)[basin].sum() / released)


def test_terrain_blocking_traps_a_tracer_released_in_the_basin():
    blocked, free = _basin_retention(1.0), _basin_retention(0.0)
    # Measured: 0.34 with blocking 1, 0.15 with 0.5, 0.05 with 0 (32 x 64, 12 h of January winds).
    assert blocked > 3.0 * free, (blocked, free)
    assert blocked > _basin_retention(0.5) > free


def test_blocking_keeps_a_uniform_background_uniform():
    # Under the non-divergent synoptic flow, air at the background concentration must stay at it
    # however strong the blocking: only the excess over the background is held back.
    atmosphere = Atmosphere(AtmosphereParams(**TINY, terrain_blocking=3.0))
    psi, _ = atmosphere.weather.synoptic_psi(atmosphere.hour)
    east, north = -(psi[1:] - psi[:-1]), psi[:, 1:] - psi[:, :-1]
    coeffs = transport_coefficients(atmosphere.geometry, east, north, atmosphere.uphill, 2e4)
    background = np.array([5.0, 60.0])
    mass = np.broadcast_to(background[:, None, None], (2, 16, 32)).copy()
    n_sub = cfl_substeps(coeffs, 86400.0, 0.9)
    mass, outflow, inflow = advect_diffuse(mass, coeffs, 86400.0, n_sub, background)
    np.testing.assert_allclose(mass, np.broadcast_to(background[:, None, None], mass.shape),
                               rtol=1e-12)
    np.testing.assert_allclose(outflow, inflow, rtol=1e-12)


def test_zero_blocking_means_elevation_does_not_touch_tracers():
    params = AtmosphereParams(**TINY, terrain_blocking=0.0)
    terrain = make_terrain(params)
    flat = dataclasses.replace(terrain, elevation=np.zeros_like(terrain.elevation))
    runs = {}
    for name, land in (("real", terrain), ("flat", flat)):
        for blocking in (0.0, 1.0):
            p = dataclasses.replace(params, terrain_blocking=blocking)
            atmosphere = Atmosphere(p, terrain=land)
            for _ in range(16):
                atmosphere.step()
            runs[name, blocking] = atmosphere.fields()
    for tracer in ("pm25", "pm10", "so2", "no2", "co", "o3", "u", "v"):
        np.testing.assert_array_equal(runs["real", 0.0][tracer], runs["flat", 0.0][tracer])
    assert not np.array_equal(runs["real", 1.0]["pm25"], runs["flat", 1.0]["pm25"])
    assert not np.array_equal(runs["real", 0.0]["temp"], runs["flat", 0.0]["temp"])  # lapse rate


def test_fields_are_finite_physical_and_cfl_limited():
    atmosphere = Atmosphere(AtmosphereParams(**TINY))
    dt = 3600.0 * atmosphere.params.physics_step_hours
    g = atmosphere.geometry
    for _ in range(24):
        atmosphere.step()
        c = atmosphere.last_coefficients
        sub = dt / atmosphere.last_substeps
        courant_x = np.abs(c.east_flux[:, 1:-1]) / g.dy * sub / g.dx_centre[:, None]
        courant_y = np.abs(c.north_flux[1:-1]) / g.dx_face[1:-1, None] * sub / g.dy
        assert max(courant_x.max(), courant_y.max()) <= atmosphere.params.cfl
        assert atmosphere.mass.min() >= 0
    fields = atmosphere.fields()
    for name, value in fields.items():
        assert np.isfinite(value).all(), name
    for name in ("pm25", "pm10", "so2", "no2", "co", "o3"):
        assert fields[name].min() >= 0, name
    assert np.all(fields["pm10"] >= fields["pm25"])
    assert fields["rh"].min() > 0 and fields["rh"].max() <= 100
    plateau = _region(atmosphere.terrain, "plateau")
    lowland = atmosphere.terrain.elevation < 300
    assert fields["psfc"][plateau].max() < 700 and fields["psfc"][lowland].min() > 960
    assert fields["temp"][plateau].mean() < fields["temp"][~plateau].mean() - 10


def test_params_validation_names_the_field():
    with pytest.raises(ValueError, match="output_step_hours"):
        AtmosphereParams(output_step_hours=4, physics_step_hours=3)
    with pytest.raises(ValueError, match="end"):
        AtmosphereParams(start="2015-02-01", end="2015-01-01")
    with pytest.raises(ValueError, match="width"):
        make_terrain(AtmosphereParams(height=16, width=16))
