"""Recognising a failed connection (to the Hub or anywhere) and saying what to do about it."""

from __future__ import annotations

import importlib
import os
import re
import socket
from functools import lru_cache
from urllib.parse import urlsplit, urlunsplit

from .errors import SftError

_CREDENTIALS_RE = re.compile(r"(\w+://)[^/@\s]+@")
OFFLINE_HINT = ("check your connection and HF_ENDPOINT, or work offline from the Hugging Face cache "
                "(HF_HUB_OFFLINE=1, or `sft pull --offline`)")


class NetworkError(SftError):
    """The Hub (or a proxy) could not be reached; the message says where and what to try."""


@lru_cache(maxsize=1)
def _transport_errors() -> tuple[type[BaseException], ...]:
    """Connection-level error types: the OS's, and those of the HTTP stacks `huggingface_hub` may use."""
    found: list[type[BaseException]] = [ConnectionError, TimeoutError, socket.gaierror]
    for module_name, attribute in (("httpx2", "TransportError"), ("httpx", "TransportError"),
                                   ("requests", "ConnectionError"), ("requests", "Timeout")):
        try:
            found.append(getattr(importlib.import_module(module_name), attribute))
        except (ImportError, AttributeError):
            continue
    return tuple(found)


def network_cause(exc: BaseException) -> BaseException | None:
    """The connection failure behind `exc` (itself, or along its cause/context chain), if any."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, _transport_errors()):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


def hub_endpoint() -> str:
    """The Hub endpoint in use, without any user name or password it may hold."""
    from huggingface_hub import constants

    return redact_url(constants.ENDPOINT or os.environ.get("HF_ENDPOINT", "https://huggingface.co"))


def redact_url(url: str) -> str:
    """`url` with credentials (`user:password@`) removed."""
    try:
        parts = urlsplit(url)
        if parts.username is None and parts.password is None:
            return url
        host = parts.hostname or ""
        netloc = f"{host}:{parts.port}" if parts.port else host
        return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))
    except ValueError:
        return "<unparsable HF_ENDPOINT>"


def describe(cause: BaseException) -> str:
    """A one-line description of a connection failure (its type and first line), credentials removed."""
    text = str(cause).strip().splitlines()[0] if str(cause).strip() else "no details"
    return f"{type(cause).__name__}: " + _CREDENTIALS_RE.sub(r"\1", text)


def network_error(what: str, cause: BaseException) -> NetworkError:
    """The error to raise when `what` failed because of `cause`, a connection failure."""
    return NetworkError(f"{what}: cannot reach the Hub at {hub_endpoint()} ({describe(cause)}); {OFFLINE_HINT}")
