"""The registry of published deltas: the shipped catalogue, lookups, validation, `sft search`."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from sftstore.registry import RegistryError, default_registry_path, load_registry
from sftstore_cli.main import cli

ENTRY = {
    "base_model": "xlm-roberta-base", "kind": "language", "name": "hau",
    "repo_id": "org/xlmr-lang-hau", "revision": "v1", "format": "sftstore",
    "source": "test", "verified": True,
}


def write_registry(path, entries):
    path.write_text(json.dumps({"schema_version": 1, "entries": entries}))
    return path


def test_shipped_catalogue_holds_the_cambridgeltl_deltas():
    registry = load_registry()
    assert len(registry.entries) == 98
    by_kind = {kind: [e for e in registry.entries if e.kind == kind] for kind in ("language", "task")}
    assert (len(by_kind["language"]), len(by_kind["task"])) == (87, 11)
    assert {e.base_model for e in registry.entries} == {"bert-base-multilingual-cased", "xlm-roberta-base"}
    assert not any(e.verified for e in registry.entries)  # nobody here could pull them
    for entry in by_kind["language"]:
        prefix = "mbert" if entry.base_model.startswith("bert") else "xlmr"
        assert entry.repo_id == f"cambridgeltl/{prefix}-lang-sft-{entry.name}-small"
    for entry in by_kind["task"]:
        assert entry.repo_id.startswith("cambridgeltl/") and "-task-sft-" in entry.repo_id


def test_find_by_name_and_alias():
    registry = load_registry()
    ner = registry.find("xlm-roberta-base", "task", "ner")
    assert ner is not None and ner.name == "masakhaner"
    assert ner.repo_id == "cambridgeltl/xlmr-task-sft-masakhaner"
    assert ner.labels == ("O", "B-PER", "I-PER", "B-ORG", "I-ORG", "B-LOC", "I-LOC")
    assert registry.find("xlm-roberta-base", "language", "hau").repo_id == "cambridgeltl/xlmr-lang-sft-hau-small"
    assert registry.find("xlm-roberta-base", "language", "xx") is None
    assert registry.find("gpt2", "language", "hau") is None


def test_search_filters():
    registry = load_registry()
    hau = registry.search(lang="hau")
    assert {e.base_model for e in hau} == {"bert-base-multilingual-cased", "xlm-roberta-base"}
    pair = registry.search(base="xlm-roberta-base", lang="hau", task="ner")
    assert sorted(e.repo_id for e in pair) == ["cambridgeltl/xlmr-lang-sft-hau-small", "cambridgeltl/xlmr-task-sft-masakhaner"]
    assert len(registry.search(base="xlm-roberta-base")) == 49


def test_registry_file_from_the_environment(tmp_path, monkeypatch):
    path = write_registry(tmp_path / "mine.json", [ENTRY])
    monkeypatch.setenv("SFTSTORE_REGISTRY", str(path))
    assert default_registry_path() == path
    assert load_registry().find("xlm-roberta-base", "language", "hau").verified


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        ({"kind": "adapter"}, "'kind'"),
        ({"format": "pickle"}, "'format'"),
        ({"repo_id": "no-namespace"}, "'repo_id'"),
        ({"repo_id": "a/b/c"}, "'repo_id'"),
        ({"verified": "yes"}, "'verified'"),
        ({"name": "../evil"}, "invalid name"),
        ({"aliases": ["ok", "a/b"]}, "invalid name"),
        ({"labels": "O,B-PER"}, "'labels'"),
        ({"revision": ""}, "'revision'"),
        ({"homepage": "x"}, "unknown field(s) homepage"),
    ],
)
def test_malformed_entries_are_refused_with_file_entry_and_field(tmp_path, change, fragment):
    path = write_registry(tmp_path / "r.json", [ENTRY, {**ENTRY, "name": "swa", **change}])
    with pytest.raises(RegistryError) as info:
        load_registry(path)
    assert str(path) in str(info.value) and "entry 1" in str(info.value) and fragment in str(info.value)


def test_missing_field(tmp_path):
    entry = {k: v for k, v in ENTRY.items() if k != "repo_id"}
    with pytest.raises(RegistryError, match="missing field.*repo_id"):
        load_registry(write_registry(tmp_path / "r.json", [entry]))


def test_two_entries_serving_the_same_name_or_alias(tmp_path):
    with pytest.raises(RegistryError, match="both serve"):
        load_registry(write_registry(tmp_path / "r.json", [ENTRY, {**ENTRY, "repo_id": "org/other"}]))
    with pytest.raises(RegistryError, match="both serve"):
        load_registry(write_registry(tmp_path / "r.json", [ENTRY, {**ENTRY, "name": "ha", "aliases": ["hau"]}]))


@pytest.mark.parametrize("content", ["{not json", "[]", '{"schema_version": 2, "entries": []}', '{"schema_version": 1}'])
def test_unreadable_registry(tmp_path, content):
    path = tmp_path / "r.json"
    path.write_text(content)
    with pytest.raises(RegistryError, match=str(path)):
        load_registry(path)


def test_sft_search():
    result = CliRunner().invoke(cli, ["search", "--base", "xlm-roberta-base", "--lang", "hau", "--task", "ner", "--json"])
    assert result.exit_code == 0, result.output
    assert [e["repo_id"] for e in json.loads(result.output)] == [
        "cambridgeltl/xlmr-lang-sft-hau-small", "cambridgeltl/xlmr-task-sft-masakhaner",
    ]
    table = CliRunner().invoke(cli, ["search", "--lang", "hau"]).output
    assert "cambridgeltl/xlmr-lang-sft-hau-small" in table
    assert "No published delta matches." in CliRunner().invoke(cli, ["search", "--lang", "zz"]).output
