"""Client exceptions.

::

    ClceError
    ├── TransportError                 the server could not be reached / did not answer
    │   ├── ConnectError               no replica accepted the connection (after retries)
    │   │   └── TLSVerificationError   the server's certificate failed verification (not retried)
    │   ├── NotAClceServer             the URL answered, but not as a clce server (not retried)
    │   └── Timeout                    a request timed out (not retried: the server is busy)
    │       └── ReadTimeout            the response did not arrive in time
    └── ServerError                    the server answered with an error body (.status .code
        │                              .message .retry_after); str(exc) is the server's message
        ├── BadRequest (400, 415)
        │   ├── ClceValueError   (also ValueError)      \
        │   ├── ClceIndexError   (also IndexError)       } PyTorch's exception for the same
        │   ├── ClceRuntimeError (also RuntimeError)     } arguments, with PyTorch's message
        │   ├── ClceTypeError    (also TypeError)       /
        │   └── ClceOverflowError (also OverflowError) /
        ├── AuthenticationError (401)
        ├── NotFound (404)             the message names the URL asked
        │   └── WeightNotStored        a stored weight version is not on this server: upload it
        ├── PayloadTooLarge (413)
        ├── Overloaded (429)
        ├── ServiceUnavailable (503)
        └── DeadlineExceeded (504)
"""

from __future__ import annotations

import email.utils
import json
import time
from collections.abc import Mapping
from typing import Any

import msgpack

from clce_wire.protocol import ERROR_CODES, JSON, MSGPACK

__all__ = [
    "ClceError",
    "TransportError",
    "ConnectError",
    "TLSVerificationError",
    "NotAClceServer",
    "Timeout",
    "ReadTimeout",
    "ServerError",
    "BadRequest",
    "AuthenticationError",
    "NotFound",
    "WeightNotStored",
    "PayloadTooLarge",
    "Overloaded",
    "ServiceUnavailable",
    "DeadlineExceeded",
    "ClceValueError",
    "ClceIndexError",
    "ClceRuntimeError",
    "ClceTypeError",
    "ClceOverflowError",
    "error_from_response",
]


class ClceError(Exception):
    """Base class of every error the clce client raises."""


class TransportError(ClceError):
    """The request did not get an HTTP response."""


class ConnectError(TransportError):
    """No replica could be connected to (or each dropped the connection), after retries."""


class TLSVerificationError(ConnectError):
    """The server's TLS certificate did not verify against the CAs the client trusts. Permanent:
    raised at once, naming the URL and the CAs (``verify=`` names the bundle to trust)."""


class NotAClceServer(TransportError):
    """The URL answered, but not as a clce server does (another service on that port, a proxy's
    page). Permanent: raised at once, naming the URL and what it answered."""


class Timeout(TransportError):
    """A request timed out."""


class ReadTimeout(Timeout):
    """The server did not answer within the read timeout."""


class ServerError(ClceError):
    """The server answered with an error. ``str(exc)`` is exactly the server's message."""

    def __init__(
        self,
        message: str,
        *,
        status: int,
        code: str,
        retry_after: float | None = None,
    ):
        super().__init__(message)
        self.message = message
        self.status = status
        self.code = code
        self.retry_after = retry_after

    def __str__(self) -> str:
        return self.message

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({self.message!r}, status={self.status}, code={self.code!r}"
            + (f", retry_after={self.retry_after}" if self.retry_after is not None else "")
            + ")"
        )

    def __reduce__(self):  # keyword-only arguments need help to pickle (multiprocessing)
        return _rebuild, (type(self), self.message, self.status, self.code, self.retry_after)


def _rebuild(cls, message, status, code, retry_after):
    return cls(message, status=status, code=code, retry_after=retry_after)


class BadRequest(ServerError):
    """The request was invalid (400) or of an unsupported media type (415)."""


class AuthenticationError(ServerError):
    """Missing or unknown API key (401)."""


class NotFound(ServerError):
    """No such endpoint (404): check the URL."""


class WeightNotStored(NotFound):
    """The stored weight version a call names is not on this server (404 `weight_not_stored`):
    never uploaded here, replaced, evicted, expired, dropped with its accumulated gradient, or
    lost in a restart. The client uploads it again (once per call) and retries."""


class PayloadTooLarge(ServerError):
    """The request is larger than the server accepts (413)."""


class Overloaded(ServerError):
    """The server's queue is full (429); ``retry_after`` says when to try again."""


class ServiceUnavailable(ServerError):
    """The server is not ready (503)."""


