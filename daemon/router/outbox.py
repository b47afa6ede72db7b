"""The router's outbox: what its handlers want sent, for the loop to send.

Handlers append here and return; the daemon's loop (daemon/server.py) is the only code that
touches the router's sockets. It sends what is here after each call into the router,
before the next one, so the router never sees a message of its own still waiting.

Sends to workers have no outcome the router acts on (their socket drops what cannot
go). Sends to clients do: the frontend is non-blocking and ROUTER_MANDATORY, so a
send can find the client's pipe full (``FULL``: it is not reading) or no connection
under its identity (``GONE``). The loop reports those back through
``Router.on_sent`` — the one seam where a send's outcome reaches the router — and
also reports a send that went (``SENT``) when the message asks for it
(``ToClient.report``): an owed RESULTS message counts as handed over only then, and a
lease probe that went shows the client is there.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from exgen.client import protocol as P

SENT, FULL, GONE = "sent", "full", "gone"  # what a non-blocking send to a client did


@dataclass(slots=True)
class ToClient:
    identity: bytes
    frames: list[bytes]
    seq: int = 0  # the RESULTS message's number: owed until acknowledged (0: not owed)
    probe: bool = False  # a lease probe: whether it goes says whether the client is there

    @property
    def report(self) -> bool:
        """Whether the router must hear how this send went, even when it went."""
        return self.seq > 0 or self.probe


class Outbox:
    """Messages for clients and for workers, in the order the handlers made them."""

    def __init__(self, instance: str) -> None:
        self.instance = instance  # every error body names the router instance
        self.to_clients: list[ToClient] = []
        self.to_workers: list[tuple[bytes, list[bytes]]] = []

    def __bool__(self) -> bool:
        return bool(self.to_clients or self.to_workers)

    def client(self, send: ToClient) -> None:
        self.to_clients.append(send)

    def reply(self, client: bytes, command: bytes, body: dict[str, Any]) -> None:
        """A message that is not owed (the client's own timers cover its loss)."""
        self.to_clients.append(ToClient(client, P.pack(command, body)))

    def error(
        self,
        client: bytes,
        code: str,
        message: str,
        *,
        req: str | None = None,
        field_name: str | None = None,
        items: list[str] | None = None,
    ) -> None:
        body = P.error_body(code, message, req=req, field_name=field_name)
        if items is not None:
            body["items"] = items
        body["instance"] = self.instance
        self.reply(client, P.ERROR, body)

    def worker(self, identity: bytes, frames: list[bytes]) -> None:
        self.to_workers.append((identity, frames))

    def send_with(
        self,
        to_worker: Callable[[bytes, list[bytes]], None],
        to_client: Callable[[ToClient], str],
        on_sent: Callable[[ToClient, str], None],
    ) -> None:
        """Hand everything here to the loop's two send functions, reporting client
        sends to ``on_sent`` (``Router.on_sent``); what the reports add goes too.

        After one send to a client fails, nothing more goes to it in this batch (each
        gets the same outcome): numbered results never arrive out of order.
        """
        while self:
            for identity, frames in self.take_workers():
                to_worker(identity, frames)
            failed: dict[bytes, str] = {}
            for send in self.take_clients():
                outcome = failed.get(send.identity) or to_client(send)
                if outcome != SENT:
                    failed[send.identity] = outcome
                if outcome != SENT or send.report:
                    on_sent(send, outcome)

    def take_clients(self) -> list[ToClient]:
        sends, self.to_clients = self.to_clients, []
        return sends

    def take_workers(self) -> list[tuple[bytes, list[bytes]]]:
        sends, self.to_workers = self.to_workers, []
        return sends
