"""``exgen-client batch …``: the OpenAI Batch API of exgen's HTTP gateway, from a shell.

    exgen-client batch create prompts.jsonl [--wait] [-o results.jsonl]
    exgen-client batch list
    exgen-client batch status ID [--wait] [--json]
    exgen-client batch download ID [-o results.jsonl] [--errors errors.jsonl]
    exgen-client batch cancel ID

Exit status as the rest of exgen-client: 0 ok, 1 the batch or the request failed,
2 usage error, 3 no gateway at the URL (or something else answering there), or the
connection to it broke mid-answer (a results file is then left as it was, never
written in part), 4 a results file could not be written, 141 standard output's
reader went away (`... | head`).
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import click
from tqdm import tqdm

from exgen.client.batch_api import (
    DEFAULT_URL,
    TERMINAL,
    ApiError,
    BatchApi,
    LinkBroken,
    Unreachable,
    endpoint_of,
)
from exgen.client.exits import (
    EXIT_CONNECT,
    EXIT_FAILED,
    EXIT_OUTPUT,
    EXIT_USAGE,
    fail,
    reader_gone,
)

POLL_S = 1.0
F = TypeVar("F", bound=Callable[..., Any])


def _api_options(func: F) -> F:
    func = click.option(
        "--api-key",
        envvar="EXGEN_API_KEY",
        help="The gateway's API key (default: $EXGEN_API_KEY).",
    )(func)
    return click.option(
        "--url",
        envvar="EXGEN_HTTP_URL",
        default=DEFAULT_URL,
        show_default=True,
        help="The HTTP gateway (`exgen serve --http`; $EXGEN_HTTP_URL).",
    )(func)


@contextlib.contextmanager
def _api_errors() -> Iterator[None]:
    try:
        yield
    except LinkBroken as exc:
        fail(str(exc), EXIT_CONNECT)
    except Unreachable as exc:
        fail(f"{exc}; is `exgen serve --http HOST:PORT` running?", EXIT_CONNECT)
    except ApiError as exc:
        fail(str(exc), EXIT_FAILED)
    except ValueError as exc:
        fail(str(exc), EXIT_USAGE)


@click.group("batch")
def batch() -> None:
    """Batches through the HTTP gateway's OpenAI Batch API (they survive restarts)."""


@batch.command("create")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--endpoint", help="Default: the url of the file's first line.")
@click.option(
    "--window",
    "completion_window",
    default="24h",
    show_default=True,
    help='The completion window ("24h", or e.g. "90m").',
)
@click.option("--wait", is_flag=True, help="Follow it with a progress bar until it ends.")
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False, path_type=Path),
    help="With --wait: download the results here.",
)
@_api_options
def create(
    file: Path,
    endpoint: str | None,
    completion_window: str,
    wait: bool,
    output: Path | None,
    url: str,
    api_key: str | None,
) -> None:
    """Upload FILE (OpenAI Batch lines) and start a batch; print its id."""
    with _api_errors():
        api = BatchApi(url, api_key)
        endpoint = endpoint or endpoint_of(file)
        uploaded = api.upload(file)
        created = api.create_batch(uploaded["id"], endpoint, completion_window)
        click.echo(created["id"])
        if wait:
            final = _follow(api, created["id"])
            if output is not None and final.get("output_file_id"):
                _download_to(api, final["output_file_id"], output)
            _exit_for(final)


