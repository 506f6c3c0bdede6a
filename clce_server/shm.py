"""Shared memory for clients on this host: regions registered over a Unix socket, referenced by
requests (docs/protocol.md, "Shared memory").

Safety, by design rather than by checks that race:

* A region is a memfd sealed against shrinking (F_SEAL_SHRINK), passed over the socket with
  SCM_RIGHTS. The server checks the seal before mapping it, so the mapping can never be truncated
  under the server (no SIGBUS), whatever the client does afterwards; a client unmapping or
  closing its own copy does not touch the server's mapping. Anything that is not a memfd (a file,
  a pipe) cannot carry seals and is refused.
* Registration is authenticated with the tenant's API key (the registry's constant-time compare);
  regions are scoped per tenant. A request resolves references only among its own tenant's
  regions; an unknown name and another tenant's name get the same 404.
* Names are names ([A-Za-z0-9_.-]{1,64}), never paths. Offsets, sizes, dtypes and shapes are
  checked on every request (clce_wire.shm.parse_ref, `ShmRegistry.resolve`).
* The socket connection is the registration's lifetime: at EOF (the client closed it or died)
  its regions are reclaimed as soon as no request in flight uses them (`pin`/`unpin`).
* The bytes one tenant may hold registered are capped (413 beyond the cap), and so is the number
  of regions (429).
"""

from __future__ import annotations

import fcntl
import logging
import mmap
import os
import socket
import tempfile
import threading
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from clce_wire.protocol import DTYPES, ProtocolError, numpy_dtype
from clce_wire.shm import REGION_NAME, SEALS_REQUIRED, RegionRef, recv_frame, send_frame

from .errors import ApiError

log = logging.getLogger("clce.shm")

MAX_REGIONS_PER_TENANT = 256


@dataclass(eq=False)
class Region:
    tenant: str
    name: str
    size: int
    mm: mmap.mmap
    fd: int
    session: "Session"
    pins: int = 0
    dead: bool = False          # its session ended: reclaimed when the last pin goes

    def close(self) -> None:
        try:
            self.mm.close()
        except BufferError:     # arrays over it still exist: the GC unmaps it with the last one
            pass
        try:
            os.close(self.fd)
        except OSError:
            pass


@dataclass(eq=False)
class Session:
    tenant: str
    regions: dict[str, Region] = field(default_factory=dict)


class ShmRegistry:
    """Regions by (tenant, name), with per-tenant byte accounting and pins for requests in flight."""

    def __init__(self, max_bytes_per_tenant: int):
        self.max_bytes = max_bytes_per_tenant
        self._lock = threading.Lock()
        self._regions: dict[tuple[str, str], Region] = {}
        self._bytes: dict[str, int] = {}
        self._count: dict[str, int] = {}

    # ---- registration (the socket threads) ----
    def register(self, session: Session, name: str, size: Any, fd: int) -> Region:
        """Map the sealed memfd `fd` as `name`; takes ownership of fd (closed on failure)."""
        try:
            if not isinstance(name, str) or not REGION_NAME.fullmatch(name):
                raise ApiError("bad_request", "a region name is 1-64 characters of A-Z a-z 0-9 _ . -")
            if type(size) is not int or size <= 0:
                raise ApiError("bad_request", f"size must be a positive integer, got {size!r}")
            try:
                seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
            except OSError:
                raise ApiError("bad_request", "a region must be a memfd (memfd_create with MFD_ALLOW_SEALING)") from None
            if not seals & SEALS_REQUIRED:
                raise ApiError("bad_request", "a region must be sealed against shrinking (F_SEAL_SHRINK)")
            actual = os.fstat(fd).st_size
            if actual < size:
                raise ApiError("bad_request", f"the memfd holds {actual} bytes, fewer than the {size} registered")
            key = (session.tenant, name)
            with self._lock:
                if key in self._regions:
                    raise ApiError("bad_request", f"region {name!r} is already registered")
                if self._count.get(session.tenant, 0) >= MAX_REGIONS_PER_TENANT:
                    raise ApiError("queue_full", f"at most {MAX_REGIONS_PER_TENANT} regions per tenant")
                held = self._bytes.get(session.tenant, 0)
                if held + size > self.max_bytes:
                    raise ApiError("payload_too_large", f"registering {size} bytes would hold {held + size} "
                                   f"bytes of shared memory; this tenant's cap is {self.max_bytes}")
                self._bytes[session.tenant] = held + size
                self._count[session.tenant] = self._count.get(session.tenant, 0) + 1
                # reserve the name; map outside the lock
                self._regions[key] = reserved = Region(session.tenant, name, size, None, fd, session)  # type: ignore[arg-type]
            try:
                reserved.mm = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
            except BaseException:
                with self._lock:
                    self._drop(reserved)
                raise
            session.regions[name] = reserved
            return reserved
        except BaseException:
            os.close(fd)
            raise

    def unregister(self, session: Session, name: str) -> None:
        region = session.regions.pop(name, None)
        if region is None:
            raise ApiError("not_found", f"no region {name!r} in this session")
        self._retire(region)

    def end_session(self, session: Session) -> None:
        """The client closed the socket or died: reclaim its regions (now, or after their last pin)."""
        regions, session.regions = list(session.regions.values()), {}
        for r in regions:
            self._retire(r)

    def _retire(self, region: Region) -> None:
        with self._lock:
            region.dead = True
            if region.pins:
                return
            self._drop(region)
        region.close()

    def _drop(self, region: Region) -> None:   # under the lock
        if self._regions.get((region.tenant, region.name)) is region:
            del self._regions[(region.tenant, region.name)]
            self._bytes[region.tenant] -= region.size
            self._count[region.tenant] -= 1

    # ---- requests (the event loop) ----
    def pin(self, tenant: str, name: str) -> Region:
        with self._lock:
            region = self._regions.get((tenant, name))
            if region is None or region.dead or region.mm is None:
                # the same answer for "unknown" and "another tenant's": names do not leak
                raise ApiError("not_found", f"no shared-memory region {name!r} is registered for this tenant")
            region.pins += 1
            return region

    def unpin(self, region: Region) -> None:
        with self._lock:
            region.pins -= 1
            if region.pins or not region.dead:
                return
            self._drop(region)
        region.close()

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return {"regions": sum(self._count.values()), "bytes": sum(self._bytes.values()),
                    "pinned": sum(1 for r in self._regions.values() if r.pins),
                    "max_bytes_per_tenant": self.max_bytes}


