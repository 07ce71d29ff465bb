"""Keeping secrets off the terminal: the token in use, anything shaped like a Hugging Face token, and
credentials in URLs are removed from every text shown to a user (errors, log lines)."""

from __future__ import annotations

import logging
import re
from urllib.parse import urlsplit, urlunsplit

_HF_TOKEN_RE = re.compile(r"\bhf_[A-Za-z0-9]{6,}")
# a credential after "Bearer"/"Basic": 8 or more token characters, one of them a digit or punctuation (not a word)
_AUTHORIZATION_RE = re.compile(r"(?i)\b(bearer|basic)(\s+)(?=[A-Za-z0-9._~+/=-]*[0-9._~+/=])[A-Za-z0-9._~+/=-]{8,}")
_SECRET_PARAMETER_RE = re.compile(r"(?i)\b(token|access_token|api_key|apikey|password)(=)[^\s&,;'\"]+")
_URL_CREDENTIALS_RE = re.compile(r"\b([a-z][a-z0-9+.-]*://)[^/\s?#]*@", re.IGNORECASE)
MASK = "***"
_secrets: set[str] = set()


def remember_secret(value: str | None) -> None:
    """Redact `value` (e.g. a token given on the command line) from everything shown from now on."""
    if value and len(value) >= 4:
        _secrets.add(value)


def _token_in_use() -> str | None:
    try:
        from huggingface_hub import get_token

        return get_token()
    except Exception:  # no token, or an unreadable token file: nothing to redact
        return None


def redact(text: str) -> str:
    """`text` without the secrets this process knows, `hf_...` tokens, authorisation values and URL credentials."""
    secrets = set(_secrets) | ({token} if (token := _token_in_use()) else set())
    for secret in sorted(secrets, key=len, reverse=True):
        text = text.replace(secret, MASK)
    text = _HF_TOKEN_RE.sub(MASK, text)
    for pattern in (_AUTHORIZATION_RE, _SECRET_PARAMETER_RE):
        text = pattern.sub(lambda match: f"{match[1]}{match[2]}{MASK}", text)
    return _URL_CREDENTIALS_RE.sub(r"\1", text)


def redact_url(url: str) -> str:
    """`url` without the `user:password@` it may hold (a placeholder when it cannot be parsed)."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        netloc = f"[{host}]" if ":" in host else host
        netloc += f":{parts.port}" if parts.port else ""
    except ValueError:
        return redact(url)
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment)) if parts.netloc else redact(url)


class RedactingFilter(logging.Filter):
    """A logging filter that redacts each record's message before a handler writes it."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg, record.args = redact(record.getMessage()), None
        return True


def redact_logs(*logger_names: str) -> None:
    """Redact what the handlers of these loggers (and the root logger's) write; idempotent."""
    for name in ("", *logger_names):
        for handler in logging.getLogger(name).handlers:
            if not any(isinstance(f, RedactingFilter) for f in handler.filters):
                handler.addFilter(RedactingFilter())
