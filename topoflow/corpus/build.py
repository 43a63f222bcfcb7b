"""Build corpora: the shard writer shared by every source, and the embedded default corpus.

`build_default_corpus` runs the deterministic generator (terrain.py, atmosphere.py), streams its
output into split shards with halos, computes normalization statistics on the training split only,
writes the static fields, metadata and dataset card into a temporary folder and renames it into the
cache, so an interrupted build never leaves a half-written corpus behind.

    python -m topoflow.corpus.build --size tiny --out DIR --terrain-blocking 0
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .schema import (
    DYNAMIC_VARIABLES,
    METADATA_FILE,
    STATIC_FILE,
    STATIC_VARIABLES,
    UNITS,
    CorpusError,
    CorpusMetadata,
    ShardInfo,
)
from .shards import shard_file_name, write_shard, write_static

# Bump when the bytes a build writes change for the same parameters (invalidates caches).
BUILD_VERSION = 2

__all__ = [
    "SIZES",
    "ShardPlan",
    "plan_shards",
    "RunningStats",
    "CorpusWriter",
    "monthly_edges",
    "finalize_corpus",
    "default_cache_root",
    "corpus_cache_name",
    "write_default_corpus",
    "write_corpus",
    "build_default_corpus",
    "corpus_files",
    "foreign_entries",
    "verify_corpus_folder",
    "existing_corpus",
    "check_replaceable",
    "main",
]



@dataclass
class ShardPlan:
    """One shard to write: its own rows are [start_hour, end_hour), halo up to halo_end_hour."""

    split: str
    index: int
    count: int
    start_hour: int
    end_hour: int
    halo_end_hour: int
    time_hour: list[int] = field(default_factory=list)
    rows: list[dict[str, np.ndarray]] = field(default_factory=list)

    @property
    def file(self) -> str:
        return shard_file_name(self.split, self.index, self.count)


def plan_shards(
    split_edges: Mapping[str, Sequence[int]], halo_hours: int
) -> list[ShardPlan]:
    """Shards from each split's edges in hours (edges[0] = split start, edges[-1] = split end).

    The halo never crosses the split's end: a target outside the split would leak one split's data
    into another, so such samples are dropped rather than kept.
    """
    plans = []
    for split, edges in split_edges.items():
        if len(edges) < 2 or any(b <= a for a, b in zip(edges, edges[1:], strict=False)):
            raise ValueError(f"split {split!r}: shard edges must increase, got {list(edges)}")
        count = len(edges) - 1
        for k, (start, end) in enumerate(zip(edges, edges[1:], strict=False)):
            halo_end = min(end + halo_hours, edges[-1])
            plans.append(ShardPlan(split, k, count, int(start), int(end), int(halo_end)))
    return plans


class RunningStats:
    """Per-variable mean and std of finite values, merged chunk by chunk in float64 (Chan)."""

    def __init__(self) -> None:
        self.count: dict[str, float] = {}
        self.mean: dict[str, float] = {}
        self.m2: dict[str, float] = {}

    def update(self, name: str, values: np.ndarray) -> None:
        x = np.asarray(values, dtype=np.float64)
        x = x[np.isfinite(x)]
        if x.size == 0:
            return
        n_b, mean_b = float(x.size), float(x.mean())
        m2_b = float(((x - mean_b) ** 2).sum())
        n_a = self.count.get(name, 0.0)
        mean_a, m2_a = self.mean.get(name, 0.0), self.m2.get(name, 0.0)
        n = n_a + n_b
        delta = mean_b - mean_a
        self.count[name] = n
        self.mean[name] = mean_a + delta * n_b / n
        self.m2[name] = m2_a + m2_b + delta * delta * n_a * n_b / n

    def result(self, names: Sequence[str], source: str) -> dict[str, dict[str, float]]:
        out = {}
        for name in names:
            if self.count.get(name, 0) < 2:
                raise CorpusError(f"{source}: variable {name!r} has no finite training values")
            std = (self.m2[name] / self.count[name]) ** 0.5
            # A constant field (e.g. land_fraction on an all-land grid) would divide by zero.
            out[name] = {"mean": self.mean[name], "std": std if std > 0 else 1.0}
        return out


class CorpusWriter:
    """Route time-ordered rows into planned shards; write each shard once its halo is complete."""

    def __init__(
        self,
        folder: str | os.PathLike,
        *,
        variables: Sequence[str],
        time_step_hours: int,
        split_edges: Mapping[str, Sequence[int]],
        halo_hours: int,
        stats_split: str = "train",
    ) -> None:
        self.folder = Path(folder)
        (self.folder / "data").mkdir(parents=True, exist_ok=True)
        self.variables = list(variables)
        self.step = time_step_hours
        self.pending = plan_shards(split_edges, halo_hours)
        self.stats_split = stats_split
        self.halo_hours = halo_hours
        self.stats = RunningStats()
        self.written: list[ShardInfo] = []
        self._last_hour: int | None = None

    def add(self, time_hour: np.ndarray, fields: Mapping[str, np.ndarray]) -> None:
        """Add a chunk: time_hour int64 (t,), fields[v] float32 (t, H, W), in strict time order."""
        missing = [v for v in self.variables if v not in fields]
        if missing:
            raise CorpusError(f"{self.folder}: chunk lacks variable(s) {missing}")
        for i, hour in enumerate(np.asarray(time_hour, dtype=np.int64).tolist()):
            if self._last_hour is not None and hour != self._last_hour + self.step:
                raise CorpusError(
                    f"{self.folder}: time stamps must advance by {self.step} h; got hour {hour} "
                    f"after {self._last_hour}"
                )
            self._last_hour = hour
            row = {v: np.asarray(fields[v][i], dtype=np.float32) for v in self.variables}
            for plan in self.pending:
                if plan.start_hour <= hour < plan.halo_end_hour:
                    plan.time_hour.append(hour)
                    plan.rows.append(row)
                    if plan.split == self.stats_split and hour < plan.end_hour:
                        for v in self.variables:
                            self.stats.update(v, row[v])
            self._flush(complete_before=hour + self.step)

    def _flush(self, complete_before: int) -> None:
        still_open = []
        for plan in self.pending:
            if plan.halo_end_hour <= complete_before:
                self._write(plan)
            else:
                still_open.append(plan)
        self.pending = still_open

    def _write(self, plan: ShardPlan) -> None:
        expected = (plan.halo_end_hour - plan.start_hour) // self.step
        if len(plan.time_hour) != expected:
            raise CorpusError(
                f"{self.folder / plan.file}: expected {expected} rows from hour {plan.start_hour}, "
                f"the source delivered {len(plan.time_hour)}"
            )
        time_hour = np.asarray(plan.time_hour, dtype=np.int64)
        is_halo = time_hour >= plan.end_hour
        fields = {v: np.stack([r[v] for r in plan.rows]) for v in self.variables}
        sha = write_shard(self.folder / plan.file, time_hour, is_halo, fields, self.variables)
        self.written.append(
            ShardInfo(
                file=plan.file, split=plan.split, rows=len(time_hour),
                own_rows=int((~is_halo).sum()), first_hour=int(time_hour[0]),
                last_hour=int(time_hour[-1]), sha256=sha,
            )  # fmt: skip
        )
        plan.rows.clear()

    def finish(self) -> list[ShardInfo]:
        """Write what is left; every planned shard must have been complete."""
        if self.pending:
            self._flush(complete_before=self.pending[-1].halo_end_hour)
        return sorted(self.written, key=lambda s: (s.split, s.first_hour))


def hours_since_epoch(iso: str) -> int:
    """Hours since 1970-01-01T00 UTC of an ISO date or date-time string."""
    return int(np.datetime64(iso, "h").astype(np.int64))


def monthly_edges(start: str, end: str) -> list[int]:
    """Shard edges in hours: `start`, every month start strictly between, and `end`; a split
    that crosses no month boundary is one shard."""
    first, last = hours_since_epoch(start), hours_since_epoch(end)
    if last <= first:
        raise ValueError(f"split end {end} is not after its start {start}")
    months = np.arange(np.datetime64(start, "M") + 1, np.datetime64(end, "M") + 1)
    inner = [int(m.astype("datetime64[h]").astype(np.int64)) for m in months]
    return [first, *(hour for hour in inner if first < hour < last), last]


def even_edges(start: str, end: str, count: int, step_hours: int) -> list[int]:
    """`count` shards of (nearly) equal length, edges on the time step."""
    first, last = hours_since_epoch(start), hours_since_epoch(end)
    steps = (last - first) // step_hours
    return [first + (steps * k // count) * step_hours for k in range(count + 1)]


@dataclass(frozen=True)
class CorpusSize:
    """Grid and periods of one preset size of the embedded corpus."""

    height: int
    width: int
    splits: dict[str, tuple[str, str]]
    shards_per_split: int | None  # None: one shard per calendar month
    time_step_hours: int = 6
    halo_hours: int = 96  # the reference setup's longest lead time


_YEARS = {"train": ("2015-01-01", "2017-01-01"), "validation": ("2017-01-01", "2018-01-01"),
          "test": ("2018-01-01", "2019-01-01")}  # fmt: skip
SIZES: dict[str, CorpusSize] = {
    # 4 shards per split so 2 ranks x 2 dataloader workers each get one shard.
    "tiny": CorpusSize(16, 32, {"train": ("2015-01-01", "2015-01-13"),
                                "validation": ("2015-01-13", "2015-01-25"),
                                "test": ("2015-01-25", "2015-02-06")}, 4),  # fmt: skip
    "default": CorpusSize(32, 64, _YEARS, None),
    "large": CorpusSize(64, 128, _YEARS, None),
}


def split_edges_for(size: CorpusSize) -> dict[str, list[int]]:
    if size.shards_per_split is None:
        return {s: monthly_edges(a, b) for s, (a, b) in size.splits.items()}
    return {
        s: even_edges(a, b, size.shards_per_split, size.time_step_hours)
        for s, (a, b) in size.splits.items()
    }


def grid_from_static(static: Mapping[str, np.ndarray]) -> dict[str, float]:
    """Grid box from cell-centre coordinates: lat/lon min/max are the outer cell *edges*."""
    lat, lon = np.asarray(static["lat2d"], np.float64), np.asarray(static["lon2d"], np.float64)
    height, width = lat.shape
    res = abs(float(lat[1, 0] - lat[0, 0]) if height > 1 else float(lon[0, 1] - lon[0, 0]))
    half = res / 2
    return {
        "height": height, "width": width,
        "lat_min": round(float(lat.min()) - half, 6), "lat_max": round(float(lat.max()) + half, 6),
        "lon_min": round(float(lon.min()) - half, 6), "lon_max": round(float(lon.max()) + half, 6),
        "resolution_deg": round(res, 6),
    }  # fmt: skip


def finalize_corpus(
    folder: str | os.PathLike,
    *,
    name: str,
    writer: CorpusWriter,
    static: Mapping[str, np.ndarray],
    splits: Mapping[str, tuple[str, str]],
    regions: Mapping[Any, str],
    provenance: dict[str, Any],
    units: Mapping[str, str] = UNITS,
    static_variables: Sequence[str] = STATIC_VARIABLES,
) -> CorpusMetadata:
    """Close the writer, write static fields, metadata and the dataset card; return the metadata.

    `static_variables` are the float fields stored once; a corpus whose elevation or population
    changes from sample to sample (the terrain worlds) stores them as dynamic variables instead.
    """
    from .card import write_dataset_card

    folder = Path(folder)
    shards = writer.finish()
    static_stats = RunningStats()
    for v in static_variables:
        static_stats.update(v, static[v])
    normalization = {
        **writer.stats.result(writer.variables, str(folder)),
        **static_stats.result(static_variables, f"{folder / STATIC_FILE}"),
    }
    static_sha256 = write_static(folder / STATIC_FILE, static)
    meta = CorpusMetadata(
        name=name,
        variables=list(writer.variables),
        static_variables=list(static_variables),
        units={v: units[v] for v in (*writer.variables, *static_variables, "region_id")},
        grid=grid_from_static(static),
        time_step_hours=writer.step,
        splits={s: {"start": a, "end": b} for s, (a, b) in splits.items()},
        normalization=normalization,
        regions={str(k): v for k, v in regions.items()},
        shards=shards,
        provenance=provenance,
        halo_hours=writer.halo_hours,
        static_sha256=static_sha256,
        source=str(folder),
    )
    meta.save(folder)
    write_dataset_card(folder, meta)
    return meta


def default_cache_root() -> Path:
    base = os.environ.get("TOPOFLOW_CACHE") or Path.home() / ".cache" / "topoflow"
    return Path(base) / "corpora"


def _all_sizes() -> list[str]:
    """The default-corpus sizes and the terrain-worlds presets (worlds.py)."""
    from .worlds import WORLD_SIZES

    return sorted([*SIZES, *WORLD_SIZES])


def _build_params(size: str, seed: int, terrain_blocking: float) -> dict[str, Any]:
    if size not in _all_sizes():
        raise ValueError(f"size must be one of {_all_sizes()}, got {size!r}")
    if not (math.isfinite(float(terrain_blocking)) and float(terrain_blocking) >= 0):
        raise ValueError(
            f"--terrain-blocking must be a finite number >= 0 (0 = terrain has no effect), got "
            f"{terrain_blocking}"
        )
    return {"size": size, "seed": int(seed), "terrain_blocking": float(terrain_blocking)}


# Provenance keys that decide the bytes of an embedded corpus; equal keys and intact files mean
# an existing corpus is the one asked for.
_PROVENANCE_KEYS = ("size", "seed", "terrain_blocking", "builder_version", "generator_version")


def _requested_provenance(size: str, seed: int, terrain_blocking: float) -> dict[str, Any]:
    from .atmosphere import GENERATOR_VERSION

    return {**_build_params(size, seed, terrain_blocking), "builder_version": BUILD_VERSION,
            "generator_version": GENERATOR_VERSION}  # fmt: skip


def _provenance_differences(meta: CorpusMetadata, requested: Mapping[str, Any]) -> list[str]:
    found = meta.provenance or {}
    return [
        f"{key}: {found.get(key)!r} there, {requested[key]!r} asked"
        for key in _PROVENANCE_KEYS
        if found.get(key) != requested[key]
    ]


def corpus_files(meta: CorpusMetadata) -> set[str]:
    """Relative paths of every file a corpus build writes (metadata, card, static, shards)."""
    return {METADATA_FILE, "README.md", STATIC_FILE, *(s.file for s in meta.shards)}


def foreign_entries(folder: Path, meta: CorpusMetadata) -> list[str]:
    """Entries of `folder` that no corpus build wrote: they belong to someone else."""
    ours = corpus_files(meta)
    found = []
    for path in sorted(folder.rglob("*")):
        relative = path.relative_to(folder).as_posix()
        if path.is_dir() and not path.is_symlink():
            if not any(name.startswith(relative + "/") for name in ours):
                found.append(relative + "/")
        elif relative not in ours:
            found.append(relative)
    return found


def verify_corpus_folder(folder: Path) -> CorpusMetadata:
    """Load a corpus's metadata and check every shard and the static fields by sha256."""
    from .shards import read_static, validate_shard_file

    meta = CorpusMetadata.load(folder)
    for shard in meta.shards:
        validate_shard_file(folder, shard, meta, check_sha256=True)
    read_static(folder / STATIC_FILE, meta)
    return meta


