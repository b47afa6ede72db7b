"""``exgen-client``: a thin command line over :class:`exgen.client.Client`.

It builds a client, calls it, prints, and maps errors to exit codes (EXIT_HELP).
A run that is stopped (Ctrl-C, SIGTERM, SIGHUP, SIGPIPE) or cannot write its output
(a full disk, a closed pipe) cancels its unfinished work at the daemon before it
exits, so nothing runs for nobody; ``submit --resume`` completes the file later.

One module a command group: ``cli_submit``, ``cli_generate``, ``cli_status`` (status
and cancel), ``cli_bench``, ``cli_batch`` (the HTTP gateway's Batch API); what they
share (connection and sampling options, errors to exit codes, stop signals) is in
``cli_common``, the exit codes in ``exits``.
"""

from __future__ import annotations

import logging

import click

from exgen.client.cli_batch import batch
from exgen.client.cli_bench import bench
from exgen.client.cli_generate import generate
from exgen.client.cli_status import cancel, status
from exgen.client.cli_submit import submit
from exgen.client.exits import EXIT_HELP


@click.group(context_settings={"help_option_names": ["-h", "--help"]}, epilog=EXIT_HELP)
@click.option("-v", "--verbose", count=True, help="More log output on stderr (-vv: debug).")
@click.version_option(package_name="exgen", prog_name="exgen-client")
def cli(verbose: int) -> None:
    """Send prompts to an exgen daemon (start one with `exgen serve`)."""
    level = logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(level=level, format="%(asctime)s %(name)s %(levelname)s %(message)s")


def main() -> None:
    cli(prog_name="exgen-client")


for command in (submit, generate, status, cancel, bench, batch):
    cli.add_command(command)


if __name__ == "__main__":
    main()
