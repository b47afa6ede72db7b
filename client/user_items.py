"""Items as people write them — a batch file's line, an HTTP request's body — turned
into the protocol's items, by rules both share: an unknown key is refused naming it
(with the nearest known one), a param may be written under one name only, and a
validation error names the field as it was written, not as the wire calls it.

Pure: no sockets, no files. :mod:`batchfile` (plain and chat lines) and
:mod:`openai_body` (OpenAI request bodies) build on it.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable, Mapping
from typing import Any

from exgen.client import protocol as P
from exgen.client.calls import unencodable_field


class Malformed(ValueError):
    """What a user wrote cannot become an item; the message says why, naming the field
    as written (``body.'temprature'``, ``params.top_k``)."""


def json_type(value: Any) -> str:
    names = {list: "an array", str: "a string", bool: "a boolean", type(None): "null"}
    return names.get(type(value), "a number")


def check_id(value: Any, key: str) -> str:
    if not isinstance(value, str) or not value:
        raise Malformed(f"{key} must be a non-empty string")
    if len(value) > P.MAX_ID_CHARS:
        raise Malformed(f"{key} is longer than {P.MAX_ID_CHARS} characters")
    return value


def check_encodable(obj: Any, raw: bytes | str | None = None, where: str = "") -> None:
    """A lone surrogate (only a JSON ``\\uD8xx``-``\\uDFxx`` escape can make one) cannot
    be sent: refused naming the field. ``raw``: the JSON text ``obj`` was parsed from,
    where it is at hand; without such an escape in it there is nothing to walk."""
    if raw is not None:
        text = raw if isinstance(raw, bytes) else raw.encode("utf-8", "surrogatepass")
        if b"\\ud" not in text and b"\\uD" not in text:
            return  # the common case
    found = unencodable_field(obj, where)
    if found is not None:
        raise Malformed(f"{found}: holds a lone surrogate, which cannot be encoded as UTF-8")


def unknown_key(key: str, known: Iterable[str], where: str = "") -> Malformed:
    hint = difflib.get_close_matches(key, list(known), n=1)
    suggestion = f" (did you mean {hint[0]!r}?)" if hint else ""
    return Malformed(f"unknown key {where}{key!r}{suggestion}")


def map_params(
    source: Mapping[str, Any], aliases: Mapping[str, str], where: str
) -> tuple[dict[str, Any], dict[str, str]]:
    """Params under their wire names, and wire name -> the key the user wrote."""
    params: dict[str, Any] = {}
    written: dict[str, str] = {}
    for key, value in source.items():
        name = aliases.get(key)
        if name is None:
            continue
        if name in params:
            raise Malformed(f"both {written[name]} and {where}{key} given; use one")
        params[name] = value
        written[name] = f"{where}{key}"
    return params, written


def validate(raw: dict[str, Any], written: Mapping[str, str], prefix: str) -> P.Item:
    """protocol.validate_item, its field paths translated back to the user's own keys."""
    try:
        return P.validate_item(raw, "item")
    except P.ValidationError as exc:
        path = exc.field.removeprefix("item.").removeprefix("item")
        if path.startswith("params."):
            name = path.removeprefix("params.")
            head = re.split(r"[.\[]", name, maxsplit=1)[0]
            path = written.get(head, head) + name[len(head) :]
        elif path:
            path = f"{prefix}{path}"
        raise Malformed(f"{path}: {exc.message}" if path else exc.message) from None
