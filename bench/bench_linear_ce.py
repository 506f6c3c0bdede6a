"""The fused linear cross-entropy through the client against local torch linear + cross-entropy.

For each N x H x V (fp32, or bf16 with --dtype bf16) it reports, from one run:

  * wall time of forward + backward through autograd, timed in blocks (bench/common.py: a few
    calls per method in a row, the first dropped, the order rotating):
      local     F.cross_entropy(F.linear(h, W), y).backward() with torch on the same cores
      clce      client.linear_cross_entropy(h, W, y).backward(): the README's call, the default
                client (transport "auto": shared memory on this host): the weight stored once,
                its gradient back with every call  <- the headline
      shared    the same with the weight moved into shared memory first (share_weight): the
                server reads it where it lies
      accum     weight_name + accumulate=True: the weight's gradient stays on the server; the
                flush that brings it back once per optimizer step is timed apart and charged
                1/k of it per micro-batch
      tcp       the README's call with transport="tcp"
      stateless transport="tcp", stateless=True: the weight travels with every call
      cce       Cut Cross-Entropy's own linear_cross_entropy(h, W, y, impl="torch_compile"), run
                locally (pip install --no-deps cut-cross-entropy, plus triton for its import):
                the peer the shared-memory call is held against
      discrete  the README's call to a second server started with --device-memory discrete
                (--memory-modes): PoCL through the path GPUs take, beside "clce" (host memory)
  * bytes per micro-batch: on the wire (request + response bodies, measured from the encoded
    messages) and, over shared memory, copied into the arena; beside the logits path
    (client.cross_entropy on (N, V) logits: logits up, gradient down); and per optimizer step
    of k micro-batches (the weight up once, its gradient down once);
  * peak memory (VmHWM, reset through /proc/<pid>/clear_refs before each method) of this worker
    process and of the server process, beside the sizes of the weight, its fp32 gradient, one
    (chunk, V) buffer and the logits;
  * GEMM GFLOP/s of the server's three products at its chunk size beside torch's matmul
    (bench/bench_gemm.py without CLBlast) with --gemm.

Client and server share this machine's cores, as local torch does.

    python bench/bench_linear_ce.py                         # 4096x1024x32000, k = 8
    python bench/bench_linear_ce.py --shapes 2048x1024x32000,8192x2048x32000 --blocks 2 --calls 2
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (puts the repo on sys.path)

import numpy as np  # noqa: E402

GiB = 1 << 30
MiB = 1 << 20
METHODS = ("local", "clce", "shared", "accum", "tcp", "stateless", "cce")


def _hwm(pid: int | str = "self") -> int:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def _rss(pid: int | str = "self") -> int:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def _reset_hwm(pid: int | str = "self") -> None:
    with open(f"/proc/{pid}/clear_refs", "w") as f:
        f.write("5")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", default="4096x1024x32000", help="NxHxV, comma-separated")
    ap.add_argument("--blocks", type=int, default=3, help="blocks per method")
    ap.add_argument("--calls", type=int, default=3, help="calls per block (the first is dropped)")
    ap.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, of {', '.join(METHODS)}")
    ap.add_argument("--k", type=int, default=8, help="micro-batches per optimizer step")
    ap.add_argument("--gemm", action="store_true", help="also the server's GEMM GFLOP/s")
    ap.add_argument("--out", type=Path, default=common.RESULTS)
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32",
                    help="the hidden states' and the weight's dtype (a language model's are bf16)")
    ap.add_argument("--memory-modes", action="store_true",
                    help="also a server with --device-memory discrete: the 'discrete' method")
    args = ap.parse_args()
    if args.memory_modes and "discrete" not in args.methods.split(","):
        args.methods += ",discrete"

    import torch
    import torch.nn.functional as F

    import clce_client
    from clce_wire.protocol import encode_message, message_nbytes

    threads = 2
    torch.set_num_threads(threads)
    server = common.ServerProcess(["--max-request-bytes", str(4 * GiB), "--max-inflight-bytes", str(16 * GiB)],
                                  env={"CLCE_TENANT_MAX_INFLIGHT_BYTES": str(16 * GiB),
                                       "CLCE_TENANT_MAX_REQUEST_BYTES": str(4 * GiB)},
                                  log_path=args.out / "linear-ce-server.log").start()
    discrete = None
    if args.memory_modes:
        discrete = common.ServerProcess(["--max-request-bytes", str(4 * GiB), "--max-inflight-bytes", str(16 * GiB),
                                         "--device-memory", "discrete"],
                                        env={"CLCE_TENANT_MAX_INFLIGHT_BYTES": str(16 * GiB),
                                             "CLCE_TENANT_MAX_REQUEST_BYTES": str(4 * GiB)},
                                        log_path=args.out / "linear-ce-server-discrete.log").start()
    server_idle = _rss(server.proc.pid)
    print(f"# server idle RSS {server_idle / MiB:.0f} MiB (host pool cap "
          f"{int(server.env.get('CLCE_HOST_POOL_BYTES', 1 << 30)) / MiB:.0f} MiB)")
    print(f"# fused linear cross-entropy, {args.dtype}, torch on {threads} threads; load average "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    doc = {"machine": common.machine_info(), "shapes": {}, "server_idle_rss": server_idle}
    try:
        with clce_client.Client(server.url, timeout=3600) as client, \
                clce_client.Client(server.url, timeout=3600, transport="tcp") as tcp, \
                clce_client.Client((discrete or server).url, timeout=3600) as disc:
            for spec in args.shapes.split(","):
                N, H, V = (int(d) for d in spec.lower().split("x"))
                doc["shapes"][spec] = run_shape(client, tcp, server, N, H, V, args, torch, F, encode_message,
                                                message_nbytes, disc if discrete else None)
    finally:
        server.stop()
        if discrete is not None:
            discrete.stop()
    if args.gemm:
        import bench_gemm
        doc["gemm"] = bench_gemm.report(1024, 1024, 32000, args.blocks, clblast=False)
    print("json:", common.write_json(args.out / "linear_ce.json", doc))


def run_shape(client, tcp, server, N, H, V, args, torch, F, encode_message, message_nbytes, disc=None) -> dict:
    import gc

    from clce_client.linear import share_weight

    g = torch.Generator().manual_seed(0)
    dt = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    h = torch.randn(N, H, generator=g).to(dt).requires_grad_()
    W = (torch.randn(V, H, generator=g) / H ** 0.5).to(dt).requires_grad_()

    def _np(t):   # the tensor's bytes as numpy sees them (bf16 as its 16-bit pattern)
        return t.detach().view(torch.int16).numpy() if t.dtype == torch.bfloat16 else t.detach().numpy()

    W_shared = torch.nn.Parameter(W.detach().clone())
    y = torch.randint(0, V, (N,), generator=g)
    f32 = h.element_size()   # bytes per element of the hidden states and weight (4, or 2 in bf16)
    chunk_rows = 1024
    k = args.k

    # ---- bytes, from the messages as encoded ----
    req = {"v": 1, "hidden": _np(h), "target": y.numpy(), "accumulate": False, "want_grad": True,
           "weight_name": "auto-0123456789abcdef-1", "weight_version": "0" * 40, "ignore_index": -100,
           "reduction": "mean", "label_smoothing": 0.0, "lse_square_scale": 0.0, "shift": 0}
    resp = {"v": 1, "grad_hidden": _np(h), "loss": np.zeros((), np.float32)}
    micro = message_nbytes(encode_message(req)) + message_nbytes(encode_message(resp))
    grad_w = message_nbytes(encode_message({"grad_weight": np.empty((V, H), np.float32)}))
    logits = np.empty((N, V), np.float32)
    logits_path = (message_nbytes(encode_message({"v": 1, "input": logits, "target": y.numpy(), "return_grad": True}))
                   + message_nbytes(encode_message({"grad": logits, "v": 1, "loss": np.zeros((), np.float32)})))
    del logits
    weight_up = message_nbytes(encode_message({"v": 1, "weight_version": "0" * 40, "weight": _np(W)}))
    grad_down = message_nbytes(encode_message({"v": 1, "micro_batches": 8, "grad_weight": np.empty((V, H), np.float32)}))
    bound = 2 * N * H * f32 + y.numpy().nbytes
    wire = {"micro_batch_accumulated": micro, "micro_batch_grad_back": micro + grad_w,
            "bound_2NH_plus_targets": bound, "logits_path_micro_batch": logits_path,
            "ratio_to_logits": micro / logits_path, "step_k": k * micro + weight_up + grad_down,
            "logits_path_step_k": k * logits_path,
            # over shared memory the bodies carry references; what is copied is the hidden
            # states and targets into the arena (the gradients are written there by the server)
            "shm_copied_micro_batch": h.numel() * f32 + y.numpy().nbytes}

    # ---- the methods ----
    def local():
        h.grad = W.grad = None
        F.cross_entropy(F.linear(h, W), y).backward()

    def clce():
        h.grad = W.grad = None
        client.linear_cross_entropy(h, W, y).backward()

    def shared():
        h.grad = W_shared.grad = None
        client.linear_cross_entropy(h, W_shared, y).backward()

    def accum():
        h.grad = None
        client.linear_cross_entropy(h, W, y, weight_name="accum", accumulate=True).backward()

    def via_tcp():
        h.grad = W.grad = None
        tcp.linear_cross_entropy(h, W, y).backward()

    def stateless():
        h.grad = W.grad = None
        tcp.linear_cross_entropy(h, W, y, stateless=True).backward()

    def discrete():
        h.grad = W.grad = None
        disc.linear_cross_entropy(h, W, y).backward()

    cce_linear, cce_reason = _cce()

    def cce():
        h.grad = W.grad = None
        cce_linear(h, W, y, impl="torch_compile").backward()

    every = {"local": local, "clce": clce, "shared": shared, "accum": accum, "tcp": via_tcp, "stateless": stateless,
             "cce": cce, "discrete": discrete}
    methods = {m: every[m] for m in args.methods.split(",")}
    if "cce" in methods and cce_linear is None:
        print(f"# Cut Cross-Entropy not importable ({cce_reason}): 'cce' left out "
              "(pip install --no-deps cut-cross-entropy triton)")
        methods.pop("cce")
    if "discrete" in methods and disc is None:
        print("# no --memory-modes: 'discrete' left out")
        methods.pop("discrete")
    if "shared" in methods and not share_weight(W_shared, client):
        print("# no shared memory with the server: 'shared' left out")
        methods.pop("shared")
    for fn in methods.values():   # uploads each stored weight (once: its version does not change here)
        fn()
    flush_s = None
    if "accum" in methods:
        import time
        t0 = time.perf_counter()
        client.weights.flush()
        flush_s = time.perf_counter() - t0
    mem = {}
    for name, fn in methods.items():
        fn()
        gc.collect()
        _reset_hwm()
        _reset_hwm(server.proc.pid)
        base, sbase = _hwm(), _hwm(server.proc.pid)
        fn()
        mem[name] = {"worker_peak_over_start": _hwm() - base, "server_peak": _hwm(server.proc.pid),
                     "server_peak_over_start": _hwm(server.proc.pid) - sbase}
    if "accum" in methods:
        client.weights.flush()
    samples = common.blocks(methods, args.blocks, args.calls)
    if "accum" in methods:
        client.weights.flush()
        samples["accum"] = [s + flush_s / k for s in samples["accum"]]   # the flush, per micro-batch
    med = {m: common.stats(s)["median"] for m, s in samples.items()}
    sizes = {"weight": V * H * f32, "weight_grad_fp32": V * H * 4, "chunk": chunk_rows * V * f32,
             "logits": N * V * f32}

    print(f"\n## N={N} H={H} V={V}   (load {' '.join(f'{x:.2f}' for x in os.getloadavg())})")
    print(f"wall (median of {args.blocks} blocks of {args.calls - 1} calls): "
          + "  ".join(f"{m} {common.fmt_ms(t)} ms" for m, t in med.items()))
    if "cce" in med:
        print("ratio to Cut Cross-Entropy (torch_compile): "
              + "  ".join(f"{m} {med[m] / med['cce']:.2f}x" for m in med if m != "cce"))
    if "discrete" in med and "clce" in med:
        print(f"discrete / host memory (the same call, two servers, in turns): {med['discrete'] / med['clce']:.2f}x")
    if "local" in med:
        print("ratio to local: " + "  ".join(f"{m} {med[m] / med['local']:.2f}x" for m in med if m != "local")
              + (f"   (accum includes the flush, {common.fmt_ms(flush_s)} ms / k={k})" if flush_s else ""))
    print(f"wire per micro-batch: {micro / MiB:.1f} MiB accumulated, {(micro + grad_w) / MiB:.1f} MiB with the "
          f"weight's gradient back (bound 2NH*4+targets {bound / MiB:.1f} MiB; +{100 * (micro / bound - 1):.3f}%), "
          f"logits path {logits_path / MiB:.1f} MiB: {micro / logits_path:.3f} of it; over shared memory the "
          f"bodies carry references and {wire['shm_copied_micro_batch'] / MiB:.1f} MiB is copied into the arena")
    print(f"wire per step, k={k}: {wire['step_k'] / MiB:.1f} MiB (weight up {weight_up / MiB:.1f}, grad down "
          f"{grad_down / MiB:.1f}) vs logits path {wire['logits_path_step_k'] / MiB:.1f} MiB")
    for m, d in mem.items():
        print(f"memory {m:9s}: worker peak {d['worker_peak_over_start'] / MiB:+.0f} MiB, server peak "
              f"{d['server_peak'] / MiB:.0f} MiB (+{d['server_peak_over_start'] / MiB:.0f} MiB over its start)")
    print(f"sizes: weight {sizes['weight'] / MiB:.0f} MiB, its fp32 gradient {sizes['weight_grad_fp32'] / MiB:.0f} MiB, "
          f"one chunk {sizes['chunk'] / MiB:.0f} MiB, logits {sizes['logits'] / MiB:.0f} MiB")
    return {"wall_median_s": med, "samples": samples, "flush_s": flush_s, "wire": wire, "memory": mem,
            "sizes": sizes}


def _cce():
    """Cut Cross-Entropy's linear_cross_entropy, or None and why it does not import."""
    try:
        from cut_cross_entropy import linear_cross_entropy
    except Exception as exc:   # not installed, or triton missing for its import
        return None, f"{type(exc).__name__}: {exc}"
    return linear_cross_entropy, None


if __name__ == "__main__":
    main()
