"""GEMM on the OpenCL device: clce's kernels/gemm.cl against CLBlast (untuned and tuned through
its override API) beside torch's matmul on the same cores, in GFLOP/s.

Shapes: the plain (2048x1024).(1024x32000), and the three products of one row chunk of the
fused linear cross-entropy (clce_server/linear/engine.py) at chunk n, hidden H, vocabulary V:

  forward   logits (n, V) = h (n, H) . W^T        (clce: W . h^T, stored transposed)
  dh        (n, H) = dlogits (n, V) . W (V, H)
  dW        (V, H) += dlogits^T (V, n) . h (n, H)

Each shape runs its methods round-robin (bench/common.py: warm-up, best of --repeat), so the
ratios of one run compare like with like. torch runs with as many threads as the OpenCL device
has compute units. CLBlast "tuned" is the best of a few Xgemm parameter sets for CPUs (no local
memory, long vectors along N, a few rows per work-item), set with pyclblast.override_parameters;
CLBlast needs `pip install pyclblast` over the system's libclblast-dev (skipped without it).

With --engine it also measures the whole fused linear cross-entropy in-process, the GEMMs'
end-to-end effect: clce_server.linear.engine.LinearCrossEntropy on the OpenCL device (loss and the
gradients of hidden and weight, no server, no wire) against torch's
F.cross_entropy(F.linear(h, W), y) forward + backward through autograd on the same cores, in
blocks (bench/common.py: a few calls per method in a row, the first dropped, methods rotating).

    python bench/bench_gemm.py                     # n=1024, H=1024, V=32000, 3 repetitions
    python bench/bench_gemm.py --no-clblast --repeat 5
    python bench/bench_gemm.py --engine 4096       # and the end-to-end ratio at N=4096
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (puts the repo on sys.path)

import numpy as np  # noqa: E402

#: CLBlast Xgemm parameter sets tried for a CPU device (CLBlast's database has none for PoCL):
#: SA = SB = 0 (a CPU's "local memory" is ordinary memory), VWN = 8 along N, 1-8 rows per item
CLBLAST_CANDIDATES = [
    dict(KWG=32, KWI=2, MDIMA=2, MDIMC=2, MWG=16, NDIMB=2, NDIMC=2, NWG=64, VWM=1, VWN=8),
    dict(KWG=16, KWI=2, MDIMA=4, MDIMC=4, MWG=32, NDIMB=4, NDIMC=4, NWG=64, VWM=1, VWN=8),
    dict(KWG=16, KWI=2, MDIMA=8, MDIMC=8, MWG=32, NDIMB=8, NDIMC=8, NWG=128, VWM=1, VWN=8),
    dict(KWG=32, KWI=2, MDIMA=4, MDIMC=4, MWG=16, NDIMB=4, NDIMC=4, NWG=128, VWM=1, VWN=8),
]
CLBLAST_BASE = dict(GEMMK=0, KREG=1, KWG=32, KWI=2, MDIMA=8, MDIMC=8, MWG=64, NDIMB=8, NDIMC=8, NWG=64,
                    SA=0, SB=0, STRM=0, STRN=0, VWM=4, VWN=1)


def shapes(n: int, H: int, V: int) -> dict[str, tuple[int, int, int]]:
    """name -> (M, N, K) of C = A . B as torch computes it (row-major); the name's first word is
    clce_server.linear.gemm's product ("plain": the table's default row)."""
    return {"plain (2048x1024).(1024x32000)": (2048, 32000, 1024),
            f"forward h.W^T ({n}x{H}).({H}x{V})": (n, V, H),
            f"dh dlogits.W ({n}x{V}).({V}x{H})": (n, H, V),
            f"dW dlogits^T.h ({V}x{n}).({n}x{H})": (V, H, n)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=1024, help="rows per chunk (default 1024)")
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--no-clblast", action="store_true")
    ap.add_argument("--engine", type=int, default=0, metavar="N",
                    help="also the in-process fused linear cross-entropy at N rows against torch")
    ap.add_argument("--chunk-rows", type=int, default=None, help="LinearCrossEntropy's chunk (default its own)")
    ap.add_argument("--no-gemm", action="store_true", help="only the --engine comparison")
    args = ap.parse_args()
    if not args.no_gemm:
        report(args.n, args.hidden, args.vocab, args.repeat, clblast=not args.no_clblast)
    if args.engine:
        engine_report(args.engine, args.hidden, args.vocab, args.repeat, chunk_rows=args.chunk_rows)


def engine_report(N: int, H: int, V: int, n_blocks: int, *, chunk_rows: int | None = None) -> dict:
    """Seconds of the fused linear cross-entropy (loss, grad of hidden and weight) in-process on
    the OpenCL device beside torch's linear + cross_entropy forward + backward, one run."""
    import os

    import torch
    import torch.nn.functional as F

    from clce_server.linear import engine as linear
    from clce_server.rails.device import open_devices
    from clce_server.cross_entropy.engine import LossEngine

    dev = open_devices("cpu")[0]
    torch.set_num_threads(dev.cl_device.max_compute_units)
    lce = linear.LinearCrossEntropy(LossEngine(dev), **({} if chunk_rows is None else {"chunk_rows": chunk_rows}))
    g = torch.Generator().manual_seed(0)
    h = torch.randn(N, H, generator=g)
    W = torch.randn(V, H, generator=g) / H ** 0.5
    y = torch.randint(0, V, (N,), generator=g)
    grad_weight = np.zeros((V, H), np.float32)

    def clce():
        p = linear.check(h.numpy(), W.numpy(), y.numpy())
        lce(p, grad_weight=grad_weight)

    def local():
        hl, Wl = h.clone().requires_grad_(), W.clone().requires_grad_()
        F.cross_entropy(F.linear(hl, Wl), y).backward()

    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    t = {k: common.stats(v)["median"] for k, v in common.blocks({"torch": local, "clce": clce}, n_blocks).items()}
    flops = 3 * 2.0 * N * H * V
    print(f"# fused linear cross-entropy {N}x{H}x{V} fp32, loss + grad hidden + grad weight, in-process, "
          f"torch on {torch.get_num_threads()} threads, chunk_rows {lce.chunk_rows}; load average {load} (start) "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())} (end)")
    print(f"torch linear+cross_entropy fwd+bwd {t['torch'] * 1e3:.0f} ms   clce LinearCrossEntropy "
          f"{t['clce'] * 1e3:.0f} ms ({t['clce'] / t['torch']:.2f}x torch; "
          f"{flops / t['clce'] / 1e9:.0f} GFLOP/s over its three GEMMs)", flush=True)
    return {"torch_s": t["torch"], "clce_s": t["clce"], "ratio": t["clce"] / t["torch"]}


