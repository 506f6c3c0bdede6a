"""The README's curl example, checked against a running server as scripts/check-served.py checks it
(tests/project/test_readme.py against the checkout, tests/project/test_wheel.py against the wheel)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[2]


def check_curl_example(url: str) -> None:
    """The README's curl example, run against `url` as written (only the address changed), prints
    exactly the answer shown under it (scripts/check-served.py compares the same way), and that
    answer is torch's loss and gradient. tests/project/test_wheel.py runs it against the installed wheel."""
    command, shown = check_served().readme_curl_example()
    out = subprocess.run(["bash", "-c", command.replace("localhost:8000", url.removeprefix("http://"))],
                         capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == shown
    body = json.loads(shown)
    x = torch.tensor([[2.0, 0.5, -1.0], [0.1, 0.2, 3.0]], requires_grad=True)
    loss = F.cross_entropy(x, torch.tensor([0, 2]))
    loss.backward()
    assert body["loss"] == pytest.approx(loss.item(), rel=1e-6)
    np.testing.assert_allclose(body["grad"], x.grad.numpy(), rtol=1e-5, atol=1e-7)


def check_served():
    import importlib.util

    spec = importlib.util.spec_from_file_location("check_served", ROOT / "scripts" / "check-served.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
