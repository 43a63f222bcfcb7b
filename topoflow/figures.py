"""Report figures as PNG files: val-loss curves of the arms, gain maps, per-pollutant x lead bar
charts with confidence intervals, and the attention-bias pattern around a mountain range.

Figures are built with `matplotlib.figure.Figure` and saved through the Agg canvas, without
pyplot, so making a report never changes the user's matplotlib backend or leaks open figures.
Grids follow the corpus convention: row 0 is the southernmost row, so maps use origin="lower".
Every function writes one PNG and returns its path; the title says what is shown.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.colors import TwoSlopeNorm
from matplotlib.figure import Figure

__all__ = [
    "default_query_patch",
    "elevation_bias_row",
    "path_bias_row",
    "plot_attention_bias",
    "plot_gain_bars",
    "plot_gain_maps",
    "plot_val_loss_curves",
]

Curve = tuple[Sequence[float], Sequence[float]]
Extent = tuple[float, float, float, float]


def _save(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    return path


def plot_val_loss_curves(
    curves: Mapping[str, Mapping[int, Curve]],
    path: str | Path,
    *,
    title: str = "Validation loss of each arm (line: mean over seeds, band: min-max)",
    ylabel: str = "val loss (normalized MSE)",
    baseline: float | None = None,
    threshold: float | None = None,
) -> Path:
    """`curves[arm][seed] = (steps, losses)`; steps common to all seeds of an arm are plotted."""
    fig = Figure(figsize=(8, 5))
    ax = fig.add_subplot()
    for arm, by_seed in curves.items():
        if not by_seed:
            raise ValueError(f"plot_val_loss_curves: arm {arm!r} has no seeds")
        tables = [dict(zip(map(float, s), map(float, v), strict=True)) for s, v in by_seed.values()]
        steps = sorted(set.intersection(*(set(t) for t in tables)))
        values = np.array([[t[s] for s in steps] for t in tables])  # (seeds, steps)
        (line,) = ax.plot(
            steps, values.mean(0), marker="o", ms=3, label=f"{arm} ({len(tables)} seeds)"
        )
        if len(tables) > 1:
            ax.fill_between(steps, values.min(0), values.max(0), color=line.get_color(), alpha=0.2)
    if baseline is not None:
        ax.axhline(baseline, color="grey", ls="--", lw=1, label=f"baseline step 0 ({baseline:.4g})")
    if threshold is not None:
        ax.axhline(
            threshold, color="black", ls=":", lw=1, label=f"success threshold ({threshold:.4g})"
        )
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_gain_maps(
    gain: np.ndarray,
    variables: Sequence[str],
    path: str | Path,
    *,
    elevation_m: np.ndarray | None = None,
    extent: Extent | None = None,
    contour_levels_m: Sequence[float] = (1000.0, 3000.0),
    title: str = "Relative RMSE gain of the arm over the control per cell (blue: arm better)",
) -> Path:
    """One map per variable of `gain` (V, H, W), a fraction; drawn in %, diverging around 0.

    The colour range is symmetric, set by the 98th percentile of |gain| over all maps (at most
    100%) so a few noisy cells do not wash out the rest; elevation contours (m) are drawn over
    each map: one (H, W) field for every panel, or (V, H, W), one per panel (a terrain per
    sample, e.g. one panel per terrain world).
    `extent` is (lon_min, lon_max, lat_min, lat_max) for geographic axes.
    """
    gain = np.asarray(gain, dtype=np.float64)
    if gain.ndim != 3 or gain.shape[0] != len(variables):
        raise ValueError(f"gain: expected ({len(variables)}, H, W), got {gain.shape}")
    finite = np.abs(gain[np.isfinite(gain)])
    # A gain cannot exceed +100% but can fall far below -100%; capping the symmetric range at 100%
    # keeps a few hopeless cells from washing out the rest (the colour bar marks the overflow).
    vmax = 100 * float(np.percentile(finite, 98)) if finite.size else 1.0
    vmax = min(vmax, 100.0) if vmax > 0 else 1.0
    cols = min(3, len(variables))
    rows = -(-len(variables) // cols)
    height, width = gain.shape[1:]
    panel_w = 4.2
    fig = Figure(
        figsize=(panel_w * cols + 1.2, panel_w * rows * height / width + 1.0), layout="constrained"
    )
    axes = fig.subplots(rows, cols, squeeze=False)
    norm = TwoSlopeNorm(vcenter=0.0, vmin=-vmax, vmax=vmax)
    for k, ax in enumerate(axes.flat):
        if k >= len(variables):
            ax.set_axis_off()
            continue
        image = ax.imshow(
            100 * gain[k],
            origin="lower",
            cmap=colormaps["RdBu"].with_extremes(bad="lightgrey"),
            norm=norm,
            extent=extent,
            interpolation="nearest",
        )
        if elevation_m is not None:
            terrain = elevation_m if np.ndim(elevation_m) == 2 else elevation_m[k]
            _elevation_contours(ax, terrain, contour_levels_m, extent)
        mean_gain = np.nanmean(gain[k]) if np.isfinite(gain[k]).any() else np.nan
        ax.set_title(f"{variables[k]} (cell mean {100 * mean_gain:+.1f}%)", fontsize=9)
        ax.tick_params(labelsize=7)
    overflow = "min" if finite.size and 100 * finite.max() > vmax else "neither"
    fig.colorbar(
        image,
        ax=axes,
        shrink=0.9,
        extend=overflow,
        label="gain = 1 - RMSE_arm / RMSE_control (%)",
    )
    notes = ["grey: no valid data"]
    if elevation_m is not None:
        notes.append(f"contours: elevation {_levels(contour_levels_m)}")
    if extent is not None:
        notes.append("axes: longitude, latitude (deg)")
    caption = f"{title}\n" + "; ".join(notes)
    fig.suptitle(caption, fontsize=10)
    return _save(fig, path)


def _levels(levels: Sequence[float]) -> str:
    return ", ".join(f"{lv:g}" for lv in levels) + " m"


def _elevation_contours(ax, elevation_m: np.ndarray, levels: Sequence[float], extent) -> None:
    """Black elevation contours over a map, labelled in metres."""
    elevation_m = np.asarray(elevation_m, dtype=np.float64)
    if elevation_m.max() <= min(levels):
        return
    lines = ax.contour(
        elevation_m,
        levels=list(levels),
        colors="black",
        linewidths=0.7,
        origin="lower",
        extent=extent,
    )
    ax.clabel(lines, fmt="%g m", fontsize=6)


def plot_gain_bars(
    entries: Sequence[Mapping],
    path: str | Path,
    *,
    title: str = "Relative gain of the arm over the control per pollutant and lead time",
    ylabel: str = "gain = 1 - MSE_arm / MSE_control (%)",
    interval: str = "95% block-bootstrap CI",
) -> Path:
    """Grouped bars: one group per variable, one bar per lead, error bars = the interval.

    Each entry: {"variable", "lead_hours", "gain", "ci_low", "ci_high"}, gains as fractions.
    """
    variables = list(dict.fromkeys(e["variable"] for e in entries))
    leads = sorted({int(e["lead_hours"]) for e in entries})
    by_key = {(e["variable"], int(e["lead_hours"])): e for e in entries}
    width = 0.8 / len(leads)
    fig = Figure(figsize=(max(6.0, 1.4 * len(variables) + 2), 4.5))
    ax = fig.add_subplot()
    x = np.arange(len(variables))
    for k, lead in enumerate(leads):
        rows = [by_key.get((v, lead)) for v in variables]
        gain = np.array([np.nan if r is None else 100 * r["gain"] for r in rows])
        low = np.array([np.nan if r is None else 100 * r["ci_low"] for r in rows])
        high = np.array([np.nan if r is None else 100 * r["ci_high"] for r in rows])
        offset = (k - (len(leads) - 1) / 2) * width
        ax.bar(x + offset, gain, width, label=f"lead {lead} h")
        ax.errorbar(
            x + offset,
            gain,
            yerr=[gain - low, high - gain],
            fmt="none",
            ecolor="black",
            capsize=2,
            lw=0.8,
        )
    ax.axhline(0.0, color="black", lw=0.8)
    ax.set_xticks(x, variables)
    ax.set_ylabel(ylabel)
    ax.set_title(f"{title}\nerror bars: {interval}; > 0 means the arm is better", fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, ncols=min(4, len(leads)))
    return _save(fig, path)


def _patch_means(elevation_m: np.ndarray, patch_size: int) -> np.ndarray:
    """(H/p, W/p) mean elevation per patch: the z of the bias (avg-pool, as in the model)."""
    h, w = elevation_m.shape
    if h % patch_size or w % patch_size:
        raise ValueError(f"elevation grid {elevation_m.shape} not divisible by patch {patch_size}")
    return elevation_m.reshape(h // patch_size, patch_size, w // patch_size, patch_size).mean(
        (1, 3)
    )


def elevation_bias_row(
    patch_elevation_m: np.ndarray,
    query: tuple[int, int],
    *,
    alpha: float,
    h_scale_m: float,
    clamp_max: float = 10.0,
    direction: str = "downslope",
) -> np.ndarray:
    """Bias of one query patch i toward every key patch j, on the patch grid.

    DESIGN.md section 3: B[i, j] = clamp(-alpha * ReLU((z_j - z_i) / H_scale), -clamp_max, 0)
    ("downslope"); "upslope" uses z_i - z_j (config.elevation_bias_direction). Re-implemented here
    in numpy so the figure does not need the model; the model's tests hold the same formula.
    """
    z_i = patch_elevation_m[query]
    rise = patch_elevation_m - z_i if direction == "downslope" else z_i - patch_elevation_m
    penalty = -alpha * np.maximum(rise, 0.0) / h_scale_m
    return np.clip(penalty, -clamp_max, 0.0)


def path_bias_row(
    elevation_m: np.ndarray,
    patch_size: int,
    query: tuple[int, int],
    *,
    alpha: float,
    h_scale_m: float,
    clamp_max: float = 10.0,
    direction: str = "upslope",
) -> np.ndarray:
    """The oracle's bias row of one query patch on the patch grid: clamp(-alpha * Z / H_scale,
    -clamp_max, 0) with Z the path ascent the model computes (`attention_topoflow`)."""
    import torch

    from attention_topoflow import oriented_ascent, path_ascent_matrix

    terrain = torch.as_tensor(elevation_m, dtype=torch.float32)[None]
    ascent = oriented_ascent(path_ascent_matrix(terrain, patch_size), direction)[0].numpy()
    cols = elevation_m.shape[1] // patch_size
    row = ascent[query[0] * cols + query[1]].reshape(-1, cols)  # the query's keys
    return np.clip(-alpha * row / h_scale_m, -clamp_max, 0.0)


def default_query_patch(patch_elevation_m: np.ndarray, radius: int = 3,
                        direction: str = "downslope") -> tuple[int, int]:
    """The land patch (above 10 m) where the bias bites hardest. Downslope: a low patch with high
    terrain nearby (a basin floor beside a range), maximizing (highest patch within `radius`) -
    (own elevation). Upslope: a high patch above low terrain, maximizing (own elevation) -
    (lowest patch within `radius`)."""
    z = patch_elevation_m
    padded = np.pad(z, radius, mode="edge")
    rows, cols = z.shape
    window = np.lib.stride_tricks.sliding_window_view(padded, (2 * radius + 1, 2 * radius + 1))
    if direction == "downslope":
        relief = window.max(axis=(2, 3)) - z
    else:
        relief = z - window.min(axis=(2, 3))
    relief = np.where(z > 10.0, relief, -np.inf)
    flat = int(np.argmax(relief))
    return flat // cols, flat % cols


def _patch_at(
    latlon: tuple[float, float], extent: Extent | None, shape: tuple[int, int]
) -> tuple[int, int]:
    """Patch (row, col) containing a (lat, lon) point on a grid spanning `extent`."""
    if extent is None:
        raise ValueError("query_latlon needs extent=(lon_min, lon_max, lat_min, lat_max)")
    lon0, lon1, lat0, lat1 = extent
    lat, lon = latlon
    if not (lat0 <= lat < lat1 and lon0 <= lon < lon1):
        raise ValueError(f"query_latlon {latlon} lies outside the grid extent {extent}")
    rows, cols = shape
    return int((lat - lat0) / (lat1 - lat0) * rows), int((lon - lon0) / (lon1 - lon0) * cols)


def plot_attention_bias(
    elevation_m: np.ndarray,
    path: str | Path,
    *,
    patch_size: int,
    alpha: float,
    h_scale_m: float,
    clamp_max: float = 10.0,
    query_patch: tuple[int, int] | None = None,
    query_latlon: tuple[float, float] | None = None,
    extent: Extent | None = None,
    contour_levels_m: Sequence[float] = (1000.0, 3000.0),
    direction: str = "downslope",
    rise: str = "endpoint",
) -> Path:
    """Two panels: patch-mean elevation with the query marked, and the query's bias row.

    `rise="path"` draws the oracle's bias (config.elevation_bias_rise): the row comes from the
    model's own `path_ascent_matrix` on the cell-resolution `elevation_m`.

    The bias row shows how much attention logit the query patch loses toward each key patch:
    0 at and below the query's height, down to -clamp_max toward much higher terrain. The query
    is `query_patch` (row, col on the patch grid), or the patch holding `query_latlon` (needs
    `extent`; e.g. (30.5, 105.8) for the Sichuan basin of the default terrain), or else
    `default_query_patch`.
    """
    elevation_m = np.asarray(elevation_m, dtype=np.float64)
    z = _patch_means(elevation_m, patch_size)
    if query_patch is not None:
        query = (int(query_patch[0]), int(query_patch[1]))
    elif query_latlon is not None:
        query = _patch_at(query_latlon, extent, z.shape)
    else:
        query = default_query_patch(z, direction=direction)
    if rise == "path":
        bias = path_bias_row(elevation_m, patch_size, query, alpha=alpha, h_scale_m=h_scale_m,
                             clamp_max=clamp_max, direction=direction)
    else:
        bias = elevation_bias_row(z, query, alpha=alpha, h_scale_m=h_scale_m,
                                  clamp_max=clamp_max, direction=direction)
    rows, cols = z.shape
    if extent is None:
        extent = (0.0, float(cols), 0.0, float(rows))
    lon0, lon1, lat0, lat1 = extent
    qx = lon0 + (query[1] + 0.5) * (lon1 - lon0) / cols
    qy = lat0 + (query[0] + 0.5) * (lat1 - lat0) / rows
    fig = Figure(figsize=(13, 5.6 * rows / cols + 1.3), layout="constrained")
    ax_z, ax_b = fig.subplots(1, 2)
    im_z = ax_z.imshow(z, origin="lower", cmap="terrain", extent=extent, interpolation="nearest")
    fig.colorbar(im_z, ax=ax_z, shrink=0.85, label="patch-mean elevation (m)")
    ax_z.set_title(
        f"Elevation per {patch_size}x{patch_size} patch, query patch {query} (star)", fontsize=9
    )
    im_b = ax_b.imshow(
        bias,
        origin="lower",
        cmap="magma",
        vmin=min(bias.min(), -1e-6),
        vmax=0.0,
        extent=extent,
        interpolation="nearest",
    )
    _elevation_contours(ax_b, z, contour_levels_m, extent)
    fig.colorbar(im_b, ax=ax_b, shrink=0.85, label="bias added to the attention logit")
    ax_b.set_title(
        f"Bias row of the query: alpha = {alpha:g}, H_scale = {h_scale_m:g} m, clamp {clamp_max:g}"
        f"\nmin {bias.min():.2f}; contours {_levels(contour_levels_m)}",
        fontsize=9,
    )
    for ax in (ax_z, ax_b):
        ax.plot([qx], [qy], marker="*", ms=14, color="cyan", mec="black")
        ax.tick_params(labelsize=7)
    if rise == "path":
        title = ("Oracle attention bias: the query pays for the total climb from each source up "
                 "to itself" if direction == "upslope" else "Oracle attention bias (downslope): "
                 "the query pays for the total climb from itself up to each source")
    elif direction == "downslope":
        title = ("Elevation attention bias: a low query beside a range is penalized for "
                 "attending uphill")
    else:
        title = ("Elevation attention bias (upslope): a high query is penalized for attending to "
                 "lower terrain")
    fig.suptitle(title, fontsize=10)
    return _save(fig, path)
