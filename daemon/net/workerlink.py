"""The router's socket for its workers (the backend), local or across machines.

Locally it is an ipc socket in the daemon's private run directory (mode 0700):
only this user's processes can reach it. In Ray mode workers run on other
machines and connect back over TCP, so the socket is a CURVE server on its own ZMQ
context with its own ZAP authenticator (ZAP is per context: the client frontend's
keys and these never mix). Keys are made at start and never written down: the
server's pair, and one pair per worker start, whose public half joins the
allow-list until that worker has ended. A dead worker's key is revoked, so a
process given up for dead cannot connect again.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import zmq
from zmq.auth.thread import ThreadAuthenticator

from exgen.daemon.net.listen import ListenError

logger = logging.getLogger("exgen.workerlink")

# ZMTP heartbeats on the TCP backend: a connection from a machine that vanished
# (no FIN ever comes) is closed instead of lingering until TCP keepalive (hours).
TCP_HEARTBEAT_MS = 2000
ZAP_DOMAIN = "exgen-workers"


@dataclass
class WorkerKeys:
    """The backend's CURVE pair and the allow-list of worker public keys (z85)."""

    public: str
    secret: str
    allowed: set[str] = field(default_factory=set)

    @classmethod
    def generate(cls) -> WorkerKeys:
        public, secret = zmq.curve_keypair()
        return cls(public.decode("ascii"), secret.decode("ascii"))

    def issue(self) -> tuple[str, str]:
        """A fresh pair for one worker start, allowed in until revoked."""
        public, secret = (k.decode("ascii") for k in zmq.curve_keypair())
        self.allowed.add(public)
        return public, secret

    def revoke(self, public: str) -> None:
        self.allowed.discard(public)

    def callback(self, domain: str, key: bytes) -> bool:
        """ZAP's question, from its thread: may this key connect? (a set lookup)"""
        return key.decode("ascii", "replace") in self.allowed


@dataclass
class Backend:
    socket: zmq.Socket[Any]
    address: str  # what the socket bound (tcp: the port chosen, if it was 0 or *)
    keys: WorkerKeys | None = None
    context: zmq.Context[Any] | None = None  # its own, in TCP mode
    auth: ThreadAuthenticator | None = None

    def close(self) -> None:
        self.socket.close(linger=0)
        if self.auth is not None:
            self.auth.stop()  # before term: its ZAP socket would block it
        if self.context is not None:
            self.context.term()


def _router_socket(ctx: zmq.Context[Any]) -> zmq.Socket[Any]:
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.ROUTER_MANDATORY, 0)
    return sock


def bind_local(ctx: zmq.Context[Any], rundir: Path) -> Backend:
    sock = _router_socket(ctx)
    address = f"ipc://{rundir / 'backend.sock'}"
    sock.bind(address)
    return Backend(sock, address)


def bind_tcp(listen: str) -> Backend:
    """A CURVE server at ``listen`` (tcp://HOST:PORT; port 0 or * picks one)."""
    ctx: zmq.Context[Any] = zmq.Context()
    keys = WorkerKeys.generate()
    auth = ThreadAuthenticator(ctx, log=logging.getLogger("exgen.workerlink.zap"))
    auth.start()
    auth.configure_curve_callback(domain=ZAP_DOMAIN, credentials_provider=keys)
    sock = _router_socket(ctx)
    sock.zap_domain = ZAP_DOMAIN.encode()
    sock.curve_server = True
    sock.curve_publickey, sock.curve_secretkey = keys.public.encode(), keys.secret.encode()
    sock.setsockopt(zmq.HEARTBEAT_IVL, TCP_HEARTBEAT_MS)
    sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, 3 * TCP_HEARTBEAT_MS)
    if listen.endswith(":0"):
        listen = listen[:-1] + "*"  # ZMQ's word for "any free port"
    try:
        sock.bind(listen)
    except zmq.ZMQError as exc:
        sock.close(linger=0)
        auth.stop()
        ctx.term()
        raise ListenError(f"ray_worker_listen {listen}: {exc.strerror}") from None
    address = sock.getsockopt_string(zmq.LAST_ENDPOINT)
    logger.info("workers connect back to %s (CURVE, keys made at start)", address)
    return Backend(sock, address, keys, ctx, auth)


def advertised(bound: str, host: str) -> str:
    """The address a worker on another machine dials: ``host`` if bound to all."""
    rest = bound[len("tcp://") :]
    bound_host, _, port = rest.rpartition(":")
    if bound_host.strip("[]") in ("0.0.0.0", "*", "::", ""):
        bound_host = f"[{host}]" if ":" in host else host
    return f"tcp://{bound_host}:{port}"