def report(n: int, H: int, V: int, repeat: int, *, clblast: bool = True) -> dict:
    import pyopencl as cl
    import torch

    from clce_server.rails.device import open_devices
    from clce_server.linear.gemm import GEMM_PRODUCTS, Gemm

    dev = open_devices("cpu")[0]
    gemm = Gemm(dev)
    torch.set_num_threads(dev.cl_device.max_compute_units)
    MF = cl.mem_flags
    try:
        import pyclblast
        import pyopencl.array as cla
    except ImportError:
        pyclblast = None
    if not clblast:
        pyclblast = None
    rng = np.random.default_rng(0)
    print(f"# GEMM GFLOP/s, fp32, {dev.name} ({dev.cl_device.max_compute_units} compute units), "
          f"torch {torch.__version__} on {torch.get_num_threads()} threads; "
          f"load average {' '.join(f'{x:.2f}' for x in __import__('os').getloadavg())}")
    results = {}
    untuned = {}
    if pyclblast is not None:   # CLBlast's own defaults, before any override (they persist)
        for name, (M, N, K) in shapes(n, H, V).items():
            q = dev.queue
            ca, cb = cla.to_device(q, rng.standard_normal((M, K), np.float32)), cla.to_device(q, rng.standard_normal((K, N), np.float32))
            cc = cla.empty(q, (M, N), np.float32)

            def clblast_default():
                t0 = time.perf_counter()
                pyclblast.gemm(q, M, N, K, ca, cb, cc, a_ld=K, b_ld=N, c_ld=N)
                q.finish()
                return time.perf_counter() - t0

            untuned[name] = 2.0 * M * N * K / min(common.round_robin({"c": clblast_default}, 1)["c"]) / 1e9
            del ca, cb, cc
    for name, (M, N, K) in shapes(n, H, V).items():
        A = rng.standard_normal((M, K), np.float32)
        B = rng.standard_normal((K, N), np.float32)
        C = np.empty((M, N), np.float32)
        ta, tb = torch.from_numpy(A), torch.from_numpy(B)
        flops = 2.0 * M * N * K
        product = name.split()[0] if name.split()[0] in GEMM_PRODUCTS else "*"
        methods = {"torch": lambda: (ta @ tb, None)[1]}

        def clce_layout():
            """The layout clce_server/linear/engine.py runs each product in (see gemm.cl's banner)."""
            if name.startswith("forward"):   # C^T (N x M) = B^T . A^T, stored transposed
                Bt = np.ascontiguousarray(B.T)   # W (V, H): A operand rows along K
                At = np.ascontiguousarray(A.T)   # h^T (H, n): the chunk transposed, rows along n
                return (N, M, K, Bt, (K, 1), At, M, C, (1, N))
            if name.startswith("dW"):            # A = dlogits^T: dlogits (K x M) read at (1, M)
                return (M, N, K, np.ascontiguousarray(A.T), (1, M), B, N, C, (N, 1))
            return (M, N, K, A, (K, 1), B, N, C, (N, 1))

        gM, gN, gK, gA, ga_str, gB, gldb, gC, gc_str = clce_layout()
        bufs = [cl.Buffer(dev.context, MF.READ_WRITE | MF.USE_HOST_PTR, hostbuf=x) for x in (gA, gB, gC)]

        def clce():
            ev = gemm(gM, gN, gK, bufs[0], ga_str, bufs[1], gldb, bufs[2], gc_str, product=product)
            ev.wait()
            return (ev.profile.end - ev.profile.start) * 1e-9

        methods["clce gemm.cl"] = clce
        if pyclblast is not None:
            q = dev.queue
            ca, cb, cc = cla.to_device(q, A), cla.to_device(q, B), cla.empty(q, (M, N), np.float32)

            def clblast():
                t0 = time.perf_counter()
                pyclblast.gemm(q, M, N, K, ca, cb, cc, a_ld=K, b_ld=N, c_ld=N)
                q.finish()
                return time.perf_counter() - t0

            best, best_p = None, None
            for cand in CLBLAST_CANDIDATES:
                pyclblast.override_parameters(dev.cl_device, "Xgemm", 32, {**CLBLAST_BASE, **cand})
                t = min(common.round_robin({"clblast": clblast}, 1)["clblast"])
                if best is None or t < best:
                    best, best_p = t, cand
            pyclblast.override_parameters(dev.cl_device, "Xgemm", 32, {**CLBLAST_BASE, **best_p})
            methods["clblast tuned"] = clblast
        samples = common.round_robin(methods, repeat)
        row = {m: flops / min(s) / 1e9 for m, s in samples.items()}
        if pyclblast is not None:
            row["clblast untuned"] = untuned[name]
            row["clblast tuned params"] = best_p
        for b in bufs:
            b.release()
        results[name] = row
        t = row["torch"]
        line = "  ".join(f"{m} {v:.1f} ({v / t:.2f}x)" for m, v in row.items()
                         if m != "torch" and isinstance(v, float))
        print(f"{name:42s} torch {t:.1f}  {line}", flush=True)
    return results


if __name__ == "__main__":
    main()
