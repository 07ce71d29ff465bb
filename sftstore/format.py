"""The artifact: `sft_delta.safetensors` (sparse tensors), `sft_config.json`, `README.md`, and optionally
`sft_masks.safetensors` (per-language sub-network masks, bit-packed).

Format version 1 stores each parameter's flat indices as `P::indices` (int32); version 2 (written by
default) as one-byte gaps plus an escape list (`P::gaps`, `P::escape_positions`, `P::escape_values`, see
`gaps.py`). Both store `P::values` and `head::H` alike, and both are read forever.

Writing is atomic per file; reading validates everything (keys, dtypes, lengths, order, range,
finiteness, shapes metadata, the manifest's derived fields and sha256) before returning a delta.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.torch
import torch

from . import gaps
from ._io import atomic_write_bytes, remove_stale_temp_files
from .bounded_json import brief, load_json, parse_int
from .card import render_model_card
from .config import FORMAT_VERSION, FORMAT_VERSIONS, MANIFEST_REQUIRED, MAX_MANIFEST_BYTES, DeltaConfig
from .delta import ParameterDelta, SparseDelta, index_dtype_for, validate_tensors
from .errors import DeltaFormatError
from .subnetworks import SubnetworkMasks
from .summary import decode_header, header_length, metadata_json

TENSORS_FILE = "sft_delta.safetensors"
CONFIG_FILE = "sft_config.json"
CARD_FILE = "README.md"
MASKS_FILE = "sft_masks.safetensors"
FORMAT_NAME = "sftstore-delta"
MASKS_FORMAT_NAME = "sftstore-masks"
HEAD_PREFIX = "head::"
INDICES_SUFFIX = "::indices"
VALUES_SUFFIX = "::values"
MASKS_FORMAT_VERSION = 1  # the masks file's layout, the same in artifacts of either format version
# The tensors each format version stores per sparse parameter, by the part after `P::`.
SPARSE_PARTS = {1: ("indices", "values"), 2: (*gaps.GAP_PARTS, "values")}
_MAX_NUMEL = 2**62  # larger shapes in metadata are refused (no real parameter comes near)
_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "I64": torch.int64,
    "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}
# A JSON string (its closing quote optional, so an unterminated one cannot make the scan backtrack), or a bracket.


def check_format_version(format_version: int) -> int:
    """`format_version` if this sftstore writes it, else a `ValueError` naming the versions it writes."""
    if type(format_version) is not int or format_version not in FORMAT_VERSIONS:
        raise ValueError(f"format_version is {format_version!r}; expected one of {', '.join(map(str, FORMAT_VERSIONS))}")
    return format_version


def serialize_tensors(delta: SparseDelta, format_version: int = FORMAT_VERSION) -> bytes:
    """The safetensors bytes of a delta in `format_version`: per parameter `P::indices` (v1: int32 unless
    huge) or `P::gaps`, `P::escape_positions`, `P::escape_values` (v2), then `P::values`; `head::H`."""
    check_format_version(format_version)
    tensors: dict[str, torch.Tensor] = {}
    for name, entry in sorted(delta.params.items()):
        if format_version == 1:
            tensors[name + INDICES_SUFFIX] = entry.indices.to("cpu", index_dtype_for(entry.numel)).contiguous()
        else:
            for part, tensor in gaps.encode(entry.indices, entry.numel).tensors().items():
                tensors[f"{name}::{part}"] = tensor
        tensors[name + VALUES_SUFFIX] = entry.values.cpu().contiguous()
    for name, tensor in sorted(delta.head.items()):
        tensors[HEAD_PREFIX + name] = tensor.cpu().contiguous()
    shapes = {name: list(entry.shape) for name, entry in sorted(delta.params.items())}
    metadata = {"format": FORMAT_NAME, "format_version": str(format_version), "shapes": json.dumps(shapes)}
    return _canonical_header(safetensors.torch.save(tensors, metadata=metadata))


def serialize_masks(masks: SubnetworkMasks) -> bytes:
    """The safetensors bytes of sub-network masks: `LANG::PARAM` (bit-packed uint8) and their shapes."""
    shapes = {name: list(shape) for name, shape in sorted(masks.shapes.items())}
    metadata = {"format": MASKS_FORMAT_NAME, "format_version": str(MASKS_FORMAT_VERSION), "shapes": json.dumps(shapes),
                "languages": json.dumps(list(masks))}
    tensors = {key: bits.contiguous() for key, bits in sorted(masks.to_tensors().items())}
    return _canonical_header(safetensors.torch.save(tensors, metadata=metadata))


def _canonical_header(data: bytes) -> bytes:
    """Sort the header's metadata keys, so equal deltas serialise to equal bytes (and sha256).

    safetensors writes `__metadata__` from a hash map whose order changes between calls. Reordering
    keys keeps the header's length, so the tensor data and its offsets are untouched.
    """
    (header_len,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + header_len])
    header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    canonical = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    if len(canonical) > header_len:  # cannot happen for the same keys and values; never corrupt the data
        raise AssertionError("canonical safetensors header is longer than the original")
    return b"".join((data[:8], canonical.ljust(header_len, b" "), memoryview(data)[8 + header_len :]))  # one copy


def manifest_for(delta: SparseDelta, tensors_sha256: str, masks_sha256: str | None = None,
                 format_version: int = FORMAT_VERSION) -> dict[str, Any]:
    """The manifest: the config's fields plus those derived from the tensors (and the masks file)."""
    derived = {
        "nnz": delta.nnz,
        "density": delta.density,
        "values_dtype": _DTYPE_NAMES[delta.values_dtype],
        "tensors_sha256": tensors_sha256,
    }
    if masks_sha256 is not None:
        derived["masks_sha256"] = masks_sha256
    return {"format_version": format_version, **delta.config.to_dict(), **derived}


