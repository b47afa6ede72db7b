"""The command-line tools' exit codes and their one-line error, shared by
``exgen-client`` (cli.py) and its ``batch`` commands (cli_batch.py); the meaning of
each code is in cli.EXIT_HELP."""

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
