"""`clce`: is the server there, what is it, and how fast is it from here.

    clce check [URL]   reachable? ready? which transport would this host use? one exact small call
    clce info  [URL]   the server's /v1/info, as your key may see it (JSON)
    clce bench [URL]   the README's call against local torch on this host, with a progress bar

URL defaults to CLCE_URL, else http://127.0.0.1:8000; the key to CLCE_API_KEY (--api-key). Each
command exits 0 when all went well and 1 saying why when not ("unreachable" for a URL where no
clce server answers), within about 10 seconds for check and info. ``-v`` shows the client's log
(the "clce" logger: transport, retries and their causes).
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import httpx
import numpy as np

from . import errors
from .client import DEFAULT_URL, Client, __version__

# `clce check`'s call: the README's curl example, and its answer computed here in float64
CHECK_INPUT = [[2.0, 0.5, -1.0], [0.1, 0.2, 3.0]]
CHECK_TARGET = [0, 2]
# check and info give up on a server that does not connect within this, or answer within the other
CONNECT_TIMEOUT_S = 3.0
READ_TIMEOUT_S = 5.0


class Failed(Exception):
    """What went wrong, as the one line the command prints before exiting 1."""


def _client(args: argparse.Namespace, **kwargs: Any) -> Client:
    # one retry and no retry budget: a command answers now, it does not wait for a server
    return Client(args.url, api_key=args.api_key, transport=args.transport, retries=1, retry_budget_s=0,
                  timeout=httpx.Timeout(READ_TIMEOUT_S, connect=CONNECT_TIMEOUT_S), **kwargs)


def _info(client: Client) -> dict[str, Any]:
    try:
        return client.info()
    except errors.TransportError as exc:   # ConnectError's message says "unreachable" itself
        raise Failed(str(exc) if isinstance(exc, errors.ConnectError) and "unreachable" in str(exc)
                     else f"unreachable: {exc}") from None
    except errors.ClceError as exc:
        raise Failed(f"{client.urls[0]}: {exc}") from None


def reference(x: np.ndarray, t: np.ndarray) -> tuple[float, np.ndarray]:
    """torch.nn.functional.cross_entropy's mean loss and its input gradient, in float64."""
    x = x.astype(np.float64)
    z = x - x.max(axis=1, keepdims=True)
    p = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
    rows = np.arange(len(t))
    loss = float(-np.log(p[rows, t]).mean())
    grad = p.copy()
    grad[rows, t] -= 1.0
    return loss, grad / len(t)


def check(args: argparse.Namespace, out: Callable[[str], None]) -> None:
    t0 = time.monotonic()
    with _client(args) as client:
        url = client.urls[0]
        info = _info(client)
        if info.get("name") != "clce":
            raise Failed(f"{url} answered /v1/info, but not as a clce server: {str(info)[:200]}")
        out(f"server     clce {info.get('version')} (protocol {info.get('protocol')}) at {url}, "
            f"answered in {1e3 * (time.monotonic() - t0):.0f} ms")
        if not info.get("ready"):
            try:
                client._request("GET", "/readyz")
                reason = "it became ready just now: run clce check again"
            except errors.ClceError as exc:
                reason = str(exc)
            raise Failed(f"{url} is not ready: {reason}")
        devices = info.get("devices")
        if devices is None:
            out("device     (not shown without a key: set CLCE_API_KEY or --api-key)")
        for d in devices or []:
            out(f"device     {d.get('name')} [{d.get('platform')}, {d.get('kind')}]")
        # what a big call from this host would use: asking makes the client decide (and register
        # a small region, when shared memory is possible)
        try:
            client.empty((1,), np.float32)
        except errors.ClceError as exc:
            raise Failed(f"{url}: shared memory: {exc}") from None
        d = client.describe()
        via = f"shared memory ({d['socket']})" if d["transport"] == "shm" else "TCP"
        out(f"transport  {via}: {d['reason']}")
        x, t = np.array(CHECK_INPUT, np.float32), np.array(CHECK_TARGET)
        want_loss, want_grad = reference(x, t)
        times = []
        for _ in range(6):    # the first call opens connections: timed, not counted
            c0 = time.perf_counter()
            try:
                res = client.cross_entropy(x, t, return_grad=True)
            except errors.ClceError as exc:
                raise Failed(f"{url}: the check's call failed: {type(exc).__name__}: {exc}") from None
            times.append(time.perf_counter() - c0)
        loss, grad = float(res.loss), np.asarray(res.grad, np.float64)
        # float32 arithmetic against float64: a few units in the last place
        if abs(loss - want_loss) > 1e-6 * abs(want_loss) or not np.allclose(grad, want_grad, rtol=1e-5, atol=1e-7):
            raise Failed(f"{url}: wrong answer: loss {loss!r} and grad {grad.tolist()}, expected {want_loss!r} "
                         f"and {want_grad.tolist()}")
        out(f"call       2x3 loss + grad = {loss:.6f}, as numpy's float64 reference; "
            f"{1e3 * statistics.median(times[1:]):.2f} ms median of 5 (first {1e3 * times[0]:.1f} ms)")
    out(f"ok         in {time.monotonic() - t0:.1f} s")


def info(args: argparse.Namespace, out: Callable[[str], None]) -> None:
    with _client(args) as client:
        out(json.dumps(_info(client), indent=2))


def _shape(text: str) -> tuple[int, int]:
    try:
        n, c = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected ROWSxCLASSES, as 1024x32000, got {text!r}") from None
    if n < 1 or c < 1:
        raise argparse.ArgumentTypeError(f"rows and classes must be >= 1, got {text!r}")
    return n, c


