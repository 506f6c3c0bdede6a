"""Ready means ready: how long a fresh server takes to answer /readyz 200, and what the first call
of each operation costs against a steady one (issue 26: at most 2x).

    python bench/bench_readiness.py                 # PoCL's kernel cache cold, then warm
    python bench/bench_readiness.py --cache warm

Each run starts a new server (`python -m clce_server`). "cold" points PoCL's on-disk kernel cache
(POCL_CACHE_DIR) at a new empty directory, as on a fresh install; "warm" reuses the one the cold
run filled, as on every later start. The calls are the README's, through the default client
(shared memory on this host), at the shapes this runner is sized for: the loss at 2048 x 32000
fp32, the fused linear cross-entropy at 2048 x 1024 x 32000 fp32 (weight sent whole, stateless,
so every call does the same work). steady: the median of the calls after the first.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import numpy as np

from common import RESULTS, ServerProcess, free_port, machine_info, print_table, write_json


class _Calls:
    """The README's two calls through one client, timed. The client outlives the servers: started
    against one server and moved (its shared memory re-registered) to the next on the same port,
    the first call on a fresh server measures the server's first-call cost, not the client's own
    first touch of its memory (reported apart: `new_client_first_s`)."""

    def __init__(self, url: str):
        import torch

        import clce_client

        torch.manual_seed(0)
        self.x = torch.randn(2048, 32000)
        self.t = torch.randint(0, 32000, (2048,))
        self.h = torch.randn(2048, 1024) * 0.1
        self.w = torch.randn(32000, 1024) * 0.05
        self.y = torch.randint(0, 32000, (2048,))
        self.url = url
        self.client = clce_client.Client(url)

    def loss(self, client=None) -> float:
        xi = self.x.clone().requires_grad_()
        t0 = time.perf_counter()
        (client or self.client).cross_entropy(xi, self.t).backward()
        return time.perf_counter() - t0

    def linear(self, client=None) -> float:
        hi, wi = self.h.clone().requires_grad_(), self.w.clone().requires_grad_()
        t0 = time.perf_counter()
        (client or self.client).linear_cross_entropy(hi, wi, self.y, stateless=True).backward()
        return time.perf_counter() - t0

    def server_loss(self) -> float:
        """The server's own time for the loss call (Server-Timing total: from its first byte
        read to its answer), without the client's part (a restart's re-registration, copies)."""
        return self.client.cross_entropy(self.x, self.t, return_grad=True).server_timing["total"] / 1e3

    def run(self, n: int) -> dict[str, list[float]]:
        return {"cross_entropy": [self.loss() for _ in range(n)],
                "cross_entropy, server's own time": [self.server_loss() for _ in range(n)],
                "linear_cross_entropy": [self.linear() for _ in range(n)]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache", choices=["cold", "warm", "both"], default="both")
    ap.add_argument("--calls", type=int, default=5)
    args = ap.parse_args()
    cache_dir = tempfile.mkdtemp(prefix="clce-pocl-cache-")
    rows, doc = [], {"machine": machine_info(), "runs": []}
    port = free_port()
    calls = None
    with _on_port(ServerProcess(env={"POCL_CACHE_DIR": tempfile.mkdtemp()}), port) as srv:
        calls = _Calls(srv.url)
        calls.run(2)                        # the client's own first touches, paid here
    for mode in (["cold", "warm"] if args.cache == "both" else [args.cache]):
        env = {"POCL_CACHE_DIR": cache_dir if args.cache == "both" else tempfile.mkdtemp()}
        with _on_port(ServerProcess(env=env), port) as srv:
            ready_s = srv.startup_seconds
            times = calls.run(args.calls)
            import clce_client

            with clce_client.Client(srv.url) as fresh:
                new_client_first = calls.loss(fresh)
        run = {"cache": mode, "ready_s": ready_s, "new_client_first_loss_s": new_client_first}
        for op, ts in times.items():
            steady = statistics.median(ts[1:])
            run[op] = {"first_s": ts[0], "steady_s": steady, "first_over_steady": ts[0] / steady}
            rows.append([mode, f"{ready_s:.1f} s", op, f"{ts[0] * 1e3:.0f} ms", f"{steady * 1e3:.0f} ms",
                         f"{ts[0] / steady:.2f}x"])
        rows.append([mode, "", "a new client's first loss call", f"{new_client_first * 1e3:.0f} ms", "", ""])
        doc["runs"].append(run)
    calls.client.close()
    print_table("Readiness: /readyz on a fresh server, first call against steady (target <= 2.00x)",
                ["PoCL cache", "ready in", "operation", "first", "steady", "first/steady"], rows)
    path = write_json(RESULTS / "readiness.json", doc)
    print(f"wrote {path}")


def _on_port(srv: ServerProcess, port: int) -> ServerProcess:
    """`srv` on `port` (a restart where the last server was: the client follows it there)."""
    srv.port, srv.url = port, f"http://127.0.0.1:{port}"
    return srv


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
