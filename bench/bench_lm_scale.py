"""The README's call at language-model sizes (issue 26): `loss = clce_client.cross_entropy(logits,
labels, ...); loss.backward()` with the default client (shared memory on this host) and a default
server, against local torch's own fwd+bwd, side by side in blocks; with the worker's and the
server's peak memory.

    python bench/bench_lm_scale.py                     # the rows below
    python bench/bench_lm_scale.py --shapes 8x1024x128256:bf16:shift --blocks 2 --calls 2

Shapes: NxC (fp32 rows) or BxTxV:DTYPE[:shift] (a causal LM's logits; ``shift`` scores position t
against label t + 1, torch's side slicing as models do). The 2048x32000 fp32 row is the headline
every earlier figure was taken at: the LM rows' ratios are to be read against it (the cost should
grow with the bytes, and no faster).

Memory: the server's is its own allocations (RssAnon: the logits and gradient in shared memory are
the client's, RssShmem there); the worker's is its RSS (anon + shared: the logits, the regions it
copies them into, torch's gradient). Peaks are sampled every 2 ms during each side's block, and
reported above each side's resting level before its first call.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

DEFAULT_SHAPES = "2048x32000,4096x32000,8192x32000,8x1024x128256:bf16:shift"
MiB = 1 << 20


def parse(spec: str):
    parts = spec.split(":")
    dims = tuple(int(d) for d in parts[0].lower().split("x"))
    dtype = parts[1] if len(parts) > 1 else "fp32"
    return dims, dtype, "shift" in parts[2:]


class Peak:
    """Samples /proc/PID/status fields (kB) every 2 ms in a thread; `peak()` is the highest sum."""

    def __init__(self, pid: int, fields: tuple[str, ...]):
        self.path, self.fields = Path(f"/proc/{pid}/status"), fields
        self.high = 0
        self._done = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def now(self) -> int:
        vals = {ln.split(":")[0]: int(ln.split()[1]) * 1024 for ln in self.path.read_text().splitlines()
                if ln.split(":")[0] in self.fields}
        return sum(vals.values())

    def _run(self) -> None:
        while not self._done.is_set():
            self.high = max(self.high, self.now())
            time.sleep(0.002)

    def __enter__(self) -> "Peak":
        self.base = self.now()
        self._t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._done.set()
        self._t.join()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default=DEFAULT_SHAPES)
    ap.add_argument("--blocks", type=int, default=3)
    ap.add_argument("--calls", type=int, default=3)
    ap.add_argument("--url", help="a running server (default: start one with default settings)")
    args = ap.parse_args()

    import torch
    import torch.nn.functional as F

    import clce_client

    srv = None if args.url else common.ServerProcess().start()
    url = args.url or srv.url
    os.environ["CLCE_URL"] = url          # the default client: what clce_client.cross_entropy uses
    os.environ.pop("CLCE_TRANSPORT", None)
    rows, doc = [], {"machine": common.machine_info(), "blocks": args.blocks, "calls": args.calls, "rows": []}
    try:
        for spec in args.shapes.split(","):
            dims, dtype, shift = parse(spec)
            gen = torch.Generator().manual_seed(0)
            tdt = torch.bfloat16 if dtype == "bf16" else torch.float32
            x = (torch.randn(*dims, generator=gen) * 2).to(tdt).requires_grad_()
            t = torch.randint(0, dims[-1], dims[:-1], generator=gen)
            V = dims[-1]

            def local():
                x.grad = None
                if shift:
                    F.cross_entropy(x[..., :-1, :].reshape(-1, V), t[..., 1:].reshape(-1)).backward()
                else:
                    F.cross_entropy(x, t).backward()

            def remote():
                x.grad = None
                (clce_client.cross_entropy(x, t, shift=1) if shift else clce_client.cross_entropy(x, t)).backward()

            times, peaks = {}, {}
            for b in range(args.blocks):
                for name, fn in ((("torch", local), ("clce", remote)) if b % 2 == 0
                                 else (("clce", remote), ("torch", local))):
                    gc.collect()
                    with Peak(os.getpid(), ("RssAnon", "RssShmem", "RssFile")) as worker, \
                            (Peak(srv.proc.pid, ("RssAnon",)) if srv else Peak(os.getpid(), ())) as server:
                        ts = []
                        for _ in range(args.calls):
                            t0 = time.perf_counter()
                            fn()
                            ts.append(time.perf_counter() - t0)
                    times.setdefault(name, []).append(statistics.mean(ts[1:]))
                    w, s = worker.high - worker.base, (server.high - server.base) if srv else 0
                    peaks[name] = (max(peaks.get(name, (0, 0))[0], w), max(peaks.get(name, (0, 0))[1], s))
            gb = x.numel() * x.element_size() / 1e9
            med = {k: statistics.median(v) for k, v in times.items()}
            label = "x".join(map(str, dims)) + f" {dtype}" + (" shift" if shift else "")
            ratio = med["clce"] / med["torch"]
            rows.append([label, f"{gb:.2f}", f"{med['torch'] * 1e3:.0f}", f"{med['clce'] * 1e3:.0f}",
                         f"{ratio:.2f}x", f"{peaks['torch'][0] / MiB:.0f}", f"{peaks['clce'][0] / MiB:.0f}",
                         f"{peaks['clce'][1] / MiB:.0f}"])
            doc["rows"].append({"shape": label, "logits_gb": gb, "torch_s": med["torch"], "clce_s": med["clce"],
                                "ratio": ratio, "blocks": times,
                                "worker_peak_bytes": {k: v[0] for k, v in peaks.items()},
                                "server_peak_bytes": peaks["clce"][1]})
            del x, t
            gc.collect()
    finally:
        if srv:
            srv.stop()
    common.print_table("The README's call at LM sizes: clce / local torch fwd+bwd (lower is better); "
                       "peaks in MiB over the resting level",
                       ["shape", "GB", "torch ms", "clce ms", "clce/torch", "worker torch", "worker clce",
                        "server"], rows)
    print(f"wrote {common.write_json(common.RESULTS / 'lm_scale.json', doc)}")


if __name__ == "__main__":
    main()
