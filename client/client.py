"""The client library: :class:`Client` (blocking) and :class:`AsyncClient` (asyncio).

Both are thin I/O shells over one sans-IO core (:mod:`exgen.client.core`; one call is
a ``Call`` of :mod:`exgen.client.calls`) that owns the connection: any number of
concurrent calls share one DEALER socket, results find their call by id, and
``status``/``ping``/``cancel`` never wait behind a stream. The core also holds the
send window, busy back-off, resending after a daemon restart, duplicate suppression
and the acknowledgement of results; see its docstring.

A call's iterator that is abandoned (``break``, an exception, ``close()``, Ctrl-C;
``aclose()`` for the async ones) cancels the work it still has at the daemon, and
waits up to ``CANCEL_CONFIRM_S`` for the daemon to have it, so that a program that
exits next leaves nothing running for nobody.

Connecting: an ipc socket is checked before it is used (its directory must be this
user's or root's, see :mod:`exgen.client.transport`); a missing socket, or nothing
listening, is a :class:`errors.ConnectionFailed` at once; an address where no
connection completes (a TCP host that never answers) is a
:class:`errors.ConnectTimeout` after ``connect_timeout`` seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import sys
import time
import uuid
from collections.abc import (
    AsyncGenerator,
    Awaitable,
    Callable,
    Generator,
    Iterable,
    Mapping,
    Sequence,
)
from pathlib import Path
from typing import Any, TypeVar, cast

import zmq
import zmq.asyncio

from exgen.client import errors, transport
from exgen.client import protocol as P
from exgen.client.calls import Outgoing, Priority
from exgen.client.core import Call, Core, Request, Result
from exgen.client.keys import CurveKeys

__all__ = ["AsyncClient", "Client", "Priority", "Result", "default_address", "user_address"]

SYSTEMD_SOCKET = Path("/run/exgen/exgen.sock")
# What was queued last (an ACK, a cancel) may still leave after close, for this long.
CLOSE_LINGER_MS = 200
CANCEL_CONFIRM_S = 1.0  # the longest an abandoned call waits for the daemon to have its cancel
WAIT_READY_POLL_S = 0.2
DEFAULT_CONNECT_TIMEOUT_S = 10.0

T = TypeVar("T")
Items = Iterable[Mapping[str, Any] | Result]
Prompt = str | list[dict[str, str]]


def default_address() -> str:
    """$EXGEN_ADDRESS; else the systemd service's socket if present; else a per-user one."""
    env = os.environ.get("EXGEN_ADDRESS")
    if env:
        return env
    if SYSTEMD_SOCKET.exists():
        return f"ipc://{SYSTEMD_SOCKET}"
    return user_address()


def user_address() -> str:
    """The per-user ipc socket: ``$XDG_RUNTIME_DIR/exgen/exgen.sock`` or under /tmp."""
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    base = Path(runtime) / "exgen" if runtime else Path(f"/tmp/exgen-{os.getuid()}")
    return f"ipc://{base / 'exgen.sock'}"


def command_line() -> str:
    """This process's command line, as a client name in the daemon's status."""
    argv = [Path(sys.argv[0]).name if sys.argv and sys.argv[0] else "python", *sys.argv[1:]]
    name = " ".join(argv)
    limit = P.MAX_CLIENT_NAME_CHARS
    return name if len(name) <= limit else name[: limit - 1] + "…"


def workers_ready(status: Mapping[str, Any], count: int | None = None) -> bool:
    """Whether a status document shows ``count`` ready workers (default: all slots)."""
    workers = status.get("workers") or []
    ready = sum(1 for w in workers if w.get("state") == "ready")
    return bool(workers) and ready >= (count or len(workers))


def _as_item(prompt: str | Mapping[str, Any], item_id: str) -> dict[str, Any]:
    """A str prompt, or a mapping with prompt/messages (and maybe id, params)."""
    if isinstance(prompt, str):
        return {"id": item_id, "prompt": prompt}
    if not isinstance(prompt, Mapping):
        raise errors.BadRequest(
            f"a prompt must be a string or a map, not {type(prompt).__name__}", field="prompts"
        )
    item = dict(prompt)
    item.setdefault("id", item_id)
    return item


def _generate_items(prompts: Sequence[str | Mapping[str, Any]]) -> list[dict[str, Any]]:
    if isinstance(prompts, str | bytes):
        raise errors.BadRequest(
            "prompts must be a list of prompts, not one string", field="prompts"
        )
    return [_as_item(p, str(i)) for i, p in enumerate(prompts)]


