"""``exgen-client``: a thin command line over :class:`exgen.client.Client`.

It builds a client, calls it, prints, and maps errors to exit codes (EXIT_HELP).
A run that is stopped (Ctrl-C, SIGTERM, SIGHUP, SIGPIPE) or cannot write its output
(a full disk, a closed pipe) cancels its unfinished work at the daemon before it
exits, so nothing runs for nobody; ``submit --resume`` completes the file later.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import IO, Any, NoReturn, TypeVar

import click
from tqdm import tqdm

from exgen.client import batchfile as B
from exgen.client import errors
from exgen.client import protocol as P
from exgen.client.batch_cli import batch as batch_group  # issue 13: the HTTP Batch API
from exgen.client.client import DEFAULT_CONNECT_TIMEOUT_S, Client, Result, default_address
from exgen.client.exits import (
    EXIT_CONNECT,
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_OUTPUT,
    EXIT_USAGE,
    fail,
    warn,
)
from exgen.client.keys import CurveKeys

logger = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP, signal.SIGPIPE)  # exit 128 + the signal
SUMMARY_DETAILS = 3  # malformed lines / failures named in the summary line

EXIT_HELP = """\b
Exit status:
  0    everything succeeded
  1    an item failed, a line was malformed, or the daemon refused the request
  2    usage error (bad option or value, an output file in the way or unwritable)
  3    the daemon could not be reached, or went away mid-run (submit: rerun with --resume)
  4    an output file could not be written (disk full?); unfinished work was cancelled
  130  interrupted (Ctrl-C); 129, 141, 143: stopped by SIGHUP, SIGPIPE, SIGTERM
       (unfinished work was cancelled; submit: rerun with --resume)"""

F = TypeVar("F", bound=Callable[..., Any])


class Stopped(BaseException):
    """A signal that ends the run (SIGTERM, SIGHUP, SIGPIPE); like KeyboardInterrupt,
    it unwinds through the client's iterators, which cancel their work."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@contextlib.contextmanager
def stopped_by_signals() -> Iterator[None]:
    """Turn STOP_SIGNALS into Stopped while the body runs (main thread only)."""

    def stop(signum: int, frame: FrameType | None) -> None:
        raise Stopped(signum)

    try:
        previous = {s: signal.signal(s, stop) for s in STOP_SIGNALS}
    except ValueError:  # not the main thread: leave the handlers alone
        yield
        return
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


# --- shared options --------------------------------------------------------------


