"""The OCSP responder, asked by the real ``openssl ocsp`` client (and by hand-made requests) of a
real ``ca serve``, on SQLite and PostgreSQL: good, revoked with time and reason, hold, unknown,
unauthorized; answers verified with the issuer alone (the delegated signer's certificate inside);
nonce echoed, the cached answer without; RFC 5019 GET with its caching headers; a revocation
reaching the answers within the once-a-second revision read; malformed requests answered
``malformedRequest`` with a 4xx, never a 500; the delegated signer's certificate and renewal;
``ca serve --role``; OCSP answered while enrollment is shed.
"""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import fcntl
import os
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, urlsplit

import anyio
import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509 import ocsp
from cryptography.x509.oid import ExtendedKeyUsageOID
from sqlalchemy import select

from certpulse.ca.config import CADir
from certpulse.ca.ocsp import OCSPResponder
from certpulse.ca.ocsp_signer import SIGNER_TEMPLATE, ensure_signers, newest_signers, remove_expired_keys
from certpulse.ca.revocation import Revocation
from certpulse.ca.setup import open_service
from certpulse.ca.storage import schema as t
from certpulse.frontends.http import create_app
from certpulse.pki.build import build_ca_certificate, simple_name
from certpulse.pki.ocsp import CertID, MalformedRequest, parse_request
from certpulse.sql.db import read, write
from services import wait_until
from support import CA, Client, new_key, serve

OCSP_TYPE = "application/ocsp-request"
CERT_ID_SHA1 = hashes.SHA1()  # noqa: S303 - what OCSP clients hash CertIDs with (RFC 5019)


@dataclass
class Issued:
    """An enrolled certificate and the files ``openssl ocsp`` wants."""

    serial: str
    leaf: Path
    issuer: Path
    chain: Path  # issuer + root: the -CAfile that verifies the response

    def certificate(self) -> x509.Certificate:
        return x509.load_pem_x509_certificate(self.leaf.read_bytes())

    def issuer_certificate(self) -> x509.Certificate:
        return x509.load_pem_x509_certificate(self.issuer.read_bytes())

    def request(self, algorithm: hashes.HashAlgorithm | None = None, nonce: bytes | None = None) -> bytes:
        builder = ocsp.OCSPRequestBuilder().add_certificate(
            self.certificate(), self.issuer_certificate(), algorithm or CERT_ID_SHA1)
        if nonce is not None:
            builder = builder.add_extension(x509.OCSPNonce(nonce), critical=False)
        return builder.build().public_bytes(serialization.Encoding.DER)


@pytest.fixture(scope="module")
def holder(ca: CA, server: str) -> Client:
    """One machine principal for the module: each test's certificate is a new enrollment of it."""
    return Client.enrolled(server, ca.add_principal(f"host-{uuid.uuid4().hex[:8]}.example.internal",
                                                    "--group", "webservers"))


@pytest.fixture
def issued(ca: CA, holder: Client, tmp_path: Path) -> Issued:
    """A certificate of the test's own (to revoke, hold...)."""
    return enroll(ca, holder, tmp_path)


@pytest.fixture(scope="module")
def good(ca: CA, holder: Client, tmp_path_factory: pytest.TempPathFactory) -> Issued:
    """A certificate nobody revokes, shared by the module's tests that only ask about it."""
    return enroll(ca, holder, tmp_path_factory.mktemp("good"))


def enroll(ca: CA, client: Client, folder: Path) -> Issued:
    _, document = client.enroll()
    (folder / "leaf.pem").write_text(document["certificate"])
    (folder / "issuer.pem").write_text(document["chain"][0])
    (folder / "chain.pem").write_text(document["chain"][0] + (ca.dir / "certs" / "root.pem").read_text())
    return Issued(document["serial"], folder / "leaf.pem", folder / "issuer.pem", folder / "chain.pem")


