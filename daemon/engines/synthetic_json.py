"""The synthetic engine's structured output: a JSON instance of a schema, made cheaply.

No grammar engine: a small generator walks the schema and picks values with a
deterministic random stream (seeded by the prompt, seed and sample index), so the
daemon's tests and benchmarks get JSON that validates, differs between samples, and
is the same on every worker. It knows the common keywords — ``type`` (or a list of
them), ``properties``/``required``, ``items``/``minItems``/``maxItems``, ``enum``,
``const``, ``anyOf``/``oneOf``, a one-element ``allOf``, local ``$ref``, string
lengths and formats, number bounds — and refuses the rest (``pattern``, ...) with
:class:`SchemaUnsupported`, as a real engine refuses a schema it cannot compile.
"""

from __future__ import annotations

import json
import random
from typing import Any

MAX_DEPTH = 12  # past it, objects keep only their required properties, arrays shrink
WORDS = "alpha beta gamma delta river stone light garden window letter".split()
FORMATS = {
    "date": "2024-05-17",
    "date-time": "2024-05-17T08:30:00Z",
    "time": "08:30:00Z",
    "email": "someone@example.com",
    "uuid": "123e4567-e89b-12d3-a456-426614174000",
    "uri": "https://example.com/a",
}
# Keywords that only constrain what the generator already produces, or annotate.
_HARMLESS = {
    "type", "properties", "required", "items", "minItems", "maxItems", "enum", "const",
    "anyOf", "oneOf", "allOf", "$ref", "$defs", "definitions", "minLength", "maxLength",
    "format", "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum",
    "additionalProperties", "title", "description", "default", "examples", "$schema",
    "$id", "$comment", "strict", "name", "uniqueItems", "nullable", "deprecated",
}  # fmt: skip


class SchemaUnsupported(ValueError):
    """A schema (or a part of it) this generator cannot make an instance of."""


def instance_text(schema_text: str, rng: random.Random) -> str:
    """A JSON instance of the schema, as the text a model would write."""
    schema = json.loads(schema_text)
    value = _instance(schema, rng, schema, 0)
    return json.dumps(value, ensure_ascii=False, separators=(", ", ": "))


def _instance(schema: Any, rng: random.Random, root: dict[str, Any], depth: int) -> Any:
    if depth > 4 * MAX_DEPTH:
        raise SchemaUnsupported("the schema requires deeper nesting than this engine makes")
    if schema is True or schema == {}:
        return rng.choice(WORDS)
    if not isinstance(schema, dict):
        raise SchemaUnsupported(f"a schema must be a map or true, got {json.dumps(schema)}")
    unknown = sorted(set(schema) - _HARMLESS)
    if unknown:
        raise SchemaUnsupported(f"keyword {unknown[0]!r} is not supported")
    if "$ref" in schema:
        return _instance(_resolve(schema["$ref"], root), rng, root, depth + 1)
    if "const" in schema:
        return schema["const"]
    if "enum" in schema:
        if not isinstance(schema["enum"], list) or not schema["enum"]:
            raise SchemaUnsupported("enum must be a non-empty list")
        return rng.choice(schema["enum"])
    for combinator in ("anyOf", "oneOf"):
        if combinator in schema:
            options = schema[combinator]
            if not isinstance(options, list) or not options:
                raise SchemaUnsupported(f"{combinator} must be a non-empty list")
            return _instance(rng.choice(options), rng, root, depth + 1)
    if "allOf" in schema:
        parts = schema["allOf"]
        if not isinstance(parts, list) or len(parts) != 1:
            raise SchemaUnsupported("allOf with other than one schema is not supported")
        return _instance(parts[0], rng, root, depth + 1)
    return _typed(schema, _pick_type(schema, rng), rng, root, depth)


def _pick_type(schema: dict[str, Any], rng: random.Random) -> str:
    kind = schema.get("type")
    if kind is None:
        return "object" if "properties" in schema else "array" if "items" in schema else "string"
    if isinstance(kind, list):
        if not kind:
            raise SchemaUnsupported("type must not be an empty list")
        kind = rng.choice(kind)
    if not isinstance(kind, str):
        raise SchemaUnsupported(f"type {json.dumps(kind)} is not a type name")
    return kind


def _typed(
    schema: dict[str, Any], kind: str, rng: random.Random, root: dict[str, Any], depth: int
) -> Any:
    if kind == "object":
        return _object(schema, rng, root, depth)
    if kind == "array":
        return _array(schema, rng, root, depth)
    if kind == "string":
        return _string(schema, rng)
    if kind in ("integer", "number"):
        return _number(schema, rng, kind == "integer")
    if kind == "boolean":
        return rng.random() < 0.5
    if kind == "null":
        return None
    raise SchemaUnsupported(f"unknown type {kind!r}")


def _object(
    schema: dict[str, Any], rng: random.Random, root: dict[str, Any], depth: int
) -> dict[str, Any]:
    properties = schema.get("properties") or {}
    required = set(schema.get("required") or ())
    out: dict[str, Any] = {}
    for name, sub in properties.items():
        if name in required or (depth < MAX_DEPTH and rng.random() < 0.5):
            out[name] = _instance(sub, rng, root, depth + 1)
    for name in sorted(required - set(properties)):
        out[name] = rng.choice(WORDS)
    return out


def _array(schema: dict[str, Any], rng: random.Random, root: dict[str, Any], depth: int) -> Any:
    low = int(schema.get("minItems", 0))
    high = int(schema.get("maxItems", low + 3))
    if low > high:
        raise SchemaUnsupported(f"minItems {low} > maxItems {high}")
    count = low if depth >= MAX_DEPTH else rng.randint(low, min(high, low + 3))
    items = schema.get("items", {})
    return [_instance(items, rng, root, depth + 1) for _ in range(count)]


def _string(schema: dict[str, Any], rng: random.Random) -> str:
    fmt = schema.get("format")
    text = FORMATS.get(fmt, "") if isinstance(fmt, str) else ""
    if not text:
        text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 3)))
    low, high = int(schema.get("minLength", 0)), schema.get("maxLength")
    if high is not None and int(high) < low:
        raise SchemaUnsupported(f"minLength {low} > maxLength {high}")
    text = text.ljust(low, "x")
    return text if high is None else text[: int(high)]


def _number(schema: dict[str, Any], rng: random.Random, integer: bool) -> int | float:
    low = schema.get("minimum", schema.get("exclusiveMinimum", 0))
    high = schema.get("maximum", schema.get("exclusiveMaximum", max(low, 0) + 100))
    if "exclusiveMinimum" in schema and "minimum" not in schema:
        low = low + 1 if integer else low + 0.01
    if "exclusiveMaximum" in schema and "maximum" not in schema:
        high = high - 1 if integer else high - 0.01
    if low > high:
        raise SchemaUnsupported(f"no number lies between {low} and {high}")
    if integer:
        return rng.randint(int(-(-low // 1)), int(high // 1))
    return round(rng.uniform(low, high), 2) if high - low > 0.02 else low


def _resolve(ref: Any, root: dict[str, Any]) -> Any:
    """A local reference (``#/$defs/Name``, ``#/definitions/Name``, ``#``)."""
    if not isinstance(ref, str) or not ref.startswith("#"):
        raise SchemaUnsupported(f"$ref {ref!r}: only local references (#/...) are supported")
    node: Any = root
    for part in filter(None, ref[1:].split("/")):
        part = part.replace("~1", "/").replace("~0", "~")
        if not isinstance(node, dict) or part not in node:
            raise SchemaUnsupported(f"$ref {ref!r} does not resolve")
        node = node[part]
    return node
