#!/usr/bin/env python3
"""Fuzz a real clce server for as long as you like (tests/cross_entropy/test_endpoint_fuzz.py runs the same
grammar-aware strategies, tests/support/fuzzing.py, for a bounded number of inputs).

    .venv/bin/python scripts/fuzz_service.py --seconds 600             # starts its own server
    .venv/bin/python scripts/fuzz_service.py --url http://host:8000 --seconds 60
    .venv/bin/python scripts/fuzz_service.py --shm --seconds 300     # the registration socket

--shm fuzzes the shared-memory registration socket instead (tests/support/fuzzing.py: frames x
descriptors x seals x sizes x timing), on a server of its own with a tenants file, while two
well-behaved tenants train beside it over shared memory (each step's loss and gradient checked
against torch). It ends by checking that the trainers failed no step, that nothing is held and
no descriptor is open that was not before, and that registration still works.

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
import os
import sys
import time
from collections import Counter
from pathlib import Path
from urllib.parse import urlparse

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import httpx  # noqa: E402
import numpy as np  # noqa: E402
from hypothesis import HealthCheck, given, seed, settings  # noqa: E402

from tests.support import fuzzing  # noqa: E402
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


# ---- --shm: the registration socket, with two tenants training beside the fuzzer ----------------

SHM_KEYS = {"train1": "sk-train1-Fz1Qa8Ws3Ed", "train2": "sk-train2-Fz2Rf5Tg7Yh", "fuzz": "sk-fuzz-Fz3Uj9Ik4Ol"}
SHM_ADMIN = "sk-admin-Fz4Pl6Mn2Bv"
SHM_FRAME_TIMEOUT = 0.5


def trainer(url: str, key: str, seconds: float, seed: int) -> int:
    """A well-behaved tenant: a linear model trained with the remote loss over shared memory; each
    step's loss and gradient compared with torch's. Prints a JSON summary."""
    import torch

    from clce_client import Client

    torch.manual_seed(seed)
    n, d, v = 128, 64, 4096
    x, t = torch.randn(n, d), torch.randint(0, v, (n,))
    w = (torch.randn(d, v) * 0.05).requires_grad_()
    steps = failed = 0
    errors: list[str] = []
    losses: list[float] = []
    t0 = time.monotonic()
    with Client(url, api_key=key, transport="shm", shm_min_bytes=0, retry_budget_s=10) as client:
        while time.monotonic() - t0 < seconds:
            steps += 1
            try:
                logits = x @ w
                loss = client.cross_entropy(logits, t)
                (grad,) = torch.autograd.grad(loss, w)
                ref_logits = (x @ w).detach().double().requires_grad_()
                ref = torch.nn.functional.cross_entropy(ref_logits, t)
                (ref_grad,) = torch.autograd.grad(ref, ref_logits)
                ref_grad_w = x.double().T @ ref_grad
                got, want = float(loss.detach()), float(ref.detach())
                if not (abs(got - want) <= 1e-5 * abs(want) and float((grad.double() - ref_grad_w).abs().max()) <= 1e-5):
                    raise AssertionError(f"step {steps}: loss {got} vs torch {want}")
                with torch.no_grad():
                    w -= 0.5 * grad
                losses.append(got)
            except Exception as exc:  # noqa: BLE001 - a failed step is what this counts
                failed += 1
                if len(errors) < 5:
                    errors.append(f"{type(exc).__name__}: {exc}"[:300])
            time.sleep(0.005)
    print(json.dumps({"steps": steps, "failed": failed, "errors": errors,
                      "first_loss": losses[0] if losses else None, "last_loss": losses[-1] if losses else None}))
    return 0


def _fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _fd_targets(pid: int) -> Counter:
    out: Counter = Counter()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        out[target.split(":")[0] if ":[" in target else target] += 1
    return out


def _steady_fds(pid: int) -> int:
    last = -1
    while (now := _fds(pid)) != last:
        last = now
        time.sleep(0.5)
    return now


def shm_main(args) -> int:
    import subprocess
    import tempfile

    from hypothesis import HealthCheck, given, seed, settings

    from tests.support.serverproc import ServerProcess

    from clce_client import Client

    tmp = Path(tempfile.mkdtemp(prefix="clce-shm-fuzz-"))
    tenants = tmp / "tenants.toml"
    tenants.write_text(f'[admin]\napi_key = "{SHM_ADMIN}"\n\n'
                       + "".join(f'[tenants.{n}]\napi_key = "{k}"\n\n' for n, k in SHM_KEYS.items()))
    server = ServerProcess(tenants=tenants, env={"CLCE_ACCESS_LOG": "false"}, args=[
        "--allow-shm", "--shm-frame-timeout", str(SHM_FRAME_TIMEOUT), "--shm-hello-timeout", str(SHM_FRAME_TIMEOUT)])
    server.start()
    admin = {"Authorization": f"Bearer {SHM_ADMIN}"}
    pid = server.proc.pid

    def shm_info() -> dict:
        return httpx.get(server.url + "/v1/info", headers=admin, timeout=30).json()["shm"]

    def registration_alive() -> bool:
        with Client(server.url, api_key=SHM_KEYS["fuzz"], transport="shm", shm_min_bytes=0) as c:
            r = c.cross_entropy(X, T, reduction="sum")
            return c._arena is not None and abs(float(r) - EXPECTED) <= 1e-4 * abs(EXPECTED)

    summary: dict = {}
    try:
        alive_before = registration_alive()
        baseline = _steady_fds(pid)
        targets_before = _fd_targets(pid)
        path = shm_info()["socket"]
        trainers = [subprocess.Popen([sys.executable, __file__, "--trainer", server.url, SHM_KEYS[name],
                                      str(args.seconds), str(i)], stdout=subprocess.PIPE, text=True)
                    for i, name in enumerate(("train1", "train2"))]
        sessions = frames = 0
        answers: Counter = Counter()
        findings: list[dict] = []
        t0 = time.monotonic()
        rounds = 0
        while time.monotonic() - t0 < args.seconds:
            @settings(max_examples=args.batch, deadline=None, database=None, derandomize=False,
                      suppress_health_check=list(HealthCheck))
            @given(session=fuzzing.shm_sessions())
            def case(session):
                nonlocal sessions, frames
                res = fuzzing.run_shm_session(path, SHM_KEYS["fuzz"], session, SHM_FRAME_TIMEOUT)
                sessions += 1
                frames += res.frames
                answers.update(res.answers)
                findings.extend({"finding": f, "session": repr(session)} for f in res.findings)
            seed(rounds)(case)()
            rounds += 1
        fuzz_s = time.monotonic() - t0
        trained = []
        for p in trainers:
            out, _ = p.communicate(timeout=args.seconds + 120)
            trained.append(json.loads(out.strip().splitlines()[-1]) if out.strip() else {"exit": p.returncode})
        deadline = time.monotonic() + 30
        while (shm := shm_info())["regions"] and time.monotonic() < deadline:
            time.sleep(0.2)
        alive_after = registration_alive()
        shm = shm_info()
        time.sleep(1.0)                    # the HTTP connections of those calls close
        fds_after = _steady_fds(pid)
        targets_after = _fd_targets(pid)
        summary = {"seconds": round(fuzz_s, 1), "load_average": os.getloadavg(), "sessions": sessions,
                   "frames": frames, "answers": dict(answers), "findings": len(findings),
                   "trainers": trained, "failed_steps": sum(t.get("failed", 1) for t in trained),
                   "held_after": {k: shm[k] for k in ("regions", "bytes", "pinned", "connections", "sessions")},
                   "server_fds": {"before": baseline, "after": fds_after, "leaked": fds_after - baseline,
                                  "new": dict(targets_after - targets_before)},
                   "refusals": shm["refusals"], "accept_errors": shm["accept_errors"],
                   "registration_alive": alive_before and alive_after, "server_alive": server.proc.poll() is None}
        if findings:
            args.findings.parent.mkdir(parents=True, exist_ok=True)
            with open(args.findings, "w") as f:
                for item in findings:
                    f.write(json.dumps(item) + "\n")
            summary["findings_file"] = str(args.findings)
    finally:
        server.cleanup()
    print(json.dumps(summary, indent=2))
    ok = (not summary.get("findings") and summary.get("failed_steps") == 0 and summary.get("registration_alive")
          and summary["held_after"]["regions"] == summary["held_after"]["bytes"] == 0
          and summary["server_fds"]["leaked"] <= 0 and all(t.get("steps", 0) > 0 for t in summary["trainers"]))
    return 0 if ok else 1


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--trainer":
        url, key, seconds, rng_seed = sys.argv[2:6]
        return trainer(url, key, float(seconds), int(rng_seed))
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", help="a running server (default: start one)")
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--batch", type=int, default=200, help="inputs per family per round")
    ap.add_argument("--findings", type=Path, default=REPO / "bench" / "results" / "fuzz_findings.jsonl")
    ap.add_argument("--shm", action="store_true", help="fuzz the shared-memory registration socket, with two "
                    "tenants training beside it")
    args = ap.parse_args()
    if args.shm:
        return shm_main(args)

    server = None
    url = args.url
    if url is None:
        from tests.support.serverproc import ServerProcess

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
