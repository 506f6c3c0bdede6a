"""What the lifespan creates and the endpoints use: devices and their runtimes (a loss engine and a
fused linear cross-entropy per device), tenants, metrics, the scheduler, the weight store, the
host buffer pool."""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
import uuid

from . import __version__
from .config import Settings
from .rails.hostmem import HostPool
from .metrics import Metrics
from .rails.scheduler import Scheduler
from .tenants import TenantRegistry

log = logging.getLogger("clce.server")


class ServerState:
    """Long-lived resources. Devices open in a background thread (`open_devices`), so /healthz
    answers at once and /readyz turns 200 when the kernels are built and warmed."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.instance_id = uuid.uuid4().hex[:12]
        self.started = time.time()
        self.devices: list = []
        self.engines: dict[int, object] = {}          # device index -> LossEngine
        self.linear_engines: dict[int, object] = {}   # device index -> LinearCrossEntropy
        #: stored weights of the fused linear cross-entropy (made with the scheduler, whose budgets it uses)
        self.weight_store = None
        self.registry = self._registry(settings)
        self.metrics = Metrics(tenants=[t.name for t in self.registry.tenants], version=__version__,
                               instance=self.instance_id)
        self.scheduler: Scheduler | None = None
        self.ready = threading.Event()
        self.draining = False
        self.init_error: str | None = None
        self.inflight_http = 0                   # leased requests being served (loss and linear routes)
        #: bodies and gradients, reused with their pages mapped (taken and given back by the leases)
        self.pool = HostPool(settings.host_pool_bytes)
        self.shm_registry = None                 # shared memory (rails/shm.py), when settings allow it
        self.shm_server = None

    @staticmethod
    def _registry(s: Settings) -> TenantRegistry:
        defaults = {"max_request_bytes": s.max_request_bytes, "max_inflight_bytes": s.tenant_max_inflight_bytes,
                    "max_queued": s.max_queued}
        if s.tenants:
            return TenantRegistry.from_toml(s.tenants, defaults)
        return TenantRegistry.open(defaults)

    def open_shm(self) -> None:
        """The shared-memory registration socket, when the settings allow it."""
        if not self.settings.shm_enabled:
            return
        from .config import parse_gid, parse_uids
        from .rails.shm import ShmLimits, ShmRegistry, ShmServer

        s = self.settings
        self.shm_registry = ShmRegistry(ShmLimits.from_settings(s))
        self.shm_server = ShmServer(self.shm_registry, self.registry, s.shm_socket,
                                    group=parse_gid(s.shm_socket_group) if s.shm_socket_group else None,
                                    allowed_uids=parse_uids(s.shm_allowed_uids) if s.shm_allowed_uids else None)

    def close_shm(self) -> None:
        if self.shm_server is not None:
            self.shm_server.close()

    async def drain(self, timeout_s: float | None) -> bool:
        """Take no new work (503), let admitted jobs finish (up to `timeout_s`), then wait for
        the answers still streaming out. True when every job finished in time."""
        self.draining = True
        end = None if timeout_s is None else time.monotonic() + timeout_s
        finished = True
        if self.scheduler is not None:
            finished = await self.scheduler.drain(timeout_s)
        while self.inflight_http > 0 and (end is None or time.monotonic() < end):
            await asyncio.sleep(0.02)
        return finished and self.inflight_http == 0

    @property
    def serving(self) -> bool:
        return self.ready.is_set() and not self.draining

    def open_devices(self) -> None:
        """Runs in a thread: open and build, warm the kernels, then start the scheduler."""
        try:
            if self.settings.device_threads is not None:
                # PoCL reads this when OpenCL first starts (below): its CPU device then runs kernels
                # on this many threads, leaving the other cores to the event loop
                os.environ["POCL_MAX_PTHREAD_COUNT"] = str(self.settings.device_threads)
            from .rails.device import open_devices
            from .cross_entropy.engine import LossEngine
            from .linear.engine import LinearCrossEntropy
            from .linear.weights import WeightStore

            s = self.settings
            devices = open_devices(s.device_selectors, memory=s.device_memory)
            for dev in devices:
                dev.build_startup_programs()
                engine = LossEngine(dev)
                linear = LinearCrossEntropy(engine)
                if s.warmup:   # PoCL compiles each kernel at its first launch
                    engine.warm_up()
                    linear.warm_up()
                self.engines[dev.index] = engine
                self.linear_engines[dev.index] = linear
            self.devices = devices
            self.scheduler = Scheduler(devices, self.registry, max_inflight_bytes=s.max_inflight_bytes,
                                       metrics=self.metrics, policy=s.scheduling, max_batch=s.max_batch)
            self.weight_store = WeightStore(self.scheduler, max_entries=s.max_stored_weights,
                                            idle_s=s.weight_idle_s, instance=self.instance_id)
            self.scheduler.start()
            self.ready.set()
            log.info("ready: %s", ", ".join(f"{d.name} [{d.platform}]" for d in devices))
        except Exception as exc:
            # Permanent: /readyz and every request answer 503 with this reason from now on, and
            # clce-server exits with status 1 (__main__.DrainingServer); an app hosted otherwise
            # (Ray Serve, tests) stays up, unready, saying why.
            self.init_error = f"{exc} (clce-server --list-devices shows the OpenCL devices that build)"
            log.error("OpenCL initialisation failed: %s", self.init_error)

