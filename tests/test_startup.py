"""The everyday commands start without torch or transformers (`python -X importtime` lists every import)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from sftstore.demo import NER_LABELS, synthetic_delta
from sftstore.modeling import load_model
from sftstore.store import DeltaStore

HEAVY = ("torch", "transformers", "safetensors.torch", "numpy")
COMMANDS = [["--help"], ["list"], ["list", "--json"], ["show", "task/ner"], ["show", "task/ner", "--json"],
            ["search", "--lang", "hau"], ["tag", "task/ner@1", "best"], ["rm", "task/ner@9", "--json"]]


def imported_modules(args: list[str], env: dict[str, str]) -> tuple[set[str], subprocess.CompletedProcess]:
    done = subprocess.run([sys.executable, "-X", "importtime", "-m", "sftstore_cli.main", *args], env=env,
                          capture_output=True, text=True, timeout=120, check=False)
    modules = {line.rsplit("|", 1)[1].strip() for line in done.stderr.splitlines() if line.startswith("import time:")}
    return modules, done


@pytest.fixture(scope="module")
def env(tmp_path_factory, tiny_bert_dir):
    home = tmp_path_factory.mktemp("startup") / "store"
    model = load_model(tiny_bert_dir, "token-classification", NER_LABELS)
    DeltaStore(home).add(synthetic_delta(model, density=0.05, seed=2, kind="task", task="ner",
                                         task_type="token-classification", labels=NER_LABELS))
    return {**os.environ, "SFTSTORE_HOME": str(home), "SFTSTORE_BASE": str(tiny_bert_dir)}


@pytest.mark.parametrize("args", COMMANDS, ids=" ".join)
def test_everyday_commands_import_no_heavy_module(args, env):
    modules, done = imported_modules(args, env)
    expected_status = 1 if args[:2] == ["rm", "task/ner@9"] else 0  # a clean error also starts light
    assert done.returncode == expected_status, done.stderr[-2000:]
    assert {"click", "sftstore_cli.common", "sftstore.store"} <= modules  # the import log is read as it should be
    assert sorted(modules & set(HEAVY)) == []
    if expected_status == 0:  # an error message is redacted of the Hub token in use, which asks huggingface_hub
        assert "huggingface_hub" not in modules


def test_a_command_that_needs_torch_still_imports_it(env):
    modules, done = imported_modules(["compose", "--task", "ner", "--device", "cpu"], env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert {"torch", "transformers"} <= modules
