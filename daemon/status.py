"""The status document (``exgen-client status --json``, metrics, systemd STATUS).

Read-only views of the rooms; nothing here changes state.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from exgen.client import protocol as P
from exgen.daemon.slots import Slot

if TYPE_CHECKING:
    from exgen.daemon.router import Router


def describe_router(router: Router, now: float) -> dict[str, Any]:
    ledger = router.ledger
    return {
        "instance": router.instance,
        "protocol": P.PROTOCOL_VERSION,
        "uptime_s": round(now - router.started, 3),
        "draining": router.draining,
        "queued": router.queue.size,
        "inflight": ledger.inflight,
        "completed": ledger.completed,
        "failed": ledger.failed,
        "engine": router.engine_name,
        "model": router.model_name,
        "workers": [
            describe_slot(slot, len(ledger.held_by(slot.id)), now) for slot in router.table
        ],
    }


def describe_slot(slot: Slot, inflight: int, now: float) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "slot": slot.id,
        "devices": slot.devices if slot.devices is not None else "cpu",
        "pid": slot.pid,
        "state": slot.state,
        "restarts": slot.restarts,
        "last_exit": slot.last_exit,
        "boot_error": slot.boot_error,
        **slot.totals(),
        "inflight": inflight,
        "tokens_per_s": 0.0,
    }
    serving = slot.serving
    if serving is not None:
        doc.update(
            tokens_per_s=round(serving.tokens_per_s(now), 1),
            capacity=serving.capacity,
            engine=serving.engine,
            load_s=serving.load_s,
            max_seq_len=serving.max_seq_len,
        )
    return doc
