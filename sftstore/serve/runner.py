"""Start the server: load the base, preload deltas, listen, and stop gracefully on SIGTERM or Ctrl-C.

uvicorn stops accepting connections on SIGTERM and lets the requests in flight finish; then the model
worker answers whatever is still queued and ends.
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from fastapi import FastAPI

from ..hub import resolve_or_pull
from ..naming import DeltaRef
from ..store import DeltaStore
from .app import Limits, create_app
from .engine import ServingEngine
from .metrics import ServeMetrics
from .pairs import PairResolver
from .scheduler import Scheduler


@dataclass(frozen=True)
class ServeOptions:
    """Everything `sft serve` takes."""

    base: str
    device: str | None = None
    dtype: str | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    preload: Sequence[str] = ()
    max_cached_bytes: int = 1 << 30
    allow_pull: bool = False
    max_batch: int = 32
    max_inputs: int = 64
    max_input_chars: int = 2000
    max_wait_ms: int = 500
    max_queued_inputs: int = 1024
    merge_requests: bool = False


def build_app(options: ServeOptions, store: DeltaStore | None = None) -> FastAPI:
    """Load the base and the preloaded deltas (refusing any that does not fit) and return the API."""
    store = store or DeltaStore()
    metrics = ServeMetrics()
    engine = ServingEngine(options.base, store, device=options.device, dtype=options.dtype,
                           max_cached_bytes=options.max_cached_bytes, on_cache_event=metrics.cache_event)
    resolver = PairResolver(store, engine.base_id, options.allow_pull)
    for ref in options.preload:
        engine.delta(resolve_or_pull(store, DeltaRef.parse(ref), engine.base_id, pull=options.allow_pull,
                                     registry=resolver.registry))
    scheduler = Scheduler(engine, metrics, options.max_batch, options.max_wait_ms / 1000, options.merge_requests,
                          options.max_queued_inputs)
    return create_app(engine, scheduler, resolver, metrics, Limits(options.max_inputs, options.max_input_chars))


def listen(host: str, port: int) -> socket.socket:
    """A listening TCP socket (port 0: any free port; `getsockname()` says which)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)
    return sock


def serve(options: ServeOptions, echo: Callable[[str], None] = print) -> None:
    """Serve until SIGTERM or Ctrl-C."""
    import uvicorn

    app = build_app(options)
    sock = listen(options.host, options.port)
    host, port = sock.getsockname()[:2]
    echo(f"serving {options.base} at http://{host}:{port} (POST /v1/predict, GET /v1/deltas, /healthz, /metrics)")
    uvicorn.Server(uvicorn.Config(app, log_level="info", timeout_graceful_shutdown=60)).run(sockets=[sock])
