"""Small network helpers shared by the tests and the benchmarks (bench/ scripts import
them with the repository root on sys.path): stdlib and pyzmq only, no pytest."""

from __future__ import annotations

import socket


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
