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
    assert "composed task/ner@1" in result.output and "kano" in result.output.split("\n", 1)[1]  # the prediction
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


def test_tag_rm_export_json(imported, tmp_path):
    tagged = json.loads(run("tag", "lang/hau@1", "best", "--json").output)
    assert (tagged["alias"], tagged["ref"], tagged["aliases"]) == ("lang/hau@best", "lang/hau@1", ["best"])
    exported = json.loads(run("export", "task/ner", str(tmp_path / "out"), "--json").output)
    assert exported["ref"] == "task/ner@1" and exported["format"] == "sftstore"
    assert exported["files"] == ["README.md", "sft_config.json", "sft_delta.safetensors"]
    assert exported["directory"] == str((tmp_path / "out").resolve())
    refused = run("rm", "lang/hau", "--json", ok=False)
    assert refused.exit_code == 2 and "needs --yes" in refused.output
    removed = json.loads(run("rm", "lang/hau", "--json", "--yes").output)
    assert [v["ref"] for v in removed] == ["lang/hau@1"]
    assert [v["ref"] for v in json.loads(run("list", "--json").output)] == ["task/ner@1"]


def test_show_a_composed_directory_traces_its_deltas(imported, tiny_bert_dir, tmp_path):
    out = tmp_path / "composed"
    run("compose", "--base", str(tiny_bert_dir), "--task", "ner", "--lang", "hau", "--out", str(out), "--device", "cpu")
    shown = json.loads(run("show", str(out), "--json").output)
    store = DeltaStore()
    task, lang = store.resolve("task/ner"), store.resolve("lang/hau")
    assert [(d["ref"], d["version"], d["tensors_sha256"], d["kind"], d["scale"]) for d in shown["deltas"]] == [
        ("task/ner@1", 1, task.tensors_sha256, "task", 1.0), ("lang/hau@1", 1, lang.tensors_sha256, "language", 1.0)]
    manifest = store.manifest(task)
    assert shown["base_model"] == {"id": str(tiny_bert_dir.resolve()),
                                   "arch_digest": manifest["base_model"]["arch_digest"],
                                   "weights_digest": manifest["base_model"]["weights_digest"]}
    table = run("show", str(out)).output
    assert "task/ner@1" in table and task.tensors_sha256[:16] in table
    (out / "sft_composition.json").write_text('{"base_model": 3, "deltas": []}')
    bad = run("show", str(out), ok=False)
    assert bad.exit_code == 1 and "sft_composition.json: field 'base_model' is 3" in bad.output
    assert "Traceback" not in bad.output
    empty = tmp_path / "empty"
    empty.mkdir()
    missing = run("show", str(empty), ok=False)
    assert missing.exit_code == 1 and "no sft_composition.json" in missing.output


def test_search_takes_the_base_in_use(monkeypatch):
    everything = json.loads(run("search", "--lang", "hau", "--json").output)
    assert {e["base_model"] for e in everything} == {"bert-base-multilingual-cased", "xlm-roberta-base"}
    monkeypatch.setenv("SFTSTORE_BASE", "FacebookAI/xlm-roberta-base")  # a current id names the legacy one
    chosen = json.loads(run("search", "--lang", "hau", "--json").output)
    assert [e["repo_id"] for e in chosen] == ["cambridgeltl/xlmr-lang-sft-hau-small"]
    assert len(json.loads(run("search", "--lang", "hau", "--any-base", "--json").output)) == 2
    monkeypatch.setenv("SFTSTORE_BASE", "/no/such/base")
    assert "No published delta matches for base /no/such/base (--any-base" in run("search", "--lang", "hau").output


MINE = ("list", "show", "tag", "rm", "verify", "gc", "import", "export", "compose", "push", "pull", "search", "demo",
        "overlap", "merge")


@pytest.mark.parametrize("name", MINE)
def test_every_option_has_help_and_shows_its_default(name):
    import click

    command = cli.commands[name]
    assert "--json" in {opt for p in command.params for opt in p.opts}
    for param in command.params:
        if not isinstance(param, click.Option):
            continue
        assert param.help, f"{name} {param.opts[0]}: no help text"
        default = param.get_default(click.Context(command), call=False)
        if default is not None and default is not False and not param.is_flag and isinstance(default, (str, int, float)):
            assert param.show_default, f"{name} {param.opts[0]}: default {default!r} not shown"


def test_show_reads_a_composition_record_from_before_provenance(tmp_path):
    old = {"base_model": "xlm-roberta-base", "deltas": [
        {"kind": "task", "name": "ner", "scale": 1.0, "nnz": 12, "base_model": "xlm-roberta-base",
         "created_at": "2026-01-02T03:04:05+00:00"}]}
    (tmp_path / "sft_composition.json").write_text(json.dumps(old))
    out = run("show", str(tmp_path)).output
    assert "task/ner" in out and "(not recorded)" in out and "xlm-roberta-base" in out
    shown = json.loads(run("show", str(tmp_path), "--json").output)
    assert shown["base_model"] == {"id": "xlm-roberta-base"} and shown["deltas"][0]["nnz"] == 12


def test_show_counts_per_layer_from_the_header_as_the_loaded_delta_does(imported):
    store = DeltaStore()
    for ref in ("lang/hau", "task/ner"):
        shown = json.loads(run("show", ref, "--json").output)["layers"]
        expected = store.load(ref).layer_summary()
        assert [(r["layer"], r["numel"], r["nnz"]) for r in shown] == [(r.name, r.numel, r.nnz) for r in expected]
