"""The command-line tools' exit codes and their one-line error, shared by every
``exgen-client`` command (the cli_*.py modules); what each code means, as the help
shows it, is EXIT_HELP."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from typing import NoReturn

import click

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_CONNECT = 3
EXIT_OUTPUT = 4
EXIT_INTERRUPTED = 128 + signal.SIGINT  # 130
EXIT_READER_GONE = 128 + signal.SIGPIPE  # 141, as a shell reports a process SIGPIPE ended


EXIT_HELP = """\b
Exit status:
  0    everything succeeded
  1    an item failed, a line was malformed, or the daemon refused the request
  2    usage error (bad option or value, an output file in the way or unwritable)
  3    the daemon could not be reached, or went away mid-run (submit: rerun with --resume)
  4    an output file could not be written (disk full?); unfinished work was cancelled
  130  interrupted (Ctrl-C); 129, 141, 143: stopped by SIGHUP, SIGPIPE, SIGTERM
       (unfinished work was cancelled; submit: rerun with --resume)"""


def fail(message: str, code: int) -> NoReturn:
    """One line on stderr (unless stderr itself is gone), then exit with ``code``."""
    with contextlib.suppress(OSError):
        click.echo(f"exgen-client: {message}", err=True)
    sys.exit(code)


def reader_gone() -> NoReturn:
    """Standard output's reader went away (`... | head`): exit as a SIGPIPE would,
    quietly, and without the second error Python gives when it flushes at exit."""
    with contextlib.suppress(OSError, ValueError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    sys.exit(EXIT_READER_GONE)


def warn(message: str) -> None:
    with contextlib.suppress(OSError):
        click.echo(f"exgen-client: warning: {message}", err=True)
