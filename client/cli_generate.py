"""``exgen-client generate``: one prompt, its text printed (or streamed)."""

from __future__ import annotations

import signal
import sys
from typing import Any

import click

from exgen.client.cli_common import (
    Stopped,
    connection_options,
    daemon_errors,
    open_client,
    sampling_options,
    sampling_params,
    stopped_by_signals,
)
from exgen.client.client import Client, default_address
from exgen.client.exits import EXIT_HELP, EXIT_OUTPUT, fail, reader_gone


@click.command(epilog=EXIT_HELP)
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
            if code == signal.SIGPIPE:
                reader_gone()  # the stream's iterator has cancelled the prompt
            sys.exit(128 + code)  # the stream's iterator has cancelled the prompt
        except BrokenPipeError:
            reader_gone()
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
