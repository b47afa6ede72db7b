"""``exgen-client``: a thin command line over :class:`exgen.client.Client`.

It builds a client, calls it, prints, and maps errors to exit codes:

    0  everything succeeded
    1  an item failed, a line was malformed, or the daemon refused the request
    2  usage error (bad option, bad value, output file in the way)
    3  the daemon could not be reached (or went away mid-run)
  130  interrupted (Ctrl-C); rerun ``submit`` with ``--resume`` to continue
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, NoReturn, TypeVar

import click
from tqdm import tqdm

from exgen.client import batchfile as B
from exgen.client import errors
from exgen.client import protocol as P
from exgen.client.batch_cli import batch as batch_group  # issue 13: the HTTP Batch API
from exgen.client.client import Client, Result, default_address
from exgen.client.keys import CurveKeys

logger = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_CONNECT = 3
EXIT_INTERRUPTED = 130
SUMMARY_DETAILS = 3  # malformed lines / failures named in the summary line

F = TypeVar("F", bound=Callable[..., Any])


# --- shared options --------------------------------------------------------------


def connection_options(func: F) -> F:
    func = click.option(
        "--client-key",
        type=click.Path(dir_okay=False, path_type=Path),
        expose_value=False,
        callback=_remember_key,
        help="This client's secret key file, for a daemon that requires CURVE "
        "(default: $EXGEN_CLIENT_KEY; see `exgen keygen`).",
    )(func)
    func = click.option(
        "--server-key",
        type=click.Path(dir_okay=False, path_type=Path),
        expose_value=False,
        callback=_remember_key,
        help="The daemon's public key file (default: $EXGEN_SERVER_KEY).",
    )(func)
    func = click.option(
        "--timeout",
        type=click.FloatRange(min=0, min_open=True),
        default=30.0,
        show_default=True,
        help="Seconds the daemon may stay silent before giving up.",
    )(func)
    return click.option(
        "--connect",
        "address",
        metavar="ADDR",
        default=None,
        help="Daemon address (default: $EXGEN_ADDRESS, else the local socket).",
    )(func)


def _remember_key(ctx: click.Context, param: click.Parameter, value: Path | None) -> None:
    ctx.meta[f"exgen.{param.name}"] = value


def open_client(address: str, timeout: float) -> Client:
    """A Client with the CURVE keys given as options (else the environment's)."""
    meta = click.get_current_context().meta
    server_key, client_key = meta.get("exgen.server_key"), meta.get("exgen.client_key")
    try:
        if server_key is None and client_key is None:
            return Client(address, timeout=timeout)
        if server_key is None or client_key is None:
            raise click.UsageError("--server-key and --client-key go together")
        curve = CurveKeys.from_files(server_key, client_key)
    except errors.BadKeyFile as exc:
        fail(str(exc), EXIT_USAGE)
    return Client(address, timeout=timeout, curve=curve)


def sampling_options(func: F) -> F:
    """Sampling params; each becomes a default that a batch line's own value overrides."""
    options = [
        click.option(
            "--max-new-tokens",
            "--max-tokens",
            "max_new_tokens",
            type=int,
            help=f"Default {P.DEFAULT_PARAMS['max_new_tokens']}.",
        ),
        click.option("--temperature", type=float, help="0 = greedy (the default)."),
        click.option("--top-p", type=float),
        click.option("--top-k", type=int),
        click.option("--min-p", type=float),
        click.option("--repetition-penalty", type=float),
        click.option("--seed", type=int),
        click.option("--stop", multiple=True, metavar="S", help="Stop string (repeatable)."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def sampling_params(values: dict[str, Any]) -> dict[str, Any]:
    """The given sampling options, checked now so a bad value is a usage error."""
    raw = {name: values[name] for name in P.PARAM_NAMES if values.get(name) not in (None, ())}
    if "stop" in raw:
        raw["stop"] = list(raw["stop"])
    try:
        return P.validate_params(raw, "params")
    except P.ValidationError as exc:
        option = "--" + exc.field.removeprefix("params.").split("[")[0].replace("_", "-")
        raise click.BadParameter(exc.message, param_hint=option) from None


def fail(message: str, code: int) -> NoReturn:
    click.echo(f"exgen-client: {message}", err=True)
    sys.exit(code)


@contextlib.contextmanager
def daemon_errors(address: str, timeout: float) -> Iterator[None]:
    """Map the library's errors to a message and an exit code."""
    try:
        yield
    except errors.Timeout:
        fail(
            f"could not connect to the exgen daemon at {address}: no answer within {timeout:g}s.\n"
            "Is it running? Start one with `exgen serve`, or point --connect "
            "(or $EXGEN_ADDRESS) at a running daemon.",
            EXIT_CONNECT,
        )
    except errors.ConnectionFailed as exc:
        fail(f"could not connect to the exgen daemon at {address}: {exc}", EXIT_CONNECT)
    except errors.ProtocolMismatch as exc:
        fail(f"the daemon at {address} speaks another protocol: {exc}", EXIT_FAILED)
    except errors.RequestFailed as exc:
        fail(f"the daemon refused the request: {exc}", EXIT_FAILED)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", count=True, help="More log output on stderr (-vv: debug).")
@click.version_option(package_name="exgen", prog_name="exgen-client")
def cli(verbose: int) -> None:
    """Send prompts to an exgen daemon (start one with `exgen serve`)."""
    level = logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(level=level, format="%(asctime)s %(name)s %(levelname)s %(message)s")


def main() -> None:
    cli(prog_name="exgen-client")


cli.add_command(batch_group)  # issue 13


# --- submit ----------------------------------------------------------------------


@dataclass
class Tally:
    """Counts for the progress bar and the summary line."""

    done: int = 0
    failed: int = 0
    skipped: int = 0
    tokens: int = 0
    malformed: list[B.LineError] = field(default_factory=list)
    failures: list[Result] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)

    def add(self, result: Result) -> None:
        self.tokens += result.completion_tokens
        if result.ok:
            self.done += 1
        else:
            self.failed += 1
            if len(self.failures) < SUMMARY_DETAILS:
                self.failures.append(result)

    @property
    def all_ok(self) -> bool:
        return not self.failed and not self.malformed

    def tokens_per_s(self) -> float:
        return self.tokens / max(time.monotonic() - self.started, 1e-9)

    def summary(self) -> str:
        parts = [f"{self.done} done", f"{self.failed} failed"]
        if self.failures:
            named = [f"{r.id}: {_describe(r.error)}" for r in self.failures]
            parts[-1] += _details(named, self.failed)
        if self.malformed:
            n = len(self.malformed)
            named = [str(e) for e in self.malformed[:SUMMARY_DETAILS]]
            parts.append(f"{n} malformed line{'s' if n != 1 else ''}{_details(named, n)}")
        if self.skipped:
            parts.append(f"{self.skipped} skipped (already done)")
        elapsed = time.monotonic() - self.started
        return ", ".join(parts) + f" in {elapsed:.1f}s ({self.tokens_per_s():.0f} tokens/s)"


def _describe(error: errors.RequestFailed | None) -> str:
    return "" if error is None else f"{error.code}: {error.message}"


def _details(named: list[str], total: int) -> str:
    more = f"; and {total - len(named)} more" if total > len(named) else ""
    return f" ({'; '.join(_shorten(s) for s in named)}{more})"


def _shorten(text: str, limit: int = 160) -> str:
    text = text.replace("\n", " ")
    return text if len(text) <= limit else text[: limit - 1] + "…"


@cli.command()
@click.argument("prompts", type=click.Path(dir_okay=False, allow_dash=True, path_type=str))
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False, writable=True, allow_dash=True, path_type=Path),
    help="Results file (default, or -: stdout).",
)
@click.option("--resume", is_flag=True, help="Skip ids already done in --output; retry failures.")
@click.option("--overwrite", is_flag=True, help="Replace an existing --output file.")
@click.option(
    "--progress/--no-progress",
    default=None,
    help="Progress bar on stderr (default: only when stderr is a terminal).",
)
@sampling_options
@connection_options
def submit(
    prompts: str,
    output: Path | None,
    resume: bool,
    overwrite: bool,
    progress: bool | None,
    address: str | None,
    timeout: float,
    **sampling: Any,
) -> None:
    """Run a .jsonl file of prompts (- for stdin); write one result a line.

    Lines: {"id"?, "prompt", params...}, {"id"?, "messages", params...} or OpenAI Batch
    API lines {"custom_id", "method", "url", "body"} (answered in OpenAI's batch output
    shape). A line's own params override the options given here.
    """
    defaults = sampling_params(sampling)
    if output is not None and str(output) == "-":
        output = None
    _check_output_args(output, resume, overwrite)
    if prompts != "-" and (not Path(prompts).exists() or Path(prompts).is_dir()):
        raise click.BadParameter(f"{prompts!r} is not a file", param_hint="PROMPTS")
    address = address or default_address()
    show_bar = sys.stderr.isatty() if progress is None else progress
    with daemon_errors(address, timeout), open_client(address, timeout) as client:
        # Ask first: an unreachable daemon fails fast, before the output is touched.
        model = str(client.status().get("model") or B.DEFAULT_MODEL_NAME)
        done = B.prepare_resume(output).done if resume and output else set()
        total = _total(prompts, done) if show_bar else None
        with _open_output(output, resume) as out, _open_input(prompts) as source:
            writer = B.ResultWriter(out, default_model=model)
            tally = _run(client, B.read_batch(source), done, writer, defaults, total, show_bar)
    click.echo(tally.summary(), err=True)
    sys.exit(EXIT_OK if tally.all_ok else EXIT_FAILED)


