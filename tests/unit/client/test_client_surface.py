"""Client and AsyncClient have one public surface: the same names, the same
parameters; the async ones awaited (or async-iterated). Both are shells over one
core, so a method added to one and not the other is a bug this test names."""

from __future__ import annotations

import inspect

from exgen.client import AsyncClient, Client

SYNC_IN_BOTH = {"close"}  # closing needs no event loop


def public(cls: type) -> dict[str, object]:
    return {name: getattr(cls, name) for name in dir(cls) if not name.startswith("_")}


def parameters(func: object) -> list[tuple[str, object, object]]:
    sig = inspect.signature(func)  # type: ignore[arg-type]
    return [(p.name, p.kind, p.default) for p in sig.parameters.values()]


def test_the_same_public_names():
    assert sorted(public(Client)) == sorted(public(AsyncClient))


def test_the_same_parameters_and_the_async_ones_awaited():
    sync, asynchronous = public(Client), public(AsyncClient)
    methods = [name for name, member in sync.items() if inspect.isfunction(member)]
    assert {"generate", "iter_results", "stream", "stream_with_result", "status", "ping",
            "cancel", "cancel_client", "wait_ready"} <= set(methods)  # fmt: skip
    for name in methods:
        assert parameters(sync[name]) == parameters(asynchronous[name]), name
        twin = asynchronous[name]
        if name in SYNC_IN_BOTH:
            assert not inspect.iscoroutinefunction(twin), name
        else:
            assert inspect.iscoroutinefunction(twin) or inspect.isasyncgenfunction(twin), name


def test_the_same_constructor():
    assert parameters(Client.__init__) == parameters(AsyncClient.__init__)


def test_context_managers_of_their_kind():
    assert hasattr(Client, "__enter__") and hasattr(Client, "__exit__")
    assert hasattr(AsyncClient, "__aenter__") and hasattr(AsyncClient, "__aexit__")
