"""A real server (`python -m clce_server`) with a tenants file of two tenants and an admin, and a
separate metrics listener: the fixture `server` (module scope) of the tenant-isolation tests;
import it into a test module to use it."""

from __future__ import annotations

import pytest

from tests.support.serverproc import free_port, run_server


KEYS = {"alpha": "sk-alpha-Iso1Tq8Wn3Ke", "beta": "sk-beta-Iso2Xy5Rb7Lm"}


ADMIN_KEY = "sk-admin-Iso3Fd9Hs4Pz"


WRONG_KEY = "sk-wrong-Iso4Ja6Vc2Qo"


SECRETS = (*KEYS.values(), ADMIN_KEY, WRONG_KEY)


METRICS_PORT = free_port()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    path = tmp_path_factory.mktemp("iso") / "tenants.toml"
    path.write_text(f'[admin]\napi_key = "{ADMIN_KEY}"\n\n'
                    + "".join(f'[tenants.{n}]\napi_key = "{k}"\n\n' for n, k in KEYS.items()))
    yield from run_server(tenants=path, args=["--metrics-bind", f"127.0.0.1:{METRICS_PORT}"])
