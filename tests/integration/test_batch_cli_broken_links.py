"""`exgen-client batch` against a link that breaks: a gateway that resets the
connection mid-answer, answers with garbage, or cuts a body short. The user sees one
clear line and exit status 3 (the connection's fault, as for no gateway at all),
never a traceback, and no truncated results file."""

from __future__ import annotations

import json
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.conftest import EXGEN_CLIENT

pytestmark = pytest.mark.timeout(120)

# What the gateway does with one request (by its path): bytes are sent, a float is
# a pause in seconds (so the client is reading the body when the link breaks),
# RESET closes with a TCP RST; the connection is closed after the last step.
RESET = "reset"
Step = bytes | float | str
Script = Callable[[str], list[Step]]

BATCH: dict[str, object] = {
    "id": "batch_1",
    "status": "completed",
    "output_file_id": "file_out",
    "request_counts": {"total": 1, "completed": 1, "failed": 0},
}


def http_head(status: str, length: int, kind: str = "application/json") -> bytes:
    return f"HTTP/1.1 {status}\r\nContent-Type: {kind}\r\nContent-Length: {length}\r\n\r\n".encode()


def whole(doc: dict[str, object]) -> list[Step]:
    body = json.dumps(doc).encode()
    return [http_head("200 OK", len(body)) + body]


class BrokenGateway:
    """A real TCP server of our own that answers each request as ``script`` says."""

    def __init__(self, script: Script, body_limit: int | None = None) -> None:
        self.script = script
        self.body_limit = body_limit  # read no more of a request's body than this
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.1)
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.paths: list[str] = []
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.thread.start()

    def serve(self) -> None:
        while not self.stopping.is_set():
            try:
                conn, _ = self.listener.accept()
            except TimeoutError:
                continue
            with conn:
                conn.settimeout(30)
                self.answer(conn)

    def answer(self, conn: socket.socket) -> None:
        path = read_request(conn, self.body_limit)
        self.paths.append(path)
        for step in self.script(path):
            if isinstance(step, bytes):
                conn.sendall(step)
            elif isinstance(step, float):
                time.sleep(step)
            else:  # RESET: close with an RST instead of a FIN
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                return

    def close(self) -> None:
        self.stopping.set()
        self.thread.join(timeout=10)
        self.listener.close()


