"""Shared helpers for the clce benchmarks: timing, a server subprocess, tables, JSON and plots.

Two timing policies (this is often run on shared, noisy machines); compare methods by the ratios
of one run, not absolute numbers across runs:

* `blocks` (service calls, bench_e2e): each method runs a block of a few calls in a row, the first
  call of each block dropped, and the blocks of all methods take turns; a method's figure is the
  median of its blocks. Calls that move hundreds of MB leave the allocator and the page cache in a
  state the next call pays for: a local torch call right after remote ones paid up to 4x its
  steady time. Strict alternation (A B A B) charges that transition to whoever comes second; a
  block lets each method reach its own steady state, as it would in a training loop.
* `round_robin` (kernels, device time): every method once untimed, then A B C A B C ... and the
  best (minimum) of each.
"""

from __future__ import annotations

import json
import os
import platform
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

REPO = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results"

if str(REPO) not in sys.path:   # `python bench/x.py` from the repo root, without installing
    sys.path.insert(0, str(REPO))


# ---------------------------------------------------------------------------------------------
# timing

def round_robin(methods: dict[str, Callable[[], float | None]], repeat: int, *,
                warmup: int = 1, progress: Any = None) -> dict[str, list[float]]:
    """Run each method ``warmup`` times untimed, then ``repeat`` rounds interleaved.

    A method returns the seconds it measured itself (e.g. from OpenCL profiling events) or None,
    in which case its wall-clock time (perf_counter around the call) is used. Returns all samples
    per method; callers usually take ``min``. ``progress`` (a tqdm bar) is advanced once per call.
    """
    for _ in range(warmup):
        for fn in methods.values():
            fn()
            if progress is not None:
                progress.update(1)
    samples: dict[str, list[float]] = {name: [] for name in methods}
    for _ in range(repeat):
        for name, fn in methods.items():
            t0 = time.perf_counter()
            got = fn()
            wall = time.perf_counter() - t0
            samples[name].append(float(got) if got is not None else wall)
            if progress is not None:
                progress.update(1)
    return samples


def blocks(methods: dict[str, Callable[[], float | None]], n_blocks: int = 3, calls: int = 3, *,
           progress: Any = None) -> dict[str, list[float]]:
    """Time each method in `n_blocks` blocks of `calls` calls in a row; the first call of a block is
    dropped (it pays for the method before it) and the block's figure is the mean of the rest.
    The order of the methods rotates from block to block. Returns each method's block figures
    (seconds); report their median (`stats`). A method may return the seconds it measured itself
    (else wall clock around the call). ``progress`` (a tqdm bar) advances once per call."""
    if calls < 2:
        raise ValueError("a block needs at least 2 calls (the first is dropped)")
    names = list(methods)
    samples: dict[str, list[float]] = {name: [] for name in names}
    for b in range(n_blocks):
        k = b % len(names)
        for name in names[k:] + names[:k]:
            fn = methods[name]
            times = []
            for _ in range(calls):
                t0 = time.perf_counter()
                got = fn()
                wall = time.perf_counter() - t0
                times.append(float(got) if got is not None else wall)
                if progress is not None:
                    progress.update(1)
            samples[name].append(sum(times[1:]) / (calls - 1))
    return samples


def stats(xs: Sequence[float]) -> dict[str, float]:
    """min (the figure reported), median and count of a list of seconds."""
    s = sorted(xs)
    return {"min": s[0], "median": s[len(s) // 2], "n": len(s)} if s else {"min": float("nan"),
                                                                          "median": float("nan"), "n": 0}


def fmt_ms(seconds: float | None) -> str:
    if seconds is None or seconds != seconds:
        return "-"
    ms = seconds * 1e3
    return f"{ms:.3f}" if ms < 1 else f"{ms:.2f}" if ms < 100 else f"{ms:.1f}"


def fmt_ratio(r: float | None) -> str:
    return "-" if r is None or r != r else f"{r:.2f}x"


def machine_info() -> dict[str, Any]:
    info: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    try:
        import torch

        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
    except ImportError:
        pass
    try:
        info["loadavg"] = os.getloadavg()
    except OSError:
        pass
    return info


# ---------------------------------------------------------------------------------------------
# output

def print_table(title: str, headers: list[str], rows: list[list[str]]) -> None:
    """A table with rich when it is installed, else plain aligned text."""
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        widths = [max(len(str(h)), *(len(str(r[i])) for r in rows)) if rows else len(str(h))
                  for i, h in enumerate(headers)]
        line = "  ".join("-" * w for w in widths)
        print(f"\n{title}")
        print("  ".join(str(h).rjust(w) for h, w in zip(headers, widths)))
        print(line)
        for r in rows:
            print("  ".join(str(c).rjust(w) for c, w in zip(r, widths)))
        return
    t = Table(title=title)
    for h in headers:
        t.add_column(h, justify="right")
    for r in rows:
        t.add_row(*(str(c) for c in r))
    Console().print(t)


def write_json(path: Path, doc: Any) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=2, default=_json_default) + "\n")
    return path


