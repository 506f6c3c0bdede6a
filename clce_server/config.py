"""Server settings: every one from a CLCE_* environment variable, and from a CLI flag."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

MiB = 1 << 20


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CLCE_", extra="ignore")

    host: str = Field("127.0.0.1", description="Address to bind (always loopback by default; 0.0.0.0 "
                      "serves every interface: give it a tenants file, and TLS for keys that cross a network).")
    port: int = Field(8000, ge=0, le=65535, description="TCP port to serve HTTP (or https) on; 0 picks a free one.")
    device: str | None = Field(None, description="Comma-separated OpenCL device selectors "
                               "(index, platform:device, gpu/cpu, or a name substring); one worker per device.")
    device_memory: str = Field("auto", pattern="^(auto|host|discrete)$", description="How kernels reach "
                               "their data: auto (read off each device: host memory on CPU devices, the "
                               "device's own memory on GPUs), host (USE_HOST_PTR, no copies) or discrete "
                               "(buffers in device memory, copies in and out; on PoCL this runs the GPU path).")
    tenants: Path | None = Field(None, description="TOML file with one [tenants.NAME] table per job.")
    max_request_bytes: int = Field(256 * MiB, gt=0, description="Largest request body (413 above).")
    max_inflight_bytes: int = Field(2048 * MiB, gt=0, description="Bytes of all requests in flight (429 above).")
    max_queued: int = Field(64, gt=0, description="Requests one tenant may have queued or running (429 above).")
    tenant_max_inflight_bytes: int = Field(1024 * MiB, gt=0, description="Default per-tenant bytes in flight.")
    chunk_ms: float = Field(20.0, gt=0, description="Device time per chunk of a big batch; tenants "
                            "are interleaved between chunks.")
    scheduling: str = Field("fair", pattern="^(fair|fifo)$", description="fair: per-tenant weighted fair "
                            "queueing between row chunks; fifo: one queue, whole requests (a baseline).")
    max_batch: int = Field(64, ge=1, description="Small requests with the same shape of work share one "
                           "launch, up to this many (1 turns coalescing off).")
    batch_max_elements: int = Field(1 << 16, ge=0, description="Requests of at most this many logits may be coalesced.")
    drain_timeout_s: float = Field(120.0, ge=0, description="On SIGTERM, how long to wait for in-flight work.")
    log_level: str = Field("info", description="Server log level: critical, error, warning, info or debug "
                           "(logger clce.server, and uvicorn's).")
    access_log: bool = Field(True, description="Structured (JSON) access log lines on logger clce.access.")
    warmup: bool = Field(True, description="Run every start-up kernel once before reporting ready.")
    device_threads: int | None = Field(None, ge=1, description="Threads a CPU OpenCL device (PoCL) runs "
                                       "kernels on (default: all cores). Fewer leave cores to the event "
                                       "loop: small tenants wait less under a flood, big batches compute slower.")
    max_stored_weights: int = Field(256, ge=1, description="Weights one tenant may store for the fused linear "
                                    "cross-entropy (429 above; DELETE /v1/weights/NAME frees one).")
    weight_idle_s: float = Field(600.0, gt=0, description="A stored weight version no request has used for "
                                 "this long is dropped, with its unflushed accumulated gradient (a returning "
                                 "client is told it expired, and its client library replays or raises).")
    host_pool_bytes: int = Field(1024 * MiB, ge=0, description="Bytes of large host buffers (bodies, "
                                 "gradients) kept for reuse; peak memory is about max_inflight_bytes + this.")
    # --- hostile and vanishing clients (clce_server/limits.py) ---
    header_timeout_s: float = Field(10.0, ge=0, description="A connection must send a request's line "
                                    "and headers within this time (408 and closed after; 0: no limit).")
    body_timeout_s: float = Field(30.0, ge=0, description="Longest wait for the next piece of a request "
                                  "body; a client that stalls mid-body is cut off with 408 (0: no limit).")
    max_connections: int = Field(1024, ge=1, description="Open connections at most; one more is answered "
                                 "503 with Retry-After and closed.")
    # --- who sees what (tenant isolation) ---
    public_metrics: bool = Field(False, description="With a tenants file, /metrics answers only the admin "
                                 "key ([admin] in the tenants file); this opens it to anyone.")
    metrics_bind: str | None = Field(None, description="HOST:PORT of a second listener serving only the "
                                     "Prometheus metrics, without a key (bind it where only Prometheus reaches).")
    # --- TLS, named as uvicorn names them ---
    ssl_certfile: Path | None = Field(None, description="PEM certificate (chain): serve https.")
    ssl_keyfile: Path | None = Field(None, description="PEM private key of --ssl-certfile.")
    ssl_keyfile_password: str | None = Field(None, description="Password of an encrypted --ssl-keyfile.")
    allow_shm: bool | None = Field(None, description="Shared-memory transport for clients on this host "
                                   "(docs/protocol.md). Default: on when binding loopback, else off.")
    shm_socket: str | None = Field(None, description="Path of the shared-memory registration socket "
                                   "(default: shm.sock in a new private directory).")
    shm_max_bytes: int = Field(8192 * MiB, gt=0, description="Shared-memory bytes one tenant may "
                               "register (413 above).")
    # --- the registration socket on a shared host (clce_server/rails/shm.py; docs/protocol.md) ---
    shm_socket_group: str | None = Field(None, description="Group (name or gid) given the registration "
                                         "socket, which is created 0660: its members may connect. Default: "
                                         "the server's own group.")
    shm_allowed_uids: str | None = Field(None, description="Comma-separated uids (or user names) allowed on "
                                         "the registration socket, checked with SO_PEERCRED on every "
                                         "connection. Without --shm-socket-group the socket is then created "
                                         "0666 and this list is the gate.")
    shm_max_total_bytes: int = Field(32768 * MiB, gt=0, description="Shared-memory bytes all tenants "
                                     "together may register (429 above).")
    shm_max_regions: int = Field(4096, ge=1, description="Regions all tenants together may register, "
                                 "each one mapping and one descriptor (429 above).")
    shm_max_regions_per_tenant: int = Field(256, ge=1, description="Regions one tenant may register (429 above).")
    shm_max_connections: int = Field(256, ge=1, description="Connections to the registration socket at "
                                     "once; one more is answered with an error frame and closed.")
    shm_max_connections_per_uid: int = Field(64, ge=1, description="Connections to the registration socket "
                                             "from one uid (SO_PEERCRED) at once.")
    shm_max_descriptors: int = Field(1024, ge=16, description="Descriptors the registration service may "
                                     "hold (connections and regions); it also keeps an eighth of the "
                                     "process's RLIMIT_NOFILE free for everything else.")
    shm_hello_timeout_s: float = Field(5.0, gt=0, description="A new registration connection must "
                                       "authenticate (hello) within this time.")
    shm_frame_timeout_s: float = Field(5.0, gt=0, description="A registration frame must arrive whole "
                                       "this long after its first byte, and its answer be read within it.")

    @field_validator("log_level")
    @classmethod
    def _level(cls, v: str) -> str:
        v = v.lower()
        if v not in ("critical", "error", "warning", "info", "debug"):
            raise ValueError(f"unknown log level {v!r}")
        return v

    @field_validator("metrics_bind")
    @classmethod
    def _host_port(cls, v: str | None) -> str | None:
        if v is not None:
            host, _, port = v.rpartition(":")
            if not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ValueError(f"expected HOST:PORT, got {v!r}")
        return v

    @property
    def metrics_address(self) -> tuple[str, int] | None:
        if self.metrics_bind is None:
            return None
        host, _, port = self.metrics_bind.rpartition(":")
        return host.strip("[]"), int(port)

    @model_validator(mode="after")
    def _tls_pair(self) -> "Settings":
        if (self.ssl_certfile is None) != (self.ssl_keyfile is None):
            raise ValueError("--ssl-certfile and --ssl-keyfile go together")
        return self

    @field_validator("shm_allowed_uids")
    @classmethod
    def _uids(cls, v: str | None) -> str | None:
        if v is not None:
            parse_uids(v)
        return v

    @field_validator("shm_socket_group")
    @classmethod
    def _group(cls, v: str | None) -> str | None:
        if v is not None:
            parse_gid(v)
        return v

    @property
    def shm_enabled(self) -> bool:
        if self.allow_shm is not None:
            return self.allow_shm
        return self.host in ("127.0.0.1", "localhost", "::1")

    @property
    def device_selectors(self) -> list[str] | None:
        if not self.device:
            return None
        return [s.strip() for s in self.device.split(",") if s.strip()] or None


def parse_uids(text: str) -> frozenset[int]:
    """The uids of a comma-separated list of uids and user names."""
    import pwd

    uids = set()
    for item in (t.strip() for t in text.split(",")):
        if not item:
            continue
        if item.isdigit():
            uids.add(int(item))
            continue
        try:
            uids.add(pwd.getpwnam(item).pw_uid)
        except KeyError:
            raise ValueError(f"no user {item!r}") from None
    if not uids:
        raise ValueError("expected uids or user names, comma-separated")
    return frozenset(uids)


def parse_gid(text: str) -> int:
    """The gid of a group name or number."""
    import grp

    text = text.strip()
    if text.isdigit():
        return int(text)
    try:
        return grp.getgrnam(text).gr_gid
    except KeyError:
        raise ValueError(f"no group {text!r}") from None


# ---- what a refusal says to do ---------------------------------------------------------------------

#: Every limit a 413 or 429 can name: how the operator raises it, and what a client can do
#: instead. The one place these words live, so every refusal names its way out.
LIMIT_HINTS: dict[str, tuple[str, str]] = {
    "max_request_bytes": (
        "--max-request-bytes (CLCE_MAX_REQUEST_BYTES), or max_request_bytes in the tenant's [tenants.NAME] table",
        "on the server's host the client sends big batches over shared memory, which this limit does not "
        "bound; over TCP it splits them into row chunks (Client(pipeline_bytes=...), on by default)"),
    "tenant_max_inflight_bytes": (
        "max_inflight_bytes in the tenant's [tenants.NAME] table, or --tenant-max-inflight-bytes "
        "(CLCE_TENANT_MAX_INFLIGHT_BYTES) for every tenant",
        "retry after Retry-After, send fewer requests at once, or smaller row chunks "
        "(Client(pipeline_bytes=...)); over shared memory the gradient goes into the client's memory "
        "and is not counted"),
    "max_inflight_bytes": (
        "--max-inflight-bytes (CLCE_MAX_INFLIGHT_BYTES)",
        "retry after Retry-After, or send smaller row chunks (Client(pipeline_bytes=...))"),
    "max_stored_weights": (
        "--max-stored-weights (CLCE_MAX_STORED_WEIGHTS)",
        "DELETE /v1/weights/NAME the stored weights you no longer use"),
    "max_queued": (
        "max_queued in the tenant's [tenants.NAME] table, or --max-queued (CLCE_MAX_QUEUED)",
        "retry after Retry-After, or send fewer requests at once"),
    "shm_max_bytes": (
        "--shm-max-bytes (CLCE_SHM_MAX_BYTES)",
        "the clce client splits a batch whose shared memory would not fit into row chunks that do; "
        "free regions you no longer use (Arena.trim), or send over TCP (transport='tcp')"),
    "shm_max_total_bytes": (
        "--shm-max-total-bytes (CLCE_SHM_MAX_TOTAL_BYTES)",
        "retry once other tenants let regions go, or send over TCP (transport='tcp')"),
    "shm_max_regions_per_tenant": (
        "--shm-max-regions-per-tenant (CLCE_SHM_MAX_REGIONS_PER_TENANT)",
        "reuse regions (the clce client's arena does), or unregister those you no longer use"),
    "shm_max_regions": (
        "--shm-max-regions (CLCE_SHM_MAX_REGIONS)",
        "retry once other tenants let regions go, or send over TCP (transport='tcp')"),
}


def over_limit(what: str, limit: str, value: int) -> str:
    """The message of a refusal by `limit` (a key of LIMIT_HINTS) whose value is `value`: what was
    asked, the limit and its value, the setting that raises it, and the alternative."""
    raise_with, instead = LIMIT_HINTS[limit]
    return f"{what}: over {limit}={value}. Raise it with {raise_with}; or {instead}."
