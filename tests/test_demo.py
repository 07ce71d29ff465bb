"""`sft demo` leaves a store and a composed model behind, and the commands it prints work as printed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from click.testing import CliRunner
from sftstore_cli.main import cli
from transformers import AutoModelForTokenClassification

from sftstore.composition import read_composition
from sftstore.store import DeltaStore

REFS = ["lang/en@1", "lang/hau@1", "task/ner@1"]


def run_demo(*args: str):
    result = CliRunner().invoke(cli, ["demo", "--quick", *args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result


def printed_commands(output: str) -> list[str]:
    lines = output.splitlines()
    start = lines.index("use them (paste these lines into a shell):") + 1
    return [line[2:] for line in lines[start:] if line.startswith("  ")]


def test_the_printed_commands_work_as_printed(tmp_path, store_home):
    workdir = tmp_path / "demo"
    out = run_demo("--workdir", str(workdir)).output
    assert "trained lang/en@1" in out and "trained lang/hau@1" in out and "trained task/ner@1 with lang/en applied" in out
    for row in ("task/ner ", "task/ner + lang/hau", "task/ner + lang/en"):
        assert row in out
    store = DeltaStore(workdir / "store")
    assert [v.ref for v in store.list()] == REFS
    assert len(store.results()) == 3
    assert not store_home.exists()  # --workdir keeps the user's store out of it

    commands = printed_commands(out)
    assert commands[:2] == [f"export SFTSTORE_HOME={workdir.resolve() / 'store'}",
                            f"export SFTSTORE_BASE={workdir.resolve() / 'tiny-bert'}"]
    assert [c.split()[0] for c in commands[2:]] == ["sft", "sft", "python"]
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    env.pop("SFTSTORE_BASE", None)
    outputs = []
    for i in range(2, len(commands)):  # each command after the exports, in a shell, as a user pastes them
        script = "\n".join(["set -e", *commands[:2], commands[i]])
        done = subprocess.run(["bash", "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        outputs.append(done.stdout)
    listed, composed, piped = outputs
    assert all(ref in listed for ref in REFS)
    assert "composed task/ner@1 + lang/hau@1" in composed
    assert "entity_group" in piped or piped.strip() == "[]"


def test_the_default_store_and_a_rerun_that_adds_nothing(store_home):
    out = run_demo().output
    assert f"the deltas go to the store in {store_home}" in out
    assert not any(c.startswith("export SFTSTORE_HOME") for c in printed_commands(out))
    again = run_demo("--json")
    result = json.loads(again.stdout)
    assert "(already stored)" in again.stderr
    assert result["deltas"] == REFS and result["store"] == str(store_home.resolve())
    assert set(result["scores"]) == {"task/ner", "task/ner + lang/hau", "task/ner + lang/en"}
    assert result["commands"] == printed_commands(out)
    store = DeltaStore()
    assert [v.ref for v in store.list()] == REFS
    assert len(store.results()) == 3

    composed = Path(result["composed"])
    assert composed == store_home.resolve() / "demo" / "composed-ner-hau"
    assert AutoModelForTokenClassification.from_pretrained(composed).config.id2label
    record = read_composition(composed)
    versions = {v.ref: v for v in store.list()}
    assert [(d["ref"], d["version"], d["tensors_sha256"]) for d in record["deltas"]] == [
        (ref, 1, versions[ref].tensors_sha256) for ref in ("task/ner@1", "lang/hau@1")]
    assert record["base_model"]["id"] == result["base"]
