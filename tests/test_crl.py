"""CRLs, hold and release, with real processes: ``ca serve`` over loopback, the ``certpulse``
CLI, and ``openssl verify -crl_check`` on the CRL fetched over HTTP. One CA and one server per
backend for the whole module; a second, short-lived server under ``faketime`` shows the
periodic re-signing. Unit tests of ``pki/crl.py`` (pure building) at the end."""

from __future__ import annotations

import datetime as dt
import shutil
import subprocess
from collections.abc import Iterator
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from sqlalchemy import create_engine, select

from certpulse.ca.storage import schema as t
from certpulse.pki import crl as pki_crl
from certpulse.pki.build import build_ca_certificate, simple_name
from conftest import database
from services import wait_until
from support import CA, TEMPLATES, Client, assert_problem, audit_since, cli_json, newest_audit_id, run_cli, serve

OPENSSL = shutil.which("openssl")
CRL_URL = "/crl/issuing-1/0.crl"


def fetch(server: str, path: str = CRL_URL, **headers: str) -> httpx.Response:
    return httpx.get(server + path, headers=headers, timeout=30)


def served_crl(server: str, path: str = CRL_URL) -> x509.CertificateRevocationList:
    response = fetch(server, path)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/pkix-crl"
    return x509.load_der_x509_crl(response.content)


def crl_number(crl: x509.CertificateRevocationList) -> int:
    return int(crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number)


def listed(crl: x509.CertificateRevocationList, serial: str) -> str | None:
    """The reason the CRL gives for ``serial`` (unspecified without a reason code), or None."""
    entry = crl.get_revoked_certificate_by_serial_number(int(serial, 16))
    if entry is None:
        return None
    try:
        return str(entry.extensions.get_extension_for_class(x509.CRLReason).value.reason.value)
    except x509.ExtensionNotFound:
        return "unspecified"


def newer_crl(server: str, than: int, path: str = CRL_URL) -> x509.CertificateRevocationList:
    """The served CRL once its number is past ``than`` (a worker looks again within a second)."""
    found: list[x509.CertificateRevocationList] = []

    def grown() -> bool:
        found[:] = [served_crl(server, path)]
        return crl_number(found[0]) > than

    wait_until(grown, 30, f"a CRL numbered above {than} at {path}")
    return found[0]


def openssl_verify(ca: CA, work: Path, issued: dict[str, Any], crl: x509.CertificateRevocationList
                   ) -> subprocess.CompletedProcess[str]:
    """``openssl verify -crl_check`` of the issued certificate with its chain and this CRL."""
    if OPENSSL is None:
        pytest.fail("openssl is not installed")
    chain = work / "chain.pem"
    chain.write_text((ca.dir / "certs" / "root.pem").read_text() + "".join(issued["chain"]))
    leaf = work / f"{issued['serial']}.pem"
    leaf.write_text(issued["certificate"])
    crl_file = work / "crl.pem"
    crl_file.write_text(pki_crl.pem_crl(crl.public_bytes(_der())))
    return subprocess.run([OPENSSL, "verify", "-crl_check", "-CAfile", str(chain), "-CRLfile", str(crl_file),
                           str(leaf)], capture_output=True, text=True, timeout=30, check=False)


def _der() -> Any:
    from cryptography.hazmat.primitives.serialization import Encoding

    return Encoding.DER


def assert_good(result: subprocess.CompletedProcess[str]) -> None:
    assert result.returncode == 0 and ": OK" in result.stdout, result.stdout + result.stderr


def assert_revoked(result: subprocess.CompletedProcess[str]) -> None:
    assert result.returncode != 0 and "certificate revoked" in result.stdout + result.stderr, \
        result.stdout + result.stderr


