"""Validating a batch's input file: the Batch API's whole-file rules, line by line.

Runs in a thread with its own SQLite connection, reading the file as a stream (a
100,000-line file is never in memory), and records each good line's byte offset so
the runner can read lines back one at a time. A file that breaks a whole-file rule
fails the batch, with one error per line (up to MAX_LISTED_ERRORS) naming the line:

* each line a JSON object with a string ``custom_id``, unique in the file;
* ``method`` POST, ``url`` the batch's endpoint, ``body`` an object, and no other key.

What a body holds (params, messages) is the request's business, as it is for the
HTTP endpoint: a bad body fails that request alone, in the error file, when the
runner reaches it (``batchfile.parse_line``), and the rest of the batch runs.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from exgen.client import batchfile as B
from exgen.client import protocol as P
from exgen.daemon.gateway import store as S

logger = logging.getLogger("exgen.gateway.validate")

MAX_LISTED_ERRORS = 100
INSERT_CHUNK = 5000


@dataclass
class Outcome:
    total: int = 0
    errors: list[dict[str, Any]] = field(default_factory=list)
    error_count: int = 0
    model: str | None = None  # the first line's body.model

    def add_error(
        self, line: int | None, code: str, message: str, param: str | None = None
    ) -> None:
        self.error_count += 1
        if len(self.errors) < MAX_LISTED_ERRORS:
            self.errors.append({"code": code, "message": message, "param": param, "line": line})


class LineRefused(Exception):
    def __init__(self, code: str, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.code, self.message, self.param = code, message, param


def check_line(raw: bytes, endpoint: str) -> tuple[str, Any]:
    """(custom_id, body.model) of a line that keeps the whole-file rules; else LineRefused."""
    try:
        obj = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise LineRefused("invalid_json_line", f"not valid JSON ({exc})") from None
    if not isinstance(obj, dict):
        raise LineRefused("invalid_json_line", "each line must be a JSON object")
    for key in obj:
        if key not in B.OPENAI_LINE_KEYS:
            known = ", ".join(sorted(B.OPENAI_LINE_KEYS))
            raise LineRefused("invalid_request", f"unknown key {key!r} (a line holds {known})", key)
    custom_id = obj.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id or len(custom_id) > P.MAX_ID_CHARS:
        message = f"custom_id must be a non-empty string of at most {P.MAX_ID_CHARS} characters"
        raise LineRefused("invalid_request", message, "custom_id")
    if obj.get("method", "POST") != "POST":
        raise LineRefused("invalid_request", 'method must be "POST"', "method")
    if obj.get("url") != endpoint:
        message = f"url {obj.get('url')!r} does not match the batch's endpoint {endpoint!r}"
        raise LineRefused("mismatched_endpoint", message, "url")
    body = obj.get("body")
    if not isinstance(body, dict):
        raise LineRefused("invalid_request", "body must be a JSON object", "body")
    return custom_id, body.get("model")


def validate_file(
    db_path: Path, batch_id: str, input_path: Path, endpoint: str, max_lines: int
) -> Outcome:
    """Check every line; on success the lines table holds one pending row per request."""
    db = S.connect(db_path)
    try:
        db.execute("DELETE FROM lines WHERE batch_id = ?", (batch_id,))  # a restarted run
        outcome = _scan(db, batch_id, input_path, endpoint, max_lines)
        if outcome.error_count:
            db.execute("DELETE FROM lines WHERE batch_id = ?", (batch_id,))
        return outcome
    finally:
        db.close()


def _scan(db: Any, batch_id: str, path: Path, endpoint: str, max_lines: int) -> Outcome:
    outcome = Outcome()
    seen: set[str] = set()
    rows: list[tuple[str, int, int, str]] = []
    offset = 0
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, 1):
            start, offset = offset, offset + len(raw)
            if not raw.strip():
                continue
            outcome.total += 1
            if outcome.total > max_lines:
                message = f"more than {max_lines} requests in one batch (http_batch_max_lines)"
                outcome.add_error(line_no, "too_many_requests", message)
                return outcome
            try:
                custom_id, model = check_line(raw, endpoint)
            except LineRefused as exc:
                outcome.add_error(line_no, exc.code, exc.message, exc.param)
                continue
            if custom_id in seen:
                message = f"custom_id {custom_id!r} is used by an earlier line"
                outcome.add_error(line_no, "duplicate_custom_id", message, "custom_id")
                continue
            seen.add(custom_id)
            if outcome.model is None and isinstance(model, str):
                outcome.model = model
            if not outcome.error_count:
                rows.append((batch_id, line_no, start, custom_id))
                if len(rows) >= INSERT_CHUNK:
                    _insert(db, rows)
    if not outcome.error_count:
        _insert(db, rows)
    if outcome.total == 0:
        outcome.add_error(None, "empty_file", "the input file holds no requests")
    return outcome


def _insert(db: Any, rows: list[tuple[str, int, int, str]]) -> None:
    # One transaction a chunk: short write locks, so the gateway's own commits for
    # running batches never wait long behind a big file being validated.
    db.execute("BEGIN")
    db.executemany(
        "INSERT INTO lines (batch_id, line_no, offset, custom_id) VALUES (?, ?, ?, ?)", rows
    )
    db.execute("COMMIT")
    rows.clear()
