"""certbot (the PyPI release in the dev extras) against a real ``certpulse ca serve --tls``: an
account bound by EAB, http-01 through certbot's own web server, dns-01 through manual hooks and
the local DNS test server, profiles (templates), an order waiting for CA-manager approval, a
template trusting the principal's registered name, ``certbot renew`` deciding by ARI (before the
window, after ``template reenroll-all``, after revocation), ``certbot revoke``, and a failed
validation as certbot shows it. Every certificate is then checked at the CA: it chains to the
CA's root (openssl), carries the names asked for and the template extension, is listed with its
template and has its audit row.

One CA and one server for the module (SQLite: the ACME flow does not depend on the database;
the protocol and the store are tested on both backends elsewhere). Tests run in order and build
on each other (one account, one certificate lineage), as an operator would."""

from __future__ import annotations

import dataclasses
import datetime as dt
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from acme_services import (
    Background,
    Certbot,
    Endpoint,
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
from support import CA, TEMPLATES, Client, cli_json, root_trust, serve

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
    admin: Client  # the CA's admin API key: its certificates and audit trail over HTTP


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
            yield Site(ca, endpoint, dns, Certbot(folder / "certbot", endpoint),
                       Client(base, ca.admin_key, verify=root_trust(ca)))
    finally:
        dns.stop()


@pytest.fixture(scope="module")
def approval(site: Site) -> Iterator[tuple[Certbot, Background]]:
    """A second certbot (its own account and folders: certbot runs one at a time per folder)
    ordering under the `approval-required` profile in the background, from the first test that
    asks for it to the last: the CA answers its processing order with Retry-After: 60 and
    certbot honours it, so the minute passes while the other tests run."""
    bot = Certbot(site.certbot.folder.parent / "certbot-approval", site.endpoint)
    bot.register(new_eab(site.ca, PRINCIPAL))
    run = bot.start(*bot.dns_args(PRINCIPAL, site.dns), "--required-profile", "approval-required",
                    "--issuance-timeout", "170")
    try:
        yield bot, run
    finally:
        run.stop()


def assert_issued_by_ca(site: Site, cert_path: Path, chain_path: Path, names: list[str],
                        template: str = "webserver", actor: str = f"principal:{PRINCIPAL}") -> str:
    """The certificate verifies up to the CA's root with openssl, names exactly ``names``, and
    the CA lists it (good, under ``template``) with an ``issued`` audit row (the principal's,
    or the approving CA manager's)."""
    openssl_verify(site.endpoint.trust, cert_path, chain_path)
    cert = first_certificate(cert_path)
    assert sorted(dns_names(cert)) == sorted(names)
    assert has_template_extension(cert)
    status = ca_status(site.admin, cert)
    assert status["status"] == "good" and status["template"] == template, status
    rows = issued_rows(site.admin, cert)
    assert [row["actor"] for row in rows] == [actor], rows
    assert sorted(rows[0]["names"]) == sorted(names), rows
    return serial_hex(cert)


def test_register_with_external_account_binding(site: Site) -> None:
    """certbot registers with the key id and HMAC key `certpulse principal acme-eab` printed; the
    same binding cannot make a second account (one use)."""
    eab = new_eab(site.ca, PRINCIPAL)
    site.certbot.register(eab)
    assert [row["actor"] for row in audit_rows(site.admin, "acme-account-created")] == [f"principal:{PRINCIPAL}"]
    again = Certbot(site.certbot.folder.parent / "certbot-again", site.endpoint)
    refused = again.run("register", "--agree-tos", "--register-unsafely-without-email",
                        "--eab-kid", eab[0], "--eab-hmac-key", eab[1], check=False)
    assert refused.returncode != 0, refused.stdout
    assert "already used" in refused.stdout + refused.stderr, refused.stderr  # the CA's detail, shown
    assert not (again.folder / "config" / "accounts").exists() or not any(
        (again.folder / "config" / "accounts").rglob("regr.json")), "a second account with a used binding"
    assert len(audit_rows(site.admin, "acme-account-created")) == 1
    assert [row["reason"] for row in audit_rows(site.admin, "acme-account-refused")] == ["unauthenticated"]


def test_order_under_approval_is_processing(site: Site, approval: tuple[Certbot, Background]) -> None:
    """A profile whose template needs CA-manager approval: after validation and finalize the
    request is pending at the CA and certbot keeps polling its processing order; a CA manager
    approves it with `certpulse request approve` (certbot's certificate is checked at the end)."""
    _, run = approval
    deadline = time.monotonic() + 90
    pending: list[dict[str, Any]] = []
    while not pending and run.running() and time.monotonic() < deadline:
        time.sleep(0.5)
        pending = site.admin.http.get("/v1/requests", params={"status": "pending"}).json()
    assert [p["template"] for p in pending] == ["approval-required"], (pending, run.text())
    assert run.running(), run.text()
    site.ca.cli("request", "approve", str(pending[0]["id"]))
    assert [row["request_id"] for row in audit_rows(site.admin, "approved")] == [pending[0]["id"]]


def test_http01_standalone(site: Site) -> None:
    site.certbot.certonly_http(WWW)
    assert_issued_by_ca(site, site.certbot.live(WWW), site.certbot.live(WWW, "chain"), [WWW])
    assert validated_by(site.admin)[-1] == "http-01"


def test_dns01_manual_hooks(site: Site) -> None:
    """The auth hook put the TXT record the CA looked up at the DNS test server; the cleanup
    hook removed it. (With `--preferred-profile webserver`: certbot sends it, the directory
    offering it.)"""
    name = "dns.certbot.example.internal"
    site.certbot.certonly_dns(name, site.dns, "--preferred-profile", "webserver")
    calls = hook_calls(site.certbot.folder)
    assert [(c["call"], c["host"]) for c in calls] == [("/set-txt", f"_acme-challenge.{name}."),
                                                       ("/clear-txt", f"_acme-challenge.{name}.")]
    assert_issued_by_ca(site, site.certbot.live(name), site.certbot.live(name, "chain"), [name])
    assert validated_by(site.admin)[-1] == "dns-01"


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


def wait_past(moment: dt.datetime) -> None:
    """Until certbot's stored next-check time (naive local time) has passed; bounded."""
    deadline = time.monotonic() + 60
    while dt.datetime.now() <= moment and time.monotonic() < deadline:
        time.sleep(0.2)


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
    wait_past(retry_after)
    renewed = site.certbot.renew(WWW)
    second = serial_hex(first_certificate(site.certbot.live(WWW)))
    assert second != first, renewed.stdout + renewed.stderr
    assert_issued_by_ca(site, site.certbot.live(WWW), site.certbot.live(WWW, "chain"), [WWW])


def test_revoke_key_compromise(site: Site) -> None:
    """`certbot revoke` with the account key: the CA then says revoked, reason keyCompromise;
    its renewal information then says "renew now", and `certbot renew` does."""
    cert_path = site.certbot.live(WWW)
    cert = first_certificate(cert_path)
    site.certbot.run("revoke", "--cert-path", str(cert_path), "--reason", "keycompromise",
                     "--no-delete-after-revoke")
    status = ca_status(site.admin, cert)
    assert status["status"] == "revoked" and status["revocation_reason"] == "keyCompromise", status
    shown = cli_json(site.ca, "status", serial_hex(cert))  # the operator's view: certpulse status
    assert (shown["status"], shown["revocation_reason"]) == ("revoked", "keyCompromise"), shown
    rows = [row for row in audit_rows(site.admin, "revoked") if int(row["serial"], 16) == cert.serial_number]
    assert [(row["actor"], row["reason"]) for row in rows] == [(f"principal:{PRINCIPAL}", "keyCompromise")], rows

    wait_past(stored_retry_after(site, WWW))
    site.certbot.renew(WWW)
    replacement = first_certificate(site.certbot.live(WWW))
    assert replacement.serial_number != cert.serial_number
    assert_issued_by_ca(site, site.certbot.live(WWW), site.certbot.live(WWW, "chain"), [WWW])


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

    before, validations = len(hook_calls(site.certbot.folder)), len(validated_by(site.admin))
    site.certbot.certonly_dns(PRINCIPAL, site.dns, "--required-profile", "trusted-web")
    assert len(hook_calls(site.certbot.folder)) == before, "a challenge was solved for the registered name"
    assert len(validated_by(site.admin)) == validations, "the CA validated a challenge for the registered name"
    assert_issued_by_ca(site, site.certbot.live(PRINCIPAL), site.certbot.live(PRINCIPAL, "chain"), [PRINCIPAL],
                        template="trusted-web")

    other = "other.certbot.example.internal"
    site.certbot.certonly_dns(other, site.dns, "--required-profile", "trusted-web")
    assert [c["host"] for c in hook_calls(site.certbot.folder)[before:]] == [f"_acme-challenge.{other}."] * 2
    assert_issued_by_ca(site, site.certbot.live(other), site.certbot.live(other, "chain"), [other],
                        template="trusted-web")



def test_approved_order_reaches_certbot(site: Site, approval: tuple[Certbot, Background]) -> None:
    """The order approved in the first test: certbot got its certificate (the principal's own
    name: that template takes names from the principal), issued under that template at the
    approving manager's word."""
    bot, run = approval
    run.finish()
    assert_issued_by_ca(site, bot.live(PRINCIPAL), bot.live(PRINCIPAL, "chain"), [PRINCIPAL],
                        template="approval-required", actor="operator:root")


def test_failed_validation_reaches_certbot(site: Site) -> None:
    """The name resolves (at the CA's resolver) to 127.0.0.2, where certbot's web server does
    not listen: the CA's http-01 validation fails, certbot shows the CA's problem (type and
    detail), and nothing is issued."""
    name = "unreachable.certbot.example.internal"
    site.dns.add_a(name, "127.0.0.2")
    issued_before = len(audit_rows(site.admin, "issued"))
    failed = site.certbot.certonly_http(name, check=False)
    output = failed.stdout + failed.stderr
    assert failed.returncode != 0, output
    assert re.search(r"Type:\s+connection", output) and "127.0.0.2" in output, output  # the CA's problem
    assert not site.certbot.live(name).exists()
    assert len(audit_rows(site.admin, "issued")) == issued_before
    assert audit_rows(site.admin, "acme-authorization-invalid"), "the failed validation is not audited"
