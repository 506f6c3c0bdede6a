"""Tenants (training jobs sharing one server) and API-key authentication.

A tenants file is TOML with one table per tenant::

    [tenants.train-a]
    api_key = "..."
    weight = 2                      # share of device time under contention
    max_request_bytes = 268435456   # largest single request body
    max_inflight_bytes = 1073741824 # bytes admitted and not yet finished
    max_queued = 64                 # jobs admitted and not yet finished

An optional ``[admin]`` table declares the operator's key::

    [admin]
    api_key = "..."

A tenant's key sees only its own rows of /v1/status and the status page; the admin key sees
every tenant, and /metrics. The admin key is not a tenant: it cannot submit work.

Without a tenants file the server is open: one anonymous tenant ``default`` and no auth.
API keys never appear in reprs, logs or error messages.
"""

from __future__ import annotations

import hashlib
import hmac
import math
from dataclasses import dataclass, field
from os import PathLike
from typing import Any, Iterable, Iterator, Mapping

try:
    import tomllib
except ModuleNotFoundError:   # Python 3.10 (pyproject.toml: tomli there)
    import tomli as tomllib

MiB = 1 << 20
GiB = 1 << 30

DEFAULT_TENANT_NAME = "default"

# Fields a tenant table (or a `defaults` mapping) may set, besides api_key.
LIMIT_FIELDS = ("weight", "priority", "max_request_bytes", "max_inflight_bytes", "max_queued",
                "max_queue_time_ms")
_TABLE_FIELDS = frozenset(("api_key", *LIMIT_FIELDS))


