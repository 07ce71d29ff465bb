"""Push and pull through the Hub protocol, against the project's own server on 127.0.0.1.

The real `huggingface_hub` client does the talking (fixtures `hub_server` / `hub_env` from
`tests/hub_server.py`); each test uses its own server, Hub cache and store.
"""

from __future__ import annotations

import hashlib
import json
import logging

import pytest
import torch
from click.testing import CliRunner
from huggingface_hub import HfApi, ModelCard

from sftstore import BaseModelMismatchError, RefNotFoundError, SftError, SparseDelta
from sftstore.demo import NER_LABELS, synthetic_delta
from sftstore.format import CARD_FILE, CONFIG_FILE, MASKS_FILE, TENSORS_FILE
from sftstore.hub import pull_from_hub, push_to_hub
from sftstore.interop import COMPOSABLE_SFT_FILE, to_composable_sft
from sftstore.modeling import base_parameters, load_model
from sftstore.store import DeltaStore
from sftstore.subnetworks import SubnetworkMasks
from sftstore.transfer import HubError
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
    published = {name: hashlib.sha256(data).hexdigest() for name, data in hub_env.server.files(REPO, "v1").items()
                 if name != ".gitattributes"}
    assert pulled.version.source == {"type": "hub", "repo_id": REPO, "revision": "v1", "commit": v1.commit,
                                     "files_sha256": published}
    assert pulled.version.config_sha256 == published[CONFIG_FILE]  # the published bytes, kept as they are
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


def _same_size_change(name: str, data: bytes) -> bytes:
    """A tampered copy of an artifact file, as long as the original (the download client cannot tell)."""
    if name == CONFIG_FILE:
        return data.replace(b'"task": "ner"', b'"task": "pos"')  # a manifest saying another task
    if name == CARD_FILE:
        return data.replace(b"sparse-fine-tuning", b"sparse-fine-tuned!", 1)
    changed = bytearray(data)
    changed[-1] ^= 0x01
    return bytes(changed)


@pytest.mark.parametrize("lfs", [False, True], ids=["regular", "lfs"])
@pytest.mark.parametrize("name", [TENSORS_FILE, CONFIG_FILE, CARD_FILE, MASKS_FILE])
def test_every_downloaded_file_is_checked_against_the_hubs_hash(hub_env, base_model, tmp_path, monkeypatch, name, lfs):
    if lfs:  # the server advertises each file's sha256 (lfs.sha256, ETag) as the Hub does for LFS files
        hub_env.server.lfs_suffixes = (".safetensors", ".json", ".md")
    delta = synthetic_delta(base_model, 0.05, 4, kind="task", task="ner", task_type="token-classification",
                            labels=NER_LABELS)
    delta.subnetworks = SubnetworkMasks.from_bool(
        {"hau": {n: torch.rand(p.shape, generator=torch.Generator().manual_seed(1)) < 0.1
                 for n, p in base_parameters(base_model).items()}})
    DeltaStore().add(delta)
    push_to_hub(DeltaStore(), "task/ner", "tester/ner")
    original = hub_env.server.files("tester/ner")[name]
    tampered = _same_size_change(name, original)
    assert tampered != original and len(tampered) == len(original)
    hub_env.server.tamper("tester/ner", name, tampered)
    remote = other_store(tmp_path, monkeypatch)
    with pytest.raises(HubError, match=f"{name} does not match the hash the Hub reports.*nothing stored"):
        pull_from_hub(remote, "tester/ner", "v1")
    assert remote.list() == [] and list(remote.blobs_dir.iterdir()) == []


def test_an_offline_pull_checks_the_cached_files(hub_env, store, tmp_path, monkeypatch):
    push_to_hub(store, "lang/hau@1", REPO)
    pull_from_hub(other_store(tmp_path, monkeypatch, "first"), REPO, "v1")
    cached = next(hub_env.cache_dir.glob(f"models--tester--tiny-lang-hau/snapshots/*/{CONFIG_FILE}")).resolve()
    cached.write_bytes(cached.read_bytes().replace(b'"language": "hau"', b'"language": "yor"'))
    hub_env.set_offline()
    offline_store = other_store(tmp_path, monkeypatch, "second")
    with pytest.raises(HubError, match=f"{CONFIG_FILE} does not match the hash the Hub reports"):
        pull_from_hub(offline_store, REPO, "v1")
    assert offline_store.list() == []


