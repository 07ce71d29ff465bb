"""Files the user gets have the mode the umask gives (0644 under umask 022), however they were written."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from click.testing import CliRunner
from sftstore_cli.main import cli

from sftstore import _io
from sftstore.demo import NER_LABELS, synthetic_delta
from sftstore.modeling import load_model
from sftstore.store import DeltaStore


@pytest.fixture(params=[0o022, 0o027, 0o077])
def umask(request):
    previous = os.umask(request.param)
    yield request.param
    os.umask(previous)


def modes(directory: Path) -> dict[str, int]:
    """Every file under `directory` (relative name) -> its permission bits."""
    return {str(p.relative_to(directory)): stat.S_IMODE(p.stat().st_mode) for p in directory.rglob("*") if p.is_file()}


def expect_all(directory: Path, umask: int) -> None:
    found = modes(directory)
    assert found, f"nothing written under {directory}"
    assert found == dict.fromkeys(found, 0o666 & ~umask)


def test_current_umask_reads_without_changing_it(umask):
    assert _io.current_umask() == umask
    assert os.umask(umask) == umask


def test_atomic_write_gives_the_umask_mode(tmp_path, umask):
    _io.atomic_write_text(tmp_path / "a.txt", "hello")
    _io.atomic_write_bytes(tmp_path / "b.bin", b"\0" * 10, tmp_dir=tmp_path)
    assert modes(tmp_path) == {"a.txt": 0o666 & ~umask, "b.bin": 0o666 & ~umask}


@pytest.fixture
def task(tiny_bert_dir):
    model = load_model(tiny_bert_dir, "token-classification", NER_LABELS)
    return synthetic_delta(model, density=0.05, seed=2, kind="task", task="ner",
                           task_type="token-classification", labels=NER_LABELS)


def test_save_pretrained_store_blobs_and_export(task, tmp_path, umask):
    expect_all(task.save_pretrained(tmp_path / "saved"), umask)
    store = DeltaStore(tmp_path / "store")
    store.add(task)
    expect_all(store.blobs_dir, umask)
    result = CliRunner().invoke(cli, ["export", "task/ner", str(tmp_path / "out")], env={"SFTSTORE_HOME": str(store.root)})
    assert result.exit_code == 0, result.output
    expect_all(tmp_path / "out", umask)
    result = CliRunner().invoke(cli, ["export", "task/ner", str(tmp_path / "out-csft"), "--format", "composable-sft"],
                                env={"SFTSTORE_HOME": str(store.root)})
    assert result.exit_code == 0, result.output
    expect_all(tmp_path / "out-csft", umask)


def test_compose_out_directory(task, tiny_bert_dir, tmp_path, umask):
    store = DeltaStore()
    store.add(task)
    out = tmp_path / "composed"
    result = CliRunner().invoke(cli, ["compose", "--base", str(tiny_bert_dir), "--task", "ner", "--out", str(out),
                                      "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert {"model.safetensors", "config.json", "sft_composition.json", "tokenizer.json"} <= set(modes(out))
    expect_all(out, umask)
