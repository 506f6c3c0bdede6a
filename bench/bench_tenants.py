"""Two tenants on one server: a small job's latency while another job floods the device.

Tenant B (weight 1) sends 64x1000 loss+grad requests in a closed loop (one in flight). Tenant A
(weight 1) floods 512x32000 loss+grad requests (65 MB each way) from --a-procs processes with
--a-threads requests in flight each. For each policy (``--scheduling fair`` and ``fifo``, a fresh
server each), the benchmark measures

  1. B alone (solo): p50 / p99 latency, requests/s,
  2. B under A's flood: p50 / p99 latency, and both tenants' throughput (requests/s, MB/s).

Goal: with fair scheduling, B's p99 under the flood stays within 5x of its solo p99.

Every client is its own process (this file run with --worker); every loss is checked against a
numpy float64 reference (A's sampled gradient rows too). Client, server and "device" (PoCL on the
CPU) share this machine's cores, so compare the policies side by side within one run.

    python bench/bench_tenants.py                  # ~2.5 minutes
    python bench/bench_tenants.py --quick          # ~1 minute
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (puts the repo on sys.path)

import numpy as np  # noqa: E402

KEYS = {"A": "bench-tenant-a-key", "B": "bench-tenant-b-key"}
A_SHAPE = (512, 32000)
B_SHAPE = (64, 1000)


# ---------------------------------------------------------------------------------------------
# client worker process



def worker(spec: dict) -> None:
    """Closed loop(s) until 'stop' on stdin or spec['duration']; prints RESULT {json}."""
    from clce_client import Client, errors

    x, t = common.make_batch(spec["n"], spec["v"], spec["seed"])
    loss_ref, idx, g_ref = common.reference_mean_ce(x, t)
    client = Client(spec["url"], api_key=spec["key"], retries=0, retry_budget_s=0, timeout=300)  # raw answers
    stop = threading.Event()
    lock = threading.Lock()
    recs: list = []
    errs: dict = {}
    print("READY", flush=True)
    if sys.stdin.readline().strip() != "go":
        return
    t_go = time.perf_counter()
    threading.Thread(target=lambda: (sys.stdin.readline(), stop.set()), daemon=True).start()

    def loop():
        while not stop.is_set() and (spec.get("duration") is None or time.perf_counter() - t_go < spec["duration"]):
            t0 = time.perf_counter()
            try:
                r = client.cross_entropy(x, t, return_grad=True)
                ok = abs(float(r.loss) - loss_ref) <= 2e-5 * abs(loss_ref) + 1e-6 and np.allclose(
                    np.asarray(r.grad)[idx], g_ref, rtol=1e-3, atol=1e-4 * np.abs(g_ref).max())
                outcome = "ok" if ok else "wrong_result"
            except errors.ClceError as exc:
                outcome = type(exc).__name__
            t1 = time.perf_counter()
            with lock:
                if outcome == "ok":
                    recs.append((t0 - t_go, t1 - t0))
                else:
                    errs[outcome] = errs.get(outcome, 0) + 1

    ths = [threading.Thread(target=loop) for _ in range(spec.get("threads", 1))]
    for th in ths:
        th.start()
    for th in ths:
        th.join()
    print("RESULT " + json.dumps({"records": recs, "errors": errs, "elapsed": time.perf_counter() - t_go}),
          flush=True)


class Proc:
    def __init__(self, spec: dict):
        self.p = subprocess.Popen([sys.executable, __file__, "--worker", json.dumps(spec)],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)
        line = self.p.stdout.readline()
        if line.strip() != "READY":
            raise RuntimeError(f"worker failed to start: {line!r}")

    def send(self, word: str) -> None:
        try:
            self.p.stdin.write(word + "\n")
            self.p.stdin.flush()
        except OSError:
            pass

    def result(self) -> dict:
        out = self.p.stdout.read()
        self.p.wait()
        line = [ln for ln in out.splitlines() if ln.startswith("RESULT ")]
        if not line:
            raise RuntimeError(f"worker gave no result: {out[-500:]!r}")
        return json.loads(line[-1][7:])


# ---------------------------------------------------------------------------------------------

def pct(xs, q):
    return float(np.percentile(xs, q)) if len(xs) else float("nan")


def run_policy(policy: str, args, tenants: Path, logdir: Path) -> dict:
    srv_args = ["--tenants", str(tenants), "--scheduling", policy]
    if args.chunk_ms:
        srv_args += ["--chunk-ms", str(args.chunk_ms)]
    if args.device:
        srv_args += ["--device", args.device]
    out: dict = {"policy": policy}
    with common.ServerProcess(srv_args, log_path=logdir / f"server-{policy}.log") as srv:
        spec_b = {"url": srv.url, "key": KEYS["B"], "n": B_SHAPE[0], "v": B_SHAPE[1], "seed": 2}
        # warm-up, then B alone
        b = Proc({**spec_b, "duration": 1.0})
        b.send("go")
        b.result()
        b = Proc({**spec_b, "duration": args.solo})
        b.send("go")
        solo = b.result()
        # the flood: start A, let it fill the queue, then measure B
        floods = [Proc({"url": srv.url, "key": KEYS["A"], "n": A_SHAPE[0], "v": A_SHAPE[1], "seed": 10 + i,
                        "threads": args.a_threads}) for i in range(args.a_procs)]
        b = Proc({**spec_b, "duration": args.duration})
        for f in floods:
            f.send("go")
        time.sleep(args.ramp)
        t0 = time.perf_counter()
        b.send("go")
        under = b.result()
        window = time.perf_counter() - t0
        for f in floods:
            f.send("stop")
        fres = [f.result() for f in floods]
        a_lat = [dt for r in fres for (ts, dt) in r["records"] if args.ramp <= ts <= args.ramp + window]
        a_done = [ts + dt for r in fres for (ts, dt) in r["records"]]
        a_in_window = sum(1 for e in a_done if args.ramp <= e <= args.ramp + window)
        solo_lat = [dt for _, dt in solo["records"]]
        b_lat = [dt for _, dt in under["records"]]
        a_mb = 2 * A_SHAPE[0] * A_SHAPE[1] * 4 / 1e6
        out.update({
            "b_solo": {"n": len(solo_lat), "p50_ms": pct(solo_lat, 50) * 1e3, "p99_ms": pct(solo_lat, 99) * 1e3,
                       "rps": len(solo_lat) / solo["elapsed"], "latencies_s": solo_lat},
            "b_flood": {"n": len(b_lat), "p50_ms": pct(b_lat, 50) * 1e3, "p99_ms": pct(b_lat, 99) * 1e3,
                        "rps": len(b_lat) / under["elapsed"], "latencies_s": b_lat},
            "a_flood": {"completed_in_window": a_in_window, "rps": a_in_window / window,
                        "mb_per_s_each_way": a_in_window * a_mb / 2 / window,
                        "p50_ms": pct(a_lat, 50) * 1e3},
            "errors": {"b_solo": solo["errors"], "b_flood": under["errors"],
                       "a": [r["errors"] for r in fres]},
            "window_s": window,
        })
        out["p99_ratio_flood_vs_solo"] = out["b_flood"]["p99_ms"] / out["b_solo"]["p99_ms"]
        out["p50_ratio_flood_vs_solo"] = out["b_flood"]["p50_ms"] / out["b_solo"]["p50_ms"]
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=float, help="seconds of B under the flood, per policy (default 40; --quick 15)")
    ap.add_argument("--solo", type=float, help="seconds of B alone, per policy (default 15; --quick 6)")
    ap.add_argument("--ramp", type=float, default=2.0, help="seconds the flood runs before B is measured")
    ap.add_argument("--a-procs", type=int, default=2, help="flooding processes of tenant A (default 2)")
    ap.add_argument("--a-threads", type=int, default=2, help="requests in flight per A process (default 2)")
    ap.add_argument("--chunk-ms", type=float, help="server --chunk-ms (default: the server's)")
    ap.add_argument("--device", help="server --device")
    ap.add_argument("--policies", default="fair,fifo")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", type=Path, default=common.RESULTS)
    args = ap.parse_args(argv)
    args.duration = args.duration or (15.0 if args.quick else 40.0)
    args.solo = args.solo or (6.0 if args.quick else 15.0)

    tmp = Path(tempfile.mkdtemp(prefix="clce-bench-tenants-"))
    tenants = tmp / "tenants.toml"
    tenants.write_text(f'[tenants.A]\napi_key = "{KEYS["A"]}"\nweight = 1\n\n'
                       f'[tenants.B]\napi_key = "{KEYS["B"]}"\nweight = 1\n')
    results = {}
    for policy in args.policies.split(","):
        print(f"[{policy}] B solo {args.solo:.0f}s, then B under A's flood {args.duration:.0f}s ...", flush=True)
        results[policy] = run_policy(policy, args, tenants, tmp)

    rows = []
    for policy, r in results.items():
        rows.append([policy, f"{r['b_solo']['p50_ms']:.1f}", f"{r['b_solo']['p99_ms']:.1f}",
                     f"{r['b_flood']['p50_ms']:.1f}", f"{r['b_flood']['p99_ms']:.1f}",
                     f"{r['p99_ratio_flood_vs_solo']:.1f}x", f"{r['b_flood']['rps']:.1f}",
                     f"{r['a_flood']['rps']:.2f}", f"{r['a_flood']['mb_per_s_each_way']:.0f}",
                     str(sum(sum(e.values()) for e in [r["errors"]["b_solo"], r["errors"]["b_flood"], *r["errors"]["a"]]))])
    common.print_table(
        f"Tenant B {B_SHAPE[0]}x{B_SHAPE[1]} closed loop vs tenant A flood {A_SHAPE[0]}x{A_SHAPE[1]} "
        f"({args.a_procs} procs x {args.a_threads} in flight), loss+grad",
        ["policy", "B solo p50 ms", "B solo p99 ms", "B flood p50 ms", "B flood p99 ms", "p99 flood/solo",
         "B req/s", "A req/s", "A MB/s", "errors"], rows)
    goal = None
    if "fair" in results:
        goal = results["fair"]["p99_ratio_flood_vs_solo"] <= 5.0
        print(f"goal: fair B p99 under flood within 5x of solo p99: "
              f"{results['fair']['p99_ratio_flood_vs_solo']:.2f}x -> {common.verdict(goal)}")
    if "fair" in results and "fifo" in results:
        print(f"fair/fifo B p50 under flood: {results['fair']['b_flood']['p50_ms'] / results['fifo']['b_flood']['p50_ms']:.2f}, "
              f"p99: {results['fair']['b_flood']['p99_ms'] / results['fifo']['b_flood']['p99_ms']:.2f}")

    doc = {"machine": common.machine_info(), "a_shape": A_SHAPE, "b_shape": B_SHAPE,
           "a_procs": args.a_procs, "a_threads": args.a_threads, "duration_s": args.duration,
           "solo_s": args.solo, "goal_fair_p99_within_5x": goal, "results": results}
    path = common.write_json(args.out / "tenants.json", doc)
    png = plot(results, args.out / "tenants.png")
    print(f"wrote {path} and {png}")
    return 0


def plot(results: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.8))
    styles = {"fair": "-", "fifo": "--"}
    for policy, r in results.items():
        for key, label, color in (("b_solo", "B solo", "tab:green"), ("b_flood", "B under A's flood", "tab:red")):
            xs = np.sort(np.array(r[key]["latencies_s"]) * 1e3)
            if not len(xs):
                continue
            ys = np.arange(1, len(xs) + 1) / len(xs)
            ax.plot(xs, ys, styles.get(policy, ":"), color=color if policy == "fair" else
                    {"tab:green": "tab:olive", "tab:red": "tab:purple"}[color],
                    label=f"{label} ({policy}; p99 {r[key]['p99_ms']:.0f} ms)")
    ax.set_xscale("log")
    ax.set_xlabel(f"tenant B latency (ms), {B_SHAPE[0]}x{B_SHAPE[1]} loss+grad, log scale")
    ax.set_ylabel("fraction of requests")
    ax.set_title(f"B's latency CDF, alone and under A's {A_SHAPE[0]}x{A_SHAPE[1]} flood", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
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
