"""The `topoflow` command dispatches to each tool's own main()."""

from __future__ import annotations

import json
from pathlib import Path

from topoflow.cli import SUBCOMMANDS, main


def test_every_subcommand_module_has_a_main() -> None:
    import importlib

    for name, (module_name, _) in SUBCOMMANDS.items():
        module = importlib.import_module(module_name)
        assert callable(getattr(module, "main", None)), f"{name}: {module_name}.main missing"


def test_unknown_command_fails_and_lists_commands(capsys) -> None:
    assert main(["no-such-command"]) == 2
    err = capsys.readouterr().err
    assert "no-such-command" in err and "build-corpus" in err


def test_build_corpus_through_the_cli(tmp_path: Path) -> None:
    out = tmp_path / "corpus"
    assert main(["build-corpus", "--size", "tiny", "--out", str(out)]) == 0
    meta = json.loads((out / "topoflow_corpus.json").read_text())
    assert meta["shards"], "the CLI build wrote no shard"
