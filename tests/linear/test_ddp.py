"""DDP with 2 ranks (gloo) over the fused linear cross-entropy: tests/support/linear_ddp_worker.py, as a
subprocess against a real server, against local DDP in the same processes."""

import json
import os
import subprocess
import sys

from tests.support.serverproc import REPO, server_fixture

server = server_fixture()


def test_two_ranks_match_local_ddp(server, tmp_path):
    out = tmp_path / "result.json"
    proc = subprocess.run([sys.executable, str(REPO / "tests" / "support" / "linear_ddp_worker.py"), server.url, str(out)],
                          cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True,
                          timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(out.read_text())
    assert result["steps"] == 3 and result["ranks_agree"]
    assert result["max_rel_loss_dev"] < 1e-5 and result["max_rel_grad_dev"] < 1e-5, result
