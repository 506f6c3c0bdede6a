"""OpenCL devices: discovery, selection by building, per-device tuning, programs and kernels.

Everything device-specific lives here. A device is chosen by *building clce's programs on it*:
a platform can list a device that cannot compile (the PoCL bundled in pyopencl's wheel fails on
some CPUs with "unknown target CPU 'generic'"), so listing alone proves nothing.
"""

from __future__ import annotations

import importlib.resources
import logging
import os
import threading
import time
import warnings
from dataclasses import asdict, dataclass, field, replace

import numpy as np
import pyopencl as cl
import pyopencl.tools

from .errors import ArgumentError, DeviceError

log = logging.getLogger("clce.device")

# PoCL notes that double8 arguments change the ABI without AVX-512: true, harmless inside one
# kernel, and printed for every fp64 build. Real build errors raise, they are not warnings.
warnings.filterwarnings("ignore", category=cl.CompilerWarning)

#: dtype codes shared with kernels/cross_entropy.cl (IN_DTYPE / GRAD_DTYPE)
DTYPE_CODES = {"float32": 0, "float16": 1, "bfloat16": 2, "float64": 3}

INSTALL_HINT = (
    "Install an OpenCL driver: on Debian/Ubuntu `apt-get install pocl-opencl-icd ocl-icd-libopencl1` "
    "for the CPU device (PoCL), or the NVIDIA driver's OpenCL ICD "
    "(/etc/OpenCL/vendors/nvidia.icd naming libnvidia-opencl.so.1) for a GPU."
)


@dataclass(frozen=True)
class LaunchShape:
    """How the engine launches the kernels on a device (the host side of the tuning)."""

    rows: str = "item"            # "item": a work-item per row (ce_rows_item; ce_spatial8/16 for spatial
                                  # rows); "group": a work-group per row (ce_rows_group); spatial rows
                                  # that no ce_spatial width fits, and every device's spatial rows
                                  # under "group", a work-item per row (ce_rows_strided)
    local_size: int = 1           # work-group size: work-items per group ("item"), per row ("group")
    reduce_local_size: int = 16   # reduce_rows's work-group size (power of two)
    scratch_items_per_cu: int = 8 # "item" rows whose gradient cannot hold the exps (fp16/bf16):
                                  # work-items per compute unit, each looping over rows with a
                                  # scratch row of its own


@dataclass(frozen=True)
class Tuning:
    """One row of the tuning table: build defines (the kernels' #ifndef tunables), launch shape,
    and where the row's figures come from.

    `group_target`: rows of kind "group" take their work-group sizes from the device, not from
    `launch`: a power of two, `group_target` or the kernel's preferred work-group size multiple
    (the warp or wavefront) where that is larger, capped by the kernel's maximum work-group size
    and the device's local memory (`group_size`, `read_group_sizes`). `launch`'s sizes are then
    only those of the first build, which the limits are read from."""

    defines: dict[str, int]
    launch: LaunchShape
    source: str = ""                       # "measured: <where>" or "guess: <why>"
    group_target: int | None = None
    read_off_device: dict | None = None    # the kernel limits the work-group size came from

    def build_defines(self) -> dict[str, int]:
        """The defines a build gets: the table's, plus the work-group sizes the kernels must know
        at compile time (reqd_work_group_size, local arrays), taken from the launch shape."""
        sizes = {"RED_WG_SIZE": self.launch.reduce_local_size}
        if self.launch.rows == "group":
            sizes["CE_WG_SIZE"] = self.launch.local_size
        return {**self.defines, **sizes}

    def describe(self) -> dict:
        out = {"defines": dict(self.defines), "launch": asdict(self.launch), "source": self.source}
        if self.read_off_device is not None:
            out["read_off_device"] = dict(self.read_off_device)
        return out


def group_size(target: int, multiple: int, kernel_max: int, local_mem_limit: int) -> int:
    """A work-group size for the tree-reducing kernels: a power of two (their reductions halve),
    at most what the kernel and local memory allow, and `target` or, when the device's preferred
    multiple (a warp, a wavefront) is larger, that multiple: a group narrower than one warp idles
    lanes. A power of two at least the (power-of-two) multiple is a multiple of it."""
    want = max(target, multiple) if multiple > 0 and multiple & (multiple - 1) == 0 else target
    cap = max(1, min(want, kernel_max, local_mem_limit))
    return 1 << (cap.bit_length() - 1)