def test_verify_finds_a_pulled_file_that_is_no_longer_what_the_hub_published(hub_env, store, tmp_path, monkeypatch):
    push_to_hub(store, "lang/hau@1", REPO)
    remote = other_store(tmp_path, monkeypatch)
    version = pull_from_hub(remote, REPO, "v1").version
    blob = remote.blob_path(version.config_sha256)
    blob.write_bytes(blob.read_bytes().replace(b'"language": "hau"', b'"language": "yor"'))
    result = CliRunner().invoke(cli, ["verify", "--json"])
    assert result.exit_code == 1
    assert [(d["file"], d["problem"].split(",")[0]) for d in json.loads(result.output)] == [
        (CONFIG_FILE, f"content hashes to {hashlib.sha256(blob.read_bytes()).hexdigest()}")]


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


def publish_composable_sft(hub_env, delta, repo_id, tmp_path):
    """Upload `delta` as a composable-sft repository (`pytorch_diff.bin`), as cambridgeltl publishes them."""
    directory = tmp_path / repo_id.replace("/", "--")
    to_composable_sft(delta, directory, "bert")
    hub_env.api().create_repo(repo_id)
    hub_env.api().upload_folder(repo_id=repo_id, folder_path=str(directory))


def test_a_tampered_composable_sft_file_is_refused(hub_env, base_model, tiny_bert_dir, tmp_path, monkeypatch):
    publish_composable_sft(hub_env, synthetic_delta(base_model, 0.05, 8, kind="language", language="hau"),
                           "cambridge/hau", tmp_path)
    registry_file(tmp_path, monkeypatch, [entry(tiny_bert_dir.resolve(), "language", "hau", "cambridge/hau",
                                                fmt="composable-sft")])
    hub_env.server.tamper("cambridge/hau", COMPOSABLE_SFT_FILE,
                          _same_size_change(COMPOSABLE_SFT_FILE, hub_env.server.files("cambridge/hau")[COMPOSABLE_SFT_FILE]))
    with pytest.raises(HubError, match=f"{COMPOSABLE_SFT_FILE} does not match the hash the Hub reports"):
        pull_from_hub(DeltaStore(), "cambridge/hau")
    assert DeltaStore().list() == []


def test_pulling_a_composable_sft_repository_again_adds_no_version(hub_env, base_model, tiny_bert_dir, tmp_path,
                                                                   monkeypatch):
    publish_composable_sft(hub_env, synthetic_delta(base_model, 0.05, 8, kind="language", language="hau"),
                           "cambridge/hau", tmp_path)
    registry_file(tmp_path, monkeypatch, [entry(tiny_bert_dir.resolve(), "language", "hau", "cambridge/hau",
                                                fmt="composable-sft")])
    first = pull_from_hub(DeltaStore(), "cambridge/hau")
    monkeypatch.setattr("sftstore.config.datetime", _Later)  # converted again, a second later
    again = CliRunner().invoke(cli, ["pull", "cambridge/hau"])
    assert first.created and again.exit_code == 0, again.output
    assert "already stored as lang/hau@1 " in again.output
    assert [v.ref for v in DeltaStore().list()] == ["lang/hau@1"]


class _Later:
    """`datetime` one day ahead: conversions then record another `created_at`."""

    @staticmethod
    def now(tz=None):
        from datetime import datetime, timedelta

        return datetime.now(tz) + timedelta(days=1)


def test_importing_a_composable_sft_directory_again_adds_no_version(base_model, tiny_bert_dir, tmp_path, monkeypatch):
    directory = tmp_path / "sft"
    to_composable_sft(synthetic_delta(base_model, 0.05, 8, kind="language", language="hau"), directory, "bert")
    command = ["import", str(directory), "--base", str(tiny_bert_dir), "--lang", "hau"]
    first = CliRunner().invoke(cli, command)
    monkeypatch.setattr("sftstore.config.datetime", _Later)
    again = CliRunner().invoke(cli, command)
    assert "added lang/hau@1 " in first.output and "already stored as lang/hau@1 " in again.output
    assert len(DeltaStore().list()) == 1


