"""Seeded fuzzing of artifacts (format versions 1 and 2): whatever the bytes, loading gives a clean error or
a valid delta, never another exception, and neither the store nor the model changes unless the delta is
valid (and then a revert is exact).

`SFTSTORE_FUZZ_CASES` sets how many mutated artifacts each test tries (default 150: a few seconds);
`SFTSTORE_FUZZ_SEED` another seed.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import struct
from pathlib import Path

import pytest
import torch

from safetensors_bytes import join_header, split_header
from sftstore import SftError
from sftstore.format import CONFIG_FILE, TENSORS_FILE, load_delta
from sftstore.store import DeltaStore

CASES = int(os.environ.get("SFTSTORE_FUZZ_CASES", "150"))
SEED = int(os.environ.get("SFTSTORE_FUZZ_SEED", "20261201"))
ODD_VALUES = [None, True, -1, 0, 2**63, 2**64, 1.5, float("nan"), float("inf"), "", "x" * 300, "9" * 5000, [], [1, 2],
              ["a", "a"], {}, {"a": {"b": []}}, "2026-13-45T99:00:00", [[[[[]]]]]]


def mutate_header(data: bytes, rng: random.Random) -> bytes:
    """Change one thing in the safetensors header: a dtype, a shape, offsets, a key, or the metadata."""
    header, body = split_header(data)
    keys = [k for k in header if k != "__metadata__"]
    key = rng.choice(keys)
    choice = rng.randrange(6)
    if choice == 0:
        header[key]["dtype"] = rng.choice(["F16", "BF16", "F64", "I8", "U8", "I64", "BOOL", "F32", "I32", "X"])
    elif choice == 1:
        header[key]["shape"] = rng.choice([[0], [1], [3, 2], [-1], [2**40], [], ["a"]])
    elif choice == 2:
        start, end = header[key]["data_offsets"]
        header[key]["data_offsets"] = [start + rng.choice([-4, 0, 4]), end + rng.choice([-4, 0, 4, 2**33])]
    elif choice == 3:
        header[rng.choice(["head::", "::values", "a::indices", key + "x", key.replace("::", ":")])] = header.pop(key)
    elif choice == 4:
        metadata = header.setdefault("__metadata__", {})
        metadata[rng.choice(["format", "format_version", "shapes", "x"])] = rng.choice(
            ["", "1", "2", "sftstore-delta", "{}", "[]", '{"a": [1]}', json.dumps({k.split("::")[0]: [2**63] for k in keys})])
    else:
        raw = bytearray(json.dumps(header).encode())
        raw[rng.randrange(len(raw))] = rng.randrange(256)
        return struct.pack("<Q", len(raw)) + bytes(raw) + body
    return join_header(header, body)


def mutate_tensors(data: bytes, rng: random.Random) -> bytes:
    """Change the data: flip bytes of indices or values (unsorted, out of range, NaN), or truncate."""
    choice = rng.randrange(3)
    if choice == 2:
        return data[: rng.randrange(len(data))]
    header, body = split_header(data)
    body = bytearray(body)
    for _ in range(rng.randrange(1, 8)):
        position = rng.randrange(len(body))
        body[position] = rng.choice([0x00, 0xFF, 0x7F, 0x80, rng.randrange(256)])
    return data[: len(data) - len(body)] + bytes(body)


def mutate_manifest(manifest: dict, rng: random.Random) -> dict:
    """Give one field (or a nested one) an odd value, or remove it, or add an unknown one."""
    manifest = json.loads(json.dumps(manifest))
    target = manifest
    if rng.random() < 0.3:
        target = manifest.setdefault(rng.choice(["base_model", "method", "training", "metrics", "lineage"]), {})
        if not isinstance(target, dict):
            target = manifest
    key = rng.choice(list(target) + ["unknown_field"])
    if rng.random() < 0.2:
        target.pop(key, None)
    else:
        target[key] = rng.choice(ODD_VALUES)
    return manifest


def rebind(directory: Path) -> None:
    """Make the manifest agree with the (mutated) tensors file, as a careful attacker would."""
    manifest_path = directory / CONFIG_FILE
    try:
        manifest = json.loads(manifest_path.read_text())
    except ValueError:
        return
    if isinstance(manifest, dict):
        manifest["tensors_sha256"] = hashlib.sha256((directory / TENSORS_FILE).read_bytes()).hexdigest()
        manifest_path.write_text(json.dumps(manifest))


def write_case(source: Path, target: Path, rng: random.Random) -> None:
    target.mkdir()
    tensors = (source / TENSORS_FILE).read_bytes()
    manifest = json.loads((source / CONFIG_FILE).read_text())
    kind = rng.randrange(4)
    if kind == 0:
        tensors = mutate_header(tensors, rng)
    elif kind == 1:
        tensors = mutate_tensors(tensors, rng)
    elif kind == 2:
        manifest = mutate_manifest(manifest, rng)
    (target / TENSORS_FILE).write_bytes(tensors)
    text = json.dumps(manifest)
    if kind == 3:  # bytes of the manifest itself
        raw = bytearray(text.encode())
        for _ in range(rng.randrange(1, 4)):
            raw[rng.randrange(len(raw))] = rng.randrange(256)
        (target / CONFIG_FILE).write_bytes(bytes(raw))
    else:
        (target / CONFIG_FILE).write_text(text)
    if rng.random() < 0.8:
        rebind(target)


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def assert_unchanged(model: torch.nn.Module, before: dict[str, torch.Tensor]) -> None:
    for name, p in model.named_parameters():
        assert torch.equal(p.detach(), before[name]), name


@pytest.mark.parametrize("version", [1, 2], ids=["v1", "v2"])
@pytest.mark.parametrize("which", ["lang_delta", "task_delta"])
def test_mutated_artifacts_give_a_clean_error_or_a_valid_delta(request, which, version, ner_model, tmp_path,
                                                                store_home):
    source = request.getfixturevalue(which).save_pretrained(tmp_path / "source", format_version=version)
    store = DeltaStore()
    before = snapshot(ner_model)
    rng = random.Random(f"{SEED}-{which}-{ner_model.config.model_type}" + ("" if version == 1 else "-v2"))
    outcomes = {"refused": 0, "valid": 0}
    for case in range(CASES):
        directory = tmp_path / f"case-{case}"
        write_case(source, directory, rng)
        blobs = sorted(p.name for p in store.blobs_dir.iterdir())
        versions = store.list()
        try:
            delta = load_delta(directory)
        except SftError:
            outcomes["refused"] += 1
            with pytest.raises(SftError):
                store.import_directory(directory)
            assert store.list() == versions and sorted(p.name for p in store.blobs_dir.iterdir()) == blobs, case
            continue
        outcomes["valid"] += 1
        try:  # a delta that loads must also store (or be refused with the store unchanged)
            store.import_directory(directory)
        except SftError:
            assert store.list() == versions and sorted(p.name for p in store.blobs_dir.iterdir()) == blobs, case
        try:
            handle = delta.apply(ner_model)
        except SftError:
            assert_unchanged(ner_model, before)
            continue
        handle.revert()
        assert_unchanged(ner_model, before)
    assert outcomes["refused"] > CASES // 2, outcomes  # the mutations do reach the validation
