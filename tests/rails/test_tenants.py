import hmac
import textwrap

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from clce_server import tenants as tenants_mod
from clce_server.tenants import GiB, MiB, Tenant, TenantRegistry

KEY_A = "sk-alpha-0123456789abcdef"
KEY_B = "sk-bravo-fedcba9876543210"

VALID = f"""
[tenants.train-a]
api_key = "{KEY_A}"
weight = 2
max_request_bytes = 1048576
max_inflight_bytes = 4194304
max_queued = 8

[tenants.train-b]
api_key = "{KEY_B}"
weight = 0.5
"""


def write(tmp_path, text):
    path = tmp_path / "tenants.toml"
    path.write_text(textwrap.dedent(text))
    return path


@pytest.fixture
def registry(tmp_path):
    return TenantRegistry.from_toml(write(tmp_path, VALID))


def test_parse_valid_file(registry):
    assert registry.auth_required
    assert [t.name for t in registry.tenants] == ["train-a", "train-b"]
    a = registry.get("train-a")
    assert a == Tenant("train-a", KEY_A, 2.0, 1 * MiB, 4 * MiB, 8)
    assert isinstance(a.weight, float)
    b = registry.get("train-b")
    assert (b.weight, b.max_request_bytes, b.max_inflight_bytes, b.max_queued) == (
        0.5, 256 * MiB, 1 * GiB, 64,
    )
    assert registry.get("nope") is None
    assert len(registry) == 2 and list(registry) == registry.tenants


def test_defaults_fill_omitted_fields(tmp_path):
    reg = TenantRegistry.from_toml(
        write(tmp_path, VALID), defaults={"max_queued": 3, "max_request_bytes": 1000}
    )
    # The file's own values win; defaults only fill gaps.
    assert reg.get("train-a").max_queued == 8
    assert reg.get("train-b").max_queued == 3
    assert reg.get("train-b").max_request_bytes == 1000


def test_tenant_list_is_a_copy(registry):
    registry.tenants.clear()
    assert len(registry.tenants) == 2


@pytest.mark.parametrize(
    "body, fragments",
    [
        ('api_key = "k1"\ncolour = "blue"', ["train-a", "colour"]),
        ("weight = 1", ["train-a", "api_key", "required"]),
        ('api_key = ""', ["train-a", "api_key", "empty"]),
        ("api_key = 42", ["train-a", "api_key", "string"]),
        ('api_key = "has space"', ["train-a", "api_key", "whitespace"]),
        ('api_key = "k1"\nweight = 0', ["train-a", "weight", "positive"]),
        ('api_key = "k1"\nweight = -1.5', ["train-a", "weight", "positive"]),
        ('api_key = "k1"\nweight = nan', ["train-a", "weight", "positive"]),
        ('api_key = "k1"\nweight = true', ["train-a", "weight"]),
        ('api_key = "k1"\nmax_request_bytes = 0', ["train-a", "max_request_bytes"]),
        ('api_key = "k1"\nmax_inflight_bytes = -5', ["train-a", "max_inflight_bytes"]),
        ('api_key = "k1"\nmax_queued = 2.5', ["train-a", "max_queued", "integer"]),
    ],
)
def test_validation_errors_name_tenant_and_field(tmp_path, body, fragments):
    path = write(tmp_path, "[tenants.train-a]\n" + body + "\n")
    with pytest.raises(ValueError) as info:
        TenantRegistry.from_toml(path)
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message
    assert "k1" not in message and "has space" not in message


def test_duplicate_keys_rejected_without_echoing_key(tmp_path):
    text = f'[tenants.one]\napi_key = "{KEY_A}"\n[tenants.two]\napi_key = "{KEY_A}"\n'
    with pytest.raises(ValueError) as info:
        TenantRegistry.from_toml(write(tmp_path, text))
    message = str(info.value)
    assert "'one'" in message and "'two'" in message and "api_key" in message
    assert KEY_A not in message


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("", "no [tenants"),
        ("[tenants]\n", "no [tenants"),
        ('[other]\nx = 1\n[tenants.a]\napi_key = "k"\n', "other"),
        ('tenants = "x"\n', "no [tenants"),
        ('[tenants]\na = 1\n', "expected a table"),
        ("[tenants.a\n", "invalid TOML"),
    ],
)
def test_malformed_files(tmp_path, text, fragment):
    with pytest.raises(ValueError) as info:
        TenantRegistry.from_toml(write(tmp_path, text))
    assert fragment in str(info.value)


