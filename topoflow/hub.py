"""Model name resolution: short names to packaged folders, `org/name` to the Hub, paths win.

`TopoFlowPreTrainedModel.from_pretrained(name)` asks the resolvers registered with
`TopoFlowPreTrainedModel.register_name_resolver` before anything else; `register_hub_resolver()`
(called once by `import topoflow`) registers `resolve_model_name` there. The rules, in order:

1. an existing local path is the user's own folder: it wins over any short name; pickle files
   and NaN/Inf weights in it are refused, and its SHA256SUMS manifest, if any, is checked;
2. a known short name (`topoflow-base`, or any folder shipped under `topoflow/pretrained/`)
   resolves to the packaged folder, whose manifest and weights are verified, so it loads offline;
3. `org/name` (with any `revision=`) is left to transformers, which downloads from the Hub or
   raises the Hub's own error (offline mode included);
4. anything else fails with `UnknownModelNameError` (an `OSError`, as transformers raises for a
   name that is neither a folder nor a Hub id) listing the known names.

transformers' own Auto classes (`AutoConfig`, `AutoModel`, `AutoModelForTimeSeriesPrediction`)
read the config through `PretrainedConfig.get_config_dict`, which knows only paths and Hub ids and
has no hook; `register_hub_resolver()` wraps it so that exactly the packaged short names (rule 2)
resolve there too. Every other name reaches transformers unchanged.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from topoflow.safety import refuse_pickle_files, verify_model_folder

__all__ = [
    "PACKAGED_MODELS_DIR",
    "KNOWN_MODELS",
    "UnknownModelNameError",
    "is_hub_repo_id",
    "known_model_names",
    "packaged_model_folder",
    "resolve_model_name",
    "resolve_pretrained_path",
    "register_hub_resolver",
]

PACKAGED_MODELS_DIR = Path(__file__).resolve().parent / "pretrained"

# Names promised by the docs even when this installation lacks the folder (a source checkout
# before the coordinator shipped it): resolving one then says how to regenerate it instead of
# claiming the name does not exist.
KNOWN_MODELS: dict[str, str] = {
    "topoflow-base": (
        "baseline without elevation bias, trained from scratch on the embedded default corpus; "
        "regenerate with `accelerate launch train_accelerate.py --from-scratch --config CONFIG "
        "--output-dir RUN`, then `python -m topoflow.export RUN --out "
        "topoflow/pretrained/topoflow-base --repo-id ORG/topoflow-base --evaluate --dry-run`"
    ),
}

# A Hub repo id: exactly one slash, each part starting with a letter, digit or underscore (so
# "./x" or "../x" are paths, not ids), as huggingface_hub.utils.validate_repo_id accepts.
_HUB_REPO_ID = re.compile(r"[A-Za-z0-9_][\w.-]{0,95}/[A-Za-z0-9_][\w.-]{0,95}")


class UnknownModelNameError(OSError, ValueError):
    """A model name that is neither a local path, a packaged short name nor an `org/name` id.

    An OSError, as transformers raises for a name that is neither a folder nor a Hub id; still a
    ValueError for callers written against earlier releases."""


def is_hub_repo_id(text: str) -> bool:
    """True for a Hub repo id of the form org/name (a bare name is not one here)."""
    return bool(_HUB_REPO_ID.fullmatch(text))


def known_model_names() -> list[str]:
    """Short names this installation resolves: the documented ones plus shipped folders."""
    shipped = set()
    if PACKAGED_MODELS_DIR.is_dir():
        shipped = {p.name for p in PACKAGED_MODELS_DIR.iterdir() if (p / "config.json").is_file()}
    return sorted(shipped | set(KNOWN_MODELS))


def packaged_model_folder(name: str) -> Path:
    """The verified packaged folder of short name `name` (manifest, no pickles, finite weights)."""
    if name not in known_model_names():
        raise UnknownModelNameError(_unknown_name_message(name))
    folder = PACKAGED_MODELS_DIR / name
    if not (folder / "config.json").is_file():
        how = KNOWN_MODELS.get(name, "")
        raise FileNotFoundError(
            f"'{name}' is a known TopoFlow model but this installation does not ship it: "
            f"{folder / 'config.json'} is missing. {how}"
        )
    return verify_model_folder(folder, require_manifest=True)


def resolve_model_name(name: object) -> str | None:
    """The resolver registered with TopoFlowPreTrainedModel: a local folder to load, or None to
    let transformers handle `name` itself (a local path, or a Hub id)."""
    if not isinstance(name, str | os.PathLike):
        return None
    text = os.fspath(name)
    if os.path.exists(text):
        _check_local_folder(text)
        return None
    if text in known_model_names():
        return str(packaged_model_folder(text))
    if is_hub_repo_id(text):
        return None
    if "/" in text or os.sep in text or text.startswith(("~", ".")):
        raise FileNotFoundError(
            f"model folder {text} does not exist (and it is not a Hub id of the form org/name)"
        )
    raise UnknownModelNameError(_unknown_name_message(text))


def _check_local_folder(path: str) -> None:
    """Refuse pickle files and NaN/Inf weights in a user's folder, and check its SHA256SUMS when
    it has one (folders saved by plain `save_pretrained` have none and still load)."""
    if not os.path.isdir(path):
        return
    refuse_pickle_files(path)
    if any(name.endswith(".safetensors") for name in os.listdir(path)):
        verify_model_folder(path, require_manifest=False)


def resolve_pretrained_path(name: str | os.PathLike) -> str:
    """What `from_pretrained` should receive for `name`: the packaged folder of a short name, or
    `name` unchanged. For code that loads configs or models without the model-class hook (the
    Auto classes, the training script's --model argument)."""
    resolved = resolve_model_name(name)
    return os.fspath(name) if resolved is None else resolved


def _unknown_name_message(name: str) -> str:
    names = ", ".join(known_model_names())
    return (
        f"unknown TopoFlow model name '{name}'. Known names: {names}. Otherwise pass a local "
        "model folder, or a Hub repo id of the form org/name (with revision=... to pin it)."
    )


_registered = False


def register_hub_resolver() -> None:
    """Register `resolve_model_name` with TopoFlowPreTrainedModel (once per process)."""
    global _registered
    if _registered:
        return
    from modeling_topoflow import TopoFlowPreTrainedModel

    TopoFlowPreTrainedModel.register_name_resolver(resolve_model_name)
    _resolve_short_names_in_config_loading()
    _registered = True


def _packaged_folder_or_unchanged(name: object) -> object:
    """The packaged folder when `name` is a known short name and not a local path, else `name`."""
    if isinstance(name, str) and not os.path.exists(name) and name in known_model_names():
        return str(packaged_model_folder(name))
    return name


def _resolve_short_names_in_config_loading() -> None:
    """Make `PretrainedConfig.get_config_dict` (hence every Auto class) resolve the packaged short
    names; any other name is passed on untouched, so other models load exactly as before."""
    from transformers import PretrainedConfig

    original = PretrainedConfig.__dict__["get_config_dict"].__func__

    def get_config_dict(cls, pretrained_model_name_or_path, **kwargs):  # noqa: ANN001, ANN202
        resolved = _packaged_folder_or_unchanged(pretrained_model_name_or_path)
        return original(cls, resolved, **kwargs)

    get_config_dict.__doc__ = original.__doc__
    get_config_dict.__wrapped__ = original
    PretrainedConfig.get_config_dict = classmethod(get_config_dict)