def view(region: Region, ref: RegionRef, *, name: str, writable: bool = True) -> np.ndarray:
    """The array a reference names, checked against the region's bounds (the region is pinned)."""
    nbytes = ref.nbytes
    end = ref.offset + nbytes
    if end > region.size:
        raise ApiError("bad_request", f"{name}: offset {ref.offset} + {nbytes} bytes is past the end of "
                       f"region {ref.region!r} ({region.size} bytes)")
    try:
        dtype = numpy_dtype(ref.dtype)
    except ProtocolError as exc:
        raise ApiError("bad_request", f"{name}: {exc}") from None
    assert dtype.itemsize == DTYPES[ref.dtype]
    if nbytes == 0:
        return np.empty(ref.shape, dtype)
    arr = np.frombuffer(region.mm, dtype, count=nbytes // dtype.itemsize, offset=ref.offset).reshape(ref.shape)
    if not writable:
        arr.flags.writeable = False
    return arr


class ShmServer:
    """The Unix socket clients register regions on: one thread accepting, one per connection."""

    def __init__(self, registry: ShmRegistry, tenants, path: str | None = None):
        self.registry = registry
        self.tenants = tenants
        self._dir = None
        if path is None:
            self._dir = tempfile.mkdtemp(prefix="clce-shm-")
            os.chmod(self._dir, 0o711)   # others may connect (they authenticate), not list
            path = os.path.join(self._dir, "shm.sock")
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        if os.path.exists(path):
            os.unlink(path)
        self.sock.bind(path)
        os.chmod(path, 0o666)
        self.sock.listen(64)
        self._closed = False
        self.sessions = 0
        threading.Thread(target=self._accept, name="clce-shm-accept", daemon=True).start()

    def _accept(self) -> None:
        while not self._closed:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), name="clce-shm-conn", daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        session = None
        try:
            with conn:
                conn.settimeout(None)
                session = self._hello(conn)
                if session is None:
                    return
                self.sessions += 1
                while True:
                    try:
                        msg, fds = recv_frame(conn)
                    except ProtocolError as exc:
                        send_frame(conn, _error("bad_request", str(exc)))
                        return
                    if msg is None:
                        return
                    send_frame(conn, self._handle(session, msg, fds))
        except OSError:
            pass
        except Exception:   # a bug: the session ends, the server stays up
            log.exception("shared-memory session failed")
        finally:
            if session is not None:
                self.sessions -= 1
                self.registry.end_session(session)

    def _hello(self, conn: socket.socket) -> Session | None:
        try:
            msg, fds = recv_frame(conn)
        except ProtocolError as exc:
            send_frame(conn, _error("bad_request", str(exc)))
            return None
        for fd in fds:
            os.close(fd)
        if msg is None:
            return None
        key = msg.get("api_key")
        if msg.get("op") != "hello" or not (key is None or isinstance(key, str)):
            send_frame(conn, _error("bad_request", "the first frame must be {op: hello, api_key}"))
            return None
        tenant = self.tenants.authenticate(f"Bearer {key}" if key else None)
        if tenant is None:
            send_frame(conn, _error("unauthorized", "missing or invalid API key"))
            return None
        send_frame(conn, {"ok": True, "tenant": tenant.name, "max_bytes": self.registry.max_bytes})
        return Session(tenant.name)

    def _handle(self, session: Session, msg: dict, fds: list[int]) -> dict:
        op = msg.get("op")
        try:
            if op == "register":
                if len(fds) != 1:
                    raise ApiError("bad_request", "register carries exactly one memfd")
                fd, fds = fds[0], []
                self.registry.register(session, msg.get("name"), msg.get("size"), fd)
                return {"ok": True}
            if op == "unregister":
                self.registry.unregister(session, msg.get("name"))
                return {"ok": True}
            if op == "ping":
                return {"ok": True}
            raise ApiError("bad_request", f"unknown op {op!r}")
        except ApiError as exc:
            return _error(exc.code, str(exc))
        finally:
            for fd in fds:
                os.close(fd)

    def close(self) -> None:
        self._closed = True
        try:
            self.sock.close()
        finally:
            try:
                os.unlink(self.path)
                if self._dir:
                    os.rmdir(self._dir)
            except OSError:
                pass


def _error(code: str, message: str) -> dict:
    return {"ok": False, "error": {"code": code, "message": message}}
