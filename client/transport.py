"""The client's socket: address checks before connecting, socket options, and the
connection events a ZMQ socket monitor reports. The only I/O the core leaves out.

Before an ipc socket is connected, its directory must belong to this user or to
root (or sit in a root-owned directory only root can write, as systemd's
``/run/exgen`` does): another local user who created ``/tmp/exgen-$UID`` first could
otherwise swap the socket and read every prompt. A missing socket, or one this user
may not open, is a clear error at once, not a timeout.
"""

from __future__ import annotations

import grp
import os
import pwd
import stat
from pathlib import Path
from typing import Any

import zmq
from zmq.utils.monitor import parse_monitor_message

from exgen.client import errors
from exgen.client import protocol as P
from exgen.client.keys import CurveKeys

# Connection events the core acts on (see Core.on_event).
MONITORED = (
    zmq.EVENT_CONNECTED
    | zmq.EVENT_HANDSHAKE_SUCCEEDED
    | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
    | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
    | zmq.EVENT_HANDSHAKE_FAILED_AUTH
    | zmq.EVENT_CONNECT_RETRIED
    | zmq.EVENT_DISCONNECTED
)


def ipc_path(address: str) -> Path | None:
    """The file of an ``ipc://`` address (None for tcp and abstract sockets)."""
    if not address.startswith("ipc://") or address.startswith("ipc://@"):
        return None
    return Path(address[len("ipc://") :])


def check_address(address: str) -> None:
    """Refuse what ZMQ would take silently: a malformed address (a caller's mistake)."""
    if not address.startswith(("ipc://", "tcp://")) or len(address) <= len("tcp://"):
        raise errors.ConnectionFailed(
            f"invalid address {address!r}: expected ipc://PATH or tcp://HOST:PORT"
        )


def check_ipc(address: str) -> None:
    """Before connecting: the directory is safe, the socket is there and ours to open."""
    path = ipc_path(address)
    if path is None:
        return
    directory = path.parent if path.is_absolute() else (Path.cwd() / path).parent
    check_directory_owner(directory, address)
    try:
        info = path.stat()
    except FileNotFoundError:
        raise errors.ConnectionFailed(
            f"no exgen daemon at {address}: {path} does not exist"
        ) from None
    except PermissionError:
        raise errors.ConnectionFailed(
            f"permission denied: cannot reach {path} (directory {directory} is "
            f"{_mode_and_owner(directory)})"
        ) from None
    if not stat.S_ISSOCK(info.st_mode):
        raise errors.ConnectionFailed(f"{path} is not a socket (is {address} right?)")
    if not os.access(path, os.R_OK | os.W_OK):
        raise errors.ConnectionFailed(
            f"permission denied: {path} is {_mode_and_owner(path)}; this user "
            f"({_user_name(os.geteuid())}) may not open it"
        )


def check_directory_owner(directory: Path, address: str) -> None:
    """UnsafeSocket unless ``directory`` is this user's, root's, or root-made."""
    try:
        info = directory.stat()
    except FileNotFoundError:
        raise errors.ConnectionFailed(
            f"no exgen daemon at {address}: {directory} does not exist"
        ) from None
    except PermissionError:
        return  # reported as "permission denied" on the socket itself
    me = os.geteuid()
    if info.st_uid in (me, 0) or _made_by_root(directory):
        return
    raise errors.UnsafeSocket(
        f"refusing {address}: its directory {directory} belongs to user "
        f"{_user_name(info.st_uid)} (uid {info.st_uid}), not to you "
        f"({_user_name(me)}) or root; that user could swap the socket"
    )


def _made_by_root(directory: Path) -> bool:
    """Whether only root could have created ``directory`` (systemd's RuntimeDirectory)."""
    try:
        parent = directory.parent.stat()
    except OSError:
        return False
    return parent.st_uid == 0 and not parent.st_mode & (stat.S_IWGRP | stat.S_IWOTH)


def _mode_and_owner(path: Path) -> str:
    try:
        info = path.stat()
    except OSError:
        return "not readable"
    return (
        f"mode {stat.S_IMODE(info.st_mode):04o}, owner {_user_name(info.st_uid)}, "
        f"group {_group_name(info.st_gid)}"
    )


def _user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def _group_name(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


def configure(sock: zmq.Socket[Any], identity: bytes, curve: CurveKeys | None) -> None:
    """Options of the client's DEALER, before it connects."""
    sock.setsockopt(zmq.IDENTITY, identity)  # fixed, so replies find us after reconnects
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVHWM, 0)
    sock.setsockopt(zmq.SNDHWM, 0)
    sock.setsockopt(zmq.MAXMSGSIZE, P.MAX_MESSAGE_BYTES)
    sock.setsockopt(zmq.RECONNECT_IVL, 100)
    sock.setsockopt(zmq.RECONNECT_IVL_MAX, 2000)
    if curve is not None:
        curve.apply(sock)


def connect(sock: zmq.Socket[Any], address: str) -> None:
    try:
        sock.connect(address)
    except zmq.ZMQError as exc:
        raise errors.ConnectionFailed(f"cannot connect to {address}: {exc}") from None


def parse_event(frames: list[bytes]) -> tuple[int, int]:
    """(event, value) of one socket monitor message."""
    event = parse_monitor_message(frames)
    return int(event["event"]), int(event["value"])


HANDSHAKE_FAILURES: dict[int, str] = {
    zmq.EVENT_HANDSHAKE_FAILED_AUTH: "the daemon refused this client's CURVE key",
    zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL: (
        "the handshake failed (CURVE keys on one side only, or not a ZMQ peer?)"
    ),
    zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL: "the handshake failed (wrong server key?)",
}
