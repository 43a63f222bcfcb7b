"""Controlled experiments: does the elevation bias help, against an honest control?

`python -m topoflow.experiment --help`; docs/experiment.md explains the design and the report.
"""

from .arms import CONTROL, KNOWN_ARMS, ArmSpec, UnknownArmError, parse_arm, parse_arms
from .cli import main, run_experiment
from .evaluate import build_climatology, evaluate_forecasters, evaluate_models, load_evaluation
from .runner import Budget, RunRecord, adopt_run, check_runs, train_arms

__all__ = [
    "CONTROL",
    "KNOWN_ARMS",
    "ArmSpec",
    "Budget",
    "RunRecord",
    "UnknownArmError",
    "adopt_run",
    "build_climatology",
    "check_runs",
    "evaluate_forecasters",
    "evaluate_models",
    "load_evaluation",
    "main",
    "parse_arm",
    "parse_arms",
    "run_experiment",
    "train_arms",
]