def test_registry_names_resolve_the_same_with_and_without_pull_and_are_never_pulled_twice(
        hub_env, base_model, tiny_bert_dir, tmp_path, monkeypatch):
    base = str(tiny_bert_dir.resolve())
    publish_composable_sft(hub_env, synthetic_delta(base_model, 0.05, 8, kind="language", language="hau"),
                           "cambridge/hau", tmp_path)
    task = synthetic_delta(base_model, 0.05, 9, kind="task", task="masakhaner", task_type="token-classification",
                           labels=NER_LABELS)
    publish_composable_sft(hub_env, task, "cambridge/masakhaner", tmp_path)
    registry_file(tmp_path, monkeypatch, [
        entry(base, "language", "hau", "cambridge/hau", fmt="composable-sft"),
        entry(base, "task", "masakhaner", "cambridge/masakhaner", fmt="composable-sft", aliases=["ner"],
              task_type="token-classification", labels=list(NER_LABELS), source_languages=["en"]),
    ])
    runner = CliRunner()
    command = ["compose", "--base", base, "--task", "ner", "--lang", "ha", "--device", "cpu"]  # alias, ISO 639-1
    first = runner.invoke(cli, command)
    assert first.exit_code == 0, first.output
    assert "composed task/masakhaner@1 + lang/hau@1" in first.output
    hub_env.server.clear_requests()
    for extra in ([], ["--no-pull"]):
        again = runner.invoke(cli, command + extra)
        assert again.exit_code == 0 and "composed task/masakhaner@1 + lang/hau@1" in again.output, again.output
    assert hub_env.server.requests == []  # what is stored is never pulled again
    assert [v.ref for v in DeltaStore().list()] == ["lang/hau@1", "task/masakhaner@1"]
    task = DeltaStore().resolve("task/masakhaner")  # the publisher's source language reaches the card
    card = ModelCard(DeltaStore().blob_path(task.card_sha256).read_text()).data.to_dict()
    assert DeltaStore().manifest(task)["lineage"]["source_languages"] == ["en"] and card["language"] == ["en"]


def test_main_points_at_the_highest_pushed_version(hub_env, store, tmp_path, monkeypatch):
    v2 = push_to_hub(store, "lang/hau@2", REPO)
    v1 = push_to_hub(store, "lang/hau@1", REPO)  # an older version, pushed later
    refs = hub_env.server.refs(REPO)
    assert refs["tags"] == {"v1": v1.commit, "v2": v2.commit}
    assert refs["branches"] == {"main": v2.commit}  # and no push branch left behind
    for tag, number in (("v1", 1), ("v2", 2)):
        assert hub_env.server.files(REPO, tag)[TENSORS_FILE] == store.blob_path(
            store.resolve(f"lang/hau@{number}").tensors_sha256).read_bytes()
    latest = pull_from_hub(other_store(tmp_path, monkeypatch), REPO)
    assert latest.version.tensors_sha256 == store.resolve("lang/hau@2").tensors_sha256
    v3 = store.add(synthetic_delta(load_model(store.resolve("lang/hau").base), 0.05, 7, kind="language",
                                   language="hau"))[0]
    pushed = push_to_hub(store, v3.ref, REPO)
    assert hub_env.server.refs(REPO)["branches"]["main"] == pushed.commit  # a newer version moves main


def test_a_push_racing_another_fails_cleanly_instead_of_overwriting_it(hub_env, store, monkeypatch):
    push_to_hub(store, "lang/hau@1", REPO)
    api = hub_env.api()
    list_files = HfApi.list_repo_files

    def someone_pushes_meanwhile(self, *args, **kwargs):
        api.upload_file(path_or_fileobj=b"theirs", path_in_repo="notes.txt", repo_id=REPO)
        return list_files(self, *args, **kwargs)

    monkeypatch.setattr(HfApi, "list_repo_files", someone_pushes_meanwhile)
    theirs_before = hub_env.server.refs(REPO)["branches"]["main"]
    with pytest.raises(HubError, match="changed while pushing .*run the push again"):
        push_to_hub(store, "lang/hau@2", REPO)
    refs = hub_env.server.refs(REPO)
    assert "v2" not in refs["tags"] and refs["branches"]["main"] != theirs_before
    assert "notes.txt" in hub_env.server.files(REPO)  # their commit stands
    assert store.remotes(store.resolve("lang/hau@2")) == []


