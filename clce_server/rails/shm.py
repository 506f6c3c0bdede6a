"""Shared memory for clients on this host: regions registered over a Unix socket, referenced by
requests (docs/protocol.md, "Shared memory").

Safety, by design rather than by checks that race:

* A region is a memfd sealed against shrinking and growing (F_SEAL_SHRINK | F_SEAL_GROW), passed
  over the socket with SCM_RIGHTS. The server checks the seals before mapping it, so the mapping
  can never be truncated under the server (no SIGBUS), and the memfd can never hold more than the
  size its tenant is charged for (its `fstat` size, which must equal the size registered). A
  client unmapping or closing its own copy does not touch the server's mapping. Anything that is
  not a memfd (a file, a pipe, a socket) cannot carry seals and is refused.
* A memfd sealed against writing (F_SEAL_WRITE or F_SEAL_FUTURE_WRITE), or passed as a read-only
  descriptor, is mapped read-only: its tensors can be read, never written (a gradient aimed at it
  is refused). A hugetlb memfd is mapped like any other, or refused with the kernel's reason (no
  huge pages reserved).
* Registration is authenticated with the tenant's API key (the registry's constant-time compare);
  regions are scoped per tenant. A request resolves references only among its own tenant's
  regions; an unknown name and another tenant's name get the same 404.
* Names are names ([A-Za-z0-9_.-]{1,64}), never paths. Offsets, sizes, dtypes and shapes are
  checked on every request (clce_wire.shm.parse_ref, `view`).
* The socket connection is the registration's lifetime: when it ends (the client closed it or
  died, or broke a rule of the protocol) its regions are reclaimed as soon as no request in
  flight uses them (`pin`/`unpin`). Nobody else's regions are touched.
* What is held is bounded: bytes and regions per tenant (413 / 429) and across tenants (429);
  descriptors (one per connection, one per region: the mapping's own) under a cap of the service
  and below the process's RLIMIT_NOFILE, refused with an answer before the process runs out.

The socket is served by one thread running a selector loop (`ShmServer`): no thread per peer.
Connections are limited in total and per uid (SO_PEERCRED); a peer must authenticate within a
deadline, and each frame must arrive whole (and its answer be read) within another. Every refusal
is answered with an error frame {"ok": false, "error": {"code", "message"}} and logged; a peer
that breaks a rule of the protocol is answered where it can be, logged, and disconnected.
"""

from __future__ import annotations

import array
import errno
import fcntl
import logging
import mmap
import os
import resource
import selectors
import socket
import stat
import struct
import tempfile
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from clce_wire.protocol import DTYPES, ProtocolError, numpy_dtype
from clce_wire.shm import (FRAME_HEADER, MAX_FRAME, REGION_NAME, SEALS_REQUIRED, RegionRef, decode_frame,
                           encode_frame)

from ..config import over_limit
from .errors import ApiError

log = logging.getLogger("clce.shm")

# seals that forbid writing through a new shared mapping: such a memfd is mapped read-only
_WRITE_SEALS = fcntl.F_SEAL_WRITE | getattr(fcntl, "F_SEAL_FUTURE_WRITE", 0x0010)
_FD_SIZE = array.array("i").itemsize
_ANC_ONE_FD = socket.CMSG_SPACE(_FD_SIZE)      # room for one descriptor: a second one truncates
_PEERCRED = struct.Struct("3i")                # struct ucred: pid, uid, gid


@dataclass(frozen=True)
class ShmLimits:
    """What the registration service may hold and how long it waits (config.py documents each)."""

    max_bytes_per_tenant: int = 8 << 30
    max_regions_per_tenant: int = 256
    max_total_bytes: int = 32 << 30
    max_total_regions: int = 4096
    max_descriptors: int = 1024
    max_connections: int = 256
    max_connections_per_uid: int = 64
    hello_timeout_s: float = 5.0
    frame_timeout_s: float = 5.0

    @classmethod
    def from_settings(cls, s) -> "ShmLimits":
        return cls(s.shm_max_bytes, s.shm_max_regions_per_tenant, s.shm_max_total_bytes, s.shm_max_regions,
                   s.shm_max_descriptors, s.shm_max_connections, s.shm_max_connections_per_uid,
                   s.shm_hello_timeout_s, s.shm_frame_timeout_s)


