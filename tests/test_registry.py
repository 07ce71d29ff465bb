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
    assert ner.labels == ("B-LOC", "B-ORG", "B-PER", "I-LOC", "I-ORG", "I-PER", "O")  # composable-sft sorts them
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


UPOS = ("ADJ", "ADP", "ADV", "AUX", "CCONJ", "DET", "INTJ", "NOUN", "NUM", "PART", "PRON", "PROPN", "PUNCT", "SCONJ",
        "SYM", "VERB", "X")
# The label orders registry/README.md documents, by task name.
DOCUMENTED_LABELS = {
    "masakhaner": ("B-LOC", "B-ORG", "B-PER", "I-LOC", "I-ORG", "I-PER", "O"),
    "pos": UPOS,
    "pos-ms": UPOS,
    "nli": ("entailment", "neutral", "contradiction"),
    "nli-ms": ("entailment", "neutral", "contradiction"),
    "nusax_senti": ("negative", "neutral", "positive"),
    "nusax_senti-ms": ("negative", "neutral", "positive"),
}
DP_REASON = (
    "dependency parsing: not supported by compose "
    "(composable-sft's biaffine parser head has no transformers model class)"
)
QA_REASON = "question answering: not supported by compose yet"


@pytest.mark.parametrize(("code", "name"), [("ha", "hau"), ("hau", "hau"), ("sw", "swa"), ("swa", "swa"),
                                            ("eng", "en"), ("en", "en"), ("deu", "de"), ("ger", "de")])
def test_find_language_by_iso_639_1_or_639_3(code, name):
    for base in ("xlm-roberta-base", "bert-base-multilingual-cased"):
        entry = load_registry().find(base, "language", code)
        assert entry is not None and entry.name == name and entry.base_model == base


def test_an_exact_name_wins_over_an_equivalent_code(tmp_path):
    registry = load_registry(write_registry(tmp_path / "r.json", [
        {**ENTRY, "name": "hau", "repo_id": "org/three"}, {**ENTRY, "name": "ha", "repo_id": "org/two"},
    ]))
    assert registry.find("xlm-roberta-base", "language", "hau").repo_id == "org/three"
    assert registry.find("xlm-roberta-base", "language", "ha").repo_id == "org/two"
    assert [e.repo_id for e in registry.search(lang="ha")] == ["org/three", "org/two"]


def test_equivalent_codes_are_for_languages_only(tmp_path):
    registry = load_registry(write_registry(tmp_path / "r.json", [{**ENTRY, "kind": "task", "name": "hau"}]))
    assert registry.find("xlm-roberta-base", "task", "ha") is None
    assert registry.search(lang="ha") == [] and registry.search(task="ha") == []


@pytest.mark.parametrize(("current", "legacy"), [
    ("FacebookAI/xlm-roberta-base", "xlm-roberta-base"),
    ("google-bert/bert-base-multilingual-cased", "bert-base-multilingual-cased"),
])
def test_find_and_search_by_the_current_hub_id_of_a_base(current, legacy):
    registry = load_registry()
    entry = registry.find(current, "language", "ha")
    assert entry is not None and entry.base_model == legacy and entry.name == "hau"
    assert registry.search(base=current) == registry.search(base=legacy)
    assert len(registry.search(base=current)) == 49
    assert registry.find(f"{current}-x", "language", "hau") is None


def test_an_entry_filed_under_the_current_id_serves_the_legacy_one(tmp_path):
    entry = {**ENTRY, "base_model": "FacebookAI/xlm-roberta-base"}
    registry = load_registry(write_registry(tmp_path / "r.json", [entry]))
    assert registry.find("xlm-roberta-base", "language", "ha").repo_id == ENTRY["repo_id"]
    assert [e.repo_id for e in registry.search(base="xlm-roberta-base", lang="hau")] == [ENTRY["repo_id"]]


def test_the_legacy_and_current_id_of_a_base_cannot_both_serve_a_name(tmp_path):
    entries = [ENTRY, {**ENTRY, "base_model": "FacebookAI/xlm-roberta-base", "repo_id": "org/other"}]
    with pytest.raises(RegistryError, match="both serve"):
        load_registry(write_registry(tmp_path / "r.json", entries))