@pytest.mark.parametrize(("task", "reason"), [
    ("dp", "dependency parsing: not supported by compose"),
    ("dp-ms", "dependency parsing: not supported by compose"),
])
def test_an_entry_compose_cannot_use_is_refused_before_any_download(hub_env, task, reason):
    result = CliRunner().invoke(cli, ["compose", "--base", "google-bert/bert-base-multilingual-cased", "--task", task])
    assert result.exit_code == 1 and result.output.count("\n") == 1, result.output
    assert f"cambridgeltl/mbert-task-sft-{task} cannot be used: {reason}" in result.output
    assert hub_env.server.requests == []
    pulled = CliRunner().invoke(cli, ["pull", f"cambridgeltl/mbert-task-sft-{task}"])
    assert pulled.exit_code == 1 and f"{reason}" in pulled.output and "nothing downloaded" in pulled.output
    assert hub_env.server.requests == []


def test_labels_given_on_the_command_line_make_an_entry_without_labels_compose(
        hub_env, base_model, tiny_bert_dir, tmp_path, monkeypatch):
    base = str(tiny_bert_dir.resolve())
    pos_labels = ["ADJ", "ADP", "ADV", "AUX", "CCONJ", "DET", "NOUN"]
    publish_composable_sft(hub_env, synthetic_delta(load_model(tiny_bert_dir, "token-classification", pos_labels),
                                                    0.05, 3, kind="task", task="pos", task_type="token-classification",
                                                    labels=pos_labels), "cambridge/pos", tmp_path)
    registry_file(tmp_path, monkeypatch, [entry(base, "task", "pos", "cambridge/pos", fmt="composable-sft",
                                                task_type="token-classification")])
    runner = CliRunner()
    refused = runner.invoke(cli, ["compose", "--base", base, "--task", "pos"])
    assert refused.exit_code == 1 and "labels unknown" in refused.output and "pass --labels" in refused.output
    composed = runner.invoke(cli, ["compose", "--base", base, "--task", "pos", "--labels", ",".join(pos_labels),
                                   "--device", "cpu"])
    assert composed.exit_code == 0, composed.output
    assert DeltaStore().manifest(DeltaStore().resolve("task/pos"))["labels"] == pos_labels
    other = runner.invoke(cli, ["compose", "--base", base, "--task", "pos", "--labels", "A,B"])
    assert other.exit_code == 1 and "is stored with labels" in other.output


def test_an_offline_pull_refuses_cached_copies_it_cannot_verify(hub_env, store, tmp_path, monkeypatch):
    monkeypatch.setattr("huggingface_hub.file_download.are_symlinks_supported", lambda *args, **kwargs: False)
    push_to_hub(store, "lang/hau@1", REPO)
    pull_from_hub(other_store(tmp_path, monkeypatch, "first"), REPO, "v1")  # online: verified, cached as copies
    hub_env.set_offline()
    offline_store = other_store(tmp_path, monkeypatch, "second")
    with pytest.raises(HubError, match="cannot be verified: the Hugging Face cache keeps a copy"):
        pull_from_hub(offline_store, REPO, "v1")
    assert offline_store.list() == []


def test_a_damaged_download_is_dropped_from_the_cache_so_a_later_pull_succeeds(hub_env, store, tmp_path, monkeypatch):
    push_to_hub(store, "lang/hau@1", REPO)
    hub_env.server.tamper(REPO, TENSORS_FILE, _same_size_change(TENSORS_FILE, hub_env.server.files(REPO)[TENSORS_FILE]))
    remote = other_store(tmp_path, monkeypatch)
    with pytest.raises(HubError, match="removed from the cache: pull again"):
        pull_from_hub(remote, REPO, "v1")
    hub_env.server.tamper(REPO, TENSORS_FILE, None)  # the server serves the right bytes again
    assert pull_from_hub(remote, REPO, "v1").created


