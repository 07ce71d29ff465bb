"""The composer: load a base once, add any set of deltas in place, hot-swap them, save the result."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ._io import atomic_write_text, give_umask_mode
from .composition import COMPOSITION_FILE, composition_record
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


def canonical_key(delta: SparseDelta, scale: float) -> tuple:
    """Where a (delta, scale) goes in a composition's one application order: the task delta first, then
    the others by kind and name, then scale, then the rest of their manifests."""
    manifest = json.dumps(delta.config.to_dict(), sort_keys=True, default=str)
    return delta.kind != "task", delta.kind, delta.name, scale, manifest


class ComposedModel:
    """A resident base model with deltas added in place.

    `add`, `remove` and `swap` change the composition without reloading the base. The composition is
    canonical: the deltas are always applied in one order (`canonical_key`: the task first, then by kind
    and name), so the weights depend only on the set of (delta, scale) applied, never on the history of
    adds, removes and swaps. A change reverts the applied deltas from the first one that differs in that
    order (exactly: the original values are written back) and applies the new ones from there; removing
    everything restores bit-identical base weights.
    """

    def __init__(self, model: nn.Module, base_id: str, base_fingerprint: BaseFingerprint, tokenizer=None) -> None:
        self.model = model
        self.base_id = base_id
        self.base_fingerprint = base_fingerprint
        self.tokenizer = tokenizer
        self._stack: list[tuple[SparseDelta, AppliedDelta, float]] = []  # in canonical order

    @property
    def deltas(self) -> list[SparseDelta]:
        """The applied deltas, in their (canonical) order of application."""
        return [delta for delta, _, _ in self._stack]

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _check_new(self, delta: SparseDelta, force: bool) -> None:
        if not force:
            check_base(delta, self.base_id, self.base_fingerprint)
        delta.check_fits(self.model)

    def add(self, delta: SparseDelta, scale: float = 1.0, *, force: bool = False) -> None:
        """Add a delta to the weights (a task delta also sets the head and the label names)."""
        self._check_new(delta, force)
        if delta.head and any(d.head for d in self.deltas):
            raise BaseModelMismatchError(
                f"cannot add task delta {delta.name!r}: a task head is already applied; use swap(task=...)"
            )
        self._recompose([*self._pairs(), (delta, scale)])

    def remove(self, delta: SparseDelta) -> None:
        """Take a delta out again; the weights it touched return to their exact earlier values.

        Nothing changes when a delta applied to the model outside this composition overlaps the ones to
        revert (they could not be reverted exactly).
        """
        position = next((i for i, (d, _, _) in enumerate(self._stack) if d is delta), None)
        if position is None:
            raise ValueError(f"delta {delta.kind}/{delta.name} is not applied")
        pairs = self._pairs()
        self._recompose(pairs[:position] + pairs[position + 1 :])

    def reset(self) -> None:
        """Revert every delta: the weights are the base's, bit for bit."""
        self._recompose([])

    def swap(self, *, task: SparseDelta | None = None, language: SparseDelta | None = None, force: bool = False) -> None:
        """Replace the applied task and/or language delta with another one (hot-swap), in one change: only
        the deltas from the first one that differs in canonical order are reverted and re-applied.

        Every new delta is checked first: a refused swap leaves the composition as it was, and so does a
        failure while applying (what was applied is reverted and the previous composition re-applied).
        """
        new = [delta for delta in (task, language) if delta is not None]
        for delta in new:
            self._check_new(delta, force)
        replaced = {delta.kind for delta in new}
        self._recompose([pair for pair in self._pairs() if pair[0].kind not in replaced] + [(d, 1.0) for d in new])

    def _pairs(self) -> list[tuple[SparseDelta, float]]:
        return [(delta, scale) for delta, _, scale in self._stack]

    def _recompose(self, pairs: list[tuple[SparseDelta, float]]) -> None:
        """Make the applied set `pairs`, applied in canonical order; on any failure, the previous set again."""
        target = sorted(pairs, key=lambda pair: canonical_key(*pair))
        keep = 0
        while keep < min(len(target), len(self._stack)) and target[keep][0] is self._stack[keep][0] \
                and target[keep][1] == self._stack[keep][2]:
            keep += 1
        removed = self._stack[keep:]
        chain = [applied for _, applied, _ in removed]
        for applied in chain:
            applied.check_revertible(together=chain)
        for applied in reversed(chain):
            applied.revert()
        del self._stack[keep:]
        on_device = {id(delta): applied.delta for delta, applied, _ in removed}  # no second copy to the device
        try:
            for delta, scale in target[keep:]:
                self._push(delta, scale, on_device.get(id(delta)))
        except BaseException:
            while len(self._stack) > keep:
                self._stack.pop()[1].revert()
            for delta, applied, scale in removed:
                self._push(delta, scale, applied.delta)
            raise

    def _push(self, delta: SparseDelta, scale: float, on_device: SparseDelta | None = None) -> None:
        applied = (on_device or delta.to(self.device)).apply(self.model, scale)
        self._stack.append((delta, applied, scale))
        if delta.kind == "task" and delta.config.labels:
            labels = delta.config.labels
            self.model.config.id2label = dict(enumerate(labels))
            self.model.config.label2id = {label: i for i, label in enumerate(labels)}

    def save(self, directory: str | os.PathLike,
             provenance: Mapping[tuple[str, str], Mapping[str, Any]] | None = None) -> Path:
        """Write a normal `save_pretrained` directory (weights, config with id2label, tokenizer) and the
        composition record (`sft_composition.json`); `provenance` ((kind, name) -> ref, version,
        tensors_sha256; `composition.provenance_of(stored_versions)`) says which stored deltas these are."""
        directory = Path(directory)
        self.model.save_pretrained(directory)
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(directory)
        give_umask_mode(directory)
        base = {"id": self.base_id, "arch_digest": self.base_fingerprint.arch_digest,
                "weights_digest": self.base_fingerprint.weights_digest}
        record = composition_record(base, [(delta, scale) for delta, _, scale in self._stack], provenance)
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
    composed._recompose(list(zip(deltas, scales)))  # checked above; applied in canonical order, or none
    return composed
