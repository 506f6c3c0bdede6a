"""Where one small request's time goes: stage by stage, alone, under small-request load, under a flood.

A probe sends one 64x1000 loss+grad request at a time (the client's own request bytes), each on a
fresh connection, and times on its side: accept (connect), then the answer's first and last byte.
The server's access log (one JSON line per request, joined by X-Request-ID) gives the rest, on
the same monotonic clock (time.perf_counter is CLOCK_MONOTONIC for every process of the machine):

  accept    connect() until the connection is established
  headers   the request written until the app sees it (header parsing, event-loop delay)
  body      reading the body          decode   msgpack -> options
  queue     waiting for a device      run      the job on its device thread (kernel: of which device time)
  encode    building the answer       send     handing it to the socket
  deliver   the server done until the client's first byte
  recv      the client reading the answer, from its first byte

Scenarios, on one server with a tenants file (probe, load and flood are different tenants):

  solo      the probe alone
  load      wrk (16 connections) sending 64x10 loss+grad requests as fast as they are answered
  flood     --flood-procs processes, each with 2 requests of 512x32000 fp32 loss+grad in flight
  flood-shm the same flood from clients on shared memory (transport="shm"): its bytes never
            cross the event loop

Reported: the probe's p50 and p99 per scenario, the median (and p99) of every stage, and the
flood/solo p99 ratios (issue targets: <= 3x over TCP, <= 2x with the flooder on shared memory).

    python bench/bench_latency.py            # 60 probes per scenario
    python bench/bench_latency.py --quick    # 20
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (puts the repo on sys.path)
import bench_small_requests as small  # noqa: E402

import numpy as np  # noqa: E402

KEYS = {"probe": "bench-probe-key-0123456789", "load": "bench-load-key-0123456789",
        "flood": "bench-flood-key-0123456789"}
PROBE = (64, 1000)
FLOOD = (512, 32000)
STAGES = ("accept", "headers", "body", "decode", "queue", "run", "kernel", "encode", "send", "deliver", "recv")


def request_bytes(shape, key: str, port: int, seed: int = 0) -> bytes:
    from clce_wire.protocol import message_nbytes

    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape).astype(np.float32)
    t = rng.integers(0, shape[1], shape[0])
    segments = common.request_segments(x, t, return_grad=True)
    n = message_nbytes(segments)
    head = (f"POST /v1/cross_entropy HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/msgpack\r\n"
            f"Accept: application/msgpack\r\nAuthorization: Bearer {key}\r\nContent-Length: {n}\r\n\r\n")
    return head.encode() + b"".join(bytes(s) for s in segments)


def probe_once(port: int, request: bytes) -> dict:
    t0 = time.perf_counter()
    s = socket.create_connection(("127.0.0.1", port))
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    t_conn = time.perf_counter()
    s.sendall(request)
    t_sent = time.perf_counter()
    buf = b""
    while b"\r\n\r\n" not in buf:
        buf += s.recv(65536)
    t_first = time.perf_counter()
    head, _, rest = buf.partition(b"\r\n\r\n")
    headers = dict(line.split(b": ", 1) for line in head.split(b"\r\n")[1:])
    length = int(headers[b"content-length"])
    while len(rest) < length:
        rest += s.recv(1 << 20)
    t_done = time.perf_counter()
    s.close()
    return {"status": int(head[9:12]), "id": headers.get(b"x-request-id", b"").decode(), "t0": t0,
            "t_conn": t_conn, "t_sent": t_sent, "t_first": t_first, "t_done": t_done}


def flood_worker(url: str, key: str, stop, threads: int = 2, transport: str = "tcp") -> None:
    import threading

    import clce_client

    x, t = common.make_batch(*FLOOD, seed=os.getpid())
    client = clce_client.Client(url, api_key=key, timeout=300, transport=transport)

    def loop():
        while not stop.is_set():
            client.cross_entropy(x, t, return_grad=True)

    ths = [threading.Thread(target=loop) for _ in range(threads)]
    for th in ths:
        th.start()
    for th in ths:
        th.join()


def read_access_log(path: Path) -> dict[str, dict]:
    out = {}
    for line in path.read_text(errors="replace").splitlines():
        i = line.find('{"request_id"')
        if i >= 0:
            try:
                rec = json.loads(line[i:])
            except ValueError:
                continue
            out[rec["request_id"]] = rec
    return out


def breakdown(probes: list[dict], log: dict[str, dict]) -> dict:
    rows = []
    for p in probes:
        rec = log.get(p["id"])
        if rec is None or p["status"] != 200:
            continue
        ms = lambda k: rec.get(f"{k}_ms", 0.0)  # noqa: E731
        rows.append({
            "latency": (p["t_done"] - p["t0"]) * 1e3,
            "accept": (p["t_conn"] - p["t0"]) * 1e3,
            "headers": (rec["t_arrive"] - p["t_sent"]) * 1e3,
            **{k: ms(k) for k in ("body", "decode", "queue", "run", "kernel", "encode", "send")},
            "deliver": (p["t_first"] - rec["t_arrive"]) * 1e3 - rec["ms"],
            "recv": (p["t_done"] - p["t_first"]) * 1e3,
        })
    if not rows:
        return {"n": 0}
    col = {k: np.array([r[k] for r in rows]) for k in rows[0]}
    return {"n": len(rows), "p50_ms": float(np.percentile(col["latency"], 50)),
            "p99_ms": float(np.percentile(col["latency"], 99)),
            "stages_p50_ms": {k: float(np.median(col[k])) for k in STAGES},
            "stages_p99_ms": {k: float(np.percentile(col[k], 99)) for k in STAGES}}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--probes", type=int, help="probes per scenario (default 60; --quick 20)")
    ap.add_argument("--flood-procs", type=int, default=2)
    ap.add_argument("--flood-transports", default="tcp,shm", help="the flood's transports, one scenario each")
    ap.add_argument("--server-arg", action="append", default=[], help="extra clce-server argument (repeatable)")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", type=Path, default=common.RESULTS)
    args = ap.parse_args(argv)
    n_probes = args.probes or (20 if args.quick else 60)

    tmp = Path(tempfile.mkdtemp(prefix="clce-bench-latency-"))
    tenants = tmp / "tenants.toml"
    tenants.write_text("".join(f'[tenants.{k}]\napi_key = "{v}"\n\n' for k, v in KEYS.items()))
    log_path = tmp / "server.log"
    results: dict[str, dict] = {}
    with common.ServerProcess(["--tenants", str(tenants), *args.server_arg], log_path=log_path,
                              env={"CLCE_ACCESS_LOG": "true"}) as srv:
        probe = request_bytes(PROBE, KEYS["probe"], srv.port)
        for _ in range(5):
            probe_once(srv.port, probe)   # warm

        def run_probes(name: str) -> None:
            probes = []
            for _ in range(n_probes):
                probes.append(probe_once(srv.port, probe))
                time.sleep(0.02)
            time.sleep(0.5)   # the access log lines of the last probes
            results[name] = breakdown(probes, read_access_log(log_path))
            r = results[name]
            print(f"{name:6s} n={r['n']} p50 {r.get('p50_ms', float('nan')):.2f} ms  "
                  f"p99 {r.get('p99_ms', float('nan')):.2f} ms", flush=True)

        run_probes("solo")

        # small-request load: wrk, replaying a 64x10 request of another tenant
        body, _, _ = small.make_request()
        (tmp / "body.msgpack").write_bytes(body)
        (tmp / "load.lua").write_text(small.WRK_SCRIPT + f'\nwrk.headers["Authorization"] = "Bearer {KEYS["load"]}"\n')
        wrk = subprocess.Popen([small.ensure_wrk(), "-t2", "-c16", "-d600s", "-s", str(tmp / "load.lua"),
                                f"{srv.url}/v1/cross_entropy"], env={**os.environ, "CLCE_BENCH_BODY": str(tmp / "body.msgpack")},
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            time.sleep(1.0)
            run_probes("load")
        finally:
            wrk.terminate()
            wrk.wait(10)

        ctx = mp.get_context("spawn")
        for transport in args.flood_transports.split(","):
            stop = ctx.Event()
            procs = [ctx.Process(target=flood_worker, args=(srv.url, KEYS["flood"], stop),
                                 kwargs={"transport": transport}) for _ in range(args.flood_procs)]
            for p in procs:
                p.start()
            try:
                time.sleep(3.0)
                run_probes("flood" if transport == "tcp" else f"flood-{transport}")
            finally:
                stop.set()
                for p in procs:
                    p.join(120)

    rows = []
    for name, r in results.items():
        if not r.get("n"):
            continue
        st = r["stages_p50_ms"]
        rows.append([name, str(r["n"]), f"{r['p50_ms']:.2f}", f"{r['p99_ms']:.2f}",
                     *(f"{st[k]:.2f}" for k in STAGES)])
    common.print_table(f"probe {PROBE[0]}x{PROBE[1]} loss+grad: latency and stage medians (ms)",
                       ["scenario", "n", "p50", "p99", *STAGES], rows)
    print("stage p50 / p99 (ms):")
    for name, r in results.items():
        if r.get("n"):
            print(f"  {name:6s} " + "  ".join(f"{k} {r['stages_p50_ms'][k]:.2f}/{r['stages_p99_ms'][k]:.2f}"
                                            for k in STAGES))
    for name, r in results.items():
        if r.get("n"):
            worst = max(STAGES, key=lambda k: r["stages_p99_ms"][k])
            print(f"{name}: largest stage at p99 is {worst} ({r['stages_p99_ms'][worst]:.2f} ms)")
    ratios = {}
    for name, target in (("flood", 3), ("flood-shm", 2)):
        if results.get(name, {}).get("n"):
            ratios[name] = results[name]["p99_ms"] / results["solo"]["p99_ms"]
            print(f"probe p99 under the {name} / solo: {ratios[name]:.2f}x (target <= {target}x) -> "
                  f"{common.verdict(ratios[name] <= target)}")
    doc = {"machine": common.machine_info(), "probe": PROBE, "flood": FLOOD, "flood_procs": args.flood_procs,
           "server_args": args.server_arg, "results": results,
           "flood_over_solo_p99": ratios.get("flood"), "flood_shm_over_solo_p99": ratios.get("flood-shm")}
    print(f"wrote {common.write_json(args.out / 'latency.json', doc)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