class DeadlineExceeded(ServerError):
    """The request's deadline passed before it could be computed (504)."""


class ClceValueError(BadRequest, ValueError):
    """The ValueError PyTorch raises for these arguments."""


class ClceIndexError(BadRequest, IndexError):
    """The IndexError PyTorch raises for these arguments."""


class ClceRuntimeError(BadRequest, RuntimeError):
    """The RuntimeError PyTorch raises for these arguments."""


class ClceTypeError(BadRequest, TypeError):
    """The TypeError PyTorch raises for these arguments."""


class ClceOverflowError(BadRequest, OverflowError):
    """The OverflowError PyTorch raises for these arguments (a number no double can hold)."""


_CLASS_BY_CODE: dict[str, type[ServerError]] = {
    "value_error": ClceValueError,
    "index_error": ClceIndexError,
    "runtime_error": ClceRuntimeError,
    "type_error": ClceTypeError,
    "overflow_error": ClceOverflowError,
    "bad_request": BadRequest,
    "unsupported_media_type": BadRequest,
    "unauthorized": AuthenticationError,
    "not_found": NotFound,
    "weight_not_stored": WeightNotStored,
    "payload_too_large": PayloadTooLarge,
    "queue_full": Overloaded,
    "deadline_exceeded": DeadlineExceeded,
    "not_ready": ServiceUnavailable,
    "device_unavailable": ServiceUnavailable,
    "internal": ServerError,
}
assert _CLASS_BY_CODE.keys() == ERROR_CODES.keys()
_CODE_BY_STATUS = {
    400: "bad_request",
    401: "unauthorized",
    403: "unauthorized",
    404: "not_found",
    413: "payload_too_large",
    415: "unsupported_media_type",
    429: "queue_full",
    503: "not_ready",
    504: "deadline_exceeded",
}


def _header(headers: Any, name: str) -> str | None:
    if headers is None:
        return None
    value = headers.get(name)  # httpx.Headers is case-insensitive
    if value is None and isinstance(headers, Mapping):
        lowered = name.lower()
        for key, val in headers.items():
            if str(key).lower() == lowered:
                return val
    return value


def _retry_after(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return max(float(value), 0.0)
    except ValueError:
        pass
    try:  # the HTTP-date form
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(when.timestamp() - time.time(), 0.0)


def _parse_error(body: bytes, content_type: str | None) -> tuple[str, str] | None:
    media = (content_type or "").split(";")[0].strip().lower()
    try:
        if media == MSGPACK:
            doc = msgpack.unpackb(body, raw=False)
        elif media == JSON or media.endswith("+json"):
            doc = json.loads(body)
        else:
            return None
    except Exception:  # any undecodable body falls back to the status line
        return None
    err = doc.get("error") if isinstance(doc, dict) else None
    if isinstance(err, dict) and isinstance(err.get("message"), str):
        return str(err.get("code") or ""), err["message"]
    # FastAPI's own errors (e.g. a route that does not exist): {"detail": ...}
    if isinstance(doc, dict) and "detail" in doc:
        detail = doc["detail"]
        return "", detail if isinstance(detail, str) else json.dumps(detail)
    return None


def error_from_response(
    status: int, body: bytes, content_type: str | None, headers: Any = None, url: str | None = None
) -> ServerError:
    """The exception for an error response; its class follows the error code (else the status).

    With `url` (the address asked), a 404 and an answer that is not a clce error body name it:
    the usual cause of both is a URL that is not a clce server's base address."""
    parsed = _parse_error(bytes(body), content_type)
    if parsed is not None:
        code, message = parsed
    else:
        text = bytes(body[:200]).decode("utf-8", "replace").strip()
        code, message = "", f"HTTP {status}" + (f": {text}" if text else "")
    if code not in _CLASS_BY_CODE:
        code = _CODE_BY_STATUS.get(status, "internal")
        if url is not None:   # not a clce error body: a proxy, or not a clce server at all
            message = f"{url} answered {message}"
            if status in (404, 405):
                message += ": is this a clce server's base URL?"
    elif url is not None and status == 404:
        message = f"{url}: {message}"
        if message.endswith(": Not Found"):   # no such route, as opposed to a named thing not found
            message += (" (no such endpoint: a clce URL is the server's base address, as "
                        "http://127.0.0.1:8000, without /v1)")
    return _CLASS_BY_CODE[code](
        message,
        status=status,
        code=code,
        retry_after=_retry_after(_header(headers, "retry-after")),
    )