def _check_output_args(output: Path | None, resume: bool, overwrite: bool) -> None:
    if resume and output is None:
        raise click.UsageError("--resume needs -o/--output (the file to continue)")
    if resume and overwrite:
        raise click.UsageError("--resume and --overwrite contradict each other")
    exists = output is not None and output.exists() and output.stat().st_size > 0
    if exists and not (resume or overwrite):
        # Hours of results are one mistyped command away from being lost otherwise.
        raise click.UsageError(
            f"{output} already exists; pass --resume to continue it or --overwrite to replace it"
        )


def _total(prompts: str, done: set[str]) -> int | None:
    if prompts == "-" or not Path(prompts).is_file():
        return None  # stdin or a pipe cannot be read twice
    return max(B.count_lines(prompts) - len(done), 0)


@contextlib.contextmanager
def _open_input(prompts: str) -> Iterator[IO[bytes]]:
    if prompts == "-":
        yield sys.stdin.buffer
        return
    with open(prompts, "rb") as f:
        yield f


@contextlib.contextmanager
def _open_output(output: Path | None, resume: bool) -> Iterator[IO[str]]:
    if output is None:
        yield sys.stdout
        return
    with open(output, "a" if resume else "w", encoding="utf-8") as f:
        yield f


def _run(
    client: Client,
    entries: Iterator[B.Entry],
    done: set[str],
    writer: B.ResultWriter,
    defaults: dict[str, Any],
    total: int | None,
    show_bar: bool,
) -> Tally:
    """Send every good line, write every answer as it comes; return the counts."""
    tally = Tally()
    pending: dict[str, B.BatchLine] = {}  # sent, not answered: bounded by the window
    bar = tqdm(total=total, unit="prompt", disable=not show_bar, file=sys.stderr, smoothing=0.1)

    def items() -> Iterator[dict[str, Any]]:
        # Pulled lazily by the client, in this thread, as its send window opens.
        for entry in entries:
            if entry.id in done:
                tally.skipped += 1
            elif isinstance(entry, B.LineError):
                writer.write_line_error(entry)
                tally.malformed.append(entry)
                bar.update(1)
            else:
                pending[entry.id] = entry
                yield entry.to_item()

    try:
        for result in client.iter_results(items(), **defaults):
            line = pending.pop(result.id, None)
            if line is None:
                logger.warning("result for an id never sent: %r", result.id)
                continue
            writer.write_result(line, result)
            tally.add(result)
            bar.update(1)
            bar.set_postfix_str(f"{tally.tokens_per_s():.0f} tok/s", refresh=False)
    except KeyboardInterrupt:
        _interrupted(client, pending, tally, bar)
    except errors.ConnectionFailed as exc:
        if not (tally.done or tally.failed):
            raise  # never heard back at all: reported as could-not-connect
        bar.close()
        click.echo(tally.summary(), err=True)
        fail(
            f"lost the daemon at {client.address} mid-run ({exc}); rerun with --resume",
            EXIT_CONNECT,
        )
    bar.close()
    return tally


