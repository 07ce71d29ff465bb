"""Where the store lives and which base model everyday commands use.

`SFTSTORE_HOME` (default `~/.cache/sftstore`) holds the store; `SFTSTORE_BASE` names the default base
model, else the `base` key of `$SFTSTORE_HOME/config.toml` (or the file `SFTSTORE_CONFIG` names).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from .base_ids import canonical_base_id
from .errors import SftError


def store_home() -> Path:
    return Path(os.environ.get("SFTSTORE_HOME") or Path.home() / ".cache" / "sftstore").expanduser()


def config_path() -> Path:
    return Path(os.environ.get("SFTSTORE_CONFIG") or store_home() / "config.toml").expanduser()


def default_base() -> str | None:
    """The base model from `SFTSTORE_BASE`, else from the config file, else None."""
    if os.environ.get("SFTSTORE_BASE"):
        return os.environ["SFTSTORE_BASE"]
    path = config_path()
    if not path.is_file():
        return None
    try:
        value = tomllib.loads(path.read_text(encoding="utf-8")).get("base")
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise SftError(f"{path}: not a readable TOML config ({exc})") from None
    if value is not None and not isinstance(value, str):
        raise SftError(f"{path}: key 'base' must be a string (a Hub id or a local directory)")
    return value


def base_key(base: str | os.PathLike) -> str:
    """How the store files deltas under a base: its (legacy) Hub id, or the absolute path of a local directory."""
    base = os.fspath(base)
    return os.path.abspath(base) if os.path.isdir(base) else canonical_base_id(base)
