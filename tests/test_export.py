"""A training run exported to a Hub-ready folder loads without the package and says what the run
measured (topoflow/export.py)."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard
from safetensors.torch import load_file, save_file

from tests.fixtures_hub import make_tiny_run
from topoflow.export import _NOT_REPRODUCED, export_run, main, regenerate_command
from topoflow.model_card import CARD_METRICS, scores_from_card
from topoflow.safety import (
    MANIFEST_FILENAME,
    ManifestError,
    NonFiniteWeightsError,
    PickleFileError,
    verify_model_folder,
    write_manifest,
)

REPO_ROOT = Path(__file__).resolve().parents[1]

# Runs in a fresh interpreter: drops every sys.path entry and import hook that could reach this
# repository, proves topoflow and the two model modules are unimportable, then loads the folder
# the way a Hub user does and writes the forecasts.
_LOAD_WITHOUT_PACKAGE = textwrap.dedent(
    """
    import sys
    repo = sys.argv[1]
    sys.path = [p for p in sys.path if p not in ("", ".") and not p.startswith(repo)]
    sys.meta_path = [f for f in sys.meta_path if "__editable__" not in type(f).__module__
                     and "__editable__" not in getattr(f, "__module__", "")]
    BLOCKED = {"topoflow", "modeling_topoflow", "configuration_topoflow", "attention_topoflow"}
    class BlockPackage:  # whatever installed the package, these top-level names stay unknown
        @staticmethod
        def find_spec(name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ImportError(f"{name} is blocked in this test")
            return None
    sys.meta_path.insert(0, BlockPackage)
    for name in ("topoflow", "modeling_topoflow", "configuration_topoflow", "attention_topoflow"):
        try:
            __import__(name)
        except ImportError:
            pass
        else:
            raise SystemExit(f"{name} is importable; the test would prove nothing")
    import torch
    from safetensors.torch import load_file, save_file
    from transformers import AutoModel, AutoModelForTimeSeriesPrediction
    folder, batch_path, out_path = sys.argv[2:5]
    batch = load_file(batch_path)
    forecaster = AutoModelForTimeSeriesPrediction.from_pretrained(folder, trust_remote_code=True)
    encoder = AutoModel.from_pretrained(folder, trust_remote_code=True)
    assert not type(forecaster).__module__.startswith("modeling_topoflow"), type(forecaster)
    with torch.no_grad():
        forecast = forecaster.eval()(batch["fields"], batch["lead_time_hours"]).forecast
        hidden = encoder.eval()(batch["fields"], batch["lead_time_hours"]).last_hidden_state
    save_file({"forecast": forecast.contiguous(), "hidden": hidden.contiguous()}, out_path)
    print(type(forecaster).__module__)
    """
)


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    make_tiny_run(tmp_path / "run")
    return tmp_path / "run"


def _export(run_dir: Path, out: Path) -> Path:
    return export_run(run_dir, out, repo_id="acme/topoflow-tiny", revision="v1.0")


def test_export_writes_a_complete_hub_folder(run_dir: Path, tmp_path: Path) -> None:
    folder = _export(run_dir, tmp_path / "export")
    names = {p.name for p in folder.iterdir()}
    assert names == {
        "config.json",
        "model.safetensors",
        "attention_topoflow.py",
        "configuration_topoflow.py",
        "modeling_topoflow.py",
        "README.md",
        "val_loss_curve.png",
        "val_loss.csv",
        "training_report.json",
        MANIFEST_FILENAME,
    }
    verify_model_folder(folder)
    assert json.loads((folder / "config.json").read_text())["auto_map"]
    # no staging folder left behind
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_exported_folder_loads_without_the_package_and_forecasts_the_same(tmp_path: Path) -> None:
    model, batch, _ = make_tiny_run(tmp_path / "run2", seed=3)
    folder = _export(tmp_path / "run2", tmp_path / "export")
    batch_path, out_path = tmp_path / "batch.safetensors", tmp_path / "out.safetensors"
    save_file({k: batch[k] for k in ("fields", "lead_time_hours")}, batch_path)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf_home"))
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            _LOAD_WITHOUT_PACKAGE,
            str(REPO_ROOT),
            str(folder),
            str(batch_path),
            str(out_path),
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().startswith("transformers_modules")
    loaded = load_file(out_path)
    with torch.no_grad():
        forecast = model(batch["fields"], batch["lead_time_hours"]).forecast
        hidden = model.topoflow(batch["fields"], batch["lead_time_hours"]).last_hidden_state
    torch.testing.assert_close(loaded["forecast"], forecast, rtol=0, atol=0)
    torch.testing.assert_close(loaded["hidden"], hidden, rtol=0, atol=0)


def test_exported_card_parses_and_its_metrics_equal_the_report(
    run_dir: Path, tmp_path: Path
) -> None:
    folder = _export(run_dir, tmp_path / "export")
    report = json.loads((run_dir / "report.json").read_text())
    card = ModelCard.load(folder / "README.md")
    expected = {
        (variable, int(lead), metric): row[metric]
        for variable, per_lead in report["metrics"]["variables"].items()
        for lead, row in per_lead.items()
        if lead != "all"
        for metric in CARD_METRICS
        if row.get(metric) is not None
    }
    assert expected, "the fixture run must have scores"
    assert scores_from_card(card) == expected
    assert card.data.library_name == "transformers"
    assert "trust_remote_code=True" in card.text and 'revision="v1.0"' in card.text
    assert "AutoModelForTimeSeriesPrediction.from_pretrained" in card.text
    assert "| parameters |" in card.text


def test_nan_weights_in_the_run_are_refused_and_nothing_is_written(
    run_dir: Path, tmp_path: Path
) -> None:
    weights_path = run_dir / "model" / "model.safetensors"
    weights = load_file(weights_path)
    key = next(k for k in weights if k.endswith("head.0.weight"))
    weights[key][0, 0] = float("nan")
    save_file(weights, weights_path, metadata={"format": "pt"})
    write_manifest(run_dir / "model")  # NaN weights with a matching manifest: still refused
    with pytest.raises(NonFiniteWeightsError, match=key.replace(".", r"\.")):
        _export(run_dir, tmp_path / "export")
    assert not (tmp_path / "export").exists()


def test_pickle_weights_in_the_run_are_refused(run_dir: Path, tmp_path: Path) -> None:
    torch.save({"w": torch.zeros(1)}, run_dir / "model" / "pytorch_model.bin")
    with pytest.raises(PickleFileError, match="pytorch_model.bin"):
        _export(run_dir, tmp_path / "export")


def test_save_refuses_nan_weights_before_writing(tmp_path: Path) -> None:
    from topoflow.safety import save_model_folder

    model, _, _ = make_tiny_run(tmp_path / "run")
    with torch.no_grad():
        model.head[0].bias[1] = float("inf")
    with pytest.raises(NonFiniteWeightsError, match=r"head\.0\.bias"):
        save_model_folder(model, tmp_path / "bad")
    assert not (tmp_path / "bad").exists()


def test_cli_dry_run_writes_only_and_refuses_to_overwrite(run_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "export"
    assert main([str(run_dir), "--out", str(out), "--dry-run"]) == 0
    verify_model_folder(out)
    with pytest.raises(FileExistsError, match="--overwrite"):
        main([str(run_dir), "--out", str(out), "--dry-run"])
    (out / "config.json").write_text("{}")
    with pytest.raises(ManifestError):
        verify_model_folder(out)
    assert main([str(run_dir), "--out", str(out), "--dry-run", "--overwrite"]) == 0
    verify_model_folder(out)
    with pytest.raises(SystemExit):
        main([str(run_dir), "--out", str(tmp_path / "other")])  # a push needs --repo-id


def test_regenerate_command_parses_back_to_the_recorded_arguments() -> None:
    from topoflow.training.args import parse_args

    argv = [
        "--from-scratch",
        "--config",
        "tiny",
        "--corpus-size",
        "tiny",
        "--no-shuffle",
        "--learning-rate",
        "0.00025",
        "--max-steps",
        "40",
        "--elevation-blocks",
        "0,1",
        "--output-dir",
        "/somewhere/else",
        "--report-to",
        "none",
    ]
    recorded = vars(parse_args(argv))
    tokens = shlex.split(regenerate_command(recorded, world_size=2))
    assert tokens[:5] == ["accelerate", "launch", "--num_processes", "2", "train_accelerate.py"]
    assert tokens[-2:] == ["--output-dir", "RUN"]
    again = vars(parse_args(tokens[5:]))
    reproduced = {key for key in recorded if key not in _NOT_REPRODUCED}
    assert {key: again[key] for key in reproduced} == {key: recorded[key] for key in reproduced}
    assert "--learning-rate 0.00025" in " ".join(tokens)


def test_export_of_a_run_with_run_info_shows_recipe_and_command(
    run_dir: Path, tmp_path: Path
) -> None:
    from topoflow.training.args import parse_args

    args = vars(parse_args(["--from-scratch", "--config", "tiny", "--batch-size", "3"]))
    (run_dir / "run_info.json").write_text(json.dumps({"args": args, "world_size": 1}))
    folder = _export(run_dir, tmp_path / "export")
    text = (folder / "README.md").read_text()
    assert "| batch_size | 3 |" in text
    assert "accelerate launch train_accelerate.py --from-scratch --config tiny" in text
    assert "--batch-size 3 --output-dir RUN" in text


def test_export_scores_a_run_without_scores_on_its_corpus(
    synthetic_corpus: Path, tmp_path: Path
) -> None:
    from modeling_topoflow import TopoFlowForForecasting
    from tests.fixtures_hub import write_run_outputs
    from topoflow.corpus.schema import CorpusMetadata
    from topoflow.safety import save_model_folder
    from topoflow.training.model_setup import build_from_scratch_config

    meta = CorpusMetadata.load(synthetic_corpus)
    preset = tmp_path / "tiny_config.json"  # the synthetic corpus's 4 x 6 grid needs patch 2
    preset.write_text(json.dumps({"patch_size": 2, "embed_dim": 16, "depth": 2, "num_heads": 2}))
    config = build_from_scratch_config(
        str(preset), meta, elevation_blocks=[0], elevation_scale=1000.0, alpha_init=0.3
    )
    torch.manual_seed(0)
    save_model_folder(TopoFlowForForecasting(config), tmp_path / "run" / "model")
    report = write_run_outputs(tmp_path / "run")
    del report["metrics"]
    (tmp_path / "run" / "report.json").write_text(json.dumps(report))
    folder = export_run(
        tmp_path / "run", tmp_path / "export", repo_id="acme/x", evaluate_corpus=synthetic_corpus
    )
    written = json.loads((folder / "training_report.json").read_text())
    assert written["metrics_split"] == "validation"
    scores = scores_from_card(ModelCard.load(folder / "README.md"))
    expected = {
        (variable, int(lead), metric): row[metric]
        for variable, per_lead in written["metrics"]["variables"].items()
        for lead, row in per_lead.items()
        if lead != "all"
        for metric in CARD_METRICS
        if row.get(metric) is not None
    }
    assert scores == expected
    assert {(v, h) for v, h, _ in scores} == {
        (v, h) for v in config.target_variables for h in config.lead_times_hours
    }
    # Skill against every reference, in every pollutant x lead cell.
    assert {key for key in scores if key[2].startswith("skill")} == {
        (v, h, f"skill_{ref}")
        for v in config.target_variables
        for h in config.lead_times_hours
        for ref in ("persistence", "climatology", "damped_persistence")
    }
    readme = (folder / "README.md").read_text()
    assert "scored at export" in readme
    test_loss = written["metrics"]["test_loss"]
    assert list(test_loss) == ["model", "persistence", "climatology", "damped_persistence"]
    for name, row in test_loss.items():
        assert f"| {name} | {row['all']:.4g} |" in readme


def test_card_dataset_fields_follow_the_corpus_provenance() -> None:
    from topoflow.export import _dataset_fields

    generated = {
        "corpus": {
            "name": "topoflow-default",
            "provenance": {"source": "embedded generator (topoflow.corpus.atmosphere)"},
        }
    }
    converted = {
        "corpus": {
            "name": "caqra-0.25",
            "provenance": {"source": "CAQRA converter (topoflow.corpus.caqra)"},
        }
    }
    assert _dataset_fields(generated, None, None, None)["synthetic"] is True
    real = _dataset_fields(converted, None, None, None)
    assert real["synthetic"] is False and real["dataset_id"] == "caqra-0.25"
    assert "CAQRA converter" in real["dataset_name"]
    assert _dataset_fields({}, "acme/data", None, None) == {
        "dataset_id": "acme/data",
        "dataset_name": "TopoFlow corpus topoflow-embedded-default (synthetic, embedded generator)",
        "synthetic": True,
    }


def test_export_into_the_package_loads_by_short_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from topoflow import TopoFlowForForecasting, export, hub

    model, batch, _ = make_tiny_run(tmp_path / "run", seed=6)
    packaged = tmp_path / "pretrained"
    monkeypatch.setattr(export, "PACKAGED_MODELS_DIR", packaged)
    monkeypatch.setattr(hub, "PACKAGED_MODELS_DIR", packaged)
    monkeypatch.chdir(tmp_path)
    folder = export_run(tmp_path / "run", packaged / "topoflow-base", repo_id="acme/topoflow-base")
    assert 'from_pretrained("topoflow-base")' in (folder / "README.md").read_text()
    # The package's own classes load it: no copy of the Hub code goes into the package.
    assert not list(folder.glob("*.py"))
    loaded = TopoFlowForForecasting.from_pretrained("topoflow-base")
    with torch.no_grad():
        expected = model(batch["fields"], batch["lead_time_hours"]).forecast
        got = loaded.eval()(batch["fields"], batch["lead_time_hours"]).forecast
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
