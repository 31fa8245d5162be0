"""certbot (the PyPI release in the dev extras) against a real ``certpulse ca serve --tls``: an
account bound by EAB, http-01 through certbot's own web server, dns-01 through manual hooks and
the local DNS test server, profiles (templates), ``certbot renew`` deciding by ARI, and
``certbot revoke``. Every certificate is then checked at the CA: it chains to the CA's root,
carries the names asked for, is listed with its template and has its audit row.

One CA and one server for the module (SQLite: the ACME flow does not depend on the database;
the protocol and the store are tested on both backends elsewhere). Tests run in order and build
on each other (one account, one certificate lineage), as an operator would."""

from __future__ import annotations

import dataclasses
import datetime as dt
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from acme_services import (
    Certbot,
    Endpoint,
    acme_ca,
    audit_rows,
    ca_status,
    dns_names,
    first_certificate,
    hook_calls,
    issued_rows,
    new_eab,
    openssl_verify,
    serial_hex,
    validated_by,
)
from challtestsrv import ChallTestSrv
from support import CA, TEMPLATES, root_trust, serve

pytestmark = pytest.mark.sqlite_only

PRINCIPAL = "web-certbot.example.internal"
WWW = "www.certbot.example.internal"
# The CA's renewalInfo answers say "ask again in 2 s" here (6 h by default), so that the
# `certbot renew` after `template reenroll-all` asks the CA again instead of trusting the answer
# it stored a moment before: certbot honours Retry-After (renewal.py: _ari_renewal_time).
ARI_RETRY_AFTER = "2s"


@dataclasses.dataclass
class Site:
    ca: CA
    endpoint: Endpoint
    dns: ChallTestSrv
    certbot: Certbot
    base: str


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    folder = tmp_path_factory.mktemp("acme-certbot")
    dns = ChallTestSrv(folder).start()
    try:
        ca, endpoint = acme_ca(folder / "ca", f"sqlite:///{folder / 'ca.db'}", dns,
                               default_profile="webserver", ari_retry_after=ARI_RETRY_AFTER)
        ca.add_principal(PRINCIPAL, "--group", "webservers")
        with serve(ca, tls=True) as base:
            endpoint.directory = f"{base}/acme/directory"
            yield Site(ca, endpoint, dns, Certbot(folder / "certbot", endpoint), base)
    finally:
        dns.stop()


def assert_issued_by_ca(site: Site, cert_path: Path, chain_path: Path, names: list[str],
                        template: str = "webserver") -> str:
    """The certificate verifies up to the CA's root with openssl, names exactly ``names``, and
    the CA lists it (good, under ``template``) with an ``issued`` audit row for the principal."""
    openssl_verify(site.endpoint.trust, cert_path, chain_path)
    cert = first_certificate(cert_path)
    assert sorted(dns_names(cert)) == sorted(names)
    status = ca_status(site.ca, cert)
    assert status["status"] == "good" and status["template"] == template, status
    rows = issued_rows(site.ca, cert)
    assert [row["actor"] for row in rows] == [f"principal:{PRINCIPAL}"], rows
    assert sorted(rows[0]["names"]) == sorted(names), rows
    return serial_hex(cert)


def test_register_with_external_account_binding(site: Site) -> None:
    """certbot registers with the key id and HMAC key `certpulse principal acme-eab` printed; the
    same binding cannot make a second account (one use)."""
    eab = new_eab(site.ca, PRINCIPAL)
    site.certbot.register(eab)
    assert [row["actor"] for row in audit_rows(site.ca, "acme-account-created")] == [f"principal:{PRINCIPAL}"]
    again = Certbot(site.certbot.folder.parent / "certbot-again", site.endpoint)
    refused = again.run("register", "--agree-tos", "--register-unsafely-without-email",
                        "--eab-kid", eab[0], "--eab-hmac-key", eab[1], check=False)
    assert refused.returncode != 0, refused.stdout
    assert not (again.folder / "config" / "accounts").exists() or not any(
        (again.folder / "config" / "accounts").rglob("regr.json")), "a second account with a used binding"
    assert len(audit_rows(site.ca, "acme-account-created")) == 1
    assert [row["reason"] for row in audit_rows(site.ca, "acme-account-refused")] == ["unauthenticated"]


def test_http01_standalone(site: Site) -> None:
    site.certbot.certonly_http(WWW)
    assert_issued_by_ca(site, site.certbot.live(WWW), site.certbot.live(WWW, "chain"), [WWW])
    assert validated_by(site.ca)[-1] == "http-01"


def test_dns01_manual_hooks(site: Site) -> None:
    """The auth hook put the TXT record the CA looked up at the DNS test server; the cleanup
    hook removed it."""
    name = "dns.certbot.example.internal"
    site.certbot.certonly_dns(name, site.dns)
    calls = hook_calls(site.certbot.folder)
    assert [(c["call"], c["host"]) for c in calls] == [("/set-txt", f"_acme-challenge.{name}."),
                                                       ("/clear-txt", f"_acme-challenge.{name}.")]
    assert_issued_by_ca(site, site.certbot.live(name), site.certbot.live(name, "chain"), [name])
    assert validated_by(site.ca)[-1] == "dns-01"


