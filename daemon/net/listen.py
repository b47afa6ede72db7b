"""The client-facing socket: how it is set up, where it may listen, and who is local.

Refusals are one line each (the CLI prints it and exits 2): an address in use, an
address that is not this machine's, permission denied, and an ipc directory that
another user owns or can write to — whoever controls the directory can swap the
socket and receive the clients' traffic.
"""

from __future__ import annotations

import errno
import os
import pwd
import socket
import stat
from pathlib import Path
from typing import Any

import zmq
from zmq.auth.thread import ThreadAuthenticator

from exgen.client import protocol as P
from exgen.daemon.config import Settings
from exgen.daemon.net import curve
from exgen.daemon.net.sockets import is_loopback
from exgen.daemon.router import control
from exgen.daemon.router.delivery import SNDHWM

RCVHWM = 64  # client messages waiting to be read, per connection
IPC = "ipc://"
TCP = "tcp://"


class ListenError(RuntimeError):
    """The daemon cannot listen where it was asked to; the message says why (one line)."""


def bind_frontend(
    ctx: zmq.Context[Any], settings: Settings, listen: str
) -> tuple[zmq.Socket[Any], ThreadAuthenticator | None]:
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.MAXMSGSIZE, P.MAX_MESSAGE_BYTES)
    sock.setsockopt(zmq.ROUTER_HANDOVER, 1)  # a reconnecting client keeps its identity
    # Sends fail loudly (EAGAIN: the pipe is full; EHOSTUNREACH: no such client)
    # instead of dropping: Delivery keeps what could not go (docs/protocol.md).
    sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
    sock.setsockopt(zmq.SNDHWM, SNDHWM)
    # Frames a client sent that admission has not read yet: past this many per
    # connection ZMQ stops reading from it (the sender waits), so a flood of large
    # submits is not buffered whole in the router before it can answer busy.
    sock.setsockopt(zmq.RCVHWM, RCVHWM)
    # ZMTP heartbeats: a frozen or vanished client's connection is closed by ZMQ's
    # I/O thread (its own answers them while its program is busy), and the lease
    # probes then find it unreachable.
    heartbeat_ms = max(1, round(heartbeat_s(settings, listen) * 1000))
    sock.setsockopt(zmq.HEARTBEAT_IVL, heartbeat_ms)
    sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, 3 * heartbeat_ms)
    sock.setsockopt(zmq.HEARTBEAT_TTL, 3 * heartbeat_ms)
    auth = curve.secure_frontend(ctx, sock, settings)
    try:
        if listen.startswith(IPC):
            prepare_ipc(Path(listen[len(IPC) :]))
        try:
            sock.bind(listen)
        except zmq.ZMQError as exc:
            raise ListenError(_bind_error(listen, exc)) from None
    except BaseException:
        sock.close(linger=0)
        if auth is not None:
            auth.stop()
        raise
    if listen.startswith(IPC):
        # Owner and group only: the default address is for this machine's users
        # that the operator let in, not everyone.
        os.chmod(listen[len(IPC) :], 0o660)
    return sock, auth


def heartbeat_s(settings: Settings, listen: str) -> float:
    """How often the frontend heartbeats and probes its clients (timeout: 3 times that).

    On an ipc address every peer is a process on this machine: its ZMQ I/O thread, a
    native thread apart from its program, answers within milliseconds unless the
    process is stopped or gone, so a short beat finds a stopped client (SIGSTOP,
    Ctrl-Z) before more than about a batch runs for nobody. Over TCP a network may
    lie between, its own delays (a retransmission alone takes 200 ms) calling for a
    longer beat — on loopback too, the usual far end of an SSH tunnel."""
    return settings.ipc_heartbeat_s if listen.startswith(IPC) else settings.client_heartbeat_s


def is_local(listen: str) -> bool:
    """Whether only this machine's processes can reach ``listen``."""
    if listen.startswith(IPC):
        return True
    return is_loopback(listen[len(TCP) :].rsplit(":", 1)[0].strip("[]"))


def _bind_error(listen: str, exc: zmq.ZMQError) -> str:
    if exc.errno == errno.EADDRINUSE:
        return f"{listen} is in use: another exgen daemon or another program listens there"
    if exc.errno == errno.EACCES:
        return f"cannot listen on {listen}: permission denied"
    if exc.errno == errno.EADDRNOTAVAIL:
        return f"cannot listen on {listen}: not an address of this machine"
    return f"cannot listen on {listen}: {exc.strerror}"


def prepare_ipc(path: Path) -> None:
    """Make (or check) the socket's directory, and clear a stale socket of ours."""
    directory = path.parent
    try:
        directory.mkdir(mode=0o750, parents=True, exist_ok=True)
    except PermissionError:
        raise ListenError(f"cannot create {directory}: permission denied") from None
    check_ipc_dir(directory)
    try:
        info = path.lstat()
    except FileNotFoundError:
        return
    if info.st_uid != os.geteuid():
        raise ListenError(f"{path} exists and belongs to {owner(info.st_uid)}, not to this daemon")
    if stat.S_ISSOCK(info.st_mode) and _socket_answers(path):
        raise ListenError(f"another exgen daemon is already listening at ipc://{path}")
    path.unlink()  # a stale socket left by a daemon that was killed


def check_ipc_dir(directory: Path) -> None:
    """The directory must be this user's (or root's), and not writable by others unless
    sticky (as /tmp is), so that nobody else can replace the socket in it."""
    try:
        info = directory.lstat()
    except PermissionError:
        raise ListenError(f"cannot look at {directory}: permission denied") from None
    if stat.S_ISLNK(info.st_mode):
        raise ListenError(f"{directory} is a symbolic link: give the real directory")
    me = os.geteuid()
    if info.st_uid not in (me, 0):
        raise ListenError(
            f"{directory} belongs to {owner(info.st_uid)}, not to this daemon's user "
            f"{owner(me)}: another user could replace the socket; remove it or listen elsewhere"
        )
    writable_by_others = info.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
    if writable_by_others and not info.st_mode & stat.S_ISVTX:
        raise ListenError(
            f"{directory} is writable by others (mode {stat.S_IMODE(info.st_mode):o}): "
            "anyone could replace the socket; use a directory only this user can write"
        )


def owner(uid: int) -> str:
    try:
        return f"{pwd.getpwuid(uid).pw_name} (uid {uid})"
    except KeyError:
        return f"uid {uid}"


def access_mode(listen: str, auth: ThreadAuthenticator | None) -> str:
    """Who counts as a local user, for cancelling other clients' work (control.py)."""
    if auth is not None:
        return control.CURVE
    return control.LOCAL if is_local(listen) else control.PEER


def _socket_answers(path: Path) -> bool:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
        return True
    except OSError:
        return False
    finally:
        probe.close()
