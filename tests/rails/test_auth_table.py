"""docs/protocol.md's one table of who may call what, checked against the app: every route of the
app is in the table and every row is a route, and the app with a tenants file (called in this
process) answers each row as its key rule says, for no key, a wrong key, a tenant's key and the
admin key."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.support.app_routes import app_routes
from tests.support.inprocess import app_client

DOC = Path(__file__).resolve().parents[2] / "docs" / "protocol.md"
TENANT_KEY, ADMIN_KEY, WRONG_KEY = "sk-tenant-Auth1Tb7Lq", "sk-admin-Auth2Xc5Mz", "sk-wrong-Auth3Vn8Pr"

# per rule: whether each caller (no key, wrong key, tenant's key, admin key) gets past auth
RULES = {
    "none": (True, True, True, True),
    "none; a key shows more": (True, False, True, True),
    "tenant": (False, False, True, False),
    "tenant or admin": (False, False, True, True),
    "admin": (False, False, False, True),
}
CALLERS = ("no key", "wrong key", "tenant key", "admin key")


def documented() -> dict[tuple[str, str], str]:
    """(method, path) -> key rule, from the table under '## Endpoints, and who may call what'."""
    text = DOC.read_text()
    section = text[text.index("## Endpoints, and who may call what"):]
    section = section[:section.index("\n## ", 4)]
    rows = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 4 or not cells[0].startswith("`"):
            continue
        for method, path in re.findall(r"`([A-Z]+) (/[^`]*)`", cells[0]):
            rows[(method, path)] = cells[3]
    return rows


def test_the_table_names_every_route_and_only_routes():
    rows = documented()
    assert set(rows) == app_routes()
    assert set(rows.values()) <= set(RULES), set(rows.values()) - set(RULES)


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    """The app with a tenants file, called in this process (routes and auth need no server process)."""
    path = tmp_path_factory.mktemp("auth") / "tenants.toml"
    path.write_text(f'[admin]\napi_key = "{ADMIN_KEY}"\n\n[tenants.t]\napi_key = "{TENANT_KEY}"\n')
    with app_client(tenants=path) as client:
        yield client


def test_a_server_answers_every_row_as_documented(app):
    headers = ({}, {"Authorization": f"Bearer {WRONG_KEY}"}, {"Authorization": f"Bearer {TENANT_KEY}"},
               {"Authorization": f"Bearer {ADMIN_KEY}"})
    seen = []
    for (method, path), rule in sorted(documented().items()):
        for caller, h, allowed in zip(CALLERS, headers, RULES[rule]):
            # a JSON body that fails later than auth: past auth it is a 400, never a 401
            r = app.request(method, path, headers={**h, "Content-Type": "application/json"},
                            content=b"{}" if method == "POST" else None)
            assert (r.status_code != 401) == allowed, (method, path, rule, caller, r.status_code, r.text[:200])
            assert r.status_code < 500, (method, path, caller, r.status_code)
            seen.append((path, caller, r.status_code))
    assert len(seen) == 4 * len(documented())
