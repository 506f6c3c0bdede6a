import pytest


@pytest.fixture(scope="session")
def cpu_device():
    """The default OpenCL device (PoCL's CPU device in CI), opened once per session."""
    from clce_server.rails.device import open_devices

    return open_devices()[0]


@pytest.fixture(scope="session")
def wg_device():
    """The same hardware with the GPU kernel shape (one work-group per row), so the GPU code path
    is checked for correctness on PoCL too. Small work-groups keep it quick on a CPU."""
    from clce_server.rails.device import open_devices

    return open_devices(tuning_overrides={"rows": "group", "local_size": 16, "reduce_local_size": 32})[0]


@pytest.fixture(scope="session")
def engine(cpu_device):
    from clce_server.cross_entropy.engine import LossEngine

    return LossEngine(cpu_device)


@pytest.fixture(scope="session")
def wg_engine(wg_device):
    from clce_server.cross_entropy.engine import LossEngine

    return LossEngine(wg_device)


# --------------------------------------------------------------------------------------------------
# No test leaves a process behind: at the end of the run, every child of pytest has exited.

ORPHAN_GRACE_S = 15.0


def pytest_sessionfinish(session, exitstatus):
    """Fail the run if any descendant of the pytest process is still alive once every test and
    fixture has finished (after a grace period for processes that are exiting). The survivors are
    listed and killed, so a leak is reported instead of hanging CI or outliving it."""
    import time

    import psutil

    me = psutil.Process()
    deadline = time.monotonic() + ORPHAN_GRACE_S
    alive = []
    while True:
        alive = [p for p in me.children(recursive=True) if _running(p)]
        if not alive or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    if not alive:
        return
    lines = []
    for p in alive:
        try:
            lines.append(f"  pid {p.pid}: {' '.join(p.cmdline())[:200]}")
            p.kill()
        except psutil.Error:
            pass
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    message = f"{len(alive)} process(es) started by the tests outlived them (killed now):\n" + "\n".join(lines)
    if reporter is not None:
        reporter.write_line(message, red=True)
    else:
        print(message)
    session.exitstatus = 1


def _running(p) -> bool:
    import psutil

    try:
        return p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False
