"""Small requests: clce's per-request overhead against a trivial FastAPI endpoint.

16 concurrent keep-alive connections send 64x10 loss+grad msgpack requests as fast as they are
answered (closed loop) to

  clce      ``python -m clce_server`` (open, no tenants file): decode, schedule, compute, answer
  trivial   a FastAPI app served by uvicorn the same way (this file with --serve-trivial) that only
            decodes the same body with clce_wire.protocol.decode_message + parse_request and
            answers a tiny msgpack body

Both servers run from the start; the phases alternate (clce, trivial, clce, trivial, ...) so a
slow phase of this shared machine hits both alike, and each target keeps its best phase.

The load generator is --procs processes, each an asyncio loop over raw sockets with the request
bytes prepared once (no HTTP client library in the loop); its CPU use is measured and reported, as
is each server's (from /proc). Every response's status is checked, and every 10th clce response is
decoded and compared with a numpy reference (loss and gradient).

Target: clce >= 0.5x the trivial endpoint's requests/s.

    python bench/bench_small_requests.py                 # 2 rounds x 10 s per target
    python bench/bench_small_requests.py --quick         # 1 round x 5 s
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
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
    import msgpack
    import uvicorn
    from fastapi import FastAPI, Request
    from fastapi.responses import Response

    from clce_wire import options, protocol

    # this module has `from __future__ import annotations`: FastAPI resolves the endpoint's
    # annotation "Request" in the module globals
    globals()["Request"] = Request
    app = FastAPI()
    reply = msgpack.packb({"v": protocol.PROTOCOL_VERSION, "loss": 0.0})

    @app.post(PATH)
    async def ce(request: Request):
        body = bytearray(await request.body())
        options.parse_request(protocol.decode_message(body))
        return Response(reply, media_type=protocol.MSGPACK)

    @app.get("/healthz")
    async def healthz():
        return {"status": "ok"}

    # the same uvicorn settings as clce_server/__main__.py
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False, timeout_keep_alive=30)


# ---------------------------------------------------------------------------------------------
# request, reference, load generator

def make_request():
    from clce_wire import options, protocol

    rng = np.random.default_rng(0)
    x = rng.standard_normal(SHAPE).astype(np.float32)
    t = rng.integers(0, SHAPE[1], SHAPE[0])
    msg = {"v": protocol.PROTOCOL_VERSION, "input": protocol.encode_tensor(x), "target": protocol.encode_tensor(t),
           "weight": None, "ignore_index": -100, "reduction": "mean", "label_smoothing": 0.0, "return_grad": True,
           "grad_dtype": None, "return_lse": False, "return_argmax": False, "lse_square_scale": 0.0,
           "softcap": None, "deadline_ms": None}
    body = b"".join(bytes(s) for s in protocol.encode_message(msg))
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


async def _connection(port: int, request: bytes, stop_at: float, warm_until: float, verify, stats: dict) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    n = 0
    try:
        while True:
            t0 = time.perf_counter()
            if t0 >= stop_at:
                return
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            status = int(head[9:12])
            length = 0
            for line in head.split(b"\r\n"):
                if line[:15].lower() == b"content-length:":
                    length = int(line[15:])
            body = await reader.readexactly(length)
            t1 = time.perf_counter()
            n += 1
            if status != 200:
                stats["errors"][str(status)] = stats["errors"].get(str(status), 0) + 1
            elif verify is not None and n % 10 == 1:
                stats["checked"] += 1
                if not verify(body):
                    stats["errors"]["wrong_result"] = stats["errors"].get("wrong_result", 0) + 1
            if t0 >= warm_until:
                stats["latencies"].append(t1 - t0)
    finally:
        writer.close()


def generator(spec: dict) -> None:
    body, loss_ref, grad_ref = make_request()
    request = (f"POST {PATH} HTTP/1.1\r\nHost: 127.0.0.1:{spec['port']}\r\nContent-Type: application/msgpack\r\n"
               f"Accept: application/msgpack\r\nContent-Length: {len(body)}\r\n\r\n").encode() + body
    verify = (lambda b: check_clce(b, loss_ref, grad_ref)) if spec["verify"] else None
    print("READY", flush=True)
    if sys.stdin.readline().strip() != "go":
        return
    stats = {"latencies": [], "errors": {}, "checked": 0}
    start = time.perf_counter()
    cpu0 = time.process_time()
    warm_until = start + spec["warmup"]
    stop_at = warm_until + spec["duration"]

    async def run():
        await asyncio.gather(*(_connection(spec["port"], request, stop_at, warm_until, verify, stats)
                               for _ in range(spec["connections"])))

    asyncio.run(run())
    cpu = time.process_time() - cpu0
    print("RESULT " + json.dumps({"n": len(stats["latencies"]), "latencies": stats["latencies"],
                                  "errors": stats["errors"], "checked": stats["checked"],
                                  "cpu_s": cpu, "wall_s": time.perf_counter() - start}), flush=True)


# ---------------------------------------------------------------------------------------------

def proc_cpu_seconds(pid: int) -> float:
    """utime + stime of a process and its threads (clock ticks -> seconds)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_phase(name: str, port: int, server_pid: int, args) -> dict:
    per = [args.connections // args.procs + (1 if i < args.connections % args.procs else 0) for i in range(args.procs)]
    procs = []
    for c in per:
        spec = {"port": port, "connections": c, "duration": args.duration, "warmup": args.warmup,
                "verify": name == "clce"}
        p = subprocess.Popen([sys.executable, __file__, "--gen", json.dumps(spec)], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True, bufsize=1)
        if p.stdout.readline().strip() != "READY":
            raise RuntimeError("load generator failed to start")
        procs.append(p)
    for p in procs:
        p.stdin.write("go\n")
        p.stdin.flush()
    time.sleep(args.warmup)
    s0, w0 = proc_cpu_seconds(server_pid), time.perf_counter()
    time.sleep(args.duration)
    s1, w1 = proc_cpu_seconds(server_pid), time.perf_counter()
    res = []
    for p in procs:
        out = p.stdout.read()
        p.wait()
        res.append(json.loads([ln for ln in out.splitlines() if ln.startswith("RESULT ")][-1][7:]))
    lat = [x for r in res for x in r["latencies"]]
    errors: dict = {}
    for r in res:
        for k, v in r["errors"].items():
            errors[k] = errors.get(k, 0) + v
    gen_cpu = sum(r["cpu_s"] for r in res)
    gen_wall = max(r["wall_s"] for r in res)
    return {"target": name, "rps": len(lat) / args.duration, "n": len(lat),
            "p50_ms": float(np.percentile(lat, 50)) * 1e3 if lat else None,
            "p99_ms": float(np.percentile(lat, 99)) * 1e3 if lat else None,
            "errors": errors, "checked": sum(r["checked"] for r in res),
            "generator_cpu_cores": gen_cpu / gen_wall, "server_cpu_cores": (s1 - s0) / (w1 - w0),
            "generator_cpu_us_per_request": gen_cpu / max(len(lat), 1) * 1e6}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=float, help="measured seconds per phase (default 10; --quick 5)")
    ap.add_argument("--warmup", type=float, default=1.0, help="unmeasured seconds at the start of each phase")
    ap.add_argument("--rounds", type=int, help="clce/trivial alternations (default 2; --quick 1)")
    ap.add_argument("--connections", type=int, default=16)
    ap.add_argument("--procs", type=int, default=2, help="load generator processes (default 2)")
    ap.add_argument("--device", help="clce --device")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", type=Path, default=common.RESULTS)
    args = ap.parse_args(argv)
    args.duration = args.duration or (5.0 if args.quick else 10.0)
    args.rounds = args.rounds or (1 if args.quick else 2)

    tmp = Path(tempfile.mkdtemp(prefix="clce-bench-small-"))
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
                    r = run_phase(name, p, pid, args)
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
          f"{best['clce']['checked']} clce responses checked against numpy")
    print(f"coalescing (--max-batch 64 vs 1): {batching:.2f}x requests/s")
    doc = {"machine": common.machine_info(), "shape": SHAPE, "connections": args.connections,
           "generator_procs": args.procs, "duration_s": args.duration, "rounds": args.rounds,
           "ratio_clce_over_trivial": ratio, "goal_ratio_ge_0_5": goal, "coalescing_speedup": batching,
           "best": {k: {kk: vv for kk, vv in v.items()} for k, v in best.items()},
           "phases": phases}
    print(f"wrote {common.write_json(args.out / 'small_requests.json', doc)}")
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--serve-trivial":
        serve_trivial(int(sys.argv[2]))
        sys.exit(0)
    if len(sys.argv) == 3 and sys.argv[1] == "--gen":
        generator(json.loads(sys.argv[2]))
        sys.exit(0)
    sys.exit(main())
