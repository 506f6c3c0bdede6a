"""Soak: 8 client processes, mixed sizes, three tenants, for minutes; results checked, RSS watched.

Each client process (this file with --worker) belongs to one of three tenants (weights 2, 1, 1)
and loops for --duration seconds over a random mix of shapes from 64x10 to 1024x32000, loss only
or loss+grad. Every loss is compared with a numpy float64 log-sum-exp reference, and three
gradient rows of every gradient. Two kinds of deliberate errors are mixed in and counted apart:
client 0 sends an out-of-range target every 25th request (expects 400), client 1 sends a
1024x32000 request with deadline_ms=1 every 40th (expects 504). Anything else is an error.

The server's RSS (/proc/PID/status VmRSS) is sampled every second. Growth = median RSS of the last
20% of the run over the median of the 20% right after the warm-up (the first 20%, at least 10 s):
target < 10%.

    python bench/bench_soak.py              # 3 minutes
    python bench/bench_soak.py --quick      # 30 s
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (puts the repo on sys.path)

import numpy as np  # noqa: E402

TENANTS = {"t0": ("soak-key-t0-Q2w9", 2), "t1": ("soak-key-t1-Z8k3", 1), "t2": ("soak-key-t2-M5p7", 1)}
# (shape, probability): most requests small, a steady share of big ones
MIX = [((64, 10), 0.25), ((64, 1000), 0.2), ((256, 4000), 0.2), ((512, 8000), 0.15),
       ((512, 32000), 0.12), ((1024, 32000), 0.08)]
CLIENTS = 8




def worker(spec: dict) -> None:
    from clce_client import Client, errors

    i = spec["index"]
    rng = np.random.default_rng(100 + i)
    # two batches per shape (fresh values on alternate requests), references computed once
    data = {}
    for k, (shape, _) in enumerate(MIX):
        data[shape] = []
        for s in range(2):
            x, t = common.make_batch(*shape, seed=1000 * i + 10 * k + s)
            data[shape].append((x, t, common.reference_mean_ce(x, t)))
    shapes = [s for s, _ in MIX]
    probs = np.array([p for _, p in MIX])
    client = Client(spec["url"], api_key=spec["key"], retries=0, retry_budget_s=0, timeout=300)  # raw answers
    counts = {"requests": 0, "ok": 0, "bytes_up": 0, "bytes_down": 0}
    errs: dict = {}
    deliberate: dict = {}
    by_shape: dict = {}
    print("READY", flush=True)
    if sys.stdin.readline().strip() != "go":
        return
    t_go = time.perf_counter()
    n = 0
    while time.perf_counter() - t_go < spec["duration"]:
        n += 1
        shape = shapes[rng.choice(len(shapes), p=probs)]
        x, t, (loss_ref, idx, g_ref) = data[shape][n % 2]
        grad = bool(rng.random() < 0.5)
        kind = None
        kw = {}
        if i == 0 and n % 25 == 0:
            kind, t = "bad_target", t.copy()
            t[0] = shape[1]                     # out of range -> PyTorch's IndexError/RuntimeError
        elif i == 1 and n % 40 == 0:
            kind, shape = "deadline", (1024, 32000)
            x, t, _ = data[shape][0]
            kw["deadline_ms"] = 1
        counts["requests"] += 1
        try:
            r = client.cross_entropy(x, t, return_grad=grad, **kw)
            if kind is not None:
                errs["deliberate_error_not_raised"] = errs.get("deliberate_error_not_raised", 0) + 1
                continue
            loss = float(np.asarray(r.loss if grad else r))
            ok = abs(loss - loss_ref) <= 2e-5 * abs(loss_ref) + 1e-6
            if grad:
                ok = ok and np.allclose(np.asarray(r.grad)[idx], g_ref, rtol=1e-3,
                                        atol=1e-4 * np.abs(g_ref).max())
            if ok:
                counts["ok"] += 1
                counts["bytes_up"] += x.nbytes + t.nbytes
                counts["bytes_down"] += x.nbytes if grad else 4
                key = f"{shape[0]}x{shape[1]}"
                by_shape[key] = by_shape.get(key, 0) + 1
            else:
                errs["wrong_result"] = errs.get("wrong_result", 0) + 1
        except errors.ClceError as exc:
            name = type(exc).__name__
            expected = (kind == "bad_target" and isinstance(exc, errors.BadRequest)) or \
                       (kind == "deadline" and isinstance(exc, errors.DeadlineExceeded))
            bucket = deliberate if expected else errs
            label = f"{kind}:{name}" if expected else (f"{kind}:{name}" if kind else f"{name}: {str(exc)[:120]}")
            bucket[label] = bucket.get(label, 0) + 1
    print("RESULT " + json.dumps({"counts": counts, "errors": errs, "deliberate": deliberate,
                                  "by_shape": by_shape, "elapsed": time.perf_counter() - t_go}), flush=True)


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=float, help="seconds (default 180; --quick 30)")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--device", help="server --device")
    ap.add_argument("--out", type=Path, default=common.RESULTS)
    args = ap.parse_args(argv)
    duration = args.duration or (30.0 if args.quick else 180.0)

    tmp = Path(tempfile.mkdtemp(prefix="clce-bench-soak-"))
    tf = tmp / "tenants.toml"
    admin_key = "soak-admin-" + os.urandom(8).hex()   # /metrics needs it when there are tenants
    tf.write_text(f'[admin]\napi_key = "{admin_key}"\n\n'
                  + "".join(f'[tenants.{n}]\napi_key = "{k}"\nweight = {w}\n\n' for n, (k, w) in TENANTS.items()))
    srv_args = ["--tenants", str(tf)] + (["--device", args.device] if args.device else [])
    names = list(TENANTS)
    with common.ServerProcess(srv_args, log_path=tmp / "server.log", env={"CLCE_ACCESS_LOG": "false"}) as srv:
        procs = []
        for i in range(CLIENTS):
            spec = {"url": srv.url, "key": TENANTS[names[i % 3]][0], "index": i, "duration": duration}
            p = subprocess.Popen([sys.executable, __file__, "--worker", json.dumps(spec)], stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, text=True, bufsize=1)
            procs.append(p)
        for p in procs:
            if p.stdout.readline().strip() != "READY":
                raise RuntimeError("a soak client failed to start")
        samples: list[tuple[float, int]] = []
        pid = srv.proc.pid
        rss_start = rss_bytes(pid)
        for p in procs:
            p.stdin.write("go\n")
            p.stdin.flush()
        t0 = time.perf_counter()
        outs: list = [None] * CLIENTS

        def collect(k):
            outs[k] = procs[k].stdout.read()

        readers = [threading.Thread(target=collect, args=(k,), daemon=True) for k in range(CLIENTS)]
        for th in readers:
            th.start()
        last = -1
        while any(th.is_alive() for th in readers):
            now = time.perf_counter() - t0
            if int(now) != last:
                last = int(now)
                samples.append((now, rss_bytes(pid)))
                if last % 10 == 0:
                    print(f"  t={now:5.0f}s  server RSS {samples[-1][1] / 2**20:7.0f} MiB", flush=True)
            time.sleep(0.05)
        elapsed = time.perf_counter() - t0
        time.sleep(2)
        rss_idle_end = rss_bytes(pid)
        metrics_text = __import__("httpx").get(srv.url + "/metrics",
                                               headers={"Authorization": f"Bearer {admin_key}"}).text
    results = []
    for k, out in enumerate(outs):
        procs[k].wait()
        line = [ln for ln in (out or "").splitlines() if ln.startswith("RESULT ")]
        if not line:
            raise RuntimeError(f"soak client {k} gave no result: {(out or '')[-500:]!r}")
        results.append(json.loads(line[-1][7:]))

    ts = np.array([s[0] for s in samples])
    rss = np.array([s[1] for s in samples], dtype=float)
    warm = max(10.0, 0.2 * duration)
    early = rss[(ts >= warm) & (ts < warm + 0.2 * duration)]
    late = rss[ts >= 0.8 * duration]
    growth = float(np.median(late) / np.median(early) - 1) if len(early) and len(late) else float("nan")
    errors: dict = {}
    deliberate: dict = {}
    per_tenant: dict = {n: 0 for n in names}
    by_shape: dict = {}
    tot = {"requests": 0, "ok": 0, "bytes_up": 0, "bytes_down": 0}
    for k, r in enumerate(results):
        for key in tot:
            tot[key] += r["counts"][key]
        per_tenant[names[k % 3]] += r["counts"]["ok"]
        for d, src in ((errors, r["errors"]), (deliberate, r["deliberate"]), (by_shape, r["by_shape"])):
            for key, v in src.items():
                d[key] = d.get(key, 0) + v
    doc = {
        "machine": common.machine_info(), "duration_s": duration, "clients": CLIENTS,
        "tenants": {n: w for n, (_, w) in TENANTS.items()}, "mix": [[f"{s[0]}x{s[1]}", p] for s, p in MIX],
        "requests": tot["requests"], "ok": tot["ok"], "requests_per_s": tot["ok"] / elapsed,
        "mb_per_s_up": tot["bytes_up"] / elapsed / 1e6, "mb_per_s_down": tot["bytes_down"] / elapsed / 1e6,
        "ok_by_tenant": per_tenant, "ok_by_shape": by_shape,
        "errors": errors, "deliberate_errors": deliberate,
        "rss_mib": {"before_load": rss_start / 2**20, "warm_median": float(np.median(early)) / 2**20 if len(early) else None,
                    "end_median": float(np.median(late)) / 2**20 if len(late) else None,
                    "max": float(rss.max()) / 2**20, "idle_after": rss_idle_end / 2**20},
        "rss_growth_after_warmup": growth, "goal_growth_lt_10pct": bool(growth < 0.10),
        "rss_samples": [[float(a), int(b)] for a, b in samples],
        "server_requests_total": [ln for ln in metrics_text.splitlines()
                                  if ln.startswith("clce_requests_total") and not ln.rstrip().endswith(" 0.0")],
    }
    rows = [[f"{duration:.0f}", str(tot["requests"]), str(tot["ok"]), f"{doc['requests_per_s']:.1f}",
             f"{doc['mb_per_s_up']:.0f}/{doc['mb_per_s_down']:.0f}",
             f"{doc['rss_mib']['warm_median']:.0f}", f"{doc['rss_mib']['end_median']:.0f}",
             f"{doc['rss_mib']['max']:.0f}", f"{growth * 100:+.1f}%", str(sum(errors.values())),
             str(sum(deliberate.values()))]]
    common.print_table(f"Soak: {CLIENTS} clients, 3 tenants, mixed 64x10 .. 1024x32000",
                       ["s", "requests", "ok", "ok/s", "MB/s up/down", "RSS warm MiB", "RSS end MiB",
                        "RSS max MiB", "growth", "errors", "deliberate"], rows)
    print("ok by tenant:", per_tenant)
    print("ok by shape:", by_shape)
    print("errors:", errors or "none", "| deliberate:", deliberate)
    print(f"RSS growth after warm-up {growth * 100:+.1f}% (target < 10%) -> {common.verdict(growth < 0.10)}")
    print(f"wrote {common.write_json(args.out / 'soak.json', doc)} and {plot(ts, rss, warm, duration, args.out / 'soak.png')}")
    return 0 if not errors else 1


def plot(ts, rss, warm, duration, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    ax.plot(ts, rss / 2**20, lw=1)
    ax.axvspan(0, warm, color="grey", alpha=0.15, label="warm-up")
    ax.axvspan(warm, warm + 0.2 * duration, color="tab:green", alpha=0.1, label="baseline window")
    ax.axvspan(0.8 * duration, duration, color="tab:red", alpha=0.1, label="end window")
    ax.set_xlabel("seconds")
    ax.set_ylabel("server RSS (MiB)")
    ax.set_title("clce server RSS during the soak (sampled every second)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        worker(json.loads(sys.argv[2]))
        sys.exit(0)
    sys.exit(main())