# Tuning table, CLBlast style: (vendor substring or "*", device kind) -> build defines, launch
# shape and the provenance of its figures. First match wins.
_CPU = Tuning(
    defines={"CE_FAST_EXP": 1, "CE_WIDE_STORE": 1, "CE_SP_NT_STORE": 1, "CE_NT_STORE": 1, "CE_SP_PREFETCH": 8},
    launch=LaunchShape("item", 1, 16),
    source="measured: PoCL 3.1 CPU device, 2-core Xeon with AVX-512 (this project's CI machine): "
           "a work-item per row ~6x faster than a work-group striding a row; CE_FAST_EXP 1.4x cheaper "
           "than PoCL's exp2; CE_VW read off the device (native_defines); reduce_local_size 16 a guess "
           "(the reduction is < 1% of a launch); CE_WIDE_STORE (one store per AVX-512 register, not "
           "PoCL's three), CE_SP_NT_STORE and CE_NT_STORE (non-temporal gradient lines in ce_spatial's "
           "tiles and in scratch-row bf16 rows) measured A/B, interleaved, in one process each; "
           "CE_SP_PREFETCH (ce_spatial's loads asked for 8 work-items ahead, 0.92x CPU time) on a "
           "2-core AMD EPYC with AVX-512, the same way")
TUNING: list[tuple[str, str, Tuning]] = [
    ("*", "cpu", _CPU),
    ("NVIDIA", "gpu", Tuning(
        defines={"CE_NATIVE_EXP": 0}, launch=LaunchShape("group", 256, 256), group_target=256,
        source="guess: never run on an NVIDIA device; 8 warps per row is the usual shape of a row "
               "reduction; the size is read off the device (group_size); checked for races and "
               "values under Oclgrind at 256 (tests/cross_entropy/test_oclgrind_kernels.py)")),
    ("*", "gpu", Tuning(
        defines={"CE_NATIVE_EXP": 0}, launch=LaunchShape("group", 128, 128), group_target=128,
        source="guess: never run on a GPU; 2 wavefronts (AMD) or 4-8 sub-groups (Intel); the size is "
               "read off the device (group_size); checked under Oclgrind at 128")),
    ("*", "*", _CPU),
]

#: the files of each program, concatenated in order (the shared preamble first); a (file, defines)
#: pair instantiates a template file with those defines (set before it, undefined after it)
PROGRAM_SOURCES = {"ce": ("common.cl", "cross_entropy.cl", ("ce_spatial.cl", {"SPW": 8}),
                          ("ce_spatial.cl", {"SPW": 16})),
                   "reduce": ("reduce_rows.cl",)}
#: kernel name -> the program that holds it
KERNELS = {"ce_rows_item": "ce", "ce_rows_group": "ce", "ce_rows_strided": "ce", "ce_spatial8": "ce",
           "ce_spatial16": "ce",
           "reduce_rows": "reduce"}


def _read_sources() -> dict[str, str]:
    kernels = importlib.resources.files("clce_server").joinpath("kernels")
    return {entry.name: entry.read_text() for entry in kernels.iterdir() if entry.name.endswith(".cl")}


#: every kernel source, read once when the server starts: replacing the installed package under a
#: running server (a reinstall) changes nothing it builds until it restarts
_SOURCES = _read_sources()


def kernel_source(name: str) -> str:
    """The text of clce_server/kernels/<name>: package data, the same in a checkout and a wheel,
    as it was when the server started."""
    try:
        return _SOURCES[name]
    except KeyError:
        raise FileNotFoundError(f"no kernel source {name!r} in clce_server/kernels") from None


def program_source(kind: str) -> str:
    """The text of one program (a key of PROGRAM_SOURCES), templates instantiated."""
    parts = []
    for entry in PROGRAM_SOURCES[kind]:
        name, defines = (entry, {}) if isinstance(entry, str) else entry
        parts += [f"#define {k} {v}" for k, v in defines.items()]
        parts.append(kernel_source(name))
        parts += [f"#undef {k}" for k in defines]
    return "\n".join(parts)


