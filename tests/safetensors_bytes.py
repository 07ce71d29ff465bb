"""Taking a safetensors file's bytes apart and putting them back, for tests that forge headers."""

from __future__ import annotations

import json
import struct


def split_header(data: bytes) -> tuple[dict, bytes]:
    """The parsed JSON header of safetensors bytes, and the tensor data after it."""
    (length,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + length]), data[8 + length :]


def join_header(header: dict, body: bytes) -> bytes:
    """Safetensors bytes from a header (serialised as given) and the tensor data."""
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + body
