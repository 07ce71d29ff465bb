"""The resident model: one base encoder on the device, a head per task, the resident pair's deltas added.

Every task model shares the one encoder (`base_model`); only its head is its own. Switching pairs goes
through the composer (`ComposedModel`): a language swap reverts the old language delta exactly and adds
the new one after the task delta, and a task change reverts everything and adds the task delta, then
the language delta, as a one-shot `compose` does (the composer's compositions are canonical anyway), so
the weights are bit-identical to a fresh one-shot `compose` of the pair. A switch that fails
before changing anything (a delta that cannot be loaded or does not fit) leaves the resident pair as it
was; one that fails part-way is rolled back to the previous pair. A pair is refused when a one-shot
`compose` would refuse it: a delta touching a base parameter the task's own model class does not build
(BERT's pooler, which token classification leaves out, although the shared encoder has it). Used by one
thread (the worker).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Hashable, Sequence

import torch
from torch import nn

from ..compose import ComposedModel, default_device, parse_dtype
from ..delta import SparseDelta
from ..errors import BaseModelMismatchError, SftError
from ..modeling import base_parameters, fingerprint, load_model, load_tokenizer, model_class_for
from ..predict import Prediction, predict
from ..settings import base_key
from ..store import DeltaStore, StoredVersion
from .cache import DeltaCache
from .pairs import Pair, version_key


class ServingEngine:
    """Loads `base` once; `switch(pair)` makes a pair resident, `predict(texts)` answers with it."""

    def __init__(self, base: str, store: DeltaStore, *, device: str | torch.device | None = None,
                 dtype: str | torch.dtype | None = None, max_cached_bytes: int = 1 << 30,
                 on_cache_event: Callable[[str], None] = lambda event: None) -> None:
        self.base_id = base_key(base)
        self.tokenizer = load_tokenizer(base)
        if not getattr(self.tokenizer, "is_fast", False):
            raise SftError(f"serving needs a base with a fast (Rust `tokenizers`) tokenizer; {base!r} has none")
        encoder = load_model(base)
        self.fingerprint = fingerprint(encoder)
        self.device = torch.device(device) if device is not None else default_device()
        self.dtype = parse_dtype(dtype)
        self.encoder = encoder.to(device=self.device, dtype=self.dtype)
        self.store = store
        self.cache = DeltaCache(max_cached_bytes, self._load, on_cache_event)
        self._versions: dict[Hashable, StoredVersion] = {}  # cache key -> StoredVersion, for loading on a miss
        self._heads: dict[Hashable, nn.Module] = {}  # task version key -> task model sharing the encoder
        self._own_base: dict[Hashable, frozenset[str]] = {}  # task version key -> its model class's base parameters
        self._composed: ComposedModel | None = None
        self.resident: Pair | None = None

    # ---- deltas -------------------------------------------------------------------------------

    def _load(self, key: Hashable) -> SparseDelta:
        """Read, validate and move a stored delta to the device, refusing one made for another base."""
        version = self._versions[key]
        delta = self.store.load(version)
        made_for = delta.config.base_model.fingerprint
        if made_for != self.fingerprint:
            raise BaseModelMismatchError(
                f"{version.ref} was made for another base model (weights_digest {made_for.weights_digest[:12]}, "
                f"arch_digest {made_for.arch_digest[:12]}) than the one served, {self.base_id!r} (weights_digest "
                f"{self.fingerprint.weights_digest[:12]}, arch_digest {self.fingerprint.arch_digest[:12]})")
        if not delta.head:  # a task delta is checked against its task model, head included, when that is built
            delta.check_fits(self.encoder)
        return delta.to(self.device)

    def delta(self, version: StoredVersion, pinned: Sequence[Hashable] = ()) -> SparseDelta:
        """The delta of a stored version, from the cache (loaded and validated on a miss)."""
        key = version_key(version)
        self._versions.setdefault(key, version)
        return self.cache.get(key, pinned)

    def _task_model(self, pair: Pair, task: SparseDelta) -> nn.Module:
        """The task model of `pair`'s task: its own head (zeros until the task delta sets it) on the shared encoder."""
        key = version_key(pair.task)
        if key not in self._heads:
            labels = task.config.labels
            config = copy.deepcopy(self.encoder.config)
            config.num_labels = len(labels)
            config.id2label, config.label2id = dict(enumerate(labels)), {label: i for i, label in enumerate(labels)}
            with torch.device("meta"):
                model = model_class_for(pair.task_type).from_config(config)
            self._own_base[key] = frozenset(base_parameters(model))
            setattr(model, model.base_model_prefix, self.encoder)
            for name, child in model.named_children():
                if name != model.base_model_prefix:
                    child.to_empty(device=self.device).to(self.encoder.dtype)
                    for param in child.parameters():
                        nn.init.zeros_(param)
            task.check_fits(model)
            self._heads[key] = model.eval()
        return self._heads[key]

    def _check_as_one_shot(self, pair: Pair, model: nn.Module, deltas: Sequence[SparseDelta]) -> None:
        """Refuse a delta that touches a base parameter `pair`'s task model class does not build."""
        own = self._own_base[version_key(pair.task)]
        for delta in deltas:
            missing = next((name for name in delta.params if name not in own), None)
            if missing is not None:
                raise BaseModelMismatchError(
                    f"delta {delta.name!r}: parameter '{missing}' does not exist in the base model of "
                    f"{type(model).__name__} (a one-shot compose of this pair refuses it too)")

    # ---- the resident pair --------------------------------------------------------------------

    def switch(self, pair: Pair) -> list[str]:
        """Make `pair` resident; returns the kinds of delta that changed (`task`, `language`)."""
        previous = self.resident
        if previous is not None and previous.key == pair.key:
            return []
        pinned = [k for p in (previous, pair) if p is not None for k in p.key if k is not None]
        task = self.delta(pair.task, pinned)
        language = self.delta(pair.language, pinned) if pair.language is not None else None
        model = self._task_model(pair, task)
        self._check_as_one_shot(pair, model, [task] + ([language] if language is not None else []))
        try:
            changed = self._apply(pair, model, task, language)
        except BaseException:
            self._roll_back(previous)
            raise
        self.resident = pair
        return changed

    def _apply(self, pair: Pair, model: nn.Module, task: SparseDelta, language: SparseDelta | None) -> list[str]:
        composed, previous = self._composed, self.resident
        if composed is not None and composed.model is model and previous is not None:  # the same task: swap the language
            old = next((d for d in composed.deltas if d.kind == "language"), None)
            if language is not None:
                composed.swap(language=language)
            elif old is not None:
                composed.remove(old)
            return ["language"]
        if composed is not None:
            composed.reset()
        self._composed, self.resident = None, None
        composed = ComposedModel(model, self.base_id, self.fingerprint, self.tokenizer)
        self._composed = composed
        for delta in (task, language):
            if delta is not None:
                composed.add(delta)
        old_language = previous.key[1] if previous is not None else None
        return ["task"] + (["language"] if old_language != pair.key[1] else [])

    def _roll_back(self, previous: Pair | None) -> None:
        """After a failed switch: revert whatever is applied, then re-apply the previous pair (if any)."""
        if self._composed is not None:
            self._composed.reset()
        self._composed, self.resident = None, None
        if previous is not None:
            task = self.delta(previous.task)
            language = self.delta(previous.language) if previous.language is not None else None
            self._apply(previous, self._task_model(previous, task), task, language)
            self.resident = previous

    def predict(self, texts: Sequence[str]) -> list[Prediction]:
        """Predictions of the resident pair for `texts`, in one forward pass."""
        if self.resident is None or self._composed is None:
            raise RuntimeError("no pair is resident")
        return predict(self._composed.model, self.tokenizer, texts, self.resident.task_type)

    @property
    def model(self) -> nn.Module | None:
        """The resident pair's task model (None before the first request)."""
        return self._composed.model if self._composed is not None else None