def read_request(conn: socket.socket, body_limit: int | None) -> str:
    """The request's path; its head and body (up to ``body_limit``) are read first."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(65536)
        if not chunk:
            return ""
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    length = 0
    for line in lines[1:]:
        name, _, value = line.partition(":")
        if name.strip().lower() == "content-length":
            length = int(value) if body_limit is None else min(int(value), body_limit)
    while len(body) < length:
        body += conn.recv(65536)
    return lines[0].split(" ")[1]


@pytest.fixture
def gateway() -> Iterator[Callable[..., BrokenGateway]]:
    started: list[BrokenGateway] = []

    def start(script: Script, body_limit: int | None = None) -> BrokenGateway:
        started.append(BrokenGateway(script, body_limit))
        return started[-1]

    yield start
    for server in started:
        server.close()


def run_batch(url: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*EXGEN_CLIENT, "batch", *args, "--url", url],
        capture_output=True,
        text=True,
        timeout=60,
    )


def assert_one_clear_line(run: subprocess.CompletedProcess[str], url: str) -> str:
    assert "Traceback" not in run.stderr, run.stderr
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1, run.stderr
    assert lines[0].startswith("exgen-client: ") and url in lines[0], lines[0]
    assert run.returncode == 3, (run.returncode, run.stderr)
    return lines[0]


def reset_in_error_body(path: str) -> list[Step]:
    return [http_head("502 Bad Gateway", 1000) + b'{"error": {"mess', 1.0, RESET]


def garbage_status_line(path: str) -> list[Step]:
    return [b"SSH-2.0-OpenSSH_9.6\r\n\r\n"]


def closed_before_answering(path: str) -> list[Step]:
    return []


def body_cut_short(path: str) -> list[Step]:
    return [http_head("200 OK", 1000) + b'{"object": "list", "da']


def truncated_error_body(path: str) -> list[Step]:
    return [http_head("500 Internal Server Error", 1000) + b'{"error"']


@pytest.mark.parametrize(
    "script",
    [
        reset_in_error_body,
        garbage_status_line,
        closed_before_answering,
        body_cut_short,
        truncated_error_body,
    ],
)
def test_a_broken_answer_is_one_line_and_exit_3(
    gateway: Callable[..., BrokenGateway], script: Script
) -> None:
    server = gateway(script)
    run = run_batch(server.url, "list")
    line = assert_one_clear_line(run, server.url)
    assert server.paths == ["/v1/batches?limit=20"]
    assert f"the connection to the exgen HTTP gateway at {server.url} broke (" in line


def test_an_upload_reset_midway_is_one_line_and_exit_3(
    gateway: Callable[..., BrokenGateway], tmp_path: Path
) -> None:
    server = gateway(lambda path: [RESET], body_limit=64 * 1024)
    prompts = tmp_path / "prompts.jsonl"
    request = {"custom_id": "r", "url": "/v1/completions", "body": {"prompt": "x" * 1000}}
    prompts.write_text((json.dumps(request) + "\n") * 16_000)  # 16 MB: more than buffers hold
    run = run_batch(server.url, "create", str(prompts))
    line = assert_one_clear_line(run, server.url)
    assert server.paths == ["/v1/files"] and " broke (" in line


def test_nothing_listening_is_still_no_gateway_with_the_hint() -> None:
    with socket.create_server(("127.0.0.1", 0)) as unused:
        url = f"http://127.0.0.1:{unused.getsockname()[1]}"
    line = assert_one_clear_line(run_batch(url, "list"), url)
    assert line.startswith(f"exgen-client: no exgen HTTP gateway at {url} (")
    assert line.endswith("is `exgen serve --http HOST:PORT` running?")


def test_a_download_reset_midway_leaves_no_truncated_file(
    gateway: Callable[..., BrokenGateway], tmp_path: Path
) -> None:
    def script(path: str) -> list[Step]:
        if path.endswith("/content"):
            part = b'{"custom_id": "r1"}\n' * 50
            return [http_head("200 OK", 100_000, "application/jsonl") + part, 1.0, RESET]
        return whole(BATCH)

    server = gateway(script)
    out = tmp_path / "results.jsonl"
    run = run_batch(server.url, "download", "batch_1", "-o", str(out))
    assert_one_clear_line(run, server.url)
    assert server.paths == ["/v1/batches/batch_1", "/v1/files/file_out/content"]
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_a_download_cut_short_keeps_the_earlier_file(
    gateway: Callable[..., BrokenGateway], tmp_path: Path
) -> None:
    def script(path: str) -> list[Step]:
        if path.endswith("/content"):
            return [http_head("200 OK", 100_000, "application/jsonl") + b'{"custom_id"']
        return whole(BATCH)

    server = gateway(script)
    out = tmp_path / "results.jsonl"
    out.write_text("an earlier download\n")
    run = run_batch(server.url, "download", "batch_1", "-o", str(out))
    assert_one_clear_line(run, server.url)
    assert out.read_text() == "an earlier download\n"


def test_a_results_file_that_cannot_be_written_is_one_line_and_exit_4(
    gateway: Callable[..., BrokenGateway], tmp_path: Path
) -> None:
    def script(path: str) -> list[Step]:
        if path.endswith("/content"):
            part = b'{"custom_id": "r1"}\n'
            return [http_head("200 OK", len(part), "application/jsonl") + part]
        return whole(BATCH)

    server = gateway(script)
    out = tmp_path / "no such directory" / "results.jsonl"
    run = run_batch(server.url, "download", "batch_1", "-o", str(out))
    assert run.returncode == 4 and "Traceback" not in run.stderr, run.stderr
    assert run.stderr.strip().splitlines() == [
        f"exgen-client: cannot write {out}: No such file or directory"
    ]
    fine = tmp_path / "results.jsonl"
    assert run_batch(server.url, "download", "batch_1", "-o", str(fine)).returncode == 0
    assert fine.read_bytes() == b'{"custom_id": "r1"}\n' and list(tmp_path.iterdir()) == [fine]


@pytest.mark.parametrize(
    "args",
    [("list",), ("status", "batch_1"), ("download", "batch_1"), ("cancel", "batch_1"), ("create",)],
)
@pytest.mark.parametrize("answer", [{}, [], {"data": {}}, {"id": "b", "status": 3}])
def test_an_answer_without_the_batch_fields_is_one_line_and_exit_3(
    gateway: Callable[..., BrokenGateway], tmp_path: Path, args: tuple[str, ...], answer: object
) -> None:
    """Something else answering at the URL (a proxy, another service): said as such."""
    body = json.dumps(answer).encode()
    server = gateway(lambda path: [http_head("200 OK", len(body)) + body])
    if args == ("create",):
        prompts = tmp_path / "prompts.jsonl"
        prompts.write_text(json.dumps({"custom_id": "r", "url": "/v1/completions"}) + "\n")
        args = ("create", str(prompts))
    line = assert_one_clear_line(run_batch(server.url, *args), server.url)
    assert f"what answers at {server.url} is not an exgen HTTP gateway (its answer is" in line


def test_a_download_to_a_closed_pipe_exits_quietly_as_sigpipe_would(
    gateway: Callable[..., BrokenGateway],
) -> None:
    part = b'{"custom_id": "r1"}\n' * 200_000  # 4 MB: far more than a pipe holds

    def script(path: str) -> list[Step]:
        if path.endswith("/content"):
            return [http_head("200 OK", len(part), "application/jsonl") + part]
        return whole(BATCH)

    server = gateway(script)
    proc = subprocess.Popen(
        [*EXGEN_CLIENT, "batch", "download", "batch_1", "--url", server.url],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdout is not None and proc.stderr is not None
    assert proc.stdout.read(10) == b'{"custom_i'
    proc.stdout.close()  # the reader goes, as `| head -c 10` does
    with proc.stderr:
        stderr = proc.stderr.read().decode()
    assert proc.wait(timeout=30) == 141, stderr
    assert stderr == "", stderr
