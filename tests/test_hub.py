"""Push and pull through the Hub protocol, against the project's own server on 127.0.0.1.

The real `huggingface_hub` client does the talking (fixtures `hub_server` / `hub_env` from
`tests/hub_server.py`); each test uses its own server, Hub cache and store.
"""

from __future__ import annotations

import json
import logging

import pytest
from click.testing import CliRunner
from huggingface_hub import ModelCard

from sftstore import BaseModelMismatchError, DeltaFormatError, RefNotFoundError, SparseDelta
from sftstore.demo import NER_LABELS, synthetic_delta
from sftstore.format import CARD_FILE, CONFIG_FILE, TENSORS_FILE
from sftstore.hub import HubError, pull_from_hub, push_to_hub
from sftstore.interop import to_composable_sft
from sftstore.modeling import load_model
from sftstore.store import DeltaStore
from sftstore_cli.main import cli

REPO = "tester/tiny-lang-hau"


@pytest.fixture
def base_model(tiny_bert_dir):
    return load_model(tiny_bert_dir, "token-classification", NER_LABELS)


@pytest.fixture
def store(base_model):
    """A store with two versions of lang/hau and one of task/ner."""
    store = DeltaStore()
    for seed in (1, 2):
        store.add(synthetic_delta(base_model, 0.05, seed, kind="language", language="hau", license="cc-by-4.0"))
    store.add(synthetic_delta(base_model, 0.05, 3, kind="task", task="ner", task_type="token-classification",
                              labels=NER_LABELS))
    return store


def other_store(tmp_path, monkeypatch, name: str = "elsewhere") -> DeltaStore:
    """Another machine's empty store."""
    monkeypatch.setenv("SFTSTORE_HOME", str(tmp_path / name))
    return DeltaStore()


def test_push_makes_one_tagged_commit_per_version(hub_env, store):
    result = push_to_hub(store, "lang/hau@1", REPO)
    assert result.created and result.tag == "v1"
    server = hub_env.server
    files = server.files(REPO, "v1")
    assert {TENSORS_FILE, CONFIG_FILE, CARD_FILE} <= files.keys()
    v1 = store.resolve("lang/hau@1")
    assert files[TENSORS_FILE] == store.blob_path(v1.tensors_sha256).read_bytes()
    assert server.refs(REPO)["tags"]["v1"] == result.commit
    assert server.commits(REPO)[0].title.startswith("Add lang/hau v1:")
    assert store.remotes(v1) == [{"repo_id": REPO, "commit": result.commit, "tag": "v1",
                                 "recorded_at": store.remotes(v1)[0]["recorded_at"]}]
    card = ModelCard(files[CARD_FILE].decode()).data.to_dict()
    assert card["library_name"] == "sftstore" and "sparse-fine-tuning" in card["tags"]
    assert card["language"] == ["hau"] and card["license"] == "cc-by-4.0"


def test_pushing_the_same_version_again_makes_no_commit(hub_env, store):
    first = push_to_hub(store, "lang/hau@1", REPO)
    count = len(hub_env.server.commits(REPO))
    again = push_to_hub(store, "lang/hau@1", REPO)
    assert not again.created and again.commit == first.commit
    assert len(hub_env.server.commits(REPO)) == count


def test_push_v2_then_pull_v1_by_tag_and_by_commit(hub_env, store, tmp_path, monkeypatch):
    v1 = push_to_hub(store, "lang/hau@1", REPO)
    v2 = push_to_hub(store, "lang/hau@2", REPO)
    assert v2.tag == "v2" and v2.commit != v1.commit
    assert hub_env.server.refs(REPO)["tags"] == {"v1": v1.commit, "v2": v2.commit}
    expected = {n: store.resolve(f"lang/hau@{n}").tensors_sha256 for n in (1, 2)}
    remote = other_store(tmp_path, monkeypatch)
    pulled = pull_from_hub(remote, REPO, "v1")
    assert pulled.created and pulled.commit == v1.commit
    assert pulled.version.tensors_sha256 == expected[1]
    assert pulled.version.source == {"type": "hub", "repo_id": REPO, "revision": "v1", "commit": v1.commit}
    by_sha = pull_from_hub(remote, REPO, v2.commit)
    assert by_sha.version.tensors_sha256 == expected[2] and by_sha.version.version == 2
    latest = pull_from_hub(remote, REPO)
    assert not latest.created and latest.version.version == 2  # main is v2, already stored


