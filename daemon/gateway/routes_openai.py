"""``POST /v1/completions`` and ``POST /v1/chat/completions``.

A caller that goes away stops its request where it runs: a whole response waits
for the result and for the connection's end together; a stream is one task that a
watcher cancels when the connection ends. Either way the client's call is abandoned,
and an abandoned call cancels its item at the router.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncGenerator, Coroutine
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from starlette.types import Receive, Scope, Send

from exgen.client import errors
from exgen.client import openai_body as O
from exgen.client.client import Result
from exgen.daemon.gateway.completions import ChunkWriter, Parsed, parse_body
from exgen.daemon.gateway.errors import ApiError, from_exgen_error

if TYPE_CHECKING:
    from exgen.daemon.gateway.state import Gateway

logger = logging.getLogger("exgen.gateway.routes")

router = APIRouter()
CLIENT_GONE = 499  # nginx's "client closed request": only ever seen in our metrics


@router.post("/v1/completions")
async def completions(request: Request) -> Response:
    return await _complete(request, O.COMPLETIONS_URL)


@router.post("/v1/chat/completions")
async def chat_completions(request: Request) -> Response:
    return await _complete(request, O.CHAT_URL)


async def _complete(request: Request, url: str) -> Response:
    gateway: Gateway = request.app.state.gateway
    raw = await read_body(request, gateway.options.max_body_bytes)
    parsed = parse_body(raw, url)
    if not gateway.upstream.ready:
        raise ApiError(503, gateway.upstream.why_not_ready(), retry_after_s=1)
    gateway.admit()
    if parsed.stream:
        return EventStream(gateway, parsed)  # discharged when it ends
    try:
        gone, body = await unless_disconnected(
            request.receive, gateway.completions.complete(parsed)
        )
    finally:
        gateway.discharge()
    if gone:
        return Response(status_code=CLIENT_GONE)
    return JSONResponse(body)


async def read_body(request: Request, limit: int) -> bytes:
    """The body, or a 413 as soon as it is known to pass ``limit`` bytes."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise _too_large(limit)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _too_large(limit)
        chunks.append(chunk)
    return b"".join(chunks)


def _too_large(limit: int) -> ApiError:
    return ApiError(413, f"The body is larger than {limit} bytes (http_max_body_bytes)")


async def unless_disconnected(receive: Receive, work: Coroutine[Any, Any, Any]) -> tuple[bool, Any]:
    """(False, ``work``'s result), or (True, None) with ``work`` cancelled if the caller
    disconnected first."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(wait_disconnect(receive))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        gone = not task.done()
        if gone:  # the caller left, or this handler itself is being cancelled
            task.cancel()
    if not gone:
        return False, task.result()
    with contextlib.suppress(asyncio.CancelledError, Exception):  # nobody to tell
        await task
    return True, None


async def wait_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


class EventStream(Response):
    """Server-sent events for one streamed request, produced inside this response's
    own task (so the disconnect watcher can cancel it; the deadline is the router's).

    The first event is awaited before any byte goes out, so an error the daemon
    answers at once (a prompt too long, say) still gets its HTTP status.
    """

    def __init__(self, gateway: Gateway, parsed: Parsed) -> None:
        super().__init__()
        self.gateway = gateway
        self.parsed = parsed

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            gone, _ = await unless_disconnected(receive, self._send_events(scope, receive, send))
            if gone:
                logger.debug("stream %s: the caller went away", self.parsed.id)
        finally:
            self.gateway.discharge()

    async def _send_events(self, scope: Scope, receive: Receive, send: Send) -> None:
        events = self.gateway.completions.stream(self.parsed)
        url = self.parsed.url
        async with contextlib.aclosing(events):
            try:
                first = await anext(events)
            except errors.ExgenError as exc:  # a bad prompt, another model, no daemon
                await _json_error(from_exgen_error(exc, url), scope, receive, send)
                return
            writer = ChunkWriter(self.parsed, self.gateway.upstream.model)
            headers = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            await self._body(send, writer, first, events)

    async def _body(
        self,
        send: Send,
        writer: ChunkWriter,
        first: str | Result,
        events: AsyncGenerator[str | Result, None],
    ) -> None:
        out = writer.first(first)
        event = first
        try:
            while not isinstance(event, Result):
                await _chunk(send, out + writer.text(event))
                out = b""
                event = await anext(events)
            out += writer.last(event)
        except errors.ExgenError as exc:  # the deadline passed mid-stream, the engine failed
            out += writer.error(from_exgen_error(exc, self.parsed.url))
        await _chunk(send, out)
        await send({"type": "http.response.body", "body": b"", "more_body": False})


async def _chunk(send: Send, data: bytes) -> None:
    if data:
        await send({"type": "http.response.body", "body": data, "more_body": True})


async def _json_error(exc: ApiError, scope: Scope, receive: Receive, send: Send) -> None:
    response = JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers())
    await response(scope, receive, send)
