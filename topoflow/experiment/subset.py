"""A bounded view of a local corpus: the same files, fewer shards in some splits.

On a small machine a full validation or test split costs more than the fine-tuning itself (the
training script validates the full split at step 0 and at the end). A view keeps every k-th shard
of the named splits, evenly spread over the period so all seasons stay represented, and links
(never copies) the shard files; its metadata and dataset card list only the kept shards, so the
training script, the loader and the evaluation read it like any corpus. Normalization statistics
are the source corpus's (training split), unchanged.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path

__all__ = ["SUBSET_FILE", "make_corpus_view"]

SUBSET_FILE = "topoflow_subset.json"


def _evenly_spaced(count: int, keep: int) -> list[int]:
    """`keep` indices out of range(count), spread evenly (first and last included when keep > 1)."""
    if keep >= count:
        return list(range(count))
    if keep == 1:
        return [count // 2]
    return sorted({round(k * (count - 1) / (keep - 1)) for k in range(keep)})


def make_corpus_view(corpus: str | Path, dest: str | Path, keep_shards: Mapping[str, int]
                     ) -> Path:
    """Write a view of `corpus` at `dest` keeping `keep_shards[split]` shards of those splits.

    Splits not named keep all their shards. An existing view with the same source and selection
    is reused; another one at `dest` is an error rather than silently replaced.
    """
    from topoflow.corpus import CorpusMetadata
    from topoflow.corpus.card import write_dataset_card
    from topoflow.corpus.schema import STATIC_FILE

    corpus, dest = Path(corpus).resolve(), Path(dest)
    meta = CorpusMetadata.load(corpus)
    unknown = sorted(set(keep_shards) - set(meta.splits))
    if unknown:
        raise ValueError(f"corpus view: unknown splits {unknown}; {corpus} has "
                         f"{sorted(meta.splits)}")
    if any(int(n) < 1 for n in keep_shards.values()):
        raise ValueError(f"corpus view: keep at least 1 shard per split, got {dict(keep_shards)}")
    selection = {"source": str(corpus), "keep_shards": {k: int(v) for k, v in keep_shards.items()}}
    marker = dest / SUBSET_FILE
    if marker.is_file():
        if json.loads(marker.read_text()) == selection:
            return dest
        raise FileExistsError(f"{dest} holds another corpus view ({marker}); remove it first")
    if dest.exists() and any(dest.iterdir()):
        raise FileExistsError(f"corpus view destination {dest} exists and is not empty")
    kept = []
    for split in meta.splits:
        shards = meta.split_shards(split)
        if split in keep_shards:
            shards = [shards[i] for i in _evenly_spaced(len(shards), int(keep_shards[split]))]
        kept += shards
    (dest / "data").mkdir(parents=True, exist_ok=True)
    for shard in kept:
        os.symlink(corpus / shard.file, dest / shard.file)
    os.symlink(corpus / STATIC_FILE, dest / STATIC_FILE)
    provenance = {**meta.provenance, "view_of": str(corpus), "view_keep_shards": dict(keep_shards)}
    view = replace(meta, shards=kept, provenance=provenance, source=str(dest))
    view.save(dest)
    write_dataset_card(dest, view)
    marker.write_text(json.dumps(selection, indent=2) + "\n")
    return dest
