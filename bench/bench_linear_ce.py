"""The fused linear cross-entropy over the wire against local torch linear + cross-entropy.

For each N x H x V (fp32) it reports, from one run:

  * wall time of forward + backward through autograd, round-robin (bench/common.py):
      local     F.cross_entropy(F.linear(h, W), y).backward() with torch on the same cores
      stored    client.linear_cross_entropy(h, W, y, weight_name=..., accumulate=True): only
                hidden states and targets travel (the weight is on the server)
      stateless the weight travels with every call and its gradient comes back every call
  * bytes on the wire per micro-batch (request + response bodies, measured from the encoded
    messages), beside the logits path (client.cross_entropy on (N, V) logits: logits up,
    gradient down), and per optimizer step of k micro-batches (the weight up once, its
    gradient down once);
  * peak memory (VmHWM, reset through /proc/<pid>/clear_refs before each method) of this worker
    process and of the server process, beside the sizes of the weight, its fp32 gradient, one
    (chunk, V) buffer and the logits;
  * GEMM GFLOP/s of the server's three products at its chunk size beside torch's matmul
    (bench/bench_gemm.py without CLBlast) with --gemm.

TCP only: the linear route takes no shared-memory regions yet. Client and server share this
machine's cores, as local torch does.

    python bench/bench_linear_ce.py                         # 4096x1024x32000, k = 8
    python bench/bench_linear_ce.py --shapes 2048x1024x32000,8192x2048x32000 --gemm
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


def _hwm(pid: int | str = "self") -> int:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def _reset_hwm(pid: int | str = "self") -> None:
    with open(f"/proc/{pid}/clear_refs", "w") as f:
        f.write("5")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", default="4096x1024x32000", help="NxHxV, comma-separated")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--k", type=int, default=8, help="micro-batches per optimizer step")
    ap.add_argument("--gemm", action="store_true", help="also the server's GEMM GFLOP/s")
    ap.add_argument("--out", type=Path, default=common.RESULTS)
    args = ap.parse_args()

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
    print(f"# fused linear cross-entropy, fp32, torch on {threads} threads; load average "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    doc = {"machine": common.machine_info(), "shapes": {}}
    try:
        with clce_client.Client(server.url, timeout=3600) as client:
            for spec in args.shapes.split(","):
                N, H, V = (int(d) for d in spec.lower().split("x"))
                doc["shapes"][spec] = run_shape(client, server, N, H, V, args, torch, F, encode_message,
                                                message_nbytes)
    finally:
        server.stop()
    if args.gemm:
        import bench_gemm
        doc["gemm"] = bench_gemm.report(1024, 1024, 32000, args.repeat, clblast=False)
    print("json:", common.write_json(args.out / "linear_ce.json", doc))


def run_shape(client, server, N, H, V, args, torch, F, encode_message, message_nbytes) -> dict:
    g = torch.Generator().manual_seed(0)
    h = torch.randn(N, H, generator=g).requires_grad_()
    W = (torch.randn(V, H, generator=g) / H ** 0.5).requires_grad_()
    y = torch.randint(0, V, (N,), generator=g)
    f32 = 4
    chunk_rows = 1024

    # ---- wire bytes, from the messages as encoded ----
    req = {"v": 1, "hidden": h.detach().numpy(), "target": y.numpy(), "accumulate": True, "want_grad": True,
           "weight_name": "lm_head", "weight_version": "0" * 40, "ignore_index": -100, "reduction": "mean",
           "label_smoothing": 0.0, "lse_square_scale": 0.0, "shift": 0}
    resp = {"v": 1, "grad_hidden": h.detach().numpy(), "loss": np.zeros((), np.float32)}
    micro = message_nbytes(encode_message(req)) + message_nbytes(encode_message(resp))
    logits = np.empty((N, V), np.float32)
    logits_path = (message_nbytes(encode_message({"v": 1, "input": logits, "target": y.numpy(), "return_grad": True}))
                   + message_nbytes(encode_message({"grad": logits, "v": 1, "loss": np.zeros((), np.float32)})))
    del logits
    weight_up = message_nbytes(encode_message({"v": 1, "weight_version": "0" * 40, "weight": W.detach().numpy()}))
    grad_down = message_nbytes(encode_message({"v": 1, "micro_batches": 8, "grad_weight": W.detach().numpy()}))
    bound = 2 * N * H * f32 + y.numpy().nbytes
    k = args.k
    wire = {"micro_batch": micro, "bound_2NH_plus_targets": bound, "logits_path_micro_batch": logits_path,
            "ratio_to_logits": micro / logits_path, "step_k": k * micro + weight_up + grad_down,
            "logits_path_step_k": k * logits_path}

    # ---- wall time and peak memory ----
    def local():
        h.grad = W.grad = None
        F.cross_entropy(F.linear(h, W), y).backward()

    def stored():
        h.grad = W.grad = None
        client.linear_cross_entropy(h, W, y, weight_name="lm_head", accumulate=True).backward()

    def stateless():
        h.grad = W.grad = None
        client.linear_cross_entropy(h, W, y).backward()

    stored()   # uploads the weight (once: its version does not change here)
    mem = {}
    for name, fn in (("local", local), ("stored", stored), ("stateless", stateless)):
        fn()
        import gc
        gc.collect()
        _reset_hwm()
        _reset_hwm(server.proc.pid)
        base, sbase = _hwm(), _hwm(server.proc.pid)
        fn()
        mem[name] = {"worker_peak_over_start": _hwm() - base, "server_peak": _hwm(server.proc.pid),
                     "server_peak_over_start": _hwm(server.proc.pid) - sbase}
    samples = common.round_robin({"local": local, "stored": stored, "stateless": stateless}, args.repeat)
    best = {m: min(s) for m, s in samples.items()}
    # the stored weight's accumulated gradient, taken once (what a step's flush does)
    from clce_client.linear import weights_of
    weights_of(client).flush()
    sizes = {"weight": V * H * f32, "weight_grad_fp32": V * H * f32, "chunk": chunk_rows * V * f32,
             "logits": N * V * f32}

    print(f"\n## N={N} H={H} V={V}")
    print(f"wall (best of {args.repeat}): " + "  ".join(f"{m} {common.fmt_ms(t)} ms" for m, t in best.items())
          + f"   stored/local {best['stored'] / best['local']:.2f}x  stateless/local "
          f"{best['stateless'] / best['local']:.2f}x")
    print(f"wire per micro-batch: {micro / MiB:.1f} MiB (bound 2NH*4+targets {bound / MiB:.1f} MiB; "
          f"+{100 * (micro / bound - 1):.3f}%), logits path {logits_path / MiB:.1f} MiB: "
          f"{micro / logits_path:.3f} of it")
    print(f"wire per step, k={k}: {wire['step_k'] / MiB:.1f} MiB (weight up {weight_up / MiB:.1f}, grad down "
          f"{grad_down / MiB:.1f}) vs logits path {wire['logits_path_step_k'] / MiB:.1f} MiB")
    for m, d in mem.items():
        print(f"memory {m:9s}: worker peak {d['worker_peak_over_start'] / MiB:+.0f} MiB, server peak "
              f"{d['server_peak'] / MiB:.0f} MiB (+{d['server_peak_over_start'] / MiB:.0f} MiB over its start)")
    print(f"sizes: weight {sizes['weight'] / MiB:.0f} MiB, its fp32 gradient {sizes['weight_grad_fp32'] / MiB:.0f} MiB, "
          f"one chunk {sizes['chunk'] / MiB:.0f} MiB, logits {sizes['logits'] / MiB:.0f} MiB")
    return {"wall_s": best, "samples": samples, "wire": wire, "memory": mem, "sizes": sizes}


if __name__ == "__main__":
    main()
