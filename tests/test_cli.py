"""The `sft` command line, driven in-process with click's runner."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from transformers import AutoModelForTokenClassification

from sftstore.demo import NER_LABELS, synthetic_delta
from sftstore.modeling import load_model
from sftstore.store import DeltaStore
from sftstore_cli.main import cli


def run(*args: str, input: str | None = None, ok: bool = True):
    result = CliRunner().invoke(cli, list(args), input=input, catch_exceptions=False)
    if ok:
        assert result.exit_code == 0, result.output
    return result


@pytest.fixture
def artifacts(tmp_path, tiny_bert_dir):
    """A language and a task artifact directory for the tiny BERT base."""
    model = load_model(tiny_bert_dir, "token-classification", NER_LABELS)
    lang = synthetic_delta(model, density=0.05, seed=1, kind="language", language="hau")
    task = synthetic_delta(model, density=0.05, seed=2, kind="task", task="ner",
                           task_type="token-classification", labels=NER_LABELS)
    return {"lang": lang.save_pretrained(tmp_path / "lang-hau"), "task": task.save_pretrained(tmp_path / "task-ner")}


@pytest.fixture
def imported(artifacts):
    for directory in artifacts.values():
        run("import", str(directory))
    return artifacts


def test_help_and_version():
    out = run("--help").output
    for command in ("list", "show", "tag", "rm", "verify", "gc", "import", "export", "compose", "demo"):
        assert command in out
    assert "0.1.0" in run("--version").output


def test_import_list_show(artifacts, tiny_bert_dir):
    assert "added lang/hau@1" in run("import", str(artifacts["lang"])).output
    assert "already stored as lang/hau@1" in run("import", str(artifacts["lang"])).output
    data = json.loads(run("import", str(artifacts["task"]), "--json").output)
    assert data["ref"] == "task/ner@1" and data["created"] is True
    table = run("list").output
    assert "lang/hau@1" in table and "task/ner@1" in table
    listed = json.loads(run("list", "--kind", "task", "--json").output)
    assert [v["ref"] for v in listed] == ["task/ner@1"]
    assert listed[0]["base"] == str(tiny_bert_dir.resolve())
    shown = json.loads(run("show", "task/ner", "--json").output)
    assert shown["manifest"]["labels"] == NER_LABELS
    assert {row["layer"] for row in shown["layers"]} >= {"embeddings", "encoder.layer.0", "encoder.layer.1"}
    assert "encoder.layer.1" in run("show", "lang/hau").output


def test_tag_rm_export(imported, tmp_path):
    run("import", str(imported["lang"]))
    assert "lang/hau@best -> lang/hau@1" in run("tag", "lang/hau", "best").output
    run("export", "lang/hau@best", str(tmp_path / "out"))
    assert (tmp_path / "out" / "sft_delta.safetensors").read_bytes() == (imported["lang"] / "sft_delta.safetensors").read_bytes()
    aborted = run("rm", "lang/hau", input="n\n", ok=False)
    assert aborted.exit_code == 1 and "Remove all 1 version(s) of lang/hau?" in aborted.output
    assert "removed lang/hau@1" in run("rm", "lang/hau@1").output
    assert json.loads(run("list", "--json").output)[0]["ref"] == "task/ner@1"
    assert "removed 3 blob(s)" in run("gc").output


def test_verify_exit_status(imported):
    assert "All stored versions verified" in run("verify").output
    store = DeltaStore()
    store.blob_path(store.resolve("lang/hau").tensors_sha256).write_bytes(b"garbage")
    result = run("verify", "--json", ok=False)
    assert result.exit_code == 1
    assert json.loads(result.output)[0]["file"] == "sft_delta.safetensors"


def test_compose_saves_a_transformers_directory(imported, tiny_bert_dir, tmp_path):
    out = tmp_path / "composed"
    output = run("compose", "--base", str(tiny_bert_dir), "--task", "ner", "--lang", "hau@1",
                 "--out", str(out), "--device", "cpu", "--json").output
    result = _last_json(output)
    assert result["deltas"] == ["task/ner@1", "lang/hau@1"]
    model = AutoModelForTokenClassification.from_pretrained(out)
    assert model.config.id2label == dict(enumerate(NER_LABELS))


def _last_json(output: str):
    """The JSON document a --json command printed (progress bars of transformers go to stderr)."""
    return json.loads(output[output.index("{"):])


def test_compose_base_from_environment_and_config_file(imported, tiny_bert_dir, store_home, monkeypatch):
    monkeypatch.setenv("SFTSTORE_BASE", str(tiny_bert_dir))
    result = run("compose", "--task", "ner", "--text", "buhari ya ce a kano", "--device", "cpu")
    assert "composed task/ner@1" in result.output and '"entity"' in result.output
    monkeypatch.delenv("SFTSTORE_BASE")
    store_home.mkdir(parents=True, exist_ok=True)
    (store_home / "config.toml").write_text(f'base = "{tiny_bert_dir}"\n')
    assert "composed lang/hau@1" in run("compose", "--lang", "hau", "--device", "cpu").output


def test_compose_errors_are_one_clean_line(imported, tiny_bert_dir):
    missing_base = run("compose", "--task", "ner", ok=False)
    assert missing_base.exit_code == 2 and "no base model" in missing_base.output
    nothing = run("compose", "--base", str(tiny_bert_dir), ok=False)
    assert nothing.exit_code == 2 and "--task" in nothing.output
    unknown = run("compose", "--base", str(tiny_bert_dir), "--task", "pos", ok=False)
    assert unknown.exit_code == 1 and "Error: no delta task/pos" in unknown.output
    assert "Traceback" not in unknown.output
    bad_version = run("compose", "--base", str(tiny_bert_dir), "--task", "ner@7", ok=False)
    assert bad_version.exit_code == 1 and "no such version or alias" in bad_version.output


def test_compose_refuses_another_base_unless_forced(imported, tmp_path):
    from sftstore.demo import build_tiny_base

    other = build_tiny_base(tmp_path / "other", seed=5)
    DeltaStore()  # the deltas are filed under the first base; export and re-import under the other
    for kind in ("lang", "task"):
        manifest = json.loads((imported[kind] / "sft_config.json").read_text())
        manifest["base_model"]["id"] = str(other.resolve())
        (imported[kind] / "sft_config.json").write_text(json.dumps(manifest))
        run("import", str(imported[kind]))
    refused = run("compose", "--base", str(other), "--task", "ner", "--device", "cpu", ok=False)
    assert refused.exit_code == 1 and "weights_digest" in refused.output and "--force" in refused.output
    forced = run("compose", "--base", str(other), "--task", "ner", "--device", "cpu", "--force")
    assert "composed task/ner@1" in forced.output


def test_demo_runs_offline(tmp_path):
    out = run("demo", "--workdir", str(tmp_path / "demo"), "--quick").output
    assert "trained lang/en@1" in out and "trained lang/hau@1" in out and "trained task/ner@1 with lang/en applied" in out
    for row in ("task/ner ", "task/ner + lang/hau", "task/ner + lang/en"):
        assert row in out
    store = DeltaStore(tmp_path / "demo" / "store")
    assert [v.ref for v in store.list()] == ["lang/en@1", "lang/hau@1", "task/ner@1"]
    assert len(store.results()) == 3
    assert AutoModelForTokenClassification.from_pretrained(tmp_path / "demo" / "composed-ner-hau").config.id2label
