"""Device discovery and selection: chosen by building, selectors, tuning table, per-thread kernels."""

import re
import threading

import numpy as np
import pyopencl as cl
import pytest

from clce_server.rails.device import (
    INSTALL_HINT,
    KERNELS,
    PROGRAM_SOURCES,
    TUNING,
    LaunchShape,
    describe_devices,
    group_size,
    native_defines,
    program_source,
    open_devices,
    tuning_for,
)


def test_default_device_builds_and_serves():
    dev = open_devices()[0]
    assert ("ce", "float32", "float32", False) in dev.programs   # proven by building
    info = dev.describe()
    assert info["kind"] in ("cpu", "gpu", "accelerator") and info["name"]
    row = tuning_for(dev.vendor, dev.kind)
    assert info["tuning"]["launch"] == row.describe()["launch"]
    assert info["tuning"]["defines"] == {**row.defines, **native_defines(dev.cl_device)}
    assert set(info["tuning"]) == {"defines", "launch", "source"} and info["tuning"]["source"] == row.source


@pytest.mark.parametrize("selector", ["0", "cpu", "pocl", "PORTABLE", "0:0"])
def test_selectors_pick_the_cpu_device(selector):
    devs = open_devices([selector])
    assert len(devs) == 1 and devs[0].kind == "cpu"


def test_each_selector_opens_its_match_so_a_device_can_have_two_workers():
    devs = open_devices("cpu,cpu")
    assert [d.index for d in devs] == [0, 1]
    assert devs[0].context is not devs[1].context
    assert str(devs[0]) != str(devs[1])


def test_no_match_names_the_package_to_install():
    with pytest.raises(RuntimeError) as info:
        open_devices(["no-such-device-anywhere"])
    msg = str(info.value)
    assert "no OpenCL device matches" in msg and "pocl-opencl-icd" in msg
    assert "pocl-opencl-icd" in INSTALL_HINT


def test_a_device_that_cannot_build_is_skipped_and_reported(monkeypatch):
    """The PoCL in pyopencl's wheel lists a device and then fails to compile ('unknown target CPU
    generic'): listing proves nothing, building decides."""
    import clce_server.rails.device as device

    def broken(index, dev, *config):
        raise cl.RuntimeError("clBuildProgram failed: unknown target CPU 'generic'")

    monkeypatch.setattr(device, "_try_open", broken)
    with pytest.raises(RuntimeError) as info:
        open_devices()
    assert "unknown target CPU 'generic'" in str(info.value)
    assert "pocl-opencl-icd" in str(info.value)


def test_describe_devices_lists_what_builds():
    text = describe_devices()
    assert "builds" in text.splitlines()[0]


def test_tuning_table_is_keyed_by_vendor_and_kind():
    assert tuning_for("NVIDIA Corporation", "gpu").launch == LaunchShape("group", 256, 256)
    assert tuning_for("Advanced Micro Devices", "gpu").launch.rows == "group"
    assert tuning_for("pocl", "cpu").launch.rows == "item"
    assert tuning_for("anything", "accelerator") == TUNING[-1][2]
    cpu = tuning_for("pocl", "cpu", {"CE_FAST_EXP": 0, "local_size": 4})
    assert cpu.defines["CE_FAST_EXP"] == 0 and cpu.launch.local_size == 4
    assert TUNING[0][2].defines["CE_FAST_EXP"] == 1                 # overrides leave the table alone
    assert tuning_for("pocl", "cpu", {"rows": "group", "local_size": 16}).launch == LaunchShape("group", 16, 16)


def test_launch_shapes_reach_the_kernels_as_work_group_sizes():
    gpu = tuning_for("NVIDIA", "gpu")
    assert gpu.build_defines()["CE_WG_SIZE"] == 256 and gpu.build_defines()["RED_WG_SIZE"] == 256
    assert "CE_WG_SIZE" not in tuning_for("pocl", "cpu").build_defines()


def test_every_tunable_has_a_default_in_the_kernel_source(cpu_device):
    src = "".join(program_source(kind) for kind in PROGRAM_SOURCES)
    for _, _, row in TUNING:
        for name in row.build_defines():
            assert f"#ifndef {name}" in src, name
    for name, prog in KERNELS.items():   # every kernel the engine launches is built under its name
        assert cpu_device.kernel(name, "float32").function_name == name
        assert name in cpu_device.program(prog, "float32").kernel_names.split(";")
    # the spatial template, at both widths
    assert re.findall(r"^#define SPW (\d+)$", program_source("ce"), re.M) == ["8", "16"]


