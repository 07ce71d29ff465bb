"""`sft serve`: one resident base model answers every (task, language) pair over HTTP."""

from __future__ import annotations

import re

import click

from .common import base_option

_SIZE = re.compile(r"(\d+)\s*([KMG]?)i?B?", re.IGNORECASE)
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}


def _parse_size(ctx, param, value: str) -> int:
    match = _SIZE.fullmatch(value.strip())
    if match is None:
        raise click.BadParameter(f"expected a size such as 512M, 2G or 1000000 (bytes), got {value!r}")
    return int(match.group(1)) * _UNITS[match.group(2).upper()]


def _parse_refs(ctx, param, value: str) -> tuple[str, ...]:
    return tuple(ref.strip() for ref in value.split(",") if ref.strip())


@click.command("serve")
@base_option(required=True)
@click.option("--device", default=None, show_default="cuda when available, else cpu", help="Device of the base model.")
@click.option("--dtype", type=click.Choice(["fp32", "bf16", "fp16"]), default=None, show_default="as stored",
              help="Weights dtype.")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True,
              help="Port to listen on (0: any free port, printed at start).")
@click.option("--preload", default="", callback=_parse_refs, metavar="REF,REF,...", show_default="none",
              help="Deltas to load into the cache at start, e.g. task/ner,lang/hau,lang/swa@best.")
@click.option("--max-cached-bytes", default="1G", callback=_parse_size, show_default=True,
              help="Bytes of deltas kept on the device (least recently used out; the resident pair's always stay).")
@click.option("--allow-pull", is_flag=True, help="Pull deltas missing from the store through the registry.")
@click.option("--max-batch", type=click.IntRange(1), default=32, show_default=True,
              help="Most inputs of one pair served in one turn of the model worker (one forward pass with "
                   "--merge-requests).")
@click.option("--merge-requests", is_flag=True,
              help="Run a turn's requests as one forward pass: more throughput (mostly on GPUs), but scores may "
                   "differ from a one-shot compose in their last bits. Default: one pass per request, bit-identical.")
@click.option("--max-inputs", type=click.IntRange(1), default=64, show_default=True,
              help="Most inputs in one request (more: 413).")
@click.option("--max-input-chars", type=click.IntRange(1), default=2000, show_default=True,
              help="Most characters in one input (more: 413).")
@click.option("--max-wait-ms", type=click.IntRange(0), default=500, show_default=True,
              help="How long another pair's request may wait while the resident pair's queue is served.")
@click.option("--max-queued-inputs", type=click.IntRange(1), default=1024, show_default=True,
              help="Most inputs waiting for the model; a request that would go over gets 503 with Retry-After.")
def serve_command(**options) -> None:
    """Serve predictions over HTTP: one base model in memory, deltas hot-swapped per (task, language) pair.

    POST /v1/predict {"task": "ner", "lang": "hau", "inputs": ["..."]}; GET /v1/deltas, /healthz,
    /metrics (Prometheus). Needs the serve extra: pip install "sftstore[serve]". Stops on SIGTERM or
    Ctrl-C after the requests in flight are answered.
    """
    try:
        from sftstore.serve.runner import ServeOptions, serve
    except ModuleNotFoundError as exc:
        raise click.UsageError(f"sft serve needs {exc.name}: pip install \"sftstore[serve]\"") from None
    serve(ServeOptions(**options), echo=click.echo)  # the options are named as ServeOptions' fields