def _progress(total: int, desc: str) -> Any:
    """tqdm's bar when tqdm is installed (the bench extra), else a bar of our own on stderr."""
    try:
        from tqdm import tqdm
    except ImportError:
        return _Bar(total, desc)
    return tqdm(total=total, desc=desc, unit="call", file=sys.stderr, leave=False)


class _Bar:
    def __init__(self, total: int, desc: str):
        self.total, self.desc, self.n = total, desc, 0

    def update(self, k: int = 1) -> None:
        self.n += k
        done = 30 * self.n // self.total
        sys.stderr.write(f"\r{self.desc} [{'#' * done}{'.' * (30 - done)}] {self.n}/{self.total}")
        sys.stderr.flush()

    def close(self) -> None:
        sys.stderr.write("\r" + " " * (len(self.desc) + 45) + "\r")
        sys.stderr.flush()


def bench(args: argparse.Namespace, out: Callable[[str], None]) -> None:
    try:
        import torch
        import torch.nn.functional as F
    except ImportError:
        raise Failed("clce bench compares with torch on this host: install it (pip install '.[torch]' "
                     "in the clce checkout)") from None
    import clce_client

    n, c = args.shape
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(n, c, generator=gen) * 2
    target = torch.randint(0, c, (n,), generator=gen)
    with Client(args.url, api_key=args.api_key, transport=args.transport,
                timeout=httpx.Timeout(120, connect=CONNECT_TIMEOUT_S)) as client:
        _info(client)                       # unreachable: say so now, not after the torch run
        loss_fn = clce_client.CrossEntropyLoss(client=client)

        def clce_call() -> torch.Tensor:
            x = logits.clone().requires_grad_()
            loss_fn(x, target).backward()
            return x.grad

        def torch_call() -> torch.Tensor:
            x = logits.clone().requires_grad_()
            F.cross_entropy(x, target).backward()
            return x.grad

        try:
            got, want = clce_call(), torch_call()
        except errors.ClceError as exc:
            raise Failed(f"{client.urls[0]}: {type(exc).__name__}: {exc}") from None
        if not torch.allclose(got, want, rtol=1e-4, atol=1e-6):
            raise Failed(f"the gradients differ from torch's by up to {(got - want).abs().max().item():.3g}")
        d = client.describe()
        out(f"clce bench: {n}x{c} float32, the README's call (CrossEntropyLoss forward + backward) against "
            f"local torch; {args.blocks} blocks of {args.calls} calls per side, the first of each dropped")
        out(f"transport   {'shared memory' if d['transport'] == 'shm' else 'TCP'} ({d['reason']})")
        times: dict[str, list[float]] = {"torch": [], "clce": []}
        bar = _progress(2 * args.blocks * args.calls, "clce bench")
        try:
            for _ in range(args.blocks):
                for name, call in (("torch", torch_call), ("clce", clce_call)):   # side by side
                    block = []
                    for _ in range(args.calls):
                        t0 = time.perf_counter()
                        call()
                        block.append(time.perf_counter() - t0)
                        bar.update(1)
                    times[name] += block[1:] if len(block) > 1 else block
        finally:
            bar.close()
    t_torch, t_clce = statistics.median(times["torch"]), statistics.median(times["clce"])
    out(f"torch       {1e3 * t_torch:.2f} ms (median)")
    out(f"clce        {1e3 * t_clce:.2f} ms (median)")
    out(f"clce/torch  {t_clce / t_torch:.2f}x (clce's time over torch's: lower is better)")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="clce", description="Check, describe and time a clce server.",
                                epilog="Exit status: 0 when all went well, 1 saying why when not.")
    p.add_argument("--version", action="version", version=f"clce {__version__}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("url", nargs="?", default=None,
                        help=f"the server's base URL (default: CLCE_URL, else {DEFAULT_URL})")
    common.add_argument("--api-key", default=None, help="the key to send (default: CLCE_API_KEY)")
    common.add_argument("--transport", choices=("auto", "shm", "tcp"), default=None,
                        help="auto: shared memory when the server is on this host and allows it (default: "
                             "CLCE_TRANSPORT, else auto)")
    common.add_argument("-v", "--verbose", action="store_true", help="show the client's log (logger clce) at INFO")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sub.add_parser("check", parents=[common], help="reachable, ready, transport, and one exact small call",
                   description="Is the server reachable and ready, which transport would this host use, "
                               "and does one small call answer exactly (with its timing)?")
    sub.add_parser("info", parents=[common], help="the server's /v1/info as your key may see it",
                   description="Print the server's /v1/info document, as your key may see it.")
    b = sub.add_parser("bench", parents=[common], help="the README's call against local torch, with a ratio",
                       description="Time the README's call (CrossEntropyLoss forward + backward) on this host "
                                   "against local torch, side by side, and print clce's time over torch's.")
    b.add_argument("--shape", type=_shape, default=(1024, 32000), help="ROWSxCLASSES (default 1024x32000)")
    b.add_argument("--blocks", type=int, default=5, help="blocks per side, taking turns (default 5)")
    b.add_argument("--calls", type=int, default=3, help="calls per block; the first is dropped (default 3)")
    return p


COMMANDS = {"check": check, "info": info, "bench": bench}


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    if args.verbose:      # the client's log only, not httpx's line per request
        logging.getLogger("clce").setLevel(logging.INFO)
    try:
        COMMANDS[args.command](args, lambda line: print(line, flush=True))
    except Failed as exc:
        print(f"clce {args.command}: {exc}", file=sys.stderr, flush=True)
        return 1
    except ValueError as exc:    # a malformed URL, a bad CLCE_* value
        print(f"clce {args.command}: {exc}", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
