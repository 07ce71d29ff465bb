"""A request's `task` and `lang` refs to the stored versions that serve them (pulled on demand if allowed)."""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass

from ..errors import InvalidNameError, RefNotFoundError, SftError
from ..hub import resolve_or_pull, stored_names
from ..naming import DeltaRef
from ..predict import PREDICTABLE_TASK_TYPES
from ..registry import load_registry
from ..store import DeltaStore, StoredVersion


def version_key(version: StoredVersion) -> Hashable:
    """What identifies a stored version's content: base, kind, name, number and tensors' sha256."""
    return (version.base, version.kind, version.name, version.version, version.tensors_sha256)


@dataclass(frozen=True)
class Pair:
    """A (task, language) pair of resolved versions; `language` is None for the task alone."""

    task: StoredVersion
    language: StoredVersion | None
    task_type: str

    @property
    def key(self) -> Hashable:
        return version_key(self.task), version_key(self.language) if self.language else None

    def refs(self) -> dict[str, str | None]:
        return {"task": self.task.ref, "lang": self.language.ref if self.language else None}


class PairNotFound(RefNotFoundError):
    """No stored (or, with pulling allowed, published) delta answers a ref; `tried` lists the refs looked up."""

    def __init__(self, message: str, tried: list[str]) -> None:
        super().__init__(message)
        self.tried = tried


class PairResolver:
    """Resolves refs under one base in the store; with `allow_pull`, pulls what the registry publishes."""

    def __init__(self, store: DeltaStore, base: str, allow_pull: bool) -> None:
        self.store, self.base, self.allow_pull = store, base, allow_pull
        self.registry = load_registry()  # read once: it does not change while the server runs
        self._task_types: dict[Hashable, str | None] = {}

    def resolve(self, task: str, lang: str | None) -> Pair:
        """The pair `task` (`ner`, `task/ner@2`) and `lang` (`hau@best`, or None) name; raises `PairNotFound`,
        `InvalidNameError` (a malformed ref or one of the other kind) or `SftError` (a task that cannot predict)."""
        task_version = self._version(task, "task")
        language = self._version(lang, "language") if lang is not None else None
        task_type = self.task_type(task_version)
        if task_type not in PREDICTABLE_TASK_TYPES:
            raise SftError(f"{task_version.ref} is a {task_type!r} task delta; the server predicts for "
                           f"{' and '.join(PREDICTABLE_TASK_TYPES)} tasks")
        return Pair(task_version, language, task_type)

    def task_type(self, version: StoredVersion) -> str | None:
        key = version_key(version)
        if key not in self._task_types:
            self._task_types[key] = self.store.manifest(version).get("task_type")
        return self._task_types[key]

    def _version(self, text: str, kind: str) -> StoredVersion:
        ref = DeltaRef.parse(text, kind)
        if ref.kind != kind:
            field = "task" if kind == "task" else "lang"
            raise InvalidNameError(f"field {field!r}: {text!r} names a {ref.kind} delta; expected a {kind} delta")
        try:
            return resolve_or_pull(self.store, ref, self.base, pull=self.allow_pull, registry=self.registry)
        except RefNotFoundError as exc:
            entry = self.registry.find(self.base, ref.kind, ref.name)
            tried = [str(DeltaRef(ref.kind, name, ref.selector)) for name in stored_names(ref, entry)]
            raise PairNotFound(str(exc), tried) from None
