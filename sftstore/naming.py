"""Names and references: `lang/hau`, `task/ner@2`, `lang/hau@best`."""

from __future__ import annotations

import re
from dataclasses import dataclass

from .errors import InvalidNameError

KINDS = ("language", "task")
_KIND_PREFIXES = {"lang": "language", "language": "language", "task": "task"}
_KIND_TO_PREFIX = {"language": "lang", "task": "task"}
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]{0,127}")
_REPO_PART = r"[A-Za-z0-9_](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9_])?"
_REPO_ID_RE = re.compile(f"{_REPO_PART}/{_REPO_PART}")
LATEST = "latest"


def _is_version(text: str) -> bool:
    return text.isascii() and text.isdigit()


def validate_name(name: object, what: str = "name") -> str:
    """Return `name` if it is safe as a delta name or alias (no path separators, no `..`)."""
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name) or ".." in name:
        raise InvalidNameError(
            f"invalid {what} {name!r}: expected letters, digits and '._+-', starting with a letter "
            "or digit, at most 128 characters, no path separators and no '..'"
        )
    return name


def validate_repo_id(repo_id: object) -> str:
    """Return `repo_id` if it is a Hub repository id `ORG/NAME` (ASCII, as the Hub requires), else raise."""
    if not isinstance(repo_id, str) or not _REPO_ID_RE.fullmatch(repo_id) or "--" in repo_id or ".." in repo_id:
        raise InvalidNameError(
            f"invalid repository id {repo_id!r}: expected ORG/NAME of ASCII letters, digits, '-', '_' and '.', neither "
            "part starting or ending with '-' or '.', at most 96 characters each, no '--' or '..'"
        )
    return repo_id


def validate_alias(alias: object) -> str:
    """An alias is a name that cannot be confused with a version number or `latest`."""
    validate_name(alias, "alias")
    if _is_version(alias) or alias == LATEST:
        raise InvalidNameError(f"invalid alias {alias!r}: version numbers and 'latest' are reserved")
    return alias


def kind_prefix(kind: str) -> str:
    return _KIND_TO_PREFIX[kind]


@dataclass(frozen=True)
class DeltaRef:
    """A parsed reference: kind, name and an optional selector (a version number, an alias or `latest`)."""

    kind: str
    name: str
    selector: str | None = None

    @classmethod
    def parse(cls, text: str, default_kind: str | None = None) -> "DeltaRef":
        """Parse `KIND/NAME[@VERSION|@ALIAS]`; `NAME[@...]` alone needs `default_kind`."""
        if not isinstance(text, str) or not text:
            raise InvalidNameError(f"invalid reference {text!r}: expected KIND/NAME[@VERSION|@ALIAS]")
        body, _, selector = text.partition("@")
        if "/" in body:
            prefix, _, name = body.partition("/")
            kind = _KIND_PREFIXES.get(prefix)
            if kind is None:
                raise InvalidNameError(
                    f"invalid reference {text!r}: kind must be 'lang' or 'task', got {prefix!r}"
                )
        elif default_kind is not None:
            kind, name = default_kind, body
        else:
            raise InvalidNameError(f"invalid reference {text!r}: expected KIND/NAME, e.g. lang/hau or task/ner@2")
        validate_name(name)
        if "@" not in text:
            return cls(kind, name)
        if not _is_version(selector):
            validate_name(selector, "version or alias")
        return cls(kind, name, selector)

    @property
    def version(self) -> int | None:
        return int(self.selector) if self.selector and _is_version(self.selector) else None

    def __str__(self) -> str:
        text = f"{kind_prefix(self.kind)}/{self.name}"
        return text if self.selector is None else f"{text}@{self.selector}"
