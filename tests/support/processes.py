"""Child processes that cannot outlive their test.

`run_tree` runs a command in a process group of its own and, on a timeout, kills the whole group:
`subprocess.run(timeout=...)` kills only the direct child, so a program that spawns workers (DDP's
ranks, say) left them running after the test had failed. After a normal exit it reports any
process still in the group: a program that leaves workers behind fails its test too.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Sequence


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # a process of another user has the id now: not ours
        return False
    return True


def kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def run_tree(cmd: Sequence[str], *, timeout: float, linger_s: float = 10.0, **popen_kwargs) -> subprocess.CompletedProcess:
    """Run `cmd` to completion in a new process group, capturing text output.

    Raises `subprocess.TimeoutExpired` (after killing the group) when it runs past `timeout`, and
    `AssertionError` when processes of its group are still alive `linger_s` after it exited (they
    are killed first, so nothing outlives the test either way)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, **popen_kwargs)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_group(proc.pid)
        out, err = proc.communicate()
        raise subprocess.TimeoutExpired(cmd, timeout, output=out, stderr=err) from None
    deadline = time.monotonic() + linger_s
    while group_alive(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    if group_alive(proc.pid):
        kill_group(proc.pid)
        raise AssertionError(f"{cmd[-1]} exited with {proc.returncode} but left processes of its group running "
                             f"{linger_s:.0f} s later (killed now)\n{out[-2000:]}\n{err[-3000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)