def test_offline_pull_is_served_from_the_cache(hub_env, store, tmp_path, monkeypatch):
    push_to_hub(store, "lang/hau@1", REPO)
    pull_from_hub(other_store(tmp_path, monkeypatch, "first"), REPO, "v1")
    hub_env.server.clear_requests()
    hub_env.set_offline()
    offline_store = other_store(tmp_path, monkeypatch, "second")
    pulled = pull_from_hub(offline_store, REPO, "v1")
    assert pulled.version.tensors_sha256 == store.resolve("lang/hau@1").tensors_sha256
    assert hub_env.server.requests == []
    with pytest.raises(HubError, match="not in the local Hub cache"):
        pull_from_hub(offline_store, REPO, "v9")


def test_cli_pull_offline_flag(hub_env, store, tmp_path, monkeypatch):
    push_to_hub(store, "lang/hau@1", REPO)
    pull_from_hub(other_store(tmp_path, monkeypatch, "first"), REPO, "v1")
    hub_env.server.clear_requests()
    other_store(tmp_path, monkeypatch, "second")
    result = CliRunner().invoke(cli, ["pull", f"{REPO}@v1", "--offline"])
    assert result.exit_code == 0, result.output
    assert "added lang/hau@1" in result.output and hub_env.server.requests == []


def test_private_repository_without_token(hub_env, store, tmp_path, monkeypatch):
    push_to_hub(store, "lang/hau@1", REPO, private=True)
    hub_env.set_token(None)
    remote = other_store(tmp_path, monkeypatch)
    with pytest.raises(HubError, match="private and no valid token"):
        pull_from_hub(remote, REPO, "v1")
    assert remote.list() == []


def test_missing_repository_and_revision(hub_env, store):
    with pytest.raises(HubError, match="tester/nope: repository not found"):
        pull_from_hub(store, "tester/nope")
    push_to_hub(store, "lang/hau@1", REPO)
    with pytest.raises(HubError, match="no such revision"):
        pull_from_hub(store, REPO, "v7")


def test_a_tampered_download_is_refused_and_nothing_stored(hub_env, store, tmp_path, monkeypatch):
    push_to_hub(store, "lang/hau@1", REPO)
    original = hub_env.server.files(REPO)[TENSORS_FILE]
    corrupted = bytearray(original)
    corrupted[-1] ^= 0x01  # same length: the client itself does not notice
    hub_env.server.tamper(REPO, TENSORS_FILE, bytes(corrupted))
    remote = other_store(tmp_path, monkeypatch)
    with pytest.raises(DeltaFormatError, match="does not match the manifest's tensors_sha256"):
        pull_from_hub(remote, REPO, "v1")
    assert remote.list() == [] and list(remote.blobs_dir.iterdir()) == []


def test_a_delta_for_another_base_is_refused(hub_env, store, tmp_path, monkeypatch):
    push_to_hub(store, "lang/hau@1", REPO)
    remote = other_store(tmp_path, monkeypatch)
    with pytest.raises(BaseModelMismatchError, match="not 'xlm-roberta-base'"):
        pull_from_hub(remote, REPO, "v1", base="xlm-roberta-base")
    assert remote.list() == []


def test_a_repository_holds_one_delta(hub_env, store):
    push_to_hub(store, "lang/hau@1", REPO)
    with pytest.raises(HubError, match="to a repository of its own"):
        push_to_hub(store, "task/ner", REPO)