def test_profiles_are_templates(site: Site) -> None:
    """The directory lists the templates the CA offers as profiles; `--required-profile` names
    the template the certificate is issued under, and an unknown one is refused by the CA with
    nothing issued."""
    directory = httpx.get(site.endpoint.directory, verify=root_trust(site.ca), timeout=30).json()
    assert "webserver" in directory["meta"]["profiles"], directory
    assert directory["meta"]["externalAccountRequired"] is True, directory

    name = "profile.certbot.example.internal"
    site.certbot.certonly_http(name, "--required-profile", "webserver")
    assert_issued_by_ca(site, site.certbot.live(name), site.certbot.live(name, "chain"), [name])

    missing = "noprofile.certbot.example.internal"
    refused = site.certbot.certonly_http(missing, "--required-profile", "no-such-template", check=False)
    assert refused.returncode != 0, refused.stdout
    assert "no-such-template" in refused.stdout + refused.stderr, refused.stderr
    assert not site.certbot.live(missing).exists()


def stored_retry_after(site: Site, name: str) -> dt.datetime:
    """When certbot will next ask the CA for renewal information (its renewal configuration)."""
    for line in site.certbot.renewal_conf(name).read_text().splitlines():
        key, _, value = line.partition("=")
        if key.strip() == "ari_retry_after":
            return dt.datetime.fromisoformat(value.strip())  # naive local time, as certbot writes it
    raise AssertionError(f"certbot recorded no ari_retry_after for {name}")


def test_renew_follows_ari(site: Site) -> None:
    """`certbot renew` asks the CA's renewalInfo: a fresh certificate's window is weeks away, so
    nothing happens (same serial); after `certpulse template reenroll-all webserver` the window
    is in the past and the same command renews (new serial, good at the CA)."""
    first = serial_hex(first_certificate(site.certbot.live(WWW)))
    quiet = site.certbot.renew(WWW)
    assert "not yet due for renewal" in quiet.stdout + quiet.stderr, quiet.stdout
    assert serial_hex(first_certificate(site.certbot.live(WWW))) == first
    # certbot took its next-check time from the CA's Retry-After (2 s here), not its 6 h default.
    retry_after = stored_retry_after(site, WWW)
    assert retry_after < dt.datetime.now() + dt.timedelta(minutes=5), retry_after

    site.ca.cli("template", "reenroll-all", "webserver")
    deadline = time.monotonic() + 60
    while dt.datetime.now() <= retry_after and time.monotonic() < deadline:
        time.sleep(0.2)
    renewed = site.certbot.renew(WWW)
    second = serial_hex(first_certificate(site.certbot.live(WWW)))
    assert second != first, renewed.stdout + renewed.stderr
    assert_issued_by_ca(site, site.certbot.live(WWW), site.certbot.live(WWW, "chain"), [WWW])


def test_revoke_key_compromise(site: Site) -> None:
    """`certbot revoke` with the account key: the CA then says revoked, reason keyCompromise."""
    cert_path = site.certbot.live(WWW)
    cert = first_certificate(cert_path)
    site.certbot.run("revoke", "--cert-path", str(cert_path), "--reason", "keycompromise",
                     "--no-delete-after-revoke")
    status = ca_status(site.ca, cert)
    assert status["status"] == "revoked" and status["revocation_reason"] == "keyCompromise", status
    response = httpx.get(f"{site.base}/v1/certificates/{serial_hex(cert)}", verify=root_trust(site.ca), timeout=30)
    assert response.status_code == 200 and response.json()["status"] == "revoked", response.text
    rows = [row for row in audit_rows(site.ca, "revoked") if int(row["serial"], 16) == cert.serial_number]
    assert [(row["actor"], row["reason"]) for row in rows] == [(f"principal:{PRINCIPAL}", "keyCompromise")], rows


def test_registered_name_needs_no_challenge_when_the_template_trusts_it(site: Site, tmp_path: Path) -> None:
    """A template with `[acme] trust_registered_names = true`: an order for the principal's own
    name is authorized without a challenge (certbot's auth hook never runs), while any other
    name of the same template still needs its dns-01 challenge. Off by default: the webserver
    orders above all went through their challenges."""
    template = tmp_path / "trusted-web.toml"
    webserver = (TEMPLATES / "webserver.toml").read_text()
    template.write_text(webserver.replace('name = "webserver"', 'name = "trusted-web"', 1)
                        + "\n[acme]\ntrust_registered_names = true\n")
    site.ca.cli("template", "add", str(template))

    before = len(hook_calls(site.certbot.folder))
    site.certbot.certonly_dns(PRINCIPAL, site.dns, "--required-profile", "trusted-web")
    assert len(hook_calls(site.certbot.folder)) == before, "a challenge was solved for the registered name"
    assert_issued_by_ca(site, site.certbot.live(PRINCIPAL), site.certbot.live(PRINCIPAL, "chain"), [PRINCIPAL],
                        template="trusted-web")

    other = "other.certbot.example.internal"
    site.certbot.certonly_dns(other, site.dns, "--required-profile", "trusted-web")
    assert [c["host"] for c in hook_calls(site.certbot.folder)[before:]] == [f"_acme-challenge.{other}."] * 2
    assert_issued_by_ca(site, site.certbot.live(other), site.certbot.live(other, "chain"), [other],
                        template="trusted-web")
