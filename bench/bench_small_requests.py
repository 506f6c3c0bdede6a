"""Small requests: clce's per-request overhead against the framework's floor.

16 concurrent keep-alive connections send 64x10 loss+grad msgpack requests as fast as they are
answered (closed loop) to

  clce      ``python -m clce_server`` (open, no tenants file): decode, schedule, compute, answer
  trivial   the floor: a FastAPI app served by uvicorn the same way (this file with
            --serve-trivial) whose endpoint does only ``msgpack.unpackb(await request.body())``
            and answers a tiny msgpack body. Nothing of clce is in it (not its decoder, not its
            validation): it is what FastAPI, uvicorn and msgpack cost per request, the least any
            msgpack service on this stack can spend

Both servers run from the start; the phases alternate (clce, trivial, clce, trivial, ...) so a
slow phase of this shared machine hits both alike, and each target keeps its best phase.

The load generator is wrk (a C tool; installed with apt-get when missing) replaying the client's
own request bytes (`Client`'s msgpack encoding of a 64x10 float32 batch) from a Lua script, so the
generator is not the bottleneck: its CPU use is measured and reported, as is each server's (from
/proc). wrk counts non-2xx answers; before and after each clce phase a response is decoded and
compared with a numpy reference (loss and gradient).

Target: clce >= 0.5x the trivial endpoint's requests/s.

    python bench/bench_small_requests.py                 # 2 rounds x 10 s per target
    python bench/bench_small_requests.py --quick         # 1 round x 5 s
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (puts the repo on sys.path)

import numpy as np  # noqa: E402

SHAPE = (64, 10)
PATH = "/v1/cross_entropy"


# ---------------------------------------------------------------------------------------------
# the trivial endpoint

def serve_trivial(port: int) -> None:
    """The floor: FastAPI + uvicorn + msgpack and nothing else (no clce module is imported)."""
    import msgpack
    import uvicorn
    from fastapi import FastAPI, Request
    from fastapi.responses import Response

    # this module has `from __future__ import annotations`: FastAPI resolves the endpoint's
    # annotation "Request" in the module globals
    globals()["Request"] = Request
    app = FastAPI()
    reply = msgpack.packb({"v": 1, "loss": 0.0})

    @app.post(PATH)
    async def ce(request: Request):
        msgpack.unpackb(await request.body())
        return Response(reply, media_type="application/msgpack")

    @app.get("/healthz")
    async def healthz():
        return {"status": "ok"}

    # the same uvicorn settings as clce_server/__main__.py
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False, timeout_keep_alive=30)


# ---------------------------------------------------------------------------------------------
# request, reference, load generator

def make_request():
    """The bytes `Client.cross_entropy(x, t, return_grad=True)` sends, and the reference answer."""
    from clce_wire import protocol

    rng = np.random.default_rng(0)
    x = rng.standard_normal(SHAPE).astype(np.float32)
    t = rng.integers(0, SHAPE[1], SHAPE[0])
    segments = common.request_segments(x, t, return_grad=True)
    body = b"".join(bytes(s) for s in segments)
    assert protocol.decode_message(body)["return_grad"] is True
    xd = x.astype(np.float64)
    lse = np.log(np.exp(xd - xd.max(1, keepdims=True)).sum(1)) + xd.max(1)
    loss = float(np.mean(lse - xd[np.arange(SHAPE[0]), t]))
    grad = np.exp(xd - lse[:, None])
    grad[np.arange(SHAPE[0]), t] -= 1
    return body, loss, grad / SHAPE[0]


def check_clce(body: bytes, loss_ref: float, grad_ref: np.ndarray) -> bool:
    from clce_wire import options, protocol

    msg = protocol.decode_message(bytearray(body))
    loss = float(protocol.decode_tensor(msg["loss"]))
    grad = protocol.decode_tensor(msg["grad"])
    return abs(loss - loss_ref) <= 2e-5 * abs(loss_ref) + 1e-6 and np.allclose(grad, grad_ref, rtol=1e-4, atol=1e-6)


WRK_SCRIPT = r"""
local f = assert(io.open(os.getenv("CLCE_BENCH_BODY"), "rb"))
wrk.method = "POST"
wrk.body = f:read("*all")
f:close()
wrk.headers["Content-Type"] = "application/msgpack"
wrk.headers["Accept"] = "application/msgpack"
done = function(summary, latency, requests)
  io.write(string.format('WRK {"requests": %d, "duration_us": %d, "non2xx": %d, "socket_errors": %d, '
    .. '"p50_us": %d, "p99_us": %d}\n', summary.requests, summary.duration, summary.errors.status,
    summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout,
    latency:percentile(50), latency:percentile(99)))