def test_kernel_objects_are_per_thread(cpu_device):
    """pyopencl kernels hold their arguments: two threads must never share one."""
    seen = {}

    def grab(i):
        seen[i] = cpu_device.kernel("ce_rows_item", "float32")

    threads = [threading.Thread(target=grab, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert seen[0] is not seen[1]
    assert cpu_device.kernel("ce_rows_item", "float32") is cpu_device.kernel("ce_rows_item", "float32")


def test_concurrent_engines_on_one_device_agree(engine):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((300, 500)).astype(np.float32)
    t = rng.integers(0, 500, 300)
    ref = engine.cross_entropy(x, t, return_grad=True)
    out = [None] * 4

    def run(i):
        out[i] = engine.cross_entropy(x, t, return_grad=True)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    for r in out:
        assert r.loss.tobytes() == ref.loss.tobytes() and r.grad.tobytes() == ref.grad.tobytes()


def test_group_size_rule():
    """Power of two (the tree reductions halve), at most the kernel's and local memory's limits,
    at least one warp or wavefront where those allow it."""
    assert group_size(256, 32, 1024, 1365) == 256           # NVIDIA: 8 warps
    assert group_size(128, 64, 256, 10_000) == 128          # AMD: 2 wavefronts
    assert group_size(128, 256, 1024, 10_000) == 256        # a multiple wider than the target wins
    assert group_size(1024, 32, 1024, 819) == 512           # fp64 local arrays bind first
    assert group_size(256, 1, 200, 10_000) == 128           # a kernel limit that is no power of two
    assert group_size(256, 12, 1024, 10_000) == 256         # a multiple that is no power of two: ignored


def test_every_tuning_row_says_where_its_figures_come_from():
    for vendor, kind, row in TUNING:
        assert row.source.startswith(("measured: ", "guess: ")), (vendor, kind)
        assert (row.group_target is not None) == (row.launch.rows == "group"), (vendor, kind)


def test_group_rows_read_their_work_group_size_off_the_device():
    """The NVIDIA row on this device: its size comes from ce_rows_group's own limits as the device
    reports them (PoCL: a preferred multiple of 8, thousands of work-items), not from the table."""
    dev = open_devices(tuning_row=("NVIDIA", "gpu"))[0]
    read = dev.tuning.describe()["read_off_device"]
    k = dev.kernel("ce_rows_group", "float32")
    info = cl.kernel_work_group_info
    multiple = k.get_work_group_info(info.PREFERRED_WORK_GROUP_SIZE_MULTIPLE, dev.cl_device)
    assert read["local_size"]["preferred_multiple"] == multiple
    assert read["local_size"]["kernel_max"] >= dev.launch.local_size
    assert dev.launch.local_size == group_size(256, multiple, read["local_size"]["kernel_max"],
                                               read["local_size"]["local_mem_limit"])
    assert dev.tuning.build_defines()["CE_WG_SIZE"] == dev.launch.local_size
    # a size named by the caller is used as given
    fixed = open_devices(tuning_row=("NVIDIA", "gpu"), tuning_overrides={"local_size": 64, "reduce_local_size": 32})[0]
    assert (fixed.launch.local_size, fixed.launch.reduce_local_size) == (64, 32)
    assert "read_off_device" not in fixed.tuning.describe()


# ---- --device-memory: host-memory devices through the discrete path ------------------------------

def test_device_memory_flag_and_setting(monkeypatch):
    from clce_server.__main__ import parse_args
    from clce_server.config import Settings

    monkeypatch.delenv("CLCE_DEVICE_MEMORY", raising=False)   # CI runs this file in both modes
    assert parse_args([]).device_memory == "auto"
    assert parse_args(["--device-memory", "discrete"]).device_memory == "discrete"
    monkeypatch.setenv("CLCE_DEVICE_MEMORY", "host")
    assert Settings().device_memory == "host"
    with pytest.raises(SystemExit):
        parse_args(["--device-memory", "unified"])


@pytest.mark.parametrize("mode, want", [("auto", "host"), ("host", "host"), ("discrete", "discrete")])
def test_memory_mode_is_read_off_the_device_or_forced(mode, want):
    dev = open_devices(memory=mode)[0]
    assert dev.memory == want and dev.describe()["memory"] == want
    assert dev.host_unified == (want == "host")


def test_loss_on_pocl_through_the_discrete_path_matches_the_host_path():
    """The loss path's discrete branch (pooled device buffers, copies in and out) on PoCL: the
    same kernels, so the same bits as the host path's USE_HOST_PTR buffers."""
    from clce_server.cross_entropy.engine import LossEngine

    rng = np.random.default_rng(3)
    x = rng.standard_normal((300, 517)).astype(np.float32)
    t = rng.integers(0, 517, 300)
    t[::7] = -100
    host, disc = (LossEngine(open_devices(memory=m)[0]) for m in ("host", "discrete"))
    for kw in (dict(), dict(reduction="none", label_smoothing=0.1, return_lse=True, return_argmax=True)):
        a = host.cross_entropy(x, t, return_grad=True, **kw)
        b = disc.cross_entropy(x, t, return_grad=True, **kw)
        for name in ("loss", "grad", "lse", "argmax"):
            if getattr(a, name) is not None:
                np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)


def test_server_reports_each_devices_memory():
    """The whole server with --device-memory discrete: /v1/info says so per device, and both
    operations answer (their values are checked against torch in the linear, service and
    Oclgrind tests)."""
    import httpx
    from tests.support.serverproc import ServerProcess

    from clce_wire import protocol

    with ServerProcess(args=["--device-memory", "discrete"], env={"CLCE_WARMUP": "0"}) as srv:
        info = httpx.get(srv.url + "/v1/info").json()
        assert [d["memory"] for d in info["devices"]] == ["discrete"]
        rng = np.random.default_rng(4)
        msg = {"v": 1, "hidden": rng.standard_normal((70, 16)).astype(np.float32),
               "target": rng.integers(0, 50, 70), "weight": rng.standard_normal((50, 16)).astype(np.float32)}
        r = httpx.post(srv.url + "/v1/linear_cross_entropy", headers={"Content-Type": protocol.MSGPACK},
                       content=b"".join(bytes(s) for s in protocol.encode_message(msg)), timeout=60)
        assert r.status_code == 200, r.text
    with ServerProcess(env={"CLCE_WARMUP": "0", "CLCE_DEVICE_MEMORY": "host"}) as srv:
        assert [d["memory"] for d in httpx.get(srv.url + "/v1/info").json()["devices"]] == ["host"]
