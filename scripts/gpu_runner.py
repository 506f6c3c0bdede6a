"""Everything a session with a lent GPU runs, in one call: the kernels' tests and speed on the GPU.

Steps, each recorded in runner.json (what ran, how long, what it gave, or why it was skipped):

  icd      register the NVIDIA OpenCL driver with the ICD loader: /etc/OpenCL/vendors/nvidia.icd
           naming libnvidia-opencl.so.1, written where it is missing (the driver's library is
           mounted on the GPU machines, its .icd file is not). Where that folder cannot be
           written, a private one is made and OCL_ICD_VENDORS points at it.
  wheels   install the wheels carried in .whl/ (pyopencl and its needs, liger-kernel) into
           /tmp/site, without an index or dependencies, and put that on the path.
  tests    the kernel tests (KERNEL_TESTS) with pytest on the chosen device: the tests'
           `cpu_device`/`engine` fixtures open the default device, so CLCE_TEST_DEVICE is not
           needed; the runner checks that the default device is the one selected.
  bench    bench/bench_cross_entropy.py on the device: fp32 and bf16, the default shapes,
           cross_entropy.json and cross_entropy.png.
  compare  the same shapes through torch's F.cross_entropy (forward + backward) and, when
           importable, Liger-Kernel's cross-entropy, on CUDA when torch sees a GPU; and the
           device's copy bandwidth (bytes read + written) as the reference: torch's copy_ on
           CUDA, and the OpenCL copy the bench measured. Medians of interleaved runs.
  linear   the fused linear cross-entropy at --linear-shape (default 8192x4096x128256, bf16: a
           Llama-3 head) in a child process: clce's LinearCrossEntropy on the device (a GPU takes
           the discrete-memory path: the weight resident, hidden chunks streamed, gradients read
           back once), wall time of a call from host arrays and its kernel time; then, where torch
           sees CUDA, torch's F.cross_entropy(F.linear(h, W).float(), y) and Liger-Kernel's
           LigerFusedLinearCrossEntropyLoss, forward + backward (CUDA events, interleaved rounds,
           first dropped); clce's loss and hidden gradient checked against torch's. A method that
           runs out of memory is recorded as such, the others still run.

Outputs in --out: runner.json, runner.png (times per shape and method), cross_entropy.json,
cross_entropy.png, tests.log, tests.xml.

The runner is tested end to end on PoCL and under Oclgrind (tests/project/test_gpu_runner.py); only the
device selector differs from the GPU run. How a session runs it on the lent GPU (the device
tool's `run`, from the repository root, with the wheels fetched first by
`scripts/gpu_runner.sh fetch`): see bench/README.md, "The GPU runner".

    python scripts/gpu_runner.py --device nvidia --out "$OUT"
    python scripts/gpu_runner.py --device pocl --out /tmp/r --shapes 64x1000,64x1000:bf16 --repeat 3
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
KERNEL_TESTS = ["tests/cross_entropy/test_kernel_parity.py", "tests/cross_entropy/test_inplace_grad.py",
                "tests/cross_entropy/test_kernels_common.py", "tests/linear/test_gemm.py", "tests/linear/test_engine.py"]
#: the fused linear cross-entropy's comparison shape: N x H x V (Llama 3's head at 8192 tokens)
LINEAR_SHAPE = "8192x4096x128256"
ICD_LIBRARY = "libnvidia-opencl.so.1"
#: where GPU machines mount the driver's libraries (the loader's own path is searched first)
DRIVER_DIRS = ["/usr/local/nvidia/lib64", "/usr/local/nvidia/lib", "/usr/lib/x86_64-linux-gnu",
               "/usr/lib64", "/usr/lib"]


# ---------------------------------------------------------------------------------------------
# steps

def find_driver_library(dirs: list[str], name: str = ICD_LIBRARY) -> str | None:
    """The path of the NVIDIA OpenCL library in `dirs`, else None."""
    for d in dirs:
        p = Path(d) / name
        if p.exists():
            return str(p)
    return None


def loader_dirs() -> list[str]:
    """The folders of the libraries the dynamic loader knows (`ldconfig -p`), where it runs."""
    try:
        out = subprocess.run(["ldconfig", "-p"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return sorted({str(Path(line.rsplit("=>", 1)[1].strip()).parent)
                   for line in out.splitlines() if ICD_LIBRARY in line and "=>" in line})


def register_icd(vendors_dir: Path, library_dirs: list[str], env: dict) -> dict:
    """Write vendors_dir/nvidia.icd naming the driver's OpenCL library, if missing. Where
    vendors_dir cannot be written, use a private folder and point OCL_ICD_VENDORS at it (in `env`,
    which the later steps inherit)."""
    icd = vendors_dir / "nvidia.icd"
    if icd.exists():
        return {"status": "present", "path": str(icd), "content": icd.read_text().strip()}
    lib = find_driver_library(library_dirs)
    if lib is None:
        return {"status": "skipped", "reason": f"no {ICD_LIBRARY} in {library_dirs}: no NVIDIA driver here"}
    try:
        vendors_dir.mkdir(parents=True, exist_ok=True)
        icd.write_text(lib + "\n")
        return {"status": "registered", "path": str(icd), "content": lib}
    except OSError as exc:
        private = Path(os.environ.get("TMPDIR", "/tmp")) / "clce-icd-vendors"
        private.mkdir(parents=True, exist_ok=True)
        (private / "nvidia.icd").write_text(lib + "\n")
        env["OCL_ICD_VENDORS"] = str(private)
        return {"status": "registered-private", "path": str(private / "nvidia.icd"), "content": lib,
                "reason": f"{vendors_dir} not writable ({exc}); OCL_ICD_VENDORS={private}"}


def install_wheels(wheel_dir: Path, site: Path, env: dict) -> dict:
    wheels = sorted(glob.glob(str(wheel_dir / "*.whl")))
    if not wheels:
        return {"status": "skipped", "reason": f"no wheels in {wheel_dir}"}
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
           "--no-cache-dir", "--upgrade", "--target", str(site), *wheels]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    if r.returncode != 0:
        raise RuntimeError(f"pip install of {len(wheels)} wheels failed:\n{r.stderr[-2000:]}")
    _prepend_path(env, str(site))
    sys.path.insert(0, str(site))
    return {"status": "installed", "wheels": [Path(w).name for w in wheels], "site": str(site)}


def _prepend_path(env: dict, path: str) -> None:
    env["PYTHONPATH"] = os.pathsep.join([path, *filter(None, [env.get("PYTHONPATH")])])


def describe_device(selector: str, env: dict) -> dict:
    """The device the selector opens, and the default device (which the tests' fixtures open),
    in a child process: the ICD registration of this run must be seen by the loader."""
    code = (
        "import json, sys; from clce_server.rails.device import open_devices\n"
        "sel = open_devices(sys.argv[1])[0]; dflt = open_devices()[0]\n"
        "print(json.dumps({'selected': sel.describe(), 'default': dflt.describe()}))\n")
    r = subprocess.run([sys.executable, "-c", code, selector], capture_output=True, text=True, env=env,
                       cwd=REPO, timeout=600)
    if r.returncode != 0:
        raise RuntimeError(f"opening the device {selector!r} failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def run_tests(tests: list[str], out: Path, env: dict, timeout: int, pytest_args: list[str]) -> dict:
    log = out / "tests.log"
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={out / 'tests.xml'}",
           *pytest_args, *tests]
    t0 = time.perf_counter()
    with open(log, "w") as fh:
        try:
            r = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=REPO, timeout=timeout)
            rc = r.returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    tail = log.read_text().strip().splitlines()[-1:] or [""]
    return {"status": "passed" if rc == 0 else "failed", "returncode": rc, "files": tests,
            "summary": tail[0], "seconds": time.perf_counter() - t0, "log": log.name}


def run_bench(selector: str, out: Path, env: dict, timeout: int, shapes: str | None, repeat: int | None) -> dict:
    cmd = [sys.executable, str(REPO / "bench" / "bench_cross_entropy.py"), "--device", selector, "--out", str(out)]
    if shapes:
        cmd += ["--shapes", shapes]
    if repeat:
        cmd += ["--repeat", str(repeat)]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=timeout)
    if r.returncode != 0:
        raise RuntimeError(f"bench_cross_entropy.py failed ({r.returncode}):\n{r.stderr[-3000:]}")
    doc = json.loads((out / "cross_entropy.json").read_text())
    return {"status": "ran", "seconds": time.perf_counter() - t0, "json": "cross_entropy.json",
            "plot": "cross_entropy.png", "targets": doc["targets"], "doc": doc}


# ---------------------------------------------------------------------------------------------
# the comparison with torch CUDA and Liger-Kernel

def _liger():
    """Liger-Kernel's cross-entropy as a callable (logits, target) -> loss, or the reason it is not."""
    try:
        from liger_kernel.transformers.cross_entropy import LigerCrossEntropyLoss
    except Exception as exc:   # not installed, or its triton does not load
        return None, f"liger_kernel not importable: {type(exc).__name__}: {exc}"
    return LigerCrossEntropyLoss(), None


def compare_cuda(records: list[dict], repeat: int) -> dict:
    """torch F.cross_entropy and Liger-Kernel (forward + backward) and torch's copy_, on CUDA, for
    the bench's shapes; CUDA-event times, medians of `repeat` interleaved rounds (first dropped)."""
    import torch
    import torch.nn.functional as F

    if not torch.cuda.is_available():
        return {"status": "skipped", "reason": "torch.cuda.is_available() is False (no CUDA GPU here)"}
    liger, liger_reason = _liger()
    dev = torch.device("cuda")
    out = {"status": "ran", "device": torch.cuda.get_device_name(0), "torch": torch.__version__,
           "liger": liger_reason or "importable", "shapes": []}
    for rec in records:
        shape, dt = tuple(rec["shape"]), rec["dtype"]
        tdt = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dt]
        g = torch.Generator(device=dev).manual_seed(0)
        x = (torch.randn(shape, generator=g, device=dev) * 2).to(tdt)
        t = torch.randint(0, shape[1], (shape[0], *shape[2:]), generator=g, device=dev)
        dst = torch.empty_like(x)
        xr = x.clone().requires_grad_(True)

        def torch_fb():
            xr.grad = None
            F.cross_entropy(xr, t).backward()

        def copy():
            dst.copy_(x)

        methods = {"torch_cuda": torch_fb, "copy_cuda": copy}
        note = None
        if liger is not None:
            if x.dim() == 2:
                xl = x.clone().requires_grad_(True)

                def liger_fb():
                    xl.grad = None
                    liger(xl, t).backward()
                methods["liger"] = liger_fb
            else:
                note = "liger: takes (rows, classes) only; spatial shape skipped"
        times = {k: [] for k in methods}
        for rnd in range(repeat + 1):
            for name, fn in methods.items():
                s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                s.record()
                fn()
                e.record()
                e.synchronize()
                if rnd:
                    times[name].append(s.elapsed_time(e) * 1e-3)
        med = {k: statistics.median(v) for k, v in times.items()}
        nbytes = x.numel() * x.element_size()
        clce = rec["seconds"]["fused"]["median"]
        row = {"label": rec["label"], "dtype": dt, "median_s": med, "clce_kernel_s": clce,
               "copy_cuda_gbs": 2 * nbytes / med["copy_cuda"] / 1e9,
               "clce_pct_of_cuda_copy": 100 * med["copy_cuda"] / clce,
               "clce_vs_torch_cuda": med["torch_cuda"] / clce,
               "clce_time_vs_liger": clce / med["liger"] if "liger" in med else None, "note": note}
        out["shapes"].append(row)
        del x, t, dst, xr
        torch.cuda.empty_cache()
    return out


