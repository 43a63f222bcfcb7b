"""The dataset card (README.md) of a corpus, rendered from its real metadata.

The card's YAML `configs:` maps each split to its shard files, which is what lets
`datasets.load_dataset(<corpus>, streaming=True)` read the corpus with no loading script.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from .schema import CorpusMetadata

__all__ = ["TEMPLATE_PATH", "card_data_for", "render_dataset_card", "write_dataset_card"]

TEMPLATE_PATH = Path(__file__).resolve().parents[1] / "hub_cards" / "dataset_card.md"

_LICENSE_TEXT = {
    "apache-2.0": "Apache-2.0, like the TopoFlow code that generates it: the data are synthetic.",
    "other": "Converted from third-party data: the original data's terms of use apply.",
}


# How splits are made unless the provenance says otherwise (the terrain worlds split by world).
_SPLIT_BY_TIME = "Split by time, so no test period is seen in training."


def _size_category(rows: int) -> str:
    for limit, label in ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K")):
        if rows < limit:
            return label
    return "100K<n<1M"


def card_data_for(meta: CorpusMetadata, license: str) -> Any:
    """DatasetCardData with the `configs:` split -> data files mapping of the corpus's shards."""
    from huggingface_hub import DatasetCardData

    data_files = [
        {"split": split, "path": [s.file for s in meta.split_shards(split)]}
        for split in meta.splits
    ]
    return DatasetCardData(
        license=license,
        pretty_name=meta.name,
        task_categories=["time-series-forecasting"],
        tags=["air-quality", "weather", "climate", "topography", "topoflow"],
        size_categories=[_size_category(sum(s.own_rows for s in meta.shards))],
        configs=[{"config_name": "default", "data_files": data_files}],
    )


def _fmt(value: float) -> str:
    return f"{value:.6g}"


def render_dataset_card(
    meta: CorpusMetadata, *, license: str | None = None, repo_or_path: str | None = None
) -> Any:
    """A huggingface_hub.DatasetCard for `meta` from hub_cards/dataset_card.md."""
    from huggingface_hub import DatasetCard

    if not TEMPLATE_PATH.is_file():
        # topoflow/hub_cards/ is package data (setup.py): only a broken installation lacks it.
        raise FileNotFoundError(f"dataset-card template {TEMPLATE_PATH} is missing")
    if license is None:
        synthetic = "embedded generator" in str(meta.provenance.get("source"))
        license = "apache-2.0" if synthetic else "other"
    variable_rows = [
        {"name": v, "kind": "static" if v in meta.static_variables else "dynamic",
         "unit": meta.units[v], "mean": _fmt(meta.normalization[v]["mean"]),
         "std": _fmt(meta.normalization[v]["std"])}
        for v in (*meta.variables, *meta.static_variables)
    ]  # fmt: skip
    split_rows = [
        {"name": split, "start": period["start"], "end": period["end"],
         "shards": len(meta.split_shards(split)),
         "rows": sum(s.own_rows for s in meta.split_shards(split))}
        for split, period in meta.splits.items()
    ]  # fmt: skip
    grid = meta.grid
    return DatasetCard.from_template(
        card_data_for(meta, license),
        template_path=str(TEMPLATE_PATH),
        pretty_name=meta.name,
        description=str(meta.provenance.get("source", "")),
        # The usage snippet must name something load_dataset can open: the Hub repo id when the
        # card is for one, else the corpus folder. Folders are built under temporary names and
        # moved, so a local card names the folder as a placeholder (a bare corpus name would be
        # read as a Hub id that does not exist).
        repo_or_path=repo_or_path or f"path/to/{meta.name}",
        height=meta.height, width=meta.width, resolution=grid["resolution_deg"],
        lat_min=_fmt(grid["lat_min"]), lat_max=_fmt(grid["lat_max"]),
        lon_min=_fmt(grid["lon_min"]), lon_max=_fmt(grid["lon_max"]),
        time_step_hours=meta.time_step_hours, halo_hours=meta.halo_hours,
        variable_rows=variable_rows, split_rows=split_rows,
        regions=sorted(meta.regions.items(), key=lambda kv: kv[0].zfill(12)),
        provenance=json.dumps(meta.provenance, indent=2, sort_keys=True),
        license_text=_LICENSE_TEXT.get(license, license),
        split_note=meta.provenance.get("split_note", _SPLIT_BY_TIME),
    )  # fmt: skip


def write_dataset_card(folder: str | os.PathLike, meta: CorpusMetadata, **kwargs: Any) -> Path:
    path = Path(folder) / "README.md"
    render_dataset_card(meta, **kwargs).save(str(path))
    return path
