"""Small helpers for the daemon's ZMQ sockets."""

from __future__ import annotations

import ipaddress
from typing import Any, cast

import zmq


def readable(sock: zmq.Socket[Any]) -> bool:
    """Whether a whole message waits: checked before a read, because an empty
    NOBLOCK read raises zmq.Again, and an exception per loop turn showed in the
    router's and the workers' profiles at tens of thousands of prompts a second."""
    return bool(cast(int, sock.getsockopt(zmq.EVENTS)) & zmq.POLLIN)


def is_loopback(host: str) -> bool:
    """Whether a host name or address is this machine's loopback (no other machine
    reaches it)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