@batch.command("list")
@click.option("--limit", type=click.IntRange(1, 100), default=20, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print the API's list object.")
@_api_options
def list_(limit: int, as_json: bool, url: str, api_key: str | None) -> None:
    """The latest batches, newest first."""
    with _api_errors():
        listed = BatchApi(url, api_key).list_batches(limit)
    if as_json:
        click.echo(json.dumps(listed, indent=2))
        return
    for doc in listed["data"]:
        click.echo(_summary(doc))


@batch.command("status")
@click.argument("batch_id")
@click.option("--wait", is_flag=True, help="Follow it with a progress bar until it ends.")
@click.option("--json", "as_json", is_flag=True, help="Print the Batch object.")
@_api_options
def status(batch_id: str, wait: bool, as_json: bool, url: str, api_key: str | None) -> None:
    """One batch: status and request counts."""
    with _api_errors():
        api = BatchApi(url, api_key)
        doc = _follow(api, batch_id) if wait else api.get_batch(batch_id)
    click.echo(json.dumps(doc, indent=2) if as_json else _summary(doc))


@batch.command("download")
@click.argument("batch_id")
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Where the results go (default: stdout).",
)
@click.option(
    "--errors",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Where the failed requests go (the batch's error file).",
)
@_api_options
def download(
    batch_id: str, output: Path | None, errors: Path | None, url: str, api_key: str | None
) -> None:
    """A batch's output file (and its error file)."""
    with _api_errors():
        api = BatchApi(url, api_key)
        doc = api.get_batch(batch_id)
        if doc["status"] not in TERMINAL:
            click.echo(
                f"{batch_id} is {doc['status']}: what is done so far is not listed until it ends",
                err=True,
            )
        if doc.get("output_file_id"):
            _download_to(api, doc["output_file_id"], output)
        if errors is not None and doc.get("error_file_id"):
            _download_to(api, doc["error_file_id"], errors)
    counts = doc.get("request_counts") or {}
    click.echo(f"{counts.get('completed', 0)} results, {counts.get('failed', 0)} errors", err=True)


@batch.command("cancel")
@click.argument("batch_id")
@_api_options
def cancel(batch_id: str, url: str, api_key: str | None) -> None:
    """Cancel a batch: work not started is dropped; results so far are kept."""
    with _api_errors():
        click.echo(_summary(BatchApi(url, api_key).cancel_batch(batch_id)))


def _follow(api: BatchApi, batch_id: str) -> dict[str, Any]:
    """Poll until the batch ends, with a progress bar on a terminal."""
    doc = api.get_batch(batch_id)
    bar = tqdm(unit="req", disable=not sys.stderr.isatty(), file=sys.stderr, smoothing=0.1)
    with bar:
        while True:
            counts = doc.get("request_counts") or {}
            bar.total = counts.get("total") or None
            bar.n = counts.get("completed", 0) + counts.get("failed", 0)
            bar.set_postfix_str(f"{doc['status']}, {counts.get('failed', 0)} failed")
            if doc["status"] in TERMINAL:
                return doc
            time.sleep(POLL_S)
            doc = api.get_batch(batch_id)


def _download_to(api: BatchApi, file_id: str, path: Path | None) -> None:
    if path is None:
        try:
            api.download(file_id, sys.stdout.buffer)
            sys.stdout.flush()
        except BrokenPipeError:
            reader_gone()
        except OSError as exc:  # the link's own errors arrive as LinkBroken: this is stdout
            fail(f"cannot write the output: {exc.strerror or exc}", EXIT_OUTPUT)
        return
    # Into a file beside it, renamed when whole: a download that breaks midway never
    # leaves a truncated file (or a truncated copy of an earlier one) under its name.
    partial = path.with_name(f".{path.name}.part")
    try:
        with open(partial, "wb") as out:
            api.download(file_id, out)
        os.replace(partial, path)
    except OSError as exc:  # the link's own errors arrive as LinkBroken: this is the disk
        fail(f"cannot write {path}: {exc.strerror or exc}", EXIT_OUTPUT)
    finally:
        partial.unlink(missing_ok=True)


def _summary(doc: dict[str, Any]) -> str:
    counts = doc.get("request_counts") or {}
    done = f"{counts.get('completed', 0)}/{counts.get('total', 0)} done"
    return f"{doc['id']}  {doc['status']:<11} {done}, {counts.get('failed', 0)} failed"


def _exit_for(doc: dict[str, Any]) -> None:
    counts = doc.get("request_counts") or {}
    if doc["status"] != "completed" or counts.get("failed"):
        sys.exit(EXIT_FAILED)
