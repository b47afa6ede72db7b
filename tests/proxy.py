"""A small TCP proxy of the tests' own: a link between a client and the daemon that
can be cut (every connection reset at once, as a flaky network or a restarted NAT
does), held (bytes stop flowing both ways, as a partition does), or made to cut
itself once in the middle of a message (``cut_after``)."""

from __future__ import annotations

import contextlib
import selectors
import socket
import struct
import threading
import time
from collections.abc import Iterator


class Proxy:
    def __init__(self, upstream: tuple[str, int], cut_after: int | None = None) -> None:
        """``cut_after``: the first connection to bring more than that many bytes from
        upstream is closed at once, both ends, after half of the chunk that crossed the
        mark: a message torn in the middle. Once; later connections are left alone."""
        self.upstream = upstream
        self.cut_after = cut_after
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.setblocking(False)
        self.port = self.listener.getsockname()[1]
        self.pairs: dict[socket.socket, socket.socket] = {}
        self.down: dict[socket.socket, int] = {}  # upstream end -> bytes it brought
        self.lock = threading.Lock()
        self.selector = selectors.DefaultSelector()
        self.selector.register(self.listener, selectors.EVENT_READ)
        self.stopping = False
        self.held = False
        self.cuts = 0
        self.bytes_down = 0  # daemon -> client, through the proxy
        self.thread = threading.Thread(target=self._run, name="proxy", daemon=True)
        self.thread.start()

    @property
    def address(self) -> str:
        return f"tcp://127.0.0.1:{self.port}"

    def cut(self) -> None:
        """Reset every open connection (RST, not FIN); new ones are accepted again."""
        with self.lock:
            for sock in list(self.pairs):
                _reset(sock)
            for sock in list(self.pairs):
                self._drop(sock)
            self.cuts += 1

    @contextlib.contextmanager
    def held_down(self) -> Iterator[None]:
        """No bytes through while inside (connections stay open)."""
        self.held = True
        try:
            yield
        finally:
            self.held = False

    def close(self) -> None:
        self.stopping = True
        self.thread.join(5)
        with self.lock:
            for sock in list(self.pairs):
                self._drop(sock)
        self.listener.close()

    def _run(self) -> None:
        while not self.stopping:
            for key, _ in self.selector.select(0.05):
                sock = key.fileobj
                assert isinstance(sock, socket.socket)
                if sock is self.listener:
                    self._accept()
                elif not self.held:
                    self._pump(sock)
            if self.held:
                time.sleep(0.01)

    def _accept(self) -> None:
        try:
            client, _ = self.listener.accept()
        except BlockingIOError:
            return
        try:
            server = socket.create_connection(self.upstream, timeout=2)
        except OSError:
            client.close()
            return
        with self.lock:
            for sock in (client, server):
                sock.setblocking(False)
                self.selector.register(sock, selectors.EVENT_READ)
            self.pairs[client] = server
            self.pairs[server] = client
            self.down[server] = 0
            client.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)

    def _pump(self, sock: socket.socket) -> None:
        with self.lock:
            peer = self.pairs.get(sock)
            if peer is None:
                return
            try:
                data = sock.recv(65536)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                data = b""
            if not data:
                self._drop(sock)
                return
            if sock in self.down:
                self.bytes_down += len(data)
                self.down[sock] += len(data)
                if self.cut_after is not None and self.down[sock] > self.cut_after:
                    self._tear(sock, peer, data)
                    return
            try:
                peer.setblocking(True)
                peer.sendall(data)
                peer.setblocking(False)
            except OSError:
                self._drop(sock)

    def _tear(self, sock: socket.socket, peer: socket.socket, data: bytes) -> None:
        """Half of ``data`` on to ``peer``, then both ends closed (the ``cut_after`` cut)."""
        with contextlib.suppress(OSError):
            peer.setblocking(True)
            peer.sendall(data[: len(data) // 2])
        self._drop(sock)
        self.cut_after = None
        self.cuts += 1

    def _drop(self, sock: socket.socket) -> None:
        peer = self.pairs.pop(sock, None)
        for each in (sock, peer):
            if each is None:
                continue
            self.pairs.pop(each, None)
            self.down.pop(each, None)
            with contextlib.suppress(KeyError, ValueError):
                self.selector.unregister(each)
            each.close()


def _reset(sock: socket.socket) -> None:
    """Close with an RST: SO_LINGER on, timeout 0."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
