"""The corpus schema: variable lists, units, and the `topoflow_corpus.json` metadata.

Both corpus sources (the embedded generator and the CAQRA converter) write this schema, and the
streaming loader reads only this schema, so a corpus is self-describing. docs/CONTRACTS.md section 2
is the normative description; this module enforces it.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "SCHEMA_VERSION",
    "METADATA_FILE",
    "STATIC_FILE",
    "DYNAMIC_VARIABLES",
    "POLLUTANTS",
    "STATIC_VARIABLES",
    "STATIC_INT_VARIABLES",
    "DEFAULT_INPUT_VARIABLES",
    "UNITS",
    "SENTINELS",
    "CorpusError",
    "CorpusMetadata",
    "ShardInfo",
    "resolve_corpus_file",
]

SCHEMA_VERSION = 1
METADATA_FILE = "topoflow_corpus.json"
STATIC_FILE = "static.safetensors"

POLLUTANTS: tuple[str, ...] = ("pm25", "pm10", "so2", "no2", "co", "o3")
DYNAMIC_VARIABLES: tuple[str, ...] = ("u", "v", "temp", "rh", "psfc", *POLLUTANTS)
# Static float32 fields usable as model inputs (broadcast over time) ...
STATIC_VARIABLES: tuple[str, ...] = ("elevation", "population", "lat2d", "lon2d", "land_fraction")
# ... and static integer fields that are masks, never inputs.
STATIC_INT_VARIABLES: tuple[str, ...] = ("region_id",)
# The paper's 15 inputs, in the paper's order.
DEFAULT_INPUT_VARIABLES: tuple[str, ...] = (
    "u", "v", "temp", "rh", "psfc", "pm10", "so2", "no2", "co", "o3",
    "lat2d", "lon2d", "pm25", "elevation", "population",
)  # fmt: skip

# Canonical units of every corpus (CAQRA's: CO in mg/m3, the other pollutants in ug/m3). The
# embedded generator writes these (build.py checks), the CAQRA converter converts into them.
UNITS: dict[str, str] = {
    "u": "m/s",
    "v": "m/s",
    "temp": "K",
    "rh": "%",
    "psfc": "hPa",
    "pm25": "ug/m3",
    "pm10": "ug/m3",
    "so2": "ug/m3",
    "no2": "ug/m3",
    "co": "mg/m3",
    "o3": "ug/m3",
    "elevation": "m",
    "population": "people/km2",
    "lat2d": "degrees_north",
    "lon2d": "degrees_east",
    "land_fraction": "1",
    "region_id": "1",
}


# Fill values that reanalysis files use for "missing"; a corpus holds NaN instead.
SENTINELS: tuple[float, ...] = (-999.0, -99.0, -9999.0)


class CorpusError(Exception):
    """A corpus file is missing, corrupt or inconsistent with its metadata."""


@dataclass
class ShardInfo:
    """One Parquet shard: a contiguous time range of one split plus its halo rows."""

    file: str  # relative to the corpus root, e.g. "data/train-00000-of-00024.parquet"
    split: str
    rows: int  # own rows + halo rows
    own_rows: int  # rows inside the shard's own time range (is_halo == False)
    first_hour: int  # time_hour of the first row
    last_hour: int  # time_hour of the last row (a halo row when the shard has a halo)
    sha256: str


_REQUIRED_KEYS = (
    "schema_version", "name", "variables", "static_variables", "units", "grid", "time_step_hours",
    "splits", "normalization", "regions", "shards", "provenance", "static_sha256",
)  # fmt: skip
_GRID_KEYS = ("height", "width", "lat_min", "lat_max", "lon_min", "lon_max", "resolution_deg")


@dataclass
class CorpusMetadata:
    """Contents of `topoflow_corpus.json` (docs/CONTRACTS.md section 2)."""

    name: str
    variables: list[str]
    static_variables: list[str]
    units: dict[str, str]
    grid: dict[str, float]
    time_step_hours: int
    splits: dict[str, dict[str, str]]
    normalization: dict[str, dict[str, float]]
    regions: dict[str, str]
    shards: list[ShardInfo]
    provenance: dict[str, Any]
    # Hours of halo rows appended after each shard's own range (never across a split boundary):
    # the longest lead time for which no sample is lost at a shard edge.
    halo_hours: int = 0
    # sha256 of static.safetensors: safetensors stores no checksum, and a flipped byte in the
    # elevation or region mask would otherwise train silently.
    static_sha256: str = ""
    schema_version: int = SCHEMA_VERSION
    # Set by `load`, not saved: where the metadata came from (folder path or Hub repo id).
    source: str = field(default="", compare=False)

    @property
    def height(self) -> int:
        return int(self.grid["height"])

    @property
    def width(self) -> int:
        return int(self.grid["width"])

    def split_shards(self, split: str) -> list[ShardInfo]:
        """The shards of `split` in time order; a KeyError-like CorpusError names unknown splits."""
        if split not in self.splits:
            raise CorpusError(
                f"{self.source or METADATA_FILE}: unknown split {split!r}; "
                f"the corpus has {sorted(self.splits)}"
            )
        return sorted(
            (s for s in self.shards if s.split == split), key=lambda s: s.first_hour
        )

    def fingerprint(self) -> str:
        """sha256 of the metadata's content. It lists the sha256 of every shard and of the static
        fields, so equal fingerprints mean equal corpus bytes, wherever the folder lies."""
        text = json.dumps(self.to_dict(), sort_keys=True)
        return hashlib.sha256(text.encode("utf-8")).hexdigest()

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("source")
        return data

    def save(self, folder: str | os.PathLike) -> Path:
        """Write `topoflow_corpus.json` into `folder` (sorted keys: equal metadata, equal bytes)."""
        self.validate()
        path = Path(folder) / METADATA_FILE
        path.write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")
        return path

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = METADATA_FILE) -> CorpusMetadata:
        if not isinstance(data, dict):
            raise CorpusError(f"{source}: expected a JSON object, got {type(data).__name__}")
        missing = [k for k in _REQUIRED_KEYS if k not in data]
        if missing == ["static_sha256"]:
            raise CorpusError(
                f"{source}: missing key 'static_sha256' (written by a TopoFlow before static "
                f"fields were checksummed); {STATIC_FILE} cannot be verified: rebuild the corpus"
            )
        if missing:
            raise CorpusError(f"{source}: missing key(s) {missing}")
        if data["schema_version"] != SCHEMA_VERSION:
            raise CorpusError(
                f"{source}: key 'schema_version' is {data['schema_version']!r}, this TopoFlow "
                f"reads version {SCHEMA_VERSION}"
            )
        known = {f for f in cls.__dataclass_fields__ if f != "source"}
        unknown = sorted(set(data) - known)
        if unknown:
            raise CorpusError(f"{source}: unknown key(s) {unknown}")
        try:
            shards = [ShardInfo(**s) for s in data["shards"]]
        except TypeError as e:
            raise CorpusError(f"{source}: key 'shards' has a malformed entry: {e}") from e
        meta = cls(**{**data, "shards": shards}, source=source)
        meta.validate()
        return meta

    @classmethod
    def load(
        cls, path_or_repo: str | os.PathLike, *, revision: str | None = None
    ) -> CorpusMetadata:
        """Load from a corpus folder, a path to `topoflow_corpus.json`, or a Hub dataset repo id."""
        path = resolve_corpus_file(path_or_repo, METADATA_FILE, revision=revision)
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CorpusError(f"{path}: cannot read corpus metadata: {e}") from e
        source = str(path_or_repo)
        meta = cls.from_dict(data, source=str(path))
        meta.source = source
        return meta

    def validate(self) -> None:
        """Check internal consistency; every error names the metadata file and the key at fault."""
        src = self.source or METADATA_FILE
        if not self.variables:
            raise CorpusError(f"{src}: key 'variables' is empty")
        named_lists = (("variables", self.variables), ("static_variables", self.static_variables))
        for key, names in named_lists:
            if len(set(names)) != len(names):
                raise CorpusError(f"{src}: key {key!r} has duplicates: {names}")
            missing_units = [v for v in names if v not in self.units]
            if missing_units:
                raise CorpusError(f"{src}: key 'units' lacks {missing_units}")
            missing_stats = [v for v in names if v not in self.normalization]
            if missing_stats:
                raise CorpusError(f"{src}: key 'normalization' lacks {missing_stats}")
        for var, stats in self.normalization.items():
            mean, std = stats.get("mean"), stats.get("std")
            if not (isinstance(mean, (int, float)) and math.isfinite(mean)):
                raise CorpusError(f"{src}: key 'normalization.{var}.mean' is {mean!r}")
            if not (isinstance(std, (int, float)) and math.isfinite(std) and std > 0):
                raise CorpusError(
                    f"{src}: key 'normalization.{var}.std' must be finite and > 0, got {std!r}"
                )
        missing_grid = [k for k in _GRID_KEYS if k not in self.grid]
        if missing_grid:
            raise CorpusError(f"{src}: key 'grid' lacks {missing_grid}")
        if self.height <= 0 or self.width <= 0:
            raise CorpusError(f"{src}: key 'grid' has a non-positive height or width")
        if not (isinstance(self.time_step_hours, int) and self.time_step_hours > 0):
            raise CorpusError(f"{src}: key 'time_step_hours' must be a positive int")
        if not (isinstance(self.static_sha256, str) and len(self.static_sha256) == 64):
            raise CorpusError(
                f"{src}: key 'static_sha256' must be the 64-hex sha256 of {STATIC_FILE}, got "
                f"{self.static_sha256!r}"
            )
        if self.halo_hours < 0 or self.halo_hours % self.time_step_hours:
            raise CorpusError(
                f"{src}: key 'halo_hours' ({self.halo_hours}) must be a non-negative multiple "
                f"of time_step_hours ({self.time_step_hours})"
            )
        self._validate_shards(src)

    def _validate_shards(self, src: str) -> None:
        files = [s.file for s in self.shards]
        if len(set(files)) != len(files):
            raise CorpusError(f"{src}: key 'shards' lists a file twice")
        for s in self.shards:
            if s.split not in self.splits:
                raise CorpusError(f"{src}: shard {s.file} has unknown split {s.split!r}")
            if not (0 < s.own_rows <= s.rows):
                raise CorpusError(f"{src}: shard {s.file} has rows={s.rows}, own_rows={s.own_rows}")
            expected_last = s.first_hour + (s.rows - 1) * self.time_step_hours
            if s.last_hour != expected_last:
                raise CorpusError(
                    f"{src}: shard {s.file} has last_hour={s.last_hour}, expected {expected_last} "
                    f"from first_hour, rows and time_step_hours"
                )


def resolve_corpus_file(
    path_or_repo: str | os.PathLike, filename: str, *, revision: str | None = None
) -> Path:
    """Local path of `filename` in a corpus folder, or downloaded from a Hub dataset repo.

    A string that is an existing path wins; otherwise it is read as a Hub repo id (`org/name`).
    """
    path = Path(path_or_repo)
    if path.is_file() and path.name == filename:
        return path
    if path.is_dir():
        target = path / filename
        if not target.is_file():
            raise CorpusError(f"{target}: file not found in corpus folder {path}")
        return target
    repo_id = str(path_or_repo)
    if repo_id.count("/") != 1 or repo_id.startswith((".", "/")):
        raise CorpusError(f"{repo_id}: neither an existing corpus folder nor a Hub id org/name")
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(
            hf_hub_download(repo_id, filename, repo_type="dataset", revision=revision)
        )
    except (HfHubHTTPError, LocalEntryNotFoundError, OSError) as e:
        raise CorpusError(f"{repo_id}: cannot fetch {filename} from the Hub: {e}") from e
