"""The local store: versions, aliases, dedup, rm/gc/verify, concurrent writers and killed writers."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from sftstore import DeltaFormatError, RefNotFoundError, StoreError, _io
from sftstore.demo import synthetic_delta
from sftstore.modeling import load_model
from sftstore.store import DeltaStore


@pytest.fixture
def base_model(tiny_bert_dir):
    return load_model(tiny_bert_dir, "masked-lm")


def lang(base_model, seed: int, language: str = "hau"):
    return synthetic_delta(base_model, density=0.05, seed=seed, kind="language", language=language)


def blob_names(store: DeltaStore) -> set[str]:
    return {p.name for p in store.blobs_dir.iterdir()}


def test_add_numbers_versions_per_base_kind_name(base_model):
    store = DeltaStore()
    v1, new1 = store.add(lang(base_model, 1))
    v2, new2 = store.add(lang(base_model, 2))
    other, _ = store.add(lang(base_model, 3, language="en"))
    assert (v1.version, v2.version, other.version) == (1, 2, 1)
    assert new1 and new2
    assert (v1.ref, v2.ref) == ("lang/hau@1", "lang/hau@2")
    assert store.resolve("lang/hau").version == 2  # latest is implicit
    assert store.resolve("lang/hau@1") == v1
    assert [v.ref for v in store.list(name="hau")] == ["lang/hau@1", "lang/hau@2"]
    assert [v.ref for v in store.list(kind="task")] == []


def test_load_returns_the_stored_tensors(base_model):
    store = DeltaStore()
    delta = lang(base_model, 1)
    store.add(delta)
    loaded = store.load("lang/hau")
    assert loaded.params.keys() == delta.params.keys()
    for name, entry in delta.params.items():
        assert torch.equal(loaded.params[name].indices, entry.indices.int())
        assert torch.equal(loaded.params[name].values, entry.values)
    assert loaded.config.to_dict() == delta.config.to_dict()


def test_same_bytes_make_no_second_version_or_blob(tmp_path, base_model):
    store = DeltaStore()
    directory = lang(base_model, 1).save_pretrained(tmp_path / "a")
    first, created = store.import_directory(directory)
    blobs = blob_names(store)
    again, created_again = store.import_directory(directory)
    assert created and not created_again
    assert again.version == first.version == 1
    assert blob_names(store) == blobs and len(blobs) == 3
    assert again.source == {"type": "import", "path": str(directory.resolve())}


def test_same_tensors_with_another_manifest_share_the_tensor_blob(base_model):
    store = DeltaStore()
    delta = lang(base_model, 1)
    v1, _ = store.add(delta)
    delta.config.metrics = {"f1": 0.5}
    v2, _ = store.add(delta)
    assert v2.version == 2 and v2.tensors_sha256 == v1.tensors_sha256
    assert v2.config_sha256 != v1.config_sha256
    assert len(blob_names(store)) < 6


def test_a_seeded_retraining_that_only_took_longer_is_the_same_version(base_model):
    store = DeltaStore()
    delta = lang(base_model, 1)
    delta.config.training = {"method": "lt-sft", "wall_seconds": 52.0}
    first, _ = store.add(delta)
    delta.config.training = {"method": "lt-sft", "wall_seconds": 61.5}
    again, created = store.add(delta)
    assert not created and again.version == first.version == 1
    delta.config.training = {"method": "lt-sft", "wall_seconds": 61.5, "steps": 10}
    assert store.add(delta)[0].version == 2  # any other training field is part of what the delta is


def test_aliases_resolve_move_and_go_with_their_version(base_model):
    store = DeltaStore()
    store.add(lang(base_model, 1))
    store.add(lang(base_model, 2))
    assert store.tag("lang/hau@1", "best").aliases == ("best",)
    assert store.resolve("lang/hau@best").version == 1
    store.tag("lang/hau@2", "best")
    assert store.resolve("lang/hau@best").version == 2
    assert store.resolve("lang/hau@1").aliases == ()
    store.remove("lang/hau@2")
    with pytest.raises(RefNotFoundError, match="best"):
        store.resolve("lang/hau@best")


def test_version_numbers_are_never_reused(base_model):
    store = DeltaStore()
    store.add(lang(base_model, 1))
    store.add(lang(base_model, 2))
    assert [v.ref for v in store.remove("lang/hau@2")] == ["lang/hau@2"]
    assert store.add(lang(base_model, 3))[0].version == 3
    assert len(store.remove("lang/hau")) == 2  # no version named: every version
    assert store.list() == []
    assert store.add(lang(base_model, 4))[0].version == 4


def test_refs_are_scoped_by_base(tmp_path, base_model, tiny_xlmr_dir):
    store = DeltaStore()
    store.add(lang(base_model, 1))
    store.add(synthetic_delta(load_model(tiny_xlmr_dir, "masked-lm"), 0.05, 1, kind="language", language="hau"))
    with pytest.raises(StoreError, match="several bases"):
        store.resolve("lang/hau")
    assert store.resolve("lang/hau", base=str(tiny_xlmr_dir.resolve())).base == str(tiny_xlmr_dir.resolve())
    with pytest.raises(RefNotFoundError, match="for base 'elsewhere'"):
        store.resolve("lang/hau", base="elsewhere")


def test_export_writes_the_stored_files(tmp_path, base_model):
    store = DeltaStore()
    source = lang(base_model, 1).save_pretrained(tmp_path / "a")
    version, _ = store.import_directory(source)
    out = store.export("lang/hau@1", tmp_path / "exported")
    for name in ("sft_delta.safetensors", "sft_config.json", "README.md"):
        assert (out / name).read_bytes() == (source / name).read_bytes()
    assert store.import_directory(out)[0] == version


def test_verify_reports_damaged_and_missing_blobs(base_model):
    store = DeltaStore()
    version, _ = store.add(lang(base_model, 1))
    store.add(lang(base_model, 2, language="en"))
    assert store.verify() == []
    tensors = store.blob_path(version.tensors_sha256)
    data = bytearray(tensors.read_bytes())
    data[-1] ^= 0xFF
    tensors.write_bytes(bytes(data))
    store.blob_path(version.card_sha256).unlink()
    damage = store.verify()
    assert {(d.ref, d.file) for d in damage} == {("lang/hau@1", "sft_delta.safetensors"), ("lang/hau@1", "README.md")}
    assert any("missing blob" in d.problem for d in damage)
    with pytest.raises(DeltaFormatError, match=version.tensors_sha256):  # the damaged blob, named
        store.load("lang/hau@1")


def test_gc_removes_only_unreferenced_blobs(base_model):
    store = DeltaStore()
    delta = lang(base_model, 1)
    keep, _ = store.add(delta)
    delta.config.metrics = {"f1": 0.5}
    gone, _ = store.add(delta)
    store.add(lang(base_model, 2))
    store.remove(gone.ref)
    report = store.gc()
    assert report.removed_blobs == 2  # the manifest and card of @2; its tensors are shared with @1
    assert store.blob_path(gone.tensors_sha256).exists()
    assert report.freed_bytes > 0
    assert store.verify() == []
    assert store.load(keep.ref).nnz == delta.nnz


WORKER = textwrap.dedent(
    """
    import os, sys, time
    from pathlib import Path
    from sftstore.store import DeltaStore
    go = Path(sys.argv[1])
    while not go.exists():
        time.sleep(0.01)
    store = DeltaStore()
    for directory in sys.argv[2:]:
        version, _ = store.import_directory(directory)
        print(directory, version.version, flush=True)
    """
)


def test_concurrent_writers_get_distinct_versions(tmp_path, base_model, store_home):
    directories = [lang(base_model, seed).save_pretrained(tmp_path / f"d{seed}") for seed in range(12)]
    go = tmp_path / "go"
    env = {**os.environ, "SFTSTORE_HOME": str(store_home)}
    DeltaStore()  # create the index once, as a user's first command would
    workers = [
        subprocess.Popen([sys.executable, "-c", WORKER, str(go), *map(str, directories[i::4])],
                         env=env, stdout=subprocess.PIPE, text=True)
        for i in range(4)
    ]
    go.touch()
    outputs = [worker.communicate(timeout=300)[0] for worker in workers]
    assert all(worker.returncode == 0 for worker in workers)
    assigned = dict(line.rsplit(" ", 1) for out in outputs for line in out.splitlines())
    assert sorted(int(v) for v in assigned.values()) == list(range(1, 13))
    store = DeltaStore()
    assert [v.version for v in store.list()] == list(range(1, 13))
    assert store.verify() == []


CRASHER = textwrap.dedent(
    """
    import os, sys
    import sftstore.store as store_module
    from sftstore.store import DeltaStore

    def die(*args, **kwargs):
        os._exit(9)

    point = sys.argv[1]
    if point == "before-index":  # blobs durable, index transaction not begun
        DeltaStore._write = die
    elif point == "inside-transaction":  # after UPDATE last_version, before INSERT and COMMIT
        class Clock:
            now = staticmethod(die)
        store_module.datetime = Clock
    elif point == "mid-blob":  # temp file written, not yet renamed into blobs/
        store_module.os.replace = die
    DeltaStore().import_directory(sys.argv[2])
    """
)


@pytest.mark.parametrize("point", ["before-index", "inside-transaction", "mid-blob"])
def test_a_killed_add_leaves_nothing_half_registered(tmp_path, base_model, store_home, point):
    directory = lang(base_model, 1).save_pretrained(tmp_path / "d")
    env = {**os.environ, "SFTSTORE_HOME": str(store_home)}
    result = subprocess.run([sys.executable, "-c", CRASHER, point, str(directory)], env=env, timeout=300)
    assert result.returncode == 9
    store = DeltaStore()
    assert store.list() == []
    assert store.verify() == []
    leftovers = list(store.tmp_dir.iterdir())
    if point == "mid-blob":  # the writer is gone: its temp files are stale a minute later
        assert leftovers and not blob_names(store)
        assert store.gc().removed_temp_files == 0
        a_minute_ago = time.time() - _io.GONE_WRITER_GRACE_SECONDS - 1
        for path in leftovers:
            os.utime(path, (a_minute_ago, a_minute_ago))
        assert store.gc().removed_temp_files == len(leftovers)
    else:
        assert len(blob_names(store)) == 3 and not leftovers
        assert store.gc().removed_blobs == 3
    assert not blob_names(store) and not list(store.tmp_dir.iterdir())
    version, created = store.import_directory(directory)
    assert created and version.version == 1


def temp_file(directory: Path, host: str, pid: int, age_seconds: float = 0) -> Path:
    """A temp file as `atomic_write_bytes` names it, written by `pid` on `host`, `age_seconds` old."""
    path = directory / f".abc.sft-{host}-{pid}-x{int(age_seconds)}y.tmp"
    path.write_bytes(b"partial")
    when = time.time() - age_seconds
    os.utime(path, (when, when))
    return path


def dead_pid() -> int:
    process = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(process.stdout)


def test_stale_temp_files_go_at_the_next_write_or_gc_and_live_writers_keep_theirs(store_home, base_model, tmp_path):
    store = DeltaStore()
    host, minute = _io._HOST, _io.GONE_WRITER_GRACE_SECONDS + 1
    live = temp_file(store.tmp_dir, host, os.getpid(), age_seconds=2 * minute)
    other_host_young = temp_file(store.tmp_dir, "elsewhere", 1)
    temp_file(store.tmp_dir, "elsewhere", 1, age_seconds=2 * _io.STALE_AFTER_SECONDS)  # stale by age
    killed_young = temp_file(store.tmp_dir, host, dead_pid())  # its writer may live in another PID namespace
    temp_file(store.tmp_dir, host, dead_pid(), age_seconds=minute)  # gone a minute ago: stale
    old_style = store.tmp_dir / ".abc.x1y2.tmp"  # an earlier sftstore's name: stale by age only
    old_style.write_bytes(b"partial")
    old = time.time() - 2 * _io.STALE_AFTER_SECONDS
    os.utime(old_style, (old, old))
    assert store.gc().removed_temp_files == 3
    assert sorted(p.name for p in store.tmp_dir.iterdir()) == sorted(
        p.name for p in (live, other_host_young, killed_young))
    killed = temp_file(store.tmp_dir, host, dead_pid(), age_seconds=minute)
    store.add(lang(base_model, 1))  # the next write removes it too
    assert not killed.exists() and live.exists()
    artifact = lang(base_model, 1).save_pretrained(tmp_path / "artifact")
    left_in_artifact = temp_file(artifact, host, dead_pid(), age_seconds=minute)
    users_file = artifact / "notes.tmp"
    users_file.write_text("not ours")
    os.utime(users_file, (old, old))
    lang(base_model, 2).save_pretrained(artifact)
    assert not left_in_artifact.exists() and users_file.exists()


def test_store_root_defaults_to_sftstore_home(store_home):
    assert DeltaStore().root == Path(store_home)
    assert (Path(store_home) / "index.sqlite").is_file()


def test_unknown_manifest_fields_survive_import_and_export(tmp_path, base_model):
    import json

    directory = lang(base_model, 1).save_pretrained(tmp_path / "a")
    manifest = json.loads((directory / "sft_config.json").read_text())
    manifest["custom_note"] = {"keep": "me"}
    (directory / "sft_config.json").write_text(json.dumps(manifest))
    store = DeltaStore()
    store.import_directory(directory)
    exported = store.export("lang/hau", tmp_path / "out")
    assert json.loads((exported / "sft_config.json").read_text())["custom_note"] == {"keep": "me"}


def test_deltas_filed_under_a_renamed_base_id_by_an_earlier_sftstore_are_moved(store_home, base_model):
    import sqlite3

    store = DeltaStore()
    delta = lang(base_model, 1)
    delta.config.base_model.id = "xlm-roberta-base"
    store.add(delta)
    with sqlite3.connect(store.index_path) as db:  # as an sftstore that filed by the id as given did
        db.execute("UPDATE deltas SET base='FacebookAI/xlm-roberta-base'")
    reopened = DeltaStore()
    assert [(v.base, v.ref) for v in reopened.list()] == [("xlm-roberta-base", "lang/hau@1")]
    assert reopened.resolve("lang/hau", "FacebookAI/xlm-roberta-base").version == 1
