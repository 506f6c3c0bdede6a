"""The cost of the causal LM shift: on the client (a shifted copy of the logits) or on the server.

A language model's loss scores position t of the (B, T, V) logits against label t + 1. Two ways
to get loss and gradient from a clce server, both with autograd (loss.backward() fills the
(B, T, V) logits' .grad, as a training step needs):

  client shift   xs = logits[..., :-1, :].contiguous().view(-1, V)   (a copy of the whole logits)
                 loss = client.cross_entropy(xs, labels[..., 1:].reshape(-1)); loss.backward()
                 (autograd's slice backward then builds the (B, T, V) gradient: zeros + a copy)
  server shift   loss = client.cross_entropy(logits, labels, shift=1); loss.backward()
                 (sent as they are; the gradient comes back (B, T, V) with zero rows)
  copy only      logits[..., :-1, :].contiguous() alone: the copy the server shift avoids

Starts a server with limits raised for 1 GiB requests (or uses --url), checks both ways give the
same loss and gradient, then runs them round-robin (best of --repeat, wall clock) and prints the
ratio. Client and server share this machine's cores.

    python bench/bench_shift.py                  # (8, 1024, 32000) float32, 3 repetitions
    python bench/bench_shift.py --shape 4x512x32000 --repeat 5
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (puts the repo on sys.path)

GiB = 1 << 30


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", default="8x1024x32000", help="BxTxV (default 8x1024x32000)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--url", help="a running server (its limits must admit the request)")
    ap.add_argument("--out", type=Path, default=common.RESULTS)
    args = ap.parse_args()

    import torch

    import clce_client

    B, T, V = (int(d) for d in args.shape.lower().split("x"))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, T, V, generator=g).mul_(2).requires_grad_()
    y = torch.randint(0, V, (B, T), generator=g)
    y[:, :5] = -100                                   # a masked prompt
    nbytes = x.numel() * x.element_size()

    server = None
    if args.url is None:
        server = common.ServerProcess(
            ["--max-request-bytes", str(4 * GiB), "--max-inflight-bytes", str(16 * GiB)],
            env={"CLCE_TENANT_MAX_INFLIGHT_BYTES": str(16 * GiB)}, log_path=args.out / "shift-server.log").start()
    url = args.url or server.url
    try:
        with clce_client.Client(url, timeout=600) as client:
            def client_shift():
                x.grad = None
                xs = x[..., :-1, :].contiguous().view(-1, V)
                loss = client.cross_entropy(xs, y[..., 1:].reshape(-1))
                loss.backward()
                return loss

            def server_shift():
                x.grad = None
                loss = client.cross_entropy(x, y, shift=1)
                loss.backward()
                return loss

            def copy_only():
                with torch.no_grad():
                    x[..., :-1, :].contiguous()

            # the same loss and gradient both ways
            la = client_shift().item()
            ga = x.grad
            lb = server_shift().item()
            gb = x.grad
            max_diff = (ga - gb).abs().max().item()
            del ga, gb
            x.grad = None
            assert abs(la - lb) <= 1e-6 * abs(la) and max_diff <= 1e-7, (la, lb, max_diff)

            samples = common.round_robin({"client shift": lambda: (client_shift(), None)[1],
                                          "server shift": lambda: (server_shift(), None)[1],
                                          "copy only": copy_only}, args.repeat, warmup=0)
            x.grad = None
    finally:
        if server is not None:
            server.stop()

    best = {k: min(v) for k, v in samples.items()}
    ratio = best["client shift"] / best["server shift"]
    common.print_table(
        f"causal LM shift at ({B}, {T}, {V}) float32 ({nbytes / GiB:.2f} GiB of logits), loss + backward, "
        f"best of {args.repeat}, interleaved",
        ["method", "best ms", "median ms", "vs server shift"],
        [[k, common.fmt_ms(best[k]), common.fmt_ms(common.stats(v)["median"]),
          common.fmt_ratio(best[k] / best["server shift"])] for k, v in samples.items()])
    print(f"client-side shift + copy / server-side shift: {ratio:.2f}x "
          f"(saves {1e3 * (best['client shift'] - best['server shift']):.0f} ms per step; "
          f"loss {lb:.6f}, max |grad diff| {max_diff:.1e})")
    path = common.write_json(args.out / "shift.json", {
        "shape": [B, T, V], "dtype": "float32", "repeat": args.repeat, "samples": samples, "best": best,
        "ratio_client_over_server": ratio, "loss": lb, "max_grad_diff": max_diff, "machine": common.machine_info()})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