@dataclass(frozen=True)
class Tenant:
    """One client job with its fair-share weight and admission limits."""

    name: str
    # repr=False keeps the key out of repr()/str(), logs and tracebacks.
    api_key: str | None = field(default=None, repr=False, compare=False)
    weight: float = 1.0
    max_request_bytes: int = 256 * MiB
    max_inflight_bytes: int = 1 * GiB
    max_queued: int = 64
    # Triton's priority levels: 1 is the highest; a level's queued work is served before any of a
    # lower level's, and weights share the device within a level.
    priority: int = 1
    # queue policy: work still queued after this long is rejected (504); None waits as long as it takes
    max_queue_time_ms: float | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"tenant name must be a non-empty string, got {self.name!r}")
        if self.api_key is not None:
            _check_api_key(self.name, self.api_key)
        weight = self.weight
        if isinstance(weight, bool) or not isinstance(weight, (int, float)):
            raise ValueError(_field_error(self.name, "weight", "a positive number", weight))
        if not (math.isfinite(weight) and weight > 0):
            raise ValueError(_field_error(self.name, "weight", "a positive number", weight))
        object.__setattr__(self, "weight", float(weight))
        qt = self.max_queue_time_ms
        if qt is not None and (isinstance(qt, bool) or not isinstance(qt, (int, float))
                               or not (math.isfinite(qt) and qt > 0)):
            raise ValueError(_field_error(self.name, "max_queue_time_ms", "a positive number", qt))
        for name in ("priority", "max_request_bytes", "max_inflight_bytes", "max_queued"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(_field_error(self.name, name, "a positive integer", value))


def _field_error(tenant: str, name: str, expected: str, value: Any) -> str:
    return f"tenant {tenant!r}: field {name!r} must be {expected}, got {value!r}"


def _check_api_key(tenant: str, key: Any) -> None:
    # Messages describe the problem but never include the key itself.
    if not isinstance(key, str):
        raise ValueError(f"tenant {tenant!r}: field 'api_key' must be a string")
    if not key:
        raise ValueError(f"tenant {tenant!r}: field 'api_key' must not be empty")
    if any(c.isspace() for c in key):
        # "Authorization: Bearer <key>" is split on whitespace, so such a key could never match.
        raise ValueError(f"tenant {tenant!r}: field 'api_key' must not contain whitespace")


def _key_digest(key: str) -> bytes:
    # Comparing fixed-length digests keeps compare_digest from leaking the key length.
    return hashlib.sha256(key.encode("utf-8")).digest()


def _parse_bearer(header: str | None) -> str | None:
    if not header:
        return None
    parts = header.split()
    if len(parts) != 2 or parts[0].lower() != "bearer":
        return None
    return parts[1]


def _check_defaults(defaults: Mapping[str, Any] | None) -> dict[str, Any]:
    if defaults is None:
        return {}
    unknown = sorted(set(defaults) - set(LIMIT_FIELDS))
    if unknown:
        raise ValueError(f"unknown tenant default(s) {unknown}; allowed: {list(LIMIT_FIELDS)}")
    return dict(defaults)


class TenantRegistry:
    """The set of tenants and how a request is mapped to one."""

    def __init__(self, tenants: Iterable[Tenant], *, auth_required: bool = True,
                 admin_key: str | None = None) -> None:
        self._tenants: list[Tenant] = list(tenants)
        self._auth_required = bool(auth_required)
        self._admin_digest: bytes | None = None
        if admin_key is not None:
            if not self._auth_required:
                raise ValueError("an admin key needs tenants with keys (an open server has no secrets)")
            _check_api_key("admin", admin_key)
            self._admin_digest = _key_digest(admin_key)
        if not self._tenants:
            raise ValueError("at least one tenant is required")
        by_name: dict[str, Tenant] = {}
        for tenant in self._tenants:
            if tenant.name in by_name:
                raise ValueError(f"duplicate tenant name {tenant.name!r}")
            by_name[tenant.name] = tenant
        self._by_name = by_name
        self._digests: list[tuple[Tenant, bytes]] = []
        if self._auth_required:
            owner_of: dict[bytes, str] = {}
            for tenant in self._tenants:
                if tenant.api_key is None:
                    raise ValueError(f"tenant {tenant.name!r}: field 'api_key' is required")
                digest = _key_digest(tenant.api_key)
                if digest in owner_of:
                    raise ValueError(
                        f"tenants {owner_of[digest]!r} and {tenant.name!r}: field 'api_key' "
                        "must be unique (two tenants share a key)"
                    )
                owner_of[digest] = tenant.name
                self._digests.append((tenant, digest))
            if self._admin_digest is not None and self._admin_digest in owner_of:
                raise ValueError(f"[admin] and tenant {owner_of[self._admin_digest]!r}: field 'api_key' "
                                 "must be unique (the admin key is also a tenant's key)")
        elif len(self._tenants) != 1:
            raise ValueError("an open registry (auth disabled) has exactly one tenant")

    @classmethod
    def open(cls, defaults: Mapping[str, Any] | None = None) -> "TenantRegistry":
        """No tenants file: one anonymous tenant ``default``, every request accepted."""
        return cls([Tenant(DEFAULT_TENANT_NAME, **_check_defaults(defaults))], auth_required=False)

    @classmethod
    def from_toml(
        cls, path: str | PathLike[str], defaults: Mapping[str, Any] | None = None
    ) -> "TenantRegistry":
        """Parse a tenants file; `defaults` fills limits a tenant table leaves out."""
        base = _check_defaults(defaults)
        try:
            with open(path, "rb") as f:
                data = tomllib.load(f)
        except tomllib.TOMLDecodeError as exc:
            raise ValueError(f"tenants file {str(path)!r}: invalid TOML: {exc}") from None
        unknown_top = sorted(set(data) - {"tenants", "admin"})
        if unknown_top:
            raise ValueError(
                f"tenants file {str(path)!r}: unknown top-level key(s) {unknown_top}; "
                "expected only [tenants.<name>] tables and an [admin] table"
            )
        admin = data.get("admin")
        if admin is not None:
            if not isinstance(admin, dict) or set(admin) != {"api_key"}:
                raise ValueError(f"tenants file {str(path)!r}: [admin] holds exactly one field, 'api_key'")
        tables = data.get("tenants")
        if not isinstance(tables, dict) or not tables:
            raise ValueError(f"tenants file {str(path)!r}: no [tenants.<name>] tables")
        tenants = []
        for name, table in tables.items():
            if not isinstance(table, dict):
                raise ValueError(f"tenant {name!r}: expected a table [tenants.{name}]")
            unknown = sorted(set(table) - _TABLE_FIELDS)
            if unknown:
                raise ValueError(
                    f"tenant {name!r}: unknown field(s) {unknown}; allowed: {sorted(_TABLE_FIELDS)}"
                )
            if "api_key" not in table:
                raise ValueError(f"tenant {name!r}: field 'api_key' is required")
            _check_api_key(name, table["api_key"])
            tenants.append(Tenant(name=name, **{**base, **table}))
        return cls(tenants, auth_required=True, admin_key=None if admin is None else admin["api_key"])

    @property
    def auth_required(self) -> bool:
        return self._auth_required

    @property
    def tenants(self) -> list[Tenant]:
        return list(self._tenants)

    def get(self, name: str) -> Tenant | None:
        return self._by_name.get(name)

    def __iter__(self) -> Iterator[Tenant]:
        return iter(self._tenants)

    def __len__(self) -> int:
        return len(self._tenants)

    @property
    def has_admin(self) -> bool:
        return self._admin_digest is not None

    def __repr__(self) -> str:
        names = [t.name for t in self._tenants]
        return (f"TenantRegistry(tenants={names}, auth_required={self._auth_required}, "
                f"admin={self.has_admin})")

    def is_admin(self, authorization_header: str | None) -> bool:
        """Whether the header carries the admin key. An open server (no tenants file) has no
        secrets: everyone is admin there."""
        if not self._auth_required:
            return True
        key = _parse_bearer(authorization_header)
        if key is None or self._admin_digest is None:
            return False
        return hmac.compare_digest(_key_digest(key), self._admin_digest)

    def authenticate(self, authorization_header: str | None) -> Tenant | None:
        """Tenant for an ``Authorization: Bearer <key>`` header, or None when not valid.

        With auth disabled every request (with or without a header) is the default tenant.
        """
        if not self._auth_required:
            return self._tenants[0]
        key = _parse_bearer(authorization_header)
        if key is None:
            return None
        digest = _key_digest(key)
        match = None
        # Every key is compared, even after a match, so timing does not reveal which one matched.
        for tenant, expected in self._digests:
            if hmac.compare_digest(digest, expected):
                match = tenant
        return match
