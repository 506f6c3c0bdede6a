#!/usr/bin/env python3
"""Fuzz a real clce server for as long as you like (tests/test_service_fuzz.py runs the same
grammar-aware strategies, tests/fuzzing.py, for a bounded number of inputs).

    .venv/bin/python scripts/fuzz_service.py --seconds 600             # starts its own server
    .venv/bin/python scripts/fuzz_service.py --url http://host:8000 --seconds 60

Families, round-robin: msgpack requests (structural, non-minimal headers, damaged bytes), JSON
requests (nesting around the limit, integers beyond int64, damaged text), raw HTTP framing
(methods, Content-Length and chunked variants). After every batch a valid request must still be
answered exactly. Prints a JSON summary: inputs tried per family, answers by status, 5xx and
dropped connections (each should be 0), and writes every finding (the input, base64) to
--findings, to become a regression test.
"""

from __future__ import annotations

import argparse
import base64
import json
import sys
import time
from collections import Counter
from pathlib import Path
from urllib.parse import urlparse

REPO = Path(__file__).resolve().parents[1]
for p in (REPO, REPO / "tests"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

import httpx  # noqa: E402
import numpy as np  # noqa: E402
from hypothesis import HealthCheck, given, seed, settings  # noqa: E402

import fuzzing  # noqa: E402
from clce_wire import protocol  # noqa: E402

X = np.random.default_rng(0).standard_normal((3, 5)).astype(np.float32)
T = np.array([4, 0, 2])
VALID = b"".join(bytes(s) for s in protocol.encode_message({"input": X, "target": T, "reduction": "sum"}))
EXPECTED = float(-(X[np.arange(3), T] - np.log(np.exp(X.astype(np.float64)).sum(1))).sum())


class Fuzzer:
    def __init__(self, url: str, findings: Path):
        self.url = url
        u = urlparse(url)
        self.host, self.port = u.hostname, u.port or 80
        self.http = httpx.Client(base_url=url, timeout=60,
                                 limits=httpx.Limits(max_connections=1, max_keepalive_connections=1))
        self.tried = Counter()
        self.status = Counter()
        self.findings_path = findings
        self.findings: list[dict] = []

    def finding(self, family: str, body: bytes, what: str) -> None:
        self.findings.append({"family": family, "what": what, "body": base64.b64encode(body).decode()})

    def post(self, family: str, body: bytes, ctype: str) -> None:
        self.tried[family] += 1
        try:
            r = self.http.post(fuzzing.PATH, content=body, headers={"Content-Type": ctype})
        except httpx.HTTPError as exc:
            self.status["dropped"] += 1
            self.finding(family, body, f"dropped: {type(exc).__name__}: {exc}")
            return
        self.status[r.status_code] += 1
        if r.status_code >= 500 or r.status_code not in fuzzing.ANSWERABLE:
            self.finding(family, body, f"{r.status_code}: {r.content[:300]!r}")
        elif r.status_code != 200:
            try:
                fuzzing.check_error_body(r.status_code, r.headers.get("content-type", ""), r.content)
            except Exception as exc:  # noqa: BLE001 - a malformed error body is a finding
                self.finding(family, body, f"bad error body: {exc}")

    def raw(self, family: str, raw: bytes) -> None:
        self.tried[family] += 1
        status, out = fuzzing.exchange(self.host, self.port, raw)
        self.status[status if status is not None else "closed-without-answer"] += 1
        if status is None or status >= 500:
            self.finding(family, raw, f"{status}: {out[:300]!r}")

    def still_correct(self) -> bool:
        r = self.http.post(fuzzing.PATH, content=VALID, headers={"Content-Type": protocol.MSGPACK})
        if r.status_code != 200:
            return False
        loss = protocol.decode_tensor(protocol.decode_message(bytearray(r.content))["loss"])
        return abs(float(loss) - EXPECTED) <= 1e-4 * abs(EXPECTED)

    def run_batch(self, family: str, n: int, rng_seed: int) -> None:
        cfg = settings(max_examples=n, deadline=None, database=None, derandomize=False,
                       suppress_health_check=list(HealthCheck))
        if family == "msgpack":
            @cfg
            @given(body=fuzzing.msgpack_requests())
            def case(body):
                self.post(family, body, protocol.MSGPACK)
        elif family == "json":
            @cfg
            @given(body=fuzzing.json_requests())
            def case(body):
                self.post(family, body, protocol.JSON)
        else:
            @cfg
            @given(raw=fuzzing.http_requests(VALID))
            def case(raw):
                self.raw(family, raw)
        seed(rng_seed)(case)()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", help="a running server (default: start one)")
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--batch", type=int, default=200, help="inputs per family per round")
    ap.add_argument("--findings", type=Path, default=REPO / "bench" / "results" / "fuzz_findings.jsonl")
    args = ap.parse_args()

    server = None
    url = args.url
    if url is None:
        from serverproc import ServerProcess

        # short read timeouts: a body shorter than its Content-Length is answered in 0.5 s
        server = ServerProcess(args=["--body-timeout", "0.5", "--header-timeout", "2"],
                               env={"CLCE_ACCESS_LOG": "false"}).start()
        url = server.url
    fz = Fuzzer(url, args.findings)
    t0 = time.monotonic()
    rounds = 0
    healthy = True
    try:
        while time.monotonic() - t0 < args.seconds:
            for family in ("msgpack", "json", "http"):
                fz.run_batch(family, args.batch, rounds * 3 + hash(family) % 1000)
                healthy = healthy and fz.still_correct()
            rounds += 1
        healthy = healthy and fz.still_correct() and httpx.get(url + "/readyz", timeout=10).status_code == 200
    finally:
        fz.http.close()
        if server is not None:
            alive = server.proc.poll() is None
            server.cleanup()
            healthy = healthy and alive
    fives = sum(v for k, v in fz.status.items() if isinstance(k, int) and k >= 500)
    summary = {"seconds": round(time.monotonic() - t0, 1), "inputs": sum(fz.tried.values()),
               "by_family": dict(fz.tried), "answers": {str(k): v for k, v in sorted(fz.status.items(), key=str)},
               "5xx": fives, "dropped": fz.status.get("dropped", 0),
               "closed_without_answer": fz.status.get("closed-without-answer", 0),
               "healthy_and_correct_after": healthy, "findings": len(fz.findings)}
    if fz.findings:
        args.findings.parent.mkdir(parents=True, exist_ok=True)
        with open(args.findings, "w") as f:
            for item in fz.findings:
                f.write(json.dumps(item) + "\n")
        summary["findings_file"] = str(args.findings)
    print(json.dumps(summary, indent=2))
    return 0 if not fz.findings and healthy else 1


if __name__ == "__main__":
    sys.exit(main())
