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

Then every transport side by side, in one interleaved run (issue 9), at --transport-shapes
(default 2048x32000 and 64x10), against local torch fp32 forward+backward:

  shm          transport="shm": the torch logits copied into the client's shared-memory arena,
               the gradient written by the server into shared memory, used without a copy
  shm born     logits created by Client.empty() (born in shared memory): no copy at all
  shm inplace  the same with inplace_grad=True (the gradient replaces the logits)
  tcp          transport="tcp", one request (what "remote" above measures)
  tcp pipe     transport="tcp", row chunks on several connections (the default for big batches)
  tcp bf16     transport="tcp" pipelined, bfloat16 on the wire both ways

and the server's peak RSS per transport (a fresh server each, VmHWM over 3 calls, minus its RSS
after one small warm-up call), with a plot in bench/results/e2e-transports.png.

    python bench/bench_e2e.py            # 256x1000, 4096x1000, 2048x32000, then transports
    python bench/bench_e2e.py --quick    # small shapes, 2 repetitions
    python bench/bench_e2e.py --shapes 256x1000 --repeat 2 --transport-repeat 7
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
TRANSPORT_SHAPES = "2048x32000,64x10"
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
    ap.add_argument("--transport-shapes", default=TRANSPORT_SHAPES,
                    help=f"shapes for the transport comparison (default {TRANSPORT_SHAPES}; '' skips it)")
    ap.add_argument("--transport-repeat", type=int, help="repetitions of the transport comparison (default --repeat)")
    ap.add_argument("--no-rss", action="store_true", help="skip the per-transport peak RSS (3 server starts)")
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
        with Client(url, timeout=600, transport="tcp", pipeline_bytes=0) as client:
            info = client.info()
            total = len(shapes) * (repeat + 1) * 4
            with tqdm(total=total, desc="e2e", unit="call", dynamic_ncols=True) as bar:
                for shape in shapes:
                    bar.set_postfix_str("x".join(map(str, shape)))
                    records.append(bench_shape(client, shape, repeat, bar, verify=not args.no_verify))
        transport_doc = None
        if args.transport_shapes:
            transport_doc = bench_transports(url, parse_shapes(args.transport_shapes),
                                             args.transport_repeat or repeat)
    finally:
        if server is not None:
            server.stop()
    if transport_doc is not None and not args.no_rss:
        transport_doc["peak_rss"] = bench_rss(server_args, args.out)

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
    if transport_doc is not None:
        report_transports(transport_doc, args.out, targets)
    print("\ntargets (reported, not asserted):")
    for tg in targets:
        detail = (f": remote {common.fmt_ms(tg['remote_s'])} ms vs torch {common.fmt_ms(tg['torch_s'])} ms"
                  if "remote_s" in tg else "")
        print(f"  {tg['result']:4}  {tg['description']}{detail}")

    doc = {"benchmark": "e2e", "repeat": repeat, "transports": transport_doc, "quick": args.quick, "url": url,
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



# ---- every transport side by side (issue 9) ------------------------------------------------------

TRANSPORTS = ("torch fp32", "shm", "shm born", "shm inplace", "tcp", "tcp pipe", "tcp bf16")


def bench_transports(url: str, shapes, repeat: int) -> dict:
    import torch
    import torch.nn.functional as F
    from tqdm import tqdm

    from clce_client import Client

    shm = Client(url, timeout=600, transport="shm")
    tcp = Client(url, timeout=600, transport="tcp", pipeline_bytes=0)
    pipe = Client(url, timeout=600, transport="tcp")
    out: dict = {"repeat": repeat, "shapes": {}}
    try:
        for shape in shapes:
            label = "x".join(map(str, shape))
            rng = np.random.default_rng(0)
            x = torch.from_numpy(rng.standard_normal(shape, dtype=np.float32) * 2.0)
            t = torch.from_numpy(rng.integers(0, shape[1], (shape[0], *shape[2:]), dtype=np.int64))
            xb = x.to(torch.bfloat16)
            born = shm.empty(shape, torch.float32)
            born.copy_(x)
            scratch = shm.empty(shape, torch.float32)
            xr = x.clone().requires_grad_(True)

            def local():
                xr.grad = None
                F.cross_entropy(xr, t).backward()

            def inplace():   # the logits are gone afterwards; the values do not change the cost,
                # so each call's gradient serves as the next call's logits
                shm.cross_entropy(scratch, t, return_grad=True, inplace_grad=True)

            def call(client, inp):
                def fn():
                    client.cross_entropy(inp, t, return_grad=True)   # the result is dropped: None
                return fn

            methods = {"torch fp32": local, "shm": call(shm, x), "shm born": call(shm, born),
                       "shm inplace": inplace, "tcp": call(tcp, x), "tcp pipe": call(pipe, x),
                       "tcp bf16": call(pipe, xb)}
            # every transport gives torch's answer (the grad of one call, checked once)
            ref = x.clone().requires_grad_(True)
            F.cross_entropy(ref, t).backward()
            check = {}
            for name, cl in (("shm", shm), ("tcp", tcp), ("tcp pipe", pipe)):
                res = cl.cross_entropy(x, t, return_grad=True)
                check[name] = float((res.grad - ref.grad).abs().max() / ref.grad.abs().max())
            with tqdm(total=(repeat + 1) * len(methods), desc=f"transports {label}", unit="call",
                      dynamic_ncols=True) as bar:
                samples = common.round_robin(methods, repeat, progress=bar)
            best = {k: min(v) for k, v in samples.items()}
            out["shapes"][label] = {"samples": samples, "best_s": best, "grad_max_rel_err": check,
                                    "ratio_vs_torch_fp32": {k: best[k] / best["torch fp32"] for k in best},
                                    "payload_bytes": int(x.numel()) * 4}
    finally:
        shm.close()
        tcp.close()
        pipe.close()
    return out


def _vm(pid: int, key: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    return 0


def bench_rss(server_args, out_dir: Path, shape=(2048, 32000), calls: int = 3) -> dict:
    """The server's memory per transport, a fresh server each, over its value after a small
    warm-up call. Over TCP: the peak of its whole RSS (VmHWM) during `calls` calls; its bodies and
    gradients are anonymous shared mappings (hostmem.py), so they count as RssShmem, not RssAnon.
    On shared memory: the peak of its private (anonymous) RSS, sampled every millisecond, since
    pages of the client's region that the server touches also count in its VmHWM, but they are the
    client's memory, held once for both (VmHWM is reported too, not judged)."""
    import threading

    import torch

    from clce_client import Client

    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.standard_normal(shape, dtype=np.float32))
    t = torch.from_numpy(rng.integers(0, shape[1], shape[0]))
    res = {}
    for name, kw in (("shm", dict(transport="shm")), ("tcp", dict(transport="tcp", pipeline_bytes=0)),
                     ("tcp pipe", dict(transport="tcp"))):
        with common.ServerProcess(server_args, log_path=out_dir / "e2e-rss-server.log") as srv, \
                Client(srv.url, timeout=600, **kw) as c:
            c.cross_entropy(x[:64, :1000].contiguous(), t[:64] % 1000, return_grad=True)
            pid = srv.proc.pid
            base_anon, base_rss = _vm(pid, "RssAnon"), _vm(pid, "VmRSS")
            try:
                with open(f"/proc/{pid}/clear_refs", "w") as f:
                    f.write("5")              # reset VmHWM to the current RSS
            except OSError:
                pass
            peak = [base_anon]
            stop = threading.Event()

            def sample():
                while not stop.is_set():
                    peak[0] = max(peak[0], _vm(pid, "RssAnon"))
                    time.sleep(0.001)

            th = threading.Thread(target=sample, daemon=True)
            th.start()
            for _ in range(calls):
                c.cross_entropy(x, t, return_grad=True)
            stop.set()
            th.join()
            hwm = _vm(pid, "VmHWM")
        res[name] = {"baseline_anon_bytes": base_anon, "peak_anon_bytes": peak[0],
                     "peak_over_baseline_bytes": peak[0] - base_anon if name == "shm" else hwm - base_rss,
                     "vmhwm_over_baseline_bytes": hwm - base_rss, "payload_bytes": int(x.numel()) * 4}
    return res


def report_transports(doc: dict, out_dir: Path, targets: list) -> None:
    headers = ["shape", *TRANSPORTS]
    rows = []
    for label, r in doc["shapes"].items():
        rows.append([label + " ms", *(common.fmt_ms(r["best_s"][k]) for k in TRANSPORTS)])
        rows.append([label + " vs torch", *(f"{r['ratio_vs_torch_fp32'][k]:.2f}x" for k in TRANSPORTS)])
    common.print_table(f"transports side by side, best of {doc['repeat']} (interleaved), wall clock; "
                       "ratio = time / local torch fp32 fwd+bwd", headers, rows)
    rss = doc.get("peak_rss")
    if rss:
        print("server peak RSS over its warm baseline (shm: private; tcp: VmHWM) (2048x32000 fp32, payload "
              f"{next(iter(rss.values()))['payload_bytes'] / 1e6:.0f} MB): " + ", ".join(
                  f"{k} {v['peak_over_baseline_bytes'] / 1e6:.0f} MB ({v['peak_over_baseline_bytes'] / v['payload_bytes']:.2f}x)"
                  for k, v in rss.items())
              + "; VmHWM over baseline (shared pages included): " + ", ".join(
                  f"{k} {v['vmhwm_over_baseline_bytes'] / 1e6:.0f} MB" for k, v in rss.items()))
        for k, v in rss.items():
            targets.append({"target": f"peak_rss_{k}", "result": common.verdict(
                v["peak_over_baseline_bytes"] <= (0.1 if k == "shm" else 1.5) * v["payload_bytes"]),
                "description": f"server memory, {k}: <= {'0.1' if k == 'shm' else '1.5'}x the payload "
                               f"(measured {v['peak_over_baseline_bytes'] / v['payload_bytes']:.2f}x)"})
    big = doc["shapes"].get("2048x32000")
    small = doc["shapes"].get("64x10")
    if big:
        r = big["ratio_vs_torch_fp32"]
        for key, limit, what in (("shm", 0.25, "shared memory <= 0.25x local torch fp32 at 2048x32000"),
                                 ("tcp pipe", 0.8, "TCP (pipelined) <= 0.8x local torch fp32 at 2048x32000"),
                                 ("tcp bf16", 0.5, "TCP bf16 on the wire <= 0.5x local torch fp32 at 2048x32000")):
            targets.append({"target": f"{key}_2048x32000", "result": common.verdict(r[key] <= limit),
                            "ratio": r[key], "description": what,
                            "remote_s": big["best_s"][key], "torch_s": big["best_s"]["torch fp32"]})
    if small:
        b = small["best_s"]
        targets.append({"target": "shm_not_slower_64x10", "result": common.verdict(b["shm"] <= b["tcp"] * 1.05),
                        "description": "64x10: shared memory no slower than TCP (5% noise allowance)",
                        "remote_s": b["shm"], "torch_s": b["tcp"]})
    groups = list(doc["shapes"])
    series = {k: [doc["shapes"][g]["best_s"][k] * 1e3 for g in groups] for k in TRANSPORTS}
    annotate = {k: [f"{doc['shapes'][g]['ratio_vs_torch_fp32'][k]:.2f}x" for g in groups] for k in TRANSPORTS}
    doc["plot"] = str(common.bar_plot(out_dir / "e2e-transports.png", groups, series, annotate=annotate,
                                      title=f"every transport vs local torch fp32 fwd+bwd (best of {doc['repeat']}; "
                                            "labels: time / torch)"))


if __name__ == "__main__":
    sys.exit(main())