def _holds_a_corpus(folder: Path, flag: str) -> bool:
    """False for an absent or empty folder; True for a corpus folder; raises for anything else
    (a file, a folder of someone else's files), which no build may write into or replace."""
    if folder.exists() and not folder.is_dir():
        raise CorpusError(f"{flag} {folder} is a file, not a folder; refusing to replace it")
    if not folder.is_dir() or not any(folder.iterdir()):
        return False
    if not (folder / METADATA_FILE).is_file():
        shown = sorted(p.name for p in folder.iterdir())[:5]
        raise CorpusError(
            f"{flag} {folder} is not empty ({shown}) and holds no TopoFlow corpus; refusing to "
            f"write into it (nothing there is deleted): choose an empty or new folder"
        )
    return True


def check_replaceable(folder: Path, flag: str) -> None:
    """Raise unless `folder` is absent, empty, or a corpus whose every file a build wrote."""
    if _holds_a_corpus(folder, flag):
        foreign = foreign_entries(folder, CorpusMetadata.load(folder))
        if foreign:
            raise CorpusError(
                f"{flag} {folder} holds files no corpus build wrote ({foreign[:5]}); refusing to "
                f"replace the folder: move them out or choose another folder"
            )


def existing_corpus(
    folder: Path, *, size: str, seed: int, terrain_blocking: float, force: bool, flag: str
) -> Path | None:
    """`folder` if it already holds the requested corpus, intact; None if the caller may build
    into it (absent, empty, or with `force` a TopoFlow corpus whose every file a build wrote).

    Never returns None for a folder holding anything a corpus build did not write: TopoFlow does
    not delete what it did not write.
    """
    requested = _requested_provenance(size, seed, terrain_blocking)
    if not _holds_a_corpus(folder, flag):
        return None
    meta = CorpusMetadata.load(folder)
    foreign = foreign_entries(folder, meta)
    differences = _provenance_differences(meta, requested)
    if not differences and not force:
        verify_corpus_folder(folder)
        if foreign:
            raise CorpusError(f"{flag} {folder} holds the requested corpus plus files no build "
                              f"wrote: {foreign[:5]}; move them out")
        return folder
    if foreign:
        raise CorpusError(
            f"{flag} {folder} holds files no corpus build wrote ({foreign[:5]}); refusing to "
            f"replace the folder: move them out or choose another folder"
        )
    if not force:
        raise CorpusError(
            f"{flag} {folder} holds a corpus built with other settings ({'; '.join(differences)})"
            f"; pass --force to replace it, or choose another folder"
        )
    return None


