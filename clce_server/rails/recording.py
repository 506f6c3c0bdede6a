"""One record per leased request (the loss and the fused linear cross-entropy routes): its id,
outcome, timings and sizes, taken once when the response has gone out (or failed) and sent to the
metrics and the access log.

Their endpoint (rails/endpoint.py) makes the record first, so requests refused by auth or
readiness, or answered with an error, are recorded by the same one path as answered ones.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field

from ..state import ServerState

access_log = logging.getLogger("clce.access")


def new_request_id() -> str:
    """64 random bits from the OS, per request: a counter would tell a tenant how many requests
    everyone else sent between two of its own."""
    return os.urandom(8).hex()


# outcome label by status, where the stages did not name one
_OUTCOME_BY_STATUS = {200: "ok", 204: "ok", 401: "unauthorized", 413: "too_large", 429: "rejected", 499: "cancelled",
                      503: "rejected", 504: "deadline"}


@dataclass
class RequestRecord:
    """What one request did; the stages fill it in, `publish` sends it once."""

    request_id: str
    started: float = field(default_factory=time.perf_counter)   # headers parsed: the app sees the request
    tenant: str | None = None
    outcome: str | None = None          # set by a stage when the status alone does not say
    timings: dict[str, float] = field(default_factory=dict)   # stage -> seconds
    body_bytes: int = 0
    rows: int = 0
    status: int = 500                   # what went out (500 until a response starts)
    bytes_out: int = 0                  # the answer's body, once it has gone out whole

    def stage(self, name: str, seconds: float) -> None:
        self.timings[name] = seconds

    async def send(self, response, scope, receive, send) -> None:
        """Send `response` (a starlette Response, or endpoint.py's SlicedResponse) with
        X-Request-ID, noting its status, its size and how long it took to go out."""
        self.status = response.status_code
        headers = response.raw_headers
        if not any(k == b"x-request-id" for k, _ in headers):   # a 500's error body names it already
            headers.append((b"x-request-id", self.request_id.encode()))
        t0 = time.perf_counter()
        await response(scope, receive, send)
        self.stage("send", time.perf_counter() - t0)
        body = getattr(response, "body", None)
        self.bytes_out = len(body) if body is not None else response.size

    def publish(self, state: ServerState, client: tuple | None) -> None:
        """The metrics and one JSON access-log line, once the response is out (or failed)."""
        total = time.perf_counter() - self.started
        status = self.status
        outcome = self.outcome or _OUTCOME_BY_STATUS.get(status) or ("client_error" if status < 500 else "error")
        tenant = self.tenant or "unknown"
        t = self.timings
        state.metrics.observe_request(tenant, outcome, total, t.get("queue"), t.get("kernel"), self.body_bytes,
                                      self.bytes_out, self.rows)
        if state.settings.access_log and access_log.isEnabledFor(logging.INFO):
            access_log.info(json.dumps({
                "request_id": self.request_id, "tenant": tenant, "outcome": outcome, "status": status,
                "t_arrive": self.started,
                "bytes_in": self.body_bytes, "bytes_out": self.bytes_out, "rows": self.rows,
                "ms": round(total * 1000, 3),
                **{f"{k}_ms": round(v * 1000, 3) for k, v in t.items() if k != "total"},
                "client": client[0] if client else None}))
