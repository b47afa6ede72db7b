"""The status document (``exgen-client status --json``, metrics, systemd STATUS).

Read-only views of the rooms; nothing here changes state.
"""

from __future__ import annotations

from typing import Any

from exgen.client import protocol as P
from exgen.daemon.router.rooms import Rooms
from exgen.daemon.supervisor.slots import Slot


def describe_router(rooms: Rooms, now: float) -> dict[str, Any]:
    ledger, service = rooms.ledger, rooms.service
    return {
        "instance": service.instance,
        "protocol": P.PROTOCOL_VERSION,
        "uptime_s": round(now - service.started, 3),
        "draining": service.draining,
        "queued": rooms.queue.size,
        "inflight": ledger.inflight,
        "completed": ledger.completed,
        "failed": ledger.failed,
        "hedges": {"copies": ledger.hedges, "won": ledger.hedge_wins},  # hedging.py
        "engine": rooms.table.engine,
        "model": service.model_name,
        "workers": [describe_slot(slot, len(ledger.held_by(slot.id)), now) for slot in rooms.table],
        "clients": describe_clients(rooms, now),
    }


def describe_clients(rooms: Rooms, now: float) -> list[dict[str, Any]]:
    ledger = rooms.ledger
    running: dict[bytes, int] = {}
    for keys in ledger.held.values():  # what runs is small: capacity x slots
        for key in keys:
            client = ledger.entries[key].client
            running[client] = running.get(client, 0) + 1
    out = []
    for record in rooms.clients:
        out.append(
            {
                "id": record.identity.hex(),
                "name": record.name,
                "host": record.host,
                "pid": record.pid,
                "queued": rooms.queue.waiting(record.identity),
                "running": running.get(record.identity, 0),
                "done": record.done,
                "failed": record.failed,
                "unread": record.unread,
                "tokens_per_s": round(record.tokens_per_s(now), 1),
                "connected": record.reachable,
                "paused": record.pause_reason or None,
                "idle_s": round(now - record.last_seen, 1),
            }
        )
    return out


def slot_devices(slot: Slot) -> list[int] | str:
    """Its GPUs; a Ray slot not yet placed (or on a custom resource): what it asks for."""
    if slot.devices is not None:
        return slot.devices
    if slot.resources:
        return ",".join(f"{name}={amount:g}" for name, amount in slot.resources.items())
    return "cpu"


def describe_slot(slot: Slot, inflight: int, now: float) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "slot": slot.id,
        "devices": slot_devices(slot),
        "pid": slot.pid,
        "node": slot.node,  # "local", or the Ray node id (None while pending)
        "host": slot.host,
        "state": slot.state,
        "restarts": slot.restarts,
        "last_exit": slot.last_exit,
        "boot_error": slot.boot_error,
        **slot.totals(),
        "inflight": inflight,
        "tokens_per_s": 0.0,
    }
    if slot.resources is not None:
        doc["resources"] = slot.resources  # what Ray must find for it
    counters = slot.counters()
    if counters:  # an engine with a prefix cache: prefix_hits, prefill_tokens_saved, ...
        doc["counters"] = counters
    serving = slot.serving
    if serving is not None:
        doc.update(
            tokens_per_s=round(serving.tokens_per_s(now), 1),
            capacity=serving.capacity,
            engine=serving.engine,
            load_s=serving.load_s,
            max_seq_len=serving.max_seq_len,
            tokenizer=serving.describe.get("tokenizer"),  # the gateway's /tokenizer_info
        )
    return doc
