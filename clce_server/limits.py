"""Slow and vanishing clients: limits that sit below the application.

* `http_protocol`: uvicorn's HTTP protocol, plus a header read timeout (a connection must deliver
  a request's line and headers within `header_timeout_s` of connecting, or of its first byte on a
  kept-alive connection; else 408 and close) and a connection limit (a connection beyond
  `max_connections` is answered 503 with Retry-After and closed at once). uvicorn has neither:
  its keep-alive timeout only runs between requests, and limit_concurrency answers per request
  while the connection stays open.
* `ClientGuard`: ASGI middleware (app.build_app adds it). A client that stalls mid-body for
  `body_timeout_s` (no further chunk arrives) is answered 408 and its connection closed, whatever
  the app was doing. (A client that vanishes mid-download costs nothing more: the request's lease
  gives its buffers back when the endpoint returns, rails/lease.py.)

`http_protocol` builds on uvicorn's private protocol attributes (`connections`, `cycle`,
`cycle.response_complete`, `transport`, `loop`); pyproject.toml bounds uvicorn to the versions
tests/rails/test_limits.py checks them on.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

log = logging.getLogger("clce.server")

# Python 3.11+: a timer on the current task, no extra task per receive(); 3.10: wait_for
_timeout = getattr(asyncio, "timeout", None)

def _error_bytes(code: str, message: str) -> bytes:
    return json.dumps({"error": {"code": code, "message": message}}).encode()


def _raw_response(status: int, reason: str, code: str, message: str, retry_after: int | None = None) -> bytes:
    body = _error_bytes(code, message)
    head = [f"HTTP/1.1 {status} {reason}", "content-type: application/json",
            f"content-length: {len(body)}", "connection: close"]
    if retry_after is not None:
        head.append(f"retry-after: {retry_after}")
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


_TOO_MANY = _raw_response(503, "Service Unavailable", "not_ready",
                          "too many connections to this server; retry, or use another replica", 1)
_HEADER_TIMEOUT = _raw_response(408, "Request Timeout", "bad_request",
                                "request headers not received in time")


def http_protocol(header_timeout_s: float | None, max_connections: int | None, base: type | None = None) -> type:
    """uvicorn's HTTP protocol class (httptools when installed, else h11) with a header read
    timeout and a connection limit. Pass the result as ``uvicorn.Config(http=...)``."""
    if base is None:
        from uvicorn.protocols.http.auto import AutoHTTPProtocol as base

    class LimitedHTTPProtocol(base):
        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._header_timer = None
            if max_connections is not None and len(self.connections) > max_connections:
                log.warning("connection limit (%d) reached: refusing a connection", max_connections)
                transport.write(_TOO_MANY)
                transport.close()
                return
            self._arm()

        def _arm(self) -> None:
            if header_timeout_s and self._header_timer is None:
                self._header_timer = self.loop.call_later(header_timeout_s, self._headers_too_slow)

        def _disarm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def data_received(self, data: bytes) -> None:
            before = self.cycle
            if before is None or before.response_complete:
                self._arm()       # bytes of a new request: its headers are on the clock
            super().data_received(data)
            if self.cycle is not before:
                self._disarm()    # a new request's headers are complete

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _headers_too_slow(self) -> None:
            self._header_timer = None
            transport = self.transport
            if transport.is_closing():
                return
            if self.cycle is None or self.cycle.response_complete:
                transport.write(_HEADER_TIMEOUT)
            transport.close()

    LimitedHTTPProtocol.__name__ = LimitedHTTPProtocol.__qualname__ = f"Limited{base.__name__}"
    return LimitedHTTPProtocol


class ClientGuard:
    """ASGI middleware: each wait for the next piece of a request body is limited to
    `body_timeout_s` (a stalled client is answered 408 with ``Connection: close``, so uvicorn
    closes the connection; the app sees a disconnect, as if the client had gone)."""

    def __init__(self, app: Any, body_timeout_s: float | None):
        self.app = app
        self.timeout_s = body_timeout_s

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        await self._guarded(scope, receive, send, {"body_done": False, "stalled": False, "started": False})

    async def _guarded(self, scope, receive, send, state) -> None:
        timeout_s = self.timeout_s
        if not timeout_s:
            state["body_done"] = True

        async def timed_receive():
            if state["body_done"] or state["stalled"]:
                # after the body, receive() only reports a disconnect: the app may wait on it
                return await receive() if not state["stalled"] else {"type": "http.disconnect"}
            try:
                if _timeout is not None:
                    async with _timeout(timeout_s):
                        msg = await receive()
                else:
                    msg = await asyncio.wait_for(receive(), timeout_s)
            except asyncio.TimeoutError:   # the built-in TimeoutError since Python 3.11, not before
                state["stalled"] = True
                log.info("request body stalled for %.1f s: cutting the client off", timeout_s)
                return {"type": "http.disconnect"}
            if msg["type"] != "http.request" or not msg.get("more_body", False):
                state["body_done"] = True
            return msg

        async def guarded_send(msg) -> None:
            if state["stalled"]:
                return            # the app's answer to a request it never got whole: dropped
            if msg["type"] == "http.response.start":
                state["started"] = True
            await send(msg)

        try:
            await self.app(scope, timed_receive, guarded_send)
        except Exception:
            if not state["stalled"]:
                raise
            # what the app made of the disconnect we handed it does not matter: answered below
        if state["stalled"] and not state["started"]:
            body = _error_bytes("bad_request", f"request body stalled for more than {timeout_s:g} s")
            await send({"type": "http.response.start", "status": 408, "headers": [
                (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                (b"connection", b"close")]})
            await send({"type": "http.response.body", "body": body})
