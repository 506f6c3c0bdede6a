"""A rolling restart behind the compose stack's load balancer loses no training step.

The compose stack's images cannot be pulled here, but its load balancer's configuration can run:
docker/haproxy.cfg, with only the addresses changed (loopback ports for the replicas' names, no
Docker DNS), under Debian's HAProxy, in front of two real clce servers. A training loop sends
every step through it over TCP (what a client outside the compose network uses) while the replicas
are restarted one after the other; every step must succeed and the losses must equal a local run.
"""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import threading
import time

import httpx
import pytest
import torch
import torch.nn.functional as F
from tests.support.serverproc import REPO, ServerProcess, free_port  # noqa: E402

import clce_client  # noqa: E402

pytestmark = [pytest.mark.skipif(shutil.which("haproxy") is None, reason="haproxy is not installed (setup.sh dev)"),
              pytest.mark.timeout(300)]

ROWS, HIDDEN, CLASSES = 256, 64, 4096
MIN_STEPS = 20


def lb_config(replica_ports: list[int], front_port: int, monitor_port: int) -> str:
    """docker/haproxy.cfg with loopback addresses instead of compose's service names."""
    cfg = (REPO / "docker" / "haproxy.cfg").read_text()
    cfg = re.sub(r"\nresolvers docker\n(?:    .*\n)+", "\n", cfg)
    cfg = cfg.replace(" resolvers docker init-addr last,libc,none", "")
    cfg = cfg.replace("bind :8000", f"bind 127.0.0.1:{front_port}").replace("bind :8405", f"bind 127.0.0.1:{monitor_port}")
    servers = re.findall(r"^    server (\S+) \S+:8000$", cfg, flags=re.M)
    assert len(servers) == len(replica_ports), servers
    for name, port in zip(servers, replica_ports):
        cfg = cfg.replace(f"    server {name} {name}:8000", f"    server {name} 127.0.0.1:{port}")
    return cfg


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(step)
    return torch.randn(ROWS, HIDDEN, generator=g), torch.randint(0, CLASSES, (ROWS,), generator=g)


def new_model() -> torch.nn.Linear:
    torch.manual_seed(0)
    return torch.nn.Linear(HIDDEN, CLASSES)


class TrainingLoop(threading.Thread):
    """Steps until told to stop (and at least MIN_STEPS), recording each step's loss or error."""

    def __init__(self, url: str):
        super().__init__(daemon=True)
        self.client = clce_client.Client(url, transport="tcp", retry_budget_s=60)
        self.model = new_model()
        self.opt = torch.optim.SGD(self.model.parameters(), lr=0.5)
        self.losses: list[float] = []
        self.errors: list[BaseException] = []
        self.stop = threading.Event()

    def run(self) -> None:
        step = 0
        while not (self.stop.is_set() and step >= MIN_STEPS):
            x, y = batch(step)
            self.opt.zero_grad()
            try:
                loss = self.client.cross_entropy(self.model(x), y)
                loss.backward()
            except Exception as exc:  # a failed step is what this test counts
                self.errors.append(exc)
                return
            self.opt.step()
            self.losses.append(loss.item())
            step += 1
        self.client.close()


def local_losses(steps: int) -> list[float]:
    model = new_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    out = []
    for step in range(steps):
        x, y = batch(step)
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        out.append(loss.item())
    return out


def wait_for_steps(loop: TrainingLoop, more: int, timeout: float = 120.0) -> None:
    """Until the training loop has taken `more` steps after now (or failed)."""
    target, deadline = len(loop.losses) + more, time.monotonic() + timeout
    while len(loop.losses) < target and not loop.errors:
        assert loop.is_alive() and time.monotonic() < deadline, f"the loop stopped at {len(loop.losses)} steps"
        time.sleep(0.01)


def wait_for_all_up(monitor: int, replicas: int, timeout: float = 60.0) -> None:
    """Until HAProxy's own health checks see every replica UP (its metrics on the monitor port)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            stats = httpx.get(f"http://127.0.0.1:{monitor}/metrics", timeout=2).text
            up = re.findall(r'^haproxy_server_status\{proxy="clce",server="[^"]+",state="UP"\} 1', stats, re.M)
            if len(up) == replicas:
                return
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, "HAProxy never saw every replica up"
        time.sleep(0.05)


@pytest.mark.parametrize("how", ["sigterm", "sigkill"])
def test_rolling_restart_behind_the_load_balancer_loses_no_step(tmp_path, how):
    ports = [free_port(), free_port()]
    replicas = [ServerProcess(port=p, args=["--no-allow-shm"]) for p in ports]
    front, monitor = free_port(), free_port()
    cfg = tmp_path / "haproxy.cfg"
    cfg.write_text(lb_config(ports, front, monitor))
    lb_log = open(tmp_path / "haproxy.log", "w+")
    lb = None
    try:
        for r in replicas:
            r.start()
        lb = subprocess.Popen(["haproxy", "-db", "-f", str(cfg)], stdout=lb_log, stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{front}"
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline and lb.poll() is None, lb_log.seek(0) or lb_log.read()
            time.sleep(0.2)

        wait_for_all_up(monitor, len(replicas))
        loop = TrainingLoop(url)
        loop.start()
        for r in replicas:                       # one at a time, each back before the next goes
            wait_for_steps(loop, 3)              # the loop is training through the balancer
            if how == "sigterm":
                r.stop()
            else:
                r.proc.send_signal(signal.SIGKILL)
                r.proc.wait(20)
            r.start()
            wait_for_all_up(monitor, len(replicas))   # back for the balancer too, not only /readyz
            assert not loop.errors, loop.errors
        wait_for_steps(loop, 3)                  # and it trains on after the last restart
        loop.stop.set()
        loop.join(120)
        assert not loop.is_alive(), "the training loop hung"
        assert not loop.errors, f"{len(loop.losses)} steps ran, then: {loop.errors[0]!r}"
        assert len(loop.losses) >= MIN_STEPS
        assert loop.losses == pytest.approx(local_losses(len(loop.losses)), rel=1e-5)
    finally:
        if lb is not None:
            lb.terminate()
            lb.wait(10)
        lb_log.close()
        for r in replicas:
            r.cleanup()