def _interrupted(client: Client, pending: dict[str, B.BatchLine], tally: Tally, bar: Any) -> None:
    bar.close()
    with contextlib.suppress(errors.ExgenError):
        client.cancel(list(pending))  # don't leave the daemon working for nobody
    click.echo(tally.summary(), err=True)
    fail("interrupted; rerun with --resume to continue", EXIT_INTERRUPTED)


# --- generate --------------------------------------------------------------------


@cli.command()
@click.argument("text")
@click.option("--stream", is_flag=True, help="Print the text as it is generated.")
@click.option("--chat", is_flag=True, help="Send TEXT as a user message (chat template).")
@click.option("--system", metavar="TEXT", help="A system message (implies --chat).")
@sampling_options
@connection_options
def generate(
    text: str,
    stream: bool,
    chat: bool,
    system: str | None,
    address: str | None,
    timeout: float,
    **sampling: Any,
) -> None:
    """Generate from one prompt TEXT (- reads it from stdin) and print the result."""
    params = sampling_params(sampling)
    if text == "-":
        text = sys.stdin.read()
    prompt: str | list[dict[str, str]] = text
    if chat or system is not None:
        prompt = [{"role": "system", "content": system}] if system is not None else []
        prompt.append({"role": "user", "content": text})
    address = address or default_address()
    with daemon_errors(address, timeout), open_client(address, timeout) as client:
        if stream:
            for chunk in client.stream(prompt, **params):
                click.echo(chunk, nl=False)
                sys.stdout.flush()
            click.echo()
            return
        item = {"messages": prompt} if isinstance(prompt, list) else {"prompt": prompt}
        [result] = client.generate([item], **params)
        result.raise_for_error()
        click.echo(result.text)