def artifact_files(delta: SparseDelta, format_version: int = FORMAT_VERSION) -> dict[str, bytes]:
    """The artifact's files by name, in writing order: the manifest (which binds the others by sha256)
    comes after the tensors and masks, the model card last."""
    files = {TENSORS_FILE: serialize_tensors(delta, format_version)}
    if delta.subnetworks:
        files[MASKS_FILE] = serialize_masks(delta.subnetworks)
    manifest = manifest_for(delta, hashlib.sha256(files[TENSORS_FILE]).hexdigest(),
                            hashlib.sha256(files[MASKS_FILE]).hexdigest() if MASKS_FILE in files else None,
                            format_version)
    files[CONFIG_FILE] = (json.dumps(manifest, indent=2) + "\n").encode()
    files[CARD_FILE] = render_model_card(manifest).encode()
    return files


def artifact_identity(manifest: Mapping[str, Any]) -> str:
    """A digest of what a manifest says, leaving out when it was written (`created_at`) and how long its
    training took (`training.wall_seconds`): two artifacts with the same tensors and the same identity are
    the same delta, whenever they were converted or (seeded) trained again."""
    fields = {key: value for key, value in manifest.items() if key != "created_at"}
    if isinstance(fields.get("training"), Mapping):
        fields["training"] = {key: value for key, value in fields["training"].items() if key != "wall_seconds"}
    return hashlib.sha256(json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def complete_artifact(files: Mapping[str, bytes], manifest: Mapping[str, Any]) -> dict[str, bytes]:
    """An artifact's files in writing order, with a model card rendered from `manifest` if it has none."""
    ordered = {name: files[name] for name in (TENSORS_FILE, MASKS_FILE, CONFIG_FILE) if name in files}
    ordered[CARD_FILE] = files.get(CARD_FILE) or render_model_card(dict(manifest)).encode()
    return ordered


def write_artifact(files: dict[str, bytes], directory: str | os.PathLike) -> Path:
    """Write artifact files (by name, in writing order) into `directory` (created if needed), each
    atomically, removing a masks file the new manifest does not bind."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    remove_stale_temp_files(directory)
    if MASKS_FILE not in files:
        (directory / MASKS_FILE).unlink(missing_ok=True)
    for name, data in files.items():
        atomic_write_bytes(directory / name, data)
    return directory


def save_delta(delta: SparseDelta, directory: str | os.PathLike, format_version: int = FORMAT_VERSION) -> Path:
    """Write the artifact files of `delta` in `format_version` into `directory`."""
    return write_artifact(artifact_files(delta, format_version), directory)


def convert_artifact(directory: str | os.PathLike, format_version: int) -> bool:
    """Rewrite the artifact in `directory` in `format_version` (validated first; the manifest keeps every
    field but the format's own); whether anything changed (nothing does when it is in that version)."""
    check_format_version(format_version)
    files = read_artifact(directory)
    delta = delta_from_files(files, directory)
    if json.loads(files[CONFIG_FILE])["format_version"] == format_version:
        return False
    save_delta(delta, directory, format_version)
    return True


def _artifact_directory(directory: str | os.PathLike) -> Path:
    """`directory` as a Path, if it holds at least a tensors file and a manifest."""
    directory = Path(directory)
    if not directory.is_dir():
        raise DeltaFormatError(f"{directory}: no such artifact directory")
    for name in (TENSORS_FILE, CONFIG_FILE):
        if not (directory / name).is_file():
            raise DeltaFormatError(f"{directory}: missing {name}")
    return directory


def read_artifact(directory: str | os.PathLike) -> dict[str, bytes]:
    """The bytes of an artifact directory's files: tensors and manifest, masks and model card if present."""
    directory = _artifact_directory(directory)
    names = (TENSORS_FILE, CONFIG_FILE, MASKS_FILE, CARD_FILE)
    return {name: _read_bytes(directory / name) for name in names if (directory / name).is_file()}


def load_delta(directory: str | os.PathLike, device: torch.device | str = "cpu") -> SparseDelta:
    """Read and validate the artifact in `directory`."""
    directory = _artifact_directory(directory)
    masks = directory / MASKS_FILE
    return read_delta(directory / TENSORS_FILE, directory / CONFIG_FILE, device, masks if masks.is_file() else None)


def delta_from_files(files: Mapping[str, bytes], directory: str | os.PathLike, device: torch.device | str = "cpu"
                     ) -> SparseDelta:
    """Validate an artifact's files (name -> bytes, as `read_artifact` gives) into a delta; errors name
    the files as in `directory`."""
    directory = Path(directory)
    return parse_delta(files[TENSORS_FILE], files[CONFIG_FILE], files.get(MASKS_FILE), device=device,
                       tensors_path=directory / TENSORS_FILE, config_path=directory / CONFIG_FILE,
                       masks_path=directory / MASKS_FILE)


def parse_manifest(data: bytes, config_path: Path) -> tuple[dict[str, Any], DeltaConfig]:
    """Parse and validate a manifest's bytes, bounded in size and nesting before JSON parsing, every field
    checked against the schema (`config.FIELD_RULES`): the raw dict and its `DeltaConfig`."""
    if len(data) > MAX_MANIFEST_BYTES:
        raise DeltaFormatError(f"{config_path}: {len(data):,} bytes; a manifest has at most {MAX_MANIFEST_BYTES:,}")
    raw = load_json(data, config_path, "a readable JSON manifest", parse_int=parse_int)
    config = DeltaConfig.from_dict(raw, str(config_path), required=MANIFEST_REQUIRED)
    return raw, config


def read_manifest(config_path: Path) -> tuple[dict[str, Any], DeltaConfig]:
    """Read, parse and validate a manifest file: the raw dict and its `DeltaConfig`."""
    return parse_manifest(_read_bytes(config_path), config_path)


def _read_bytes(path: Path) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise DeltaFormatError(f"{path}: cannot read ({exc})") from None


def _read_buffer(path: Path) -> np.ndarray:
    """A file's bytes in a private, writable buffer (uint8), which the loaded tensors then share: one copy
    from the page cache, into memory nobody else can change between the checks and the use."""
    try:
        with open(path, "rb", buffering=0) as handle:
            buffer = np.empty(os.fstat(handle.fileno()).st_size, dtype=np.uint8)
            read = handle.readinto(buffer)
            if read != buffer.size or handle.read(1):
                raise OSError("the file changed size while it was read")
    except OSError as exc:
        raise DeltaFormatError(f"{path}: cannot read ({exc})") from None
    return buffer


def _check_sha256(digest: str, raw: dict[str, Any], field: str, path: Path, config_path: Path) -> None:
    if digest != raw[field]:
        raise DeltaFormatError(f"{path}: sha256 {digest} does not match the manifest's {field} {raw[field]} ({config_path})")


def read_delta(
    tensors_path: Path, config_path: Path, device: torch.device | str = "cpu", masks_path: Path | None = None
) -> SparseDelta:
    """Read a tensors file, its manifest and its masks file if any (possibly store blobs with other
    names) into a validated delta."""
    masks = _read_bytes(masks_path) if masks_path is not None else None
    return parse_delta(_read_buffer(tensors_path), _read_bytes(config_path), masks, device=device,
                       tensors_path=tensors_path, config_path=config_path, masks_path=masks_path)


def parse_delta(
    data: bytes, manifest: bytes, masks_data: bytes | None, *, tensors_path: Path, config_path: Path,
    masks_path: Path | None = None, device: torch.device | str = "cpu",
) -> SparseDelta:
    """Validate a tensors file's bytes, its manifest's and its masks file's (if any) into a delta; errors
    name the files by the paths given."""
    raw, config = parse_manifest(manifest, config_path)
    if ("masks_sha256" in raw) != (masks_data is not None):
        raise DeltaFormatError(
            f"{config_path}: the manifest names a masks file (masks_sha256) but there is no {MASKS_FILE}"
            if masks_data is None else f"{masks_path}: the manifest {config_path} has no masks_sha256 to verify it by"
        )
    with ThreadPoolExecutor(max_workers=1) as pool:
        digest = pool.submit(lambda: hashlib.sha256(data).hexdigest())  # overlaps with parsing
        params, head = _parse_tensors(data, tensors_path, raw["format_version"])
        _check_sha256(digest.result(), raw, "tensors_sha256", tensors_path, config_path)
    validate_tensors(params, head, str(tensors_path), indices_proven=raw["format_version"] == 2)
    subnetworks = None
    if masks_data is not None:
        _check_sha256(hashlib.sha256(masks_data).hexdigest(), raw, "masks_sha256", masks_path, config_path)
        subnetworks = _parse_masks(masks_data, masks_path)
        for name, entry in params.items():
            if name in subnetworks.shapes and subnetworks.shapes[name] != entry.shape:
                raise DeltaFormatError(f"{masks_path}: the masks of '{name}' have shape {list(subnetworks.shapes[name])}; "
                                       f"{tensors_path} says {list(entry.shape)}")
    delta = SparseDelta(params, config, head, subnetworks)
    _check_head(delta, tensors_path)
    if not math.isclose(raw["density"], delta.density, rel_tol=1e-9):
        raise DeltaFormatError(f"{config_path}: field 'density' is {raw['density']} but the tensors give {delta.density}")
    if raw["nnz"] != delta.nnz:
        raise DeltaFormatError(f"{config_path}: field 'nnz' is {raw['nnz']} but {tensors_path} holds {delta.nnz}")
    if params and raw["values_dtype"] != _DTYPE_NAMES[delta.values_dtype]:
        raise DeltaFormatError(
            f"{config_path}: field 'values_dtype' is {raw['values_dtype']!r} but {tensors_path} holds "
            f"{_DTYPE_NAMES[delta.values_dtype]}"
        )
    return delta if str(device) == "cpu" else delta.to(device)


def _check_head(delta: SparseDelta, tensors_path: Path) -> None:
    """Classification task deltas must carry their head; language deltas carry none."""
    config = delta.config
    if config.kind == "language" and delta.head:
        raise DeltaFormatError(f"{tensors_path}: a language delta carries head tensors {sorted(delta.head)}")
    if config.task_type in ("token-classification", "sequence-classification") and config.kind == "task" and not delta.head:
        raise DeltaFormatError(
            f"{tensors_path}: task delta '{config.task}' ({config.task_type}) has no 'head::' tensors; "
            "composing it would use a random classifier"
        )


def _read_header(data: bytes | np.ndarray, path: Path) -> dict[str, Any]:
    """The JSON header of a safetensors file read whole into `data`."""
    length = header_length(bytes(data[:8]), len(data), path)
    return decode_header(bytes(data[8 : 8 + length]), path)


def _read_metadata(header: dict[str, Any], path: Path, format_name: str, version: str) -> dict[str, str]:
    metadata = header.get("__metadata__") or {}
    if not isinstance(metadata, dict):
        raise DeltaFormatError(f"{path}: '__metadata__' is {brief(metadata)}; expected an object")
    if metadata.get("format") != format_name:
        raise DeltaFormatError(f"{path}: metadata 'format' is {metadata.get('format')!r}; expected {format_name!r}")
    if metadata.get("format_version") != version:
        raise DeltaFormatError(
            f"{path}: metadata 'format_version' is {metadata.get('format_version')!r}; expected '{version}'"
            + (" (the manifest's format_version)" if format_name == FORMAT_NAME else "")
        )
    return metadata


def _load_safetensors(
    data: bytes, path: Path, format_name: str, version: int
) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, str]]:
    """The tensors, the metadata 'shapes' object and the metadata of a safetensors file of `format_name`
    whose metadata must say `version`."""
    header = _read_header(data, path)
    tensors = _tensors_of(data, header, path)
    metadata = _read_metadata(header, path, format_name, str(version))
    try:
        shapes = metadata_json(metadata, "shapes", path)
        if not isinstance(shapes, dict):
            raise ValueError("not an object")
    except ValueError as exc:
        raise DeltaFormatError(f"{path}: metadata 'shapes' is not a JSON object of parameter shapes ({exc})") from None
    for name, shape in shapes.items():
        if not isinstance(shape, list) or not all(type(d) is int and 0 <= d < _MAX_NUMEL for d in shape) \
                or math.prod(shape) >= _MAX_NUMEL:
            raise DeltaFormatError(f"{path}: metadata 'shapes' entry for '{name}' is {shape!r}; expected a list of "
                                   f"non-negative ints with fewer than 2**62 elements")
    return tensors, {name: tuple(shape) for name, shape in shapes.items()}, metadata


