"""A training loop with dynamic padding: does the client's memory reuse keep first-touch out of it?

Every step has a different row count (seeded, uniform in --rows, default 512-2048) of --classes
(default 32000) fp32 logits (--mixed alternates fp32 and bf16 steps). One real server; per
transport, two clients run the same steps side by side, in blocks of --block steps (A's block,
then B's, for the same lengths), so that a slow phase of the machine hits both alike:

  reuse     the default client: regions and receive buffers are reused (clce_client.buffers:
            size classes and growth)
  no reuse  max_cached_bytes=0: nothing is kept, every step gets memory never touched (what the
            client did before: a new region for nearly every size)

Per client: the server's kernel time per call (its Server-Timing "kernel" figure, over shared
memory the kernel takes the page faults of a region's first touch), in ns per logit, median over
the steps after the first (the first step touches its memory under either policy); the wall time
per call; the floor (the loop's largest step repeated 3 times on the reuse client: memory
touched, the kernel's own speed here); the buffers made (`created`: first touches); and the
client's resident memory: its peak during the client's own loop (VmHWM, reset before it; the other client is closed then) and what
it still holds after it (VmRSS, incl. shared memory); and the kernel time of that loop alone
("median alone": no other client's memory churn in between).

    python bench/bench_arena.py                    # 20 steps, shm and tcp
    python bench/bench_arena.py --transports shm --steps 10 --mixed
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (puts the repo on sys.path)

import numpy as np  # noqa: E402


def _status(key: str) -> int:
    """A /proc/self/status figure in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    return 0


def _reset_peak() -> None:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")       # resets VmHWM to the current RSS (Linux >= 4.0)
    except OSError:
        pass


def run_steps(client, steps, xs, t_full):
    """The steps on one client: [(rows, kernel seconds, wall seconds)]."""
    out = []
    for n, dtype in steps:
        x, t = xs[dtype][:n], t_full[:n]
        t0 = time.perf_counter()
        r = client.cross_entropy(x, t, return_grad=True)
        wall = time.perf_counter() - t0
        out.append((n, r.server_timing.get("kernel", float("nan")) / 1e3, wall))
        del r      # the step is over: its gradient is dropped, its memory free for the next one
    return out


def pool_stats(client, transport):
    return client._arena.stats if transport == "shm" else client._buffers.stats


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--rows", default="512-2048")
    ap.add_argument("--classes", type=int, default=32000)
    ap.add_argument("--block", type=int, default=5)
    ap.add_argument("--mixed", action="store_true", help="alternate fp32 and bf16 steps")
    ap.add_argument("--transports", default="shm,tcp")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=common.RESULTS)
    args = ap.parse_args()

    import torch

    import clce_client

    lo, hi = (int(v) for v in args.rows.split("-"))
    rng = np.random.default_rng(args.seed)
    lengths = [int(v) for v in rng.integers(lo, hi + 1, args.steps)]
    dtypes = [("bf16" if k % 2 else "fp32") if args.mixed else "fp32" for k in range(args.steps)]
    steps = list(zip(lengths, dtypes))
    g = torch.Generator().manual_seed(args.seed)
    x32 = torch.randn(hi, args.classes, generator=g) * 2
    xs = {"fp32": x32, "bf16": x32.to(torch.bfloat16)}
    t_full = torch.randint(0, args.classes, (hi,), generator=g)
    configs = {"reuse": {}, "no reuse": {"max_cached_bytes": 0}}
    print(f"steps: {args.steps} lengths {lengths[:6]}... x {args.classes} classes "
          f"({'fp32/bf16 alternating' if args.mixed else 'fp32'}); load average {common.machine_info().get('loadavg')}")

    doc = {"machine": common.machine_info(), "lengths": lengths, "dtypes": dtypes, "classes": args.classes,
           "transports": {}}
    rows = []
    with common.ServerProcess(log_path=args.out / "arena-server.log") as srv:
        for transport in args.transports.split(","):
            # side by side, in blocks: the same steps on both clients
            samples = {name: [] for name in configs}
            created = {}
            with clce_client.Client(srv.url, transport=transport, **configs["reuse"]) as a, \
                    clce_client.Client(srv.url, transport=transport, **configs["no reuse"]) as b:
                clients = {"reuse": a, "no reuse": b}
                for s in range(0, len(steps), args.block):
                    for name, c in clients.items():
                        samples[name] += run_steps(c, steps[s:s + args.block], xs, t_full)
                for name, c in clients.items():
                    created[name] = pool_stats(c, transport)["created"]
                # the floor: the loop's largest step again, 3 times, on memory touched by now
                big = max(steps)
                floor = min(k / (n * args.classes) for n, k, _ in run_steps(a, [big] * 3, xs, t_full))
            # resident memory: each client alone, the same loop, peak and what it keeps
            memory, alone = {}, {}
            for name, options in configs.items():
                gc.collect()
                base = _status("VmRSS")
                _reset_peak()
                with clce_client.Client(srv.url, transport=transport, **options) as c:
                    alone[name] = run_steps(c, steps, xs, t_full)
                    gc.collect()
                    pool_stats(c, transport)      # files what came back (beyond the bound: let go)
                    memory[name] = {"peak": _status("VmHWM") - base, "held": _status("VmRSS") - base}
            doc["transports"][transport] = {"samples": samples, "alone": alone, "created": created, "memory": memory,
                                            "floor_s_per_logit": floor}
            for name in configs:
                per = [k / (n * args.classes) * 1e9 for n, k, _ in samples[name][1:]]
                wall = [w for _, _, w in samples[name][1:]]
                first = samples[name][0]
                per_alone = [k / (n * args.classes) * 1e9 for n, k, _ in alone[name][1:]]
                rows.append([transport, name, f"{first[1] / (first[0] * args.classes) * 1e9:.2f}",
                             f"{statistics.median(per):.2f}", f"{max(per):.2f}", f"{statistics.median(per_alone):.2f}",
                             common.fmt_ms(statistics.median(wall)), created[name],
                             f"{memory[name]['peak'] / 2**20:.0f}", f"{memory[name]['held'] / 2**20:.0f}"])
            med = {name: statistics.median(k / (n * args.classes) for n, k, _ in samples[name][1:])
                   for name in configs}
            walls = {name: statistics.median(w for _, _, w in samples[name][1:]) for name in configs}
            doc["transports"][transport]["kernel_ratio_no_reuse_over_reuse"] = med["no reuse"] / med["reuse"]
            doc["transports"][transport]["wall_ratio_no_reuse_over_reuse"] = walls["no reuse"] / walls["reuse"]
            print(f"{transport}: kernel ns/logit, no reuse / reuse = {med['no reuse'] / med['reuse']:.2f}x; "
                  f"reuse / floor (largest step repeated: {floor * 1e9:.2f} ns) = {med['reuse'] / floor:.2f}x, "
                  f"no reuse / floor = {med['no reuse'] / floor:.2f}x; "
                  f"wall per call, no reuse / reuse = {walls['no reuse'] / walls['reuse']:.2f}x")
    common.print_table("dynamic padding: kernel time per logit (server), wall per call, memory (client)",
                       ["transport", "client", "kernel ns/logit, 1st", "median after", "max after", "median alone",
                        "wall ms (median)", "buffers made", "peak RSS MiB", "held MiB"], rows)
    path = common.write_json(args.out / "arena.json", doc)
    print(f"wrote {path}; load average now {common.machine_info().get('loadavg')}")


if __name__ == "__main__":
    main()
