"""What users install is what works: the sdist and the wheel hold every package, kernel and static
file of the tree, and the wheel, installed into a fresh virtual environment (not editable, no
checkout on sys.path), serves the README's examples.

An editable install (what `scripts/setup.sh dev` makes) finds every module in the checkout, so it
hid a subpackage missing from the wheel: this is the test that would have caught it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
import venv
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from tests.support.serverproc import REPO, ServerProcess  # noqa: E402
from tests.support.readme_checks import check_curl_example  # noqa: E402

pytestmark = pytest.mark.timeout(600)


def shipped_files() -> set[str]:
    """Every file a user needs, relative to the repository root: the modules of every package
    (a directory with an __init__.py) under clce_*, the kernels and the status page."""
    files: set[str] = set()
    for top in sorted(REPO.glob("clce_*")):
        for init in top.rglob("__init__.py"):
            pkg = init.parent
            files |= {p.relative_to(REPO).as_posix() for p in pkg.glob("*.py")}
    files |= {p.relative_to(REPO).as_posix() for p in (REPO / "clce_server" / "kernels").glob("*.cl")}
    files |= {p.relative_to(REPO).as_posix() for p in (REPO / "clce_server" / "static").iterdir() if p.is_file()}
    return files


@pytest.fixture(scope="module")
def dists(tmp_path_factory) -> dict[str, Path]:
    """The sdist, and the wheel built straight from the tree as `pip install .` builds it (a wheel
    built from the sdist can pick up files that a tree build leaves out). The tree is copied first:
    a build/ directory left in the checkout by an earlier build would leak stale files into it."""
    src = tmp_path_factory.mktemp("src") / "clce"
    shutil.copytree(REPO, src, ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".hypothesis", ".pytest_cache", "results"))
    out = tmp_path_factory.mktemp("dist")
    found = {}
    for kind, flag in (("sdist", "--sdist"), ("wheel", "--wheel")):
        proc = subprocess.run([sys.executable, "-m", "build", flag, "--outdir", str(out), str(src)],
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        (found[kind],) = out.glob("*.tar.gz" if kind == "sdist" else "*.whl")
    return found


def test_the_tree_has_what_a_wheel_must_hold():
    """The reference itself is not empty: the subpackage that was once missing is in it."""
    files = shipped_files()
    assert "clce_server/cross_entropy/operation.py" in files
    assert "clce_server/kernels/cross_entropy.cl" in files
    assert "clce_server/static/index.html" in files


def test_wheel_and_sdist_hold_every_package_kernel_and_static_file(dists):
    wheel_names = set(zipfile.ZipFile(dists["wheel"]).namelist())
    missing = sorted(shipped_files() - wheel_names)
    assert not missing, f"the wheel lacks {missing}"
    with tarfile.open(dists["sdist"]) as tar:
        # member names are <name>-<version>/<path>
        sdist_names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    missing = sorted(shipped_files() - sdist_names)
    assert not missing, f"the sdist lacks {missing}"


@pytest.fixture(scope="module")
def installed(dists, tmp_path_factory) -> Path:
    """A fresh virtual environment with the wheel and its server extra, as `pip install` gives a user."""
    env_dir = tmp_path_factory.mktemp("venv") / "clce"
    venv.create(env_dir, with_pip=True)
    py = env_dir / "bin" / "python"
    proc = subprocess.run([str(py), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                           f"{dists['wheel']}[server]"],
                          capture_output=True, text=True, timeout=480, env=_clean_env())
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return env_dir


def _clean_env() -> dict[str, str]:
    """The environment without anything that would put the checkout on sys.path."""
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}


@pytest.fixture(scope="module")
def installed_server(installed, tmp_path_factory):
    """`clce-server` from the fresh environment, started outside the checkout."""
    srv = ServerProcess(command=[str(installed / "bin" / "clce-server")],
                        cwd=tmp_path_factory.mktemp("run"), env={"PYTHONPATH": None, "VIRTUAL_ENV": None})
    with srv:
        yield srv


def test_installed_modules_come_from_the_environment_not_the_checkout(installed, tmp_path):
    code = ("import json, clce_client, clce_server, clce_server.routes, clce_wire; "
            "print(json.dumps([m.__file__ for m in (clce_client, clce_server, clce_server.routes, clce_wire)]))")
    out = subprocess.run([str(installed / "bin" / "python"), "-c", code], cwd=tmp_path, env=_clean_env(),
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    for path in json.loads(out.stdout):
        assert Path(path).resolve().is_relative_to(installed.resolve()), path


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_installed_server_answers_the_readmes_curl_example(installed_server):
    check_curl_example(installed_server.url)


def test_installed_client_gets_torchs_numbers_from_the_installed_server(installed, installed_server, tmp_path):
    rng = np.random.default_rng(7)
    logits = rng.standard_normal((6, 1001)).astype(np.float32)
    target = rng.integers(0, 1001, 6)
    np.save(tmp_path / "logits.npy", logits)
    np.save(tmp_path / "target.npy", target)
    code = (
        "import json, numpy as np, clce_client\n"
        "c = clce_client.Client()\n"
        "x, t = np.load('logits.npy'), np.load('target.npy')\n"
        "r = c.cross_entropy(x, t, label_smoothing=0.1, return_grad=True)\n"
        "np.save('grad.npy', r.grad)\n"
        "print(json.dumps({'loss': float(r.loss)}))\n"
    )
    env = {**_clean_env(), "CLCE_URL": installed_server.url}
    out = subprocess.run([str(installed / "bin" / "python"), "-c", code], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    x = torch.from_numpy(logits).requires_grad_()
    loss = F.cross_entropy(x, torch.from_numpy(target), label_smoothing=0.1)
    loss.backward()
    assert json.loads(out.stdout)["loss"] == pytest.approx(loss.item(), rel=1e-5)
    np.testing.assert_allclose(np.load(tmp_path / "grad.npy"), x.grad.numpy(), rtol=1e-4, atol=1e-7)
