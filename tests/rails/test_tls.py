"""TLS: the server with --ssl-certfile/--ssl-keyfile (uvicorn's names), the client with verify=
(httpx's name), against a throwaway CA made here."""

from __future__ import annotations

import datetime
import ipaddress
import ssl
import time

import httpx
import numpy as np
import pytest
from tests.support.serverproc import ServerProcess, ServerStartError  # noqa: E402

import clce_client  # noqa: E402
from clce_client import errors  # noqa: E402

x509 = pytest.importorskip("cryptography.x509")
from cryptography.hazmat.primitives import hashes, serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ec  # noqa: E402
from cryptography.x509.oid import NameOID  # noqa: E402


def _cert(subject, issuer, public_key, signing_key, *, ca: bool):
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer).public_key(public_key)
               .serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5))
               .not_valid_after(now + datetime.timedelta(hours=1))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if ca:
        builder = builder.add_extension(x509.KeyUsage(
            digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
            key_encipherment=False, data_encipherment=False, key_agreement=False, encipher_only=False,
            decipher_only=False), critical=True)
    else:
        builder = builder.add_extension(x509.SubjectAlternativeName(
            [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]), critical=False)
    return builder.sign(signing_key, hashes.SHA256())


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """A CA, and a server certificate for 127.0.0.1 it signed: PEM files."""
    d = tmp_path_factory.mktemp("pki")
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "clce test CA")])
    ca = _cert(ca_name, ca_name, ca_key.public_key(), ca_key, ca=True)
    key = ec.generate_private_key(ec.SECP256R1())
    cert = _cert(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]), ca_name,
                 key.public_key(), ca_key, ca=False)
    paths = {"ca": d / "ca.pem", "cert": d / "server.pem", "key": d / "server.key"}
    paths["ca"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths["cert"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths["key"].write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
    return paths


class TLSServer(ServerProcess):
    def __init__(self, pki, **kwargs):
        super().__init__(args=["--ssl-certfile", str(pki["cert"]), "--ssl-keyfile", str(pki["key"])], **kwargs)
        self.ca = str(pki["ca"])

    @property
    def url(self) -> str:
        return f"https://{self.host}:{self.port}"

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.ready_timeout
        with httpx.Client(timeout=2.0, verify=ssl.create_default_context(cafile=self.ca)) as http:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise ServerStartError(f"exited {self.proc.returncode}\n{self.log()}")
                try:
                    if http.get(self.url + "/readyz").status_code == 200:
                        return
                except httpx.HTTPError:
                    pass
                time.sleep(0.1)
        raise ServerStartError(f"not ready\n{self.log()}")


@pytest.fixture(scope="module")
def tls_server(pki):
    with TLSServer(pki) as srv:
        yield srv


def test_https_with_the_ca_given_as_verify(tls_server, pki):
    x = np.random.default_rng(0).standard_normal((4, 6)).astype(np.float32)
    t = np.array([0, 5, 2, 1])
    for verify in (str(pki["ca"]), pki["ca"], ssl.create_default_context(cafile=str(pki["ca"]))):
        with clce_client.Client(tls_server.url, verify=verify) as c:
            loss = c.cross_entropy(x, t)
            assert c.readyz()
    torch = pytest.importorskip("torch")
    assert loss.item() == pytest.approx(torch.nn.functional.cross_entropy(
        torch.from_numpy(x), torch.from_numpy(t)).item(), rel=1e-6)


def test_an_unknown_ca_is_refused(tls_server):
    with clce_client.Client(tls_server.url, retries=0) as c:    # system CAs: ours is not among them
        with pytest.raises(errors.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
            c.info()
    with clce_client.Client(tls_server.url, verify=False) as c:  # httpx's opt-out, for completeness
        assert c.info()["name"] == "clce"


def test_plain_http_to_the_tls_port_gets_no_answer(tls_server):
    with clce_client.Client(tls_server.url.replace("https://", "http://"), retries=0) as c:
        with pytest.raises(errors.TransportError):
            c.info()


def test_settings_want_certificate_and_key_together():
    from clce_server.__main__ import parse_args

    with pytest.raises(SystemExit):
        parse_args(["--ssl-certfile", "x.pem"])


def test_a_certificate_that_does_not_verify_fails_at_once_naming_the_cas(tls_server, pki, caplog, monkeypatch):
    """Permanent: no retry (not one log line of one), and the error names the URL and the CAs tried."""
    for env in ("SSL_CERT_FILE", "SSL_CERT_DIR"):   # httpx would take the CAs from there
        monkeypatch.delenv(env, raising=False)
    x, t = np.zeros((2, 3), np.float32), np.array([0, 1])
    for verify, named in ((True, "certifi's CA bundle"), (str(pki["cert"]), f"the CA bundle {pki['cert']}")):
        caplog.clear()
        t0 = time.monotonic()
        with clce_client.Client(tls_server.url, verify=verify, retries=3) as c:
            with pytest.raises(errors.TLSVerificationError) as info:
                c.cross_entropy(x, t)
        assert time.monotonic() - t0 < 2.0
        msg = str(info.value)
        assert msg.startswith(f"{tls_server.url}: the server's TLS certificate failed verification against {named}")
        assert "CERTIFICATE_VERIFY_FAILED" in msg and "verify=<path to its PEM bundle>" in msg
        assert not [r for r in caplog.records if r.name == "clce"], caplog.records
