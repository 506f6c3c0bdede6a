"""The integration examples in examples/ (each one shown by a page in docs/integrations/) run as
they are, as subprocesses against a real server (CLCE_URL), and their results are checked here:
the steps ran and the loss stayed within the stated relative deviation from the local loss."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest
from tests.support.processes import run_tree  # noqa: E402
from tests.support.serverproc import REPO, server_fixture  # noqa: E402

server = server_fixture()

# example -> (frameworks it needs, steps it must report, largest relative deviation allowed)
EXAMPLES = {
    "transformers_trainer.py": (("torch", "transformers", "accelerate"), 4, 1e-5),
    "transformers_linear_ce.py": (("torch", "transformers", "accelerate"), 4, 1e-5),
    "lightning_module.py": (("torch", "lightning"), 6, 1e-5),
    "compile_loss.py": (("torch",), 4, 1e-5),
    "autocast_loss.py": (("torch",), 4, 1e-4),
    "ddp_train.py": (("torch",), 4, 1e-5),
}


def test_every_example_is_tested_and_documented():
    assert sorted(EXAMPLES) == sorted(p for p in os.listdir(REPO / "examples") if p.endswith(".py"))
    pages = "".join(p.read_text() for p in (REPO / "docs" / "integrations").glob("*.md"))
    for name in EXAMPLES:
        assert f"examples/{name}" in pages, f"no page in docs/integrations/ shows examples/{name}"


@pytest.mark.parametrize("name", list(EXAMPLES))
def test_example_runs_and_tracks_the_local_loss(server, name):
    needs, steps, tol = EXAMPLES[name]
    for module in needs:
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"{module} is not installed")
    env = {**os.environ, "CLCE_URL": server.url, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    # its own process group, killed whole on a timeout: DDP's ranks must not outlive the test
    proc = run_tree([sys.executable, str(REPO / "examples" / name)], cwd=REPO, env=env, timeout=240)
    assert proc.returncode == 0, f"{name} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert len(lines) == 1, proc.stdout
    result = json.loads(lines[0][len("RESULT "):])
    print(name, result)
    assert result["steps"] == steps
    assert 0 <= result["max_rel_loss_dev"] < tol


def test_integrations_import_their_frameworks_lazily():
    """The client installs with numpy, msgpack and httpx alone: importing it, or the transformers
    hooks, imports neither torch nor any framework."""
    code = ("import sys, clce_client, clce_client.transformers; "
            "print(sorted(m for m in ('torch', 'transformers', 'lightning', 'accelerate') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