def _stream_item(prompt: Prompt | Mapping[str, Any]) -> dict[str, Any]:
    """The one item of a stream() call: chat messages, a plain prompt, or an item
    (a map with prompt or messages, and maybe params, model, timeout_s)."""
    if isinstance(prompt, Mapping):
        return _as_item(prompt, "0")
    if isinstance(prompt, list):
        return {"id": "0", "messages": prompt}
    return {"id": "0", "prompt": prompt}


def _cancel_body(client: str | None) -> dict[str, Any]:
    if client is None:
        return {"clients": "all"}
    if not isinstance(client, str) or not client:
        raise errors.BadRequest("a client to cancel is named by a non-empty string", field="client")
    return {"client": client}


def _future(awaitable: Awaitable[T]) -> asyncio.Future[T]:
    """What zmq.asyncio's socket calls return: a Future (typed as an Awaitable)."""
    return cast("asyncio.Future[T]", awaitable)


class _Shell:
    """What both clients share: options, identity, the core, the socket's checks."""

    def __init__(
        self,
        address: str | None,
        timeout: float | None,
        window: int,
        curve: CurveKeys | None,
        connect_timeout: float | None,
        name: str | None,
    ) -> None:
        self.address = address or default_address()
        transport.check_address(self.address)
        if not isinstance(window, int) or window < 1:
            raise errors.BadRequest(f"window must be a whole number >= 1, got {window!r}")
        for option, value in (("timeout", timeout), ("connect_timeout", connect_timeout)):
            if value is not None and not value > 0:
                raise errors.BadRequest(f"{option} must be more than 0 (or None)", field=option)
        self.window = window
        # CURVE (a daemon listening beyond this machine): given, else from the environment.
        self.curve = curve if curve is not None else CurveKeys.from_env()
        # Random bytes (a ZMQ identity may not start with a zero byte: hence the "c"), so
        # the id the daemon's status shows, its hex, is random from its first digits.
        self.identity = b"c" + uuid.uuid4().bytes
        hello = {"name": name or command_line(), "host": socket.gethostname(), "pid": os.getpid()}
        self._core = Core(
            self.address, timeout=timeout, connect_timeout=connect_timeout, hello=hello
        )
        self._connected = False
        self._closed = False

    @property
    def timeout(self) -> float | None:
        """How long the daemon may stay silent while a call waits on it."""
        return self._core.timeout

    @timeout.setter
    def timeout(self, value: float | None) -> None:
        self._core.timeout = value

    @property
    def connect_timeout(self) -> float | None:
        return self._core.connect_timeout

    @property
    def model(self) -> str | None:
        """The served model's name, once the daemon has said it."""
        return self._core.model

    def _socket(self) -> zmq.Socket[Any]:
        raise NotImplementedError

    def _send(self, out: Outgoing) -> bool:
        """Hand one frame to the socket; False when it could not leave (the core has
        been told: ``Core.not_sent``)."""
        raise NotImplementedError

    def _flush(self) -> None:
        """Send what the core has, one submit frame at a time, each before the next is
        built; stop at a frame that could not leave."""
        while True:
            outgoing = self._core.poll_out(time.monotonic(), submits=1)
            sent = all([self._send(out) for out in outgoing])  # every frame tried
            if not sent or not any(out.submit is not None for out in outgoing):
                return

    def _ready(
        self, status: Mapping[str, Any], count: int | None, deadline: float, timeout: float
    ) -> bool:
        """wait_ready's verdict on one status: ready, not yet, or Timeout past the deadline."""
        if workers_ready(status, count):
            return True
        if time.monotonic() >= deadline:
            raise errors.Timeout(f"exgen workers at {self.address} not ready in {timeout:g}s")
        return False

    def _connect_once(self, sock: zmq.Socket[Any]) -> None:
        if self._closed:
            raise errors.ConnectionFailed("this client is closed")
        if self._connected:
            return
        transport.check_ipc(self.address)
        transport.connect(sock, self.address)
        self._connected = True
        self._core.say_hello()

    def _start_call(self, items: Items, params: Mapping[str, Any], **options: Any) -> Call:
        """A new call, its arguments checked before anything is connected or sent."""
        call = self._core.open_call(items, params, window=self.window, **options)
        try:
            self._connect_once(self._socket())
        except BaseException:
            self._core.end_call(call)
            raise
        return call


