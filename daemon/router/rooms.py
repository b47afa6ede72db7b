"""The router's rooms, built once by the ``Router`` and handed to its handlers.

Each owns one kind of state (the ledger's counts change only through its methods):

- ``Ledger`` (ledger.py): every accepted item until its one answer; who holds what;
  the counts of what was answered.
- ``FairQueue`` (fairqueue.py): the waiting room.
- ``ClientRegistry`` (clients.py): who the clients are, what they are owed.
- ``SlotTable`` (supervisor/slots.py): one record per slot, shared with the supervisor.
- ``Outbox`` (outbox.py): what is to be sent, until the loop sends it.
- ``Service``: what the router says about itself (its instance, model, draining).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field

from exgen.daemon.config import Settings
from exgen.daemon.router.clients import ClientRegistry
from exgen.daemon.router.fairqueue import FairQueue
from exgen.daemon.router.ledger import Ledger
from exgen.daemon.router.outbox import Outbox
from exgen.daemon.supervisor.slots import SlotTable


@dataclass(slots=True)
class Service:
    model_name: str
    started: float
    instance: str = field(default_factory=lambda: uuid.uuid4().hex)
    draining: bool = False  # set once, by Router.start_draining


@dataclass(frozen=True, slots=True)
class Rooms:
    settings: Settings
    service: Service
    ledger: Ledger
    queue: FairQueue
    clients: ClientRegistry
    table: SlotTable
    outbox: Outbox

    @classmethod
    def build(cls, settings: Settings, table: SlotTable, service: Service) -> Rooms:
        return cls(
            settings,
            service,
            Ledger(),
            FairQueue(longest_first=settings.order == "longest-first"),
            ClientRegistry(),
            table,
            Outbox(service.instance),
        )
