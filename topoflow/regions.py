"""Where does an arm gain? RMSE and relative gain by elevation band and by named region.

Inputs are the per-cell squared-error sums and counts that `ForecastMetrics` accumulates
(`state()["cell_sq_err"]`, `state()["cell_count"]`, each `(V, H, W)`, physical units), one pair per
arm. A region's RMSE pools all its cells: sqrt(sum of squared errors / number of valid values),
so a region's number is not the mean of its cells' RMSEs. Gain = 1 - RMSE_arm / RMSE_control
(positive = the arm is better).

Regions come from the corpus (`static.safetensors` `region_id` and the names in
`topoflow_corpus.json`), from elevation bands, or from a user mask file (.npy or .safetensors)
for real data.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open

__all__ = [
    "DEFAULT_ELEVATION_EDGES_M",
    "RegionRow",
    "elevation_bands",
    "format_region_table",
    "gain_map",
    "load_region_mask",
    "region_report",
    "region_table",
    "regions_from_corpus",
]

DEFAULT_ELEVATION_EDGES_M: tuple[float, ...] = (200.0, 1000.0, 3000.0)

ArrayLike = np.ndarray | torch.Tensor


def _numpy(array: ArrayLike) -> np.ndarray:
    if isinstance(array, torch.Tensor):
        return array.detach().cpu().double().numpy()
    return np.asarray(array, dtype=np.float64)


def elevation_bands(
    elevation_m: ArrayLike, edges_m: Sequence[float] = DEFAULT_ELEVATION_EDGES_M
) -> tuple[np.ndarray, dict[int, str]]:
    """Band code per cell `(H, W)` int and band names, e.g. "< 200 m", "200-1000 m", ">= 3000 m".

    A cell at exactly an edge belongs to the band above it.
    """
    edges = [float(e) for e in edges_m]
    if not edges or any(b <= a for a, b in zip(edges, edges[1:], strict=False)):
        raise ValueError(f"elevation band edges must be increasing and non-empty, got {edges}")
    codes = np.digitize(_numpy(elevation_m), edges).astype(np.int64)
    names = {0: f"< {edges[0]:g} m"}
    for k, (lo, hi) in enumerate(zip(edges, edges[1:], strict=False), start=1):
        names[k] = f"{lo:g}-{hi:g} m"
    names[len(edges)] = f">= {edges[-1]:g} m"
    return codes, names


def regions_from_corpus(corpus: str | Path) -> tuple[np.ndarray, dict[int, str]]:
    """`region_id` (H, W) from `<corpus>/static.safetensors` (its sha256 checked against the
    metadata) and its names from the metadata."""
    from topoflow.corpus.schema import STATIC_FILE, CorpusMetadata
    from topoflow.corpus.shards import read_static

    corpus = Path(corpus)
    meta = CorpusMetadata.load(corpus)
    if not meta.regions:
        raise KeyError(f"{corpus / 'topoflow_corpus.json'} has no 'regions' table")
    region_id = read_static(corpus / STATIC_FILE, meta)["region_id"].astype(np.int64)
    return region_id, {int(code): str(name) for code, name in meta.regions.items()}


def load_region_mask(
    path: str | Path,
    *,
    names: Mapping[int, str] | None = None,
    grid_shape: tuple[int, int] | None = None,
) -> tuple[np.ndarray, dict[int, str]]:
    """A user region mask: integer codes or a boolean mask `(H, W)` in a .npy or .safetensors file.

    A .safetensors file may hold `region_id` or a single tensor, and may name its codes in its
    metadata under "regions" (JSON `{code: name}`); `names` overrides. A boolean mask gives two
    regions, "outside" (0) and the file's stem (1). Unnamed codes are called "region <code>".
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"region mask file {path} does not exist")
    file_names: dict[int, str] = {}
    if path.suffix == ".npy":
        mask = np.load(path, allow_pickle=False)
    elif path.suffix == ".safetensors":
        with safe_open(str(path), framework="np") as handle:
            keys = list(handle.keys())
            key = "region_id" if "region_id" in keys else (keys[0] if len(keys) == 1 else None)
            if key is None:
                raise KeyError(
                    f"{path}: expected a 'region_id' tensor or a single tensor, got {keys}"
                )
            mask = handle.get_tensor(key)
            meta = (handle.metadata() or {}).get("regions")
            file_names = {int(k): str(v) for k, v in json.loads(meta).items()} if meta else {}
    else:
        raise ValueError(f"region mask {path}: expected a .npy or .safetensors file")
    if mask.ndim != 2:
        raise ValueError(f"region mask {path}: expected a 2-D (H, W) array, got {mask.shape}")
    if grid_shape is not None and tuple(mask.shape) != tuple(grid_shape):
        raise ValueError(f"region mask {path}: shape {mask.shape} != grid {tuple(grid_shape)}")
    if mask.dtype == bool:
        file_names = {0: "outside", 1: path.stem}
    elif not np.issubdtype(mask.dtype, np.integer):
        raise ValueError(f"region mask {path}: expected integer codes or bool, got {mask.dtype}")
    codes = mask.astype(np.int64)
    merged = {int(c): f"region {int(c)}" for c in np.unique(codes)}
    merged.update(file_names)
    merged.update({int(k): v for k, v in (names or {}).items()})
    return codes, merged


