"""Parquet shards and the static safetensors file: writing, and validation when reading.

A shard holds one contiguous time range of one split: one row per time stamp with `time_hour`
(int64), `is_halo` (bool) and one fixed-length float32 list column per dynamic variable (the H*W
field row-major, NaN = missing). Shards are written with Parquet page checksums and recorded with
their sha256 in the metadata; every read checks both, so a damaged shard fails loudly, naming the
file, instead of being skipped or silently yielding garbage.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .schema import (
    POLLUTANTS,
    SENTINELS,
    STATIC_INT_VARIABLES,
    UNITS,
    CorpusError,
    CorpusMetadata,
    ShardInfo,
)

__all__ = [
    "shard_schema",
    "shard_file_name",
    "write_shard",
    "file_sha256",
    "validate_shard_file",
    "check_shard_schema",
    "table_to_arrays",
    "check_field_values",
    "check_rows_match",
    "read_shard",
    "write_static",
    "read_static",
]

# Parquet writer settings are part of the byte-identical-build promise: change them only together
# with the schema version.
_WRITE_OPTIONS = {
    "compression": "zstd",
    "compression_level": 1,
    "use_dictionary": False,  # float fields do not repeat; dictionaries only cost time
    "write_page_checksum": True,
    "write_statistics": ["time_hour"],
}


def shard_schema(variables: Sequence[str], n_cells: int) -> pa.Schema:
    """The Arrow schema every shard of a corpus with these variables and H*W cells has."""
    return pa.schema(
        [
            pa.field("time_hour", pa.int64(), nullable=False),
            pa.field("is_halo", pa.bool_(), nullable=False),
        ]
        + [pa.field(v, pa.list_(pa.float32(), n_cells), nullable=False) for v in variables]
    )


def shard_file_name(split: str, index: int, count: int) -> str:
    return f"data/{split}-{index:05d}-of-{count:05d}.parquet"


def write_shard(
    path: str | os.PathLike,
    time_hour: np.ndarray,
    is_halo: np.ndarray,
    fields: Mapping[str, np.ndarray],
    variables: Sequence[str],
) -> str:
    """Write one shard and return its sha256. `fields[v]` is float32 (rows, H, W)."""
    rows = len(time_hour)
    if rows == 0:
        raise ValueError(f"{path}: refusing to write a shard with no rows")
    shape = fields[variables[0]].shape
    columns = [pa.array(np.asarray(time_hour, np.int64)), pa.array(np.asarray(is_halo, bool))]
    for v in variables:
        field = np.ascontiguousarray(fields[v], dtype=np.float32)
        if field.shape != shape or field.shape[0] != rows:
            raise ValueError(f"{path}: field {v!r} has shape {field.shape}, expected {shape}")
        flat = pa.array(field.reshape(-1), type=pa.float32())
        columns.append(pa.FixedSizeListArray.from_arrays(flat, shape[1] * shape[2]))
    table = pa.Table.from_arrays(columns, schema=shard_schema(variables, shape[1] * shape[2]))
    pq.write_table(table, str(path), row_group_size=rows, **_WRITE_OPTIONS)
    return file_sha256(path)


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def check_shard_schema(schema: pa.Schema, meta: CorpusMetadata, source: str) -> None:
    """Raise a CorpusError naming `source` and the first column whose name or type drifted."""
    expected = shard_schema(meta.variables, meta.height * meta.width)
    for f in expected:
        idx = schema.get_field_index(f.name)
        if idx < 0:
            raise CorpusError(f"{source}: column {f.name!r} is missing (schema drift)")
        if not schema.field(idx).type.equals(f.type):
            raise CorpusError(
                f"{source}: column {f.name!r} has type {schema.field(idx).type}, expected {f.type} "
                f"(schema drift)"
            )
    extra = [n for n in schema.names if expected.get_field_index(n) < 0]
    if extra:
        raise CorpusError(f"{source}: unexpected column {extra[0]!r} (schema drift)")


def validate_shard_file(
    root: str | os.PathLike, shard: ShardInfo, meta: CorpusMetadata, *, check_sha256: bool = True
) -> Path:
    """Check a local shard before reading: present, non-empty, sha256, Parquet footer, schema."""
    path = Path(root) / shard.file
    if not path.is_file():
        raise CorpusError(f"{path}: shard listed in {meta.source or 'metadata'} is missing")
    if path.stat().st_size == 0:
        raise CorpusError(f"{path}: shard file is empty")
    if check_sha256:
        actual = file_sha256(path)
        if actual != shard.sha256:
            raise CorpusError(
                f"{path}: sha256 {actual[:16]}... does not match the metadata's "
                f"{shard.sha256[:16]}... (truncated, modified or bit-flipped shard)"
            )
    try:
        parquet = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise CorpusError(f"{path}: not a readable Parquet file: {e}") from e
    check_shard_schema(parquet.schema_arrow, meta, str(path))
    if parquet.metadata.num_rows != shard.rows:
        raise CorpusError(
            f"{path}: has {parquet.metadata.num_rows} rows, metadata says {shard.rows}"
        )
    return path


def table_to_arrays(
    table: pa.Table, meta: CorpusMetadata, variables: Sequence[str], source: str
) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """(time_hour (T,), is_halo (T,), {var: float32 (T, H, W)}) from a shard table, zero-copy."""
    check_shard_schema(table.schema, meta, source)
    rows, shape = table.num_rows, (meta.height, meta.width)
    fields = {}
    for v in variables:
        column = table.column(v).combine_chunks()
        if column.null_count:
            raise CorpusError(f"{source}: column {v!r} has {column.null_count} null rows")
        values = column.flatten().to_numpy(zero_copy_only=False)
        fields[v] = values.reshape(rows, *shape)
    time_hour = table.column("time_hour").to_numpy().astype(np.int64, copy=False)
    is_halo = table.column("is_halo").to_numpy(zero_copy_only=False).astype(bool, copy=False)
    check_field_values(fields, meta, source)
    return time_hour, is_halo, fields


def check_field_values(
    fields: Mapping[str, np.ndarray], meta: CorpusMetadata, source: str
) -> None:
    """Raise a CorpusError naming `source` and the variable for values no corpus may hold.

    NaN is a corpus's only missing-value marker (the CAQRA converter maps fill values to it). An
    Inf would pass the loader's NaN -> 0 and turn the loss into NaN; a fill value such as -999
    would be learned as a real concentration. Both are refused rather than guessed at.
    """
    for name, values in fields.items():
        flat = values.reshape(-1)
        low, high = float(np.fmin.reduce(flat)), float(np.fmax.reduce(flat))  # NaN-ignoring
        if np.isinf(low) or np.isinf(high):
            count = int(np.isinf(flat).sum())
            raise CorpusError(
                f"{source}: variable {name!r} holds {count} infinite value(s); a corpus marks "
                f"missing values with NaN only"
            )
        if not low < 0:  # also all-NaN
            continue
        found = sorted({x for x in SENTINELS if low <= x and (flat == x).any()})
        if found:
            raise CorpusError(
                f"{source}: variable {name!r} holds fill value(s) {found}; a corpus marks missing "
                f"values with NaN only (topoflow convert-caqra maps fill values to NaN)"
            )
        if name in POLLUTANTS and meta.units.get(name) == UNITS[name] and low < 0:
            count = int((flat < 0).sum())
            raise CorpusError(
                f"{source}: variable {name!r} holds {count} negative concentration(s) (min "
                f"{low:g} {UNITS[name]}); a corpus marks missing values with NaN only"
            )


def check_rows_match(time_hour: np.ndarray, is_halo: np.ndarray, shard: ShardInfo, source: str,
                     time_step_hours: int) -> None:
    """The rows read must be exactly the time range the metadata promises for this shard."""
    expected = shard.first_hour + time_step_hours * np.arange(shard.rows, dtype=np.int64)
    if len(time_hour) != shard.rows or not np.array_equal(time_hour, expected):
        raise CorpusError(
            f"{source}: time_hour column does not match the metadata's {shard.rows} rows from "
            f"hour {shard.first_hour} every {time_step_hours} h"
        )
    if int((~is_halo).sum()) != shard.own_rows or is_halo[: shard.own_rows].any():
        raise CorpusError(f"{source}: is_halo column does not match own_rows={shard.own_rows}")


def read_shard(
    root: str | os.PathLike, shard: ShardInfo, meta: CorpusMetadata, *, check_sha256: bool = True
) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """Validate and read one local shard, verifying Parquet page checksums."""
    path = validate_shard_file(root, shard, meta, check_sha256=check_sha256)
    try:
        table = pq.read_table(path, page_checksum_verification=True)
    except (pa.ArrowException, OSError) as e:
        raise CorpusError(f"{path}: cannot read shard (corrupt page?): {e}") from e
    time_hour, is_halo, fields = table_to_arrays(table, meta, meta.variables, str(path))
    check_rows_match(time_hour, is_halo, shard, str(path), meta.time_step_hours)
    return time_hour, is_halo, fields


def write_static(path: str | os.PathLike, static: Mapping[str, np.ndarray]) -> str:
    """Write static fields (float32, region_id int32) to safetensors; return the sha256."""
    from safetensors.numpy import save_file

    arrays = {}
    for name, value in static.items():
        dtype = np.int32 if name in STATIC_INT_VARIABLES else np.float32
        arrays[name] = np.ascontiguousarray(value, dtype=dtype)
    save_file(arrays, str(path))
    return file_sha256(path)


def read_static(path: str | os.PathLike, meta: CorpusMetadata) -> dict[str, np.ndarray]:
    """Read static fields after checking their sha256 against the metadata, and check every
    expected one is there with the grid's shape."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    if not Path(path).is_file():
        raise CorpusError(f"{path}: static fields file is missing")
    actual = file_sha256(path)
    if actual != meta.static_sha256:
        raise CorpusError(
            f"{path}: sha256 {actual[:16]}... does not match the metadata's static_sha256 "
            f"{meta.static_sha256[:16]}... (modified or bit-flipped static fields)"
        )
    try:
        static = load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise CorpusError(f"{path}: cannot read static fields: {e}") from e
    for name in (*meta.static_variables, *STATIC_INT_VARIABLES):
        if name not in static:
            raise CorpusError(f"{path}: static field {name!r} is missing")
        if static[name].shape != (meta.height, meta.width):
            raise CorpusError(
                f"{path}: static field {name!r} has shape {static[name].shape}, "
                f"expected {(meta.height, meta.width)}"
            )
    return static
