#!/usr/bin/env python3
"""Memory under a burst of large requests (issue 11, item 7).

The server runs with --max-inflight-bytes M and --host-pool-bytes P. After a warm-up, many
clients send large requests at once (far more bytes than M: most are turned away with 429 and
retried after Retry-After by the client). Measured from the kernel, not sampled: the server's
peak RSS during the burst (VmHWM, reset through /proc/PID/clear_refs before it), against

    bound = cold RSS (ready, no request served yet) + M + P + slack

and RSS a few seconds after the burst against the warm baseline (RSS after the warm-up, which
ran the same request sizes at the same concurrency once): within 10 %. Every answer is checked.

    .venv/bin/python bench/bench_memory.py                    # 16 clients x 3 requests of 16 MiB
    .venv/bin/python bench/bench_memory.py --clients 32 --rows 2048 --classes 8192
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from pathlib import Path

import common  # noqa: F401  (puts the repo on sys.path)
from common import RESULTS, ServerProcess, make_batch, reference_mean_ce

MiB = 1 << 20


def rss(pid: int) -> int:
    return _status(pid, "VmRSS")


def peak_rss(pid: int) -> int:
    return _status(pid, "VmHWM")


def _status(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def reset_peak(pid: int) -> None:
    Path(f"/proc/{pid}/clear_refs").write_text("5")   # 5: reset the peak RSS (VmHWM) to now


def burst(url: str, clients: int, requests: int, rows: int, classes: int, budget_s: float) -> dict:
    from clce_client import Client, errors

    x, t = make_batch(rows, classes, seed=7)
    loss_ref, idx, g_ref = reference_mean_ce(x, t)
    outcome: dict[str, int] = {}
    lock = threading.Lock()

    def one() -> None:
        with Client(url, timeout=600, retry_budget_s=budget_s) as c:
            for _ in range(requests):
                try:
                    res = c.cross_entropy(x, t, return_grad=True)
                    ok = abs(float(res.loss) - loss_ref) <= 1e-4 * abs(loss_ref) and \
                        abs(res.grad[idx].astype(float) - g_ref).max() <= 1e-5
                    key = "ok" if ok else "wrong"
                except errors.ClceError as exc:
                    key = type(exc).__name__
                with lock:
                    outcome[key] = outcome.get(key, 0) + 1

    threads = [threading.Thread(target=one) for _ in range(clients)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    return outcome


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--requests", type=int, default=3, help="per client")
    ap.add_argument("--rows", type=int, default=1024)
    ap.add_argument("--classes", type=int, default=4096)
    ap.add_argument("--max-inflight-mib", type=int, default=128)
    ap.add_argument("--pool-mib", type=int, default=64)
    ap.add_argument("--slack-mib", type=int, default=64, help="fixed overhead beyond the cold RSS")
    ap.add_argument("--retry-budget-s", type=float, default=120.0)
    ap.add_argument("--out", type=Path, default=RESULTS / "memory.json")
    args = ap.parse_args()

    m, p = args.max_inflight_mib * MiB, args.pool_mib * MiB
    server_args = ["--max-inflight-bytes", str(m), "--tenant-max-inflight-bytes", str(m),
                   "--host-pool-bytes", str(p), "--max-queued", "1024"]
    with ServerProcess(server_args, env={"CLCE_ACCESS_LOG": "false"}) as srv:
        pid = srv.proc.pid
        cold = rss(pid)
        warm_outcome = burst(srv.url, args.clients, 1, args.rows, args.classes, args.retry_budget_s)
        time.sleep(2)
        warm = rss(pid)
        reset_peak(pid)
        t0 = time.perf_counter()
        outcome = burst(srv.url, args.clients, args.requests, args.rows, args.classes, args.retry_budget_s)
        seconds = time.perf_counter() - t0
        peak = peak_rss(pid)
        time.sleep(3)
        after = rss(pid)
    bound = cold + m + p + args.slack_mib * MiB
    request_bytes = args.rows * args.classes * 4 * 2
    result = {
        "clients": args.clients, "requests_per_client": args.requests,
        "request_mib_in_flight": round(request_bytes / MiB, 1),
        "offered_mib_at_once": round(args.clients * request_bytes / MiB, 1),
        "max_inflight_mib": args.max_inflight_mib, "pool_mib": args.pool_mib, "slack_mib": args.slack_mib,
        "cold_rss_mib": round(cold / MiB, 1), "warm_rss_mib": round(warm / MiB, 1),
        "peak_rss_mib": round(peak / MiB, 1), "bound_mib": round(bound / MiB, 1),
        "peak_within_bound": peak <= bound,
        "after_rss_mib": round(after / MiB, 1), "after_vs_warm": round(after / warm - 1, 4),
        "after_within_10pct": after <= 1.10 * warm,
        "burst_seconds": round(seconds, 2), "warmup_outcomes": warm_outcome, "outcomes": outcome,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    good = result["peak_within_bound"] and result["after_within_10pct"] and set(outcome) == {"ok"}
    return 0 if good else 1


if __name__ == "__main__":
    raise SystemExit(main())
