"""TopoFlow corpora: schema, Parquet shards, the embedded default corpus and the CAQRA converter."""

from .build import build_default_corpus
from .schema import (
    DEFAULT_INPUT_VARIABLES,
    DYNAMIC_VARIABLES,
    POLLUTANTS,
    STATIC_VARIABLES,
    UNITS,
    CorpusError,
    CorpusMetadata,
)

__all__ = [
    "build_default_corpus",
    "CorpusError",
    "CorpusMetadata",
    "DEFAULT_INPUT_VARIABLES",
    "DYNAMIC_VARIABLES",
    "POLLUTANTS",
    "STATIC_VARIABLES",
    "UNITS",
]
