"""Server settings: every one from a CLCE_* environment variable, and from a CLI flag."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

MiB = 1 << 20


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CLCE_", extra="ignore")

    host: str = Field("127.0.0.1", description="Address to bind. Loopback unless a tenants file is given.")
    port: int = Field(8000, ge=0, le=65535)
    device: str | None = Field(None, description="Comma-separated OpenCL device selectors "
                               "(index, platform:device, gpu/cpu, or a name substring); one worker per device.")
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
    log_level: str = Field("info")
    access_log: bool = Field(True, description="Structured (JSON) access log lines on logger clce.access.")
    warmup: bool = Field(True, description="Run every start-up kernel once before reporting ready.")
    allow_shm: bool | None = Field(None, description="Shared-memory transport for clients on this host "
                                   "(docs/protocol.md). Default: on when binding loopback, else off.")
    shm_socket: str | None = Field(None, description="Path of the shared-memory registration socket "
                                   "(default: shm.sock in a new private directory).")
    shm_max_bytes: int = Field(8192 * MiB, gt=0, description="Shared-memory bytes one tenant may "
                               "register (413 above).")

    @field_validator("log_level")
    @classmethod
    def _level(cls, v: str) -> str:
        v = v.lower()
        if v not in ("critical", "error", "warning", "info", "debug"):
            raise ValueError(f"unknown log level {v!r}")
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
