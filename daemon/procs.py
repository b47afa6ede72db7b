"""The two ends of a parent–child process tie, each written once.

- A child (a worker, the gateway) dies with its parent: ``die_with_parent``.
- A parent stops a child: SIGTERM, then SIGKILL what has not ended by the deadline
  (``kill_after``, after the caller's SIGTERM).

Small on purpose: the gateway's entry point imports it, and must not pull in the
worker (its engines) or the supervisor for it.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import subprocess
import threading
import time

from exgen.daemon.policy import EXIT_PARENT_GONE

PR_SET_PDEATHSIG = 1


def die_with_parent(parent_pid: int) -> None:
    """Ask the kernel to SIGKILL us when the supervisor dies; watch it too."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except OSError:
        pass  # not Linux: the watch thread alone will do
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(EXIT_PARENT_GONE)

    def watch() -> None:
        while True:
            time.sleep(1.0)
            if os.getppid() != parent_pid:
                os._exit(EXIT_PARENT_GONE)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def kill_after(
    popen: subprocess.Popen[bytes], deadline: float, logger: logging.Logger, what: str
) -> None:
    """Wait for ``popen`` (already sent SIGTERM) until ``deadline`` (monotonic); then
    SIGKILL it, saying so as ``what`` ("slot 2 pid 1234"), and reap it."""
    try:
        popen.wait(max(0.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        logger.warning("%s did not stop in time: SIGKILL", what)
        popen.kill()
        popen.wait()