class Client(_Shell):
    """Blocking client. Not thread-safe: one thread per Client; calls may interleave.

    ``timeout``: how long the daemon may stay silent (it answers pings every second)
    before a call fails with :class:`errors.Timeout`; None waits forever.
    ``connect_timeout``: how long a connection may take to complete before
    :class:`errors.ConnectTimeout` (a TCP address that never answers).
    ``window``: items outstanding at once, per call. ``curve``: keys for a daemon
    that requires CURVE (:class:`exgen.client.keys.CurveKeys`; default: from
    $EXGEN_SERVER_KEY and $EXGEN_CLIENT_KEY when set). ``name``: this client in the
    daemon's status (default: the command line).
    """

    def __init__(
        self,
        address: str | None = None,
        *,
        timeout: float | None = 30.0,
        window: int = 4096,
        curve: CurveKeys | None = None,
        connect_timeout: float | None = DEFAULT_CONNECT_TIMEOUT_S,
        name: str | None = None,
    ) -> None:
        super().__init__(address, timeout, window, curve, connect_timeout, name)
        self._ctx: zmq.Context[Any] = zmq.Context.instance()
        self._sock = self._ctx.socket(zmq.DEALER)
        transport.configure(self._sock, self.identity, self.curve)
        self._monitor = self._sock.get_monitor_socket(transport.MONITORED)
        self._poller = zmq.Poller()
        self._poller.register(self._sock, zmq.POLLIN)
        self._poller.register(self._monitor, zmq.POLLIN)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._sock.disable_monitor()
        self._monitor.close(linger=0)
        self._sock.close(linger=CLOSE_LINGER_MS)

    def _socket(self) -> zmq.Socket[Any]:
        return self._sock

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- public API ---------------------------------------------------------------

    def generate(
        self,
        prompts: Sequence[str | Mapping[str, Any]],
        *,
        timeout_s: float | None = None,
        priority: Priority = "interactive",
        **params: Any,
    ) -> list[Result]:
        """Results in input order. ``prompts``: strings, or maps with prompt/messages."""
        items = _generate_items(prompts)
        return list(
            self.iter_results(items, ordered=True, timeout_s=timeout_s, priority=priority, **params)
        )

    def iter_results(
        self,
        items: Items,
        *,
        ordered: bool = False,
        timeout_s: float | None = None,
        priority: Priority = "interactive",
        **params: Any,
    ) -> Generator[Result, None, None]:
        """Each Result as it completes (``ordered``: in input order); items sent lazily.

        ``params``: sampling defaults for items without their own. ``timeout_s``: a
        deadline per item (its own ``timeout_s`` wins); past it the item fails with
        :class:`errors.DeadlineExceeded`. ``priority``: ``"batch"`` items are
        dispatched only when no ``"interactive"`` item (the default) waits, whichever
        client sent it. An item that is a :class:`Result` is not sent: it is yielded
        in its place. Closing the iterator cancels what is out.
        """
        call = self._start_call(
            items, params, ordered=ordered, timeout_s=timeout_s, priority=priority
        )
        with self._call_scope(call):
            while True:
                self._pump(call)
                while call.ready:
                    yield call.ready.popleft()
                call.raise_error()
                if call.finished:
                    return

    def stream(
        self,
        prompt: Prompt | Mapping[str, Any],
        *,
        timeout_s: float | None = None,
        priority: Priority = "interactive",
        **params: Any,
    ) -> Generator[str, None, None]:
        """Text chunks of one generation as they are produced. ``prompt``: a string,
        chat messages, or an item (a map with prompt or messages, as generate takes)."""
        events = self.stream_with_result(prompt, timeout_s=timeout_s, priority=priority, **params)
        with contextlib.closing(events):
            for event in events:
                if isinstance(event, str):
                    yield event

    def stream_with_result(
        self,
        prompt: Prompt | Mapping[str, Any],
        *,
        timeout_s: float | None = None,
        priority: Priority = "interactive",
        **params: Any,
    ) -> Generator[str | Result, None, None]:
        """Text chunks as :meth:`stream` yields them, then one :class:`Result`: the
        whole text, its finish reason and token counts. A failure raises, as in
        :meth:`stream` (after the chunks that came before it)."""
        call = self._start_call(
            [_stream_item(prompt)], params, stream=True, timeout_s=timeout_s, priority=priority
        )
        with self._call_scope(call):
            while True:
                self._pump(call)
                yield from call.take_text()
                call.raise_error()
                if call.finished:
                    if call.final is not None:
                        yield call.final
                    return

    def status(self) -> dict[str, Any]:
        """The daemon's status document (workers, queue, connected clients)."""
        return self._request(P.STATUS, {}, P.STATUS_REPLY)

    def ping(self) -> dict[str, Any]:
        return self._request(P.PING, {}, P.PONG)

    def wait_ready(self, timeout: float = 300.0, count: int | None = None) -> dict[str, Any]:
        """Block until ``count`` workers (default: every slot) are ready; the status then.

        For scripts that start ``exgen serve`` and then submit: the daemon may not be
        listening yet, and models take a while to load. Raises :class:`errors.Timeout`.
        """
        deadline = time.monotonic() + timeout
        while True:
            try:  # one-second fuses, retried: the daemon may not be listening yet
                status = self._request(P.STATUS, {}, P.STATUS_REPLY, timeout=1.0)
            except errors.ConnectionFailed:
                status = {}
            if self._ready(status, count, deadline, timeout):
                return status
            time.sleep(WAIT_READY_POLL_S)

    def cancel(self, ids: Iterable[str]) -> int:
        """Cancel these items of this client's calls; they end as Cancelled. How many."""
        n = self._core.cancel_ids(ids)
        self._flush()
        return n

    def cancel_client(self, client: str | None = None) -> dict[str, Any]:
        """Cancel another client's work (by name or id; None: every client's).

        The daemon's CANCELLED reply: ``cancelled`` (items) and ``clients`` (names).
        Raises :class:`errors.Forbidden` where that is not this client's to cancel.
        """
        return self._request(P.CANCEL, _cancel_body(client), P.CANCELLED)

    # --- the pump -----------------------------------------------------------------

    def _call_scope(self, call: Call) -> _CallScope:
        return _CallScope(call, self._end_call)

    def _end_call(self, call: Call, confirm: bool) -> None:
        if self._closed:
            return
        if self._core.end_call(call) and confirm:
            request = self._core.open_request(P.PING, {}, P.PONG, time.monotonic())
            try:
                self._pump(request, time.monotonic() + CANCEL_CONFIRM_S)
            except errors.ExgenError:
                pass  # the daemon is gone: nothing runs there for us
            finally:
                self._core.end_request(request)
        self._flush()

    def _request(
        self, command: bytes, body: dict[str, Any], expect: bytes, timeout: float | None = None
    ) -> dict[str, Any]:
        self._connect_once(self._sock)
        request = self._core.open_request(command, body, expect, time.monotonic(), timeout)
        try:
            self._pump(request)
            return request.result()
        finally:
            self._core.end_request(request)

    def _send(self, out: Outgoing) -> bool:
        try:
            self._sock.send_multipart(out.frames, flags=zmq.NOBLOCK)
        except zmq.Again:
            # Sends never block: a DEALER with no daemon connected must not wait
            # forever, past any timeout.
            self._core.not_sent(out)
            return False
        return True

    def _pump(self, waiter: Call | Request, deadline: float | None = None) -> None:
        """Send, receive and run the timers until ``waiter`` has news (or the deadline)."""
        core, sock, monitor = self._core, self._sock, self._monitor
        while True:
            self._flush()
            core.touched.clear()
            if waiter.has_news:
                return
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                return
            wake = core.next_wakeup(now)
            if deadline is not None:
                wake = min(wake, deadline - now)
            ready = dict(self._poller.poll(int(wake * 1000)))
            now = time.monotonic()
            if monitor in ready:
                while monitor.poll(0):
                    core.on_event(transport.parse_event(monitor.recv_multipart())[0], now)
            if sock in ready:
                while sock.poll(0):
                    core.on_frames(sock.recv_multipart(), now)
            core.tick(now)