@pytest.fixture(scope="module")
def ca(backend: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[CA]:
    """A CA with the one template these tests use (each template added is a CLI process)."""
    directory = tmp_path_factory.mktemp("ca") / "ca"
    with database(backend, directory.parent) as url:
        out = run_cli("ca", "init", "--dir", str(directory), "--database", url)
        key = next(line.strip() for line in out.stdout.splitlines() if line.strip().startswith("cpa_"))
        made = CA(directory, key, url)
        made.cli("template", "add", str(TEMPLATES / "machine.toml"))
        yield made


@pytest.fixture(scope="module")
def machine(ca: CA, server: str) -> Client:
    """One machine principal for the module, enrolled over HTTP."""
    return Client.enrolled(server, ca.add_principal("crl-holder.example.internal", "--group", "webservers"))


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("crl-work")


# -- the CRL follows revocation, hold and release (openssl verify) -----------------------------

def test_revoke_hold_and_release_reach_openssl(ca: CA, server: str, machine: Client, admin: Client,
                                               work: Path) -> None:
    _, kept = machine.enroll(cn="kept.example.internal")
    _, lost = machine.enroll(cn="lost.example.internal")
    _, held = machine.enroll(cn="held.example.internal")
    first = served_crl(server)
    assert_good(openssl_verify(ca, work, kept, first))
    assert_good(openssl_verify(ca, work, held, first))
    before = newest_audit_id(admin)

    ca.cli("revoke", lost["serial"], "--reason", "keyCompromise")
    crl = newer_crl(server, crl_number(first))
    assert listed(crl, lost["serial"]) == "keyCompromise"
    assert_revoked(openssl_verify(ca, work, lost, crl))
    assert_good(openssl_verify(ca, work, kept, crl))

    ca.cli("revoke", held["serial"], "--reason", "certificateHold")
    crl = newer_crl(server, crl_number(crl))
    assert listed(crl, held["serial"]) == "certificateHold"
    assert_revoked(openssl_verify(ca, work, held, crl))
    status = httpx.get(f"{server}/v1/certificates/{held['serial']}", timeout=30).json()
    assert status["status"] == "revoked" and status["revocation_reason"] == "certificateHold"

    out = ca.cli("unrevoke", held["serial"])
    assert "released from hold" in out.stdout
    crl = newer_crl(server, crl_number(crl))
    assert listed(crl, held["serial"]) is None and listed(crl, lost["serial"]) == "keyCompromise"
    assert_good(openssl_verify(ca, work, held, crl))
    assert httpx.get(f"{server}/v1/certificates/{held['serial']}", timeout=30).json()["status"] == "good"

    # on hold again, then revoked for good: the reason changes, and there is no release any more
    response = admin.http.post(f"/v1/certificates/{held['serial']}/revoke", json={"reason": "certificateHold"})
    assert response.status_code == 200, response.text
    assert_problem(admin.http.post(f"/v1/certificates/{held['serial']}/revoke", json={"reason": "certificateHold"}),
                   409, "already-revoked")
    response = admin.http.post(f"/v1/certificates/{held['serial']}/revoke", json={"reason": "superseded"})
    assert response.status_code == 200, response.text
    crl = newer_crl(server, crl_number(crl))
    assert listed(crl, held["serial"]) == "superseded"
    assert_revoked(openssl_verify(ca, work, held, crl))
    refused = ca.cli("unrevoke", held["serial"], check=False)
    assert refused.returncode == 2 and refused.stderr.startswith("certpulse: error: not-on-hold"), refused.stderr
    assert "Traceback" not in refused.stderr

    rows = audit_since(admin, before)
    actions = [(r["action"], r["serial"], r["reason"]) for r in rows if r["serial"] in (lost["serial"], held["serial"])]
    assert actions == [
        ("revoked", lost["serial"], "keyCompromise"), ("revoked", held["serial"], "certificateHold"),
        ("unrevoked", held["serial"], "certificateHold"), ("revoked", held["serial"], "certificateHold"),
        ("revoked", held["serial"], "superseded"),
    ], actions
    assert any(r["action"] == "unrevoke-refused" and r["reason"] == "not-on-hold" for r in rows), rows


def test_unrevoke_over_http(server: str, machine: Client, admin: Client) -> None:
    _, issued = machine.enroll()
    serial = issued["serial"]
    assert_problem(admin.http.post(f"/v1/certificates/{serial}/unrevoke"), 409, "not-on-hold")
    assert admin.http.post(f"/v1/certificates/{serial}/revoke", json={"reason": "certificateHold"}).status_code == 200
    assert_problem(machine.http.post(f"/v1/certificates/{serial}/unrevoke"), 403, "forbidden")
    assert_problem(admin.http.post("/v1/certificates/abcdef0123/unrevoke"), 404, "not-found")
    response = admin.http.post(f"/v1/certificates/{serial}/unrevoke", json={"issuer": "issuing-1"})
    assert response.status_code == 200, response.text
    assert response.json()["status"] == "good" and response.json()["released_at"]
    assert httpx.get(f"{server}/v1/certificates/{serial}", timeout=30).json()["status"] == "good"
    assert_problem(admin.http.post(f"/v1/certificates/{serial}/unrevoke"), 409, "not-on-hold")
    assert admin.http.post(f"/v1/certificates/{serial}/revoke", json={"reason": "keyCompromise"}).status_code == 200
    assert_problem(admin.http.post(f"/v1/certificates/{serial}/unrevoke"), 409, "not-on-hold")


# -- what the CRL says, and how it is served ---------------------------------------------------

def test_crl_fields_and_signature(ca: CA, server: str) -> None:
    crl = served_crl(server)
    issuer = x509.load_pem_x509_certificate((ca.dir / "certs" / "issuer-issuing-1.pem").read_bytes())
    assert crl.issuer == issuer.subject and crl.is_signature_valid(issuer.public_key())  # type: ignore[arg-type]
    aki = crl.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    ski = issuer.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert aki.key_identifier == ski.digest
    assert crl.next_update_utc is not None
    assert crl.next_update_utc - crl.last_update_utc == dt.timedelta(days=7)  # ca.toml's crl_validity
    assert abs(crl.last_update_utc - dt.datetime.now(dt.UTC)) < dt.timedelta(days=1)
    for entry in crl:
        assert entry.revocation_date_utc <= crl.last_update_utc
    root = served_crl(server, "/crl/root/0.crl")
    root_cert = x509.load_pem_x509_certificate((ca.dir / "certs" / "root.pem").read_bytes())
    assert root.issuer == root_cert.subject and root.is_signature_valid(root_cert.public_key())  # type: ignore[arg-type]
    assert len(root) == 0


def test_caching_headers_and_conditional_requests(server: str) -> None:
    response = fetch(server)
    assert response.status_code == 200
    crl = x509.load_der_x509_crl(response.content)
    headers = response.headers
    assert headers["etag"] == f'"crl-{crl_number(crl)}"'
    assert parsedate_to_datetime(headers["last-modified"]) == crl.last_update_utc
    cache = [part.strip() for part in headers["cache-control"].split(",")]
    assert cache[0] == "public" and "no-transform" in cache
    max_age = int(next(p for p in cache if p.startswith("max-age="))[8:])
    assert 0 < max_age <= 86400  # at most the CRL period (1d)
    expires = parsedate_to_datetime(headers["expires"])
    assert crl.last_update_utc < expires <= crl.last_update_utc + dt.timedelta(days=1)

    not_modified = fetch(server, **{"If-None-Match": headers["etag"]})
    assert not_modified.status_code == 304 and not_modified.content == b""
    assert not_modified.headers["etag"] == headers["etag"]
    assert fetch(server, **{"If-None-Match": '"crl-0"'}).status_code == 200
    assert fetch(server, **{"If-Modified-Since": headers["last-modified"]}).status_code == 304
    older = (crl.last_update_utc - dt.timedelta(seconds=1)).strftime("%a, %d %b %Y %H:%M:%S GMT")
    assert fetch(server, **{"If-Modified-Since": older}).status_code == 200
    assert fetch(server, **{"If-Modified-Since": "not a date"}).status_code == 200

    head = httpx.head(server + CRL_URL, timeout=30)
    assert head.status_code == 200 and head.content == b""
    assert int(head.headers["content-length"]) == len(response.content)


def test_unknown_authority_shard_and_method(server: str) -> None:
    for path in ("/crl/nobody/0.crl", "/crl/issuing-1/1.crl", "/crl/kra/0.crl", "/crl/issuing-1/0.der",
                 "/crl/issuing-1/", "/crl/../0.crl", "/crl/issuing-1/00.crl",
                 "/crl/issuing-1/00000000000.crl"):
        assert_problem(fetch(server, path), 404, "not-found")
    refused = httpx.post(server + CRL_URL, content=b"x", timeout=30)
    assert refused.status_code == 405 and refused.headers["allow"] == "GET, HEAD"
    assert refused.headers["content-type"].startswith("application/problem+json")


# -- ca crl ------------------------------------------------------------------------------------

def test_ca_crl_command(ca: CA, server: str, machine: Client, admin: Client, work: Path) -> None:
    _, issued = machine.enroll()
    assert admin.http.post(f"/v1/certificates/{issued['serial']}/revoke",
                           json={"reason": "cessationOfOperation"}).status_code == 200
    before = crl_number(served_crl(server))
    der_file, pem_file = work / "out.crl", work / "out.pem"
    made = cli_json(ca, "ca", "crl", "--issuer", "issuing-1", "--out", str(der_file))
    assert len(made) == 1 and made[0]["issuer"] == "issuing-1" and made[0]["number"] > before
    entry = next(e for e in made[0]["revoked"] if e["serial"] == issued["serial"])
    assert entry["reason"] == "cessationOfOperation" and entry["revoked_at"]
    assert made[0]["entries"] == len(made[0]["revoked"])
    on_file = x509.load_der_x509_crl(der_file.read_bytes())
    assert crl_number(on_file) == made[0]["number"] and listed(on_file, issued["serial"]) == "cessationOfOperation"
    assert crl_number(newer_crl(server, made[0]["number"] - 1)) >= made[0]["number"]  # it is what is served

    out = ca.cli("ca", "crl", "--out", str(pem_file), "--pem", "--issuer", "issuing-1")
    assert pem_file.read_text().startswith("-----BEGIN X509 CRL-----")
    assert "number:" in out.stdout and issued["serial"] in out.stdout and "cessationOfOperation" in out.stdout
    everything = cli_json(ca, "ca", "crl")
    assert sorted(d["issuer"] for d in everything) == ["issuing-1", "root"]

    refused = ca.cli("ca", "crl", "--out", str(der_file), check=False)  # which CRL? (the KRA's: 404 over HTTP)
    assert refused.returncode == 2 and refused.stderr.startswith("certpulse: error: invalid-argument"), refused.stderr


# -- the periodic task -------------------------------------------------------------------------

def test_serve_signs_the_crl_again_when_its_period_is_over(ca: CA, server: str) -> None:
    """Two days on (faketime), the ``ca serve`` parent's task signs each CRL again without any
    fetch or revocation: the stored rows get new numbers and thisUpdates."""
    faketime = shutil.which("faketime")
    if faketime is None:
        pytest.fail("faketime is not installed (see scripts/system-packages)")
    engine = create_engine(ca.database_url)
    try:
        def stored() -> dict[int, tuple[int, dt.datetime]]:
            with engine.connect() as conn:
                return {r.authority_id: (r.number, r.this_update) for r in conn.execute(select(t.crls))}

        fetch(server, "/crl/root/0.crl")  # both CRLs exist before
        before = stored()
        assert len(before) == 2
        with serve(ca, prefix=(faketime, "-f", "+2d")) as later:
            def re_signed() -> bool:
                now = stored()
                return all(now[a][0] > before[a][0] and now[a][1] > before[a][1] + dt.timedelta(days=1)
                           for a in before)

            wait_until(re_signed, 60, "the periodic task to sign both CRLs again")
            crl = served_crl(later)
            assert crl.last_update_utc > dt.datetime.now(dt.UTC) + dt.timedelta(days=1)
    finally:
        engine.dispose()


# -- pki/crl.py: building, no I/O --------------------------------------------------------------

NOW = dt.datetime(2026, 6, 1, 12, 0, tzinfo=dt.UTC)


@pytest.fixture(scope="module")
def issuer() -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    cert = build_ca_certificate(subject=simple_name("Unit CA"), public_key=key.public_key(), issuer_cert=None,
                                signing_key=key, not_before=NOW - dt.timedelta(days=1),
                                not_after=NOW + dt.timedelta(days=365), path_length=0)
    return cert, key


def test_sign_crl_entries_reasons_and_extensions(issuer: tuple[x509.Certificate, ec.EllipticCurvePrivateKey]
                                                 ) -> None:
    cert, key = issuer
    rows = [(0x1234, NOW - dt.timedelta(hours=1), "keyCompromise"), (2**158 + 5, NOW, "unspecified"),
            (77, (NOW - dt.timedelta(days=2)).replace(tzinfo=None), "certificateHold"), (78, NOW, None)]
    entries = pki_crl.EntryCache().entries(rows)
    signed = pki_crl.sign_crl(issuer_cert=cert, issuer_key=key, number=42, this_update=NOW,
                              next_update=NOW + dt.timedelta(days=7), entries=entries)
    crl = x509.load_der_x509_crl(signed.der)
    assert signed.entries == 4 and crl.is_signature_valid(key.public_key())
    assert crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number == 42
    assert crl.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value.key_identifier == \
        cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest
    assert crl.last_update_utc == NOW and crl.next_update_utc == NOW + dt.timedelta(days=7)
    by_serial = {e.serial_number: e for e in crl}
    assert by_serial[0x1234].revocation_date_utc == NOW - dt.timedelta(hours=1)
    assert by_serial[77].revocation_date_utc == NOW - dt.timedelta(days=2)  # a naive date is UTC
    reasons = {s: [x.value.reason.value for x in e.extensions] for s, e in by_serial.items()}
    assert reasons == {0x1234: ["keyCompromise"], 2**158 + 5: [], 77: ["certificateHold"], 78: []}
    assert [(e.serial, e.reason) for e in pki_crl.listed_entries(signed.der)] == [
        (0x1234, "keyCompromise"), (2**158 + 5, "unspecified"), (77, "certificateHold"), (78, "unspecified")]


def test_entries_match_the_validating_builder(issuer: tuple[x509.Certificate, ec.EllipticCurvePrivateKey]) -> None:
    """The fast path (constructor, reason extension given as its DER) makes the very entries
    cryptography's checked setters make: the signed lists are the same bytes."""
    cert, key = issuer
    rows = [(991, NOW, "superseded"), (992, NOW - dt.timedelta(days=3), "keyCompromise"), (993, NOW, "unspecified"),
            (994, NOW, "certificateHold")]
    checked = []
    for serial, date, reason in rows:
        builder = x509.RevokedCertificateBuilder().revocation_date(date).serial_number(serial)
        if reason != "unspecified":
            builder = builder.add_extension(x509.CRLReason(x509.ReasonFlags(reason)), critical=False)
        checked.append(builder.build())
    fast = pki_crl.EntryCache().entries(rows)
    lists = [x509.load_der_x509_crl(pki_crl.sign_crl(issuer_cert=cert, issuer_key=key, number=3, this_update=NOW,
                                                     next_update=NOW + dt.timedelta(days=1), entries=entries).der)
             for entries in (checked, fast)]
    assert lists[0].tbs_certlist_bytes == lists[1].tbs_certlist_bytes
    assert [type(x.value) for e in lists[1] for x in e.extensions] == [x509.CRLReason] * 3


def test_entry_cache_builds_only_new_entries() -> None:
    cache = pki_crl.EntryCache(limit=3)
    rows = [(n, NOW, "keyCompromise") for n in range(1, 6)]
    first = cache.entries(rows)
    assert cache.built == 5
    again = cache.entries(rows)
    assert cache.built == 2 and again[:3] == first[:3]  # the first three kept (the limit), two built again
    cache.entries([*rows[:2], (9, NOW, "superseded")])
    assert cache.built == 1


@pytest.mark.parametrize(("row", "problem"), [
    ((0, NOW, None), "positive"), ((2**159, NOW, None), "159 bits"),
    ((5, dt.datetime(1949, 12, 31, tzinfo=dt.UTC), None), "1950"), ((5, NOW, "removeFromCRL"), "reason"),
    ((5, NOW, "sleepy"), "reason"),
])
def test_entry_refusals(row: tuple[int, dt.datetime, str | None], problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        pki_crl.EntryCache().entries([row])


def test_sign_crl_refuses_backwards_times(issuer: tuple[x509.Certificate, ec.EllipticCurvePrivateKey]) -> None:
    cert, key = issuer
    with pytest.raises(ValueError, match="nextUpdate"):
        pki_crl.sign_crl(issuer_cert=cert, issuer_key=key, number=1, this_update=NOW, next_update=NOW, entries=[])
    digest = hashes.SHA256()  # the hash the CA uses for P-256 keys
    signed = pki_crl.sign_crl(issuer_cert=cert, issuer_key=key, number=1, this_update=NOW,
                              next_update=NOW + dt.timedelta(seconds=1), entries=[])
    assert isinstance(x509.load_der_x509_crl(signed.der).signature_hash_algorithm, type(digest))


# -- two processes make a CRL at once ---------------------------------------------------------

def test_the_loser_of_a_race_serves_the_winners_crl(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two services (as two processes would) make the CRL at once: the one that stores second finds
    the number it read gone, and serves the CRL the first stored instead of overwriting it."""
    from certpulse.ca import crl as ca_crl
    from certpulse.ca.config import CADir
    from certpulse.ca.setup import init_ca, open_service

    target = CADir(tmp_path / "ca")
    init_ca(target, name="race", key_type="ec-p256", now=NOW)
    first, second = open_service(target, pool_size=1), open_service(target, pool_size=1)
    try:
        assert first.crls.generate("issuing-1", NOW).number == 1
        signing = ca_crl.sign_crl
        winner: list[Any] = []

        def sign_while_the_other_stores(**kwargs: Any) -> pki_crl.SignedCRL:
            if not winner:  # the first call (the loser's): the other service makes and stores one meanwhile
                winner.append(None)
                winner[0] = second.crls.generate("issuing-1", NOW + dt.timedelta(seconds=1))
            return signing(**kwargs)

        monkeypatch.setattr(ca_crl, "sign_crl", sign_while_the_other_stores)
        lost = first.crls.generate("issuing-1", NOW + dt.timedelta(seconds=2))
        assert winner[0].number == 2 and lost.number == 2 and lost.der == winner[0].der
        assert second.crls.current("issuing-1", NOW + dt.timedelta(seconds=3)).der == winner[0].der
    finally:
        first.engine.dispose()
        second.engine.dispose()


def test_a_crl_that_cannot_be_signed_never_fails_the_revocation(tmp_path: Path,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    """The issuer's key unreadable right after a revocation: the revocation stands (logged, not
    raised), and the next look at the CRL, key back, makes one that lists it."""
    from certpulse.ca.config import CADir
    from certpulse.ca.model import Caller
    from certpulse.ca.setup import init_ca, open_service
    from certpulse.sql.db import write

    target = CADir(tmp_path / "ca")
    init_ca(target, name="keyless", key_type="ec-p256", now=NOW)
    service = open_service(target, pool_size=1)
    try:
        issuer = service.crls.authority("issuing-1")
        with write(service.engine) as conn:
            conn.execute(t.certificates.insert().values(
                authority_id=issuer.id, serial="abc123", template_name="machine", subject="CN=x", names="{}",
                not_before=NOW, not_after=NOW + dt.timedelta(days=30), status="issued", created_at=NOW))
        key = target.keys / "issuer-issuing-1.key"
        key.rename(key.with_suffix(".away"))
        with caplog.at_level("WARNING", logger="certpulse.crl"):
            revoked = service.revocation.revoke(Caller(kind="operator", name="test"), "abc123", "superseded",
                                                NOW + dt.timedelta(minutes=1))
        assert revoked.reason == "superseded"
        assert "could not make the CRL again" in caplog.text
        key.with_suffix(".away").rename(key)
        crl = x509.load_der_x509_crl(service.crls.current("issuing-1", NOW + dt.timedelta(minutes=2)).der)
        assert listed(crl, "abc123") == "superseded"
    finally:
        service.engine.dispose()
