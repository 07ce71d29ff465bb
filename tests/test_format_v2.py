"""Format version 2: one-byte index gaps plus an escape list, its failure modes, and living beside version 1.

The escape list is pinned on a parameter whose indices are chosen by hand (gaps of exactly 255 and 256,
a first index past 255, the last element). Every corruption of the v2 tensors is refused with an error
naming the file and the tensor, by `from_pretrained` and by a store import alike (which stores nothing).
Version 1 stays readable and writable: `sft export --format-version 1`, the Hub and composable-sft
interop work with both.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file
from safetensors_bytes import split_header
from sftstore_cli.main import cli
from test_format import assert_same_delta, read_manifest, read_tensors_file

from sftstore import SparseDelta
from sftstore.errors import DeltaFormatError
from sftstore.format import CONFIG_FILE, TENSORS_FILE, convert_artifact
from sftstore.hub import pull_from_hub, push_to_hub
from sftstore.interop import read_composable_sft, to_composable_sft
from sftstore.store import DeltaStore

P = "encoder.layer.0.intermediate.dense.weight"  # 64 x 32 in the tiny bases
CHOSEN = [255, 256, 511, 1023, 1024, 2047]  # gaps from -1: 256, 1, 255, 512, 1, 1023
ESCAPES = {"escape_positions": [0, 3, 5], "escape_values": [256, 512, 1023]}


@pytest.fixture
def escaped_delta(lang_delta) -> SparseDelta:
    """The language delta with P's entries at `CHOSEN`: three gaps escaped, one of exactly 255 inline."""
    tensors = {name: (entry.indices, entry.values) for name, entry in lang_delta.params.items()}
    tensors[P] = (torch.tensor(CHOSEN, dtype=torch.int32), torch.arange(1, len(CHOSEN) + 1, dtype=torch.float32))
    shapes = {name: entry.shape for name, entry in lang_delta.params.items()}
    assert shapes[P] == (64, 32)
    return SparseDelta.from_tensors(tensors, shapes, lang_delta.config)


@pytest.fixture
def artifact(escaped_delta, tmp_path) -> Path:
    return escaped_delta.save_pretrained(tmp_path / "artifact")