def device_kind(dev: cl.Device) -> str:
    t = dev.type
    if t & cl.device_type.GPU:
        return "gpu"
    if t & cl.device_type.CPU:
        return "cpu"
    return "accelerator"


def tuning_for(vendor: str, kind: str, overrides: dict | None = None) -> Tuning:
    """The table's row for a device. `overrides` names build defines or LaunchShape fields; a
    work-group size named there is used as given, not read off the device."""
    for v, k, row in TUNING:
        if (v == "*" or v.lower() in vendor.lower()) and (k == "*" or k == kind):
            break
    else:
        raise AssertionError("the tuning table ends with a catch-all row")
    defines, launch = dict(row.defines), {}
    launch_fields = set(asdict(row.launch))
    for name, value in (overrides or {}).items():
        if name in launch_fields:
            launch[name] = value
        else:
            defines[name] = value
    fixed = {"local_size", "reduce_local_size", "rows"} & set(launch)
    target = row.group_target if not fixed else None
    return Tuning(defines, replace(row.launch, **launch), row.source, target)


def read_group_sizes(tuning: Tuning, dev: cl.Device, ce_kernel: cl.Kernel, reduce_kernel: cl.Kernel) -> Tuning:
    """A "group" row's work-group sizes read off the built kernels (`group_size`): each kernel's
    preferred work-group size multiple and maximum work-group size, and the device's local memory
    over what one work-item of it uses there (pass the widest build: fp64's where the device has
    it). Rows without a group_target come back unchanged."""
    if tuning.group_target is None or tuning.launch.rows != "group":
        return tuning
    info = cl.kernel_work_group_info
    read, sizes = {}, {}
    for field_name, kernel, built in (("local_size", ce_kernel, tuning.launch.local_size),
                                      ("reduce_local_size", reduce_kernel, tuning.launch.reduce_local_size)):
        multiple = int(kernel.get_work_group_info(info.PREFERRED_WORK_GROUP_SIZE_MULTIPLE, dev))
        kmax = int(kernel.get_work_group_info(info.WORK_GROUP_SIZE, dev))
        local_per_item = int(kernel.get_work_group_info(info.LOCAL_MEM_SIZE, dev)) / built
        mem_limit = int(dev.local_mem_size // local_per_item) if local_per_item > 0 else kmax
        sizes[field_name] = group_size(tuning.group_target, multiple, kmax, mem_limit)
        read[field_name] = {"preferred_multiple": multiple, "kernel_max": kmax,
                            "local_mem_bytes": int(dev.local_mem_size), "local_mem_limit": mem_limit,
                            "chosen": sizes[field_name]}
    return replace(tuning, launch=replace(tuning.launch, **sizes), group_target=None, read_off_device=read)


@dataclass
class Device:
    """One OpenCL device with its context, profiling queue, built programs and memory pool."""

    index: int
    cl_device: cl.Device
    context: cl.Context
    queue: cl.CommandQueue
    tuning: Tuning
    has_fp64: bool
    programs: dict[tuple, cl.Program] = field(default_factory=dict)
    #: "host": kernels compute in host memory (USE_HOST_PTR wraps the host's arrays, no copies);
    #: "discrete": the device has memory of its own (buffers there, copies in and out). Read off
    #: the device ("auto", `memory_mode`), or forced: "discrete" on PoCL runs the GPU path here.
    memory: str | None = None
    _build_lock: threading.Lock = field(default_factory=threading.Lock)
    _local: threading.local = field(default_factory=threading.local)

    def __post_init__(self) -> None:
        # Device buffers come from a pool: a request's scratch is reused by the next one.
        self.pool = cl.tools.MemoryPool(cl.tools.ImmediateAllocator(self.queue))
        if self.memory is None:
            self.memory = memory_mode(self.cl_device)

    @property
    def name(self) -> str:
        return self.cl_device.name.strip()

    @property
    def platform(self) -> str:
        return self.cl_device.platform.name.strip()

    @property
    def vendor(self) -> str:
        return self.cl_device.vendor.strip()

    @property
    def kind(self) -> str:
        return device_kind(self.cl_device)

    @property
    def launch(self) -> LaunchShape:
        return self.tuning.launch

    @property
    def host_unified(self) -> bool:
        """Kernels compute in host memory: USE_HOST_PTR saves a copy each way (`memory`)."""
        return self.memory == "host"

    def __str__(self) -> str:
        return f"{self.index}:{self.name}"

    def describe(self) -> dict:
        d = self.cl_device
        return {
            "index": self.index,
            "name": self.name,
            "platform": self.platform,
            "vendor": self.vendor,
            "kind": self.kind,
            "driver": d.driver_version,
            "opencl": d.version,
            "compute_units": d.max_compute_units,
            "global_mem_bytes": d.global_mem_size,
            "max_alloc_bytes": d.max_mem_alloc_size,
            "fp64": self.has_fp64,
            "memory": self.memory,
            "tuning": self.tuning.describe(),
        }

    # ---- programs ----
    def program(self, kind: str, in_dtype: str, grad_dtype: str | None = None, softcap: bool = False) -> cl.Program:
        """Build (once) and return a program. kind: "ce" (the fused kernels) or "reduce". Soft-capping
        is a separate build: compiled in, its tanh costs the common case even when switched off."""
        grad_dtype = grad_dtype or in_dtype
        key = (kind, in_dtype, grad_dtype, bool(softcap))
        prg = self.programs.get(key)
        if prg is not None:
            return prg
        with self._build_lock:
            prg = self.programs.get(key)
            if prg is None:
                prg = self._build(kind, in_dtype, grad_dtype, bool(softcap))
                self.programs[key] = prg
        return prg

    def _build(self, kind: str, in_dtype: str, grad_dtype: str, softcap: bool) -> cl.Program:
        if "float64" in (in_dtype, grad_dtype) and not self.has_fp64:
            raise ArgumentError(RuntimeError(f"the OpenCL device {self.name!r} has no float64 support"))
        defines = {**self.tuning.build_defines(), "IN_DTYPE": DTYPE_CODES[in_dtype]}
        if kind == "ce":
            defines.update(GRAD_DTYPE=DTYPE_CODES[grad_dtype], CE_SOFTCAP=int(softcap))
        else:
            defines.update(RED_FP64=int(self.has_fp64))
        src = program_source(kind)
        options = [f"-D{k}={v}" for k, v in sorted(defines.items())]
        # PoCL's on-disk kernel cache is shared by every process of the user; a build racing another
        # process's write of the same entry can fail once (seen with several servers starting
        # together). The sources are fixed, so a failure that repeats is real and is reported.
        for attempt in range(3):
            try:
                return cl.Program(self.context, src).build(options=options)
            except cl.Error as exc:
                if attempt == 2:
                    raise DeviceError(f"building {kind} for {in_dtype}->{grad_dtype} on {self.name!r} "
                                      f"failed: {exc}") from exc
                log.warning("OpenCL build of %s %s->%s failed, retrying: %s", kind, in_dtype, grad_dtype,
                            str(exc).strip().splitlines()[-1] if str(exc).strip() else exc)
                time.sleep(0.2 * (attempt + 1))
        raise AssertionError("unreachable")

    def kernel(self, name: str, in_dtype: str, grad_dtype: str | None = None, softcap: bool = False) -> cl.Kernel:
        """A kernel object private to the calling thread (pyopencl kernels are not thread-safe).
        name: one of KERNELS."""
        cache = getattr(self._local, "kernels", None)
        if cache is None:
            cache = self._local.kernels = {}
        key = (name, in_dtype, grad_dtype or in_dtype, bool(softcap))
        k = cache.get(key)
        if k is None:
            k = cache[key] = cl.Kernel(self.program(KERNELS[name], *key[1:]), name)
        return k

    def build_startup_programs(self) -> None:
        """Every program a request may need, built at start-up, so that ready means ready: no
        request pays a build. Soft-capping is a build of its own (Gemma's logits use it)."""
        for dt in DTYPE_CODES:
            if dt == "float64" and not self.has_fp64:
                continue
            for softcap in (False, True):
                self.program("ce", dt, softcap=softcap)
            self.program("reduce", dt)
        for dt in ("float16", "bfloat16"):   # half-precision models often want fp32 gradients
            for softcap in (False, True):
                self.program("ce", dt, "float32", softcap=softcap)


def _candidates() -> list[cl.Device]:
    out = []
    try:
        platforms = cl.get_platforms()
    except cl.Error as exc:   # no ICD loader or no platform at all
        raise RuntimeError(f"no OpenCL platform found ({exc}). {INSTALL_HINT}") from exc
    for p in platforms:
        try:
            out.extend(p.get_devices())
        except cl.Error:
            continue
    return out


def _matches(sel: str, idx: int, dev: cl.Device, plat_idx: int, dev_idx: int) -> bool:
    s = sel.strip().lower()
    if s.isdigit():
        return int(s) == idx
    if ":" in s and all(part.isdigit() for part in s.split(":", 1)):
        p, d = (int(x) for x in s.split(":", 1))
        return (p, d) == (plat_idx, dev_idx)
    if s in ("gpu", "cpu", "accelerator"):
        return device_kind(dev) == s
    names = (dev.name, dev.vendor, dev.platform.name, dev.platform.vendor)   # "pocl" is only the last
    return any(s in n.lower() for n in names)


def native_defines(dev: cl.Device) -> dict[str, int]:
    """Defines read off the device itself: ce_rows_item's vector width is the device's preferred
    float width (16 with AVX-512: one register; 8 otherwise); CE_FMA where single precision has a
    fused multiply-add that is not emulated (PoCL compiles mad() as a multiply and an add)."""
    fp = dev.single_fp_config
    fma = bool(fp & cl.device_fp_config.FMA) and not fp & cl.device_fp_config.SOFT_FLOAT
    return {"CE_VW": 16 if dev.preferred_vector_width_float >= 16 else 8, "CE_FMA": int(fma)}


#: --device-memory's choices: read off the device, or forced
MEMORY_MODES = ("auto", "host", "discrete")


def memory_mode(dev: cl.Device, requested: str = "auto") -> str:
    """"host" where the device computes in host memory (CPU devices; integrated GPUs that say
    CL_DEVICE_HOST_UNIFIED_MEMORY), else "discrete"; `requested` other than "auto" wins (a
    host-memory device run through the discrete path proves that path without a GPU; "host" on
    a GPU makes its driver copy USE_HOST_PTR buffers, slower but correct)."""
    if requested not in MEMORY_MODES:
        raise ValueError(f"device memory must be one of {', '.join(MEMORY_MODES)}, got {requested!r}")
    if requested != "auto":
        return requested
    return "host" if device_kind(dev) == "cpu" or bool(dev.host_unified_memory) else "discrete"


def _try_open(index: int, dev: cl.Device, overrides: dict | None, tuning_row: tuple[str, str] | None = None,
              memory: str = "auto") -> Device:
    ctx = cl.Context([dev])
    queue = cl.CommandQueue(ctx, properties=cl.command_queue_properties.PROFILING_ENABLE)
    fp64 = "cl_khr_fp64" in dev.extensions or dev.double_fp_config != 0
    vendor, kind = tuning_row or (dev.vendor, device_kind(dev))
    tuning = tuning_for(vendor, kind, {**native_defines(dev), **(overrides or {})})
    mem = memory_mode(dev, memory)
    d = Device(index, dev, ctx, queue, tuning, fp64, memory=mem)
    d.program("ce", "float32")   # the proof that this device can serve
    d.program("reduce", "float32")
    if tuning.group_target is None or tuning.launch.rows != "group":
        return d
    # the widest accumulators' build uses the most local memory per work-item: its limits bind
    widest = "float64" if fp64 else "float32"
    read = read_group_sizes(tuning, dev, d.kernel("ce_rows_group", widest), d.kernel("reduce_rows", widest))
    if read.launch != tuning.launch:   # built at the table's size: build again at the device's
        d = Device(index, dev, ctx, queue, read, fp64, memory=mem)
        d.program("ce", "float32")
        d.program("reduce", "float32")
    else:
        d.tuning = read
    return d


def open_devices(selectors: list[str] | str | None = None, *,
                 tuning_overrides: dict | None = None, tuning_row: tuple[str, str] | None = None,
                 memory: str | None = None) -> list[Device]:
    """Open the devices named by the selectors (all that match and build), or the best one.

    A selector is a global index ("0"), a "platform:device" pair ("1:0"), a kind ("gpu", "cpu"),
    or a case-insensitive substring of the device, platform or vendor name ("nvidia", "pocl").
    Without selectors, GPUs are preferred, and the first device that builds is used.
    `tuning_row` (vendor, kind) picks a row of TUNING instead of the device's own (to run one
    device's shapes on another, e.g. the NVIDIA row under Oclgrind). `memory`: one of
    MEMORY_MODES (`memory_mode`); by default $CLCE_DEVICE_MEMORY (the server's setting), else
    "auto", so a test run with CLCE_DEVICE_MEMORY=discrete drives every engine it opens that way.
    """
    if memory is None:
        memory = os.environ.get("CLCE_DEVICE_MEMORY", "auto").strip().lower() or "auto"
    if memory not in MEMORY_MODES:
        raise ValueError(f"device memory must be one of {', '.join(MEMORY_MODES)}, got {memory!r}")
    if isinstance(selectors, str):
        selectors = [s for s in selectors.split(",") if s.strip()]
    devs = _candidates()
    plat_of = {}
    for p_i, p in enumerate(cl.get_platforms()):
        try:
            for d_i, d in enumerate(p.get_devices()):
                plat_of[d.int_ptr] = (p_i, d_i)
        except cl.Error:
            continue
    failures: list[str] = []
    if selectors:
        # Each selector opens the devices it matches, in order: naming one device twice gives it
        # two workers (two contexts and queues), which can overlap host and device work.
        chosen = [(i, d) for s in selectors for i, d in enumerate(devs)
                  if _matches(s, i, d, *plat_of.get(d.int_ptr, (-1, -1)))]
        if not chosen:
            listing = "; ".join(f"{i}: {d.name.strip()} ({d.platform.name.strip()})" for i, d in enumerate(devs))
            raise RuntimeError(f"no OpenCL device matches {selectors}; devices: {listing or 'none'}. {INSTALL_HINT}")
    else:
        rank = {"gpu": 0, "accelerator": 1, "cpu": 2}
        chosen = sorted(enumerate(devs), key=lambda it: rank[device_kind(it[1])])
    opened: list[Device] = []
    for i, dev in chosen:
        try:
            opened.append(_try_open(len(opened), dev, tuning_overrides, tuning_row, memory))
        except Exception as exc:   # any build or context failure: try the next candidate
            msg = str(exc).strip().splitlines()
            failures.append(f"{dev.name.strip()} ({dev.platform.name.strip()}): {msg[-1] if msg else exc!r}")
            log.warning("OpenCL device %s cannot build clce's kernels: %s", dev.name.strip(), exc)
            continue
        if not selectors:
            break
    if not opened:
        detail = "; ".join(failures) or "no OpenCL devices"
        raise RuntimeError(f"no OpenCL device could build clce's kernels ({detail}). {INSTALL_HINT}")
    return opened


def describe_devices() -> str:
    """One line per OpenCL device and whether it builds clce's kernels (for set-up scripts)."""
    lines = []
    for i, dev in enumerate(_candidates()):
        try:
            _try_open(i, dev, None)
            ok = "builds"
        except Exception as exc:
            ok = f"fails: {str(exc).strip().splitlines()[-1] if str(exc).strip() else exc!r}"
        lines.append(f"{i}: {dev.name.strip()} [{dev.platform.name.strip()}] {ok}")
    return "\n".join(lines) or "no OpenCL devices"


def as_storage(a: np.ndarray) -> np.ndarray:
    """bfloat16 arrays travel to the kernels as their uint16 bits."""
    return a.view(np.uint16) if a.dtype.name == "bfloat16" else a
