"""TopoFlow corpora: schema, Parquet shards, the embedded default corpus and the CAQRA converter."""

from typing import Any

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


def __getattr__(name: str) -> Any:
    # Imported on first use so `python -m topoflow.corpus.build` does not import build.py twice.
    if name == "build_default_corpus":
        from .build import build_default_corpus

        return build_default_corpus
    raise AttributeError(f"module 'topoflow.corpus' has no attribute {name!r}")
