"""OpenAI error objects with the right HTTP status, and exgen's error codes mapped to them.

Every failure a caller sees is ``{"error": {"message", "type", "param", "code"}}``
(the shape the openai SDK parses into its APIStatusError subclasses).
"""

from __future__ import annotations

from typing import Any

from exgen.client import errors
from exgen.client import openai_body as O
from exgen.client import protocol as P

INVALID = "invalid_request_error"
SERVER = "server_error"

# exgen's wire codes -> (HTTP status, OpenAI error type): a batch line's as the batch
# output file has it, and the codes only an interactive request meets.
STATUS_BY_CODE: dict[str, tuple[int, str]] = {
    **O.OPENAI_HTTP_ERRORS,
    # The result passed max_result_bytes; the router's message says "ask for fewer
    # tokens": the caller's to fix, and a 4xx the SDKs do not retry.
    P.E_TOO_LARGE: (400, INVALID),
    P.E_BUSY: (429, "rate_limit_error"),
    P.E_DRAINING: (503, SERVER),
    P.E_TIMEOUT: (504, SERVER),
    P.E_FORBIDDEN: (403, "permission_error"),
    P.E_CANCELLED: (503, SERVER),
    P.E_PROTOCOL: (500, SERVER),
}
# The request field an error is about when the daemon names none.
PARAM_BY_CODE = {P.E_MODEL_NOT_FOUND: "model", P.E_TOO_LARGE: "max_tokens"}
# What a code adds to the daemon's message: the gateway setting behind it.
SETTING_BY_CODE = {P.E_TIMEOUT: "the request's deadline, http_request_timeout_s"}
# The code of an error raised without one: every error object carries a code.
CODE_BY_STATUS = {
    400: P.E_BAD_REQUEST,
    401: "invalid_api_key",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    413: "request_too_large",
    415: "unsupported_media_type",
    429: "rate_limit_exceeded",
    502: "bad_gateway",
    503: "unavailable",
    504: "timeout",
}


class ApiError(Exception):
    """An HTTP error answer; raised anywhere in a handler, rendered by the app."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        kind: str | None = None,
        retry_after_s: float | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code or CODE_BY_STATUS.get(status, P.E_INTERNAL)
        self.kind = kind or (INVALID if status < 500 else SERVER)
        self.retry_after_s = retry_after_s

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.kind,
                "param": self.param,
                "code": self.code,
            }
        }

    def headers(self) -> dict[str, str]:
        if self.retry_after_s is None:
            return {}
        return {"Retry-After": str(max(1, round(self.retry_after_s)))}


def from_request_failed(exc: errors.RequestFailed, url: str | None = None) -> ApiError:
    """The HTTP answer for an item the daemon failed (or refused); ``url``: the endpoint
    asked, whose prompt field a too-long prompt's error names."""
    status, kind = STATUS_BY_CODE.get(exc.code, (500, SERVER))
    param = exc.field.removeprefix("params.") if exc.field else PARAM_BY_CODE.get(exc.code)
    if exc.code == P.E_PROMPT_TOO_LONG and param is None:
        param = O.prompt_field(url)
    retry = 1.0 if status in (429, 503) else None
    code = O.OPENAI_ERROR_CODES.get(exc.code, exc.code)
    setting = SETTING_BY_CODE.get(exc.code)
    message = f"{exc.message} ({setting})" if setting else exc.message
    return ApiError(status, message, param=param, code=code, kind=kind, retry_after_s=retry)


def from_exgen_error(exc: errors.ExgenError, url: str | None = None) -> ApiError:
    """The HTTP answer for anything the client library raised or reported."""
    if isinstance(exc, errors.RequestFailed):
        return from_request_failed(exc, url)
    if isinstance(exc, errors.ConnectionFailed):  # Timeout, ConnectTimeout, UnsafeSocket
        return ApiError(
            503, f"the exgen daemon does not answer: {exc}", code="unavailable", retry_after_s=1
        )
    if isinstance(exc, errors.ProtocolMismatch):  # the router behind us speaks another version
        return ApiError(
            502, f"the exgen daemon's answer was not understood: {exc}", code=P.E_PROTOCOL
        )
    return ApiError(500, f"{type(exc).__name__}: {exc}")


def bad_body(message: str) -> ApiError:
    """A 400 for a request body openai_body refused; ``param`` from its message."""
    text = message.replace("body.", "")
    return ApiError(400, text, param=O.param_in_message(message), code=P.E_BAD_REQUEST)


def not_found(what: str, ident: str) -> ApiError:
    return ApiError(404, f"No {what} with id {ident!r}", code="not_found", param="id")
