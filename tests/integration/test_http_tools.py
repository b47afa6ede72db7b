"""What the tools people point at exgen's HTTP API expect of it, with their default
settings: the openai SDK's auto-paging, concurrent streaming without stray tasks,
batch lines refused and failed in one shape, the vLLM extensions load generators
send. Each against a real `exgen serve --http` (synthetic engine)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import openai
import pytest

from tests.integration.http_support import HttpDaemon, batch_lines, request


@pytest.fixture(scope="module")
def fresh(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A daemon whose file list is this module's alone."""
    from tests.integration.http_support import SYNTHETIC, start_http_daemon

    daemon = start_http_daemon(tmp_path_factory.mktemp("tools"), *SYNTHETIC, "--workers", "2")
    daemon.wait_healthy()
    yield daemon
    assert daemon.stop() == 0


def upload_files(sdk: openai.OpenAI, tmp_path: Path, count: int) -> list[str]:
    path = tmp_path / "input.jsonl"
    path.write_text(batch_lines(1))
    ids = []
    for _ in range(count):
        with path.open("rb") as f:
            ids.append(sdk.files.create(file=f, purpose="batch").id)
    return ids


def test_files_list_pages_through_every_file(fresh: HttpDaemon, tmp_path: Path) -> None:
    sdk = openai.OpenAI(base_url=fresh.base_url, api_key="x", max_retries=0)
    ids = upload_files(sdk, tmp_path, 7)
    first = sdk.files.list(limit=2)
    assert [f.id for f in first.data] == ids[::-1][:2] and first.has_more
    assert [f.id for f in sdk.files.list(limit=2, purpose="batch")] == ids[::-1]
    assert [f.id for f in sdk.files.list(limit=3, order="asc")] == ids
    status, page = fresh.get(f"/v1/files?limit=2&after={ids[2]}&order=asc")
    assert status == 200
    assert [f["id"] for f in page["data"]] == ids[3:5]
    assert (page["first_id"], page["last_id"], page["has_more"]) == (ids[3], ids[4], True)
    status, page = fresh.get(f"/v1/files?limit=7&after={ids[6]}")
    assert [f["id"] for f in page["data"]] == ids[:6][::-1] and page["has_more"] is False
    status, page = fresh.get(f"/v1/files?after={ids[0]}")
    assert page == {
        "object": "list",
        "data": [],
        "first_id": None,
        "last_id": None,
        "has_more": False,
    }


@pytest.mark.parametrize(
    ("query", "param"),
    [
        ("limit=0", "limit"),
        ("limit=-3", "limit"),
        ("limit=10001", "limit"),
        ("limit=99999999999999999999999", "limit"),
        ("limit=two", "limit"),
        ("order=sideways", "order"),
        ("after=file-nosuchfile", "after"),
    ],
)
def test_files_list_refuses_a_bad_page_naming_it(fresh: HttpDaemon, query: str, param: str) -> None:
    status, body = fresh.get(f"/v1/files?{query}")
    assert status == 400, body
    assert body["error"]["param"] == param and body["error"]["code"], body


def test_batches_list_refuses_a_bad_page_naming_it(fresh: HttpDaemon) -> None:
    for query, param in (("limit=0", "limit"), ("limit=101", "limit"), ("after=batch_x", "after")):
        status, body = request(f"{fresh.url}/v1/batches?{query}")
        assert status == 400 and body["error"]["param"] == param, (query, body)