def corpus_cache_name(size: str = "default", seed: int = 0, terrain_blocking: float = 1.0) -> str:
    """`topoflow-<size>-<hash>`: the hash covers every input that changes the bytes written."""
    from . import atmosphere
    from .worlds import WORLD_SIZES, WORLDS_VERSION

    params = _build_params(size, seed, terrain_blocking)
    key = {**params, "schema": BUILD_VERSION,
           "generator": getattr(atmosphere, "GENERATOR_VERSION", "unversioned")}  # fmt: skip
    if size in WORLD_SIZES:
        key["worlds"] = WORLDS_VERSION
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    return f"topoflow-{size}-{digest}"


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (np.generic,)):
        return value.item()
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


def write_default_corpus(
    folder: str | os.PathLike,
    *,
    size: str = "default",
    seed: int = 0,
    terrain_blocking: float = 1.0,
) -> CorpusMetadata:
    """Run the generator and write the corpus into `folder` (which must be empty or absent)."""
    from dataclasses import asdict

    from .atmosphere import AtmosphereParams, simulate
    from .terrain import make_terrain

    _build_params(size, seed, terrain_blocking)
    preset = SIZES[size]
    start = min(a for a, _ in preset.splits.values())
    end = max(b for _, b in preset.splits.values())
    params = AtmosphereParams(
        height=preset.height, width=preset.width, start=start, end=end,
        output_step_hours=preset.time_step_hours, seed=seed, terrain_blocking=terrain_blocking,
    )  # fmt: skip
    terrain = make_terrain(params)
    static = {v: getattr(terrain, v) for v in (*STATIC_VARIABLES, "region_id")}
    writer = CorpusWriter(
        folder, variables=DYNAMIC_VARIABLES, time_step_hours=preset.time_step_hours,
        split_edges=split_edges_for(preset), halo_hours=preset.halo_hours,
    )  # fmt: skip
    for time_hour, fields in simulate(params):
        writer.add(time_hour, fields)
    provenance = {
        "source": "embedded generator (topoflow.corpus.atmosphere)",
        "size": size, "seed": seed, "terrain_blocking": terrain_blocking,
        "generator_params": _jsonable(asdict(params)), "builder_version": BUILD_VERSION,
        "generator_version": _requested_provenance(size, seed, terrain_blocking)[
            "generator_version"],
    }  # fmt: skip
    return finalize_corpus(
        folder, name=f"topoflow-{size}", writer=writer, static=static, splits=preset.splits,
        regions=terrain.regions, provenance=provenance,
    )  # fmt: skip


