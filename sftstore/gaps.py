"""Sorted, unique flat indices as one-byte gaps plus an escape list: the index coding of format version 2.

The gap of entry `i` is `indices[i] - indices[i - 1]`, counting `indices[-1]` as -1, so every gap is at
least 1 (the first gap is the first index plus one). A gap of at most 255 is stored in `gaps[i]`
(uint8). A larger one stores 0 there, and its position and full value go to the escape list:
`escape_positions` (strictly increasing) and `escape_values` (each above 255), both int32 (int64 only
when a count or a gap reaches 2**31). Decoding is a cumulative sum, minus one.

`check` proves, before anything is decoded, that the code decodes to strictly increasing indices in
`[0, numel)`: zeros exactly at the escape positions, escapes above 255, and a total within the
parameter. It costs a few vectorised reductions, no per-entry Python. Decoding is one pass of the C
extension (`native`) where it is built, a numpy widening and torch's cumulative sum elsewhere.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from . import native
from .errors import DeltaFormatError

MAX_INLINE_GAP = 255
GAP_PARTS = ("gaps", "escape_positions", "escape_values")
_INDEX_DTYPES = (torch.int32, torch.int64)


def _int_dtype_for(largest: int) -> torch.dtype:
    return torch.int32 if largest < 2**31 else torch.int64


@dataclass(frozen=True)
class GapCode:
    """One parameter's indices, coded: `gaps` (uint8), `escape_positions` and `escape_values`."""

    gaps: torch.Tensor
    escape_positions: torch.Tensor
    escape_values: torch.Tensor

    def tensors(self) -> dict[str, torch.Tensor]:
        """The three tensors by part name (as stored: `P::gaps`, `P::escape_positions`, `P::escape_values`)."""
        return {"gaps": self.gaps, "escape_positions": self.escape_positions, "escape_values": self.escape_values}


def encode(indices: torch.Tensor, numel: int) -> GapCode:
    """Code sorted, unique flat indices of a parameter of `numel` elements (on the CPU)."""
    flat = indices.detach().cpu().numpy()  # numpy: single-threaded, and faster than torch on these int ops
    gaps = np.empty_like(flat)  # in the indices' dtype: no gap exceeds numel
    if flat.size:
        gaps[0] = flat[0] + 1
        np.subtract(flat[1:], flat[:-1], out=gaps[1:])  # np.diff(prepend=...) copies the input first: 3x slower
    positions = np.flatnonzero(gaps > MAX_INLINE_GAP)
    inline = gaps.astype(np.uint8)
    inline[positions] = 0
    return GapCode(
        torch.from_numpy(inline),
        torch.from_numpy(positions).to(_int_dtype_for(flat.size)),
        torch.from_numpy(gaps[positions]).to(_int_dtype_for(numel)),
    )


def check(code: GapCode, numel: int, name: str, where: str) -> None:
    """Raise `DeltaFormatError` naming `where` and the tensor unless `code` decodes to strictly increasing
    indices in `[0, numel)`."""
    gaps, positions, escapes = code.gaps, code.escape_positions, code.escape_values
    if gaps.dtype != torch.uint8 or gaps.dim() != 1:
        raise DeltaFormatError(f"{where}: tensor '{name}::gaps' is {gaps.dtype} with {gaps.dim()} dimensions; "
                               "expected 1-D uint8")
    for part, tensor in (("escape_positions", positions), ("escape_values", escapes)):
        if tensor.dtype not in _INDEX_DTYPES or tensor.dim() != 1:
            raise DeltaFormatError(f"{where}: tensor '{name}::{part}' is {tensor.dtype} with {tensor.dim()} "
                                   "dimensions; expected 1-D int32 or int64")
    count, escaped = gaps.numel(), positions.numel()
    if escapes.numel() != escaped:
        raise DeltaFormatError(f"{where}: '{name}::escape_positions' has {escaped} entries but "
                               f"'{name}::escape_values' has {escapes.numel()}")
    if escaped:
        _check_escape_list(gaps, positions, escapes, numel, name, where)
    array = gaps.numpy()  # numpy's integer reductions are several times faster than torch's on uint8
    zeros = count - int(np.count_nonzero(array))
    if zeros != escaped:
        raise DeltaFormatError(f"{where}: tensor '{name}::gaps' holds {zeros} zero gaps but the escape list has "
                               f"{escaped} entries (a zero gap outside the escape list duplicates an index)")
    total = int(array.sum(dtype=np.int64)) + (int(escapes.sum(dtype=torch.int64)) if escaped else 0)
    if total > numel:
        raise DeltaFormatError(f"{where}: tensor '{name}::gaps' decodes to index {total - 1}, outside "
                               f"[0, {numel})")


def _check_escape_list(
    gaps: torch.Tensor, positions: torch.Tensor, escapes: torch.Tensor, numel: int, name: str, where: str
) -> None:
    count = gaps.numel()
    first, last = int(positions[0]), int(positions[-1])
    if first < 0 or last >= count:
        bad = first if first < 0 else last
        raise DeltaFormatError(f"{where}: tensor '{name}::escape_positions' holds {bad}, outside the "
                               f"{count} gaps")
    if positions.numel() > 1 and not bool((positions[1:] > positions[:-1]).all()):
        raise DeltaFormatError(f"{where}: tensor '{name}::escape_positions' is not strictly increasing")
    inline = gaps[positions.long()]
    if bool(inline.any()):
        raise DeltaFormatError(f"{where}: tensor '{name}::gaps' holds {int(inline.max())} at an escape position; "
                               "expected 0 there")
    low, high = int(escapes.min()), int(escapes.max())
    if low <= MAX_INLINE_GAP:
        raise DeltaFormatError(f"{where}: tensor '{name}::escape_values' holds the gap {low}, which fits in one "
                               f"byte; escaped gaps are above {MAX_INLINE_GAP}")
    # Every gap is at most numel, and their sum too: a float64 bound first, so the exact int64 sum cannot overflow.
    if high > numel or float(escapes.sum(dtype=torch.float64)) > numel:
        raise DeltaFormatError(f"{where}: tensor '{name}::escape_values' overflows the parameter: its gaps "
                               f"(largest {high}) add up to more than its {numel} elements")


def decode(code: GapCode, numel: int) -> torch.Tensor:
    """The flat indices of a code that passed `check` (int32, int64 only for 2**31 elements or more)."""
    kernel = native.kernel()
    if kernel is not None and numel < 2**31 and code.escape_values.dtype == torch.int32:
        indices = torch.empty(code.gaps.numel(), dtype=torch.int32)
        kernel.decode_gaps(code.gaps.contiguous().numpy(), code.escape_values.contiguous().numpy(), indices.numpy(),
                           numel)
        return indices
    # numpy's conversion never spreads over torch's intra-op threads (which contend with the sha256 thread of
    # a load); torch's cumsum is a plain sequential loop, about three times numpy's speed.
    indices = torch.from_numpy(code.gaps.numpy().astype(np.int32 if numel < 2**31 else np.int64))
    if code.escape_positions.numel():
        indices[code.escape_positions.long()] = code.escape_values.to(indices.dtype)
    if indices.numel():
        indices[0] -= 1
    return indices.cumsum_(0)
