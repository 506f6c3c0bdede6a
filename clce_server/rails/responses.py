"""How answers are rendered: error bodies in the request's format, and the exception handlers that
turn every failure into one (never FastAPI's {"detail": ...}, never a dropped connection)."""

from __future__ import annotations

import logging

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from clce_wire import protocol

from .errors import ApiError, ArgumentError, DeviceError
from .scheduler import SchedulerError

log = logging.getLogger("clce.server")

_CODE_FOR_STATUS = {401: "unauthorized", 404: "not_found", 405: "bad_request", 413: "payload_too_large",
                    415: "unsupported_media_type", 429: "queue_full", 503: "not_ready",
                    504: "deadline_exceeded"}


def wants_msgpack(request: Request) -> bool:
    """Answer in the request's format; when its Content-Type is neither (an error about to be
    raised for it), in the format the client Accepts."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype in (protocol.MSGPACK, protocol.JSON):
        return ctype == protocol.MSGPACK
    accept = request.headers.get("accept", "").lower()
    return protocol.MSGPACK in accept and protocol.JSON not in accept


def error_response(code: str, message: str, *, as_msgpack: bool = False, retry_after: float | None = None,
                   request_id: str | None = None) -> Response:
    status = protocol.ERROR_CODES[code][0]
    body = protocol.error_body(code, message, request_id)
    headers = {"X-Request-ID": request_id} if request_id is not None else {}
    if retry_after is not None:
        headers["Retry-After"] = str(max(1, int(np.ceil(retry_after))))
    if not as_msgpack:
        return JSONResponse(body, status_code=status, headers=headers)
    return Response(b"".join(bytes(s) for s in protocol.encode_message(body)), status_code=status,
                    media_type=protocol.MSGPACK, headers=headers)


def error_for(exc: Exception, request: Request, record=None) -> Response:
    """The answer to a failure, by who caused it: the client's arguments (4xx, PyTorch's type and
    message), admission and deadlines (413/429/503/504), the device (503 + Retry-After), or us
    (500, logged with the request id the response carries). `record`: the loss request's
    RequestRecord (its outcome and id), None on other routes. The one place errors are rendered:
    the loss endpoint calls it, and the exception handlers below for every other route."""
    as_msgpack = wants_msgpack(request)
    if isinstance(exc, ApiError):
        return error_response(exc.code, str(exc), as_msgpack=as_msgpack, retry_after=exc.retry_after)
    if isinstance(exc, ArgumentError):
        return error_response(protocol.code_for_exception(exc.error), str(exc.error), as_msgpack=as_msgpack)
    if isinstance(exc, SchedulerError):
        return error_response(exc.code, str(exc), as_msgpack=as_msgpack, retry_after=getattr(exc, "retry_after", None))
    request_id = record.request_id if record is not None else None
    if isinstance(exc, DeviceError):
        if record is not None:
            record.outcome = "error"
        # the message, not the exception: a kept log record must not keep the request's arrays
        log.error("device failure (request %s): %s", request_id, str(exc))
        return error_response("device_unavailable", str(exc), as_msgpack=as_msgpack, retry_after=exc.retry_after)
    if isinstance(exc, StarletteHTTPException):
        code = _CODE_FOR_STATUS.get(exc.status_code, "bad_request")
        return error_response(code, str(exc.detail), as_msgpack=as_msgpack)
    if isinstance(exc, RequestValidationError):
        return error_response("bad_request", str(exc.errors()), as_msgpack=as_msgpack)
    log.error("request %s failed: %s", request_id, exc, exc_info=exc)
    return error_response("internal", f"internal error (request id {request_id}): {type(exc).__name__}",
                          as_msgpack=as_msgpack, request_id=request_id)


def install_exception_handlers(app: FastAPI) -> None:
    """Every route but the loss endpoint raises into FastAPI: rendered by `error_for` too."""

    async def handler(request: Request, exc: Exception) -> Response:
        return error_for(exc, request)

    for cls in (ApiError, ArgumentError, SchedulerError, DeviceError, StarletteHTTPException,
                RequestValidationError, Exception):
        app.add_exception_handler(cls, handler)