def test_a_push_cut_off_before_its_tag_is_finished_by_the_next_push(hub_env, store, monkeypatch):
    create_tag = HfApi.create_tag
    monkeypatch.setattr(HfApi, "create_tag", lambda *args, **kwargs: (_ for _ in ()).throw(ConnectionError("cut")))
    with pytest.raises(SftError):
        push_to_hub(store, "lang/hau@1", REPO)
    commits = len(hub_env.server.commits(REPO))
    monkeypatch.setattr(HfApi, "create_tag", create_tag)
    result = push_to_hub(store, "lang/hau@1", REPO)
    assert len(hub_env.server.commits(REPO)) == commits  # no second "Add lang/hau v1" commit
    assert hub_env.server.refs(REPO)["tags"] == {"v1": result.commit} == {"v1": hub_env.server.refs(REPO)["branches"]["main"]}


def test_a_composable_sft_pull_verifies_clean(hub_env, base_model, tiny_bert_dir, tmp_path, monkeypatch):
    delta = synthetic_delta(base_model, 0.05, 8, kind="language", language="hau")
    directory = tmp_path / "published"
    to_composable_sft(delta, directory, "bert")
    (directory / "README.md").write_text("# their card\n")  # a published repository has its own card
    hub_env.api().create_repo("cambridge/hau")
    hub_env.api().upload_folder(repo_id="cambridge/hau", folder_path=str(directory))
    registry_file(tmp_path, monkeypatch, [entry(tiny_bert_dir.resolve(), "language", "hau", "cambridge/hau",
                                                fmt="composable-sft")])
    version = pull_from_hub(DeltaStore(), "cambridge/hau").version
    assert set(version.source["files_sha256"]) == {COMPOSABLE_SFT_FILE}
    assert DeltaStore().verify() == []


def test_labels_for_an_sftstore_entry_are_refused_clearly(hub_env, store, tiny_bert_dir, tmp_path, monkeypatch):
    push_to_hub(store, "task/ner", "tester/tiny-ner")
    base = str(tiny_bert_dir.resolve())
    registry_file(tmp_path, monkeypatch, [entry(base, "task", "ner", "tester/tiny-ner")])
    other_store(tmp_path, monkeypatch)
    for command in (["compose", "--base", base, "--task", "ner", "--labels", "A,B"],
                    ["pull", "tester/tiny-ner", "--labels", "A,B"]):
        result = CliRunner().invoke(cli, command)
        assert result.exit_code == 1 and "--labels applies to composable-sft deltas only" in result.output
    assert DeltaStore().list() == []


def test_a_delta_filed_under_a_renamed_base_id_is_found_under_both(hub_env, base_model, tmp_path, monkeypatch):
    delta = synthetic_delta(base_model, 0.05, 8, kind="language", language="hau")
    delta.config.base_model.id = "FacebookAI/xlm-roberta-base"
    store = DeltaStore()
    version, _ = store.add(delta)
    assert version.base == "xlm-roberta-base"
    assert store.resolve("lang/hau", "FacebookAI/xlm-roberta-base") == store.resolve("lang/hau", "xlm-roberta-base")
    push_to_hub(store, "lang/hau", REPO)
    store.add(synthetic_delta(base_model, 0.05, 9, kind="language", language="hau"))  # v2, base: the tiny dir
    remote = other_store(tmp_path, monkeypatch)
    pulled = pull_from_hub(remote, REPO, base="FacebookAI/xlm-roberta-base")
    assert pulled.version.base == "xlm-roberta-base"
    hub_env.server.clear_requests()
    from sftstore.hub import resolve_or_pull
    from sftstore.naming import DeltaRef

    assert resolve_or_pull(remote, DeltaRef("language", "hau"), "FacebookAI/xlm-roberta-base") == pulled.version
    assert hub_env.server.requests == []  # stored under the legacy id: never pulled again