# --- status ----------------------------------------------------------------------

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


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print the raw status document.")
@connection_options
def status(as_json: bool, address: str | None, timeout: float) -> None:
    """Show the daemon's workers, queue and uptime."""
    address = address or default_address()
    with daemon_errors(address, timeout), open_client(address, timeout) as client:
        doc = client.status()
    doc.pop("req", None)  # the reply's correlation id, not part of the document
    if as_json:
        click.echo(json.dumps(doc, indent=2, sort_keys=True))
    else:
        click.echo(format_status(doc))


def format_status(doc: dict[str, Any]) -> str:
    """The status document as a table, then one line of totals."""
    rows = [[_cell(key, w.get(key)) for _, key in STATUS_COLUMNS] for w in doc.get("workers", [])]
    header = [title for title, _ in STATUS_COLUMNS]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = [_row(row, widths) for row in [header, *rows]]
    facts = [
        f"engine {doc.get('engine', '-')}",
        f"model {doc.get('model', '-')}",
        f"queued {doc.get('queued', 0)}",
        f"inflight {doc.get('inflight', 0)}",
        f"uptime {_duration(doc.get('uptime_s'))}",
    ]
    return "\n".join([*lines, "", "  ".join(facts)])


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
    if key == "load_s":
        return f"{float(value):.1f}s"
    return str(value)


def _duration(seconds: Any) -> str:
    if not isinstance(seconds, (int, float)):
        return "-"
    total = int(seconds)
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s"


# --- bench -----------------------------------------------------------------------

BENCH_WORDS = "the quick brown fox jumps over the lazy dog near a quiet river at dawn".split()


@cli.command()
@click.argument(
    "prompts", required=False, type=click.Path(dir_okay=False, exists=True, path_type=Path)
)
@click.option("-n", "--count", type=click.IntRange(min=1), default=1000, show_default=True,
              help="Prompts to generate when no PROMPTS file is given.")  # fmt: skip
