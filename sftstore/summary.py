"""What a stored artifact holds, read from its safetensors headers without torch: non-zeros per layer,
entries per sub-network mask. For `sft show`, which must start fast; loading and applying a delta
validates every byte (`sftstore.format`), this only counts what the headers declare (the store checked
the files' sha256 when it took them in, and `sft verify` re-checks them).
"""

from __future__ import annotations

import os
import re
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .bounded_json import brief, load_json
from .errors import DeltaFormatError

_LAYER_RE = re.compile(r"^(.*?\blayers?\.\d+)\.")
_MAX_HEADER_BYTES = 100_000_000  # safetensors' own limit on a header
_VALUES_SUFFIX = "::values"


def layer_of(name: str) -> str:
    """Group a parameter name by layer: `encoder.layer.3`, else its first component (`embeddings`)."""
    match = _LAYER_RE.match(name)
    return match.group(1) if match else name.split(".", 1)[0]


@dataclass(frozen=True)
class ParameterSummary:
    """Size and non-zeros of one parameter, or (shape `()`) of one layer's touched parameters."""

    name: str
    shape: tuple[int, ...]
    numel: int
    nnz: int

    @property
    def density(self) -> float:
        return self.nnz / self.numel if self.numel else 0.0


def by_layer(rows: Iterable[ParameterSummary]) -> list[ParameterSummary]:
    """Parameter rows summed per layer (`layer_of`), layers in the order their first parameter comes."""
    totals: dict[str, list[int]] = {}
    for row in rows:
        counts = totals.setdefault(layer_of(row.name), [0, 0])
        counts[0] += row.numel
        counts[1] += row.nnz
    return [ParameterSummary(layer, (), numel, nnz) for layer, (numel, nnz) in totals.items()]


def header_length(prefix: bytes, file_size: int, path: Path) -> int:
    """The header length a safetensors file's 8-byte `prefix` declares, checked against the file's size and
    safetensors' own limit."""
    if len(prefix) < 8:
        raise DeltaFormatError(f"{path}: not a valid safetensors file, or truncated ({file_size:,} bytes)")
    (length,) = struct.unpack("<Q", prefix[:8])
    if length > min(_MAX_HEADER_BYTES, file_size - 8):
        raise DeltaFormatError(f"{path}: not a valid safetensors file, or truncated (a header of {length:,} bytes "
                               f"in a file of {file_size:,})")
    return length


def decode_header(raw: bytes, path: Path) -> dict[str, Any]:
    """A safetensors file's JSON header, bounded in size and nesting, a key given twice refused."""
    header = load_json(raw, path, "a valid safetensors file (its header is not JSON)")
    if not isinstance(header, dict):
        raise DeltaFormatError(f"{path}: not a valid safetensors file (its header is not a JSON object)")
    return header


def metadata_json(metadata: dict[str, Any], key: str, path: Path, default: str = "") -> Any:
    """A JSON value held as a string in safetensors metadata, read bounded (depth, keys given twice)."""
    value = metadata.get(key, default)
    if not isinstance(value, str):
        raise DeltaFormatError(f"{path}: metadata {key!r} is {brief(value)}; expected a JSON string")
    return load_json(value.encode("utf-8", "surrogatepass"), path, "JSON")


def _metadata(header: dict[str, Any], path: Path) -> dict[str, Any]:
    metadata = header.get("__metadata__") or {}
    if not isinstance(metadata, dict):
        raise DeltaFormatError(f"{path}: metadata is {brief(metadata)}; expected a JSON object of strings")
    return metadata


def read_header(path: Path) -> tuple[dict[str, Any], int]:
    """A safetensors file's JSON header and the offset where its data starts, reading only the header."""
    with open(path, "rb") as handle:
        length = header_length(handle.read(8), os.fstat(handle.fileno()).st_size, path)
        return decode_header(handle.read(length), path), 8 + length


def _shapes(header: dict[str, Any], path: Path) -> dict[str, list[int]]:
    shapes = metadata_json(_metadata(header, path), "shapes", path, default="{}")
    if not isinstance(shapes, dict):
        raise DeltaFormatError(f"{path}: metadata 'shapes' is {brief(shapes)}; expected a JSON object")
    return shapes


def _numel(shape: Any, path: Path, name: str) -> int:
    if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise DeltaFormatError(f"{path}: shape of '{name}' is {brief(shape)}; expected a list of sizes")
    numel = 1
    for dim in shape:
        numel *= dim
    return numel


def manifest_fields(config_path: Path) -> dict[str, Any]:
    """A stored manifest's fields for display (bounded JSON; the full schema check is `format.read_manifest`'s)."""
    manifest = load_json(Path(config_path).read_bytes(), config_path, "a JSON manifest")
    if not isinstance(manifest, dict):
        raise DeltaFormatError(f"{config_path}: holds {brief(manifest)}; expected a JSON object")
    return manifest


def layer_counts(tensors_path: Path) -> list[ParameterSummary]:
    """Non-zeros per layer (`embeddings`, `encoder.layer.N`, ...) of a delta's tensors file, from its header:
    each parameter's size from the metadata's `shapes`, its non-zeros from the length of `P::values`."""
    header, _ = read_header(tensors_path)
    shapes = _shapes(header, tensors_path)
    rows = []
    for key, entry in header.items():
        if key.endswith(_VALUES_SUFFIX) and isinstance(entry, dict):
            name = key.removesuffix(_VALUES_SUFFIX)
            numel = _numel(shapes.get(name), tensors_path, name)
            rows.append(ParameterSummary(name, tuple(shapes[name]), numel, _numel(entry.get("shape"), tensors_path, key)))
    return by_layer(rows)


def mask_counts(masks_path: Path) -> dict[str, int]:
    """Entries in each language's sub-network mask (set bits of its packed `LANG::P` tensors)."""
    data = masks_path.read_bytes()  # the header and the packed bits: one read
    length = header_length(data[:8], len(data), masks_path)
    header, start = decode_header(data[8 : 8 + length], masks_path), 8 + length
    languages = metadata_json(_metadata(header, masks_path), "languages", masks_path, default="[]")
    if not isinstance(languages, list) or not all(isinstance(code, str) for code in languages):
        raise DeltaFormatError(f"{masks_path}: metadata 'languages' is {brief(languages)}; expected a list of codes")
    counts = dict.fromkeys(languages, 0)
    for key, entry in header.items():
        language, _, _ = key.partition("::")
        if language in counts and isinstance(entry, dict):
            begin, end = entry.get("data_offsets", (0, 0))
            counts[language] += int.from_bytes(data[start + begin : start + end], "little").bit_count()
    return counts
