"""/openapi.json is the contract: schemathesis (pinned in the dev extra) generates
requests from it against a real `exgen serve --http` and holds every answer to it
(status codes, content types, response schemas, headers, 405s with Allow, no 5xx,
schema-invalid bodies refused). Bounded: a fixed seed and a few examples an operation."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.http_support import SYNTHETIC, HttpDaemon, request, start_http_daemon

CONFIG = Path(__file__).with_name("schemathesis.toml")
ST = Path(sys.executable).with_name("st")


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HttpDaemon]:
    daemon = start_http_daemon(tmp_path_factory.mktemp("contract"), *SYNTHETIC, "--workers", "1")
    daemon.wait_healthy()
    yield daemon
    assert daemon.stop() == 0


def raw(
    url: str, method: str, data: bytes = b"", headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    req = urllib.request.Request(url, data=data or None, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=30) as reply:
            return reply.status, dict(reply.headers), reply.read()
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers), err.read()


def test_every_route_is_in_the_document_with_its_bodies(served: HttpDaemon) -> None:
    status, doc = served.get("/openapi.json")
    assert status == 200
    ops = {(path, method) for path, item in doc["paths"].items() for method in item}
    assert ("/v1/files", "post") in ops and ("/v1/batches/{batch_id}/cancel", "post") in ops
    assert len(ops) == 18
    for path, method in ops:
        operation = doc["paths"][path][method]
        assert "200" in operation["responses"], (path, method)
        assert "422" not in operation["responses"], (path, method)
        if method == "post" and "cancel" not in path:
            assert operation["requestBody"]["required"], (path, method)
    metrics = doc["paths"]["/metrics"]["get"]["responses"]["200"]["content"]
    assert list(metrics) == ["text/plain"]


def test_a_405_names_every_method_of_its_path(served: HttpDaemon) -> None:
    status, headers, body = raw(f"{served.url}/v1/files", "PUT")
    assert status == 405
    assert set(headers["allow"].split(", ")) >= {"GET", "POST"}
    assert json.loads(body)["error"]["code"] == "method_not_allowed"
    status, headers, _ = raw(f"{served.url}/v1/files/file-x", "POST")
    assert status == 405 and set(headers["allow"].split(", ")) >= {"GET", "DELETE"}


def test_an_upload_without_multipart_is_a_400(served: HttpDaemon) -> None:
    for headers in ({}, {"content-type": "application/json"}):
        status, _, body = raw(f"{served.url}/v1/files", "POST", b"{}", headers)
        error = json.loads(body)["error"]
        assert status == 400 and error["code"] and "multipart/form-data" in error["message"]


def test_a_role_that_is_not_a_string_is_a_400(served: HttpDaemon) -> None:
    for path in ("/v1/chat/completions", "/tokenize"):
        status, body = request(f"{served.url}{path}", {"messages": [{"role": {}, "content": ""}]})
        assert status == 400 and body["error"]["param"] == "messages", (path, body)


def test_a_bad_query_is_a_400_with_a_code(served: HttpDaemon) -> None:
    status, body = request(f"{served.url}/v1/batches?limit=many")
    assert status == 400 and body["error"]["param"] == "limit" and body["error"]["code"]


@pytest.mark.slow
def test_schemathesis_finds_nothing(served: HttpDaemon, tmp_path: Path) -> None:
    if shutil.which(str(ST)) is None:
        pytest.fail(f"schemathesis is not installed ({ST}): make setup installs the dev extra")
    command = [
        str(ST),
        "--config-file",
        str(CONFIG),
        "run",
        f"{served.url}/openapi.json",
        "--checks",
        "all",
        "--max-examples",
        "10",
        "--seed",
        "23",
        "--no-color",
        "--report-dir",
        str(tmp_path),
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=240, cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-2000:]
    assert "passed" in done.stdout and "failures" not in done.stdout.split("SUMMARY")[-1]
    assert "Traceback" not in served.daemon.log_text()