@click.option("--prompt-words", type=click.IntRange(min=1), default=16, show_default=True,
              help="Words per generated prompt.")  # fmt: skip
@click.option("--window", type=click.IntRange(min=1), default=4096, show_default=True,
              help="Items outstanding at once.")  # fmt: skip
@click.option("--json", "as_json", is_flag=True, help="Print the numbers as JSON.")
@sampling_options
@connection_options
def bench(
    prompts: Path | None,
    count: int,
    prompt_words: int,
    window: int,
    as_json: bool,
    address: str | None,
    timeout: float,
    **sampling: Any,
) -> None:
    """Measure a running daemon: tokens/s, prompts/s and latency percentiles.

    The workload is a PROMPTS .jsonl file (the lines submit takes; results are not
    written) or COUNT generated prompts (64 new tokens each unless --max-new-tokens).
    Latency is per prompt, from its send to its result.
    """
    defaults = sampling_params(sampling)
    items = _bench_items(prompts, count, prompt_words)
    if prompts is None:
        defaults.setdefault("max_new_tokens", 64)
    address = address or default_address()
    with daemon_errors(address, timeout), open_client(address, timeout) as client:
        client.window = window
        client.status()  # fail fast when nobody answers, before the clock starts
        started = time.monotonic()
        results = list(client.iter_results(items, **defaults))
        elapsed = time.monotonic() - started
    report = bench_report(results, elapsed)
    click.echo(json.dumps(report, indent=2) if as_json else format_bench(report))
    sys.exit(EXIT_OK if report["failed"] == 0 else EXIT_FAILED)


def _bench_items(prompts: Path | None, count: int, words: int) -> list[dict[str, Any]]:
    if prompts is None:
        return [
            {"id": f"bench-{i}", "prompt": " ".join(_bench_words(i, words))} for i in range(count)
        ]
    with open(prompts, "rb") as f:
        entries = list(B.read_batch(f))
    bad = [e for e in entries if isinstance(e, B.LineError)]
    if bad:
        raise click.BadParameter(
            f"{len(bad)} malformed line(s), first: {bad[0]}", param_hint="PROMPTS"
        )
    return [e.to_item() for e in entries if isinstance(e, B.BatchLine)]


def _bench_words(seed: int, words: int) -> list[str]:
    # Distinct prompts, so no layer can answer a repeat from a cache.
    return [BENCH_WORDS[(seed * 7 + j * 3) % len(BENCH_WORDS)] for j in range(words)] + [str(seed)]


def bench_report(results: list[Result], elapsed: float) -> dict[str, Any]:
    """The numbers of one bench run (pure, for tests)."""
    latencies = sorted(r.latency_s for r in results if r.ok)
    tokens = sum(r.completion_tokens for r in results)
    elapsed = max(elapsed, 1e-9)
    return {
        "prompts": len(results),
        "failed": sum(1 for r in results if not r.ok),
        "wall_s": round(elapsed, 3),
        "prompts_per_s": round(len(results) / elapsed, 1),
        "completion_tokens": tokens,
        "tokens_per_s": round(tokens / elapsed, 1),
        "latency_s": {
            name: round(_nearest_rank(latencies, q), 4)
            for name, q in (("p50", 50), ("p90", 90), ("p99", 99), ("max", 100))
        },
    }


def _nearest_rank(ordered: list[float], q: float) -> float:
    if not ordered:
        return 0.0
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


def format_bench(report: dict[str, Any]) -> str:
    lat = report["latency_s"]
    return "\n".join(
        [
            f"prompts    {report['prompts']} ({report['failed']} failed)"
            f" in {report['wall_s']:.2f}s",
            f"prompts/s  {report['prompts_per_s']:,.1f}",
            f"tokens/s   {report['tokens_per_s']:,.1f} ({report['completion_tokens']:,} tokens)",
            "latency    " + "  ".join(f"{k} {_ms(v)}" for k, v in lat.items()),
        ]
    )


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f}ms" if seconds < 1 else f"{seconds:.2f}s"


if __name__ == "__main__":
    main()