def _invalid(path: Path, problem: str) -> DeltaFormatError:
    return DeltaFormatError(f"{path}: not a valid safetensors file, or truncated ({problem})")


def _tensors_of(data: bytes | np.ndarray, header: dict[str, Any], path: Path) -> dict[str, torch.Tensor]:
    """The tensors a safetensors header describes: each entry's dtype, shape and byte range checked, the
    ranges tiling the data after the header exactly. Tensors share the memory of a numpy buffer (this
    load's own, from `_read_buffer`); from `bytes` they are copies."""
    start = 8 + struct.unpack("<Q", bytes(data[:8]))[0]
    spans = []
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        if not isinstance(entry, dict) or entry.keys() != {"dtype", "shape", "data_offsets"}:
            raise _invalid(path, f"tensor {brief(key)}: expected dtype, shape and data_offsets")
        dtype, shape, offsets = _SAFETENSORS_DTYPES.get(entry["dtype"]), entry["shape"], entry["data_offsets"]
        if dtype is None:
            raise _invalid(path, f"tensor {brief(key)}: unknown dtype {brief(entry['dtype'])}")
        if not isinstance(shape, list) or not all(type(d) is int and 0 <= d < _MAX_NUMEL for d in shape) \
                or math.prod(shape) >= _MAX_NUMEL:
            raise _invalid(path, f"tensor {brief(key)}: shape {brief(shape)}")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)
                and 0 <= offsets[0] <= offsets[1] and offsets[1] - offsets[0] == math.prod(shape) * dtype.itemsize):
            raise _invalid(path, f"tensor {brief(key)}: data_offsets {brief(offsets)} do not hold its shape and dtype")
        spans.append((offsets[0], offsets[1], key, dtype, shape))
    spans.sort()
    end = 0
    for begin, stop, key, _, _ in spans:
        if begin != end:
            raise _invalid(path, f"tensor '{key}' starts at byte {begin}, expected {end} (overlapping or gapped data)")
        end = stop
    if start + end != len(data):
        raise _invalid(path, f"the tensors hold {end:,} bytes but {len(data) - start:,} follow the header")
    if not spans or end == 0:
        return {key: torch.empty(shape, dtype=dtype) for _, _, key, dtype, shape in spans}
    raw = torch.from_numpy(data if isinstance(data, np.ndarray) else np.frombuffer(data, np.uint8).copy())
    tensors = {}
    for begin, stop, key, dtype, shape in spans:
        piece = raw[start + begin : start + stop]
        if (start + begin) % dtype.itemsize:  # misaligned (not as safetensors writes): an aligned copy
            piece = piece.clone()
        tensors[key] = piece.view(dtype).view(shape)
    return tensors