class Descriptors:
    """The descriptors the registration service holds (connections, regions, its own), under its
    cap and below the process's limit: a new one is refused while fewer than an eighth of
    RLIMIT_NOFILE (at least 32) would stay free for the rest of the server (HTTP, OpenCL)."""

    def __init__(self, cap: int):
        self.cap = cap
        self.held = 0
        self._lock = threading.Lock()

    @staticmethod
    def process_headroom() -> int:
        """Descriptors this process may still open before its reserve for everything else."""
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft == resource.RLIM_INFINITY:
            return 1 << 30
        try:
            open_now = len(os.listdir("/proc/self/fd")) - 1     # less the listing's own
        except OSError:
            return 1 << 30
        return soft - open_now - max(32, soft // 8)

    def take(self, n: int, what: str) -> None:
        with self._lock:
            if self.held + n > self.cap:
                raise ApiError("queue_full", f"the shared-memory service holds {self.held} descriptors, its "
                               f"cap (--shm-max-descriptors) is {self.cap}: {what} refused; try again later")
            if self.process_headroom() < n:
                raise ApiError("queue_full", f"the server is near its descriptor limit (RLIMIT_NOFILE): {what} "
                               "refused; try again later")
            self.held += n

    def give(self, n: int) -> None:
        with self._lock:
            self.held -= n


@dataclass(eq=False)
class Region:
    tenant: str
    name: str
    size: int
    mm: mmap.mmap | None
    session: "Session"
    read_only: bool = False
    pins: int = 0
    dead: bool = False          # its session ended: reclaimed when the last pin goes

    def close(self) -> None:
        # the mapping holds the region's one descriptor (mmap's own duplicate): closing it closes both
        try:
            if self.mm is not None:
                self.mm.close()
        except BufferError:     # arrays over it still exist: the GC unmaps it with the last one
            pass


@dataclass(eq=False)
class Session:
    tenant: str
    regions: dict[str, Region] = field(default_factory=dict)


class ShmRegistry:
    """Regions by (tenant, name), with byte, region and descriptor accounting per tenant and in
    total, and pins for requests in flight."""

    def __init__(self, limits: ShmLimits | int, descriptors: Descriptors | None = None):
        if isinstance(limits, int):
            limits = ShmLimits(max_bytes_per_tenant=limits)
        self.limits = limits
        self.max_bytes = limits.max_bytes_per_tenant
        self.descriptors = descriptors or Descriptors(limits.max_descriptors)
        self._lock = threading.Lock()
        self._regions: dict[tuple[str, str], Region] = {}
        self._bytes: dict[str, int] = {}
        self._count: dict[str, int] = {}
        self._total_bytes = 0
        self._total_count = 0

    # ---- registration (the socket's thread) ----
    def register(self, session: Session, name: Any, size: Any, fd: int) -> Region:
        """Map the sealed memfd `fd` as `name`. Takes ownership of fd: on success the mapping keeps
        the one descriptor the region costs, on failure it is closed. Every refusal is an ApiError
        whose message says why."""
        try:
            return self._register(session, name, size, fd)
        finally:
            os.close(fd)

    def _register(self, session: Session, name: Any, size: Any, fd: int) -> Region:
        if not isinstance(name, str) or not REGION_NAME.fullmatch(name):
            raise ApiError("bad_request", "a region name is 1-64 characters of A-Z a-z 0-9 _ . -")
        if type(size) is not int or size <= 0:
            raise ApiError("bad_request", f"size must be a positive integer, got {size!r}")
        try:
            st = os.fstat(fd)
            seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
        except OSError:
            raise ApiError("bad_request", "a region must be a memfd (memfd_create with MFD_ALLOW_SEALING)") from None
        if not stat.S_ISREG(st.st_mode):
            raise ApiError("bad_request", "a region must be a memfd (memfd_create with MFD_ALLOW_SEALING)")
        if seals & SEALS_REQUIRED != SEALS_REQUIRED:
            raise ApiError("bad_request", "a region must be sealed against shrinking and growing "
                           "(F_SEAL_SHRINK | F_SEAL_GROW): it could be truncated under the server, or hold "
                           "more than it is charged for")
        if st.st_size != size:
            raise ApiError("bad_request", f"the memfd holds {st.st_size} bytes, not the {size} registered: "
                           "register a memfd's whole size (what it holds is what is charged)")
        access = fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE
        if access == os.O_WRONLY:
            raise ApiError("bad_request", "the memfd was passed write-only; the server needs to read it")
        read_only = access == os.O_RDONLY or bool(seals & _WRITE_SEALS)
        key = (session.tenant, name)
        lim = self.limits
        with self._lock:
            if key in self._regions:
                raise ApiError("bad_request", f"region {name!r} is already registered")
            if self._count.get(session.tenant, 0) >= lim.max_regions_per_tenant:
                raise ApiError("queue_full", over_limit(f"tenant {session.tenant!r} holds {self._count[session.tenant]} "
                                                      "regions", "shm_max_regions_per_tenant",
                                                      lim.max_regions_per_tenant))
            held = self._bytes.get(session.tenant, 0)
            if held + size > lim.max_bytes_per_tenant:
                raise ApiError("payload_too_large", over_limit(
                    f"registering {size} bytes would hold {held + size} bytes of shared memory for tenant "
                    f"{session.tenant!r}", "shm_max_bytes", lim.max_bytes_per_tenant))
            if self._total_count >= lim.max_total_regions:
                raise ApiError("queue_full", over_limit(f"the server holds {self._total_count} regions for all "
                                                      "tenants", "shm_max_regions", lim.max_total_regions))
            if self._total_bytes + size > lim.max_total_bytes:
                raise ApiError("queue_full", over_limit(
                    f"registering {size} bytes would take the shared memory held for all tenants to "
                    f"{self._total_bytes + size} bytes", "shm_max_total_bytes", lim.max_total_bytes))
            self.descriptors.take(1, "registering a region")   # the mapping's duplicate of fd
            self._account(session.tenant, size, 1)
            # the name is reserved; map outside the lock
            self._regions[key] = region = Region(session.tenant, name, size, None, session, read_only)
        try:
            prot = mmap.PROT_READ if read_only else mmap.PROT_READ | mmap.PROT_WRITE
            region.mm = mmap.mmap(fd, size, mmap.MAP_SHARED, prot)
        except BaseException as exc:
            with self._lock:
                self._drop(region)
            if isinstance(exc, OSError):
                raise ApiError(*_mmap_refusal(exc, st)) from None
            raise
        session.regions[name] = region
        return region

    def unregister(self, session: Session, name: Any) -> None:
        region = session.regions.pop(name, None) if isinstance(name, str) else None
        if region is None:
            raise ApiError("not_found", f"no region {name!r} in this session")
        self._retire(region)

    def end_session(self, session: Session) -> None:
        """The connection ended: reclaim its regions (now, or after their last pin)."""
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

    def _account(self, tenant: str, nbytes: int, n: int) -> None:   # under the lock
        self._bytes[tenant] = self._bytes.get(tenant, 0) + nbytes
        self._count[tenant] = self._count.get(tenant, 0) + n
        self._total_bytes += nbytes
        self._total_count += n

    def _drop(self, region: Region) -> None:   # under the lock
        if self._regions.get((region.tenant, region.name)) is region:
            del self._regions[(region.tenant, region.name)]
            self._account(region.tenant, -region.size, -1)
            self.descriptors.give(1)

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

    def stats(self, tenant: str | None = None) -> dict[str, Any]:
        """One tenant's figures, or (tenant None) the server's across all tenants."""
        with self._lock:
            if tenant is not None:
                return {"regions": self._count.get(tenant, 0), "bytes": self._bytes.get(tenant, 0),
                        "pinned": sum(1 for (t, _), r in self._regions.items() if t == tenant and r.pins),
                        "max_bytes_per_tenant": self.limits.max_bytes_per_tenant,
                        "max_regions_per_tenant": self.limits.max_regions_per_tenant}
            return {"regions": self._total_count, "bytes": self._total_bytes,
                    "pinned": sum(1 for r in self._regions.values() if r.pins),
                    "tenants": sum(1 for n in self._count.values() if n),
                    "max_bytes_per_tenant": self.limits.max_bytes_per_tenant,
                    "max_regions_per_tenant": self.limits.max_regions_per_tenant,
                    "max_total_bytes": self.limits.max_total_bytes, "max_regions": self.limits.max_total_regions}


def _mmap_refusal(exc: OSError, st: os.stat_result) -> tuple[str, str]:
    huge = st.st_blksize > mmap.PAGESIZE        # hugetlbfs reports its page size here
    if huge and exc.errno in (errno.ENOMEM, errno.EINVAL):
        return "bad_request", (f"cannot map this hugetlb memfd ({os.strerror(exc.errno)}): the host has no "
                               f"{st.st_blksize >> 20} MiB huge pages free for it (vm.nr_hugepages)")
    if exc.errno == errno.ENOMEM:
        return "queue_full", "the server cannot map more memory now (its mappings are at the system's limit)"
    if exc.errno in (errno.EACCES, errno.EPERM):
        return "bad_request", f"the memfd cannot be mapped shared ({os.strerror(exc.errno)})"
    if exc.errno == errno.EMFILE or exc.errno == errno.ENFILE:
        return "queue_full", "the server is out of descriptors; try again later"
    return "bad_request", f"the memfd cannot be mapped: {os.strerror(exc.errno or 0)}"


def view(region: Region, ref: RegionRef, *, name: str) -> np.ndarray:
    """The array a reference names, checked against the region's bounds (the region is pinned;
    a read-only region's array is read-only). The reference's shape passed
    clce_wire.protocol.check_tensor_shape (parse_ref). `name` only words the refusals: what the
    request does with the array is its lease's business (lease.RequestLease.resolve)."""
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
    return np.frombuffer(region.mm, dtype, count=nbytes // dtype.itemsize, offset=ref.offset).reshape(ref.shape)


# ---- the socket ------------------------------------------------------------------------------------

class ShmSocketError(RuntimeError):
    """The registration socket cannot be created safely (the server refuses to start)."""


def create_socket(path: str | None, *, group: int | None = None,
                  allowed_uids: frozenset[int] | None = None) -> tuple[socket.socket, str, str | None]:
    """A listening Unix socket at `path` (default: shm.sock in a new private directory), and the
    private directory to remove afterwards. Never replaces anything but a stale socket: a path
    that exists and is not a socket (a file, a symlink, a directory), or a socket another process
    still listens on, is refused. Created 0660 (and given `group`), or 0666 when an allow-list of
    uids is the gate and no group is given; its mode is set before it listens."""
    directory = None
    if path is None:
        directory = tempfile.mkdtemp(prefix="clce-shm-")
        os.chmod(directory, 0o711)   # others may reach the socket, not list the directory
        path = os.path.join(directory, "shm.sock")
    else:
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            pass
        else:
            if not stat.S_ISSOCK(st.st_mode):
                raise ShmSocketError(f"--shm-socket {path} exists and is not a socket; refusing to replace it")
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            probe.settimeout(2.0)
            try:
                probe.connect(path)
            except ConnectionRefusedError:          # nobody listens: a stale socket of a dead server
                os.unlink(path)
            except OSError as exc:
                raise ShmSocketError(f"--shm-socket {path}: cannot tell whether it is in use ({exc})") from None
            else:
                raise ShmSocketError(f"--shm-socket {path}: another process is listening on it")
            finally:
                probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
        try:
            if group is not None:
                os.chown(path, -1, group)
            os.chmod(path, 0o666 if allowed_uids is not None and group is None else 0o660)
        except OSError as exc:
            os.unlink(path)
            raise ShmSocketError(f"--shm-socket {path}: cannot set its group or mode ({exc})") from None
        # a deep backlog: a flood of connections queues in the kernel (no descriptor of ours) instead
        # of refusing a well-behaved client's connect with EAGAIN before the loop gets to it
        sock.listen(1024)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        if directory:
            os.rmdir(directory)
        raise
    return sock, path, directory


class _LogLimiter:
    """At most `rate` refusal lines a second (bursts of `burst`); the lines suppressed are counted
    in the next one, so a flood of refusals cannot flood the log."""

    def __init__(self, rate: float = 20.0, burst: float = 100.0):
        self.rate, self.burst = rate, burst
        self.tokens, self.t = burst, time.monotonic()
        self.suppressed = 0

    def __call__(self, level: int, msg: str, *args: Any) -> None:
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.t) * self.rate)
        self.t = now
        if self.tokens < 1:
            self.suppressed += 1
            return
        self.tokens -= 1
        if self.suppressed:
            msg += f" (and {self.suppressed} more refusals not logged)"
            self.suppressed = 0
        log.log(level, msg, *args)