def gain_map(
    control_sq_err: ArrayLike, control_count: ArrayLike, arm_sq_err: ArrayLike, arm_count: ArrayLike
) -> np.ndarray:
    """(V, H, W) per-cell relative gain 1 - RMSE_arm / RMSE_control; NaN where undefined."""
    c_sq, c_n, a_sq, a_n = (
        _numpy(x) for x in (control_sq_err, control_count, arm_sq_err, arm_count)
    )
    with np.errstate(divide="ignore", invalid="ignore"):
        rmse_c = np.sqrt(c_sq / c_n)
        rmse_a = np.sqrt(a_sq / a_n)
        gain = 1.0 - rmse_a / rmse_c
    return np.where((c_n > 0) & (a_n > 0) & (rmse_c > 0), gain, np.nan)


@dataclass
class RegionRow:
    """One region x variable: pooled RMSEs (physical units) of both arms and the relative gain."""

    region: str
    code: int
    variable: str
    n_cells: int
    n_cells_with_data: int
    n_values: int
    rmse_control: float | None
    rmse_arm: float | None
    gain: float | None

    def to_dict(self) -> dict:
        return asdict(self)


def region_table(
    control_sq_err: ArrayLike,
    control_count: ArrayLike,
    arm_sq_err: ArrayLike,
    arm_count: ArrayLike,
    region_codes: ArrayLike,
    names: Mapping[int, str],
    variables: Sequence[str],
) -> list[RegionRow]:
    """Rows for every named region (in code order) and variable.

    Both arms must have been scored on the same valid values (equal counts per cell), otherwise
    the comparison is not paired and a ValueError says so.
    """
    c_sq, c_n, a_sq, a_n = (
        _numpy(x) for x in (control_sq_err, control_count, arm_sq_err, arm_count)
    )
    codes = np.asarray(region_codes)
    if c_sq.ndim != 3 or c_sq.shape[0] != len(variables):
        raise ValueError(f"control_sq_err: expected ({len(variables)}, H, W), got {c_sq.shape}")
    for name, array in (("control_count", c_n), ("arm_sq_err", a_sq), ("arm_count", a_n)):
        if array.shape != c_sq.shape:
            raise ValueError(f"{name} shape {array.shape} != control_sq_err shape {c_sq.shape}")
    if codes.shape != c_sq.shape[1:]:
        raise ValueError(f"region codes shape {codes.shape} != grid {c_sq.shape[1:]}")
    if not np.array_equal(c_n, a_n):
        raise ValueError(
            "control and arm counts differ per cell: arms were scored on other samples"
        )
    rows = []
    for code in sorted(names):
        inside = codes == code
        for v, variable in enumerate(variables):
            n = float(c_n[v][inside].sum())
            rmse_c = float(np.sqrt(c_sq[v][inside].sum() / n)) if n > 0 else None
            rmse_a = float(np.sqrt(a_sq[v][inside].sum() / n)) if n > 0 else None
            gain = 1.0 - rmse_a / rmse_c if rmse_c else None
            rows.append(
                RegionRow(
                    names[code],
                    int(code),
                    variable,
                    int(inside.sum()),
                    int((c_n[v][inside] > 0).sum()),
                    int(n),
                    rmse_c,
                    rmse_a,
                    gain,
                )
            )
    return rows


def format_region_table(rows: Sequence[RegionRow], *, title: str = "region") -> str:
    """Markdown table: one line per region, the relative RMSE gain in % per variable."""
    variables = list(dict.fromkeys(r.variable for r in rows))
    regions = list(dict.fromkeys((r.code, r.region, r.n_cells) for r in rows))
    by_key = {(r.code, r.variable): r for r in rows}
    lines = [
        f"| {title} | cells (with data) | " + " | ".join(f"{v} gain" for v in variables) + " |",
        "|---|---:|" + "---:|" * len(variables),
    ]
    for code, name, n_cells in regions:
        region_rows = [by_key[(code, v)] for v in variables]
        with_data = max(r.n_cells_with_data for r in region_rows)
        cells = ["n/a" if r.gain is None else f"{100 * r.gain:+.2f}%" for r in region_rows]
        lines.append(f"| {name} | {n_cells} ({with_data}) | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def region_report(
    control_state: Mapping[str, ArrayLike],
    arm_state: Mapping[str, ArrayLike],
    variables: Sequence[str],
    *,
    elevation_m: ArrayLike,
    region_codes: ArrayLike | None = None,
    region_names: Mapping[int, str] | None = None,
    edges_m: Sequence[float] = DEFAULT_ELEVATION_EDGES_M,
) -> dict:
    """Both tables from two `ForecastMetrics.state()` dicts: by elevation band and, when region
    codes are given, by named region. Returns `{"elevation_band": [row dicts], "region": [...],
    "markdown": str}`."""
    sums = (
        control_state["cell_sq_err"],
        control_state["cell_count"],
        arm_state["cell_sq_err"],
        arm_state["cell_count"],
    )
    band_codes, band_names = elevation_bands(elevation_m, edges_m)
    bands = region_table(*sums, band_codes, band_names, variables)
    report = {"elevation_band": [r.to_dict() for r in bands], "region": []}
    markdown = [format_region_table(bands, title="elevation band")]
    if region_codes is not None:
        if region_names is None:
            region_names = {int(c): f"region {int(c)}" for c in np.unique(np.asarray(region_codes))}
        regions = region_table(*sums, region_codes, region_names, variables)
        report["region"] = [r.to_dict() for r in regions]
        markdown.append(format_region_table(regions, title="region"))
    report["markdown"] = "\n\n".join(markdown)
    return report
