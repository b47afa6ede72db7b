"""``exgen-client status`` and ``cancel``: the daemon's workers and clients, and
cancelling a client's work."""

from __future__ import annotations

import json
from typing import Any

import click

from exgen.client import errors
from exgen.client.cli_common import connection_options, daemon_errors, open_client
from exgen.client.client import default_address
from exgen.client.exits import EXIT_FAILED, EXIT_HELP, fail

STATUS_COLUMNS = (
    ("slot", "slot"),
    ("devices", "devices"),
    ("pid", "pid"),
    ("state", "state"),
    ("inflight", "inflight"),
    ("completed", "completed"),
    ("restarts", "restarts"),
    ("tok/s", "tokens_per_s"),
    ("load", "load_s"),
)
# Where a worker's engine has a prefix cache (its status row carries "counters").
PREFIX_COLUMNS = (("prefix hits", "prefix_hits"), ("prefill saved", "prefill_tokens_saved"))
CLIENT_COLUMNS = (  # the name last: a command line is long, and nothing follows it
    ("client", "id"),
    ("host", "host"),
    ("pid", "pid"),
    ("queued", "queued"),
    ("running", "running"),
    ("done", "done"),
    ("failed", "failed"),
    ("tok/s", "tokens_per_s"),
    ("idle", "idle_s"),
    ("name", "name"),
)
CLIENT_ID_CHARS = 12  # of a client's id in the table: enough for `cancel` to name it


@click.command(epilog=EXIT_HELP)
@click.option("--json", "as_json", is_flag=True, help="Print the raw status document.")
@connection_options
def status(as_json: bool, address: str | None, timeout: float) -> None:
    """Show the daemon's workers, queue, uptime and connected clients."""
    address = address or default_address()
    with daemon_errors(address, timeout), open_client(address, timeout) as client:
        doc = client.status()
    doc.pop("req", None)  # the reply's correlation id, not part of the document
    if as_json:
        click.echo(json.dumps(doc, indent=2, sort_keys=True))
    else:
        click.echo(format_status(doc))


@click.command(epilog=EXIT_HELP)
@click.argument("client_name", metavar="CLIENT", required=False)
@click.option("--all", "everyone", is_flag=True, help="Cancel every client's work.")
@click.option("--json", "as_json", is_flag=True, help="Print the daemon's raw reply.")
@connection_options
def cancel(
    client_name: str | None, everyone: bool, as_json: bool, address: str | None, timeout: float
) -> None:
    """Cancel a connected client's work: CLIENT is its name, pid or id (see `status`).

    Local users may cancel anyone's work; over CURVE, only that of clients with the
    same key.
    """
    if (client_name is None) == (not everyone):
        raise click.UsageError("give one CLIENT (a name, pid or id from `status`) or --all")
    address = address or default_address()
    with daemon_errors(address, timeout), open_client(address, timeout) as client:
        try:
            reply = client.cancel_client(None if everyone else client_name)
        except errors.Forbidden as exc:
            fail(f"not allowed: {exc.message}", EXIT_FAILED)
    reply.pop("req", None)
    if as_json:
        click.echo(json.dumps(reply, indent=2, sort_keys=True))
        return
    names = ", ".join(str(n) for n in reply.get("clients") or []) or "no client"
    n = int(reply.get("cancelled") or 0)
    click.echo(f"cancelled {n} item{'s' if n != 1 else ''} of {names}")


def format_status(doc: dict[str, Any]) -> str:
    """The status document as a table of workers, a line of totals, then the clients."""
    workers = doc.get("workers") or []
    columns: tuple[tuple[str, str], ...] = STATUS_COLUMNS
    if any(w.get("node") not in (None, "local") for w in workers):  # a cluster (Ray)
        columns = (*STATUS_COLUMNS[:3], ("node", "node"), ("host", "host"), *STATUS_COLUMNS[3:])
    if any(w.get("counters") for w in workers):
        columns = (*columns, *PREFIX_COLUMNS)
        workers = [{**w, **(w.get("counters") or {})} for w in workers]
    lines = _table(columns, workers)
    facts = [
        f"engine {doc.get('engine', '-')}",
        f"model {doc.get('model', '-')}",
        f"queued {doc.get('queued', 0)}",
        f"inflight {doc.get('inflight', 0)}",
        f"uptime {_duration(doc.get('uptime_s'))}",
    ]
    out = [*lines, "", "  ".join(facts)]
    clients = doc.get("clients")
    if clients:
        out += ["", *_table(CLIENT_COLUMNS, clients)]
    return "\n".join(out)


def _table(columns: tuple[tuple[str, str], ...], rows: list[dict[str, Any]]) -> list[str]:
    cells = [[_cell(key, row.get(key)) for _, key in columns] for row in rows]
    header = [title for title, _ in columns]
    widths = [max(len(r[i]) for r in [header, *cells]) for i in range(len(header))]
    return [_row(row, widths) for row in [header, *cells]]


def _row(cells: list[str], widths: list[int]) -> str:
    return "  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()


def _cell(key: str, value: Any) -> str:
    if value is None:
        return "-"
    if key == "devices":
        if isinstance(value, list):
            return ",".join(str(d) for d in value) or "cpu"  # a slot without GPUs
        return str(value)
    if key == "tokens_per_s":
        return f"{float(value):.1f}"
    if key in ("load_s", "idle_s"):
        return f"{float(value):.1f}s"
    if key == "id":
        return str(value)[:CLIENT_ID_CHARS]
    if key == "node":
        return str(value)[:12]  # Ray's node ids: 56 hex digits, unique well before 12
    return str(value)


def _duration(seconds: Any) -> str:
    if not isinstance(seconds, (int, float)):
        return "-"
    total = int(seconds)
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s"
