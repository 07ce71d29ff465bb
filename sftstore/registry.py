"""The registry: a catalogue of published deltas, (base model, kind, name) -> Hub repository.

The catalogue ships with sftstore (`registry/index.json` in the source tree); `SFTSTORE_REGISTRY`
or the `path` argument points at another file with the same schema (see `registry/README.md`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path

from .base_ids import canonical_base_id
from .bounded_json import load_json
from .errors import SftError
from .languages import equivalent_codes
from .naming import KINDS, validate_name, validate_repo_id

SCHEMA_VERSION = 1
FORMATS = ("sftstore", "composable-sft")
_REQUIRED = ("base_model", "kind", "name", "repo_id", "revision", "format", "source", "verified")
COMPOSABLE_TASK_TYPES = ("token-classification", "sequence-classification")
_UNSUPPORTED_TASK_TYPES = {
    "dependency-parsing": "dependency parsing: not supported by compose "
                          "(composable-sft's biaffine parser head has no transformers model class)",
    "question-answering": "question answering: not supported by compose yet",
}


class RegistryError(SftError, ValueError):
    """The registry file is malformed; the message names the file, the entry and the field."""


@dataclass(frozen=True)
class RegistryEntry:
    """One published delta."""

    base_model: str
    kind: str
    name: str
    repo_id: str
    revision: str
    format: str
    source: str
    verified: bool
    license: str | None = None
    aliases: tuple[str, ...] = ()
    task_type: str | None = None
    labels: tuple[str, ...] = ()
    source_languages: tuple[str, ...] = ()  # a task delta's training languages, where its publisher says

    def matches(self, name: str) -> bool:
        return name == self.name or name in self.aliases

    def serves_base(self, base: str) -> bool:
        """Whether this entry is for `base`, under any of its Hub ids."""
        return canonical_base_id(self.base_model) == canonical_base_id(base)

    def matches_language(self, code: str) -> bool:
        """Whether this language entry serves `code` or an equivalent ISO 639 code (`ha` for `hau`)."""
        return self.kind == "language" and any(self.matches(c) for c in equivalent_codes(code))

    @property
    def unsupported(self) -> str | None:
        """None when `sft compose` can use this entry, else a one-line reason, `WHAT: WHY`."""
        if self.kind == "language" or (self.format == "sftstore" and self.task_type is None):
            return None  # an sftstore artifact says its task type and labels itself
        if self.task_type not in COMPOSABLE_TASK_TYPES:
            generic = f"task type {self.task_type or 'unknown'}: not supported by compose"
            return _UNSUPPORTED_TASK_TYPES.get(self.task_type, generic)
        if not self.labels and self.format == "composable-sft":
            return f"labels unknown: the registry records no {self.task_type} labels; pass --labels"
        return None

    def unsupported_with(self, labels: Sequence[str] | None = None) -> str | None:
        """`unsupported`, except that `labels` given by the user stand in for a task's unrecorded ones."""
        if labels and self.kind == "task" and self.task_type in COMPOSABLE_TASK_TYPES:
            return None
        return self.unsupported

    def to_dict(self) -> dict:
        return {**asdict(self), "unsupported": self.unsupported}


@dataclass
class Registry:
    entries: list[RegistryEntry] = field(default_factory=list)
    path: Path | None = None

    def find(self, base: str, kind: str, name: str) -> RegistryEntry | None:
        """The entry serving (base under any Hub id, kind, name), by name or alias; for a language also by an
        equivalent ISO 639 code, an exact name winning."""
        candidates = [e for e in self.entries if e.kind == kind and e.serves_base(base)]
        names = equivalent_codes(name) if kind == "language" else (name,)
        return next((e for n in names for e in candidates if e.matches(n)), None)

    def find_repo(self, repo_id: str) -> RegistryEntry | None:
        """The entry for a Hub repository id."""
        return next((e for e in self.entries if e.repo_id == repo_id), None)

    def search(self, base: str | None = None, lang: str | None = None, task: str | None = None) -> list[RegistryEntry]:
        """Entries for `base` (any if None), for language `lang` and/or task `task`."""
        def wanted(entry: RegistryEntry) -> bool:
            if base is not None and not entry.serves_base(base):
                return False
            if lang is None and task is None:
                return True
            return (lang is not None and entry.matches_language(lang)) or (
                task is not None and entry.kind == "task" and entry.matches(task)
            )

        return [e for e in self.entries if wanted(e)]


def default_registry_path() -> Path:
    if os.environ.get("SFTSTORE_REGISTRY"):
        return Path(os.environ["SFTSTORE_REGISTRY"])
    return Path(str(resources.files("sftstore_registry").joinpath("index.json")))


def _entry(raw: object, where: str) -> RegistryEntry:
    def fail(problem: str) -> RegistryError:
        return RegistryError(f"{where}: {problem}")

    if not isinstance(raw, dict):
        raise fail("expected an object")
    missing = [key for key in _REQUIRED if key not in raw]
    if missing:
        raise fail(f"missing field(s) {', '.join(missing)}")
    unknown = set(raw) - {f for f in RegistryEntry.__dataclass_fields__}
    if unknown:
        raise fail(f"unknown field(s) {', '.join(sorted(unknown))}")
    if raw["kind"] not in KINDS:
        raise fail(f"field 'kind' is {raw['kind']!r}; expected 'language' or 'task'")
    if raw["format"] not in FORMATS:
        raise fail(f"field 'format' is {raw['format']!r}; expected one of {', '.join(FORMATS)}")
    try:
        validate_repo_id(raw["repo_id"])
    except SftError:
        raise fail(f"field 'repo_id' is {raw['repo_id']!r}; expected ORG/NAME") from None
    if not isinstance(raw["verified"], bool):
        raise fail("field 'verified' must be true or false")
    for key in ("base_model", "revision", "source"):
        if not isinstance(raw[key], str) or not raw[key]:
            raise fail(f"field '{key}' must be a non-empty string")
    for key in ("aliases", "labels", "source_languages"):
        if not isinstance(raw.get(key, []), list) or not all(isinstance(x, str) for x in raw.get(key, [])):
            raise fail(f"field '{key}' must be a list of strings")
    try:
        for name in [raw["name"], *raw.get("aliases", [])]:
            validate_name(name)
    except SftError as exc:
        raise fail(str(exc)) from None
    return RegistryEntry(**{**raw, **{key: tuple(raw.get(key, ())) for key in ("aliases", "labels", "source_languages")}})


def load_registry(path: str | os.PathLike | None = None) -> Registry:
    """Read and validate a registry file; every (base, kind, name-or-alias) must be unique."""
    path = Path(path) if path is not None else default_registry_path()
    try:
        data = load_json(path.read_bytes(), path, "a readable JSON registry", RegistryError)
    except OSError as exc:
        raise RegistryError(f"{path}: not a readable JSON registry ({exc})") from None
    if not isinstance(data, dict) or data.get("schema_version") != SCHEMA_VERSION or not isinstance(data.get("entries"), list):
        raise RegistryError(f"{path}: expected {{\"schema_version\": {SCHEMA_VERSION}, \"entries\": [...]}}")
    entries, seen = [], {}
    for position, raw in enumerate(data["entries"]):
        entry = _entry(raw, f"{path}: entry {position}")
        for name in (entry.name, *entry.aliases):
            key = (canonical_base_id(entry.base_model), entry.kind, name)
            if key in seen:
                raise RegistryError(f"{path}: entry {position} ({entry.repo_id}) and entry {seen[key]} both serve {key}")
            seen[key] = position
        entries.append(entry)
    return Registry(entries, path)
