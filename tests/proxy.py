"""A small TCP proxy of the tests' own: a link between a client and the daemon that
can be cut (every connection reset at once, as a flaky network or a restarted NAT
does) or held (bytes stop flowing both ways, as a partition does)."""

from __future__ import annotations

import contextlib
import selectors
import socket
import struct
import threading
import time
from collections.abc import Iterator


class Proxy:
    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.setblocking(False)
        self.port = self.listener.getsockname()[1]
        self.pairs: dict[socket.socket, socket.socket] = {}
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
            if sock in self.pairs and self._is_upstream(sock):
                self.bytes_down += len(data)
            try:
                peer.setblocking(True)
                peer.sendall(data)
                peer.setblocking(False)
            except OSError:
                self._drop(sock)

    def _is_upstream(self, sock: socket.socket) -> bool:
        try:
            return sock.getpeername()[1] == self.upstream[1]
        except OSError:
            return False

    def _drop(self, sock: socket.socket) -> None:
        peer = self.pairs.pop(sock, None)
        for each in (sock, peer):
            if each is None:
                continue
            self.pairs.pop(each, None)
            with contextlib.suppress(KeyError, ValueError):
                self.selector.unregister(each)
            each.close()


def _reset(sock: socket.socket) -> None:
    """Close with an RST: SO_LINGER on, timeout 0."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
