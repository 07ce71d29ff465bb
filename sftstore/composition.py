"""The composition record, `sft_composition.json`: what a saved composed model is made of.

`ComposedModel.save` writes it beside the weights: the base model (id and fingerprint) and, in the
order applied, each delta's kind, name, scale and non-zeros, and, where the caller knows them (the
CLI always does), its stored ref, version and the sha256 of its tensors file, so the directory can
be traced back to the exact deltas. `sft show DIR` reads it. No torch here: `sft show` starts fast.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from .bounded_json import brief, load_json
from .errors import SftError

COMPOSITION_FILE = "sft_composition.json"
COMPOSITION_FORMAT = "sftstore-composition"
COMPOSITION_FORMAT_VERSION = 1
PROVENANCE_FIELDS = ("ref", "version", "tensors_sha256")
_MAX_BYTES = 1 << 20


def provenance_of(versions: Iterable[Any]) -> dict[tuple[str, str], dict[str, Any]]:
    """(kind, name) -> ref, version and tensors sha256 of stored versions (`StoredVersion`s), for `save`."""
    return {(v.kind, v.name): {"ref": v.ref, "version": v.version, "tensors_sha256": v.tensors_sha256}
            for v in versions}


def composition_record(base_model: Mapping[str, str], deltas: Iterable[tuple[Any, float]],
                       provenance: Mapping[tuple[str, str], Mapping[str, Any]] | None = None) -> dict[str, Any]:
    """The record of `deltas` ((SparseDelta, scale) in the order applied) composed onto `base_model`
    ({id, arch_digest, weights_digest}); `provenance` adds each stored delta's ref, version and sha256."""
    provenance = provenance or {}
    entries = []
    for delta, scale in deltas:
        known = provenance.get((delta.kind, delta.name), {})
        entries.append({
            "kind": delta.kind,
            "name": delta.name,
            **{key: known.get(key) for key in PROVENANCE_FIELDS},
            "scale": scale,
            "nnz": delta.nnz,
            "base_model": delta.config.base_model.id,
            "created_at": delta.config.created_at,
        })
    return {"format": COMPOSITION_FORMAT, "format_version": COMPOSITION_FORMAT_VERSION, "base_model": dict(base_model),
            "deltas": entries}


def read_composition(directory: str | os.PathLike) -> dict[str, Any]:
    """The composition record of a saved directory, checked: an error names the file and the field.
    A record from before format_version 1 (its base model a bare id) is read with the fields it has."""
    path = Path(directory) / COMPOSITION_FILE
    if not Path(directory).is_dir():
        raise SftError(f"{directory}: no such directory")
    if not path.is_file():
        raise SftError(f"{directory}: no {COMPOSITION_FILE} (not a directory that `sft compose --out` wrote)")
    data = path.read_bytes()
    if len(data) > _MAX_BYTES:
        raise SftError(f"{path}: {len(data):,} bytes, more than a composition record holds ({_MAX_BYTES:,})")
    record = load_json(data, path, "a JSON composition record", error=SftError)
    if not isinstance(record, dict):
        raise SftError(f"{path}: holds {brief(record)}; expected a JSON object")
    base = record.get("base_model")
    record["base_model"] = {"id": base} if isinstance(base, str) else base
    if not isinstance(record["base_model"], dict) or not isinstance(record["base_model"].get("id"), str):
        raise SftError(f"{path}: field 'base_model' is {brief(base)}; expected an object with an 'id'")
    deltas = record.get("deltas")
    if not isinstance(deltas, list):
        raise SftError(f"{path}: field 'deltas' is {brief(deltas)}; expected a list")
    for i, entry in enumerate(deltas):
        problem = _entry_problem(entry)
        if problem:
            raise SftError(f"{path}: deltas[{i}] {problem}")
    return record


def _entry_problem(entry: Any) -> str | None:
    if not isinstance(entry, dict):
        return f"is {brief(entry)}; expected an object"
    for key, kinds in (("kind", str), ("name", str), ("nnz", int), ("scale", (int, float))):
        if not isinstance(entry.get(key), kinds) or isinstance(entry.get(key), bool):
            return f"field {key!r} is {brief(entry.get(key))}; expected {'a number' if key in ('nnz', 'scale') else 'a string'}"
    for key, kinds in (("ref", str), ("version", int), ("tensors_sha256", str)):
        if entry.get(key) is not None and not isinstance(entry[key], kinds):
            return f"field {key!r} is {brief(entry[key])}; expected {'an integer' if key == 'version' else 'a string'}"
    return None
