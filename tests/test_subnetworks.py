"""Per-language sub-network masks kept with a delta: packing, `sft_masks.safetensors`, its validation,
the store (add, load, export, verify, gc, an index from before masks), the Hub, `sft show` and
`sft overlap --masks`."""

from __future__ import annotations

import hashlib
import json
import sqlite3

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open
from safetensors.torch import save_file

from sftstore import DeltaFormatError, SparseDelta
from sftstore.demo import NER_LABELS, synthetic_delta
from sftstore.format import CONFIG_FILE, MASKS_FILE
from sftstore.hub import pull_from_hub, push_to_hub
from sftstore.modeling import base_parameters, load_model
from sftstore.store import DeltaStore
from sftstore.subnetworks import SubnetworkMasks
from sftstore_cli.main import cli
from test_store_scale import SCHEMA_0


def random_masks(model, languages, density, seed=0) -> dict[str, dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    return {lang: {n: torch.rand(p.shape, generator=generator) < density for n, p in base_parameters(model).items()}
            for lang in languages}


@pytest.fixture
def base_model(tiny_bert_dir):
    return load_model(tiny_bert_dir, "token-classification", NER_LABELS)


@pytest.fixture
def bool_masks(base_model):
    return random_masks(base_model, ["hau", "swa", "yor"], 0.1)


@pytest.fixture
def s4_delta(base_model, bool_masks) -> SparseDelta:
    delta = synthetic_delta(base_model, 0.05, 5, kind="task", task="ner", task_type="token-classification",
                            labels=NER_LABELS)
    delta.subnetworks = SubnetworkMasks.from_bool(bool_masks)
    return delta


def assert_same_masks(masks: SubnetworkMasks, expected: dict[str, dict[str, torch.Tensor]]) -> None:
    assert list(masks) == list(expected)
    for language, tensors in expected.items():
        unpacked = masks[language]
        assert unpacked.keys() == tensors.keys()
        for name, mask in tensors.items():
            assert unpacked[name].dtype == torch.bool and torch.equal(unpacked[name], mask), (language, name)


# ---- packing ------------------------------------------------------------------------------------


def test_packing_round_trips_odd_sizes_and_counts():
    masks = {"hau": {"a": torch.tensor([True, False, True]), "b": torch.ones(3, 5, dtype=torch.bool)},
             "swa": {"a": torch.tensor([False, False, True]), "b": torch.zeros(3, 5, dtype=torch.bool)}}
    packed = SubnetworkMasks.from_bool(masks)
    assert_same_masks(packed, masks)
    assert packed.nnz("hau") == 17 and packed.nnz("swa") == 1
    assert packed.shapes == {"a": (3,), "b": (3, 5)}
    assert list(packed.select(["swa"])) == ["swa"]
    assert packed == SubnetworkMasks.from_bool(masks) and packed != packed.select(["hau"])
    tensors = packed.to_tensors()  # numpy's packbits order, unused bits zero
    assert tensors["hau::a"].tolist() == [0b10100000]
    assert tensors["hau::b"].tolist() == [0xFF, 0b11111110]


def test_masks_of_different_parameters_are_refused():
    with pytest.raises(ValueError, match="'swa'"):
        SubnetworkMasks.from_bool({"hau": {"a": torch.ones(3, dtype=torch.bool)},
                                   "swa": {"a": torch.ones(4, dtype=torch.bool)}})
    with pytest.raises(ValueError, match="mask name"):
        SubnetworkMasks.from_bool({"../x": {"a": torch.ones(3, dtype=torch.bool)}})


# ---- the artifact file --------------------------------------------------------------------------


def test_saved_masks_file_is_bound_by_the_manifest_and_reads_back(tmp_path, s4_delta, bool_masks):
    directory = s4_delta.save_pretrained(tmp_path / "s4")
    data = (directory / MASKS_FILE).read_bytes()
    manifest = json.loads((directory / CONFIG_FILE).read_text())
    assert manifest["masks_sha256"] == hashlib.sha256(data).hexdigest()
    with safe_open(str(directory / MASKS_FILE), framework="pt") as handle:  # the on-disk format, read directly
        metadata = handle.metadata()
        assert metadata["format"] == "sftstore-masks" and metadata["format_version"] == "1"
        shapes = json.loads(metadata["shapes"])
        for language, tensors in bool_masks.items():
            for name, mask in tensors.items():
                bits = handle.get_tensor(f"{language}::{name}")
                assert bits.dtype == torch.uint8
                expected = np.packbits(mask.reshape(-1).numpy())
                assert np.array_equal(bits.numpy(), expected) and shapes[name] == list(mask.shape)
    loaded = SparseDelta.from_pretrained(directory)
    assert_same_masks(loaded.subnetworks, bool_masks)
    assert "sub-network masks" in (directory / "README.md").read_text()
    assert s4_delta.save_pretrained(tmp_path / "again") and (tmp_path / "again" / MASKS_FILE).read_bytes() == data


def test_saving_a_delta_without_masks_removes_a_stale_masks_file(tmp_path, s4_delta):
    directory = s4_delta.save_pretrained(tmp_path / "d")
    s4_delta.subnetworks = None
    s4_delta.save_pretrained(directory)
    assert not (directory / MASKS_FILE).exists()
    assert SparseDelta.from_pretrained(directory).subnetworks is None


def _rewrite_masks(directory, tensors, metadata=None):
    """Replace the masks file and re-bind it in the manifest, so validation reaches its contents."""
    save_file(tensors, str(directory / MASKS_FILE),
              metadata=metadata or {"format": "sftstore-masks", "format_version": "1", "shapes": json.dumps({"w": [3]}),
                                    "languages": '["hau"]'})
    manifest = json.loads((directory / CONFIG_FILE).read_text())
    manifest["masks_sha256"] = hashlib.sha256((directory / MASKS_FILE).read_bytes()).hexdigest()
    (directory / CONFIG_FILE).write_text(json.dumps(manifest))


@pytest.mark.parametrize("tensors, metadata, message", [
    ({"hau::w": torch.tensor([0b0100000], dtype=torch.int8)}, None, "expected uint8 of shape"),
    ({"hau::w": torch.tensor([0b10100000, 0], dtype=torch.uint8)}, None, "expected uint8 of shape"),
    ({"hau::w": torch.tensor([0b10100001], dtype=torch.uint8)}, None, "padding bits"),
    ({"hau-w": torch.tensor([0], dtype=torch.uint8)}, None, "expected 'LANGUAGE::PARAMETER'"),
    ({"hau::v": torch.tensor([0], dtype=torch.uint8)}, None, "no entry for 'v'"),
    ({"hau::w": torch.tensor([0], dtype=torch.uint8)}, {"format": "sftstore-delta", "format_version": "1"},
     "expected 'sftstore-masks'"),
    ({"hau::w": torch.tensor([0], dtype=torch.uint8)},
     {"format": "sftstore-masks", "format_version": "1", "shapes": json.dumps({"w": [3], "u": [2]}),
      "languages": '["hau"]'}, "lack parameter"),
    ({"hau::w": torch.tensor([0], dtype=torch.uint8)},
     {"format": "sftstore-masks", "format_version": "1", "shapes": json.dumps({"w": [3]}), "languages": '["swa"]'},
     "metadata 'languages'"),
    ({"hau::w": torch.tensor([0], dtype=torch.uint8)},
     {"format": "sftstore-masks", "format_version": "1", "shapes": json.dumps({"w": [3]})}, "metadata 'languages'"),
    ({}, {"format": "sftstore-masks", "format_version": "1", "shapes": "{}", "languages": "[]"}, "metadata 'languages'"),
    *[({"hau::w": torch.tensor([0], dtype=torch.uint8)},
       {"format": "sftstore-masks", "format_version": "1", "shapes": json.dumps({"w": shape}), "languages": '["hau"]'},
       "metadata 'shapes' entry for 'w'") for shape in ([True], [2**64], [2**32, 2**32], [-1], "x", 5)],
])
def test_malformed_masks_files_are_refused_naming_file_and_tensor(tmp_path, s4_delta, tensors, metadata, message):
    directory = s4_delta.save_pretrained(tmp_path / "d")
    _rewrite_masks(directory, tensors, metadata)
    with pytest.raises(DeltaFormatError, match=message) as info:
        SparseDelta.from_pretrained(directory)
    assert MASKS_FILE in str(info.value)


def test_masks_of_another_shape_than_the_delta_are_refused(tmp_path, s4_delta, base_model):
    name, entry = next(iter(s4_delta.params.items()))
    other = dict(s4_delta.subnetworks["hau"])
    other[name] = torch.ones(entry.numel + 1, dtype=torch.bool)
    s4_delta.subnetworks = SubnetworkMasks.from_bool({"hau": other})
    directory = s4_delta.save_pretrained(tmp_path / "d")
    with pytest.raises(DeltaFormatError, match=f"the masks of '{name}' have shape"):
        SparseDelta.from_pretrained(directory)


def test_masks_file_missing_unbound_or_tampered_is_refused(tmp_path, s4_delta, lang_delta):
    directory = s4_delta.save_pretrained(tmp_path / "d")
    data = (directory / MASKS_FILE).read_bytes()
    (directory / MASKS_FILE).write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    with pytest.raises(DeltaFormatError, match="masks_sha256"):
        SparseDelta.from_pretrained(directory)
    (directory / MASKS_FILE).unlink()
    with pytest.raises(DeltaFormatError, match=f"there is no {MASKS_FILE}"):
        SparseDelta.from_pretrained(directory)
    plain = lang_delta.save_pretrained(tmp_path / "plain")
    (plain / MASKS_FILE).write_bytes(data)
    with pytest.raises(DeltaFormatError, match="no masks_sha256"):
        SparseDelta.from_pretrained(plain)
    manifest = json.loads((directory / CONFIG_FILE).read_text())
    manifest["masks_sha256"] = 7
    (directory / CONFIG_FILE).write_text(json.dumps(manifest))
    with pytest.raises(DeltaFormatError, match="'masks_sha256'"):
        SparseDelta.from_pretrained(directory)


# ---- the store ----------------------------------------------------------------------------------


def test_store_keeps_masks_through_add_load_export_import_verify_and_gc(tmp_path, s4_delta, bool_masks, base_model):
    store = DeltaStore()
    version, _ = store.add(s4_delta)
    assert version.masks_sha256 is not None and MASKS_FILE in version.blobs
    assert_same_masks(store.load("task/ner").subnetworks, bool_masks)
    exported = store.export("task/ner", tmp_path / "out")
    assert (exported / MASKS_FILE).read_bytes() == store.blob_path(version.masks_sha256).read_bytes()
    other = DeltaStore(tmp_path / "other")
    imported, _ = other.import_directory(exported)
    assert imported.masks_sha256 == version.masks_sha256
    plain, _ = store.add(synthetic_delta(base_model, 0.05, 6, kind="language", language="hau"))
    assert plain.masks_sha256 is None and MASKS_FILE not in plain.blobs
    store.export("lang/hau", exported)  # over the S4 export: its masks file must not survive
    assert not (exported / MASKS_FILE).exists() and SparseDelta.from_pretrained(exported).subnetworks is None
    assert store.gc().removed_blobs == 0 and store.blob_path(version.masks_sha256).exists()
    assert store.verify() == []
    store.blob_path(version.masks_sha256).write_bytes(b"damaged")
    assert [(d.ref, d.file) for d in store.verify()] == [("task/ner@1", MASKS_FILE)]
    store.remove("task/ner")
    assert store.gc().removed_blobs == 4


def test_a_store_index_from_before_masks_is_upgraded(tmp_path, s4_delta, base_model):
    root = tmp_path / "old"
    root.mkdir()
    with sqlite3.connect(root / "index.sqlite") as db:
        db.executescript(SCHEMA_0.format(masks=""))  # an index from before masks
        assert "masks_sha256" not in {row[1] for row in db.execute("PRAGMA table_info(versions)")}
        db.execute("INSERT INTO deltas (base, kind, name, last_version) VALUES ('b', 'language', 'old', 1)")
        db.execute("INSERT INTO versions VALUES (1, 1, 't', 'c', 'r', 5, 0.1, 40, 'then', 'then', '{}')")  # 11 columns
    store = DeltaStore(root)
    (old,) = store.list(base="b")
    assert old.ref == "lang/old@1" and old.masks_sha256 is None and MASKS_FILE not in old.blobs
    store.add(synthetic_delta(base_model, 0.05, 6, kind="language", language="hau"))
    store.add(s4_delta)
    assert DeltaStore(root).load("task/ner").subnetworks == s4_delta.subnetworks
    assert DeltaStore(root).load("lang/hau").subnetworks is None


# ---- the Hub ------------------------------------------------------------------------------------


def test_masks_travel_through_the_hub_and_a_later_version_without_them_drops_the_file(
        hub_env, s4_delta, base_model, tmp_path, monkeypatch):
    repo = "tester/ner-s4"
    store = DeltaStore()
    store.add(s4_delta)
    plain = synthetic_delta(base_model, 0.05, 9, kind="task", task="ner", task_type="token-classification",
                            labels=NER_LABELS)
    store.add(plain)
    push_to_hub(store, "task/ner@1", repo)
    assert MASKS_FILE in hub_env.server.files(repo, "v1")
    push_to_hub(store, "task/ner@2", repo)
    assert MASKS_FILE not in hub_env.server.files(repo, "v2")
    monkeypatch.setenv("SFTSTORE_HOME", str(tmp_path / "elsewhere"))
    elsewhere = DeltaStore()
    pulled = pull_from_hub(elsewhere, repo, "v1")
    assert elsewhere.load(pulled.version).subnetworks == s4_delta.subnetworks
    latest = pull_from_hub(elsewhere, repo)
    assert elsewhere.load(latest.version).subnetworks is None
    assert latest.version.tensors_sha256 == store.resolve("task/ner@2").tensors_sha256


# ---- the command line ---------------------------------------------------------------------------


def test_cli_overlap_masks_and_show(s4_delta, bool_masks, base_model):
    store = DeltaStore()
    store.add(s4_delta)
    store.add(synthetic_delta(base_model, 0.05, 6, kind="language", language="hau"))
    runner = CliRunner()
    result = runner.invoke(cli, ["overlap", "task/ner", "lang/hau", "--masks", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["refs"] == ["task/ner@1#hau", "task/ner@1#swa", "task/ner@1#yor", "lang/hau@1"]
    hau, swa = bool_masks["hau"], bool_masks["swa"]
    inter = sum(int((hau[n] & swa[n]).sum()) for n in hau)
    union = sum(int((hau[n] | swa[n]).sum()) for n in hau)
    assert report["jaccard"][0][1] == pytest.approx(inter / union)
    without = json.loads(runner.invoke(cli, ["overlap", "task/ner", "lang/hau", "--json"]).output)
    assert without["refs"] == ["task/ner@1", "lang/hau@1"]
    single = runner.invoke(cli, ["overlap", "lang/hau", "--masks"])
    assert single.exit_code != 0 and "at least two" in single.output
    shown = json.loads(runner.invoke(cli, ["show", "task/ner", "--json"]).output)
    assert shown["subnetworks"] == {lang: sum(int(m.sum()) for m in masks.values()) for lang, masks in bool_masks.items()}
    assert "sub-network masks" in runner.invoke(cli, ["show", "task/ner"]).output