def connection_options(func: F) -> F:
    func = click.option(
        "--client-key",
        type=click.Path(dir_okay=False, path_type=Path),
        expose_value=False,
        callback=_remember,
        help="This client's secret key file, for a daemon that requires CURVE "
        "(default: $EXGEN_CLIENT_KEY; see `exgen keygen`).",
    )(func)
    func = click.option(
        "--server-key",
        type=click.Path(dir_okay=False, path_type=Path),
        expose_value=False,
        callback=_remember,
        help="The daemon's public key file (default: $EXGEN_SERVER_KEY).",
    )(func)
    func = click.option(
        "--connect-timeout",
        type=click.FloatRange(min=0, min_open=True),
        default=DEFAULT_CONNECT_TIMEOUT_S,
        show_default=True,
        expose_value=False,
        callback=_remember,
        help="Seconds a connection may take to be made (a TCP address that never answers).",
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


def _remember(ctx: click.Context, param: click.Parameter, value: Any) -> None:
    ctx.meta[f"exgen.{param.name}"] = value


def command_name() -> str:
    """This run as the daemon's status shows it: `exgen-client ARGS...`."""
    return " ".join(["exgen-client", *sys.argv[1:]])


def open_client(address: str, timeout: float) -> Client:
    """A Client with the options' CURVE keys (else the environment's) and connect timeout."""
    meta = click.get_current_context().meta
    server_key, client_key = meta.get("exgen.server_key"), meta.get("exgen.client_key")
    connect_timeout = meta.get("exgen.connect_timeout", DEFAULT_CONNECT_TIMEOUT_S)
    curve = None
    try:
        if server_key is not None or client_key is not None:
            if server_key is None or client_key is None:
                raise click.UsageError("--server-key and --client-key go together")
            curve = CurveKeys.from_files(server_key, client_key)
        return Client(
            address,
            timeout=timeout,
            connect_timeout=connect_timeout,
            curve=curve,
            name=command_name(),
        )
    except errors.BadKeyFile as exc:
        fail(str(exc), EXIT_USAGE)
    except errors.ConnectionFailed as exc:  # a malformed address
        fail(str(exc), EXIT_USAGE)


def sampling_options(default_tokens: str | None = None) -> Callable[[F], F]:
    """Sampling params; each becomes a default that a batch line's own value overrides."""
    tokens_help = default_tokens or f"Default {P.DEFAULT_PARAMS['max_new_tokens']}."

    def add(func: F) -> F:
        options = [
            click.option(
                "--max-new-tokens", "--max-tokens", "max_new_tokens", type=int, help=tokens_help
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

    return add


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


START_HINT = (
    "Is it running? Start one with `exgen serve`, or point --connect "
    "(or $EXGEN_ADDRESS) at a running daemon."
)


@contextlib.contextmanager
def daemon_errors(address: str, timeout: float) -> Iterator[None]:
    """Map the library's errors to a message and an exit code."""
    try:
        yield
    except errors.ConnectTimeout as exc:
        fail(f"{exc}.\n{START_HINT}", EXIT_CONNECT)
    except errors.Timeout:
        fail(
            f"could not connect to the exgen daemon at {address}: no answer within "
            f"{timeout:g}s.\n{START_HINT}",
            EXIT_CONNECT,
        )
    except errors.UnsafeSocket as exc:
        fail(str(exc), EXIT_CONNECT)
    except errors.ConnectionFailed as exc:
        hint = "" if "permission denied" in str(exc) else f"\n{START_HINT}"
        fail(f"could not connect to the exgen daemon at {address}: {exc}{hint}", EXIT_CONNECT)
    except errors.ProtocolMismatch as exc:
        fail(f"the daemon at {address} speaks another protocol: {exc}", EXIT_FAILED)
    except errors.RequestFailed as exc:
        fail(f"the daemon refused the request: {exc}", EXIT_FAILED)


@click.group(context_settings={"help_option_names": ["-h", "--help"]}, epilog=EXIT_HELP)
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

    @property
    def seen(self) -> int:
        return self.done + self.failed + self.skipped + len(self.malformed)

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


@dataclass(slots=True)
class LineFailure(Result):
    """A malformed line, handed through the client in its place (never sent), so an
    input-ordered output keeps it where it was."""

    entry: B.LineError | None = None


@dataclass
class SubmitOptions:
    """What `submit` was asked to do, checked."""

    prompts: str
    output: Path | None
    errors_file: Path | None
    resume: bool
    ordered: bool
    request_timeout: float | None
    defaults: dict[str, Any]
    show_bar: bool


@cli.command(epilog=EXIT_HELP)
@click.argument("prompts", type=click.Path(dir_okay=False, allow_dash=True, path_type=str))
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False, allow_dash=True, path_type=Path),
    help="Results file (default: stdout; - is stdout too).",
)
@click.option(
    "--errors",
    "errors_file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Write failed and malformed lines here instead of to the results (OpenAI's "
    "error-file shape for OpenAI lines). Rewritten on every run.",
)
@click.option("--resume", is_flag=True, help="Skip ids already done in --output; retry failures.")
@click.option("--overwrite", is_flag=True, help="Replace existing --output / --errors files.")
@click.option(
    "--output-order",
    type=click.Choice(["completion", "input"]),
    default="completion",
    show_default=True,
    help="completion: each result as it finishes; input: in the order of the input lines "
    "(memory stays bounded: at most --window results wait for an earlier one).",
)
@click.option(
    "--request-timeout",
    type=click.FloatRange(min=0, min_open=True),
    metavar="S",
    help="Seconds each line may take from acceptance to its result before it fails with "
    "`timeout` (a line's own timeout_s wins). Default: no deadline.",
)
@click.option("--window", type=click.IntRange(min=1), default=4096, show_default=True,
              help="Items outstanding at once.")  # fmt: skip
@click.option(
    "--progress/--no-progress",
    default=None,
    help="Progress bar on stderr (default: only when stderr is a terminal).",
)
@sampling_options()
@connection_options
def submit(
    prompts: str,
    output: Path | None,
    errors_file: Path | None,
    resume: bool,
    overwrite: bool,
    output_order: str,
    request_timeout: float | None,
    window: int,
    progress: bool | None,
    address: str | None,
    timeout: float,
    **sampling: Any,
) -> None:
    """Run a .jsonl file of prompts (- for stdin); write one result a line.

    Lines: {"id"?, "prompt", params..., "timeout_s"?}, {"id"?, "messages", params...} or
    OpenAI Batch API lines {"custom_id", "method", "url", "body"} (answered in OpenAI's
    batch output shape, naming the model the daemon serves). A line's own params
    override the options given here.
    """
    if output is not None and str(output) == "-":
        output = None
    opts = SubmitOptions(
        prompts=prompts,
        output=output,
        errors_file=errors_file,
        resume=resume,
        ordered=output_order == "input",
        request_timeout=request_timeout,
        defaults=sampling_params(sampling),
        show_bar=sys.stderr.isatty() if progress is None else progress,
    )
    _check_files(opts, overwrite)
    address = address or default_address()
    with daemon_errors(address, timeout), open_client(address, timeout) as client:
        client.window = window
        # Ask first: an unreachable daemon fails fast, before the output is touched.
        model = str(client.status().get("model") or B.DEFAULT_MODEL_NAME)
        done = B.prepare_resume(output).done if resume and output else set()
        total = _total(prompts, done) if opts.show_bar else None
        with _open_outputs(opts) as (out, errs), _open_input(prompts) as source:
            writer = B.ResultWriter(out, errors=errs, default_model=model)
            tally = _run(client, B.read_batch(source), done, writer, opts, total)
    if tally.seen == 0:
        warn(f"{prompts} holds no prompts (an empty file?); nothing was sent")
    click.echo(tally.summary(), err=True)
    sys.exit(EXIT_OK if tally.all_ok else EXIT_FAILED)


def _check_files(opts: SubmitOptions, overwrite: bool) -> None:
    """Every file problem a usage error now, before any work starts."""
    if opts.resume and opts.output is None:
        raise click.UsageError("--resume needs -o/--output (the file to continue)")
    if opts.resume and overwrite:
        raise click.UsageError("--resume and --overwrite contradict each other")
    prompts = opts.prompts
    if prompts != "-" and (not Path(prompts).exists() or Path(prompts).is_dir()):
        raise click.BadParameter(f"{prompts!r} is not a file", param_hint="PROMPTS")
    if opts.output and opts.errors_file and opts.output.resolve() == opts.errors_file.resolve():
        raise click.UsageError("--errors must be another file than -o/--output")
    for path, option in ((opts.output, "-o/--output"), (opts.errors_file, "--errors")):
        if path is not None:
            _check_writable(path, option, may_exist=opts.resume or overwrite)


def _check_writable(path: Path, option: str, may_exist: bool) -> None:
    exists = path.exists() and path.stat().st_size > 0
    if exists and not may_exist:
        # Hours of results are one mistyped command away from being lost otherwise.
        raise click.UsageError(
            f"{path} already exists; pass --resume to continue it or --overwrite to replace it"
        )
    directory = path.parent
    if not directory.is_dir():
        raise click.BadParameter(f"directory {str(directory)!r} does not exist", param_hint=option)
    if path.is_dir():
        raise click.BadParameter(f"{str(path)!r} is a directory", param_hint=option)
    writable = os.access(path, os.W_OK) if path.exists() else os.access(directory, os.W_OK)
    if not writable:
        raise click.BadParameter(f"{str(path)!r} is not writable", param_hint=option)


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
def _open_outputs(opts: SubmitOptions) -> Iterator[tuple[IO[str], IO[str] | None]]:
    with contextlib.ExitStack() as stack:
        out: IO[str] = sys.stdout
        if opts.output is not None:
            mode = "a" if opts.resume else "w"
            out = stack.enter_context(_quiet_close(opts.output.open(mode, encoding="utf-8")))
        errs = None
        if opts.errors_file is not None:
            errs = stack.enter_context(_quiet_close(opts.errors_file.open("w", encoding="utf-8")))
        yield out, errs


@contextlib.contextmanager
def _quiet_close(f: IO[str]) -> Iterator[IO[str]]:
    """A file whose close may fail again (the disk is still full): already reported."""
    try:
        yield f
    finally:
        with contextlib.suppress(OSError):
            f.close()


def _run(
    client: Client,
    entries: Iterator[B.Entry],
    done: set[str],
    writer: B.ResultWriter,
    opts: SubmitOptions,
    total: int | None,
) -> Tally:
    """Send every good line, write every answer as it comes; return the counts."""
    tally = Tally()
    pending: dict[str, B.BatchLine] = {}  # sent, not answered: bounded by the window
    bar = tqdm(
        total=total, unit="prompt", disable=not opts.show_bar, file=sys.stderr, smoothing=0.1
    )

    def items() -> Iterator[dict[str, Any] | Result]:
        # Pulled lazily by the client, in this thread, as its send window opens.
        for entry in entries:
            if isinstance(entry, B.LineError):  # always answered again: resume drops them
                yield LineFailure(entry.id, "", P.FINISH_ERROR, entry=entry)
            elif entry.id in done:
                tally.skipped += 1
            else:
                pending[entry.id] = entry
                yield entry.to_item()

    results = client.iter_results(
        items(), ordered=opts.ordered, timeout_s=opts.request_timeout, **opts.defaults
    )
    try:
        with stopped_by_signals():
            for result in results:
                _write(result, pending, writer, tally)
                bar.update(1)
                bar.set_postfix_str(f"{tally.tokens_per_s():.0f} tok/s", refresh=False)
    except (KeyboardInterrupt, Stopped) as exc:
        _stopped(results, tally, bar, exc)
    except B.WriteFailed as exc:
        _write_failed(results, tally, bar, exc)
    except errors.ConnectionFailed as exc:
        if not (tally.done or tally.failed):
            raise  # never heard back at all: reported as could-not-connect
        _lost(client, tally, bar, exc)
    finally:
        results.close()
    bar.close()
    return tally


def _write(
    result: Result, pending: dict[str, B.BatchLine], writer: B.ResultWriter, tally: Tally
) -> None:
    if isinstance(result, LineFailure):
        assert result.entry is not None
        writer.write_line_error(result.entry)
        tally.malformed.append(result.entry)
        return
    line = pending.pop(result.id, None)
    if line is None:
        logger.warning("result for an id never sent: %r", result.id)
        return
    writer.write_result(line, result)
    tally.add(result)


def _stopped(
    results: Generator[Result, None, None], tally: Tally, bar: Any, exc: BaseException
) -> NoReturn:
    results.close()  # cancels what is still out at the daemon
    bar.close()
    if isinstance(exc, Stopped):
        if exc.signum == signal.SIGPIPE:
            sys.exit(128 + exc.signum)  # the reader went away: nothing more to say
        _summary(tally)
        fail(f"stopped by {exc}; unfinished work cancelled; rerun with --resume", 128 + exc.signum)
    _summary(tally)
    fail(
        "interrupted; unfinished work cancelled; rerun with --resume to continue", EXIT_INTERRUPTED
    )


def _write_failed(
    results: Generator[Result, None, None], tally: Tally, bar: Any, exc: B.WriteFailed
) -> NoReturn:
    results.close()
    bar.close()
    if isinstance(exc.cause, BrokenPipeError):
        sys.exit(128 + signal.SIGPIPE)  # `exgen-client submit ... | head`: the reader is gone
    _summary(tally)
    fail(f"{exc}; unfinished work cancelled; make room and rerun with --resume", EXIT_OUTPUT)


def _lost(client: Client, tally: Tally, bar: Any, exc: errors.ConnectionFailed) -> NoReturn:
    bar.close()
    _summary(tally)
    fail(f"lost the daemon at {client.address} mid-run ({exc}); rerun with --resume", EXIT_CONNECT)


def _summary(tally: Tally) -> None:
    with contextlib.suppress(OSError):
        click.echo(tally.summary(), err=True)


# --- generate --------------------------------------------------------------------


@cli.command(epilog=EXIT_HELP)
@click.argument("text")
@click.option("--stream", is_flag=True, help="Print the text as it is generated.")
@click.option("--chat", is_flag=True, help="Send TEXT as a user message (chat template).")
@click.option("--system", metavar="TEXT", help="A system message (implies --chat).")
@click.option(
    "--request-timeout",
    type=click.FloatRange(min=0, min_open=True),
    metavar="S",
    help="Seconds the prompt may take from acceptance to its result.",
)
@sampling_options()
@connection_options
def generate(
    text: str,
    stream: bool,
    chat: bool,
    system: str | None,
    request_timeout: float | None,
    address: str | None,
    timeout: float,
    **sampling: Any,
) -> None:
    """Generate from one prompt TEXT (- reads it from stdin, less one final newline)."""
    params = sampling_params(sampling)
    if text == "-":
        text = _one_final_newline_less(sys.stdin.read())
    prompt: str | list[dict[str, str]] = text
    if chat or system is not None:
        prompt = [{"role": "system", "content": system}] if system is not None else []
        prompt.append({"role": "user", "content": text})
    address = address or default_address()
    with daemon_errors(address, timeout), open_client(address, timeout) as client:
        try:
            with stopped_by_signals():
                _generate(client, prompt, stream, request_timeout, params)
        except (KeyboardInterrupt, Stopped) as exc:
            code = exc.signum if isinstance(exc, Stopped) else signal.SIGINT
            sys.exit(128 + code)  # the stream's iterator has cancelled the prompt
        except BrokenPipeError:
            sys.exit(128 + signal.SIGPIPE)
        except OSError as exc:  # stdout on a full disk: the stream's prompt is cancelled
            fail(f"cannot write the output: {exc.strerror or exc}", EXIT_OUTPUT)


def _one_final_newline_less(text: str) -> str:
    """`echo text | exgen-client generate -`: the newline echo adds is not the prompt's."""
    if text.endswith("\r\n"):
        return text[:-2]
    return text.removesuffix("\n")


def _generate(
    client: Client,
    prompt: str | list[dict[str, str]],
    stream: bool,
    timeout_s: float | None,
    params: dict[str, Any],
) -> None:
    if stream:
        for chunk in client.stream(prompt, timeout_s=timeout_s, **params):
            click.echo(chunk, nl=False)
            sys.stdout.flush()
        click.echo()
        return
    item = {"messages": prompt} if isinstance(prompt, list) else {"prompt": prompt}
    [result] = client.generate([item], timeout_s=timeout_s, **params)
    result.raise_for_error()
    click.echo(result.text)


# --- status and cancel -------------------------------------------------------------

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


@cli.command(epilog=EXIT_HELP)
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


@cli.command(epilog=EXIT_HELP)
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


# --- bench -----------------------------------------------------------------------

BENCH_WORDS = "the quick brown fox jumps over the lazy dog near a quiet river at dawn".split()
BENCH_TOKENS = 64  # new tokens per generated prompt


@cli.command(epilog=EXIT_HELP)
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
@sampling_options(
    f"Default {BENCH_TOKENS} for generated prompts; a PROMPTS file's lines keep their own "
    f"(else {P.DEFAULT_PARAMS['max_new_tokens']})."
)
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
    written) or COUNT generated prompts. Latency is per prompt, from its send to its
    result.
    """
    defaults = sampling_params(sampling)
    items = _bench_items(prompts, count, prompt_words)
    if prompts is None:
        defaults.setdefault("max_new_tokens", BENCH_TOKENS)
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