def read_tensors(directory: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    return read_tensors_file(directory / TENSORS_FILE)


def rewrite(directory: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Replace the tensors file; fix the manifest's sha256 and nnz so that the check under test fires."""
    save_file({key: t.contiguous() for key, t in tensors.items()}, str(directory / TENSORS_FILE), metadata=metadata)
    manifest = read_manifest(directory)
    manifest["tensors_sha256"] = hashlib.sha256((directory / TENSORS_FILE).read_bytes()).hexdigest()
    manifest["nnz"] = sum(t.numel() for key, t in tensors.items() if key.endswith("::values"))
    (directory / CONFIG_FILE).write_text(json.dumps(manifest, indent=2) + "\n")


# ---- the layout -----------------------------------------------------------------------------------------


def test_writers_default_to_version_2(artifact, escaped_delta):
    tensors, metadata = read_tensors(artifact)
    assert metadata["format_version"] == "2"
    assert read_manifest(artifact)["format_version"] == 2
    assert tensors[f"{P}::gaps"].tolist() == [0, 1, 255, 0, 1, 0]
    for part, expected in ESCAPES.items():
        assert tensors[f"{P}::{part}"].dtype == torch.int32 and tensors[f"{P}::{part}"].tolist() == expected
    assert_same_delta(escaped_delta, SparseDelta.from_pretrained(artifact))


def test_versions_1_and_2_hold_the_same_delta_and_2_is_smaller(escaped_delta, tmp_path):
    one = escaped_delta.save_pretrained(tmp_path / "one", format_version=1)
    two = escaped_delta.save_pretrained(tmp_path / "two", format_version=2)
    assert_same_delta(SparseDelta.from_pretrained(one), SparseDelta.from_pretrained(two))
    bodies = [len(split_header((d / TENSORS_FILE).read_bytes())[1]) for d in (one, two)]
    tensors, _ = read_tensors(two)
    escaped = sum(tensor.numel() for key, tensor in tensors.items() if key.endswith("::escape_values"))
    assert bodies[0] - bodies[1] == 3 * escaped_delta.nnz - 8 * escaped  # 1 byte per index, 8 per escape, not 4
    manifests = [read_manifest(d) for d in (one, two)]
    for manifest in manifests:
        del manifest["format_version"], manifest["tensors_sha256"]
    assert manifests[0] == manifests[1]


@pytest.mark.parametrize("version", [0, 3, "2", True])
def test_an_unknown_format_version_is_refused_on_writing(escaped_delta, tmp_path, version):
    with pytest.raises(ValueError, match="format_version"):
        escaped_delta.save_pretrained(tmp_path / "x", format_version=version)
    assert not (tmp_path / "x" / TENSORS_FILE).exists()


# ---- every v2 failure mode ------------------------------------------------------------------------------


def _set(part: str, values: list[int], dtype: torch.dtype = torch.int32):
    def mutate(tensors):
        tensors[f"{P}::{part}"] = torch.tensor(values, dtype=dtype)
    return mutate


def _drop(part: str):
    def mutate(tensors):
        del tensors[f"{P}::{part}"]
    return mutate


def _v1_key(tensors):
    tensors[f"{P}::indices"] = torch.tensor(CHOSEN, dtype=torch.int32)


def _values_shorter(tensors):
    tensors[f"{P}::values"] = tensors[f"{P}::values"][:-1]


CORRUPTIONS = {
    # name: (mutation, fragments of the message besides the file's path)
    "gaps-not-uint8": (_set("gaps", [0, 1, 255, 0, 1, 0]), [f"{P}::gaps", "uint8"]),
    "escape-lists-differ-in-length": (_set("escape_values", [256, 512]), [f"{P}::escape_positions", "entries"]),
    "escape-position-out-of-range": (_set("escape_positions", [0, 3, 6]), [f"{P}::escape_positions", "holds 6"]),
    "escape-position-negative": (_set("escape_positions", [-1, 3, 5]), [f"{P}::escape_positions", "holds -1"]),
    "escape-positions-out-of-order": (_set("escape_positions", [3, 0, 5]), [f"{P}::escape_positions", "increasing"]),
    "escape-positions-repeated": (_set("escape_positions", [0, 3, 3]), [f"{P}::escape_positions", "increasing"]),
    "inline-gap-at-an-escape": (_set("gaps", [0, 1, 255, 7, 1, 0], torch.uint8), [f"{P}::gaps", "escape position"]),
    "zero-gap-outside-the-escapes": (_set("gaps", [0, 0, 255, 0, 1, 0], torch.uint8), [f"{P}::gaps", "duplicates"]),
    "escaped-gap-fits-a-byte": (_set("escape_values", [256, 200, 1023]), [f"{P}::escape_values", "one byte"]),
    "gap-overflow": (_set("escape_values", [256, 2**31 - 1, 1023]), [f"{P}::escape_values", "overflows"]),
    "gap-overflow-in-sum": (_set("escape_values", [1500, 1500, 1023]), [f"{P}::escape_values", "overflows"]),
    "decoded-index-out-of-range": (_set("escape_values", [256, 512, 1024]), [f"{P}::gaps", "2048", "[0, 2048)"]),
    "values-shorter-than-gaps": (_values_shorter, [f"{P}::gaps", f"{P}::values", "entries"]),
    "escape-values-missing": (_drop("escape_values"), [f"{P}::gaps", f"{P}::escape_values", "no matching"]),
    "a-v1-key-in-a-v2-file": (_v1_key, [f"{P}::indices", "format version 2"]),
}


@pytest.mark.parametrize("name", CORRUPTIONS)
def test_a_corrupt_v2_file_is_refused_naming_file_and_tensor(artifact, name):
    mutate, fragments = CORRUPTIONS[name]
    tensors, metadata = read_tensors(artifact)
    mutate(tensors)
    rewrite(artifact, tensors, metadata)
    with pytest.raises(DeltaFormatError) as info:
        SparseDelta.from_pretrained(artifact)
    for fragment in [str(artifact / TENSORS_FILE), *fragments]:
        assert fragment in str(info.value), f"{fragment!r} not in {info.value}"
    store = DeltaStore()
    with pytest.raises(DeltaFormatError):
        store.import_directory(artifact)
    assert store.list() == [] and list(store.blobs_dir.iterdir()) == []


@pytest.mark.parametrize(("manifest_version", "metadata_version"), [(1, "2"), (2, "1")])
def test_manifest_and_metadata_must_name_the_same_version(artifact, tmp_path, escaped_delta, manifest_version,
                                                          metadata_version):
    directory = artifact if manifest_version == 2 else escaped_delta.save_pretrained(tmp_path / "v1", format_version=1)
    tensors, metadata = read_tensors(directory)
    metadata["format_version"] = metadata_version
    rewrite(directory, tensors, metadata)
    with pytest.raises(DeltaFormatError, match=f"format_version.*'{metadata_version}'.*'{manifest_version}'"):
        SparseDelta.from_pretrained(directory)


# ---- living beside version 1 ----------------------------------------------------------------------------


def test_convert_and_cli_export_write_either_version(artifact, escaped_delta, tmp_path):
    DeltaStore().import_directory(artifact)
    runner = CliRunner()
    result = runner.invoke(cli, ["export", "lang/hau", str(tmp_path / "v1"), "--format-version", "1"])
    assert result.exit_code == 0, result.output
    assert read_tensors(tmp_path / "v1")[1]["format_version"] == "1"
    assert read_manifest(tmp_path / "v1")["format_version"] == 1
    assert_same_delta(escaped_delta, SparseDelta.from_pretrained(tmp_path / "v1"))
    assert runner.invoke(cli, ["export", "lang/hau", str(tmp_path / "same")]).exit_code == 0
    assert (tmp_path / "same" / TENSORS_FILE).read_bytes() == (artifact / TENSORS_FILE).read_bytes()  # as stored
    assert convert_artifact(tmp_path / "v1", 2) and not convert_artifact(tmp_path / "v1", 2)
    for name in (TENSORS_FILE, CONFIG_FILE):  # deterministic: back to the bytes first written
        assert (tmp_path / "v1" / name).read_bytes() == (artifact / name).read_bytes(), name
    help_text = " ".join(runner.invoke(cli, ["export", "--help"]).output.split())
    assert "--format-version [1|2]" in help_text and "[default: (as stored)]" in help_text


@pytest.mark.parametrize("version", [1, 2])
def test_the_store_and_the_hub_keep_either_version_byte_for_byte(hub_env, escaped_delta, tmp_path, monkeypatch,
                                                                 version):
    directory = escaped_delta.save_pretrained(tmp_path / "artifact", format_version=version)
    store = DeltaStore()
    stored, _ = store.import_directory(directory)
    assert store.blob_path(stored.tensors_sha256).read_bytes() == (directory / TENSORS_FILE).read_bytes()
    push_to_hub(store, "lang/hau", "tester/hau")
    monkeypatch.setenv("SFTSTORE_HOME", str(tmp_path / "elsewhere"))
    remote = DeltaStore()
    pulled = pull_from_hub(remote, "tester/hau")
    assert pulled.version.tensors_sha256 == stored.tensors_sha256
    assert_same_delta(escaped_delta, remote.load(pulled.version))


def test_composable_sft_export_is_the_same_from_either_version(escaped_delta, tmp_path):
    diffs = []
    for version in (1, 2):
        loaded = SparseDelta.from_pretrained(escaped_delta.save_pretrained(tmp_path / f"v{version}",
                                                                            format_version=version))
        diffs.append(read_composable_sft(to_composable_sft(loaded, tmp_path / f"c{version}", "bert")))
    (one, _), (two, _) = diffs
    assert one.keys() == two.keys()
    for name, entry in one.items():
        assert torch.equal(entry["indices"], two[name]["indices"]) and torch.equal(entry["values"], two[name]["values"])