def _json_default(o: Any) -> Any:
    try:
        import numpy as np

        if isinstance(o, np.generic):
            return o.item()
        if isinstance(o, np.ndarray):
            return o.tolist()
    except ImportError:
        pass
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def bar_plot(path: Path, groups: list[str], series: dict[str, list[float | None]], *,
             title: str, ylabel: str = "time (ms), best of N, log scale", log: bool = True,
             annotate: dict[str, list[str]] | None = None) -> Path:
    """Grouped bars (one group per shape, one bar per method) saved as a PNG (Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    n = max(len(series), 1)
    width = 0.8 / n
    xs = np.arange(len(groups))
    fig, ax = plt.subplots(figsize=(max(7, 1.9 * len(groups) * max(1, n / 3)), 4.8))
    for i, (name, vals) in enumerate(series.items()):
        v = np.array([np.nan if x is None else x for x in vals], dtype=float)
        bars = ax.bar(xs + (i - (n - 1) / 2) * width, v, width, label=name)
        labels = (annotate or {}).get(name)
        if labels:
            for b, lab, val in zip(bars, labels, v):
                if lab and val == val:
                    ax.annotate(lab, (b.get_x() + b.get_width() / 2, val), ha="center", va="bottom",
                                fontsize=7, rotation=90, xytext=(0, 2), textcoords="offset points")
    ax.set_xticks(xs)
    ax.set_xticklabels(groups, fontsize=8)
    if log:
        ax.set_yscale("log")
        lo, hi = ax.get_ylim()
        ax.set_ylim(lo, hi * 4)          # room for the labels above the tallest bars
    else:
        ax.margins(y=0.15)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def verdict(ok: bool | None) -> str:
    return "n/a" if ok is None else ("PASS" if ok else "MISS")


# ---------------------------------------------------------------------------------------------
# server subprocess

def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """``python -m clce_server`` on a free loopback port; waits for GET /readyz == 200.

    Use as a context manager; stop() sends SIGTERM (the server drains), then kills after a grace
    period. The server's stderr goes to a log file (its path is in ``log_path``).
    """

    def __init__(self, args: Sequence[str] = (), *, env: dict[str, str] | None = None,
                 ready_timeout: float = 180.0, log_path: Path | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.args = list(args)
        self.env = {**os.environ, **(env or {})}
        self.env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), self.env.get("PYTHONPATH")) if p)
        self.ready_timeout = ready_timeout
        self.log_path = Path(log_path) if log_path else RESULTS / f"server-{self.port}.log"
        self.proc: subprocess.Popen | None = None
        self.startup_seconds: float | None = None

    def start(self) -> "ServerProcess":
        import httpx

        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "wb")
        cmd = [sys.executable, "-m", "clce_server", "--host", "127.0.0.1", "--port", str(self.port),
               *self.args]
        t0 = time.perf_counter()
        self.proc = subprocess.Popen(cmd, cwd=str(REPO), env=self.env, stdout=self._log,
                                     stderr=subprocess.STDOUT)
        deadline = time.monotonic() + self.ready_timeout
        last = "no answer"
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with {self.proc.returncode} before it was ready; "
                                   f"log: {self.log_path}\n{self.log_tail()}")
            try:
                r = httpx.get(self.url + "/readyz", timeout=2)
                if r.status_code == 200:
                    self.startup_seconds = time.perf_counter() - t0
                    return self
                last = f"{r.status_code} {r.text[:200]}"
            except httpx.HTTPError as exc:
                last = type(exc).__name__
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"the server was not ready within {self.ready_timeout}s ({last}); "
                           f"log: {self.log_path}\n{self.log_tail()}")

    def log_tail(self, n: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def stop(self, grace: float = 15.0) -> None:
        p = self.proc
        if p is not None and p.poll() is None:
            p.terminate()
            try:
                p.wait(grace)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)
        if getattr(self, "_log", None) is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> "ServerProcess":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def make_batch(n: int, v: int, seed: int):
    """Random fp32 logits (scale 2) and int64 class targets."""
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((n, v), dtype=np.float32) * 2).astype(np.float32)
    return x, rng.integers(0, v, n, dtype=np.int64)


def reference_mean_ce(x, t):
    """Independent numpy (fp64) reference: the mean loss, and the gradient of rows 0, n/2, n-1
    (returned as (loss, row indices, their gradient rows))."""
    n = x.shape[0]
    lse = np.empty(n)
    for s in range(0, n, 256):
        xd = x[s:s + 256].astype(np.float64)
        m = xd.max(1)
        lse[s:s + 256] = np.log(np.exp(xd - m[:, None]).sum(1)) + m
    loss = float(np.mean(lse - x[np.arange(n), t]))
    idx = np.unique(np.array([0, n // 2, n - 1]))
    g = np.exp(x[idx].astype(np.float64) - lse[idx, None])
    g[np.arange(len(idx)), t[idx]] -= 1
    return loss, idx, g / n


def request_segments(x, t, **options) -> list:
    """The msgpack segments `Client.cross_entropy(x, t, **options)` sends for numpy inputs, made by
    the client core's own I/O-free planning step (for load generators that replay the request)."""
    from clce_client.client import _BaseClient, _Call
    from clce_wire import protocol

    call = _Call(x, t, _BaseClient._options(options.pop("weight", None), options.pop("ignore_index", -100),
                                            options.pop("reduction", "mean"), options.pop("label_smoothing", 0.0),
                                            options))
    return protocol.encode_message(call.message)