def test_shipped_task_entries_compose_or_say_why_not():
    tasks = [e for e in load_registry().entries if e.kind == "task"]
    unsupported = {(e.base_model, e.name): e.unsupported for e in tasks if e.unsupported is not None}
    assert unsupported == {
        ("bert-base-multilingual-cased", "dp"): DP_REASON,
        ("bert-base-multilingual-cased", "dp-ms"): DP_REASON,
        ("xlm-roberta-base", "squadv1-ms"): QA_REASON,
    }
    composable = [e for e in tasks if e.unsupported is None]
    assert sorted(e.name for e in composable) == sorted([*DOCUMENTED_LABELS, "masakhaner"])  # on both bases
    for entry in composable:
        assert entry.task_type in ("token-classification", "sequence-classification")
        assert entry.labels == DOCUMENTED_LABELS[entry.name]
        assert len(set(entry.labels)) == len(entry.labels) > 0
    assert all(e.unsupported is None for e in load_registry().entries if e.kind == "language")


def test_every_shipped_task_entry_says_its_source_languages():
    tasks = {e.name: e.source_languages for e in load_registry().entries if e.kind == "task"}
    assert {name: langs for name, langs in tasks.items() if not name.endswith("-ms")} == {
        "dp": ("en",), "pos": ("en",), "masakhaner": ("en",), "nli": ("en",), "nusax_senti": ("id",)}
    assert all(len(langs) >= 7 and len(set(langs)) == len(langs) for name, langs in tasks.items() if name.endswith("-ms"))


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({}, None),
        ({"task_type": "sequence-classification", "labels": ["a", "b"]}, None),
        ({"labels": []}, "labels unknown: the registry records no token-classification labels; pass --labels"),
        ({"task_type": "question-answering", "labels": []}, QA_REASON),
        ({"task_type": "dependency-parsing"}, DP_REASON),
        ({"task_type": "summarization"}, "task type summarization: not supported by compose"),
        ({"task_type": None}, "task type unknown: not supported by compose"),
        # an sftstore artifact carries its own task type and labels
        ({"format": "sftstore", "task_type": None, "labels": []}, None),
        ({"format": "sftstore", "labels": []}, None),
        ({"format": "sftstore", "task_type": "dependency-parsing"}, DP_REASON),
    ],
)
def test_unsupported_reasons(tmp_path, change, reason):
    task = {**ENTRY, "kind": "task", "name": "ner", "format": "composable-sft", "task_type": "token-classification",
            "labels": ["O", "B-X"]}
    task.update(change)
    entry = load_registry(write_registry(tmp_path / "r.json", [task])).entries[0]
    assert entry.unsupported == reason
    assert entry.to_dict()["unsupported"] == reason


def test_sft_search_says_what_does_not_compose(monkeypatch):
    monkeypatch.setenv("COLUMNS", "250")  # one table row per entry
    result = CliRunner().invoke(cli, ["search", "--base", "google-bert/bert-base-multilingual-cased", "--task", "dp"])
    assert result.exit_code == 0, result.output
    row = next(line for line in result.output.splitlines() if "cambridgeltl/mbert-task-sft-dp " in line)
    assert row.split()[-1] == "no"
    assert f"dp: {DP_REASON}" in result.output.splitlines()
    table = CliRunner().invoke(cli, ["search", "--base", "xlm-roberta-base", "--lang", "ha", "--task", "nli"]).output
    rows = [line for line in table.splitlines() if "cambridgeltl/" in line]
    assert [row.split()[-1] for row in rows] == ["yes", "yes"]
    assert "not supported" not in table


def test_sft_search_json_says_what_does_not_compose():
    result = CliRunner().invoke(cli, ["search", "--lang", "hau", "--task", "squadv1-ms", "--json"])
    assert result.exit_code == 0, result.output
    assert {e["repo_id"]: e["unsupported"] for e in json.loads(result.output)} == {
        "cambridgeltl/mbert-lang-sft-hau-small": None,
        "cambridgeltl/xlmr-lang-sft-hau-small": None,
        "cambridgeltl/xlmr-task-sft-squadv1-ms": QA_REASON,
    }


def test_sft_search_finds_iso_639_1_codes_and_current_base_ids():
    result = CliRunner().invoke(cli, ["search", "--base", "FacebookAI/xlm-roberta-base", "--lang", "ha", "--json"])
    assert [e["repo_id"] for e in json.loads(result.output)] == ["cambridgeltl/xlmr-lang-sft-hau-small"]


def test_sft_search_honours_sftstore_base(monkeypatch):
    monkeypatch.setenv("SFTSTORE_BASE", "FacebookAI/xlm-roberta-base")
    found = CliRunner().invoke(cli, ["search", "--lang", "hau", "--json"])
    assert [e["repo_id"] for e in json.loads(found.output)] == ["cambridgeltl/xlmr-lang-sft-hau-small"]
    explicit = CliRunner().invoke(cli, ["search", "--base", "bert-base-multilingual-cased", "--lang", "hau", "--json"])
    assert [e["repo_id"] for e in json.loads(explicit.output)] == ["cambridgeltl/mbert-lang-sft-hau-small"]
