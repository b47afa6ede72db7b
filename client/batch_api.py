"""A small client of the OpenAI Batch API as exgen's HTTP gateway serves it.

Standard library only (http.client), so the light client stays light: uploads stream
from disk and downloads stream to disk, so a file of any size costs a few MiB.

    api = BatchApi("http://127.0.0.1:8000", api_key=None)
    file = api.upload("prompts.jsonl")
    batch = api.create_batch(file["id"], "/v1/chat/completions")
    batch = api.get_batch(batch["id"])          # poll batch["request_counts"]
    api.download(batch["output_file_id"], "results.jsonl")
"""

from __future__ import annotations

import http.client
import json
import os
import urllib.parse
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

DEFAULT_URL = "http://127.0.0.1:8000"
CHUNK = 1024 * 1024
TERMINAL = ("completed", "failed", "expired", "cancelled")


def default_url() -> str:
    return os.environ.get("EXGEN_HTTP_URL") or DEFAULT_URL


class ApiError(Exception):
    """The gateway answered with an error (``status``: the HTTP status)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status = status
        self.message = message


class Unreachable(Exception):
    """No HTTP gateway answered at the URL."""


class LinkBroken(Unreachable):
    """The connection broke mid-answer (reset, cut short) or the answer was not HTTP."""


class NotAGateway(Unreachable):
    """Something answered at the URL, but not with the object the Batch API defines
    (a proxy's page, another service, a gateway of another kind)."""


# What a broken link raises in http.client: resets and timeouts are OSErrors, a bad
# status line or a body cut short are HTTPExceptions (RemoteDisconnected is both).
_LINK_ERRORS = (OSError, http.client.HTTPException)


class BatchApi:
    def __init__(self, url: str | None = None, api_key: str | None = None, timeout: float = 60):
        self.url = (url or default_url()).rstrip("/")
        parts = urllib.parse.urlsplit(self.url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"{self.url!r} is not an http:// or https:// URL")
        self.parts = parts
        self.api_key = api_key if api_key is not None else os.environ.get("EXGEN_API_KEY")
        self.timeout = timeout

    # --- the API -----------------------------------------------------------------------

    def upload(self, path: str | Path, purpose: str = "batch") -> dict[str, Any]:
        """POST /v1/files: the file streams from disk, never read whole."""
        path = Path(path)
        boundary = f"exgen-{uuid.uuid4().hex}"
        head = (
            f'--{boundary}\r\nContent-Disposition: form-data; name="purpose"\r\n\r\n'
            f"{purpose}\r\n--{boundary}\r\n"
            f'Content-Disposition: form-data; name="file"; filename="{path.name}"\r\n'
            "Content-Type: application/jsonl\r\n\r\n"
        ).encode()
        tail = f"\r\n--{boundary}--\r\n".encode()
        size = len(head) + path.stat().st_size + len(tail)
        headers = {
            "Content-Type": f"multipart/form-data; boundary={boundary}",
            "Content-Length": str(size),
        }
        with path.open("rb") as f:
            uploaded = self._json("POST", "/v1/files", _parts(head, f, tail), headers)
        if not isinstance(uploaded.get("id"), str):
            raise self._not_a_gateway("a file object", "'id'")
        return uploaded

    def create_batch(
        self,
        input_file_id: str,
        endpoint: str,
        completion_window: str = "24h",
        metadata: dict[str, str] | None = None,
    ) -> dict[str, Any]:
        body: dict[str, Any] = {
            "input_file_id": input_file_id,
            "endpoint": endpoint,
            "completion_window": completion_window,
        }
        if metadata:
            body["metadata"] = metadata
        return self._batch(self._post_json("/v1/batches", body))

    def get_batch(self, batch_id: str) -> dict[str, Any]:
        return self._batch(self._json("GET", f"/v1/batches/{_quote(batch_id)}"))

    def list_batches(self, limit: int = 20, after: str | None = None) -> dict[str, Any]:
        query = {"limit": str(limit)} | ({"after": after} if after else {})
        listed = self._json("GET", f"/v1/batches?{urllib.parse.urlencode(query)}")
        data = listed.get("data")
        if not isinstance(data, list):
            raise self._not_a_gateway("a list of batches", "'data' list")
        for doc in data:
            self._batch(doc)
        return listed

    def cancel_batch(self, batch_id: str) -> dict[str, Any]:
        return self._batch(self._post_json(f"/v1/batches/{_quote(batch_id)}/cancel", {}))

    def download(self, file_id: str, out: IO[bytes]) -> int:
        """GET /v1/files/{id}/content into ``out``, streamed; the bytes written."""
        conn, reply = self._send("GET", f"/v1/files/{_quote(file_id)}/content")
        try:
            written = 0
            while chunk := self._read(reply, CHUNK):
                out.write(chunk)
                written += len(chunk)
            return written
        finally:
            conn.close()

    # --- transport ---------------------------------------------------------------------

    def _post_json(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        data = json.dumps(body).encode()
        return self._json("POST", path, data, {"Content-Type": "application/json"})

    def _json(
        self, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None
    ) -> dict[str, Any]:
        conn, reply = self._send(method, path, body, headers)
        try:
            doc = json.loads(self._read(reply))
        except ValueError:
            raise ApiError(reply.status, "the answer is not JSON") from None
        finally:
            conn.close()
        if not isinstance(doc, dict):
            raise self._not_a_gateway("a JSON object", "keys")
        return doc

    def _batch(self, doc: Any) -> dict[str, Any]:
        """``doc`` if it is a Batch object as far as this client reads one."""
        if not isinstance(doc, dict) or not all(
            isinstance(doc.get(name), str) for name in ("id", "status")
        ):
            raise self._not_a_gateway("a batch", "'id' or 'status'")
        counts = doc.get("request_counts")
        optional = (doc.get("output_file_id"), doc.get("error_file_id"))
        if not isinstance(counts, dict | None) or not all(
            isinstance(v, str | None) for v in optional
        ):
            raise self._not_a_gateway("a batch", "request counts or file ids of the right types")
        return doc

    def _send(
        self, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None
    ) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
        """The reply to one request, its status checked (an error raises ApiError)."""
        cls = (
            http.client.HTTPSConnection
            if self.parts.scheme == "https"
            else http.client.HTTPConnection
        )
        conn = cls(self.parts.hostname or "", self.parts.port, timeout=self.timeout)
        all_headers = dict(headers or {})
        if self.api_key:
            all_headers["Authorization"] = f"Bearer {self.api_key}"
        try:
            conn.connect()
        except OSError as exc:  # refused, unresolvable, timed out, TLS refused
            conn.close()
            raise Unreachable(f"no exgen HTTP gateway at {self.url} ({exc})") from None
        try:
            conn.request(method, self.parts.path + path, body=body, headers=all_headers)
            reply = conn.getresponse()
        except _LINK_ERRORS as exc:  # reset mid-upload, closed unanswered, not HTTP
            conn.close()
            raise self._broken(exc) from None
        if reply.status >= 400:
            try:
                message = _error_message(self._read(reply))
            finally:
                conn.close()
            raise ApiError(reply.status, message)
        return conn, reply

    def _read(self, reply: http.client.HTTPResponse, amount: int | None = None) -> bytes:
        """Up to ``amount`` bytes of the body (None: all of it); LinkBroken if the link
        breaks or the body ends before its Content-Length."""
        try:
            data = reply.read(amount)
        except _LINK_ERRORS as exc:
            raise self._broken(exc) from None
        if not data and reply.length:  # read(amount) returns b"" at an early end
            raise self._broken(f"the answer ended {reply.length} bytes short")
        return data

    def _not_a_gateway(self, expected: str, lacking: str) -> NotAGateway:
        return NotAGateway(
            f"what answers at {self.url} is not an exgen HTTP gateway "
            f"(its answer is not {expected}: it has no {lacking})"
        )

    def _broken(self, why: BaseException | str) -> LinkBroken:
        if isinstance(why, http.client.IncompleteRead) and why.expected:
            why = f"the answer ended {why.expected} bytes short"
        elif isinstance(why, BaseException):
            why = f"{type(why).__name__}: {why}"
        why = " ".join(why.split())[:200]  # one line, even for a status line of garbage
        return LinkBroken(f"the connection to the exgen HTTP gateway at {self.url} broke ({why})")


def _parts(head: bytes, f: IO[bytes], tail: bytes) -> Iterator[bytes]:
    yield head
    while chunk := f.read(CHUNK):
        yield chunk
    yield tail


def _quote(ident: str) -> str:
    return urllib.parse.quote(ident, safe="")


def _error_message(raw: bytes) -> str:
    try:
        error = json.loads(raw)["error"]
        return str(error.get("message") or error)
    except (ValueError, KeyError, TypeError, AttributeError):
        return raw.decode(errors="replace")[:500] or "no details"


def endpoint_of(path: str | Path) -> str:
    """The url of the file's first OpenAI Batch line: the batch's endpoint."""
    with open(path, "rb") as f:
        for raw in f:
            if raw.strip():
                try:
                    url = json.loads(raw).get("url")
                except (ValueError, AttributeError):
                    url = None
                if not isinstance(url, str):
                    raise ValueError(f"{path}: the first line is not an OpenAI Batch line")
                return url
    raise ValueError(f"{path} is empty")
