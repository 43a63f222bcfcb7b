"""`build-corpus --out DIR` and the cache: never delete what a build did not write, and return an
existing corpus only when its provenance and bytes are the ones asked for."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from topoflow.corpus import CorpusError, CorpusMetadata
from topoflow.corpus.build import build_default_corpus, corpus_cache_name, main


def _fail(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    return capsys.readouterr().err


def _flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.fixture
def copied_corpus(tiny_corpus: Path, tmp_path: Path) -> Path:
    """A copy of the tiny corpus (size tiny, seed 0, terrain_blocking 1) the test may damage."""
    folder = tmp_path / "corpus"
    shutil.copytree(tiny_corpus, folder)
    return folder


def test_out_holding_user_files_is_refused_and_left_alone(tmp_path, capsys):
    folder = tmp_path / "d"
    folder.mkdir()
    (folder / "thesis.tex").write_text("years of work")
    err = _fail(["--size", "tiny", "--out", str(folder)], capsys)
    assert "--out" in err and "holds no TopoFlow corpus" in err
    assert (folder / "thesis.tex").read_text() == "years of work"
    assert sorted(p.name for p in folder.iterdir()) == ["thesis.tex"]


def test_out_that_is_a_file_is_refused_and_left_alone(tmp_path, capsys):
    target = tmp_path / "notes.txt"
    target.write_text("mine")
    err = _fail(["--size", "tiny", "--out", str(target)], capsys)
    assert "is a file, not a folder" in err
    assert target.read_text() == "mine"


def test_out_with_a_corpus_of_other_settings_is_refused_naming_them(copied_corpus, capsys):
    before = (copied_corpus / "topoflow_corpus.json").read_bytes()
    err = _fail(["--size", "tiny", "--seed", "7", "--terrain-blocking", "0",
                 "--out", str(copied_corpus)], capsys)  # fmt: skip
    assert "other settings" in err and "seed: 0 there, 7 asked" in err
    assert "terrain_blocking: 1.0 there, 0.0 asked" in err
    assert (copied_corpus / "topoflow_corpus.json").read_bytes() == before


def test_out_with_the_same_corpus_is_returned_after_its_hashes_are_checked(copied_corpus, capsys):
    assert main(["--size", "tiny", "--out", str(copied_corpus)]) == copied_corpus
    shard = CorpusMetadata.load(copied_corpus).shards[0].file
    _flip_last_byte(copied_corpus / shard)
    err = _fail(["--size", "tiny", "--out", str(copied_corpus)], capsys)
    assert shard in err and "sha256" in err


def test_force_never_replaces_a_corpus_folder_holding_a_user_file(copied_corpus, capsys):
    (copied_corpus / "data" / "my_notes.md").write_text("keep me")
    err = _fail(["--size", "tiny", "--seed", "7", "--force", "--out", str(copied_corpus)], capsys)
    assert "data/my_notes.md" in err and "no corpus build wrote" in err
    assert (copied_corpus / "data" / "my_notes.md").read_text() == "keep me"
    assert CorpusMetadata.load(copied_corpus).provenance["seed"] == 0


def test_nan_terrain_blocking_is_refused_naming_the_flag(tmp_path, capsys):
    err = _fail(["--size", "tiny", "--terrain-blocking", "nan", "--out", str(tmp_path / "x")],
                capsys)  # fmt: skip
    assert "--terrain-blocking must be a finite number >= 0" in err
    assert not (tmp_path / "x").exists()


def test_cache_folder_holding_another_corpus_is_refused(copied_corpus, tmp_path):
    # A corpus (seed 0) put under the cache name of seed 3: the name says seed 3, the content not.
    root = tmp_path / "cache"
    root.mkdir()
    shutil.copytree(copied_corpus, root / corpus_cache_name("tiny", 3, 1.0))
    with pytest.raises(CorpusError, match="seed: 0 there, 3 asked"):
        build_default_corpus(root=root, size="tiny", seed=3)


def test_static_fields_with_a_flipped_byte_are_refused(copied_corpus, capsys):
    _flip_last_byte(copied_corpus / "static.safetensors")
    err = _fail(["--size", "tiny", "--out", str(copied_corpus)], capsys)
    assert "static.safetensors: sha256" in err


def test_empty_out_folder_is_built_into(tmp_path):
    folder = tmp_path / "empty"
    folder.mkdir()
    assert main(["--size", "tiny", "--out", str(folder)]) == folder
    assert CorpusMetadata.load(folder).provenance["size"] == "tiny"
