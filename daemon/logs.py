"""Logging to stderr, journald-friendly.

Under systemd (JOURNAL_STREAM is set) lines start with a syslog level prefix such as
``<6>`` that journald turns into the entry's priority, and carry no timestamp (the
journal adds its own). Elsewhere: a timestamp and the level name. Worker processes
prefix every line with their slot and pid.
"""

from __future__ import annotations

import logging
import os
import sys

SYSLOG_PRIORITY = {
    logging.DEBUG: 7,
    logging.INFO: 6,
    logging.WARNING: 4,
    logging.ERROR: 3,
    logging.CRITICAL: 2,
}
LEVELS = ("debug", "info", "warning", "error")


class _Formatter(logging.Formatter):
    def __init__(self, journald: bool, prefix: str) -> None:
        where = f"{prefix}: " if prefix else ""
        if journald:
            super().__init__(f"%(name)s: {where}%(message)s")
        else:
            super().__init__(
                f"%(asctime)s %(levelname)-7s %(name)s: {where}%(message)s", "%H:%M:%S"
            )
        self.journald = journald

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        if self.journald:
            # journald reads a priority per line: a traceback's lines keep its level.
            prefix = f"<{SYSLOG_PRIORITY.get(record.levelno, 6)}>"
            return "\n".join(prefix + line for line in text.split("\n"))
        return text


def under_journald() -> bool:
    return bool(os.environ.get("JOURNAL_STREAM"))


def setup_logging(level: str = "info", prefix: str = "") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Formatter(under_journald(), prefix))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # Libraries' chatter stays at warning unless debugging.
    for noisy in ("transformers", "torch", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING if level != "debug" else logging.DEBUG)