def test_the_token_never_appears_in_output_logs_or_errors(hub_env, store, tmp_path, monkeypatch, caplog):
    caplog.set_level(logging.DEBUG)
    runner = CliRunner()
    outputs = [
        runner.invoke(cli, ["push", "lang/hau@1", "--repo", REPO, "--token", hub_env.token]),
        runner.invoke(cli, ["push", "lang/hau@1", "--repo", REPO, "--token", hub_env.token, "--json"]),
        runner.invoke(cli, ["pull", "tester/missing", "--token", hub_env.token]),
        runner.invoke(cli, ["pull", f"{REPO}@v1", "--token", "hf_wrongTokenThatIsNotValid00000000"]),
    ]
    assert outputs[0].exit_code == 0 and "pushed lang/hau@1" in outputs[0].output
    assert outputs[2].exit_code == 1 and "repository not found" in outputs[2].output
    for result in outputs:
        assert hub_env.token not in result.output and "hf_wrongToken" not in result.output
    assert hub_env.token not in caplog.text
    # it is sent only where it belongs
    assert {hit.split(" ", 1)[1] for hit in hub_env.server.find(hub_env.token)} == {"header authorization"}


def test_python_api_push_to_hub_and_from_pretrained(hub_env, base_model):
    delta = synthetic_delta(base_model, 0.05, 5, kind="language", language="swa")
    result = delta.push_to_hub("tester/swa", tag="v1")
    loaded = SparseDelta.from_pretrained("tester/swa", revision="v1")
    assert result.tag == "v1"
    assert loaded.nnz == delta.nnz and loaded.config.to_dict() == delta.config.to_dict()


def registry_file(tmp_path, monkeypatch, entries):
    path = tmp_path / "registry.json"
    path.write_text(json.dumps({"schema_version": 1, "entries": entries}))
    monkeypatch.setenv("SFTSTORE_REGISTRY", str(path))


def entry(base, kind, name, repo_id, fmt="sftstore", **extra):
    return {"base_model": str(base), "kind": kind, "name": name, "repo_id": repo_id, "revision": "main",
            "format": fmt, "source": "test", "verified": True, **extra}


def test_compose_pulls_what_the_store_lacks_through_the_registry(hub_env, store, tiny_bert_dir, tmp_path, monkeypatch):
    push_to_hub(store, "lang/hau@2", REPO)
    push_to_hub(store, "task/ner", "tester/tiny-ner")
    base = str(tiny_bert_dir.resolve())
    registry_file(tmp_path, monkeypatch, [entry(base, "language", "hau", REPO),
                                         entry(base, "task", "ner", "tester/tiny-ner", aliases=["ner-any"])])
    other_store(tmp_path, monkeypatch)
    runner = CliRunner()
    refused = runner.invoke(cli, ["compose", "--base", base, "--task", "ner", "--lang", "hau", "--no-pull"])
    assert refused.exit_code == 1 and "--no-pull" in refused.output
    result = runner.invoke(cli, ["compose", "--base", base, "--task", "ner-any", "--lang", "hau", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "composed task/ner@1 + lang/hau@1" in result.output
    stored = DeltaStore()
    assert stored.resolve("lang/hau").tensors_sha256 == store.resolve("lang/hau@2").tensors_sha256
    assert stored.resolve("lang/hau").source["repo_id"] == REPO


def test_compose_converts_a_published_composable_sft_delta(hub_env, base_model, tiny_bert_dir, tmp_path, monkeypatch):
    published = synthetic_delta(base_model, 0.05, 8, kind="language", language="hau")
    directory = tmp_path / "composable"
    to_composable_sft(published, directory, "bert")
    api = hub_env.api()
    api.create_repo("cambridge/bert-lang-sft-hau-small")
    api.upload_folder(repo_id="cambridge/bert-lang-sft-hau-small", folder_path=str(directory))
    base = str(tiny_bert_dir.resolve())
    registry_file(tmp_path, monkeypatch, [entry(base, "language", "hau", "cambridge/bert-lang-sft-hau-small",
                                                fmt="composable-sft")])
    with pytest.raises(RefNotFoundError):
        DeltaStore().resolve("lang/hau")
    result = CliRunner().invoke(cli, ["compose", "--base", base, "--lang", "hau", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    pulled = DeltaStore().load("lang/hau")
    assert pulled.config.lineage["converted_from"] == "composable-sft"
    for name, param in published.params.items():
        assert pulled.params[name].indices.tolist() == param.indices.tolist()
        assert pulled.params[name].values.tolist() == param.values.tolist()
