"""The HTTP API: `POST /v1/predict`, `GET /v1/deltas`, `GET /healthz`, `GET /metrics`.

Errors are JSON `{"detail": "<one line>", ...}`: 404 for a ref that resolves to no delta (with the refs
tried), 409 for a delta made for another base, 413 for too many or too long inputs (with the limits),
422 for malformed JSON or fields, 502 when a pull from the Hub fails, 503 while shutting down or when
too many inputs are already waiting (with `Retry-After`), 500 for anything else (the server carries on).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from dataclasses import asdict, dataclass

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel, ConfigDict, ValidationError

from ..errors import BaseModelMismatchError, DeltaFormatError, SftError, first_line
from ..network import NetworkError
from ..predict import PREDICTABLE_TASK_TYPES
from .engine import ServingEngine
from .metrics import ServeMetrics
from .pairs import PairNotFound, PairResolver, version_key
from .scheduler import QueueFull, Scheduler, ServerStopping

_BYTES_PER_CHAR = 12  # the most one character can take in JSON: a surrogate pair of \uXXXX escapes


@dataclass(frozen=True)
class Limits:
    """What one request may hold."""

    max_inputs: int
    max_input_chars: int

    @property
    def max_body_bytes(self) -> int:
        return self.max_inputs * (self.max_input_chars * _BYTES_PER_CHAR + 8) + 4096


class PredictRequest(BaseModel):
    """`{"task": "ner", "lang": "hau", "inputs": ["...", ...]}`; `lang` may be left out (the task alone)."""

    model_config = ConfigDict(extra="forbid", strict=True)
    task: str
    lang: str | None = None
    inputs: list[str]


class ApiError(Exception):
    def __init__(self, status: int, detail: str, headers: dict[str, str] | None = None, **extra) -> None:
        super().__init__(detail)
        self.status, self.detail, self.headers, self.extra = status, detail, headers, extra

    def response(self) -> JSONResponse:
        return JSONResponse({"detail": self.detail, **self.extra}, status_code=self.status, headers=self.headers)


def api_error(exc: Exception) -> ApiError:
    """The HTTP status and body for a failure while resolving or answering a request."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, PairNotFound):
        return ApiError(404, str(exc), tried=exc.tried)
    if isinstance(exc, BaseModelMismatchError):
        return ApiError(409, str(exc))
    if isinstance(exc, NetworkError):
        return ApiError(502, str(exc))
    if isinstance(exc, ServerStopping):
        return ApiError(503, str(exc))
    if isinstance(exc, QueueFull):
        return ApiError(503, str(exc), headers={"Retry-After": "1"})
    if isinstance(exc, DeltaFormatError):
        return ApiError(500, f"a stored delta is damaged ({exc}); run `sft verify`")
    if isinstance(exc, SftError):
        return ApiError(422, str(exc))
    return ApiError(500, f"internal error: {type(exc).__name__}: {first_line(exc)}")


def _payload(body: bytes, limits: Limits) -> PredictRequest:
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ApiError(422, f"malformed JSON body: {exc}") from None
    try:
        payload = PredictRequest.model_validate(data)
    except ValidationError as exc:
        errors = [{"field": ".".join(map(str, e["loc"])) or "body", "message": e["msg"]} for e in exc.errors()]
        raise ApiError(422, f"field {errors[0]['field']!r}: {errors[0]['message']}", errors=errors) from None
    if not payload.inputs:
        raise ApiError(422, "field 'inputs': expected at least one text")
    if len(payload.inputs) > limits.max_inputs:
        raise ApiError(413, f"{len(payload.inputs)} inputs; at most {limits.max_inputs} per request",
                       limits=asdict(limits))
    longest = max(range(len(payload.inputs)), key=lambda i: len(payload.inputs[i]))
    if len(payload.inputs[longest]) > limits.max_input_chars:
        raise ApiError(413, f"input {longest} has {len(payload.inputs[longest])} characters; at most "
                            f"{limits.max_input_chars}", limits=asdict(limits))
    return payload


async def _body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it is longer than any acceptable request."""
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, f"request body over {limit} bytes, more than the limits allow", limits={})
        chunks.append(chunk)
    return b"".join(chunks)


def create_app(engine: ServingEngine, scheduler: Scheduler, resolver: PairResolver, metrics: ServeMetrics,
               limits: Limits) -> FastAPI:
    """The API over a loaded engine; the scheduler's worker runs from start-up to shutdown."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        scheduler.start()
        yield
        await run_in_threadpool(scheduler.stop)  # uvicorn has let in-flight requests finish

    app = FastAPI(title="sftstore", summary="One resident base model, every (task, language) pair", lifespan=lifespan)
    app.state.engine, app.state.scheduler, app.state.metrics = engine, scheduler, metrics
    metrics.watch(engine.cache, scheduler.queued_inputs)

    @app.post("/v1/predict")
    async def predict(request: Request):
        started, refs, status = time.monotonic(), {"task": None, "lang": None}, 500
        try:
            payload = _payload(await _body(request, limits.max_body_bytes), limits)
            pair = await run_in_threadpool(resolver.resolve, payload.task, payload.lang)
            refs = pair.refs()
            predictions = await asyncio.wrap_future(scheduler.submit(pair, payload.inputs))
            status = 200
            return {**refs, "task_type": pair.task_type, "predictions": [p.to_dict() for p in predictions]}
        except asyncio.CancelledError:  # the client went away
            status = 499
            raise
        except Exception as exc:
            error = api_error(exc)
            status = error.status
            return error.response()
        finally:
            metrics.requests.labels(task=refs["task"] or "", lang=refs["lang"] or "", status=str(status)).inc()
            metrics.request_seconds.observe(time.monotonic() - started)

    @app.get("/v1/deltas")
    async def deltas():
        return await run_in_threadpool(_listing)

    def _listing() -> dict:
        rows = []
        for v in resolver.store.list(base=resolver.base):
            task_type = resolver.task_type(v) if v.kind == "task" else None
            rows.append({"ref": v.ref, "kind": v.kind, "name": v.name, "version": v.version, "aliases": list(v.aliases),
                         "task_type": task_type, "servable": v.kind == "language" or task_type in PREDICTABLE_TASK_TYPES,
                         "nnz": v.nnz, "size": v.size, "cached": version_key(v) in engine.cache})
        listing = {"base": resolver.base, "resident": _resident(), "deltas": rows}
        if resolver.allow_pull:
            listing["pullable"] = [{"kind": e.kind, "name": e.name, "aliases": list(e.aliases), "repo_id": e.repo_id}
                                   for e in resolver.registry.search(base=resolver.base)]
        return listing

    def _resident() -> dict | None:
        resident = engine.resident
        return resident.refs() if resident is not None else None

    @app.get("/healthz")
    async def healthz():
        body = {"status": "ok" if scheduler.alive else "stopping", "base": engine.base_id, "device": str(engine.device),
                "resident": _resident(), "queued_inputs": scheduler.queued_inputs(),
                "cache": {"entries": len(engine.cache), "bytes": engine.cache.bytes, "max_bytes": engine.cache.max_bytes}}
        return JSONResponse(body, status_code=200 if scheduler.alive else 503)

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    return app