end
"""


def ensure_wrk() -> str:
    """The wrk binary, installed from the distribution's packages when missing."""
    path = shutil.which("wrk")
    if path:
        return path
    sudo = [] if os.geteuid() == 0 else ["sudo"]
    print("installing wrk (apt-get) ...", flush=True)
    subprocess.run(sudo + ["apt-get", "update"], check=True, stdout=subprocess.DEVNULL)
    subprocess.run(sudo + ["apt-get", "install", "-y", "--no-install-recommends", "wrk"], check=True,
                   stdout=subprocess.DEVNULL, env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
    return shutil.which("wrk") or "wrk"


def verify_one(port: int, body: bytes, loss_ref: float, grad_ref: np.ndarray) -> bool:
    import httpx

    r = httpx.post(f"http://127.0.0.1:{port}{PATH}", content=body,
                   headers={"Content-Type": "application/msgpack", "Accept": "application/msgpack"}, timeout=30)
    return r.status_code == 200 and check_clce(r.content, loss_ref, grad_ref)


# ---------------------------------------------------------------------------------------------

def proc_cpu_seconds(pid: int) -> float:
    """utime + stime of a process and its threads (clock ticks -> seconds)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_phase(name: str, port: int, server_pid: int, args, wrk: dict) -> dict:
    """One closed-loop phase of wrk against `port`; req/s, p50/p99 and CPU of server and generator."""
    cmd = [wrk["bin"], f"-t{args.threads}", f"-c{args.connections}", f"-d{args.duration + args.warmup:.0f}s",
           "--latency", "-s", wrk["script"], f"http://127.0.0.1:{port}{PATH}"]
    s0, w0 = proc_cpu_seconds(server_pid), time.perf_counter()
    g0 = os.times()
    out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "CLCE_BENCH_BODY": wrk["body"]})
    g1 = os.times()
    s1, w1 = proc_cpu_seconds(server_pid), time.perf_counter()
    line = [ln for ln in out.stdout.splitlines() if ln.startswith("WRK ")]
    if out.returncode != 0 or not line:
        raise RuntimeError(f"wrk failed: {out.stdout[-2000:]} {out.stderr[-2000:]}")
    r = json.loads(line[-1][4:])
    gen_cpu = (g1.children_user - g0.children_user) + (g1.children_system - g0.children_system)
    n = r["requests"]
    errors = {k: r[k] for k in ("non2xx", "socket_errors") if r[k]}
    return {"target": name, "rps": n / (r["duration_us"] * 1e-6), "n": n,
            "p50_ms": r["p50_us"] / 1e3, "p99_ms": r["p99_us"] / 1e3, "errors": errors,
            "generator_cpu_cores": gen_cpu / (w1 - w0), "server_cpu_cores": (s1 - s0) / (w1 - w0),
            "generator_cpu_us_per_request": gen_cpu / max(n, 1) * 1e6}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=float, help="measured seconds per phase (default 10; --quick 5)")
    ap.add_argument("--warmup", type=float, default=1.0, help="unmeasured seconds at the start of each phase")
    ap.add_argument("--rounds", type=int, help="clce/trivial alternations (default 2; --quick 1)")
    ap.add_argument("--connections", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2, help="wrk threads (default 2)")
    ap.add_argument("--device", help="clce --device")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", type=Path, default=common.RESULTS)
    args = ap.parse_args(argv)
    args.duration = args.duration or (5.0 if args.quick else 10.0)
    args.rounds = args.rounds or (1 if args.quick else 2)

    tmp = Path(tempfile.mkdtemp(prefix="clce-bench-small-"))
    body, loss_ref, grad_ref = make_request()
    (tmp / "body.msgpack").write_bytes(body)
    (tmp / "clce.lua").write_text(WRK_SCRIPT)
    wrk = {"bin": ensure_wrk(), "body": str(tmp / "body.msgpack"), "script": str(tmp / "clce.lua")}
    clce_args = ["--device", args.device] if args.device else []
    port = common.free_port()
    trivial = subprocess.Popen([sys.executable, __file__, "--serve-trivial", str(port)], cwd=str(common.REPO),
                               stdout=open(tmp / "trivial.log", "wb"), stderr=subprocess.STDOUT)
    phases: list[dict] = []
    try:
        quiet = {"CLCE_ACCESS_LOG": "false", "CLCE_LOG_LEVEL": "warning"}
        # the same server with coalescing off: dynamic batching is kept only if it pays here
        with common.ServerProcess(clce_args, log_path=tmp / "clce.log", env=quiet) as srv, \
                common.ServerProcess(clce_args + ["--max-batch", "1"], log_path=tmp / "clce-nobatch.log",
                                     env=quiet) as srv1:
            import httpx

            deadline = time.monotonic() + 60
            while True:
                try:
                    if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline or trivial.poll() is not None:
                    raise RuntimeError("the trivial endpoint did not start; see " + str(tmp / "trivial.log"))
                time.sleep(0.2)
            for rnd in range(args.rounds):
                for name, p, pid in (("clce", srv.port, srv.proc.pid), ("clce-nobatch", srv1.port, srv1.proc.pid),
                                     ("trivial", port, trivial.pid)):
                    if name != "trivial" and not verify_one(p, body, loss_ref, grad_ref):
                        raise RuntimeError(f"{name} answered a wrong result")
                    r = run_phase(name, p, pid, args, wrk)
                    if name != "trivial":
                        r["checked"] = int(verify_one(p, body, loss_ref, grad_ref))
                        if not r["checked"]:
                            raise RuntimeError(f"{name} answered a wrong result after the phase")
                    r["round"] = rnd
                    phases.append(r)
                    print(f"round {rnd} {name:8s} {r['rps']:8.0f} req/s  p50 {r['p50_ms']:.2f} ms  "
                          f"generator {r['generator_cpu_cores']:.2f} cores  server {r['server_cpu_cores']:.2f} cores"
                          f"  errors {r['errors'] or 'none'}", flush=True)
    finally:
        trivial.terminate()
        trivial.wait(10)

    best = {name: max((p for p in phases if p["target"] == name), key=lambda p: p["rps"])
            for name in ("clce", "clce-nobatch", "trivial")}
    ratio = best["clce"]["rps"] / best["trivial"]["rps"]
    rows = [[name, f"{b['rps']:.0f}", f"{b['p50_ms']:.2f}", f"{b['p99_ms']:.2f}", f"{b['server_cpu_cores']:.2f}",
             f"{b['generator_cpu_cores']:.2f}", f"{b['generator_cpu_us_per_request']:.0f}",
             str(sum(b["errors"].values()))] for name, b in best.items()]
    common.print_table(f"{SHAPE[0]}x{SHAPE[1]} loss+grad msgpack, {args.connections} connections, "
                       f"best of {args.rounds} x {args.duration:.0f}s ({os.cpu_count()} cores shared)",
                       ["target", "req/s", "p50 ms", "p99 ms", "server cores", "generator cores",
                        "gen us/req", "errors"], rows)
    goal = ratio >= 0.5
    batching = best["clce"]["rps"] / best["clce-nobatch"]["rps"]
    print(f"clce / trivial requests/s: {ratio:.2f}x (target >= 0.5x) -> {common.verdict(goal)}; "
          "clce's answers checked against numpy before and after every phase")
    print(f"coalescing (--max-batch 64 vs 1): {batching:.2f}x requests/s")
    doc = {"machine": common.machine_info(), "shape": SHAPE, "connections": args.connections,
           "generator": "wrk", "generator_threads": args.threads, "duration_s": args.duration, "rounds": args.rounds,
           "ratio_clce_over_trivial": ratio, "goal_ratio_ge_0_5": goal, "coalescing_speedup": batching,
           "best": {k: {kk: vv for kk, vv in v.items()} for k, v in best.items()},
           "phases": phases}
    print(f"wrote {common.write_json(args.out / 'small_requests.json', doc)}")
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--serve-trivial":
        serve_trivial(int(sys.argv[2]))
        sys.exit(0)
    sys.exit(main())
