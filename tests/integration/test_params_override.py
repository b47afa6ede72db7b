"""An item's own params override the call's, structured output included: an item's
``response_format`` or ``json_schema`` replaces the call-level one, whichever spelling
either side used (a real daemon, synthetic engine, the public library)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Any

import jsonschema
import pytest

from exgen.client import AsyncClient, Client, errors
from tests.conftest import RunningDaemon, start_daemon

pytestmark = pytest.mark.timeout(120)

FILM = {
    "type": "object",
    "properties": {"title": {"type": "string"}, "year": {"type": "integer"}},
    "required": ["title", "year"],
    "additionalProperties": False,
}
LABEL = {
    "type": "object",
    "properties": {"label": {"enum": ["pos", "neg"]}},
    "required": ["label"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningDaemon]:
    running = start_daemon(
        tmp_path_factory.mktemp("override"), "--engine", "synthetic", "--workers", "1"
    )
    running.wait_ready()
    yield running
    assert running.stop() == 0


def label_format(schema: dict[str, Any]) -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": {"name": "label", "schema": schema}}


# Each item's own structured-output choice, and the schema its text must then match
# (None: free text, which the synthetic engine writes as words, not JSON).
OWN_CHOICES: list[tuple[str, dict[str, Any], dict[str, Any] | None]] = [
    ("own-format", {"response_format": label_format(LABEL)}, LABEL),
    ("own-schema", {"json_schema": LABEL}, LABEL),
    ("own-text", {"response_format": "text"}, None),
    ("own-none", {"json_schema": None}, None),
    ("inherits", {"max_new_tokens": 60}, FILM),
]


def items() -> list[dict[str, Any]]:
    return [{"id": i, "prompt": f"p {i}", "params": own} for i, own, _ in OWN_CHOICES]


def check(results: list[Any]) -> None:
    for (item_id, _, schema), result in zip(OWN_CHOICES, results, strict=True):
        assert result.id == item_id
        assert result.ok, f"{item_id}: {result.error}"
        if schema is None:
            with pytest.raises(ValueError):
                json.loads(result.text)
        else:
            jsonschema.validate(json.loads(result.text), schema)


@pytest.mark.parametrize(
    "call_level",
    [{"json_schema": FILM}, {"response_format": label_format(FILM)}],
    ids=["call-json_schema", "call-response_format"],
)
def test_an_items_structured_output_overrides_the_calls(
    daemon: RunningDaemon, call_level: dict[str, Any]
) -> None:
    with Client(daemon.address) as client:
        check(client.generate(items(), max_new_tokens=80, **call_level))
        # one params map giving both spellings is still the caller's mistake
        both = {"response_format": "json_object", "json_schema": LABEL}
        [bad] = client.generate([{"id": "both", "prompt": "x", "params": both}], **call_level)
        assert isinstance(bad.error, errors.BadRequest) and "not both" in str(bad.error)
        assert bad.error.field.endswith("params.response_format")


def test_the_async_client_merges_the_same_way(daemon: RunningDaemon) -> None:
    async def main() -> list[Any]:
        async with AsyncClient(daemon.address) as client:
            call_level = label_format(FILM)
            return await client.generate(items(), max_new_tokens=80, response_format=call_level)

    check(asyncio.run(main()))
