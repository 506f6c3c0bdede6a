import pytest


@pytest.fixture(scope="session")
def cpu_device():
    """The default OpenCL device (PoCL's CPU device in CI), opened once per session."""
    from clce_server.device import open_devices

    return open_devices()[0]


@pytest.fixture(scope="session")
def wg_device():
    """The same hardware with the GPU kernel shape (one work-group per row), so the GPU code path
    is checked for correctness on PoCL too. Small work-groups keep it quick on a CPU."""
    from clce_server.device import open_devices

    return open_devices(tuning_overrides={"CE_WG_PER_ROW": 1, "CE_WG_SIZE": 16, "RED_WG_SIZE": 32})[0]


@pytest.fixture(scope="session")
def engine(cpu_device):
    from clce_server.engine import LossEngine

    return LossEngine(cpu_device)


@pytest.fixture(scope="session")
def wg_engine(wg_device):
    from clce_server.engine import LossEngine

    return LossEngine(wg_device)
