"""What the `sft` commands share: error handling, the --base and --json options, output helpers."""

from __future__ import annotations

import json

import click
from rich.console import Console

from sftstore import SftError
from sftstore.settings import base_key, config_path, default_base
from sftstore.store import DeltaStore

console = Console()
JSON_OPTION = click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")


class SftGroup(click.Group):
    """Turns library errors into one clean line on stderr and exit status 1."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except SftError as exc:
            raise click.ClickException(str(exc)) from None


def base_option(required: bool = False):
    help_text = "Base model (Hub id or local directory). Default: $SFTSTORE_BASE or 'base' in the config file."
    return click.option("--base", envvar="SFTSTORE_BASE", default=None, help=help_text, required=False, metavar="BASE",
                        callback=lambda ctx, param, value: _resolve_base(value, required))


def _resolve_base(value: str | None, required: bool) -> str | None:
    value = value or default_base()
    if value is None and required:
        raise click.UsageError(f"no base model: pass --base, set SFTSTORE_BASE, or put base = \"...\" in {config_path()}")
    return base_key(value) if value else None


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
