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
the client's, RssShmem there), sampled every 2 ms during clce's blocks, above its level before
them. The worker's is measured apart, in a new process per side that makes the logits and then
runs 3 steps of that side only: its peak RSS (VmHWM: anon + shared) above its level once the
logits exist. That is what the step adds to a worker holding its logits (torch: the gradient and
its own temporaries; clce: the region the logits are copied into and the gradient's, kept for the
next step).
"""

from __future__ import annotations

import argparse
import gc
import math
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


def _make(dims, dtype):
    import torch

    gen = torch.Generator().manual_seed(0)
    tdt = torch.bfloat16 if dtype == "bf16" else torch.float32
    x = (torch.randn(*dims, generator=gen) * 2).to(tdt).requires_grad_()
    t = torch.randint(0, dims[-1], dims[:-1], generator=gen)
    return x, t


def _step(side: str, x, t, shift: bool):
    import torch.nn.functional as F

    import clce_client

    x.grad = None
    if side == "torch":
        V = x.shape[-1]
        loss = (F.cross_entropy(x[..., :-1, :].reshape(-1, V), t[..., 1:].reshape(-1)) if shift
                else F.cross_entropy(x, t))
    else:
        loss = clce_client.cross_entropy(x, t, shift=1) if shift else clce_client.cross_entropy(x, t)
    loss.backward()


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def worker_peak(side: str, spec: str, url: str) -> int:
    """Run in a new process (``--worker-peak SIDE SPEC``): 3 steps of one side, the peak RSS added."""
    import json
    import subprocess

    out = subprocess.run([sys.executable, __file__, "--worker-peak", side, spec, "--url", url],
                         capture_output=True, text=True, check=True, env={**os.environ, "CLCE_URL": url})
    return json.loads(out.stdout.strip().splitlines()[-1])["added"]


def _worker_peak_main(side: str, spec: str) -> None:
    import json

    dims, dtype, shift = parse(spec)
    x, t = _make(dims, dtype)
    base = _status("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")       # VmHWM from here
    for _ in range(3):
        _step(side, x, t, shift)
    print(json.dumps({"added": _status("VmHWM") - base}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default=DEFAULT_SHAPES)
    ap.add_argument("--blocks", type=int, default=3)
    ap.add_argument("--calls", type=int, default=3)
    ap.add_argument("--url", help="a running server (default: start one with default settings)")
    ap.add_argument("--worker-peak", nargs=2, metavar=("SIDE", "SPEC"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker_peak:
        return _worker_peak_main(*args.worker_peak)

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
            x, t = _make(dims, dtype)

            def local():
                _step("torch", x, t, shift)

            def remote():
                _step("clce", x, t, shift)

            times, peaks = {}, {}
            for b in range(args.blocks):
                for name, fn in ((("torch", local), ("clce", remote)) if b % 2 == 0
                                 else (("clce", remote), ("torch", local))):
                    gc.collect()
                    with (Peak(srv.proc.pid, ("RssAnon",)) if srv else Peak(os.getpid(), ())) as server:
                        ts = []
                        for _ in range(args.calls):
                            t0 = time.perf_counter()
                            fn()
                            ts.append(time.perf_counter() - t0)
                    times.setdefault(name, []).append(statistics.mean(ts[1:]))
                    if name == "clce" and srv:
                        peaks["server"] = max(peaks.get("server", 0), server.high - server.base)
            del x, t
            gc.collect()
            for name in ("torch", "clce"):
                peaks[name] = worker_peak(name, spec, url)
            gb = math.prod(dims) * (2 if dtype == "bf16" else 4) / 1e9
            med = {k: statistics.median(v) for k, v in times.items()}
            label = "x".join(map(str, dims)) + f" {dtype}" + (" shift" if shift else "")
            ratio = med["clce"] / med["torch"]
            rows.append([label, f"{gb:.2f}", f"{med['torch'] * 1e3:.0f}", f"{med['clce'] * 1e3:.0f}",
                         f"{ratio:.2f}x", f"{peaks['torch'] / MiB:.0f}", f"{peaks['clce'] / MiB:.0f}",
                         f"{peaks.get('server', 0) / MiB:.0f}"])
            doc["rows"].append({"shape": label, "logits_gb": gb, "torch_s": med["torch"], "clce_s": med["clce"],
                                "ratio": ratio, "blocks": times,
                                "worker_added_peak_bytes": {"torch": peaks["torch"], "clce": peaks["clce"]},
                                "server_peak_bytes": peaks.get("server", 0)})
    finally:
        if srv:
            srv.stop()
    common.print_table("The README's call at LM sizes: clce / local torch fwd+bwd (lower is better); "
                       "MiB a step adds to a worker holding its logits, and the server's own peak",
                       ["shape", "GB", "torch ms", "clce ms", "clce/torch", "worker torch", "worker clce",
                        "server"], rows)
    print(f"wrote {common.write_json(common.RESULTS / 'lm_scale.json', doc)}")


if __name__ == "__main__":
    main()
