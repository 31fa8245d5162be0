"""lego (Debian's package) against a real ``certpulse ca serve --tls``: an account bound by EAB,
http-01 and tls-alpn-01 through lego's own listeners, dns-01 through its ``exec`` provider and
the local DNS test server, ``lego renew`` (by days left: this lego predates ARI),
``lego revoke``, and a name the template forbids as lego shows it. Every certificate is checked
at the CA: it chains to the CA's root (openssl), carries the names asked for and the template
extension, is listed with its template and has its audit row.

One CA and one server for the module (SQLite: the ACME flow does not depend on the database).
Tests run in order and build on each other, as an operator would."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from acme_services import (
    Endpoint,
    Lego,
    acme_ca,
    audit_rows,
    ca_status,
    dns_names,
    first_certificate,
    has_template_extension,
    hook_calls,
    issued_rows,
    new_eab,
    openssl_verify,
    serial_hex,
    validated_by,
)
from challtestsrv import ChallTestSrv
from support import CA, Client, root_trust, serve

pytestmark = pytest.mark.sqlite_only

PRINCIPAL = "web-lego.example.internal"
HTTP_NAME = "http.lego.example.internal"


@dataclasses.dataclass
class Site:
    ca: CA
    endpoint: Endpoint
    dns: ChallTestSrv
    lego: Lego
    admin: Client  # the CA's admin API key: its certificates and audit trail over HTTP


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    folder = tmp_path_factory.mktemp("acme-lego")
    dns = ChallTestSrv(folder).start()
    try:
        ca, endpoint = acme_ca(folder / "ca", f"sqlite:///{folder / 'ca.db'}", dns, default_profile="webserver")
        ca.add_principal(PRINCIPAL, "--group", "webservers")
        with serve(ca, tls=True) as base:
            endpoint.directory = f"{base}/acme/directory"
            # lego registers the account (with this binding) on its first run and keeps it in --path.
            yield Site(ca, endpoint, dns, Lego(folder / "lego", endpoint, new_eab(ca, PRINCIPAL), dns),
                       Client(base, ca.admin_key, verify=root_trust(ca)))
    finally:
        dns.stop()


def assert_issued_by_ca(site: Site, name: str) -> str:
    """lego's certificate verifies up to the CA's root with openssl (through the issuer lego
    saved), names exactly ``name``, and the CA lists it (good, webserver) with an ``issued``
    audit row for the principal."""
    cert_path = site.lego.certificate(name)
    openssl_verify(site.endpoint.trust, cert_path, site.lego.issuer(name))
    cert = first_certificate(cert_path)
    assert dns_names(cert) == [name]
    assert has_template_extension(cert)
    status = ca_status(site.admin, cert)
    assert status["status"] == "good" and status["template"] == "webserver", status
    rows = issued_rows(site.admin, cert)
    assert [row["actor"] for row in rows] == [f"principal:{PRINCIPAL}"], rows
    return serial_hex(cert)


def test_http01(site: Site) -> None:
    site.lego.run(HTTP_NAME, site.lego.http(), "run")
    assert_issued_by_ca(site, HTTP_NAME)
    assert [row["actor"] for row in audit_rows(site.admin, "acme-account-created")] == [f"principal:{PRINCIPAL}"]
    assert validated_by(site.admin) == ["http-01"]


def test_tls_alpn01(site: Site) -> None:
    """tls-alpn-01, with an RSA certificate key this time (the webserver template allows RSA)."""
    name = "tls.lego.example.internal"
    site.lego.run(name, [*site.lego.tls(), "--key-type", "rsa2048"], "run")
    assert_issued_by_ca(site, name)
    key = first_certificate(site.lego.certificate(name)).public_key()
    assert isinstance(key, rsa.RSAPublicKey) and key.key_size == 2048
    assert validated_by(site.admin)[-1] == "tls-alpn-01"


def test_dns01_exec_provider(site: Site) -> None:
    """lego's exec provider ran the test's script: the TXT record the CA looked up was set at
    the DNS test server, then cleared."""
    name = "dns.lego.example.internal"
    site.lego.run(name, site.lego.dns_exec(), "run")
    calls = hook_calls(site.lego.folder)
    assert [(c["call"], c["host"]) for c in calls] == [("/set-txt", f"_acme-challenge.{name}."),
                                                       ("/clear-txt", f"_acme-challenge.{name}.")]
    assert_issued_by_ca(site, name)
    assert validated_by(site.admin)[-1] == "dns-01"


def test_renew_by_days_left(site: Site) -> None:
    """A 90-day certificate with more than 30 days left is not renewed; asked to renew within
    91 days, lego gets a new certificate (new serial, good at the CA)."""
    first = serial_hex(first_certificate(site.lego.certificate(HTTP_NAME)))
    site.lego.run(HTTP_NAME, site.lego.http(), "renew", "--days", "30", "--no-random-sleep")
    assert serial_hex(first_certificate(site.lego.certificate(HTTP_NAME))) == first
    site.lego.run(HTTP_NAME, site.lego.http(), "renew", "--days", "91", "--no-random-sleep")
    second = assert_issued_by_ca(site, HTTP_NAME)
    assert second != first


def test_revoke(site: Site) -> None:
    """`lego revoke --reason 1`: the CA then says revoked, reason keyCompromise."""
    cert = first_certificate(site.lego.certificate(HTTP_NAME))
    site.lego.run(HTTP_NAME, [], "revoke", "--reason", "1", "--keep")
    status = ca_status(site.admin, cert)
    assert status["status"] == "revoked" and status["revocation_reason"] == "keyCompromise", status
    rows = [row for row in audit_rows(site.admin, "revoked") if int(row["serial"], 16) == cert.serial_number]
    assert [(row["actor"], row["reason"]) for row in rows] == [(f"principal:{PRINCIPAL}", "keyCompromise")], rows


def test_name_the_template_forbids(site: Site) -> None:
    """A name outside the webserver template's rules: the CA refuses the order
    (rejectedIdentifier), lego shows it, and nothing is issued or validated."""
    issued_before = len(audit_rows(site.admin, "issued"))
    refused = site.lego.run("www.example.com", site.lego.http(), "run", check=False)
    output = refused.stdout + refused.stderr
    assert refused.returncode != 0, output
    assert "urn:ietf:params:acme:error:rejectedIdentifier" in output, output
    assert len(audit_rows(site.admin, "issued")) == issued_before
    rows = audit_rows(site.admin, "acme-order-refused")
    assert [(row["actor"], row["reason"]) for row in rows] == [(f"principal:{PRINCIPAL}", "rejected-identifier")]
    assert "www.example.com" in rows[0]["detail"], rows