def test_unknown_default_rejected():
    with pytest.raises(ValueError, match="colour"):
        TenantRegistry.open({"colour": 1})


def test_key_not_in_repr_or_str(registry):
    for tenant in registry.tenants:
        for text in (repr(tenant), str(tenant), repr(registry), str(registry)):
            assert KEY_A not in text and KEY_B not in text
    assert "train-a" in repr(registry.get("train-a"))


def test_authenticate(registry):
    assert registry.authenticate(f"Bearer {KEY_A}").name == "train-a"
    assert registry.authenticate(f"bearer   {KEY_B}  ").name == "train-b"
    assert registry.authenticate(None) is None
    assert registry.authenticate("") is None
    assert registry.authenticate("Bearer") is None
    assert registry.authenticate(f"Basic {KEY_A}") is None
    assert registry.authenticate(KEY_A) is None
    assert registry.authenticate(f"Bearer {KEY_A} extra") is None
    assert registry.authenticate(f"Bearer {KEY_A}x") is None
    assert registry.authenticate(f"Bearer {KEY_A[:-1]}") is None
    assert registry.authenticate("Bearer sk-ünïcode") is None


@pytest.mark.parametrize("header", [f"Bearer {KEY_A}", f"Bearer {KEY_B}", "Bearer wrong"])
def test_compare_digest_called_for_every_tenant(registry, monkeypatch, header):
    calls = []
    real = hmac.compare_digest

    def counting(a, b):
        calls.append(1)
        return real(a, b)

    monkeypatch.setattr(tenants_mod.hmac, "compare_digest", counting)
    registry.authenticate(header)
    # No early exit: the first tenant matching still compares against the second.
    assert len(calls) == len(registry.tenants)


def test_open_registry():
    reg = TenantRegistry.open({"max_queued": 5, "weight": 3})
    assert not reg.auth_required
    [tenant] = reg.tenants
    assert (tenant.name, tenant.api_key) == ("default", None)
    assert (tenant.max_queued, tenant.weight) == (5, 3.0)
    # Auth disabled: every request is the default tenant, header or not.
    assert reg.authenticate(None) is tenant
    assert reg.authenticate("Bearer anything") is tenant
    assert TenantRegistry.open().tenants[0].max_request_bytes == 256 * MiB


def test_registry_constructor_checks():
    with pytest.raises(ValueError, match="duplicate tenant name"):
        TenantRegistry([Tenant("a", "k1"), Tenant("a", "k2")])
    with pytest.raises(ValueError, match="'a'.*api_key.*required"):
        TenantRegistry([Tenant("a")])
    with pytest.raises(ValueError, match="exactly one"):
        TenantRegistry([Tenant("a"), Tenant("b")], auth_required=False)
    with pytest.raises(ValueError, match="non-empty"):
        Tenant("")


_near_miss_headers = st.builds(
    lambda scheme, sep, key, tail: scheme + sep + key + tail,
    st.sampled_from(["Bearer", "bearer", "BEARER", "Token", "Bearer:", ""]),
    st.sampled_from([" ", "  ", "\t", ""]),
    st.sampled_from([KEY_A, KEY_B, KEY_A[:-1], KEY_B + "0", ""]),
    st.sampled_from(["", " ", "x", " x"]),
)


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.none(), st.text(max_size=60), _near_miss_headers))
def test_authenticate_arbitrary_headers(header):
    reg = TenantRegistry([Tenant("a", KEY_A), Tenant("b", KEY_B)])
    result = reg.authenticate(header)
    expected = None
    if header is not None:
        parts = header.split()
        if len(parts) == 2 and parts[0].lower() == "bearer":
            expected = {KEY_A: "a", KEY_B: "b"}.get(parts[1])
    assert (result.name if result else None) == expected
