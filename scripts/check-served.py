#!/usr/bin/env python3
"""Checks a running clce server the way the README shows it: waits for /readyz, runs the README's
curl example (only the address changed) and compares the answer, byte for byte, with the one the
README prints under it. Optionally checks a key-less metrics listener.

    scripts/check-served.py --url http://127.0.0.1:8000 [--wait 120] [--metrics http://127.0.0.1:9464]

Standard library only: CI runs it with the machine's python3, outside any virtual environment,
against the README's run command (.ci/run) and the CPU image (scripts/build-image.sh).
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def readme_curl_example() -> tuple[str, str]:
    """The curl command of the README's "Use it" section, and the answer printed below it: the
    first ```json block after the command's ```sh block."""
    text = README.read_text()
    start = text.index("## Use it")
    section = text[start:text.find("\n## ", start + 1)]
    blocks = re.findall(r"```(sh|json)\n(.*?)```", section, flags=re.S)
    (i,) = [k for k, (lang, body) in enumerate(blocks) if lang == "sh" and body.lstrip().startswith("curl")]
    lang, answer = blocks[i + 1]
    assert lang == "json", "the README's curl example must be followed by its answer, in a json block"
    return blocks[i][1].strip(), answer.strip()


def wait_ready(url: str, wait_s: float) -> float:
    t0 = time.monotonic()
    last = "no answer"
    while time.monotonic() - t0 < wait_s:
        try:
            with urllib.request.urlopen(url + "/readyz", timeout=2) as resp:
                if resp.status == 200:
                    return time.monotonic() - t0
        except (urllib.error.URLError, OSError) as exc:
            last = str(exc)
        time.sleep(0.25)
    sys.exit(f"check-served: {url} not ready within {wait_s:.0f} s (last: {last})")


def check_example(url: str) -> None:
    command, want = readme_curl_example()
    command = command.replace("localhost:8000", url.removeprefix("http://"))
    out = subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=60)
    if out.returncode != 0:
        sys.exit(f"check-served: the README's curl failed ({out.returncode}): {out.stderr}")
    if out.stdout.strip() != want:
        sys.exit(f"check-served: the server printed\n{out.stdout.strip()}\nbut the README shows\n{want}")


def check_metrics(url: str) -> None:
    with urllib.request.urlopen(url + "/metrics", timeout=10) as resp:
        text = resp.read().decode()
    if not re.search(r"^clce_requests_total\{", text, flags=re.M):
        sys.exit("check-served: the metrics listener has no clce_requests_total series")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", required=True)
    ap.add_argument("--wait", type=float, default=120.0, help="seconds to wait for /readyz")
    ap.add_argument("--metrics", help="base URL of a key-less metrics listener to check")
    args = ap.parse_args()
    ready_s = wait_ready(args.url, args.wait)
    print(f"check-served: ready after {ready_s:.1f} s", flush=True)
    check_example(args.url)
    print("check-served: the README's curl example answers as printed", flush=True)
    if args.metrics:
        check_metrics(args.metrics)
        print("check-served: the key-less metrics listener answers", flush=True)


if __name__ == "__main__":
    main()