def write_corpus(
    folder: str | os.PathLike, *, size: str, seed: int, terrain_blocking: float
) -> CorpusMetadata:
    """Write the embedded corpus of `size`: a default-corpus size or a terrain-worlds preset."""
    from .worlds import WORLD_SIZES, write_worlds_corpus

    write = write_worlds_corpus if size in WORLD_SIZES else write_default_corpus
    return write(folder, size=size, seed=seed, terrain_blocking=terrain_blocking)


def build_default_corpus(
    root: str | os.PathLike | None = None,
    size: str = "default",
    seed: int = 0,
    terrain_blocking: float = 1.0,
    force: bool = False,
) -> Path:
    """The embedded corpus folder, built on first use and cached under `root`.

    `root` defaults to `$TOPOFLOW_CACHE/corpora` or `~/.cache/topoflow/corpora`. The corpus is
    built in a temporary sibling folder and renamed into place, so concurrent or interrupted builds
    never expose a partial corpus; `force=True` rebuilds and replaces a cached one.
    """
    root = Path(root) if root is not None else default_cache_root()
    target = root / corpus_cache_name(size, seed, terrain_blocking)
    found = existing_corpus(target, size=size, seed=seed, terrain_blocking=terrain_blocking,
                            force=force, flag="cached corpus")  # fmt: skip
    if found is not None:
        return found
    return build_atomically(
        target, lambda tmp: write_corpus(tmp, size=size, seed=seed,
                                         terrain_blocking=terrain_blocking),
        force=force,
    )  # fmt: skip


