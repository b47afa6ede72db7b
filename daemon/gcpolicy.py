"""The cyclic garbage collector's settings for exgen's own long-running processes.

Per prompt the router allocates a handful of short-lived containers (the decoded
item, its result map, the ledger entry's keys); with Python's default first
generation of 700 objects the collector ran every few submits and scanned objects
that would have died a moment later: a quarter of the router's CPU per prompt in
the in-process benchmark (13.1 -> 10.5 us with 10,000). The objects that live from
startup on (modules, settings, the engine's tables) are frozen out of every scan.
Only daemon processes do this; the client library never changes its caller's GC.
"""

from __future__ import annotations

import gc

FIRST_GENERATION = 10_000  # allocations between young collections (Python's default: 700)


def tune() -> None:
    """Freeze what exists now and collect the young generation less often."""
    freeze()
    _, second, third = gc.get_threshold()
    gc.set_threshold(FIRST_GENERATION, second, third)


def freeze() -> None:
    """Move everything alive now out of the collector's sight for good: called again
    once an engine has loaded, whose libraries' import graph (torch, transformers)
    is large and immortal — collections while decoding stopped walking it (5 % of
    the transformers engine's profile)."""
    gc.collect()
    gc.freeze()
