"""scripts/gpu_runner.py end to end, on PoCL and under Oclgrind: the same program a lent GPU runs,
only the device selector differs. Each run registers (or reports it cannot register) the NVIDIA
ICD, installs carried wheels with pip, runs kernel tests and the benchmark on the device, and
writes its JSON and plots; the test reads them back."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
RUNNER = ROOT / "scripts" / "gpu_runner.py"
sys.path.insert(0, str(RUNNER.parent))
import gpu_runner  # noqa: E402

PNG = b"\x89PNG\r\n\x1a\n"


def make_wheel(folder: Path, module: str = "clce_runner_probe") -> Path:
    """A minimal pure-Python wheel: what a carried wheel is, for pip to install for real."""
    dist = f"{module}-1.0"
    files = {f"{module}.py": b"VALUE = 19\n",
             f"{dist}.dist-info/METADATA": f"Metadata-Version: 2.1\nName: {module}\nVersion: 1.0\n".encode(),
             f"{dist}.dist-info/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    record = []
    for name, data in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.append(f"{name},sha256={digest},{len(data)}")
    record.append(f"{dist}.dist-info/RECORD,,")
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{module}-1.0-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as z:
        for name, data in files.items():
            z.writestr(name, data)
        z.writestr(f"{dist}.dist-info/RECORD", "\n".join(record) + "\n")
    return path


def test_icd_registered_where_missing_and_left_alone_where_present(tmp_path):
    drivers = tmp_path / "nvidia" / "lib64"
    drivers.mkdir(parents=True)
    env: dict = {}
    vendors = tmp_path / "vendors"
    got = gpu_runner.register_icd(vendors, [str(tmp_path / "none"), str(drivers)], env)
    assert got["status"] == "skipped" and "libnvidia-opencl.so.1" in got["reason"]
    assert not (vendors / "nvidia.icd").exists()
    (drivers / "libnvidia-opencl.so.1").write_bytes(b"")
    got = gpu_runner.register_icd(vendors, [str(tmp_path / "none"), str(drivers)], env)
    assert got["status"] == "registered"
    assert (vendors / "nvidia.icd").read_text() == f"{drivers / 'libnvidia-opencl.so.1'}\n"
    assert gpu_runner.register_icd(vendors, [str(drivers)], env)["status"] == "present"
    assert "OCL_ICD_VENDORS" not in env
    blocked = tmp_path / "blocked"
    blocked.write_text("a file where the vendors folder would go")
    got = gpu_runner.register_icd(blocked / "vendors", [str(drivers)], env)
    assert got["status"] == "registered-private"
    assert (Path(env["OCL_ICD_VENDORS"]) / "nvidia.icd").read_text().strip() == str(drivers / "libnvidia-opencl.so.1")


def _run(tmp_path: Path, selector: str, wrapper: list[str], shapes: str, linear_shape: str = "200x32x300") -> dict:
    out = tmp_path / "out"
    wheels = tmp_path / "wheels"
    make_wheel(wheels)
    drivers = tmp_path / "no-driver"
    drivers.mkdir()
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    cmd = [*wrapper, sys.executable, str(RUNNER), "--device", selector, "--out", str(out),
           "--wheels", str(wheels), "--site", str(tmp_path / "site"), "--icd-dir", str(tmp_path / "vendors"),
           "--driver-dirs", str(drivers), "--tests", "tests/cross_entropy/test_kernels_common.py",
           "--shapes", shapes, "--repeat", "2", "--linear-shape", linear_shape, "--compare-repeat", "2"]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    doc = json.loads((out / "runner.json").read_text())
    steps = doc["steps"]
    assert steps["icd"]["status"] == "skipped" and "no NVIDIA driver" in steps["icd"]["reason"]
    assert steps["wheels"]["status"] == "installed"
    assert steps["wheels"]["wheels"] == ["clce_runner_probe-1.0-py3-none-any.whl"]
    assert (tmp_path / "site" / "clce_runner_probe.py").read_text() == "VALUE = 19\n"
    assert steps["tests"]["status"] == "passed" and " passed" in steps["tests"]["summary"]
    assert 'failures="0"' in (out / "tests.xml").read_text() and 'errors="0"' in (out / "tests.xml").read_text()
    assert steps["bench"]["status"] == "ran"
    assert steps["compare"]["status"] == "skipped" and "cuda" in steps["compare"]["reason"].lower()
    bench = json.loads((out / "cross_entropy.json").read_text())
    assert all(rec["check_fused"]["ok"] for rec in bench["results"])   # the bench checks against torch
    for name in ("runner.png", "cross_entropy.png"):
        assert (out / name).read_bytes()[:8] == PNG
    # the fused linear cross-entropy: clce on the device, checked against torch (on the CPU here;
    # CUDA and Liger-Kernel where torch sees a GPU)
    lin = steps["linear"]
    assert lin["status"] == "ran" and lin["shape"] == [int(v) for v in linear_shape.split("x")]
    assert lin["dtype"] == "bfloat16" and lin["clce"]["median_s"] > 0 and lin["clce"]["kernel_median_s"] > 0
    assert lin["check"]["loss_rel_diff"] < 8e-3                      # the loss is bf16, as the hidden
    assert lin["check"]["grad_hidden_max_abs_diff"] < 1e-2 * lin["check"]["grad_hidden_max_abs"] + 1e-6
    assert lin["cuda"]["status"] == "skipped" and "cuda" in lin["cuda"]["reason"].lower()
    return doc


def test_runner_end_to_end_on_pocl(tmp_path):
    doc = _run(tmp_path, "pocl", [], "64x1000,64x1000:bf16,2x5x8x8")
    dev = doc["steps"]["device"]
    assert dev["selected"]["kind"] == "cpu" and dev["selected"] == dev["default"]
    rows = doc["summary"]
    assert [(r["label"], r["dtype"]) for r in rows] == [("64x1000", "float32"), ("64x1000", "bfloat16"),
                                                         ("2x5x8x8", "float32")]
    for r in rows:   # a kernel moves at least what a copy moves: it cannot beat the copy by much
        assert r["clce_kernel_ms"] > 0 and r["opencl_copy_gbs"] > 0
        assert 0 < r["clce_pct_of_opencl_copy"] < 400


@pytest.mark.skipif(shutil.which("oclgrind") is None, reason="oclgrind is not installed (scripts/setup.sh dev)")
def test_runner_end_to_end_under_oclgrind(tmp_path):
    """The GPU kernel shape (Oclgrind is a "gpu" device: ce_rows_group) through the whole runner."""
    doc = _run(tmp_path, "oclgrind", [shutil.which("oclgrind")], "8x100,8x100:bf16", linear_shape="64x16x100")
    sel = doc["steps"]["device"]["selected"]
    assert sel["name"] == "Oclgrind Simulator" and sel["tuning"]["launch"]["rows"] == "group"
    assert sel["tuning"]["read_off_device"]["local_size"]["chosen"] == sel["tuning"]["launch"]["local_size"]
    lin = doc["steps"]["linear"]["clce"]   # the GPU's linear path: discrete memory, gemm_local
    assert lin["memory"] == "discrete" and lin["gemm"]["dh"]["kernel"] == "gemm_local"
    assert lin["device_bytes"] > 0


def test_runner_fails_and_says_why_when_the_device_is_not_there(tmp_path):
    """A lent machine whose driver the loader does not see must give a failed run that says so,
    not an empty success."""
    out = tmp_path / "out"
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    r = subprocess.run([sys.executable, str(RUNNER), "--device", "no-such-gpu", "--out", str(out),
                        "--wheels", str(tmp_path / "none"), "--icd-dir", str(tmp_path / "vendors"),
                        "--driver-dirs", str(tmp_path), "--tests", ""],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 1, r.stdout + r.stderr
    doc = json.loads((out / "runner.json").read_text())
    assert doc["steps"]["wheels"]["status"] == "skipped"
    assert doc["steps"]["device"]["status"] == "error"
    assert "no OpenCL device matches" in doc["steps"]["device"]["error"]
    assert doc["steps"]["bench"]["status"] == "error" and "tests" not in doc["steps"]
    assert "failed steps: ['device', 'bench']" in r.stdout


def test_shell_entry_point_runs_the_linear_comparison_in_one_call(tmp_path):
    """scripts/gpu_runner.sh as a GPU session calls it (`run`, results into $OUT), here on PoCL
    and small shapes: one call gives the cross-entropy bench and the linear comparison."""
    sh = ROOT / "scripts" / "gpu_runner.sh"
    assert subprocess.run(["bash", "-n", str(sh)]).returncode == 0
    assert gpu_runner.LINEAR_SHAPE == "8192x4096x128256"          # the shape the GPU call compares at
    out = tmp_path / "out"
    env = {**os.environ, "OUT": str(out), "PYTHONPATH": str(ROOT)}
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])   # python3: this venv's
    r = subprocess.run(["bash", str(sh), "run", "--device", "pocl", "--tests", "", "--wheels", str(tmp_path / "none"),
                        "--icd-dir", str(tmp_path / "vendors"), "--driver-dirs", str(tmp_path),
                        "--shapes", "16x300", "--repeat", "2", "--linear-shape", "128x32x200", "--compare-repeat", "2"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    doc = json.loads((out / "runner.json").read_text())
    assert doc["steps"]["linear"]["status"] == "ran" and doc["steps"]["bench"]["status"] == "ran"
    assert "[runner] linear 128x32x200 bfloat16: clce" in r.stdout
    assert bash_usage_error(sh)


def bash_usage_error(sh: Path) -> bool:
    r = subprocess.run(["bash", str(sh)], capture_output=True, text=True)
    return r.returncode == 2 and "usage:" in r.stderr
