"""Named sub-network masks kept with a delta (S4-Tuning's per-language masks), one bit per entry.

A delta's support says which entries changed; its masks say which entries each language was
allowed to change (S4 trains the union, one language's mask per batch). They live in the optional
artifact file `sft_masks.safetensors` and are read by `sft overlap --masks` and
`sftstore.analysis.mask_overlap_matrix`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping

import numpy as np
import torch

from .errors import DeltaFormatError
from .naming import validate_name

Shapes = dict[str, tuple[int, ...]]


def _numel(shape: tuple[int, ...]) -> int:
    return math.prod(shape)


def _pack(mask: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(np.packbits(mask.detach().to("cpu", torch.bool).reshape(-1).numpy()))


class SubnetworkMasks(Mapping[str, dict[str, torch.Tensor]]):
    """Boolean masks over the base parameters, one set per name (a language code), stored bit-packed.

    `masks["hau"]` unpacks Hausa's masks: `{parameter name: bool tensor of the parameter's shape}`.
    Every name covers the same parameters. Packing is numpy's `packbits` (big-endian bit order) of
    the flattened mask, the unused bits of the last byte zero, so equal masks are equal bytes.
    """

    def __init__(self, packed: Mapping[str, Mapping[str, torch.Tensor]], shapes: Mapping[str, Iterable[int]]) -> None:
        self.shapes: Shapes = {name: tuple(int(d) for d in shape) for name, shape in shapes.items()}
        self._packed = {language: dict(tensors) for language, tensors in packed.items()}

    @classmethod
    def from_bool(cls, masks: Mapping[str, Mapping[str, torch.Tensor]]) -> "SubnetworkMasks":
        """Pack `{language: {parameter: bool tensor}}`; every language must cover the same parameters and shapes."""
        shapes: Shapes | None = None
        for language, tensors in masks.items():
            validate_name(language, "mask name")
            these = {name: tuple(t.shape) for name, t in tensors.items()}
            if shapes is not None and these != shapes:
                raise ValueError(f"the masks of {language!r} cover other parameters or shapes than the first language's")
            shapes = these
        packed = {language: {name: _pack(t) for name, t in sorted(tensors.items())} for language, tensors in masks.items()}
        return cls(packed, shapes or {})

    def __getitem__(self, language: str) -> dict[str, torch.Tensor]:
        packed = self._packed[language]
        return {
            name: torch.from_numpy(np.unpackbits(bits.numpy(), count=_numel(self.shapes[name])).astype(bool)).reshape(
                self.shapes[name])
            for name, bits in packed.items()
        }

    def __iter__(self) -> Iterator[str]:
        return iter(self._packed)

    def __len__(self) -> int:
        return len(self._packed)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, SubnetworkMasks):
            return NotImplemented
        return self.shapes == other.shapes and list(self._packed) == list(other._packed) and all(
            self._packed[lang].keys() == other._packed[lang].keys()
            and all(torch.equal(t, other._packed[lang][n]) for n, t in self._packed[lang].items())
            for lang in self._packed
        )

    def nnz(self, language: str) -> int:
        """How many entries `language`'s masks select."""
        return sum(int(np.unpackbits(bits.numpy()).sum()) for bits in self._packed[language].values())

    def select(self, languages: Iterable[str]) -> "SubnetworkMasks":
        """The masks of `languages` only."""
        return SubnetworkMasks({language: self._packed[language] for language in languages}, self.shapes)

    def to_tensors(self) -> dict[str, torch.Tensor]:
        """`{"LANG::PARAM": packed uint8}`, the tensors of `sft_masks.safetensors`."""
        return {f"{language}::{name}": bits for language, tensors in self._packed.items() for name, bits in tensors.items()}

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, torch.Tensor], shapes: Mapping[str, tuple[int, ...]],
                     languages: list[str], where: str) -> "SubnetworkMasks":
        """Validate the tensors of `sft_masks.safetensors` (keys, dtype, lengths, padding bits) against
        `shapes` (already validated) and order them as `languages`; `where` names the file."""
        packed: dict[str, dict[str, torch.Tensor]] = {}
        for key, bits in tensors.items():
            language, sep, name = key.partition("::")
            if not sep or not name:
                raise DeltaFormatError(f"{where}: unexpected tensor '{key}'; expected 'LANGUAGE::PARAMETER'")
            try:
                validate_name(language, "mask name")
            except ValueError as exc:
                raise DeltaFormatError(f"{where}: tensor '{key}': {exc}") from None
            if name not in shapes:
                raise DeltaFormatError(f"{where}: tensor '{key}': metadata 'shapes' has no entry for '{name}'")
            shape = shapes[name]
            numel = _numel(shape)
            if bits.dtype != torch.uint8 or bits.dim() != 1 or bits.numel() != (numel + 7) // 8:
                raise DeltaFormatError(
                    f"{where}: tensor '{key}' is {bits.dtype} of shape {tuple(bits.shape)}; expected uint8 of shape "
                    f"({(numel + 7) // 8},) (one bit per entry of {tuple(shape)})"
                )
            if numel % 8 and int(bits[-1]) & ((1 << (8 - numel % 8)) - 1):
                raise DeltaFormatError(f"{where}: tensor '{key}' sets padding bits past the parameter's {numel} entries")
            packed.setdefault(language, {})[name] = bits
        if sorted(packed) != sorted(languages) or len(set(languages)) != len(languages):
            raise DeltaFormatError(f"{where}: metadata 'languages' is {languages}; the tensors hold {sorted(packed)}")
        packed = {language: packed[language] for language in languages}
        names = set(shapes)
        for language, tensors in packed.items():
            if set(tensors) != names:
                missing = sorted(names - set(tensors))
                raise DeltaFormatError(f"{where}: the masks of '{language}' lack parameter(s) {', '.join(missing[:5])}")
        return cls(packed, shapes)