def build_atomically(target: Path, write: Any, *, force: bool) -> Path:
    """Call `write(tmp_folder)` and rename the result to `target`; clean up on any failure."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        write(tmp)
        if target.exists() and force and any(target.iterdir()):
            # Callers check with `existing_corpus` that every file here was written by a build.
            trash = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            os.rename(target, trash / "old")
            shutil.rmtree(trash)
        try:
            os.rename(tmp, target)
        except OSError:
            # Another process finished the same build first; its corpus is byte-identical.
            if not (target / "topoflow_corpus.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def main(argv: Sequence[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(
        prog="python -m topoflow.corpus.build", description="Build the embedded TopoFlow corpus."
    )
    parser.add_argument("--size", choices=_all_sizes(), default="default",
                        help="worlds / worlds-tiny: the terrain-worlds controls (a terrain per "
                             "sample, topoflow/corpus/worlds.py); the others: the embedded default")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--terrain-blocking", type=float, default=1.0)
    parser.add_argument("--out", type=Path, default=None,
                        help="write the corpus exactly here (default: the cache folder)")
    parser.add_argument("--force", action="store_true",
                        help="rebuild even if present (replaces only a folder whose every file a "
                             "corpus build wrote)")
    args = parser.parse_args(argv)
    try:
        path = _build_from_args(args)
    except (CorpusError, ValueError) as err:
        parser.exit(2, f"{parser.prog}: error: {err}\n")
    print(path)
    return path


def _build_from_args(args: argparse.Namespace) -> Path:
    if args.out is None:
        path = build_default_corpus(size=args.size, seed=args.seed,
                                    terrain_blocking=args.terrain_blocking, force=args.force)
    else:
        out = args.out.resolve()
        path = existing_corpus(out, size=args.size, seed=args.seed,
                               terrain_blocking=args.terrain_blocking, force=args.force,
                               flag="--out")  # fmt: skip
        if path is None:
            path = build_atomically(
                out,
                lambda tmp: write_corpus(tmp, size=args.size, seed=args.seed,
                                         terrain_blocking=args.terrain_blocking),
                force=True,
            )  # fmt: skip
    return path


if __name__ == "__main__":
    main()
