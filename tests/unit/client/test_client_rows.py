"""The client's submits are built from items encoded one by one (calls.row_encoder,
core.submit_body): the bytes must be those ``msgpack.packb`` writes for the whole
map, whichever encoder is installed, so the daemon sees exactly what it saw before."""

from __future__ import annotations

import builtins
from typing import Any

import msgpack
import pytest

from exgen.client import calls
from exgen.client import protocol as P
from exgen.client.core import Core, submit_body

WIRES: list[dict[str, Any]] = [
    {"id": "0.a", "params": {"max_new_tokens": 1}, "prompt": "p"},
    {"id": "0.b", "params": {}, "prompt": "é" * 40 + "x" * 300},
    {
        "id": "0.c",
        "params": {"temperature": 0.7, "top_p": 0.5, "seed": 2**40, "stop": ["\n", "."]},
        "messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}],
        "timeout_s": 5.0,
        "model": "m",
    },
    {"id": "0.d", "params": {"max_new_tokens": 70000, "n": 3, "logprobs": True}, "prompt": ""},
]


def without_msgspec(monkeypatch: pytest.MonkeyPatch) -> None:
    real_import = builtins.__import__

    def refuse(name: str, *args: Any, **kwargs: Any) -> Any:
        if name == "msgspec":
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", refuse)


@pytest.mark.parametrize("msgspec_installed", [True, False])
def test_an_item_encoded_alone_is_what_msgpack_writes(
    monkeypatch: pytest.MonkeyPatch, msgspec_installed: bool
) -> None:
    if not msgspec_installed:
        without_msgspec(monkeypatch)
    encode = calls.row_encoder()
    for wire in WIRES:
        assert encode(wire) == msgpack.packb(wire, use_bin_type=True)


class Text(str):
    """A str subclass (numpy.str_, say): a caller's prompt may be one."""


def test_a_type_msgspec_refuses_is_encoded_by_msgpack() -> None:
    wire = {"id": "0.e", "params": {}, "prompt": Text("sub")}
    assert calls.row_encoder()(wire) == msgpack.packb(wire, use_bin_type=True)


@pytest.mark.parametrize("priority", ["interactive", "batch"])
@pytest.mark.parametrize("count", [1, 15, 16, 512])
def test_a_submit_joined_from_rows_is_the_map_msgpack_writes(priority: str, count: int) -> None:
    wires = [dict(WIRES[i % len(WIRES)], id=f"0.{i}") for i in range(count)]
    rows = [calls.row_encoder()(w) for w in wires]
    body: dict[str, Any] = {"req": "s12", "items": wires, "stream": count == 1}
    if priority != "interactive":
        body["priority"] = priority
    assert submit_body("s12", rows, count == 1, priority) == P.pack(P.SUBMIT, body)[2]


def test_the_frames_a_core_sends_decode_to_the_items_given() -> None:
    core = Core("ipc:///nowhere", timeout=None, connect_timeout=None)
    given = [
        {"id": "a", "prompt": "x"},
        {"id": "b", "messages": [{"role": "user", "content": "y"}]},
    ]
    call = core.open_call(given, {"max_new_tokens": 2}, window=10, priority="batch")
    [out] = [o for o in core.poll_out(0.0) if o.submit is not None]
    command, body = P.unpack(out.frames)
    assert command == P.SUBMIT and body["priority"] == "batch" and body["stream"] is False
    assert body["items"] == [
        {"id": call.prefix + "a", "params": {"max_new_tokens": 2}, "prompt": "x"},
        {
            "id": call.prefix + "b",
            "params": {"max_new_tokens": 2},
            "messages": [{"role": "user", "content": "y"}],
        },
    ]
