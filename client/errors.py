"""Every error exgen raises, in one tree. Codes cross the wire (protocol.E_*).

    ExgenError                      base of everything below
    ├── ConnectionFailed            the daemon could not be reached / went away
    │   ├── Timeout                 no answer within the client's timeout
    │   │   └── ConnectTimeout      no connection completed within connect_timeout
    │   └── UnsafeSocket            the ipc socket's directory belongs to another user
    ├── ProtocolMismatch            the peer speaks another protocol version, or garbage
    ├── BadKeyFile                  a CURVE key file that cannot be used (client.keys)
    ├── ValidationError             a field of a request is invalid (protocol.py; ``field``)
    └── RequestFailed               the daemon answered with an error (``code``)
        ├── BadRequest              a field is invalid (``field`` names it)
        │   ├── PromptTooLong       prompt + max_new_tokens exceed the model's context
        │   └── ModelNotFound       the item names another model (strict_model daemon)
        ├── Busy                    the queue is full; retry later
        ├── Draining                the daemon is shutting down and takes no new work
        ├── WorkerDied              the item crashed workers too many times (poison?)
        ├── EngineError             the engine failed this item
        ├── Cancelled               the item was cancelled
        ├── DeadlineExceeded        the item's timeout_s passed (waited / ran how long)
        ├── ResultTooLarge          the result is too large for the wire
        ├── Forbidden               cancelling work that is not this client's to cancel
        └── InternalError           a bug in exgen; please report it

Per-item failures arrive on :class:`exgen.client.Result` as ``result.error`` (an
instance of one of these) rather than being raised, so one bad prompt never costs
the rest of a batch; ``Result.raise_for_error()`` raises it on demand. A mistake in
a call itself (a bad parameter, an item that is not a map, a duplicate id) raises
:class:`BadRequest` at once.
"""

from __future__ import annotations

from exgen.client import protocol as P
from exgen.client.exgen_error import ExgenError
from exgen.client.protocol import ValidationError

__all__ = [
    "BadKeyFile",
    "BadRequest",
    "Busy",
    "Cancelled",
    "ConnectTimeout",
    "ConnectionFailed",
    "DeadlineExceeded",
    "Draining",
    "EngineError",
    "ExgenError",
    "Forbidden",
    "InternalError",
    "ModelNotFound",
    "PromptTooLong",
    "ProtocolMismatch",
    "RequestFailed",
    "ResultTooLarge",
    "Timeout",
    "UnsafeSocket",
    "ValidationError",
    "WorkerDied",
    "error_from_wire",
]


class ConnectionFailed(ExgenError):
    """The daemon could not be reached, or stopped answering."""


class Timeout(ConnectionFailed):
    """No answer within the client's timeout."""


class ConnectTimeout(Timeout):
    """No connection to the daemon completed (ZMTP handshake) within connect_timeout."""


class UnsafeSocket(ConnectionFailed):
    """An ipc socket in a directory another user controls: they could swap the socket."""


class ProtocolMismatch(ExgenError):
    """The peer sent something that is not this protocol version."""


class BadKeyFile(ExgenError, ValueError):
    """A CURVE key file that is missing, unreadable, or the wrong half of a pair."""


class RequestFailed(ExgenError):
    """The daemon answered with an error."""

    code = P.E_INTERNAL

    def __init__(
        self, message: str, *, field: str | None = None, item_id: str | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        self.field = field
        self.item_id = item_id

    def __str__(self) -> str:
        where = f"[{self.item_id}] " if self.item_id else ""
        return f"{where}{self.code}: {self.message}"


class BadRequest(RequestFailed):
    code = P.E_BAD_REQUEST


class PromptTooLong(BadRequest):
    code = P.E_PROMPT_TOO_LONG


class ModelNotFound(BadRequest):
    code = P.E_MODEL_NOT_FOUND


class Busy(RequestFailed):
    code = P.E_BUSY


class Draining(RequestFailed):
    code = P.E_DRAINING


class WorkerDied(RequestFailed):
    code = P.E_WORKER_DIED


class EngineError(RequestFailed):
    code = P.E_ENGINE


class Cancelled(RequestFailed):
    code = P.E_CANCELLED


class DeadlineExceeded(RequestFailed):
    code = P.E_TIMEOUT


class ResultTooLarge(RequestFailed):
    code = P.E_TOO_LARGE


class Forbidden(RequestFailed):
    code = P.E_FORBIDDEN


class InternalError(RequestFailed):
    code = P.E_INTERNAL


ERRORS_BY_CODE: dict[str, type[RequestFailed]] = {
    cls.code: cls
    for cls in (
        BadRequest,
        PromptTooLong,
        ModelNotFound,
        Busy,
        Draining,
        WorkerDied,
        EngineError,
        Cancelled,
        DeadlineExceeded,
        ResultTooLarge,
        Forbidden,
        InternalError,
    )
}
ERRORS_BY_CODE[P.E_PROTOCOL] = BadRequest


def error_from_wire(body: dict[str, object], item_id: str | None = None) -> RequestFailed:
    """The exception for an error body; unknown codes become InternalError."""
    code = str(body.get("code", P.E_INTERNAL))
    cls = ERRORS_BY_CODE.get(code, InternalError)
    field = body.get("field")
    return cls(
        str(body.get("message", code)),
        field=field if isinstance(field, str) else None,
        item_id=item_id,
    )


def from_validation(exc: ValidationError, item_id: str | None = None) -> BadRequest:
    """A caller's invalid field, as the BadRequest the library raises or reports."""
    return BadRequest(exc.message, field=exc.field, item_id=item_id)