def run_linear(selector: str, shape: str, dtype: str, repeat: int, env: dict, timeout: int) -> dict:
    """The linear comparison in a child process (`linear_child`): OpenCL and CUDA memory are
    given back when it exits, whatever it did."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--linear-child", "--device", selector,
           "--linear-shape", shape, "--linear-dtype", dtype, "--compare-repeat", str(repeat), "--out", "-"]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=timeout)
    lines = [line for line in r.stdout.splitlines() if line.startswith("{")]
    if r.returncode != 0 or not lines:
        raise RuntimeError(f"the linear comparison exited {r.returncode}:\n{r.stderr[-3000:]}")
    doc = json.loads(lines[-1])
    doc["status"] = "ran" if doc.get("clce", {}).get("status") == "ran" else "failed"
    doc["seconds"] = time.perf_counter() - t0
    return doc


def _timed_rounds(methods: dict, repeat: int, clock) -> dict:
    """Interleaved rounds of every method, the first dropped: name -> list of seconds, or the
    error that stopped it (out of memory: the others go on)."""
    times: dict = {k: [] for k in methods}
    errors: dict = {}
    for rnd in range(repeat + 1):
        for name, fn in methods.items():
            if name in errors:
                continue
            try:
                secs = clock(fn)
            except Exception as exc:   # torch.cuda.OutOfMemoryError, a failing kernel
                errors[name] = f"{type(exc).__name__}: {str(exc)[:300]}"
                continue
            if rnd:
                times[name].append(secs)
    return {k: ({"status": "error", "error": errors[k]} if k in errors else
                {"status": "ran", "median_s": statistics.median(v), "runs_s": v}) for k, v in times.items()}


def linear_child(selector: str, shape: str, dtype: str, repeat: int) -> dict:
    """clce's fused linear cross-entropy on `selector`, then torch CUDA and Liger-Kernel's at the
    same N x H x V (see the module's "linear" step). Returns the JSON document."""
    import gc

    import numpy as np
    import torch
    import torch.nn.functional as F

    N, H, V = (int(v) for v in shape.lower().split("x"))
    tdt = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    g = torch.Generator().manual_seed(0)
    h = torch.randn(N, H, generator=g).to(tdt)
    W = (torch.randn(V, H, generator=g) / H ** 0.5).to(tdt)
    y = torch.randint(0, V, (N,), generator=g)
    doc: dict = {"shape": [N, H, V], "dtype": dtype, "repeat": repeat}

    def np_of(t):   # bf16 through its bits: numpy has no bfloat16 of its own
        return t.view(torch.int16).numpy().view(_bf16()) if t.dtype == torch.bfloat16 else t.numpy()

    clce_loss = clce_gh = None
    try:
        from clce_server.linear import engine as linear
        from clce_server.rails.device import open_devices
        from clce_server.cross_entropy.engine import LossEngine

        dev = open_devices(selector)[0]
        lce = linear.LinearCrossEntropy(LossEngine(dev))
        p = linear.check(np_of(h), np_of(W), y.numpy())

        class Version:   # the weight version's stand-in: resident on a discrete device across calls
            pass

        version = Version()
        gw = np.empty((V, H), np.float32)
        gh = np.empty((N, H), p.hidden.dtype)
        walls, kernels = [], []
        for rnd in range(repeat + 1):
            t0 = time.perf_counter()
            res = lce(p, grad_weight=gw, overwrite_grad_weight=True, grad_hidden=gh, weight_key=version)
            if rnd:
                walls.append(time.perf_counter() - t0)
                kernels.append(res.kernel_seconds)
        clce_loss, clce_gh = float(np.float32(res.loss)), gh[:64].astype(np.float32)
        doc["clce"] = {"status": "ran", "device": dev.name, "memory": dev.memory, "median_s": statistics.median(walls),
                       "kernel_median_s": statistics.median(kernels), "runs_s": walls,
                       "device_bytes": lce.device_bytes(p), "gemm": lce.gemm.describe(), "loss": clce_loss}
        del lce, res, gw, gh, p, dev
    except Exception as exc:
        doc["clce"] = {"status": "error", "error": f"{type(exc).__name__}: {exc}",
                       "traceback": traceback.format_exc(limit=6)}
    gc.collect()
    cuda = torch.cuda.is_available()
    tdev = torch.device("cuda" if cuda else "cpu")
    hd, Wd, yd = h.to(tdev), W.to(tdev), y.to(tdev)

    def torch_fb():
        hr, Wr = hd.detach().requires_grad_(), Wd.detach().requires_grad_()
        loss = F.cross_entropy(F.linear(hr, Wr).float(), yd)
        loss.backward()
        return loss.detach(), hr.grad

    if not cuda and N * V > 5e8:   # the reference would take minutes on a CPU: only on CUDA
        doc["cuda"] = {"status": "skipped", "reason": "torch.cuda.is_available() is False (no CUDA GPU here); "
                                                      "no CPU reference at this size"}
        return doc
    ref_loss, ref_gh = torch_fb()   # the reference (on the CPU where there is no CUDA)
    ref_loss, ref_gh = float(ref_loss), ref_gh[:64].float().cpu().numpy()
    if clce_loss is not None:
        doc["check"] = {"loss_rel_diff": abs(clce_loss - ref_loss) / abs(ref_loss),
                        "grad_hidden_max_abs_diff": float(np.abs(clce_gh - ref_gh).max()),
                        "grad_hidden_max_abs": float(np.abs(ref_gh).max()), "torch_loss": ref_loss,
                        "reference_device": str(tdev)}
    if not cuda:
        doc["cuda"] = {"status": "skipped", "reason": "torch.cuda.is_available() is False (no CUDA GPU here)"}
        return doc
    methods = {"torch_cuda": lambda: torch_fb()}
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        liger = LigerFusedLinearCrossEntropyLoss()

        def liger_fb():
            hr, Wr = hd.detach().requires_grad_(), Wd.detach().requires_grad_()
            liger(Wr, hr, yd).backward()
        methods["liger"] = liger_fb
        liger_note = "importable"
    except Exception as exc:
        liger_note = f"liger_kernel not importable: {type(exc).__name__}: {exc}"

    def clock(fn):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        e.synchronize()
        return s.elapsed_time(e) * 1e-3

    doc["cuda"] = {"status": "ran", "device": torch.cuda.get_device_name(0), "torch": torch.__version__,
                   "liger": liger_note, **_timed_rounds(methods, repeat, clock)}
    c = doc.get("clce", {})
    for name in ("torch_cuda", "liger"):
        m = doc["cuda"].get(name, {})
        if c.get("status") == "ran" and m.get("status") == "ran":
            doc[f"clce_time_vs_{name}"] = c["median_s"] / m["median_s"]
            doc[f"clce_kernel_time_vs_{name}"] = c["kernel_median_s"] / m["median_s"]
    return doc


def _bf16():
    import ml_dtypes
    return ml_dtypes.bfloat16


def summarize(bench_doc: dict, cuda: dict) -> list[dict]:
    """One row per shape: clce's kernel time against the device copies and the CUDA libraries."""
    cuda_rows = {(r["label"], r["dtype"]): r for r in cuda.get("shapes", [])}
    rows = []
    for rec in bench_doc["results"]:
        med = {k: v["median"] for k, v in rec["seconds"].items()}
        nbytes = rec["bytes_logits"]
        cl_copy = min(med["memcpy_cl_enqueue_copy"], med["memcpy_cl_kernel"])
        row = {"label": rec["label"], "dtype": rec["dtype"], "clce_kernel_ms": med["fused"] * 1e3,
               "opencl_copy_ms": cl_copy * 1e3, "opencl_copy_gbs": 2 * nbytes / cl_copy / 1e9,
               "clce_pct_of_opencl_copy": 100 * cl_copy / med["fused"],
               # the bench's reference: the fastest copy on the device's memory (host copies too
               # where the device computes in host memory)
               "clce_pct_of_fastest_copy": rec["fused_pct_of_memcpy"], "fastest_copy": rec["memcpy_reference"]}
        c = cuda_rows.get((rec["label"], rec["dtype"]))
        if c:
            row.update({"torch_cuda_ms": c["median_s"]["torch_cuda"] * 1e3,
                        "liger_ms": c["median_s"]["liger"] * 1e3 if "liger" in c["median_s"] else None,
                        "cuda_copy_ms": c["median_s"]["copy_cuda"] * 1e3,
                        "clce_pct_of_cuda_copy": c["clce_pct_of_cuda_copy"],
                        "clce_time_vs_liger": c["clce_time_vs_liger"]})
        rows.append(row)
    return rows


def plot(rows: list[dict], path: Path, device: str) -> Path:
    sys.path.insert(0, str(REPO / "bench"))
    import common

    groups = [r["label"] + ("" if r["dtype"] == "float32" else f" {r['dtype']}") for r in rows]
    series = {"clce kernel": [r["clce_kernel_ms"] for r in rows],
              "OpenCL copy": [r["opencl_copy_ms"] for r in rows]}
    if any("torch_cuda_ms" in r for r in rows):
        series["torch CUDA fwd+bwd"] = [r.get("torch_cuda_ms") for r in rows]
        series["Liger-Kernel fwd+bwd"] = [r.get("liger_ms") for r in rows]
        series["CUDA copy_"] = [r.get("cuda_copy_ms") for r in rows]
    annotate = {"clce kernel": [f"{r['clce_pct_of_opencl_copy']:.0f}% of copy" for r in rows]}
    return common.bar_plot(path, groups, series, annotate=annotate, ylabel="time (ms), median, log scale",
                           title=f"clce on {device}: kernel against copies and CUDA libraries")


# ---------------------------------------------------------------------------------------------

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="nvidia", help="OpenCL device selector (default nvidia)")
    ap.add_argument("--out", type=Path, required=True, help="output folder")
    ap.add_argument("--wheels", type=Path, default=REPO / ".whl", help="carried wheels (default .whl)")
    ap.add_argument("--site", type=Path, default=Path("/tmp/site"), help="where the wheels go")
    ap.add_argument("--icd-dir", type=Path, default=Path("/etc/OpenCL/vendors"))
    ap.add_argument("--driver-dirs", default="",
                    help="folders searched for libnvidia-opencl.so.1 (default: the loader's, then DRIVER_DIRS)")
    ap.add_argument("--tests", default=",".join(KERNEL_TESTS), help="comma-separated test files ('' for none)")
    ap.add_argument("--pytest-args", default="", help="extra pytest arguments, space-separated (e.g. '-k float32')")
    ap.add_argument("--shapes", help="bench shapes (default: bench_cross_entropy.py's, fp32 and bf16)")
    ap.add_argument("--repeat", type=int, help="bench repetitions (default: the bench's)")
    ap.add_argument("--compare-repeat", type=int, default=7, help="CUDA comparison rounds (median)")
    ap.add_argument("--step-timeout", type=int, default=200,
                    help="seconds per step (default 200: tests and bench fit a 480 s call)")
    ap.add_argument("--linear-shape", default=LINEAR_SHAPE, help="NxHxV of the linear comparison ('' to skip)")
    ap.add_argument("--linear-dtype", default="bfloat16", choices=("bfloat16", "float32"))
    ap.add_argument("--linear-child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.linear_child:   # run_linear's child: one JSON line on stdout
        print(json.dumps(linear_child(args.device, args.linear_shape, args.linear_dtype, args.compare_repeat),
                         default=str), flush=True)
        return 0
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    _prepend_path(env, str(REPO))
    doc: dict = {"runner": "clce gpu_runner", "device_selector": args.device, "argv": sys.argv[1:],
                 "host": platform.node(), "python": platform.python_version(), "steps": {}}
    t_all = time.perf_counter()

    def step(name, fn, *a):
        t0 = time.perf_counter()
        try:
            res = fn(*a)
        except Exception as exc:
            res = {"status": "error", "error": f"{type(exc).__name__}: {exc}",
                   "traceback": traceback.format_exc(limit=5)}
        res.setdefault("seconds", time.perf_counter() - t0)
        doc["steps"][name] = {k: v for k, v in res.items() if k != "doc"}
        (out / "runner.json").write_text(json.dumps(doc, indent=1, default=str))
        print(f"[runner] {name}: {res.get('status')} ({res['seconds']:.1f}s) "
              f"{res.get('summary') or res.get('reason') or res.get('error') or ''}", flush=True)
        return res

    driver_dirs = args.driver_dirs.split(os.pathsep) if args.driver_dirs else loader_dirs() + DRIVER_DIRS
    step("icd", register_icd, args.icd_dir, driver_dirs, env)
    step("wheels", install_wheels, args.wheels, args.site, env)
    dev = step("device", lambda: {"status": "opened", **describe_device(args.device, env)})
    if dev["status"] == "opened" and dev["selected"]["name"] != dev["default"]["name"]:
        doc["steps"]["device"]["warning"] = ("the tests open the default device, not the selected one: "
                                             f"{dev['default']['name']} instead of {dev['selected']['name']}")
    tests = [t for t in args.tests.split(",") if t.strip()]
    if tests:
        step("tests", run_tests, tests, out, env, args.step_timeout, args.pytest_args.split())
    bench = step("bench", run_bench, args.device, out, env, args.step_timeout, args.shapes, args.repeat)
    if bench["status"] == "ran":
        cuda = step("compare", compare_cuda, bench["doc"]["results"], args.compare_repeat)
        rows = summarize(bench["doc"], cuda)
        doc["summary"] = rows
        try:
            doc["plot"] = plot(rows, out / "runner.png", bench["doc"]["device"]["name"]).name
        except Exception as exc:
            doc["plot_error"] = f"{type(exc).__name__}: {exc}"
    if args.linear_shape and dev["status"] == "opened":
        step("linear", run_linear, args.device, args.linear_shape, args.linear_dtype, args.compare_repeat, env,
             max(args.step_timeout, 300))
    doc["seconds"] = time.perf_counter() - t_all
    (out / "runner.json").write_text(json.dumps(doc, indent=1, default=str))
    for r in doc.get("summary", []):
        extra = "" if "torch_cuda_ms" not in r else (
            f"; torch CUDA {r['torch_cuda_ms']:.3f} ms, Liger {r['liger_ms'] or float('nan'):.3f} ms, "
            f"{r['clce_pct_of_cuda_copy']:.0f}% of CUDA copy_")
        print(f"[runner] {r['label']} {r['dtype']}: clce {r['clce_kernel_ms']:.3f} ms, "
              f"{r['clce_pct_of_opencl_copy']:.0f}% of the OpenCL copy{extra}")
    lin = doc["steps"].get("linear", {})
    if lin.get("status") == "ran":
        c, cu = lin["clce"], lin.get("cuda", {})
        extra = "".join(f"; {k} {cu[k]['median_s'] * 1e3:.1f} ms" for k in ("torch_cuda", "liger")
                        if cu.get(k, {}).get("status") == "ran")
        print(f"[runner] linear {'x'.join(map(str, lin['shape']))} {lin['dtype']}: clce {c['median_s'] * 1e3:.1f} ms "
              f"(kernels {c['kernel_median_s'] * 1e3:.1f} ms, {c['memory']} memory){extra}")
    failed = [n for n, s in doc["steps"].items() if s.get("status") in ("error", "failed")]
    print(f"[runner] wrote {out / 'runner.json'} ({doc['seconds']:.0f}s); failed steps: {failed or 'none'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
