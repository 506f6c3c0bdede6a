"""One record per loss request: its id, outcome, timings and sizes, taken once when the response
has gone out (or failed) and sent to the metrics and the access log.

An ASGI middleware rather than code in the endpoint, so requests refused by a dependency (auth,
readiness) or answered by an exception handler are recorded by the same one path.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field

from .state import ServerState

access_log = logging.getLogger("clce.access")


def new_request_id() -> str:
    """64 random bits from the OS, per request: a counter would tell a tenant how many requests
    everyone else sent between two of its own."""
    return os.urandom(8).hex()


# outcome label by status, where the stages did not name one
_OUTCOME_BY_STATUS = {200: "ok", 401: "unauthorized", 413: "too_large", 429: "rejected", 499: "cancelled",
                      503: "rejected", 504: "deadline"}


@dataclass
class RequestRecord:
    """What one request did; stages fill it in, `RecordRequests` publishes it."""

    request_id: str
    started: float = field(default_factory=time.perf_counter)   # headers parsed: the app sees the request
    tenant: str | None = None
    outcome: str | None = None          # set by a stage when the status alone does not say
    timings: dict[str, float] = field(default_factory=dict)   # stage -> seconds
    body_bytes: int = 0
    rows: int = 0
    on_done: list = field(default_factory=list)   # called once the response is out (or failed)

    def stage(self, name: str, seconds: float) -> None:
        self.timings[name] = seconds


class RecordRequests:
    """ASGI middleware over the loss path: a request id (X-Request-ID) for every response, and one
    record per request in the metrics and the access log."""

    def __init__(self, app, *, paths: frozenset[str]):
        self.app = app
        self.paths = paths

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] not in self.paths:
            return await self.app(scope, receive, send)
        state: ServerState = scope["app"].state.clce
        record = RequestRecord(new_request_id())
        scope.setdefault("state", {})["clce_request"] = record
        status, sent, send_started = 500, 0, None

        async def send_recorded(message):
            nonlocal status, sent, send_started
            if message["type"] == "http.response.start":
                send_started = time.perf_counter()
                status = message["status"]
                headers = list(message.get("headers", []))
                if not any(k.lower() == b"x-request-id" for k, _ in headers):
                    headers.append((b"x-request-id", record.request_id.encode()))
                message = {**message, "headers": headers}
            elif message["type"] == "http.response.body":
                sent += len(message.get("body", b""))
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body") and send_started:
                record.stage("send", time.perf_counter() - send_started)

        state.inflight_http += 1
        try:
            await self.app(scope, receive, send_recorded)
        finally:
            state.inflight_http -= 1
            for done in record.on_done:
                done()
            _publish(state, scope, record, status, sent)


def _publish(state: ServerState, scope, record: RequestRecord, status: int, sent: int) -> None:
    total = time.perf_counter() - record.started
    outcome = record.outcome or _OUTCOME_BY_STATUS.get(status) or ("client_error" if status < 500 else "error")
    tenant = record.tenant or "unknown"
    t = record.timings
    state.metrics.observe_request(tenant, outcome, total, t.get("queue"), t.get("kernel"), record.body_bytes,
                                  sent, record.rows)
    if state.settings.access_log and access_log.isEnabledFor(logging.INFO):
        client = scope.get("client")
        access_log.info(json.dumps({
            "request_id": record.request_id, "tenant": tenant, "outcome": outcome, "status": status,
            "t_arrive": record.started,
            "bytes_in": record.body_bytes, "bytes_out": sent, "rows": record.rows, "ms": round(total * 1000, 3),
            **{f"{k}_ms": round(v * 1000, 3) for k, v in t.items() if k != "total"},
            "client": client[0] if client else None}))
