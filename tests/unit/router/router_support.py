"""The router in-process, with plain data in and messages out: the loop's part is
played by ``Network`` (no socket, fake or real). Clients and workers are identities;
what the router sends each is kept, unpacked on demand; a client in ``gone`` has no
connection, so a send to it comes back ``GONE`` as ROUTER_MANDATORY makes it; one in
``full`` is not reading (its pipe is full: ``FULL``)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from exgen.client import protocol as P
from exgen.daemon.net import wire
from exgen.daemon.router.outbox import FULL, GONE, SENT, ToClient
from exgen.daemon.router.router import Router
from exgen.daemon.supervisor.slots import STARTING, Slot


@dataclass
class FakeProc:
    """A slot's worker process as a launcher reports it (READY's pid check)."""

    pid: int

    def poll(self) -> None:
        return None

    def is_pid(self, pid: int) -> bool:
        return pid == self.pid


class Network:
    def __init__(self, router: Router) -> None:
        self.router = router
        self.to_clients: dict[bytes, list[list[bytes]]] = {}
        self.to_workers: dict[bytes, list[list[bytes]]] = {}
        self.gone: set[bytes] = set()
        self.full: set[bytes] = set()

    # --- in ----------------------------------------------------------------------------

    def client_says(
        self, client: bytes, command: bytes, body: dict[str, Any], now: float | None = None
    ) -> None:
        now = time.monotonic() if now is None else now
        self.router.on_client([client, *P.pack(command, body)], now)
        self.send(now)

    def worker_says(self, identity: bytes, frames: list[bytes], now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        self.router.on_worker([identity, *frames], now)
        self.send(now)

    def worker_ready(self, slot: Slot, pid: int, capacity: int) -> bytes:
        """The slot's process starts and says READY; its identity."""
        slot.proc = FakeProc(pid)  # type: ignore[assignment]
        slot.state = STARTING
        identity = f"w{slot.id}-{pid}".encode()
        ready = wire.Ready(slot.id, pid, "synthetic", capacity, None, 0.0, {})
        self.worker_says(identity, wire.pack_ready(ready))
        return identity

    # --- the loop's sends ----------------------------------------------------------------

    def send(self, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        self.router.outbox.send_with(
            self._to_worker, self._to_client, lambda s, o: self.router.on_sent(s, o, now)
        )

    def _to_worker(self, identity: bytes, frames: list[bytes]) -> None:
        self.to_workers.setdefault(identity, []).append(frames)

    def _to_client(self, send: ToClient) -> str:
        if send.identity in self.gone:
            return GONE
        if send.identity in self.full:
            return FULL
        self.to_clients.setdefault(send.identity, []).append(send.frames)
        return SENT

    # --- out ---------------------------------------------------------------------------

    def take_client(self, identity: bytes) -> list[tuple[bytes, dict[str, Any]]]:
        return [P.unpack(frames) for frames in self.to_clients.pop(identity, [])]

    def take_worker(self, identity: bytes) -> list[tuple[bytes, dict[str, Any]]]:
        return [P.unpack(frames) for frames in self.to_workers.pop(identity, [])]
