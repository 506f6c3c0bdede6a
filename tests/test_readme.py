"""The README's examples run as written against a real server (tests/serverproc.py)."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from serverproc import server_fixture  # noqa: E402

README = (Path(__file__).parent.parent / "README.md").read_text()
server = server_fixture()


def section(title: str) -> str:
    start = README.index(f"## {title}")
    end = README.find("\n## ", start + 1)
    return README[start:end if end > 0 else None]


def blocks(text: str, lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", text, flags=re.S)


def test_setup_commands_are_the_ones_ci_runs():
    cmds = blocks(section("Set-up: two commands (fresh Debian or Ubuntu)"), "sh")
    assert len(cmds) == 2
    ci = (Path(__file__).parent.parent / ".ci" / "run").read_text()
    assert cmds[1].strip() in ci
    # the run command, in its two parts (CI starts the server in the background and checks it)
    assert cmds[0].strip().startswith("scripts/setup.sh server")
    for part in cmds[0].split("&&"):
        assert part.strip() in ci


def test_python_examples_run(server, tmp_path):
    code = "\n".join(blocks(section("Use it"), "python"))
    script = tmp_path / "example.py"
    script.write_text(code)
    env = {**os.environ, "CLCE_URL": server.url}
    out = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "(8, 32000)" in out.stdout and "(8,)" in out.stdout


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_curl_example_gives_torchs_numbers(server):
    check_curl_example(server.url)


def check_curl_example(url: str) -> None:
    """The README's curl example, run against `url`, answers torch's loss and gradient."""
    (cmd,) = [b for b in blocks(section("Use it"), "sh") if "curl" in b]
    cmd = cmd.split("\n#")[0].replace("localhost:8000", url.removeprefix("http://"))
    out = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, timeout=60)
    body = json.loads(out.stdout)
    x = torch.tensor([[2.0, 0.5, -1.0], [0.1, 0.2, 3.0]], requires_grad=True)
    loss = F.cross_entropy(x, torch.tensor([0, 2]))
    loss.backward()
    assert body["loss"] == pytest.approx(loss.item(), rel=1e-6)
    np.testing.assert_allclose(body["grad"], x.grad.numpy(), rtol=1e-5, atol=1e-7)
