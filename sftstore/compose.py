"""The composer: load a base once, add any set of deltas in place, hot-swap them, save the result."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from ._io import atomic_write_text
from .delta import AppliedDelta, SparseDelta
from .errors import BaseModelMismatchError, SftError
from .modeling import BaseFingerprint, fingerprint, load_model, load_tokenizer
from .network import NetworkError
from .settings import base_key

_DTYPES = {
    "fp32": torch.float32, "float32": torch.float32,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
}
COMPOSITION_FILE = "sft_composition.json"


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """`bf16`, `fp16`, `fp32` (or a torch dtype) to a torch dtype."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype.lower() not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}: expected one of {', '.join(sorted(_DTYPES))}")
    return _DTYPES[dtype.lower()]


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def check_base(delta: SparseDelta, base_id: str, actual: BaseFingerprint) -> None:
    """Refuse a delta whose recorded base fingerprint differs from the loaded base's."""
    expected = delta.config.base_model.fingerprint
    if expected != actual:
        raise BaseModelMismatchError(
            f"delta {delta.kind}/{delta.name} was made for base {delta.config.base_model.id!r} "
            f"(arch_digest {expected.arch_digest[:12]}, weights_digest {expected.weights_digest[:12]}) but base "
            f"{base_id!r} has arch_digest {actual.arch_digest[:12]}, weights_digest {actual.weights_digest[:12]}; "
            "use force=True (--force) to compose anyway"
        )


class ComposedModel:
    """A resident base model with deltas added in place.

    `add`, `remove` and `swap` change the composition without reloading the base; removing restores
    bit-identical weights, also when deltas overlap (later deltas are reverted and re-applied).
    """

    def __init__(self, model: nn.Module, base_id: str, base_fingerprint: BaseFingerprint, tokenizer=None) -> None:
        self.model = model
        self.base_id = base_id
        self.base_fingerprint = base_fingerprint
        self.tokenizer = tokenizer
        self._stack: list[tuple[SparseDelta, AppliedDelta, float]] = []

    @property
    def deltas(self) -> list[SparseDelta]:
        """The applied deltas, in the order they were applied."""
        return [delta for delta, _, _ in self._stack]

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def add(self, delta: SparseDelta, scale: float = 1.0, *, force: bool = False) -> None:
        """Add a delta to the weights (a task delta also sets the head and the label names)."""
        if not force:
            check_base(delta, self.base_id, self.base_fingerprint)
        if delta.head and any(d.head for d in self.deltas):
            raise BaseModelMismatchError(
                f"cannot add task delta {delta.name!r}: a task head is already applied; use swap(task=...)"
            )
        applied = delta.to(self.device).apply(self.model, scale)
        self._stack.append((delta, applied, scale))
        if delta.kind == "task" and delta.config.labels:
            labels = delta.config.labels
            self.model.config.id2label = dict(enumerate(labels))
            self.model.config.label2id = {label: i for i, label in enumerate(labels)}

    def remove(self, delta: SparseDelta) -> None:
        """Take a delta out again; the weights it touched return to their exact earlier values.

        The deltas applied after it are reverted first and re-applied after; nothing changes when one
        of them cannot be reverted (a delta applied to the model outside this composition overlaps it).
        """
        position = next((i for i, (d, _, _) in enumerate(self._stack) if d is delta), None)
        if position is None:
            raise ValueError(f"delta {delta.kind}/{delta.name} is not applied")
        chain = [applied for _, applied, _ in self._stack[position:]]
        for applied in chain:
            applied.check_revertible(together=chain)
        for applied in reversed(chain):
            applied.revert()
        later = self._stack[position + 1 :]
        del self._stack[position:]
        for original, applied, scale in later:
            self._stack.append((original, applied.delta.apply(self.model, scale), scale))

    def reset(self) -> None:
        """Revert every delta: the weights are the base's, bit for bit."""
        while self._stack:
            self._stack[-1][1].revert()
            self._stack.pop()

    def swap(self, *, task: SparseDelta | None = None, language: SparseDelta | None = None, force: bool = False) -> None:
        """Replace the applied task and/or language delta with another one (hot-swap).

        Every new delta is checked first: a refused swap leaves the composition as it was.
        """
        for new in (task, language):
            if new is not None:
                if not force:
                    check_base(new, self.base_id, self.base_fingerprint)
                new.check_fits(self.model)
        for new in (task, language):
            if new is None:
                continue
            for old in [d for d in self.deltas if d.kind == new.kind]:
                self.remove(old)
            self.add(new, force=force)

    def save(self, directory: str | os.PathLike) -> Path:
        """Write a normal `save_pretrained` directory (weights, config with id2label, tokenizer)."""
        directory = Path(directory)
        self.model.save_pretrained(directory)
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(directory)
        record = {
            "base_model": self.base_id,
            "deltas": [
                {
                    "kind": delta.kind,
                    "name": delta.name,
                    "scale": scale,
                    "nnz": delta.nnz,
                    "base_model": delta.config.base_model.id,
                    "created_at": delta.config.created_at,
                }
                for delta, _, scale in self._stack
            ],
        }
        atomic_write_text(directory / COMPOSITION_FILE, json.dumps(record, indent=2) + "\n")
        return directory


def _load_tokenizer(base: str | os.PathLike, revision: str | None):
    try:
        return load_tokenizer(base, revision)
    except NetworkError:
        raise
    except SftError:  # a base without tokenizer files still composes
        return None


def compose(
    base: str | os.PathLike | nn.Module,
    deltas: Sequence[SparseDelta],
    *,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    scales: Sequence[float] | None = None,
    force: bool = False,
    revision: str | None = None,
) -> ComposedModel:
    """Load `base` (Hub id, local directory or a model) and add `deltas` to it: `theta + sum(scale * phi)`.

    The model class follows the task delta's `task_type` (`AutoModel` when there is no task delta).
    Fingerprints are checked before anything is loaded onto the device; a mismatch is refused unless
    `force`. Weights are composed on `device` (CUDA when available) in `dtype` (as stored by default).
    """
    tasks = [d for d in deltas if d.kind == "task"]
    if len(tasks) > 1:
        raise ValueError(f"compose takes at most one task delta, got {[d.name for d in tasks]}")
    scales = list(scales) if scales is not None else [1.0] * len(deltas)
    if len(scales) != len(deltas):
        raise ValueError(f"got {len(scales)} scales for {len(deltas)} deltas")
    if isinstance(base, nn.Module):
        model, base_id, tokenizer = base, base_key(getattr(base, "name_or_path", "") or "model"), None
    else:
        task = tasks[0].config if tasks else None
        model = load_model(base, task.task_type if task else None, task.labels if task else (), revision)
        base_id, tokenizer = base_key(base), _load_tokenizer(base, revision)
    digests = fingerprint(model)
    for delta in deltas:  # refuse before anything is moved or changed
        if not force:
            check_base(delta, base_id, digests)
        delta.check_fits(model)
    model.to(device=torch.device(device) if device is not None else default_device(), dtype=parse_dtype(dtype))
    composed = ComposedModel(model, base_id, digests, tokenizer)
    try:
        for delta, scale in sorted(zip(deltas, scales), key=lambda pair: pair[0].kind != "task"):
            composed.add(delta, scale, force=force)
    except BaseException:
        composed.reset()
        raise
    return composed