class _CallScope:
    """Ends a call when its iterator ends: done, broken out of, failed or interrupted.

    A call abandoned with work still out cancels it and waits briefly for the daemon
    to have the cancel; one that failed because the daemon is unreachable does not.
    """

    def __init__(self, call: Call, end: Callable[[Call, bool], Any]) -> None:
        self.call = call
        self.end = end

    def __enter__(self) -> Call:
        return self.call

    def __exit__(self, kind: type[BaseException] | None, *rest: object) -> None:
        confirm = kind is None or not issubclass(kind, errors.ConnectionFailed)
        try:
            self.end(self.call, confirm)
        except zmq.ZMQError:
            pass  # the socket is already closed (interpreter shutdown)


class _AsyncCallScope:
    def __init__(self, call: Call, end: Callable[[Call, bool], Any]) -> None:
        self.call = call
        self.end = end

    async def __aenter__(self) -> Call:
        return self.call

    async def __aexit__(self, kind: type[BaseException] | None, *rest: object) -> None:
        confirm = kind is None or not issubclass(kind, errors.ConnectionFailed)
        try:
            await self.end(self.call, confirm)
        except zmq.ZMQError:
            pass


class AsyncClient(_Shell):
    """The asyncio twin of :class:`Client`: the same methods, awaited; any number of
    calls at once on one client (``asyncio.gather`` of generate calls runs them
    concurrently). One reader task per client does the socket's I/O."""

    def __init__(
        self,
        address: str | None = None,
        *,
        timeout: float | None = 30.0,
        window: int = 4096,
        curve: CurveKeys | None = None,
        connect_timeout: float | None = DEFAULT_CONNECT_TIMEOUT_S,
        name: str | None = None,
    ) -> None:
        super().__init__(address, timeout, window, curve, connect_timeout, name)
        self._ctx: zmq.asyncio.Context = zmq.asyncio.Context.instance()
        self._sock = self._ctx.socket(zmq.DEALER)
        transport.configure(self._sock, self.identity, self.curve)
        self._monitor = self._sock.get_monitor_socket(transport.MONITORED)
        self._reader: asyncio.Task[None] | None = None
        self._kick_future: asyncio.Future[None] | None = None
        self._events: dict[Call | Request, asyncio.Event] = {}

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._reader is not None and not self._reader.done():
            self._reader.cancel()
        self._sock.disable_monitor()
        self._monitor.close(linger=0)
        self._sock.close(linger=CLOSE_LINGER_MS)

    def _socket(self) -> zmq.Socket[Any]:
        return self._sock

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()

    # --- public API ---------------------------------------------------------------

    async def generate(
        self,
        prompts: Sequence[str | Mapping[str, Any]],
        *,
        timeout_s: float | None = None,
        priority: Priority = "interactive",
        **params: Any,
    ) -> list[Result]:
        items = _generate_items(prompts)
        results = self.iter_results(
            items, ordered=True, timeout_s=timeout_s, priority=priority, **params
        )
        return [r async for r in results]

    async def iter_results(
        self,
        items: Items,
        *,
        ordered: bool = False,
        timeout_s: float | None = None,
        priority: Priority = "interactive",
        **params: Any,
    ) -> AsyncGenerator[Result, None]:
        call = self._start_call(
            items, params, ordered=ordered, timeout_s=timeout_s, priority=priority
        )
        async with _AsyncCallScope(call, self._end_call):
            while True:
                await self._wait(call)
                while call.ready:
                    yield call.ready.popleft()
                call.raise_error()
                if call.finished:
                    return

    async def stream(
        self,
        prompt: Prompt | Mapping[str, Any],
        *,
        timeout_s: float | None = None,
        priority: Priority = "interactive",
        **params: Any,
    ) -> AsyncGenerator[str, None]:
        events = self.stream_with_result(prompt, timeout_s=timeout_s, priority=priority, **params)
        async with contextlib.aclosing(events):
            async for event in events:
                if isinstance(event, str):
                    yield event

    async def stream_with_result(
        self,
        prompt: Prompt | Mapping[str, Any],
        *,
        timeout_s: float | None = None,
        priority: Priority = "interactive",
        **params: Any,
    ) -> AsyncGenerator[str | Result, None]:
        call = self._start_call(
            [_stream_item(prompt)], params, stream=True, timeout_s=timeout_s, priority=priority
        )
        async with _AsyncCallScope(call, self._end_call):
            while True:
                await self._wait(call)
                for text in call.take_text():
                    yield text
                call.raise_error()
                if call.finished:
                    if call.final is not None:
                        yield call.final
                    return

    async def status(self) -> dict[str, Any]:
        return await self._request(P.STATUS, {}, P.STATUS_REPLY)

    async def ping(self) -> dict[str, Any]:
        return await self._request(P.PING, {}, P.PONG)

    async def wait_ready(self, timeout: float = 300.0, count: int | None = None) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            try:  # one-second fuses, retried: the daemon may not be listening yet
                status = await self._request(P.STATUS, {}, P.STATUS_REPLY, timeout=1.0)
            except errors.ConnectionFailed:
                status = {}
            if self._ready(status, count, deadline, timeout):
                return status
            await asyncio.sleep(WAIT_READY_POLL_S)

    async def cancel(self, ids: Iterable[str]) -> int:
        n = self._core.cancel_ids(ids)
        self._kick()
        return n

    async def cancel_client(self, client: str | None = None) -> dict[str, Any]:
        return await self._request(P.CANCEL, _cancel_body(client), P.CANCELLED)

    # --- the reader task and the waiting callers ----------------------------------

    async def _end_call(self, call: Call, confirm: bool) -> None:
        self._events.pop(call, None)
        if self._closed:
            return
        if self._core.end_call(call) and confirm:
            request = self._core.open_request(P.PING, {}, P.PONG, time.monotonic())
            try:
                await asyncio.wait_for(self._wait(request), CANCEL_CONFIRM_S)
            except (TimeoutError, errors.ExgenError):
                pass
            finally:
                self._core.end_request(request)
                self._events.pop(request, None)
        self._kick()

    async def _request(
        self, command: bytes, body: dict[str, Any], expect: bytes, timeout: float | None = None
    ) -> dict[str, Any]:
        self._connect_once(self._sock)
        request = self._core.open_request(command, body, expect, time.monotonic(), timeout)
        try:
            await self._wait(request)
            return request.result()
        finally:
            self._core.end_request(request)
            self._events.pop(request, None)

    async def _wait(self, waiter: Call | Request) -> None:
        """Until ``waiter`` has news; the reader task does the I/O."""
        event = self._events.get(waiter)
        if event is None:
            event = self._events[waiter] = asyncio.Event()
        while not waiter.has_news:
            reader = self._ensure_reader()
            event.clear()
            self._kick()
            waiting = asyncio.ensure_future(event.wait())
            try:
                await asyncio.wait((waiting, reader), return_when=asyncio.FIRST_COMPLETED)
            finally:
                # Also when this coroutine is cancelled (a caller gone): a wait left
                # pending is collected later as "Task was destroyed but it is pending".
                waiting.cancel()
            if reader.done() and not waiter.has_news:
                reader.result()  # the reader's failure, raised here
                raise errors.ConnectionFailed("the client's reader stopped")

    def _ensure_reader(self) -> asyncio.Task[None]:
        loop = asyncio.get_running_loop()
        reader = self._reader
        if reader is None or reader.done() or reader.get_loop() is not loop:
            reader = self._reader = loop.create_task(self._read_forever())
        return reader

    def _kick(self) -> None:
        """Wake the reader: there may be something to send."""
        kick = self._kick_future
        if kick is not None and not kick.done():
            kick.set_result(None)

    async def _read_forever(self) -> None:
        core, sock, monitor = self._core, self._sock, self._monitor
        loop = asyncio.get_running_loop()
        incoming = _future(sock.recv_multipart())
        events = _future(monitor.recv_multipart())
        try:
            while True:
                self._flush()
                self._wake_touched()
                kick = self._kick_future = loop.create_future()
                wake = core.next_wakeup(time.monotonic())
                await asyncio.wait(
                    (incoming, events, kick), timeout=wake, return_when=asyncio.FIRST_COMPLETED
                )
                now = time.monotonic()
                while events.done():
                    core.on_event(transport.parse_event(events.result())[0], now)
                    events = _future(monitor.recv_multipart())
                while incoming.done():
                    core.on_frames(incoming.result(), now)
                    incoming = _future(sock.recv_multipart())
                core.tick(now)
        except Exception as exc:
            core.fail_all(
                errors.ConnectionFailed(f"the connection to {self.address} failed: {exc}")
            )
            raise
        finally:
            self._wake_touched(everyone=True)
            for pending in (incoming, events):
                if not pending.done():
                    pending.cancel()

    def _send(self, out: Outgoing) -> bool:
        sent = _future(self._sock.send_multipart(out.frames, flags=zmq.NOBLOCK))
        if sent.done() and sent.exception() is not None:
            self._core.not_sent(out)
            return False
        return True

    def _wake_touched(self, everyone: bool = False) -> None:
        touched = self._core.take_touched()
        for waiter, event in self._events.items():
            if everyone or waiter in touched:
                event.set()
