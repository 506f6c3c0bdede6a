"""Prometheus metrics (names and labels as listed in docs/architecture.md).

Each `Metrics` owns its own CollectorRegistry rather than the process-global one, so several apps
(or tests) in one process do not clash over metric names. Labels carry tenant names only, never
API keys.
"""

from __future__ import annotations

import socket
from importlib import metadata
from typing import Iterable

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

OUTCOMES = (
    "ok",
    "client_error",
    "unauthorized",
    "too_large",
    "rejected",
    "deadline",
    "cancelled",
    "error",
)

# Label used for requests that cannot be attributed to a registered tenant (e.g. bad API key).
UNKNOWN_TENANT = "unknown"

# 0.1 ms .. 60 s, roughly 1-2.5-5 per decade: small chunks on a fast GPU up to huge requests.
DURATION_BUCKETS = (
    0.0001, 0.00025, 0.0005,
    0.001, 0.0025, 0.005,
    0.01, 0.025, 0.05,
    0.1, 0.25, 0.5,
    1.0, 2.5, 5.0,
    10.0, 30.0, 60.0,
)  # fmt: skip


def _package_version() -> str:
    try:
        return metadata.version("clce")
    except metadata.PackageNotFoundError:
        return "0+unknown"


class Metrics:
    """All clce metrics on a private registry.

    `tenants`, when given, is the closed set of tenant label values: any other name is recorded
    as ``unknown`` so a caller mistake cannot create unbounded label cardinality.
    """

    def __init__(
        self,
        *,
        tenants: Iterable[str] | None = None,
        version: str | None = None,
        instance: str | None = None,
    ) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._children: dict[str, tuple] = {}
        r = self.registry
        self._restricted = tenants is not None
        self._known: set[str] = {UNKNOWN_TENANT}

        # prometheus_client appends "_total" to counter names itself.
        self._requests = Counter(
            "clce_requests", "Requests by tenant and outcome.", ["tenant", "outcome"], registry=r
        )
        self._request_duration = Histogram(
            "clce_request_duration_seconds",
            "Request latency as seen by the server (body read to response).",
            ["tenant"],
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self._queue_duration = Histogram(
            "clce_queue_duration_seconds",
            "Time from admission to the first device step.",
            ["tenant"],
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self._compute_duration = Histogram(
            "clce_compute_duration_seconds",
            "Device seconds used by one request.",
            ["tenant"],
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self._request_bytes = Counter(
            "clce_request_bytes", "Request body bytes.", ["tenant"], registry=r
        )
        self._response_bytes = Counter(
            "clce_response_bytes", "Response body bytes.", ["tenant"], registry=r
        )
        self._inflight_bytes = Gauge(
            "clce_inflight_bytes", "Bytes admitted and not yet finished.", ["tenant"], registry=r
        )
        self._queue_depth = Gauge(
            "clce_queue_depth", "Jobs admitted and not yet finished.", ["tenant"], registry=r
        )
        self._device_busy = Counter(
            "clce_device_busy_seconds", "Device seconds used by jobs.", ["device"], registry=r
        )
        self._rows = Counter("clce_rows", "Rows (tokens) processed.", ["tenant"], registry=r)
        self._build_info = Gauge(
            "clce_build_info", "Build information (value is always 1).", ["version", "instance"],
            registry=r,
        )
        self._build_info.labels(
            version or _package_version(), instance or socket.gethostname()
        ).set(1)

        for name in tenants or ():
            self.add_tenant(name)

    def add_tenant(self, name: str) -> None:
        """Create the tenant's series at zero, so dashboards and rate() see them from the start."""
        self._known.add(name)
        self._inflight_bytes.labels(name)
        self._queue_depth.labels(name)
        for outcome in OUTCOMES:
            self._requests.labels(name, outcome)

    def add_device(self, name: str) -> None:
        self._device_busy.labels(name)

    def _tenant(self, name: str) -> str:
        if self._restricted and name not in self._known:
            return UNKNOWN_TENANT
        return name

    def observe_request(
        self,
        tenant: str,
        outcome: str,
        total_s: float | None = None,
        queue_s: float | None = None,
        compute_s: float | None = None,
        bytes_in: int = 0,
        bytes_out: int = 0,
        rows: int = 0,
    ) -> None:
        """Record one finished request. Durations left as None (never measured) are skipped."""
        if outcome not in OUTCOMES:
            raise ValueError(f"unknown outcome {outcome!r}; expected one of {OUTCOMES}")
        t = self._tenant(tenant)
        ch = self._children.get(t)
        if ch is None:   # label lookups cost more than the updates: once per tenant
            ch = self._children[t] = (
                {o: self._requests.labels(t, o) for o in OUTCOMES}, self._request_duration.labels(t),
                self._queue_duration.labels(t), self._compute_duration.labels(t),
                self._request_bytes.labels(t), self._response_bytes.labels(t), self._rows.labels(t))
        requests, total, queue, compute, bin_, bout, nrows = ch
        requests[outcome].inc()
        if total_s is not None:
            total.observe(total_s)
        if queue_s is not None:
            queue.observe(queue_s)
        if compute_s is not None:
            compute.observe(compute_s)
        if bytes_in:
            bin_.inc(bytes_in)
        if bytes_out:
            bout.inc(bytes_out)
        if rows:
            nrows.inc(rows)

    def inflight_bytes(self, tenant: str) -> Gauge:
        """The tenant's clce_inflight_bytes gauge child (use .set/.inc/.dec)."""
        return self._inflight_bytes.labels(self._tenant(tenant))

    def queue_depth(self, tenant: str) -> Gauge:
        """The tenant's clce_queue_depth gauge child (use .set/.inc/.dec)."""
        return self._queue_depth.labels(self._tenant(tenant))

    def device_busy(self, device: str, seconds: float) -> None:
        if seconds > 0:
            self._device_busy.labels(device).inc(seconds)

    def render(self) -> tuple[bytes, str]:
        """Body and content type for GET /metrics."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
