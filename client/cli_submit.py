"""``exgen-client submit``: a .jsonl file of prompts in, one result a line out."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import time
from collections.abc import Generator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, NoReturn

import click
from tqdm import tqdm

from exgen.client import batchfile as B
from exgen.client import errors
from exgen.client import protocol as P
from exgen.client.cli_common import (
    Stopped,
    connection_options,
    daemon_errors,
    open_client,
    sampling_options,
    sampling_params,
    stopped_by_signals,
)
from exgen.client.client import Client, Result, default_address
from exgen.client.exits import (
    EXIT_CONNECT,
    EXIT_FAILED,
    EXIT_HELP,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_OUTPUT,
    fail,
    reader_gone,
    warn,
)

logger = logging.getLogger(__name__)

SUMMARY_DETAILS = 3  # malformed lines / failures named in the summary line


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


@click.command(epilog=EXIT_HELP)
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
            reader_gone()  # nothing more to say
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
        reader_gone()  # `exgen-client submit ... | head`
    _summary(tally)
    fail(f"{exc}; unfinished work cancelled; make room and rerun with --resume", EXIT_OUTPUT)


def _lost(client: Client, tally: Tally, bar: Any, exc: errors.ConnectionFailed) -> NoReturn:
    bar.close()
    _summary(tally)
    fail(f"lost the daemon at {client.address} mid-run ({exc}); rerun with --resume", EXIT_CONNECT)


def _summary(tally: Tally) -> None:
    with contextlib.suppress(OSError):
        click.echo(tally.summary(), err=True)