def openssl_ocsp(server: str, cert: Issued, *extra: str) -> str:
    """``openssl ocsp`` against the responder, verifying with the issuer and root: its output
    (stdout and stderr: "Response verify OK" goes to stderr)."""
    result = subprocess.run(
        ["openssl", "ocsp", "-issuer", str(cert.issuer), "-url", f"{server}/ocsp", "-CAfile", str(cert.chain),
         "-resp_text", *(extra if "-serial" in extra else ("-cert", str(cert.leaf), *extra))],
        capture_output=True, text=True, timeout=30, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout + result.stderr


def post(server: str, body: bytes, content_type: str = OCSP_TYPE) -> httpx.Response:
    return httpx.post(f"{server}/ocsp", content=body, headers={"Content-Type": content_type}, timeout=30)


def response_of(answer: httpx.Response) -> ocsp.OCSPResponse:
    assert answer.headers["content-type"] == "application/ocsp-response", answer.headers
    return ocsp.load_der_ocsp_response(answer.content)


def assert_malformed(answer: httpx.Response, *codes: int) -> None:
    assert answer.status_code in (codes or (400,)), (answer.status_code, answer.content[:100])
    assert response_of(answer).response_status == ocsp.OCSPResponseStatus.MALFORMED_REQUEST


# -- what openssl ocsp sees -------------------------------------------------------------------

def test_good_answer_verifies_with_the_delegated_signer_and_echoes_the_nonce(server: str, good: Issued) -> None:
    out = openssl_ocsp(server, good)
    assert f"{good.leaf}: good" in out, out
    assert "Response verify OK" in out, out
    assert "OCSP Nonce" in out and "WARNING: no nonce" not in out, out  # openssl sends one by default
    assert "OCSP Signing" in out and "OCSP No Check" in out, out  # the signer's certificate is in the response
    assert "This Update:" in out and "Next Update:" in out, out


def test_requests_without_nonce_get_the_cached_answer(server: str, good: Issued, tmp_path: Path) -> None:
    answers = []
    for n in range(2):
        out = openssl_ocsp(server, good, "-no_nonce", "-respout", str(tmp_path / f"{n}.der"))
        assert f"{good.leaf}: good" in out and "Response verify OK" in out, out
        answers.append((tmp_path / f"{n}.der").read_bytes())
    assert answers[0] == answers[1]  # the same signed bytes: not signed again
    nonce = [post(server, good.request(nonce=os.urandom(16))).content for _ in range(2)]
    assert nonce[0] != nonce[1] and answers[0] not in nonce  # a nonce is signed fresh, every time


def test_revocation_reaches_the_answers_at_once_with_time_and_reason(ca: CA, server: str, issued: Issued) -> None:
    assert f"{issued.leaf}: good" in openssl_ocsp(server, issued, "-no_nonce")  # cached now
    ca.cli("revoke", issued.serial, "--reason", "keyCompromise")
    revoked_at = time.monotonic()
    outputs: list[str] = []

    def revoked() -> bool:
        outputs.append(openssl_ocsp(server, issued, "-no_nonce"))
        return f"{issued.leaf}: revoked" in outputs[-1]

    wait_until(revoked, 15, "the revoked answer")  # the revisions are read once a second
    assert time.monotonic() - revoked_at < 15
    out = outputs[-1]
    assert "Reason: keyCompromise" in out and "Revocation Time:" in out and "Response verify OK" in out, out
    with_nonce = openssl_ocsp(server, issued)
    assert f"{issued.leaf}: revoked" in with_nonce and "Reason: keyCompromise" in with_nonce, with_nonce


def test_a_certificate_on_hold_is_revoked_with_reason_certificate_hold(ca: CA, server: str, issued: Issued,
                                                                      admin: Client) -> None:
    held = admin.http.post(f"/v1/certificates/{issued.serial}/revoke", json={"reason": "certificateHold"})
    assert held.status_code == 200, held.text
    wait_until(lambda: "Reason: certificateHold" in openssl_ocsp(server, issued, "-no_nonce"), 15, "the hold")
    if not hasattr(Revocation, "unrevoke"):
        pytest.skip("release of a hold (certpulse unrevoke) comes with the CRL part of issue 17")
    ca.cli("unrevoke", issued.serial)
    wait_until(lambda: f"{issued.leaf}: good" in openssl_ocsp(server, issued, "-no_nonce"), 15, "the release")


def test_a_serial_never_issued_is_unknown(server: str, good: Issued) -> None:
    out = openssl_ocsp(server, good, "-serial", "0x1234567890abcdef1234")
    assert "0x1234567890abcdef1234: unknown" in out and "Response verify OK" in out, out


def test_other_hash_algorithms_are_answered_in_kind(server: str, good: Issued) -> None:
    for algorithm in (hashes.SHA256(), hashes.SHA224(), hashes.SHA384(), hashes.SHA512()):
        answer = post(server, good.request(algorithm))
        assert answer.status_code == 200
        response = response_of(answer)
        assert response.response_status == ocsp.OCSPResponseStatus.SUCCESSFUL
        assert response.certificate_status == ocsp.OCSPCertStatus.GOOD
        assert response.hash_algorithm.name == algorithm.name
        assert response.serial_number == good.certificate().serial_number


def test_a_certificate_of_another_issuer_is_unauthorized(ca: CA, server: str, good: Issued) -> None:
    key = new_key()
    now = dt.datetime.now(dt.UTC)
    other = build_ca_certificate(subject=simple_name("Someone Else CA"), public_key=key.public_key(),
                                 issuer_cert=None, signing_key=key, not_before=now - dt.timedelta(days=1),
                                 not_after=now + dt.timedelta(days=1), path_length=0)
    request = ocsp.OCSPRequestBuilder().add_certificate(good.certificate(), other, CERT_ID_SHA1).build()
    answer = post(server, request.public_bytes(serialization.Encoding.DER))
    assert answer.status_code == 200 and response_of(answer).response_status == ocsp.OCSPResponseStatus.UNAUTHORIZED
    # the root's children are the root's CRL's business: not this responder's
    root = x509.load_pem_x509_certificate((ca.dir / "certs" / "root.pem").read_bytes())
    request = ocsp.OCSPRequestBuilder().add_certificate(good.issuer_certificate(), root, CERT_ID_SHA1).build()
    answer = post(server, request.public_bytes(serialization.Encoding.DER))
    assert response_of(answer).response_status == ocsp.OCSPResponseStatus.UNAUTHORIZED


# -- RFC 5019 GET -------------------------------------------------------------------------------

def test_get_answers_with_caching_headers(server: str, good: Issued, tmp_path: Path) -> None:
    subprocess.run(["openssl", "ocsp", "-issuer", str(good.issuer), "-cert", str(good.leaf), "-no_nonce",
                    "-reqout", str(tmp_path / "req.der")], check=True, capture_output=True, timeout=30)
    der = (tmp_path / "req.der").read_bytes()
    encoded = base64.b64encode(der).decode()
    posted = post(server, der)
    spellings = {quote(encoded, safe=""), encoded, encoded.rstrip("="),
                 base64.urlsafe_b64encode(der).decode().rstrip("=")}
    for spelling in spellings:
        answer = httpx.get(f"{server}/ocsp/{spelling}", timeout=30)
        assert answer.status_code == 200, (spelling, answer.status_code)
        response = response_of(answer)
        assert response.certificate_status == ocsp.OCSPCertStatus.GOOD
        assert answer.content == posted.content  # the same cached answer, by either method
        control = answer.headers["cache-control"]
        max_age = int(control.split("max-age=")[1].split(",")[0])
        assert next_update(response) - dt.timedelta(seconds=max_age + 5) <= dt.datetime.now(dt.UTC), control
        assert 0 < max_age <= 3600 and "public" in control and "no-transform" in control, control
        assert "must-revalidate" in control
        assert answer.headers["etag"].strip('"') and answer.headers["last-modified"] and answer.headers["expires"]
        assert answer.headers["expires"] == format_http_date(next_update(response))
        assert answer.headers["last-modified"] == format_http_date(response.this_update_utc)
    cached = httpx.get(f"{server}/ocsp/{quote(encoded, safe='')}", timeout=30)
    again = httpx.get(f"{server}/ocsp/{quote(encoded, safe='')}", headers={"If-None-Match": cached.headers["etag"]},
                      timeout=30)
    assert again.status_code == 304 and again.content == b"" and again.headers["etag"] == cached.headers["etag"]
    other = httpx.get(f"{server}/ocsp/{quote(encoded, safe='')}", headers={"If-None-Match": '"other"'}, timeout=30)
    assert other.status_code == 200 and other.content == cached.content
    assert "max-age" not in posted.headers.get("cache-control", "")
    nonce = post(server, good.request(nonce=b"0123456789abcdef"))
    assert nonce.headers["cache-control"] == "no-store"


def next_update(response: ocsp.OCSPResponse) -> dt.datetime:
    assert response.next_update_utc is not None
    return response.next_update_utc


def format_http_date(moment: dt.datetime) -> str:
    import email.utils

    return email.utils.format_datetime(moment, usegmt=True)


# -- malformed requests: a malformedRequest and a 4xx, never a 500 ------------------------------

def der_tlv(tag: int, content: bytes) -> bytes:
    """One DER element (test vectors only: requests cryptography refuses to build)."""
    size = len(content)
    length = bytes([size]) if size < 128 else bytes([0x80 | ((size.bit_length() + 7) // 8)]) + size.to_bytes(
        (size.bit_length() + 7) // 8, "big")
    return bytes([tag]) + length + content


def request_with_hash_oid(oid_der: bytes, name_hash: bytes, key_hash: bytes, serial: int) -> bytes:
    """OCSPRequest { TBSRequest { requestList { Request { CertID } } } } with the given hash OID."""
    algorithm = der_tlv(0x30, oid_der + b"\x05\x00")
    cert_id = der_tlv(0x30, algorithm + der_tlv(0x04, name_hash) + der_tlv(0x04, key_hash)
                      + der_tlv(0x02, serial.to_bytes((serial.bit_length() + 8) // 8, "big")))
    return der_tlv(0x30, der_tlv(0x30, der_tlv(0x30, der_tlv(0x30, cert_id))))


SHA1_OID = bytes.fromhex("06052b0e03021a")
MD5_OID = bytes.fromhex("06082a864886f70d0205")


def test_malformed_requests_get_malformed_request_and_a_4xx(server: str, good: Issued, tmp_path: Path) -> None:
    valid = good.request()
    parsed = parse_request(valid).cert_id
    # the hand-made vector is right: with SHA-1 it is answered
    sha1 = request_with_hash_oid(SHA1_OID, parsed.issuer_name_hash, parsed.issuer_key_hash, parsed.serial)
    assert response_of(post(server, sha1)).certificate_status == ocsp.OCSPCertStatus.GOOD
    md5 = request_with_hash_oid(MD5_OID, parsed.issuer_name_hash[:16], parsed.issuer_key_hash[:16], parsed.serial)
    subprocess.run(["openssl", "ocsp", "-issuer", str(good.issuer), "-serial", "0x1234", "-serial", "0x5678",
                    "-no_nonce", "-reqout", str(tmp_path / "two.der")], check=True, capture_output=True, timeout=30)
    two = (tmp_path / "two.der").read_bytes()
    for body in (b"garbage", valid[:len(valid) // 2], b"", md5, two, valid + b"\x00", os.urandom(300)):
        assert_malformed(post(server, body))
    assert_malformed(post(server, valid, "text/plain"), 415)
    assert_malformed(post(server, b"\x30" * 20_000), 413)
    huge = post(server, b"\x30" * (1 << 20))  # over the server's own body limit: refused before the route
    assert huge.status_code == 413
    for path in ("/ocsp", "/ocsp/", "/ocsp/!!!not-base64!!!", "/ocsp/" + quote(base64.b64encode(b"garbage").decode()),
                 "/ocsp/" + "A" * 30_000):
        answer = httpx.get(f"{server}{path}", timeout=30)
        assert answer.status_code in (400, 414, 431), (path, answer.status_code)
        if answer.status_code == 400:
            assert_malformed(answer)
    for method in ("PUT", "DELETE", "PATCH"):
        answer = httpx.request(method, f"{server}/ocsp", timeout=30)
        assert answer.status_code == 405 and answer.headers["allow"] == "GET, POST", answer.text
        assert answer.headers["content-type"].startswith("application/problem+json")
    # still serving
    assert response_of(post(server, valid)).certificate_status == ocsp.OCSPCertStatus.GOOD


def test_parse_request_refuses_what_it_cannot_answer() -> None:
    for body in (b"", b"\x30\x00", b"\x30\x03\x02\x01\x01"):
        with pytest.raises(MalformedRequest):
            parse_request(body)
    vector = request_with_hash_oid(SHA1_OID, b"n" * 20, b"k" * 20, 0x1234)
    assert parse_request(vector).cert_id == CertID("sha1", b"n" * 20, b"k" * 20, 0x1234)
    assert parse_request(vector).nonce is None
    with pytest.raises(MalformedRequest):
        parse_request(request_with_hash_oid(MD5_OID, b"n" * 16, b"k" * 16, 0x1234))
    with pytest.raises(MalformedRequest):
        parse_request(vector + b"\x00")
    request = request_with_hash_oid(SHA1_OID, b"n" * 20, b"k" * 20, 0x1234)
    one = request[6:]  # OCSPRequest, TBSRequest, requestList headers (2 bytes each): one Request
    with pytest.raises(MalformedRequest):
        parse_request(der_tlv(0x30, der_tlv(0x30, der_tlv(0x30, one + one))))


def test_mangled_requests_never_raise_in_the_responder(ca: CA, server: str, good: Issued) -> None:
    """Bytes flipped, cut and repeated anywhere in real requests: the core answers each with an
    OCSP response (malformedRequest, unauthorized, or an answer), never an exception."""
    import random

    service = open_service(CADir(ca.dir), pool_size=2)
    try:
        responder = OCSPResponder(service)
        now = dt.datetime.now(dt.UTC).replace(microsecond=0)
        seeds = [good.request(), good.request(hashes.SHA256(), nonce=b"n" * 32)]
        rng = random.Random(17)
        statuses = set()
        for n in range(400):
            data = bytearray(rng.choice(seeds))
            for _ in range(rng.randint(1, 3)):
                at = rng.randrange(len(data))
                match n % 4:
                    case 0:
                        data[at] ^= 1 << rng.randrange(8)
                    case 1:
                        data[at] = rng.randrange(256)
                    case 2:
                        del data[at:at + rng.randint(1, 8)]
                    case _:
                        data[at:at] = data[at:at + rng.randint(1, 8)]
            answer = responder.respond(bytes(data), now)
            ocsp.load_der_ocsp_response(answer.der)
            statuses.add(answer.status)
        assert "malformedRequest" in statuses and statuses <= {"successful", "malformedRequest", "unauthorized"}
    finally:
        service.engine.dispose()


def test_a_database_that_does_not_answer_is_try_later(ca: CA, good: Issued) -> None:
    """503 with Retry-After and an OCSP tryLater, never a 500 (in-process, the database unreachable)."""
    from certpulse.ca.service import CAService
    from certpulse.ca.state import KeyRing
    from certpulse.sql.db import make_engine

    gone = make_engine("postgresql+psycopg://nobody@127.0.0.1:1/none?connect_timeout=2", pool_size=1)
    service = CAService(gone, KeyRing(ca.dir / "keys"), policy_id="p", token_lifetime=dt.timedelta(hours=1))
    app = create_app(service)

    async def ask() -> httpx.Response:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://ca") as client:
            return await client.post("/ocsp", content=good.request(), headers={"Content-Type": OCSP_TYPE})

    try:
        answer = anyio.run(ask)
    finally:
        gone.dispose()
    assert answer.status_code == 503 and answer.headers["retry-after"].isdigit()
    assert response_of(answer).response_status == ocsp.OCSPResponseStatus.TRY_LATER


# -- the delegated signer -----------------------------------------------------------------------

def test_the_delegated_signer_is_a_short_lived_ocsp_signing_certificate(ca: CA, server: str, good: Issued,
                                                                       admin: Client) -> None:
    response = response_of(post(server, good.request()))
    signer, = response.certificates
    issuer = good.issuer_certificate()
    signer.verify_directly_issued_by(issuer)
    assert signer.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value == x509.ExtendedKeyUsage(
        [ExtendedKeyUsageOID.OCSP_SIGNING])
    assert signer.extensions.get_extension_for_class(x509.OCSPNoCheck).value == x509.OCSPNoCheck()
    usage = signer.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.digital_signature and not usage.key_cert_sign and not usage.crl_sign
    assert signer.not_valid_after_utc - signer.not_valid_before_utc == dt.timedelta(days=7, seconds=-1)
    assert response.responder_key_hash == x509.SubjectKeyIdentifier.from_public_key(signer.public_key()).digest
    # recorded like any certificate the CA makes, and audited
    serial = format(signer.serial_number, "x")
    status = admin.http.get(f"/v1/certificates/{serial}").json()
    assert status["template"] == SIGNER_TEMPLATE and status["status"] == "good", status
    audit = admin.http.get("/v1/audit", params={"limit": 10_000}).json()
    assert any(row["action"] == "ocsp-signer-issued" and row["serial"] == serial for row in audit)
    key_files = list((ca.dir / "keys").glob("ocsp-*.key"))
    assert key_files and all(f.stat().st_mode & 0o777 == 0o600 for f in key_files)


def test_the_signer_is_renewed_when_a_third_of_its_life_is_left(ca: CA, server: str) -> None:
    service = open_service(CADir(ca.dir), pool_size=2)
    try:
        now = dt.datetime.now(dt.UTC).replace(microsecond=0)
        with read(service.engine) as conn:
            current = newest_signers(conn, now)
        assert current  # ca serve made one before its workers started
        assert ensure_signers(service, now) == []
        assert ensure_signers(service, now + dt.timedelta(days=4)) == []  # more than a third left
        renewed, = ensure_signers(service, now + dt.timedelta(days=5))  # less than a third left
        assert renewed.not_after > current[renewed.authority_id].not_after
        with read(service.engine) as conn:
            assert newest_signers(conn, now + dt.timedelta(days=5))[renewed.authority_id].id == renewed.id
            assert newest_signers(conn, now)[renewed.authority_id].id != renewed.id  # not valid yet
        # a responder holding the old signer takes the new one once its own is due
        clock = [0.0]
        responder = OCSPResponder(service, monotonic=lambda: clock[0])
        request = unknown_request(service)
        assert signer_serial(responder.respond(request, now).der) != renewed.certificate.serial_number
        clock[0] += 3600.0
        later = now + dt.timedelta(days=5, seconds=1)
        assert signer_serial(responder.respond(request, later).der) == renewed.certificate.serial_number
        # once the old one has expired, its key goes (the new one's stays)
        old = current[renewed.authority_id]
        assert remove_expired_keys(service, old.not_after - dt.timedelta(seconds=1)) == []
        assert old.key_file in remove_expired_keys(service, old.not_after)
        assert not (ca.dir / "keys" / old.key_file).exists() and (ca.dir / "keys" / renewed.key_file).exists()
    finally:
        service.engine.dispose()


def unknown_request(service: object, serial: int = 0xABCDEF) -> bytes:
    """A request about a serial never issued, by the CA's (first) issuing authority."""
    from certpulse.ca.service import CAService
    from certpulse.pki.ocsp import issuer_keys

    assert isinstance(service, CAService)
    with read(service.engine) as conn:
        issuer = next(a for a in service.state.get(conn).authorities if a.role == "issuer")
    _, name_hash, key_hash = issuer_keys(issuer.certificate)[0]
    return request_with_hash_oid(SHA1_OID, name_hash, key_hash, serial)


def test_a_serial_only_reserved_is_unknown(ca: CA, server: str) -> None:
    """A serial recorded before signing, never signed (a failed issuance): in no one's hands."""
    service = open_service(CADir(ca.dir), pool_size=2)
    try:
        now = dt.datetime.now(dt.UTC).replace(microsecond=0)
        with write(service.engine) as conn:
            issuer = next(a for a in service.state.get(conn).authorities if a.role == "issuer")
            conn.execute(t.certificates.insert().values(
                authority_id=issuer.id, serial="5eed5eed5eed", template_name="machine", subject="CN=x", names="[]",
                not_before=now, not_after=now + dt.timedelta(days=1), status="reserved", created_at=now))
        answer = post(server, unknown_request(service, 0x5EED5EED5EED))
        assert response_of(answer).certificate_status == ocsp.OCSPCertStatus.UNKNOWN
    finally:
        service.engine.dispose()


def signer_serial(der: bytes) -> int:
    response = ocsp.load_der_ocsp_response(der)
    assert response.response_status == ocsp.OCSPResponseStatus.SUCCESSFUL
    return int(response.certificates[0].serial_number)


def test_a_process_without_a_signer_makes_one_and_two_at_once_do_no_harm(ca: CA, server: str) -> None:
    services = [open_service(CADir(ca.dir), pool_size=2) for _ in range(2)]
    try:
        request = unknown_request(services[0])
        with write(services[0].engine) as conn:
            conn.execute(t.ocsp_signers.delete())  # as if ca serve had never made one
        # through the route, in-process: the application makes the signer it needs
        app = create_app(services[0])

        async def ask() -> httpx.Response:
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://ca") as client:
                return await client.post("/ocsp", content=request, headers={"Content-Type": OCSP_TYPE})

        answer = anyio.run(ask)
        assert answer.status_code == 200
        assert response_of(answer).certificate_status == ocsp.OCSPCertStatus.UNKNOWN
        with write(services[0].engine) as conn:
            conn.execute(t.ocsp_signers.delete())  # and again, for two processes at once
        results: list[bytes] = []
        threads = [threading.Thread(target=lambda s=s: results.append(
            OCSPResponder(s).respond(request, dt.datetime.now(dt.UTC).replace(microsecond=0)).der))
            for s in services]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        assert len(results) == 2 and all(signer_serial(r) for r in results)
        with read(services[0].engine) as conn:
            rows = conn.execute(select(t.ocsp_signers.c.id)).all()
        assert 1 <= len(rows) <= 2
    finally:
        for service in services:
            service.engine.dispose()


# -- roles and load shedding (SQLite: the writer lock holds a request in progress) -------------

def test_status_and_enrollment_roles_serve_their_own_routes(ca: CA, backend: str, good: Issued) -> None:
    if backend != "sqlite":
        pytest.skip("the roles do not depend on the database")
    with serve(ca, "--role", "status") as status:
        assert response_of(post(status, good.request())).certificate_status == ocsp.OCSPCertStatus.GOOD
        assert_malformed(post(status, b"garbage"))
        for probe in ("/livez", "/healthz", "/readyz", "/metrics"):
            assert httpx.get(f"{status}{probe}", timeout=30).status_code == 200, probe
        metrics = httpx.get(f"{status}/metrics", timeout=30).text
        assert 'certpulse_ocsp_responses_total{source="database",status="good"} 1.0' in metrics, metrics
        assert 'certpulse_ocsp_responses_total{source="memory",status="malformedRequest"} 1.0' in metrics
        for path in ("/v1/policy", "/openapi.json"):
            answer = httpx.get(f"{status}{path}", timeout=30)
            assert answer.status_code == 404 and answer.headers["content-type"].startswith("application/problem+json")
    refused = ca.cli("ca", "serve", "--role", "relying-party", check=False)
    assert refused.returncode != 0 and "--role must be one of all, enrollment, status" in refused.stderr, refused
    assert "Traceback" not in refused.stderr
    with serve(ca, "--role", "enrollment") as enrollment:
        assert post(enrollment, good.request()).status_code in (404, 405)
        assert httpx.get(f"{enrollment}/v1/policy", timeout=30).status_code == 401


class _HeldExchange:
    """A token exchange in progress on the server, its handler waiting for the SQLite writer lock
    this test holds (the technique of tests/test_load_shedding.py)."""

    BODY = b'{"token": "cpe_not-a-real-token"}'

    def __init__(self, base: str) -> None:
        url = urlsplit(base)
        self.sock = socket.create_connection((url.hostname or "127.0.0.1", url.port or 80), timeout=60)
        self.sock.sendall(b"POST /v1/tokens/exchange HTTP/1.1\r\nHost: ca\r\nContent-Type: application/json\r\n"
                          b"Content-Length: %d\r\n\r\n" % len(self.BODY) + self.BODY)


@contextlib.contextmanager
def writer_lock(database: Path) -> Iterator[None]:
    fd = os.open(f"{database}-writer", os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def test_ocsp_is_answered_while_enrollment_is_shed(ca: CA, backend: str, good: Issued) -> None:
    if backend != "sqlite":
        pytest.skip("holds the SQLite writer lock")
    with serve(ca, "--max-inflight", "1") as base:
        uncached = good.request(hashes.SHA256())
        with writer_lock(Path(ca.database_url.removeprefix("sqlite:///"))):
            held = _HeldExchange(base)
            try:
                wait_until(lambda: httpx.get(f"{base}/v1/policy", timeout=10).status_code == 503, 60,
                           "enrollment to be shed")
                answer = post(base, uncached)  # needs a database read and a signature: both go on
                assert answer.status_code == 200
                assert response_of(answer).certificate_status == ocsp.OCSPCertStatus.GOOD
                out = openssl_ocsp(base, good)
                assert f"{good.leaf}: good" in out and "Response verify OK" in out, out
            finally:
                held.sock.close()
