"""The FastAPI application: routes, authentication, body limits and OpenAI-shaped errors.

Routes: ``POST /v1/completions``, ``POST /v1/chat/completions``, ``GET /v1/models``,
``GET /metrics`` (all behind ``Authorization: Bearer`` when an API key is set) and ``GET /health``
(never). Request bodies are read up to ``max_body_bytes`` and validated by the pydantic models
of `ollm.serve.protocol`; every refusal is a 4xx JSON error in OpenAI's shape, never a 500. No
request field names a file: the model name is compared with the one loaded.
"""

from __future__ import annotations

import hmac
import time
from dataclasses import dataclass

from fastapi import Depends, FastAPI
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from ollm.api import LLM
from ollm.serve import protocol as P
from ollm.serve.completions import make_job, respond
from ollm.serve.generation import BadRequest, Overloaded, ServeEngine


@dataclass(frozen=True)
class ServeConfig:
    """Limits and options of one server."""

    model_name: str
    """The name clients pass as ``model`` (and /v1/models lists)."""
    api_key: str | None = None
    """When set, every route but /health needs ``Authorization: Bearer <key>``."""
    max_pending: int = 256
    """Sequences held at once (running + waiting); beyond it requests get 429."""
    max_body_bytes: int = 4 << 20
    """Largest request body (413 beyond)."""
    chunking: str = "token"
    """Default streaming boundaries: token, sentence or paragraph."""

    def __post_init__(self) -> None:
        if self.max_pending < 1 or self.max_body_bytes < 1:
            raise ValueError("max_pending and max_body_bytes must be >= 1")
        if self.chunking not in ("token", "sentence", "paragraph"):
            raise ValueError(f"chunking must be token, sentence or paragraph: {self.chunking!r}")


def _error(status: int, message: str, kind: str = "invalid_request_error", **kw) -> JSONResponse:
    return JSONResponse(P.error_body(message, kind, **kw), status_code=status, headers=None)


def _validation_message(exc: ValidationError | RequestValidationError) -> tuple[str, str | None]:
    errs = exc.errors()
    if not errs:
        return "invalid request", None
    first = errs[0]
    loc = ".".join(str(x) for x in first.get("loc", ()) if x != "body")
    if first.get("type") == "json_invalid":
        return f"the body is not valid JSON: {first.get('msg')}", None
    return (f"{loc}: {first.get('msg')}" if loc else str(first.get("msg"))), loc or None


async def _read_body(request: Request, limit: int) -> bytes:
    """The body, refused (413) past ``limit`` bytes whether or not Content-Length says so."""
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > limit:
        raise BadRequest(f"the request body exceeds {limit} bytes", status=413)
    data = bytearray()
    async for part in request.stream():
        data += part
        if len(data) > limit:
            raise BadRequest(f"the request body exceeds {limit} bytes", status=413)
    return bytes(data)


def _parse(model: type[BaseModel], raw: bytes):
    try:
        return model.model_validate_json(raw)
    except ValidationError as exc:
        message, param = _validation_message(exc)
        raise BadRequest(message, param=param) from None


def create_app(llm: LLM, config: ServeConfig) -> FastAPI:
    """An OpenAI-compatible app over ``llm`` (which must keep every layer's KV on the device)."""
    engine = ServeEngine(llm, config.model_name, config.max_pending)
    app = FastAPI(title="ollm", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine = engine
    started = int(time.time())
    key = config.api_key.encode() if config.api_key else None

    async def authorize(request: Request) -> None:
        if key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key):
            raise BadRequest("invalid or missing API key (Authorization: Bearer ...)", status=401)

    auth = [Depends(authorize)]
    _install_errors(app, engine)

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    @app.get("/v1/models", dependencies=auth)
    async def models() -> dict:
        entry = {"id": config.model_name, "object": "model", "created": started,
                 "owned_by": "ollm", "max_model_len": engine.max_model_len}  # fmt: skip
        return {"object": "list", "data": [entry]}

    @app.get("/metrics", dependencies=auth)
    async def metrics() -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST

        return Response(engine.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.post("/v1/completions", dependencies=auth)
    async def completions(request: Request) -> Response:
        req = _parse(P.CompletionRequest, await _read_body(request, config.max_body_bytes))
        job = await make_job(engine, req, config.model_name, config.chunking)
        return await respond(engine, request, job)

    @app.post("/v1/chat/completions", dependencies=auth)
    async def chat_completions(request: Request) -> Response:
        req = _parse(P.ChatRequest, await _read_body(request, config.max_body_bytes))
        job = await make_job(engine, req, config.model_name, config.chunking)
        return await respond(engine, request, job)

    return app


def _install_errors(app: FastAPI, engine: ServeEngine) -> None:
    """Every error as OpenAI's JSON shape."""
    model = engine.metrics.model

    @app.exception_handler(BadRequest)
    async def bad_request(_: Request, exc: BadRequest) -> JSONResponse:
        engine.metrics.rejected.labels(model, str(exc.status)).inc()
        code = {401: "invalid_api_key", 404: "model_not_found", 413: "body_too_large"}
        kind = "authentication_error" if exc.status == 401 else "invalid_request_error"
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
        body = P.error_body(exc.message, kind, param=exc.param, code=code.get(exc.status))
        return JSONResponse(body, status_code=exc.status, headers=headers)

    @app.exception_handler(Overloaded)
    async def overloaded(_: Request, exc: Overloaded) -> JSONResponse:
        body = P.error_body(exc.message, "rate_limit_error", code="queue_full")
        return JSONResponse(body, 429, headers={"Retry-After": str(exc.retry_after)})

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, exc: HTTPException) -> JSONResponse:
        return _error(exc.status_code, str(exc.detail))

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc)
        return _error(400, message, param=param)
