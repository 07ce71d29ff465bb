"""Naming base models: Hub ids, the ids the Hub renamed, and local directories.

In 2024 the Hub moved its legacy un-namespaced models under organisations
(`xlm-roberta-base` -> `FacebookAI/xlm-roberta-base`, `bert-base-multilingual-cased` ->
`google-bert/bert-base-multilingual-cased`); both names still load. sftstore files deltas, and the
registry lists them, under the short legacy id, so either spelling finds the same deltas.
"""

from __future__ import annotations

import os
import re

_HUB_ID_RE = re.compile(r"[A-Za-z0-9][\w.-]{0,95}(/[A-Za-z0-9][\w.-]{0,95})?")
# The legacy models the Hub moved under an organisation (encoders this project composes onto).
_RENAMED = {
    "google-bert": (
        "bert-base-cased", "bert-base-uncased", "bert-large-cased", "bert-large-uncased",
        "bert-base-multilingual-cased", "bert-base-multilingual-uncased", "bert-base-chinese",
        "bert-base-german-cased",
    ),
    "FacebookAI": (
        "roberta-base", "roberta-large", "xlm-roberta-base", "xlm-roberta-large",
        "xlm-mlm-100-1280", "xlm-mlm-17-1280",
    ),
    "distilbert": (
        "distilbert-base-cased", "distilbert-base-uncased", "distilbert-base-multilingual-cased",
    ),
}
_LEGACY_BY_CURRENT = {f"{org}/{name}": name for org, names in _RENAMED.items() for name in names}


def spelled_like_hub_id(text: str) -> bool:
    """Whether `text` is spelled as a Hub model id (`name` or `org/name`); an absolute path never is."""
    return bool(_HUB_ID_RE.fullmatch(text)) and ".." not in text


def is_hub_id(text: str | os.PathLike) -> bool:
    """Whether `text` names a Hub model id rather than a local path (an existing directory wins)."""
    text = os.fspath(text)
    return spelled_like_hub_id(text) and not os.path.exists(text)


def canonical_base_id(base_id: str) -> str:
    """The id deltas are filed under: a renamed model's legacy id (`FacebookAI/xlm-roberta-base` ->
    `xlm-roberta-base`); any other id unchanged."""
    return _LEGACY_BY_CURRENT.get(base_id, base_id)


def base_id_aliases(base_id: str) -> tuple[str, ...]:
    """Every id that names the same Hub model as `base_id`, the canonical one first."""
    canonical = canonical_base_id(base_id)
    return (canonical, *sorted(current for current, legacy in _LEGACY_BY_CURRENT.items() if legacy == canonical))
