"""The FastAPI application: lifespan, the key check and metrics, errors, and the
small routes (models, health, metrics). The big ones: routes_openai, routes_batch.

Bodies are read and parsed by hand, not by pydantic models: the mapping of a body
is exgen.client.openai_body's (one set of rules for HTTP and batch files), each error names its
field, and an interactive request costs no more than it must.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException
from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from exgen.daemon.gateway import openapi, routes_batch, routes_openai, routes_tokens
from exgen.daemon.gateway.errors import ApiError
from exgen.daemon.gateway.options import GatewayOptions
from exgen.daemon.gateway.state import Gateway

logger = logging.getLogger("exgen.gateway.app")

OPEN_PATHS = frozenset({"/health"})  # answered without a key (load balancers, probes)


class KeysAndMetrics:
    """Pure ASGI middleware: the API key check, then one latency and status sample per
    request (labelled by route template, so ids never become labels)."""

    def __init__(self, app: ASGIApp, gateway: Gateway) -> None:
        self.app = app
        self.gateway = gateway

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def send_noting_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            if scope["path"] not in OPEN_PATHS:
                self.gateway.keys.check(_header(scope, b"authorization"))
            await self.app(scope, receive, send_noting_status)
        except ApiError as exc:
            await error_response(exc)(scope, receive, send_noting_status)
        finally:
            route = scope.get("route")
            name = getattr(route, "path", "unmatched")
            self.gateway.metrics.observe(name, status, time.perf_counter() - started)


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key == name:
            return str(value.decode("latin-1"))
    return None


def error_response(exc: ApiError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers())


async def _api_error(_request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)
    return error_response(exc)


async def _invalid_query(_request: Request, exc: Exception) -> Response:
    """FastAPI's 422 for a bad query parameter, as a 400 naming it."""
    assert isinstance(exc, RequestValidationError)
    first = exc.errors()[0] if exc.errors() else {}
    param = str(first.get("loc", ["", "?"])[-1])
    return error_response(ApiError(400, f"{param}: {first.get('msg', 'invalid')}", param=param))


async def _http_error(request: Request, exc: Exception) -> Response:
    """Starlette's own 404/405 as OpenAI error objects; a 405's Allow header lists every
    method of the path (Starlette's names the first route's only)."""
    assert isinstance(exc, HTTPException)
    response = error_response(ApiError(exc.status_code, str(exc.detail)))
    response.headers.update(exc.headers or {})
    if exc.status_code == 405:
        response.headers["Allow"] = ", ".join(allowed_methods(request))
    return response


def allowed_methods(request: Request) -> list[str]:
    routers = (routes_openai.router, routes_batch.router, routes_tokens.router)
    routes = [route for r in routers for route in r.routes] + list(request.app.routes)
    methods: set[str] = set()
    for route in routes:
        if isinstance(route, BaseRoute) and route.matches(request.scope)[0] != Match.NONE:
            methods |= getattr(route, "methods", None) or set()
    return sorted(methods)


def create_app(options: GatewayOptions) -> FastAPI:
    gateway = Gateway(options)

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        await gateway.start()
        try:
            yield
        finally:
            await gateway.stop()

    app = FastAPI(title="exgen", lifespan=lifespan, docs_url=None, redoc_url=None)
    contract = openapi.document(app.version, guarded=options.api_keys_file is not None)
    app.openapi = lambda: contract  # type: ignore[method-assign]
    app.state.gateway = gateway
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _invalid_query)
    app.add_middleware(KeysAndMetrics, gateway=gateway)
    app.include_router(routes_openai.router)
    app.include_router(routes_batch.router)
    app.include_router(routes_tokens.router)
    _add_small_routes(app, gateway)
    return app


def _add_small_routes(app: FastAPI, gateway: Gateway) -> None:
    @app.get("/health")
    async def health() -> Response:
        if not gateway.upstream.ready:
            return error_response(ApiError(503, gateway.upstream.why_not_ready(), retry_after_s=1))
        return JSONResponse({"status": "ok", "model": gateway.upstream.model})

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(gateway.metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [_model_object(gateway)]}

    @app.get("/v1/models/{model:path}")
    async def model(model: str) -> dict[str, Any]:
        if model != gateway.upstream.model:
            raise ApiError(404, f"The model {model!r} does not exist", code="model_not_found")
        return _model_object(gateway)


def _model_object(gateway: Gateway) -> dict[str, Any]:
    uptime = float(gateway.upstream.status.get("uptime_s") or 0.0)
    return {
        "id": gateway.upstream.model,
        "object": "model",
        "created": int(time.time() - uptime),
        "owned_by": "exgen",
    }
