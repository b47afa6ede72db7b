"""Everything the library raises for a caller's mistake is an
ExgenError (a BadRequest naming the field, or ConnectionFailed for the address),
raised before anything reaches the daemon; nothing leaks as TypeError/ValueError."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq

from exgen.client import AsyncClient, Client, CurveKeys, errors
from exgen.client import protocol as P


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[tuple[str, zmq.Socket[Any]]]:
    """A ROUTER to connect to, so that only the caller's mistake can fail a call."""
    sock = zmq.Context.instance().socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    address = f"ipc://{tmp_path}/d.sock"
    sock.bind(address)
    yield address, sock
    sock.close()


def submitted(sock: zmq.Socket[Any]) -> list[bytes]:
    commands = []
    while sock.poll(100):
        commands.append(P.unpack(sock.recv_multipart()[1:])[0])
    return [c for c in commands if c == P.SUBMIT]


CONSTRUCTION: list[tuple[dict[str, Any], type[errors.ExgenError]]] = [
    ({"address": "localhost:5555"}, errors.ConnectionFailed),
    ({"window": 0}, errors.BadRequest),
    ({"window": "many"}, errors.BadRequest),
    ({"timeout": -1}, errors.BadRequest),
    ({"connect_timeout": 0}, errors.BadRequest),
]


@pytest.mark.parametrize(("kwargs", "error"), CONSTRUCTION)
@pytest.mark.parametrize("cls", [Client, AsyncClient])
def test_bad_construction(cls: type, kwargs: dict[str, Any], error: type, listener) -> None:
    kwargs = {"address": listener[0], **kwargs}
    with pytest.raises(error):
        cls(**kwargs)


CALLS: list[tuple[str, Callable[[Any], Any]]] = [
    ("a string for prompts", lambda c: c.generate("just one string")),
    ("a prompt that is a number", lambda c: c.generate([42])),
    ("a bad parameter", lambda c: c.generate(["x"], temperature=-1)),
    ("an unknown parameter", lambda c: c.generate(["x"], temprature=0.5)),
    ("a bad deadline", lambda c: c.generate(["x"], timeout_s="soon")),
    ("items that are not iterable", lambda c: c.iter_results(None)),
    ("an item that is not a map", lambda c: c.iter_results([["prompt", "x"]])),
    ("an item without an id", lambda c: c.iter_results([{"prompt": "x"}])),
    ("a repeated id", lambda c: c.iter_results([{"id": "a", "prompt": "x"}] * 2)),
    ("a stream of a number", lambda c: c.stream(42)),
    ("an unknown priority", lambda c: c.generate(["x"], priority="urgent")),
    ("a stream of an unknown priority", lambda c: c.stream_with_result("x", priority="now")),
    ("an empty client name to cancel", lambda c: c.cancel_client("")),
]


def drain(value: Any) -> Any:
    if hasattr(value, "__next__"):
        return list(value)
    return value


@pytest.mark.parametrize(("what", "call"), CALLS, ids=[w for w, _ in CALLS])
def test_a_callers_mistake_is_a_bad_request_and_sends_nothing(listener, what, call) -> None:
    address, sock = listener
    with Client(address, timeout=2) as client, pytest.raises(errors.BadRequest):
        drain(call(client))
    assert submitted(sock) == [], f"{what}: the mistake reached the daemon"


@pytest.mark.parametrize(("what", "call"), CALLS, ids=[w for w, _ in CALLS])
def test_the_same_mistakes_on_the_async_client(listener, what, call) -> None:
    async def main() -> None:
        async with AsyncClient(listener[0], timeout=2) as client:
            value = call(client)
            if hasattr(value, "__anext__"):
                [_ async for _ in value]
            else:
                await value

    with pytest.raises(errors.BadRequest):
        asyncio.run(main())


def test_bad_key_files_are_exgen_errors(tmp_path: Path) -> None:
    (tmp_path / "junk.key").write_text("not a key")
    with pytest.raises(errors.BadKeyFile):
        CurveKeys.from_files(tmp_path / "junk.key", tmp_path / "missing.key_secret")


def test_validation_error_is_in_the_tree() -> None:
    with pytest.raises(errors.ExgenError):
        P.validate_params({"temperature": -1})
