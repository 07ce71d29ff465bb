"""Every table fits 80 columns, in a terminal of that width and in a pipe, with its key values whole."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from click.testing import CliRunner

from sftstore.demo import NER_LABELS, synthetic_delta
from sftstore.modeling import load_model
from sftstore.store import DeltaStore
from sftstore_cli import common
from sftstore_cli.main import cli


@pytest.fixture
def columns_80(monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    monkeypatch.setattr(common.console, "_width", None)  # the width is read from COLUMNS at each print


def render(*args: str) -> str:
    """What `sft ARGS` prints on stdout (progress bars go to stderr), checked to fit 80 columns."""
    result = CliRunner().invoke(cli, list(args), catch_exceptions=False)
    assert result.exit_code in (0, 1), result.output
    too_wide = [line for line in result.stdout.splitlines() if len(line) > 80]
    assert too_wide == [], f"sft {' '.join(args)}: lines over 80 columns"
    return result.stdout


@pytest.fixture
def store(tiny_bert_dir, tmp_path):
    """lang/hau (two versions, one tagged), lang/swa and task/ner for a base whose path is long."""
    base = tmp_path / "a-rather-long-directory-name-for-models" / "my-base-model"
    base.parent.mkdir()
    base.symlink_to(tiny_bert_dir, target_is_directory=True)
    model = load_model(base, "token-classification", NER_LABELS)
    store = DeltaStore()
    for seed, language in ((1, "hau"), (2, "hau"), (3, "swa")):
        store.add(synthetic_delta(model, density=0.05, seed=seed, kind="language", language=language,
                                  base_id=str(base)), source={"type": "train", "method": "lt-sft"})
    store.add(synthetic_delta(model, density=0.05, seed=4, kind="task", task="ner", task_type="token-classification",
                              labels=NER_LABELS, base_id=str(base)),
              source={"type": "import", "path": str(tmp_path / "somewhere" / "far" / "away")})
    store.tag("lang/hau@2", "best")
    return store


def test_list(store, columns_80):
    out = render("list")
    assert "base .../a-rather-long-directory-name-for-models/my-base-model" in out
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.startswith(("lang/", "task/"))}
    assert list(rows) == ["lang/hau@1", "lang/hau@2", "lang/swa@1", "task/ner@1"]
    versions = {v.ref: v for v in store.list()}
    assert rows["lang/hau@2"][1:3] == ["best", f"{versions['lang/hau@2'].nnz:,}"]
    assert rows["task/ner@1"][-1] == "import"
    listed = CliRunner().invoke(cli, ["list", "--json"]).output
    assert json.loads(listed)[0]["base"] == versions["lang/hau@1"].base  # the whole path


def test_show_a_version(store, columns_80):
    version = store.resolve("task/ner")
    out = render("show", "task/ner")
    for value in (version.tensors_sha256, version.config_sha256, ", ".join(NER_LABELS), "token-classification",
                  "encoder.layer.1", store.manifest(version)["base_model"]["arch_digest"]):
        assert value in out
    assert len(out.splitlines()) < 35


def test_show_a_composed_directory(store, tmp_path, columns_80):
    out_dir = tmp_path / "composed"
    composed = CliRunner().invoke(cli, ["compose", "--task", "ner", "--lang", "hau@best", "--base",
                                        store.resolve("task/ner").base, "--out", str(out_dir), "--device", "cpu"])
    assert composed.exit_code == 0, composed.output
    out = render("show", str(out_dir))
    for ref in ("task/ner@1", "lang/hau@2"):
        assert ref in out and store.resolve(ref).tensors_sha256[:16] in out
    assert store.manifest(store.resolve("task/ner"))["base_model"]["weights_digest"] in out


def test_search(columns_80, monkeypatch):
    out = render("search", "--any-base")
    assert "cambridgeltl/xlmr-lang-sft-hau-small" in out and "task/masakhaner (ner)" in out
    assert "dependency parsing: not supported by compose" in out


def test_verify_damage(store, columns_80):
    version = store.resolve("lang/swa")
    store.blob_path(version.tensors_sha256).write_bytes(b"garbage")
    out = render("verify")
    assert "lang/swa@1" in out and "sft_delta.safetensors" in out


def test_overlap(store, columns_80):
    out = render("overlap", "lang/hau@1", "lang/hau@2", "lang/swa", "task/ner", "--by", "layer")
    for ref in ("lang/hau@1", "lang/hau@2", "lang/swa@1", "task/ner@1"):
        assert ref in out
    assert "1~4" in out and "3~4" in out and "encoder.layer.1" in out


def test_search_in_a_pipe_is_80_columns_with_whole_values():
    env = {key: value for key, value in os.environ.items() if key not in ("COLUMNS", "LINES")}
    done = subprocess.run([sys.executable, "-m", "sftstore_cli.main", "search", "--lang", "hau"], env=env,
                          capture_output=True, text=True, timeout=60, check=True)
    lines = done.stdout.splitlines()
    assert max(map(len, lines)) <= 80
    assert "…" not in done.stdout
    assert any("cambridgeltl/mbert-lang-sft-hau-small" in line and line.rstrip().endswith("yes") for line in lines)
