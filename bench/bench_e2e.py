"""End to end: loss + gradient from a real clce server against local PyTorch on the same data.

Starts ``python -m clce_server`` on a free loopback port (waits for /readyz), then, per shape, runs
round-robin (best of --repeat, wall clock):

  remote fp32   Client.cross_entropy(x_fp32, t, return_grad=True): encode, HTTP, server, the
                gradient back as a torch tensor
  remote bf16   the same with a torch bfloat16 input: bf16 on the wire both ways (grad in bf16)
  torch fp32    local F.cross_entropy + backward on the CPU (default threads)
  torch bf16    the same in bfloat16

The server's Server-Timing header (decode / queue / kernel / total, ms) of each remote call is kept;
the table shows it for the fastest call, and "client+wire" = wall - server total (encoding, the
HTTP transfer both ways, decoding the response). Client, server and torch share this machine's
cores; on a real deployment the server has its own device.

    python bench/bench_e2e.py            # 256x1000, 4096x1000, 2048x32000
    python bench/bench_e2e.py --quick    # small shapes, 2 repetitions
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (puts the repo on sys.path)

import numpy as np  # noqa: E402

DEFAULT_SHAPES = "256x1000,4096x1000,2048x32000"
QUICK_SHAPES = "256x1000,1024x8000"
PHASES = ("decode", "queue", "kernel", "total")


def parse_shapes(spec: str) -> list[tuple[int, ...]]:
    return [tuple(int(d) for d in p.strip().lower().split("x")) for p in spec.split(",") if p.strip()]


def bench_shape(client, shape, repeat, bar, verify=True) -> dict:
    import torch
    import torch.nn.functional as F

    rng = np.random.default_rng(0)
    x32 = torch.from_numpy(rng.standard_normal(shape, dtype=np.float32) * 2.0)
    t = torch.from_numpy(rng.integers(0, shape[1], (shape[0], *shape[2:]), dtype=np.int64))
    xs = {"float32": x32, "bfloat16": x32.to(torch.bfloat16)}
    timings: dict[str, list[dict]] = {"remote_float32": [], "remote_bfloat16": []}
    rec: dict = {"shape": list(shape), "label": "x".join(map(str, shape)), "rows": int(t.numel()),
                 "classes": shape[1]}

    def remote(dt):
        def fn():
            res = client.cross_entropy(xs[dt], t, return_grad=True)
            timings[f"remote_{dt}"].append(dict(res.server_timing))
            return None
        return fn

    def local(dt):
        xr = xs[dt].clone().requires_grad_(True)

        def fn():
            xr.grad = None
            F.cross_entropy(xr, t).backward()
            return None
        return fn

    if verify:
        rec["check"] = {}
        for dt in ("float32", "bfloat16"):
            res = client.cross_entropy(xs[dt], t, return_grad=True)
            xr = xs[dt].clone().requires_grad_(True)
            ref = F.cross_entropy(xr.float(), t)   # fp32 math for both: the reference
            ref.backward()
            g, g_ref = res.grad.float(), xr.grad.float()
            assert res.grad.dtype == xs[dt].dtype, (res.grad.dtype, xs[dt].dtype)
            err = float((g - g_ref).abs().max() / g_ref.abs().max())
            lerr = abs(float(res.loss) - ref.item()) / abs(ref.item())
            ok = err <= (1e-5 if dt == "float32" else 2e-2) and lerr <= (1e-4 if dt == "float32" else 8e-3)
            rec["check"][dt] = {"loss": float(res.loss), "loss_torch_fp32": ref.item(), "grad_max_rel_err": err,
                                "grad_dtype": str(res.grad.dtype), "ok": bool(ok)}

    methods = {"remote_float32": remote("float32"), "remote_bfloat16": remote("bfloat16"),
               "torch_float32": local("float32"), "torch_bfloat16": local("bfloat16")}
    for v in timings.values():
        v.clear()
    samples = common.round_robin(methods, repeat, progress=bar)
    rec["seconds"] = {k: common.stats(v) for k, v in samples.items()}
    rec["samples"] = samples
    # server timing: of the fastest call, and the minimum of each phase over the timed calls
    rec["server_timing_ms"] = {}
    for dt in ("float32", "bfloat16"):
        key = f"remote_{dt}"
        timed = timings[key][-repeat:]          # the warm-up call came first
        i = int(np.argmin(samples[key]))
        rec["server_timing_ms"][dt] = {
            "fastest_call": timed[i] if i < len(timed) else {},
            "min_per_phase": {p: min((tm.get(p, float("nan")) for tm in timed), default=float("nan"))
                              for p in PHASES},
            "all": timed,
        }
    b = {k: v["min"] for k, v in rec["seconds"].items()}
    rec["ratio_torch_over_remote"] = {dt: b[f"torch_{dt}"] / b[f"remote_{dt}"] for dt in ("float32", "bfloat16")}
    rec["ratio_torch_fp32_over_remote_bf16"] = b["torch_float32"] / b["remote_bfloat16"]
    itemsize = {"float32": 4, "bfloat16": 2}
    rec["wire_bytes"] = {dt: 2 * int(np.prod(shape)) * itemsize[dt] + 8 * int(t.numel()) for dt in itemsize}
    return rec


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", help=f"comma-separated NxC (default {DEFAULT_SHAPES})")
    ap.add_argument("--repeat", type=int, help="timed repetitions per method, round-robin (default 5; --quick 2)")
    ap.add_argument("--device", help="OpenCL device selector for the server (CLCE_DEVICE)")
    ap.add_argument("--url", help="use a running server instead of starting one")
    ap.add_argument("--out", type=Path, default=common.RESULTS, help="output directory (default bench/results)")
    ap.add_argument("--quick", action="store_true", help="small shapes, 2 repetitions: a smoke run")
    ap.add_argument("--no-verify", action="store_true", help="skip the correctness checks against torch")
    args = ap.parse_args(argv)
    shapes = parse_shapes(args.shapes or (QUICK_SHAPES if args.quick else DEFAULT_SHAPES))
    repeat = args.repeat or (2 if args.quick else 5)

    from tqdm import tqdm

    from clce_client import Client

    t0 = time.perf_counter()
    biggest = max(int(np.prod(s)) * 4 + 8 * int(np.prod(s)) // s[1] for s in shapes)
    server_args = ["--max-request-bytes", str(max(biggest * 2, 256 << 20)),
                   "--max-inflight-bytes", str(max(biggest * 8, 2048 << 20))]
    if args.device:
        server_args += ["--device", args.device]
    server = None
    url = args.url
    if url is None:
        print("starting the server ...", flush=True)
        server = common.ServerProcess(server_args, log_path=args.out / "e2e-server.log").start()
        url = server.url
        print(f"server ready at {url} after {server.startup_seconds:.1f}s", flush=True)
    records = []
    try:
        with Client(url, timeout=600) as client:
            info = client.info()
            total = len(shapes) * (repeat + 1) * 4
            with tqdm(total=total, desc="e2e", unit="call", dynamic_ncols=True) as bar:
                for shape in shapes:
                    bar.set_postfix_str("x".join(map(str, shape)))
                    records.append(bench_shape(client, shape, repeat, bar, verify=not args.no_verify))
    finally:
        if server is not None:
            server.stop()

    headers = ["shape", "wire", "remote ms", "torch same-dtype ms", "torch fp32 ms", "torch/remote",
               "decode", "queue", "kernel", "srv other", "srv total", "client+wire", "MB moved", "check"]
    rows = []
    for r in records:
        b = {k: v["min"] for k, v in r["seconds"].items()}
        for dt, w in (("float32", "fp32"), ("bfloat16", "bf16")):
            st = r["server_timing_ms"][dt]["fastest_call"]
            rem = b[f"remote_{dt}"]
            chk = r.get("check", {}).get(dt)
            rows.append([
                r["label"], w, common.fmt_ms(rem), common.fmt_ms(b[f"torch_{dt}"]), common.fmt_ms(b["torch_float32"]),
                common.fmt_ratio(r["ratio_torch_over_remote"][dt]),
                *(f"{st.get(p, float('nan')):.2f}" for p in PHASES[:3]),
                f"{st.get('total', float('nan')) - sum(st.get(p, float('nan')) for p in PHASES[:3]):.2f}",
                f"{st.get('total', float('nan')):.2f}",
                common.fmt_ms(rem - st.get("total", float("nan")) / 1e3),
                f"{r['wire_bytes'][dt] / 1e6:.0f}",
                "-" if chk is None else ("ok" if chk["ok"] else "BAD"),
            ])
    common.print_table(f"remote loss+grad vs local torch fwd+bwd, best of {repeat} (interleaved), wall clock",
                       headers, rows)
    print("decode/queue/kernel/srv total: the server's Server-Timing (ms) of the fastest remote call; srv other = "
          "total - decode - queue - kernel (reading the body, validation, buffers, read-back, encoding); "
          "client+wire = remote - srv total (ms).\ntorch/remote > 1: the remote call is faster than local "
          "torch in the same dtype.")

    targets = []
    big = [r for r in records if r["label"] == "2048x32000"]
    if big:
        b = {k: v["min"] for k, v in big[0]["seconds"].items()}
        ok = b["remote_float32"] <= b["torch_float32"]
        targets.append({"target": "remote_fp32_2048x32000", "result": common.verdict(ok),
                        "remote_s": b["remote_float32"], "torch_s": b["torch_float32"],
                        "description": "remote fp32 loss+grad at 2048x32000 takes no longer than local torch fwd+bwd"})
    else:
        targets.append({"target": "remote_fp32_2048x32000", "result": "n/a",
                        "description": "remote fp32 loss+grad at 2048x32000 takes no longer than local torch fwd+bwd"})
    print("\ntargets (reported, not asserted):")
    for tg in targets:
        detail = (f": remote {common.fmt_ms(tg['remote_s'])} ms vs torch {common.fmt_ms(tg['torch_s'])} ms"
                  if "remote_s" in tg else "")
        print(f"  {tg['result']:4}  {tg['description']}{detail}")

    doc = {"benchmark": "e2e", "repeat": repeat, "quick": args.quick, "url": url,
           "server_info": info, "server_startup_s": server.startup_seconds if server else None,
           "machine": common.machine_info(), "results": records, "targets": targets,
           "elapsed_s": time.perf_counter() - t0}
    jp = common.write_json(args.out / "e2e.json", doc)
    groups = [r["label"] for r in records]
    series = {
        "remote fp32": [r["seconds"]["remote_float32"]["min"] * 1e3 for r in records],
        "torch fp32": [r["seconds"]["torch_float32"]["min"] * 1e3 for r in records],
        "remote bf16": [r["seconds"]["remote_bfloat16"]["min"] * 1e3 for r in records],
        "torch bf16": [r["seconds"]["torch_bfloat16"]["min"] * 1e3 for r in records],
        "server kernel (fp32)": [r["server_timing_ms"]["float32"]["fastest_call"].get("kernel") for r in records],
    }
    annotate = {"remote fp32": [f"{r['ratio_torch_over_remote']['float32']:.2f}x" for r in records],
                "remote bf16": [f"{r['ratio_torch_over_remote']['bfloat16']:.2f}x" for r in records]}
    pp = common.bar_plot(args.out / "e2e.png", groups, series, annotate=annotate,
                         title=f"remote loss+grad vs local torch (best of {repeat}; labels: torch/remote)")
    print(f"\nwrote {jp} and {pp} ({time.perf_counter() - t0:.0f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
