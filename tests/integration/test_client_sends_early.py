"""A big window's first submit frame leaves before the rest are encoded: the daemon
starts work while the client is still reading its items (the blocking and the asyncio
client alike)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator

import pytest
import zmq

from exgen.client import AsyncClient, Client
from exgen.client import protocol as P
from exgen.client.calls import SUBMIT_BATCH

pytestmark = pytest.mark.timeout(60)


class Stop(Exception):
    """Ends the item source once the test has seen what it came for."""


def watch_for_submit(daemon: zmq.Socket, seen: threading.Event, done: threading.Event) -> None:
    """The fake daemon: flags the first SUBMIT frame it receives; answers nothing."""
    while not done.is_set():
        if daemon.poll(50):
            command, _ = P.unpack(daemon.recv_multipart()[1:])
            if command == P.SUBMIT:
                seen.set()


def items_that_wait(seen: threading.Event, verdict: list[bool]) -> Iterator[dict]:
    """A first frame's worth of items; asked for one more, waits (up to 5 s) for the
    daemon to have had the first frame, then stops the call."""
    for k in range(SUBMIT_BATCH):
        yield {"id": str(k), "prompt": f"prompt {k} " + "word " * 400}
    verdict.append(seen.wait(5))
    raise Stop


@pytest.mark.parametrize("kind", ["blocking", "asyncio"])
def test_the_first_submit_frame_reaches_the_daemon_before_the_second_is_built(tmp_path, kind):
    address = f"ipc://{tmp_path}/exgen.sock"
    daemon = zmq.Context.instance().socket(zmq.ROUTER)
    daemon.setsockopt(zmq.LINGER, 0)
    daemon.bind(address)
    seen, done, verdict = threading.Event(), threading.Event(), []
    watcher = threading.Thread(target=watch_for_submit, args=(daemon, seen, done))
    watcher.start()
    try:
        source = items_that_wait(seen, verdict)
        with pytest.raises(Stop):
            if kind == "blocking":
                with Client(address, timeout=5, window=10 * SUBMIT_BATCH) as client:
                    for _ in client.iter_results(source, max_new_tokens=4):
                        pass
            else:
                asyncio.run(_consume_async(address, source))
    finally:
        done.set()
        watcher.join()
        daemon.close()
    assert verdict == [True], "the client built its second frame with the first unsent"


async def _consume_async(address: str, source: Iterator[dict]) -> None:
    async with AsyncClient(address, timeout=5, window=10 * SUBMIT_BATCH) as client:
        async for _ in client.iter_results(source, max_new_tokens=4):
            pass
