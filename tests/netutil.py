"""Small network helpers shared by the tests and the benchmarks (bench/ scripts import
them with the repository root on sys.path): stdlib and pyzmq only, no pytest."""

from __future__ import annotations

import socket
from typing import Any

import zmq


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def raw_dealer(address: str, **options: int) -> zmq.Socket[Any]:
    """A bare DEALER connected to ``address`` (LINGER 0), for speaking raw protocol
    frames; ``options`` by name: ``raw_dealer(addr, RCVHWM=1, MAXMSGSIZE=2**20)``."""
    sock: zmq.Socket[Any] = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    for name, value in options.items():
        sock.setsockopt(getattr(zmq, name), value)
    sock.connect(address)
    return sock
