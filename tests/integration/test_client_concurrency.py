"""Concurrent calls on one client, as a library user sees them against a real
daemon: calls on one client run at once, status never waits behind a stream, and an
abandoned iterator leaves nothing running at the daemon. Also: a
stream that ends with its Result, and a call's priority on a client that carries
both kinds of work."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import time
from collections.abc import Iterator
from typing import Any

import pytest

from exgen.client import AsyncClient, Client, Result
from tests.conftest import RunningDaemon, start_daemon

pytestmark = pytest.mark.timeout(120)

TOKEN_MS = 20
TOKENS = 50  # one call: about TOKENS * TOKEN_MS = 1 s


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningDaemon]:
    running = start_daemon(
        tmp_path_factory.mktemp("concurrency"),
        "--engine", "synthetic", "--workers", "1",
        "--engine-opt", f"token_ms={TOKEN_MS}", "--engine-opt", "paced=1",
        "--engine-opt", "capacity=16",
    )  # fmt: skip
    running.wait_ready()
    yield running
    assert running.stop() == 0


def settled(daemon: RunningDaemon, within: float = 3.0) -> dict[str, Any]:
    """The status once nothing is queued or in flight (or the last one seen)."""
    deadline = time.monotonic() + within
    while True:
        status = daemon.status()
        if (status["queued"] == 0 and status["inflight"] == 0) or time.monotonic() > deadline:
            return status
        time.sleep(0.05)


def test_three_concurrent_generates_on_one_async_client_take_about_one_call(daemon):
    async def main() -> tuple[float, float, list[Any]]:
        async with AsyncClient(daemon.address) as client:
            await client.generate(["warm up"], max_new_tokens=2)
            started = time.monotonic()
            await client.generate(["alone"], max_new_tokens=TOKENS)
            one = time.monotonic() - started
            started = time.monotonic()
            calls = [client.generate([f"call {i}"], max_new_tokens=TOKENS) for i in range(3)]
            results = await asyncio.gather(*calls)
            return one, time.monotonic() - started, results

    one, three, results = asyncio.run(main())
    assert one > 0.5, f"one call took {one:.2f}s: the engine is not slow enough to tell"
    assert three <= 1.3 * one, f"three concurrent calls took {three / one:.2f}x one call"
    assert [len(r) for r in results] == [1, 1, 1]
    assert all(r[0].ok and r[0].completion_tokens == TOKENS for r in results)
    assert len({r[0].text for r in results}) == 3, "each call got its own result"


def test_status_and_ping_do_not_wait_behind_a_stream_async(daemon):
    async def main() -> tuple[float, float, str]:
        async with AsyncClient(daemon.address) as client:
            chunks = client.stream("a long story", max_new_tokens=TOKENS)
            text = await chunks.__anext__()
            started = time.monotonic()
            status, pong = await asyncio.gather(client.status(), client.ping())
            asked = time.monotonic() - started
            assert "workers" in status and "instance" in pong
            async for chunk in chunks:
                text += chunk
            return asked, time.monotonic() - started, text

    asked, rest, text = asyncio.run(main())
    assert asked < 0.25 * rest, f"status took {asked:.2f}s while the stream ran {rest:.2f}s more"
    assert len(text.split()) == TOKENS


def test_status_does_not_wait_behind_a_stream_sync(daemon):
    with Client(daemon.address) as client:
        chunks = client.stream("another story", max_new_tokens=TOKENS)
        text = next(chunks)
        started = time.monotonic()
        assert "workers" in client.status()
        asked = time.monotonic() - started
        text += "".join(chunks)
        rest = time.monotonic() - started
    assert asked < 0.25 * rest, f"status took {asked:.2f}s while the stream ran {rest:.2f}s more"
    assert len(text.split()) == TOKENS


def test_two_interleaved_iterators_on_one_sync_client_each_get_their_own(daemon):
    with Client(daemon.address) as client:
        a = client.iter_results(
            [{"id": str(i), "prompt": f"a{i}"} for i in range(20)], max_new_tokens=3
        )
        b = client.iter_results(
            [{"id": str(i), "prompt": f"b{i}"} for i in range(20)], max_new_tokens=3
        )
        got_a, got_b = [], []
        for ra, rb in zip(a, b, strict=True):
            got_a.append(ra)
            got_b.append(rb)
        direct = {
            r.id: r.text
            for r in client.iter_results([{"id": "x", "prompt": "a3"}], max_new_tokens=3)
        }
    assert sorted(int(r.id) for r in got_a) == list(range(20))
    assert sorted(int(r.id) for r in got_b) == list(range(20))
    assert {r.id: r.text for r in got_a}["3"] == direct["x"], "results crossed between calls"


def many(n: int, tag: str) -> list[dict[str, Any]]:
    return [{"id": f"{tag}{i}", "prompt": f"{tag} {i}"} for i in range(n)]


@pytest.mark.parametrize("how", ["break", "exception", "keyboard-interrupt", "close"])
def test_an_abandoned_iterator_cancels_its_work(daemon, how):
    with Client(daemon.address) as client:
        results = client.iter_results(many(200, how), max_new_tokens=TOKENS)
        if how == "close":
            next(results)
            results.close()
        else:
            raised = {
                "break": None,
                "exception": RuntimeError,
                "keyboard-interrupt": KeyboardInterrupt,
            }
            kind = raised[how]
            try:
                for _ in results:
                    if kind is None:
                        break
                    raise kind("caller gave up")
            except (RuntimeError, KeyboardInterrupt):
                pass
        del results
        status = settled(daemon)
    assert status["queued"] == 0 and status["inflight"] == 0, status


def test_an_abandoned_async_iterator_cancels_its_work(daemon):
    async def main() -> None:
        async with AsyncClient(daemon.address) as client:
            results = client.iter_results(many(200, "async"), max_new_tokens=TOKENS)
            await results.__anext__()
            await results.aclose()

    asyncio.run(main())
    status = settled(daemon)
    assert status["queued"] == 0 and status["inflight"] == 0, status


def test_a_stream_with_its_result_ends_with_the_whole_text_and_its_counts(daemon):
    with Client(daemon.address) as client:
        events = list(client.stream_with_result("a story", max_new_tokens=5))
    *chunks, final = events
    assert chunks and all(isinstance(c, str) for c in chunks)
    assert isinstance(final, Result) and final.ok
    assert final.text == "".join(chunks)
    assert (final.finish_reason, final.completion_tokens) == ("length", 5)
    assert final.prompt_tokens > 0


def test_a_stream_with_its_result_async_takes_an_item_with_its_own_params(daemon):
    async def main() -> list[Any]:
        async with AsyncClient(daemon.address) as client:
            item = {
                "messages": [{"role": "user", "content": "hi"}],
                "params": {"max_new_tokens": 3},
            }
            return [e async for e in client.stream_with_result(item)]

    *chunks, final = asyncio.run(main())
    assert isinstance(final, Result) and final.completion_tokens == 3
    assert final.text == "".join(chunks)


@pytest.mark.parametrize("asynchronous", [False, True])
def test_an_abandoned_stream_cancels_its_work(daemon, asynchronous):
    if asynchronous:

        async def main() -> None:
            async with AsyncClient(daemon.address) as client:
                chunks = client.stream("long", max_new_tokens=TOKENS * 4)
                await chunks.__anext__()
                await chunks.aclose()

        asyncio.run(main())
    else:
        with Client(daemon.address) as client:
            for _ in client.stream("long", max_new_tokens=TOKENS * 4):
                break
    status = settled(daemon)
    assert status["queued"] == 0 and status["inflight"] == 0, status


def one_beside_many(daemon: RunningDaemon, priority: str) -> tuple[float, int]:
    """On one client: 64 items of 10 tokens (four rounds of the engine's 16 slots,
    about 0.8 s) at ``priority``, then one interactive item of 2 tokens. How long the
    one took, and how many of the 64 were done before it."""

    async def main() -> tuple[float, int]:
        async with AsyncClient(daemon.address) as client:
            done = 0

            async def bulk() -> None:
                nonlocal done
                work = many(64, f"bulk-{priority}-")
                async for result in client.iter_results(work, priority=priority, max_new_tokens=10):
                    assert result.ok
                    done += 1

            running = asyncio.ensure_future(bulk())
            await asyncio.sleep(0.1)  # the 64 are at the daemon
            started = time.monotonic()
            [quick] = await client.generate(["quick"], max_new_tokens=2)
            took, before = time.monotonic() - started, done
            assert quick.ok
            await running
            return took, before

    return asyncio.run(main())


def test_a_batch_call_gives_way_to_an_interactive_one_on_the_same_client(daemon):
    took, before = one_beside_many(daemon, "batch")
    assert before <= 32, f"{before} of 64 batch items went first ({took:.2f}s)"
    # The control: the same work at the same priority, and the client's own order
    # (the longest max_new_tokens first) puts the quick item behind all of it.
    took_same, before_same = one_beside_many(daemon, "interactive")
    assert before_same == 64, f"only {before_same} of 64 went first ({took_same:.2f}s)"
    assert took < 0.6 * took_same, f"batch beside: {took:.2f}s, same priority: {took_same:.2f}s"


def test_cancelled_waits_leave_no_task_pending(daemon):
    """A caller cancelled while it waits (a gateway whose HTTP caller went away) takes
    its wait with it: 16 streams, 8 at a time, each cancelled after its first chunk,
    leave no ``Event.wait`` task behind to be reported when it is collected."""
    reported: list[str] = []

    async def one(client: AsyncClient, gate: asyncio.Semaphore, i: int) -> None:
        async with gate:
            chunks = client.stream(f"story {i}", max_new_tokens=TOKENS)
            async with contextlib.aclosing(chunks):
                await chunks.__anext__()
                reader = asyncio.ensure_future(chunks.__anext__())
                await asyncio.sleep(0.01)
                reader.cancel()  # mid-wait, as a disconnect watcher does
                with contextlib.suppress(asyncio.CancelledError):
                    await reader

    async def main() -> list[str]:
        asyncio.get_running_loop().set_exception_handler(
            lambda _loop, context: reported.append(context["message"])
        )
        async with AsyncClient(daemon.address) as client:
            gate = asyncio.Semaphore(8)
            await asyncio.gather(*(one(client, gate, i) for i in range(16)))
            gc.collect()
            return [repr(t) for t in asyncio.all_tasks() if "Event.wait" in repr(t)]

    assert asyncio.run(main()) == []
    gc.collect()
    assert not [m for m in reported if "destroyed" in m], reported
    assert settled(daemon)["inflight"] == 0
