"""The `topoflow` command: one entry point for the library's tools.

Each subcommand is a module with its own `main(argv)`; this file only dispatches, so
`topoflow corpus build ...` and `python -m topoflow.corpus.build ...` are the same program.
Training is not here: it is `accelerate launch train_accelerate.py`, as in every Accelerate project.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

__all__ = ["SUBCOMMANDS", "main"]

# subcommand -> (module with main(argv), one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "build-corpus": ("topoflow.corpus.build", "build the embedded default corpus (cached)"),
    "convert-caqra": ("topoflow.corpus.caqra", "convert CAQRA-style Zarr/NetCDF into a corpus"),
    "convert-climax": ("topoflow.convert_climax", "convert a ClimaX or TopoFlow-paper checkpoint"),
    "experiment": ("topoflow.experiment", "controlled experiment: does the elevation bias help?"),
    "export": ("topoflow.export", "turn a training run into a Hub model repo, and push it"),
    "references": ("topoflow.score_references", "scores of the reference forecasts on a split"),
}


def _usage() -> str:
    lines = ["usage: topoflow <command> [options]", "", "commands:"]
    lines += [f"  {name:<16}{help_text}" for name, (_, help_text) in SUBCOMMANDS.items()]
    lines += ["", "Run `topoflow <command> --help` for a command's options."]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(_usage())
        return 0
    command, rest = args[0], args[1:]
    if command not in SUBCOMMANDS:
        print(f"topoflow: unknown command {command!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(SUBCOMMANDS[command][0])
    result = module.main(rest)
    # Some mains return a path (what they built) rather than an exit code.
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())
