"""systemd's notify protocol: datagrams to $NOTIFY_SOCKET. Does nothing without it.

Type=notify units learn READY=1, STATUS=…, WATCHDOG=1, EXTEND_TIMEOUT_USEC=… and
STOPPING=1 from here. A leading '@' in the socket path means Linux's abstract
namespace.

Like sd_notify(3)'s unset_environment, the variables are taken out of os.environ
once read: worker processes inherit the environment, and a library in a worker
that speaks sd_notify must not talk to systemd as if it were the service.
"""

from __future__ import annotations

import logging
import os
import socket

logger = logging.getLogger(__name__)


SYSTEMD_VARIABLES = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")


class Notifier:
    def __init__(self, environ: dict[str, str] | None = None) -> None:
        env = dict(os.environ) if environ is None else environ
        if environ is None:
            for name in SYSTEMD_VARIABLES:
                os.environ.pop(name, None)
        path = env.get("NOTIFY_SOCKET", "")
        self.address: str | None = None
        if path:
            self.address = "\0" + path[1:] if path.startswith("@") else path
        self.sock: socket.socket | None = None
        usec = env.get("WATCHDOG_USEC", "")
        pid = env.get("WATCHDOG_PID", "")
        watchdog_for_us = usec.isdigit() and (not pid or pid == str(os.getpid()))
        self.watchdog_interval_s = int(usec) / 1e6 / 2 if watchdog_for_us else None
        self.failures = 0

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def notify(self, *fields: str) -> None:
        if self.address is None:
            return
        if self.sock is None:
            # Non-blocking: a stalled systemd must never stall the router's loop.
            flags = socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK
            self.sock = socket.socket(socket.AF_UNIX, flags)
        try:
            self.sock.sendto("\n".join(fields).encode(), self.address)
        except OSError as exc:
            # Said once: the loop notifies several times a second.
            self.failures += 1
            level = logging.WARNING if self.failures == 1 else logging.DEBUG
            logger.log(level, "sd_notify to %s failed: %s", self.address.lstrip("\0"), exc)

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None