def _parse_masks(data: bytes, path: Path) -> SubnetworkMasks:
    tensors, shapes, metadata = _load_safetensors(data, path, MASKS_FORMAT_NAME, MASKS_FORMAT_VERSION)
    try:
        languages = metadata_json(metadata, "languages", path)
        if not isinstance(languages, list) or not languages or not all(isinstance(lang, str) for lang in languages):
            raise ValueError("not a non-empty list of strings")
    except ValueError as exc:
        raise DeltaFormatError(f"{path}: metadata 'languages' is not a JSON list of mask names ({exc})") from None
    return SubnetworkMasks.from_tensors(tensors, shapes, languages, str(path))


def _parse_tensors(
    data: bytes, path: Path, format_version: int
) -> tuple[dict[str, ParameterDelta], dict[str, torch.Tensor]]:
    """The sparse entries and head tensors of a tensors file in `format_version` (v2's indices checked, then
    decoded; everything else is checked by `validate_tensors`)."""
    tensors, shapes, _ = _load_safetensors(data, path, FORMAT_NAME, format_version)
    expected = SPARSE_PARTS[format_version]
    head: dict[str, torch.Tensor] = {}
    sparse: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        name, _, part = key.rpartition("::")
        if key.startswith(HEAD_PREFIX) and len(key) > len(HEAD_PREFIX):
            head[key[len(HEAD_PREFIX) :]] = tensor
        elif name and part in expected:
            sparse.setdefault(name, {})[part] = tensor
        else:
            wanted = ", ".join(f"'P::{part}'" for part in expected)
            raise DeltaFormatError(f"{path}: unexpected tensor '{key}'; format version {format_version} expects "
                                   f"{wanted} or 'head::H'")
    for name, parts in sparse.items():
        if len(parts) != len(expected):
            have = next(part for part in expected if part in parts)
            lack = next(part for part in expected if part not in parts)
            raise DeltaFormatError(f"{path}: tensor '{name}::{have}' has no matching '{name}::{lack}'")
    for name in sparse.keys() ^ shapes.keys():
        where = "metadata 'shapes' lacks" if name in sparse else "metadata 'shapes' names a parameter with no tensors:"
        raise DeltaFormatError(f"{path}: {where} '{name}'")
    params = {}
    for name, parts in sparse.items():
        indices = parts.get("indices")
        if indices is None:
            code = gaps.GapCode(parts["gaps"], parts["escape_positions"], parts["escape_values"])
            gaps.check(code, math.prod(shapes[name]), name, str(path))
            if code.gaps.numel() != parts["values"].numel():
                raise DeltaFormatError(f"{path}: '{name}::gaps' has {code.gaps.numel()} entries but "
                                       f"'{name}::values' has {parts['values'].numel()}")
            indices = gaps.decode(code, math.prod(shapes[name]))
        params[name] = ParameterDelta(indices, parts["values"], shapes[name])
    return params, head