class _Conn:
    """One peer of the registration socket, as the loop sees it."""

    __slots__ = ("sock", "pid", "uid", "session", "inbuf", "need", "fds", "frame_deadline",
                 "hello_deadline", "out", "write_deadline", "close_after", "events")

    def __init__(self, sock: socket.socket, pid: int, uid: int, hello_deadline: float):
        self.sock, self.pid, self.uid = sock, pid, uid
        self.session: Session | None = None
        self.inbuf = bytearray()
        self.need = FRAME_HEADER.size        # bytes the current frame still needs in inbuf
        self.fds: list[int] = []             # received with the current frame
        self.frame_deadline: float | None = None
        self.hello_deadline: float | None = hello_deadline
        self.out = b""
        self.write_deadline: float | None = None
        self.close_after = False
        self.events = 0

    def who(self) -> str:
        tenant = f" tenant={self.session.tenant}" if self.session is not None else ""
        return f"uid={self.uid} pid={self.pid}{tenant}"

    def deadline(self) -> float | None:
        ds = [d for d in (self.hello_deadline, self.frame_deadline, self.write_deadline) if d is not None]
        return min(ds) if ds else None


class _RuleBroken(Exception):
    """A peer broke a rule of the protocol: answered (code, message) where possible, then closed."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


_ACCEPT_OUT_OF_FDS = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)


class ShmServer:
    """The Unix socket clients register regions on, served by one thread's selector loop."""

    def __init__(self, registry: ShmRegistry, tenants, path: str | None = None, *,
                 group: int | None = None, allowed_uids: frozenset[int] | None = None):
        self.registry = registry
        self.tenants = tenants
        self.limits = registry.limits
        self.descriptors = registry.descriptors
        self.allowed_uids = allowed_uids
        self.sock, self.path, self._dir = create_socket(path, group=group, allowed_uids=allowed_uids)
        self._sel = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        # the listener, the selector, the wake-up pair and the reserve descriptor are the service's own
        self._reserve: int | None = os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC)
        self.descriptors.held += 5
        self._sel.register(self.sock, selectors.EVENT_READ, None)
        self._sel.register(self._wake_r, selectors.EVENT_READ, "wake")
        self._conns: dict[int, _Conn] = {}
        self._per_uid: dict[int, int] = {}
        self._accept_paused_until: float | None = None
        self._backoff = 0.0
        self._closed = False
        self._log = _LogLimiter()
        self.refusals = 0
        self.accept_errors = 0
        self._thread = threading.Thread(target=self._run, name="clce-shm", daemon=True)
        self._thread.start()

    # ---- figures ----
    @property
    def sessions(self) -> int:
        return sum(1 for c in list(self._conns.values()) if c.session is not None)

    def stats(self) -> dict[str, Any]:
        return {"connections": len(self._conns), "sessions": self.sessions, "descriptors": self.descriptors.held,
                "max_descriptors": self.descriptors.cap, "max_connections": self.limits.max_connections,
                "refusals": self.refusals, "accept_errors": self.accept_errors}

    # ---- the loop ----
    def _run(self) -> None:
        while not self._closed:
            try:
                self._once()
            except Exception:       # a bug: logged; the loop keeps serving everyone else
                log.exception("shared-memory service: unexpected error; going on")
                time.sleep(0.05)

    def _once(self) -> None:
        now = time.monotonic()
        if self._accept_paused_until is not None and now >= self._accept_paused_until:
            self._accept_paused_until = None
            self._sel.register(self.sock, selectors.EVENT_READ, None)
        deadlines = [d for d in (c.deadline() for c in self._conns.values()) if d is not None]
        if self._accept_paused_until is not None:
            deadlines.append(self._accept_paused_until)
        timeout = max(0.0, min(deadlines) - now) if deadlines else None
        for key, mask in self._sel.select(timeout):
            if key.data is None:
                self._accept()
            elif key.data == "wake":
                try:
                    self._wake_r.recv(4096)
                except OSError:
                    pass
            else:
                conn: _Conn = key.data
                try:
                    if mask & selectors.EVENT_WRITE:
                        self._write(conn)
                    if mask & selectors.EVENT_READ and conn.sock.fileno() >= 0 and not conn.out:
                        self._read(conn)
                except _RuleBroken as exc:
                    self._break(conn, exc.code, str(exc))
                except Exception:
                    log.exception("shared-memory session of %s failed; closing it", conn.who())
                    self._break(conn, "internal", "the server failed on this connection; it is closed")
        self._expire(time.monotonic())

    def _expire(self, now: float) -> None:
        for conn in [c for c in self._conns.values() if (c.deadline() or now + 1) <= now]:
            if conn.write_deadline is not None and conn.write_deadline <= now:
                self._refused(conn, "timeout", "its answers were not read in time")
                self._close(conn)
            elif conn.session is None and conn.hello_deadline is not None and conn.hello_deadline <= now:
                self._break(conn, "unauthorized", f"no hello within {self.limits.hello_timeout_s:g} s")
            else:
                self._break(conn, "bad_request", f"a frame did not arrive whole within "
                            f"{self.limits.frame_timeout_s:g} s of its first byte")

    # ---- accepting ----
    def _accept(self) -> None:
        for _ in range(64):       # a bounded batch: connected peers are served between batches
            try:
                sock, _ = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                self.accept_errors += 1
                if exc.errno in _ACCEPT_OUT_OF_FDS:
                    self._answer_waiting_peer(exc)
                else:
                    self._log(logging.ERROR, "shared-memory socket: accept failed (%s); backing off", exc)
                self._pause_accept()
                return
            self._backoff = 0.0
            if self._reserve is None:
                self._take_reserve()
            self._admit(sock)

    def _pause_accept(self) -> None:
        self._backoff = min(1.0, max(0.05, self._backoff * 2))
        self._accept_paused_until = time.monotonic() + self._backoff
        try:
            self._sel.unregister(self.sock)
        except (KeyError, ValueError):
            pass

    def _answer_waiting_peer(self, exc: OSError) -> None:
        """Out of descriptors: the reserve one is given up for a moment to take the first waiting
        peer, tell it why, and close it, so it is not left hanging; then taken again."""
        self._log(logging.ERROR, "shared-memory socket: accept failed (%s): the process is out of "
                  "descriptors; answering waiting peers and backing off", exc)
        if self._reserve is None:
            return
        os.close(self._reserve)
        self._reserve = None
        try:
            sock, _ = self.sock.accept()
        except OSError:
            sock = None
        if sock is not None:
            self.refusals += 1
            _send_now(sock, _error("queue_full", "the server is out of descriptors; try again later"))
            sock.close()
        self._take_reserve()

    def _take_reserve(self) -> None:
        try:
            self._reserve = os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            pass                          # taken again after the next accept that succeeds

    def _admit(self, sock: socket.socket) -> None:
        try:
            pid, uid, _ = _PEERCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size))
        except OSError:
            sock.close()
            return
        sock.setblocking(False)
        refusal = None
        if self.allowed_uids is not None and uid not in self.allowed_uids:
            refusal = ("unauthorized", f"uid {uid} may not use this socket (--shm-allowed-uids)")
        elif len(self._conns) >= self.limits.max_connections:
            refusal = ("queue_full", f"the shared-memory socket has {len(self._conns)} connections, its limit "
                       "(--shm-max-connections); try again later")
        elif self._per_uid.get(uid, 0) >= self.limits.max_connections_per_uid:
            refusal = ("queue_full", f"uid {uid} has {self._per_uid[uid]} connections to the shared-memory "
                       "socket, the limit per uid (--shm-max-connections-per-uid)")
        else:
            try:
                self.descriptors.take(1, "a connection")
            except ApiError as exc:
                refusal = (exc.code, str(exc))
        if refusal is not None:
            self.refusals += 1
            self._log(logging.WARNING, "shared-memory socket: refused a connection of uid=%d pid=%d: %s",
                      uid, pid, refusal[1])
            _send_now(sock, _error(*refusal))
            sock.close()
            return
        conn = _Conn(sock, pid, uid, time.monotonic() + self.limits.hello_timeout_s)
        self._conns[sock.fileno()] = conn
        self._per_uid[uid] = self._per_uid.get(uid, 0) + 1
        self._listen(conn, selectors.EVENT_READ)

    def _listen(self, conn: _Conn, events: int) -> None:
        if events == conn.events:
            return
        if conn.events == 0:
            self._sel.register(conn.sock, events, conn)
        else:
            self._sel.modify(conn.sock, events, conn)
        conn.events = events

    # ---- reading frames ----
    def _read(self, conn: _Conn) -> None:
        try:
            data, anc, flags, _ = conn.sock.recvmsg(conn.need - len(conn.inbuf), _ANC_ONE_FD)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._log(logging.INFO, "shared-memory session of %s: %s; closing it", conn.who(), exc)
            self._close(conn)
            return
        received = _fds_in(anc)
        conn.fds += received
        if flags & socket.MSG_CTRUNC:
            if received:
                raise _RuleBroken("bad_request", "a frame carries at most one descriptor")
            raise _RuleBroken("queue_full", "the descriptor sent could not be received (the server is out of "
                              "descriptors)")
        if len(conn.fds) > 1:
            raise _RuleBroken("bad_request", "a frame carries at most one descriptor")
        if not data:
            if conn.inbuf or conn.fds:
                self._refused(conn, "closed", "the connection closed inside a frame")
            self._close(conn)
            return
        if conn.frame_deadline is None:
            conn.frame_deadline = time.monotonic() + self.limits.frame_timeout_s
        conn.inbuf += data
        if len(conn.inbuf) < conn.need:
            return
        if conn.need == FRAME_HEADER.size:
            (n,) = FRAME_HEADER.unpack(conn.inbuf)
            if n > MAX_FRAME:
                raise _RuleBroken("bad_request", f"frame of {n} bytes exceeds {MAX_FRAME}")
            conn.need += n
            if n:
                return
        try:
            msg = decode_frame(conn.inbuf[FRAME_HEADER.size:])
        except ProtocolError as exc:
            raise _RuleBroken("bad_request", str(exc)) from None
        fds, conn.fds = conn.fds, []
        conn.inbuf = bytearray()
        conn.need = FRAME_HEADER.size
        conn.frame_deadline = None
        self._reply(conn, self._frame(conn, msg, fds))

    def _frame(self, conn: _Conn, msg: dict, fds: list[int]) -> dict:
        """The answer to one whole frame; takes ownership of its fds."""
        try:
            if conn.session is None:
                for fd in fds:
                    os.close(fd)
                fds = []
                return self._hello(conn, msg)
            op = msg.get("op")
            if op == "register":
                if len(fds) != 1:
                    raise ApiError("bad_request", "register carries exactly one memfd")
                fd, fds = fds[0], []
                self.registry.register(conn.session, msg.get("name"), msg.get("size"), fd)
                return {"ok": True}
            if fds:
                raise ApiError("bad_request", f"only register carries a descriptor, not {op!r}")
            if op == "unregister":
                self.registry.unregister(conn.session, msg.get("name"))
                return {"ok": True}
            if op == "ping":
                return {"ok": True}
            raise ApiError("bad_request", f"unknown op {str(op)[:64]!r}")
        except ApiError as exc:
            self._refused(conn, exc.code, str(exc), op=msg.get("op"))
            return _error(exc.code, str(exc))
        finally:
            for fd in fds:
                os.close(fd)

    def _hello(self, conn: _Conn, msg: dict) -> dict:
        key = msg.get("api_key")
        if msg.get("op") != "hello" or not (key is None or isinstance(key, str)):
            raise _RuleBroken("bad_request", "the first frame must be {op: hello, api_key}")
        tenant = self.tenants.authenticate(f"Bearer {key}" if key else None)
        if tenant is None:
            raise _RuleBroken("unauthorized", "missing or invalid API key")
        conn.session = Session(tenant.name)
        conn.hello_deadline = None
        return {"ok": True, "tenant": tenant.name, "max_bytes": self.limits.max_bytes_per_tenant}

    # ---- answering ----
    def _reply(self, conn: _Conn, msg: dict) -> None:
        conn.out = encode_frame(msg)
        self._write(conn)

    def _write(self, conn: _Conn) -> None:
        try:
            n = conn.sock.send(conn.out)
        except (BlockingIOError, InterruptedError):
            n = 0
        except OSError:
            self._close(conn)
            return
        conn.out = conn.out[n:]
        if conn.out:                         # the peer does not read: no more frames from it until it does
            if conn.write_deadline is None:
                conn.write_deadline = time.monotonic() + self.limits.frame_timeout_s
            self._listen(conn, selectors.EVENT_WRITE)
            return
        conn.write_deadline = None
        if conn.close_after:
            self._close(conn)
        else:
            self._listen(conn, selectors.EVENT_READ)

    def _refused(self, conn: _Conn, code: str, message: str, op: Any = None) -> None:
        self.refusals += 1
        what = f" {str(op)[:32]}" if op is not None else ""
        self._log(logging.WARNING, "shared-memory session of %s: refused%s: %s: %s", conn.who(), what, code, message)

    def _break(self, conn: _Conn, code: str, message: str) -> None:
        """The peer broke a rule: answer it (if its answers are being read), log, close."""
        self._refused(conn, code, message + "; disconnected")
        if conn.out:                     # an answer it has not read yet: it would not read this one either
            self._close(conn)
            return
        conn.close_after = True
        conn.hello_deadline = conn.frame_deadline = None
        for fd in conn.fds:
            os.close(fd)
        conn.fds = []
        self._reply(conn, _error(code, message))

    def _close(self, conn: _Conn) -> None:
        if self._conns.pop(conn.sock.fileno(), None) is None:
            return
        try:
            if conn.events:
                self._sel.unregister(conn.sock)
        except (KeyError, ValueError):
            pass
        conn.sock.close()
        self.descriptors.give(1)
        self._per_uid[conn.uid] -= 1
        if not self._per_uid[conn.uid]:
            del self._per_uid[conn.uid]
        for fd in conn.fds:
            os.close(fd)
        conn.fds = []
        if conn.session is not None:
            session, conn.session = conn.session, None
            self.registry.end_session(session)

    def close(self) -> None:
        self._closed = True
        try:
            self._wake_w.send(b"x")
        except OSError:
            pass
        self._thread.join(5.0)
        for conn in list(self._conns.values()):
            self._close(conn)
        for s in (self.sock, self._wake_r, self._wake_w):
            s.close()
        self._sel.close()
        if self._reserve is not None:
            os.close(self._reserve)
        self.descriptors.give(5)
        try:
            os.unlink(self.path)
            if self._dir:
                os.rmdir(self._dir)
        except OSError:
            pass


def _fds_in(anc: list) -> list[int]:
    fds: list[int] = []
    for level, kind, data in anc:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            a = array.array("i")
            a.frombytes(data[: len(data) - len(data) % _FD_SIZE])
            fds += a.tolist()
        # SCM_CREDENTIALS and the like carry no descriptor: nothing to close
    return fds


def _send_now(sock: socket.socket, msg: dict) -> None:
    """Best effort, never blocking: a refused peer's socket buffer is empty, the frame is small."""
    try:
        sock.setblocking(False)
        sock.send(encode_frame(msg))
    except OSError:
        pass


def _error(code: str, message: str) -> dict:
    return {"ok": False, "error": {"code": code, "message": message}}
