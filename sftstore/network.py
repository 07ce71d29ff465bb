"""Recognising a failed connection (to the Hub or anywhere) and saying what to do about it."""

from __future__ import annotations

import importlib
import math
import os
import socket
from functools import lru_cache
from urllib.parse import urlsplit

from .errors import SftError, first_line
from .redaction import redact, redact_url

DEFAULT_TIMEOUT_SECONDS = 30.0
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


def hub_timeout() -> float | None:
    """How long to wait for a silent Hub connection: `SFTSTORE_HUB_TIMEOUT` seconds (default 30; 0: forever)."""
    raw = os.environ.get("SFTSTORE_HUB_TIMEOUT") or str(DEFAULT_TIMEOUT_SECONDS)
    try:
        seconds = float(raw)
    except ValueError:
        seconds = math.nan
    if not math.isfinite(seconds):
        raise SftError(f"SFTSTORE_HUB_TIMEOUT is {raw!r}; expected a number of seconds (0: wait forever)")
    return seconds if seconds > 0 else None


def bound_hub_waits() -> None:
    """Make `huggingface_hub`'s shared HTTP client, which sets no timeout of its own, give up on a connection
    that stays silent for `hub_timeout()` seconds (a timeout set by the user, or per call, is kept)."""
    from huggingface_hub import get_session

    session = get_session()
    if session.timeout.read is None and session.timeout.connect is None:
        session.timeout = hub_timeout()


def network_cause(exc: BaseException) -> BaseException | None:
    """The connection failure behind `exc` (itself, or along its cause/context chain), if any."""
    from huggingface_hub.errors import OfflineModeIsEnabled  # a ConnectionError, but nothing failed

    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, _transport_errors()) and not isinstance(current, OfflineModeIsEnabled):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


def check_endpoint() -> str:
    """The Hub endpoint in use (`HF_ENDPOINT`), as given; a clear error when it is no http(s) URL (checked
    without importing `huggingface_hub`, which fails on some such values as it is imported)."""
    raw = os.environ.get("HF_ENDPOINT") or "https://huggingface.co"
    try:
        parts = urlsplit(raw)
        valid = parts.scheme in ("http", "https") and bool(parts.hostname) and (parts.port or 0) >= 0 \
            and raw == raw.strip()
    except ValueError:  # an unclosed IPv6 bracket, a port that is no number or out of range
        valid = False
    if not valid:
        raise SftError(f"HF_ENDPOINT is {redact_url(raw)!r}; expected an http(s) URL such as https://huggingface.co "
                       "(or unset it to use the Hub)")
    return raw


def hub_endpoint() -> str:
    """The Hub endpoint in use, checked, without any user name or password it may hold (for messages)."""
    return redact_url(check_endpoint())


def describe(cause: BaseException) -> str:
    """A one-line description of a connection failure (its type and first line), credentials removed."""
    return f"{type(cause).__name__}: {redact(first_line(cause, 'no details'))}"


def network_error(what: str, cause: BaseException) -> NetworkError:
    """The error to raise when `what` failed because of `cause`, a connection failure."""
    return NetworkError(f"{what}: cannot reach the Hub at {hub_endpoint()} ({describe(cause)}); {OFFLINE_HINT}")
