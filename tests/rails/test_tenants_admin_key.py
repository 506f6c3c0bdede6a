"""Tenant isolation: the admin key in the tenants file."""

from __future__ import annotations

import textwrap

import pytest

from clce_server.tenants import TenantRegistry

KEY_A = "sk-alpha-0123456789abcdef"
KEY_B = "sk-bravo-fedcba9876543210"
ADMIN = "sk-admin-5555aaaa5555aaaa"

FILE = f"""
[admin]
api_key = "{ADMIN}"

[tenants.train-a]
api_key = "{KEY_A}"

[tenants.train-b]
api_key = "{KEY_B}"
"""


def write(tmp_path, text):
    path = tmp_path / "tenants.toml"
    path.write_text(textwrap.dedent(text))
    return path


def test_admin_key_is_declared_in_the_tenants_file(tmp_path):
    reg = TenantRegistry.from_toml(write(tmp_path, FILE))
    assert reg.has_admin and [t.name for t in reg] == ["train-a", "train-b"]
    assert reg.is_admin(f"Bearer {ADMIN}")
    assert not reg.is_admin(f"Bearer {KEY_A}") and not reg.is_admin(None) and not reg.is_admin("Bearer x")
    assert reg.authenticate(f"Bearer {ADMIN}") is None          # not a tenant: cannot submit work
    assert reg.authenticate(f"Bearer {KEY_A}").name == "train-a"
    assert ADMIN not in repr(reg) and "admin=True" in repr(reg)


def test_without_admin_table_nobody_is_admin(tmp_path):
    reg = TenantRegistry.from_toml(write(tmp_path, FILE.split("[tenants.train-a]")[0].replace(
        f'[admin]\napi_key = "{ADMIN}"\n', "") + f'[tenants.train-a]\napi_key = "{KEY_A}"\n'))
    assert not reg.has_admin and not reg.is_admin(f"Bearer {ADMIN}") and not reg.is_admin(f"Bearer {KEY_A}")


def test_open_server_everyone_is_admin():
    reg = TenantRegistry.open()
    assert reg.is_admin(None) and not reg.has_admin


@pytest.mark.parametrize("admin, message", [
    (f'[admin]\napi_key = "{KEY_A}"\n', "the admin key is also a tenant's key"),
    ('[admin]\napi_key = ""\n', "must not be empty"),
    ('[admin]\napi_key = "a b"\n', "whitespace"),
    (f'[admin]\napi_key = "{ADMIN}"\nweight = 2\n', "exactly one field"),
    ('admin = "x"\n', "exactly one field"),
])  # fmt: skip
def test_bad_admin_tables_are_refused_without_showing_the_key(tmp_path, admin, message):
    text = admin + f'\n[tenants.train-a]\napi_key = "{KEY_A}"\n'
    with pytest.raises(ValueError, match=message) as info:
        TenantRegistry.from_toml(write(tmp_path, text))
    assert KEY_A not in str(info.value) and ADMIN not in str(info.value)
