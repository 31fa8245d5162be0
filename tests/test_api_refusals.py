"""Bad input to a real ``certpulse ca serve`` gets a clear refusal, is audited, and issues nothing.

Every case goes over loopback to a real server process (SQLite and PostgreSQL) and must come
back as a 4xx RFC 7807 problem whose ``reason`` names the refusal -- never a 5xx, never a
hang. After each refusal the admin audit API must show exactly one new row, carrying that
reason, and the CA must hold no more certificate requests than before (nothing issued,
nothing left pending).
"""

from __future__ import annotations

import base64
import dataclasses
import datetime as dt
import functools
import json
import socket
import uuid
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, padding, rsa
from cryptography.x509.oid import NameOID, ObjectIdentifier

from pki_factory import der, der_oid
from support import (
    CA,
    Client,
    assert_problem,
    audit_since,
    csr_der,
    make_csr,
    new_key,
    newest_audit_id,
    request_count,
)

MAX_BODY = 64 * 1024  # the server's default ``max_request_bytes``

CSRSigningKey = (
    rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | dsa.DSAPrivateKey
    | ed25519.Ed25519PrivateKey | ed448.Ed448PrivateKey
)


# -- the check every refusal goes through ------------------------------------------------


def expect_refusal(admin: Client, send: Callable[[], httpx.Response], status: int,
                   reason: str) -> httpx.Response:
    """``send`` is refused with ``status``/``reason``, one audit row says so, nothing is issued."""
    before_id = newest_audit_id(admin)
    before_requests = request_count(admin)
    response = send()
    body = assert_problem(response, status, reason)
    assert "Traceback" not in body["detail"], body
    rows = audit_since(admin, before_id)
    assert [row["reason"] for row in rows] == [reason], rows
    assert rows[0]["action"] not in ("issued", "pending", "approved"), rows
    assert request_count(admin) == before_requests, "a refused request left a request row"
    return response


# -- principals shared by the module (each ``principal add`` is a ~1 s CLI run) ----------


def _name(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}.example.internal"


@pytest.fixture(scope="module")
def host(ca: CA, server: str) -> Client:
    """A machine principal in group ``webservers``: may enroll for ``machine`` and ``webserver``."""
    return Client.enrolled(server, ca.add_principal(_name("web"), "--group", "webservers"))


@pytest.fixture(scope="module")
def outsider(ca: CA, server: str) -> Client:
    """A machine principal in no extra group: may read ``webserver`` but not enroll for it."""
    return Client.enrolled(server, ca.add_principal(_name("plain")))


# -- building CSRs, well-formed and not --------------------------------------------------


@functools.cache
def rsa_key(bits: int = 2048, exponent: int = 65537) -> rsa.RSAPrivateKey:
    key = rsa.generate_private_key(public_exponent=exponent, key_size=bits)
    # OpenSSL may return one bit less than asked for an odd size: make sure of what we test
    assert key.key_size == bits, (bits, key.key_size)
    return key


@functools.cache
def ec_key(curve: type[ec.EllipticCurve]) -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(curve())


@functools.cache
def dsa_key() -> dsa.DSAPrivateKey:
    return dsa.generate_private_key(2048)


def build_csr(key: CSRSigningKey | None = None, *, subject: list[x509.NameAttribute[str]] | None = None,
              sans: list[x509.GeneralName] | None = None,
              algorithm: hashes.HashAlgorithm | None = None) -> x509.CertificateSigningRequest:
    """A CSR cryptography will sign: any subject attributes and any kinds of SAN."""
    key = key or new_key()
    builder = x509.CertificateSigningRequestBuilder().subject_name(x509.Name(subject or []))
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    if algorithm is None and not isinstance(key, ed25519.Ed25519PrivateKey | ed448.Ed448PrivateKey):
        algorithm = hashes.SHA256()
    return builder.sign(key, algorithm)  # type: ignore[arg-type]


def pem_of(csr: x509.CertificateSigningRequest) -> str:
    return csr.public_bytes(serialization.Encoding.PEM).decode()


def b64_der(data: bytes) -> str:
    return base64.b64encode(data).decode()


def cn(value: str) -> x509.NameAttribute[str]:
    return x509.NameAttribute(NameOID.COMMON_NAME, value)


def legacy_signed_csr(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey,
                      algorithm: hashes.HashAlgorithm, oid: str) -> bytes:
    """A DER CSR signed (validly) with a hash cryptography's CSR builder no longer offers.

    The CertificationRequestInfo of an ordinary request is re-signed with ``algorithm`` and
    the request reassembled by hand (RFC 2986: info, AlgorithmIdentifier, BIT STRING).
    """
    info = build_csr(key, subject=[cn("legacy.example.internal")]).tbs_certrequest_bytes
    if isinstance(key, rsa.RSAPrivateKey):
        signature = key.sign(info, padding.PKCS1v15(), algorithm)
        algorithm_id = der(0x30, der_oid(oid) + b"\x05\x00")
    else:
        signature = key.sign(info, ec.ECDSA(algorithm))
        algorithm_id = der(0x30, der_oid(oid))
    return der(0x30, info + algorithm_id + der(0x03, b"\x00" + signature))


def tampered(der: bytes) -> bytes:
    """The same request with the last byte of its signature flipped (still well-formed DER)."""
    return der[:-1] + bytes([der[-1] ^ 0x01])


def valid_der() -> bytes:
    return csr_der(make_csr()[1])


def swapped_signature() -> bytes:
    """One request's info and algorithm with another request's (valid) signature."""
    own, other = (x509.load_der_x509_csr(valid_der()) for _ in range(2))
    algorithm_id = der(0x30, der_oid(own.signature_algorithm_oid.dotted_string))
    return der(0x30, own.tbs_certrequest_bytes + algorithm_id + der(0x03, b"\x00" + other.signature))


def self_signed_certificate_pem() -> str:
    name = x509.Name([cn("not-a-request")])
    return (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(rsa_key().public_key()).serial_number(1)
            .not_valid_before(dt.datetime(2020, 1, 1)).not_valid_after(dt.datetime(2030, 1, 1))
            .sign(rsa_key(), hashes.SHA256()).public_bytes(serialization.Encoding.PEM).decode())


# -- the CSR itself: refused before any name or key rule ----------------------------------


@dataclasses.dataclass(frozen=True)
class Case:
    template: str
    csr: Callable[[], str]
    status: int
    reason: str


def _truncated_pem() -> str:
    text = make_csr()[1]
    lines = text.splitlines()
    return "\n".join([*lines[:3], lines[-1]]) + "\n"


CSR_CASES: dict[str, Case] = {
    # malformed-csr: nothing parseable as PKCS#10
    "pem-with-garbage-body": Case(
        "machine",
        lambda: "-----BEGIN CERTIFICATE REQUEST-----\nnot base64 at all!!\n"
                "-----END CERTIFICATE REQUEST-----\n",
        400, "malformed-csr"),
    "pem-truncated": Case("machine", _truncated_pem, 400, "malformed-csr"),
    "pem-without-end-line": Case(
        "machine", lambda: make_csr()[1].replace("-----END CERTIFICATE REQUEST-----", ""),
        400, "malformed-csr"),
    "garbage-der": Case("machine", lambda: b64_der(bytes(range(256)) * 2), 400, "malformed-csr"),
    "der-truncated": Case("machine", lambda: b64_der(valid_der()[:150]), 400, "malformed-csr"),
    "der-with-trailing-bytes": Case(
        "machine", lambda: b64_der(valid_der() + b"\x00\x00"), 400, "malformed-csr"),
    "base64-truncated": Case("machine", lambda: b64_der(valid_der())[:-3], 400, "malformed-csr"),
    "empty": Case("machine", lambda: "", 400, "malformed-csr"),
    "not-ascii": Case("machine", lambda: "\u00e9t\u00e9 \u2603 \U0001f600", 400, "malformed-csr"),
    "a-certificate-not-a-csr": Case("machine", self_signed_certificate_pem, 400, "malformed-csr"),
    # bad-csr-signature: parses, but the proof of possession fails
    "ec-signature-tampered": Case(
        "machine", lambda: b64_der(tampered(valid_der())), 400, "bad-csr-signature"),
    "rsa-signature-tampered": Case(
        "machine",
        lambda: b64_der(tampered(csr_der(pem_of(build_csr(rsa_key()))))),
        400, "bad-csr-signature"),
    "signature-of-another-key": Case(
        "machine", lambda: b64_der(swapped_signature()), 400, "bad-csr-signature"),
    # weak-signature-algorithm: a valid signature, over a broken hash
    "rsa-sha1": Case(
        "machine", lambda: b64_der(legacy_signed_csr(rsa_key(), hashes.SHA1(), "1.2.840.113549.1.1.5")),  # noqa: S303
        400, "weak-signature-algorithm"),
    "rsa-md5": Case(
        "machine", lambda: b64_der(legacy_signed_csr(rsa_key(), hashes.MD5(), "1.2.840.113549.1.1.4")),  # noqa: S303
        400, "weak-signature-algorithm"),
    "ecdsa-sha1": Case(
        "machine",
        lambda: b64_der(legacy_signed_csr(ec_key(ec.SECP256R1), hashes.SHA1(), "1.2.840.10045.4.1")),  # noqa: S303
        400, "weak-signature-algorithm"),
    # key-not-allowed: global key rules, then the template's
    "rsa-1024": Case("machine", lambda: pem_of(build_csr(rsa_key(1024))), 400, "key-not-allowed"),
    "rsa-exponent-3": Case("machine", lambda: pem_of(build_csr(rsa_key(2048, 3))), 400,
                           "key-not-allowed"),
    "rsa-2050-bits": Case("machine", lambda: pem_of(build_csr(rsa_key(2050))), 400,
                          "key-not-allowed"),
    "rsa-2052-bits": Case("machine", lambda: pem_of(build_csr(rsa_key(2052))), 400,
                          "key-not-allowed"),
    "ec-p192": Case("machine", lambda: pem_of(build_csr(ec_key(ec.SECP192R1))), 400,
                    "key-not-allowed"),
    "ec-p224": Case("machine", lambda: pem_of(build_csr(ec_key(ec.SECP224R1))), 400,
                    "key-not-allowed"),
    "ec-secp256k1": Case("machine", lambda: pem_of(build_csr(ec_key(ec.SECP256K1))), 400,
                         "key-not-allowed"),
    "ec-brainpool-p256": Case("machine", lambda: pem_of(build_csr(ec_key(ec.BrainpoolP256R1))),
                              400, "key-not-allowed"),
    "ec-p521-not-in-template": Case(
        "machine", lambda: pem_of(build_csr(ec_key(ec.SECP521R1), algorithm=hashes.SHA512())),
        400, "key-not-allowed"),
    "ed25519": Case("machine", lambda: pem_of(build_csr(ed25519.Ed25519PrivateKey.generate())),
                    400, "key-not-allowed"),
    "ed448": Case("machine", lambda: pem_of(build_csr(ed448.Ed448PrivateKey.generate())),
                  400, "key-not-allowed"),
    "dsa-2048": Case("machine", lambda: pem_of(build_csr(dsa_key())), 400, "key-not-allowed"),
    # name-not-allowed on ``webserver`` (names from the request, within .example.internal)
    "dns-outside-domain": Case(
        "webserver", lambda: make_csr(dns=["www.example.com"])[1], 400, "name-not-allowed"),
    "dns-the-bare-domain": Case(
        "webserver", lambda: make_csr(dns=["example.internal"])[1], 400, "name-not-allowed"),
    "dns-suffix-lookalike": Case(
        "webserver", lambda: make_csr(dns=["evil-example.internal"])[1], 400, "name-not-allowed"),
    "dns-not-a-hostname": Case(
        "webserver", lambda: make_csr(dns=["bad_name.example.internal"])[1], 400,
        "name-not-allowed"),
    "one-bad-among-good": Case(
        "webserver", lambda: make_csr(dns=["a.example.internal", "b.example.org"])[1], 400,
        "name-not-allowed"),
    "wildcard": Case(
        "webserver", lambda: make_csr(dns=["*.example.internal"])[1], 400, "name-not-allowed"),
    "wildcard-as-cn": Case(
        "webserver", lambda: make_csr(cn="*.example.internal")[1], 400, "name-not-allowed"),
    "ip-outside-ranges": Case(
        "webserver", lambda: make_csr(dns=["a.example.internal"], ips=["192.168.1.10"])[1], 400,
        "name-not-allowed"),
    "ipv6-outside-ranges": Case(
        "webserver", lambda: make_csr(ips=["2001:db8::1"])[1], 400, "name-not-allowed"),
    "uri-san": Case(
        "webserver",
        lambda: pem_of(build_csr(sans=[x509.DNSName("a.example.internal"),
                                       x509.UniformResourceIdentifier("https://a.example.internal/")])),
        400, "name-not-allowed"),
    "email-san": Case(
        "webserver",
        lambda: pem_of(build_csr(sans=[x509.RFC822Name("root@example.internal")])),
        400, "name-not-allowed"),
    "directory-name-san": Case(
        "webserver",
        lambda: pem_of(build_csr(sans=[x509.DirectoryName(x509.Name([cn("a.example.internal")]))])),
        400, "name-not-allowed"),
    "other-name-san": Case(
        "webserver",
        lambda: pem_of(build_csr(sans=[x509.OtherName(ObjectIdentifier("1.3.6.1.4.1.311.20.2.3"),
                                                      b"\x0c\x03a@b")])),
        400, "name-not-allowed"),
    "cn-not-among-sans": Case(
        "webserver", lambda: make_csr(cn="a.example.internal", dns=["b.example.internal"])[1], 400,
        "name-not-allowed"),
    "two-common-names": Case(
        "webserver",
        lambda: pem_of(build_csr(subject=[cn("a.example.internal"), cn("b.example.internal")],
                                 sans=[x509.DNSName("a.example.internal")])),
        400, "name-not-allowed"),
    "no-names-at-all": Case("webserver", lambda: make_csr()[1], 400, "name-not-allowed"),
    "cn-not-a-hostname-and-no-san": Case(
        "webserver", lambda: make_csr(cn="My Web Server")[1], 400, "name-not-allowed"),
    "subject-attribute-not-allowed": Case(
        "webserver",
        lambda: pem_of(build_csr(subject=[cn("a.example.internal"),
                                          x509.NameAttribute(NameOID.SERIAL_NUMBER, "42")],
                                 sans=[x509.DNSName("a.example.internal")])),
        400, "name-not-allowed"),
    "too-many-names": Case(
        "webserver", lambda: make_csr(dns=[f"h{i}.example.internal" for i in range(21)])[1], 400,
        "name-not-allowed"),
}


@pytest.mark.parametrize("case", list(CSR_CASES), ids=list(CSR_CASES))
def test_bad_csr_is_refused(case: str, host: Client, admin: Client) -> None:
    spec = CSR_CASES[case]
    csr = spec.csr()
    expect_refusal(admin, lambda: host.submit(spec.template, csr), spec.status, spec.reason)


def test_control_good_requests_are_issued(host: Client, admin: Client) -> None:
    """The same principal and templates do issue when the request is right (so the refusals
    above are about the input, not a principal that can never enroll)."""
    before = request_count(admin)
    _, machine_cert = host.enroll("machine")
    assert machine_cert["status"] == "issued"
    _, web_cert = host.enroll("webserver", cn="www.example.internal",
                              dns=["www.example.internal", "localhost"], ips=["127.0.0.1", "10.1.2.3"])
    assert web_cert["status"] == "issued"
    for key_args in ({"bits": 3072}, {"bits": 2048}):
        csr = pem_of(build_csr(rsa_key(**key_args)))
        assert host.submit("machine", csr).status_code == 201
    assert request_count(admin) == before + 4


# -- templates and permissions --------------------------------------------------------


def test_unknown_template(host: Client, admin: Client) -> None:
    csr = make_csr()[1]
    expect_refusal(admin, lambda: host.submit("no-such-template", csr), 400, "unknown-template")


def test_template_readable_but_not_enrollable(outsider: Client, admin: Client) -> None:
    csr = make_csr(dns=["a.example.internal"])[1]
    expect_refusal(admin, lambda: outsider.submit("webserver", csr), 403, "template-not-permitted")


def test_template_not_readable_looks_unknown(ca: CA, server: str, admin: Client) -> None:
    """A user principal has no right at all on ``machine``: it is told no such template exists."""
    user = Client.enrolled(server, ca.add_principal(f"user-{uuid.uuid4().hex[:8]}", "--kind", "user"))
    csr = make_csr()[1]
    response = expect_refusal(admin, lambda: user.submit("machine", csr), 400, "unknown-template")
    assert "may not" not in response.json()["detail"]


def test_admin_key_cannot_enroll(admin: Client) -> None:
    csr = make_csr()[1]
    expect_refusal(admin, lambda: admin.submit("machine", csr), 403, "forbidden")


# -- the HTTP body: shape, size, encoding ----------------------------------------------


JSON = {"content-type": "application/json"}

BODY_CASES: dict[str, tuple[bytes, dict[str, str]]] = {
    "not-json": (b"this is not json", JSON),
    "json-truncated": (b'{"template": "machine", "csr": "', JSON),
    "text-plain": (b"template=machine&csr=x", {"content-type": "text/plain"}),
    "form-encoded": (b"template=machine&csr=x", {"content-type": "application/x-www-form-urlencoded"}),
    "no-content-type": (b"garbage", {}),
    "empty-body": (b"", JSON),
    "json-array": (b"[]", JSON),
    "json-string": (b'"csr"', JSON),
    "json-null": (b"null", JSON),
    "empty-object": (b"{}", JSON),
    "csr-missing": (b'{"template": "machine"}', JSON),
    "csr-a-number": (b'{"template": "machine", "csr": 123}', JSON),
    "csr-a-list": (b'{"template": "machine", "csr": ["a"]}', JSON),
    "template-null": (b'{"template": null, "csr": "x"}', JSON),
    "unknown-field": (b'{"template": "machine", "csr": "x", "subject": "CN=root"}', JSON),
    "unknown-field-nul-key": (b'{"template": "machine", "csr": "x", "\\u0000": 1}', JSON),
    "unknown-field-surrogate-key": (b'{"template": "machine", "csr": "x", "\\ud800": 1}', JSON),
    "renewal-wrong-shape": (b'{"template": "machine", "csr": "x", "renewal": "yes"}', JSON),
    "renewal-unknown-field": (
        b'{"template": "machine", "csr": "x", "renewal": {"certificate": "a", "signature": "b", "c": 1}}',
        JSON),
    "too-many-ra-signatures": (
        json.dumps({"template": "machine", "csr": "x",
                    "ra_signatures": [{"certificate": "a", "signature": "b"}] * 6}).encode(), JSON),
    "template-too-long": (json.dumps({"template": "t" * 65, "csr": "x"}).encode(), JSON),
    "csr-too-long": (json.dumps({"template": "machine", "csr": "A" * 40_001}).encode(), JSON),
    "invalid-utf8": (b'{"template": "machine", "csr": "\xff\xfe"}', JSON),
    "deeply-nested": (b'{"csr": ' + b"[" * 20_000 + b"]" * 20_000 + b"}", JSON),
    "huge-number": (b'{"template": "machine", "csr": "x", "issuer": ' + b"9" * 5000 + b"}", JSON),
}


@pytest.mark.parametrize("case", list(BODY_CASES), ids=list(BODY_CASES))
def test_malformed_body(case: str, host: Client, admin: Client) -> None:
    content, headers = BODY_CASES[case]
    expect_refusal(admin, lambda: host.http.post("/v1/requests", content=content, headers=headers),
                   400, "malformed-request")


def test_renewal_evidence_not_a_certificate(host: Client, admin: Client) -> None:
    csr = make_csr()[1]
    renewal = {"certificate": "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
               "signature": "AAAA"}
    expect_refusal(admin, lambda: host.submit("machine", csr, renewal=renewal), 400, "malformed-request")


def test_renewal_evidence_with_an_impossible_version(host: Client, admin: Client) -> None:
    """A certificate whose version field says v6 (cryptography raises no ValueError for it)."""
    _, issued = host.enroll("machine")
    der = x509.load_pem_x509_certificate(issued["certificate"].encode()).public_bytes(
        serialization.Encoding.DER)
    v3 = bytes.fromhex("a003020102")  # [0] EXPLICIT INTEGER 2, i.e. v3
    assert der.count(v3) == 1
    bad = b64_der(der.replace(v3, bytes.fromhex("a003020105")))
    lines = [bad[i:i + 64] for i in range(0, len(bad), 64)]
    certificate = "\n".join(["-----BEGIN CERTIFICATE-----", *lines, "-----END CERTIFICATE-----", ""])
    renewal = {"certificate": certificate, "signature": "AAAA"}
    csr = make_csr()[1]
    expect_refusal(admin, lambda: host.submit("machine", csr, renewal=renewal), 400, "malformed-request")


def test_renewal_signature_not_base64(host: Client, admin: Client) -> None:
    _, issued = host.enroll("machine")
    csr = make_csr()[1]
    renewal = {"certificate": issued["certificate"], "signature": "not base64!"}
    expect_refusal(admin, lambda: host.submit("machine", csr, renewal=renewal), 400, "malformed-request")


@pytest.mark.parametrize(("template", "reason"), [
    ("\u0000", "unknown-template"),
    ("a\u0000b", "unknown-template"),
    ("\u202e\u0000" * 32, "unknown-template"),  # 64 characters, longer once escaped for the audit
    ("\ud800", "malformed-request"),  # not Unicode text at all: refused while parsing
    ("\udfff\ud800", "malformed-request"),
], ids=["nul", "embedded-nul", "rlo-nul-64", "lone-surrogate", "reversed-surrogates"])
def test_unprintable_template_name(template: str, reason: str, host: Client, admin: Client) -> None:
    """Names that no database text column takes as-is are still refused cleanly and audited."""
    body = json.dumps({"template": template, "csr": make_csr()[1]}).encode()  # \u escapes: ASCII
    expect_refusal(admin, lambda: host.http.post("/v1/requests", content=body, headers=JSON),
                   400, reason)


def test_body_over_limit_with_content_length(host: Client, admin: Client) -> None:
    body = json.dumps({"template": "machine", "csr": "A" * (MAX_BODY + 10)}).encode()
    expect_refusal(admin, lambda: host.http.post("/v1/requests", content=body, headers=JSON),
                   413, "body-too-large")


def test_body_over_limit_streamed(host: Client, admin: Client) -> None:
    def chunks() -> Iterator[bytes]:
        yield b'{"template": "machine", "csr": "'
        for _ in range(MAX_BODY // 4096 + 2):
            yield b"A" * 4096
        yield b'"}'

    def send() -> httpx.Response:
        response = host.http.post("/v1/requests", content=chunks(), headers=JSON)
        assert "content-length" not in response.request.headers
        assert response.request.headers["transfer-encoding"] == "chunked"
        return response

    expect_refusal(admin, send, 413, "body-too-large")


def test_body_at_limit_is_read(host: Client, admin: Client) -> None:
    """Exactly ``MAX_BODY`` bytes is allowed through (and then refused for its content)."""
    prefix, suffix = b'{"template": "machine", "csr": "', b'"}'
    body = prefix + b"A" * (MAX_BODY - len(prefix) - len(suffix)) + suffix
    assert len(body) == MAX_BODY
    expect_refusal(admin, lambda: host.http.post("/v1/requests", content=body, headers=JSON),
                   400, "malformed-request")


def _raw_exchange(server: str, head: bytes, body: bytes, timeout: float = 10) -> tuple[int, bytes]:
    """Send ``head`` and ``body`` over a plain socket (no more), read the reply to its end."""
    url = urlsplit(server)
    with socket.create_connection((url.hostname or "127.0.0.1", url.port or 80), timeout=timeout) as sock:
        sock.sendall(head + body)
        received = b""
        while b"\r\n\r\n" not in received or not _complete(received):
            data = sock.recv(65536)
            if not data:
                break
            received += data
    status_line = received.split(b"\r\n", 1)[0]
    assert status_line.startswith(b"HTTP/1.1 "), received[:200]
    return int(status_line.split()[1]), received


def _complete(received: bytes) -> bool:
    head, _, rest = received.partition(b"\r\n\r\n")
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return len(rest) >= int(value.strip())
    return False


def test_declared_huge_body_refused_without_waiting_for_it(server: str, host: Client, admin: Client) -> None:
    """A Content-Length of 1 GB is refused at once: the server does not wait for the body."""
    credential = host.http.headers["authorization"].encode()
    head = (b"POST /v1/requests HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
            b"Authorization: " + credential + b"\r\nContent-Length: 1000000000\r\n\r\n")

    def send() -> httpx.Response:
        status, raw = _raw_exchange(server, head, b'{"template": ')
        body = raw.partition(b"\r\n\r\n")[2]
        return httpx.Response(status, content=body,
                              headers={"content-type": "application/problem+json"})

    expect_refusal(admin, send, 413, "body-too-large")


def test_endless_chunked_body_refused_once_over_limit(server: str, host: Client, admin: Client) -> None:
    """A chunked body that never ends is refused once past the limit, not read to its end."""
    credential = host.http.headers["authorization"].encode()
    head = (b"POST /v1/requests HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
            b"Authorization: " + credential + b"\r\nTransfer-Encoding: chunked\r\n\r\n")
    chunk = b"1000\r\n" + b"A" * 0x1000 + b"\r\n"
    partial = chunk * (MAX_BODY // 0x1000 + 2)  # over the limit, and no terminating chunk

    def send() -> httpx.Response:
        status, raw = _raw_exchange(server, head, partial)
        return httpx.Response(status, content=raw.partition(b"\r\n\r\n")[2],
                              headers={"content-type": "application/problem+json"})

    expect_refusal(admin, send, 413, "body-too-large")
    assert httpx.get(f"{server}/healthz", timeout=5).status_code == 200


# -- credentials and enrollment tokens --------------------------------------------------


@pytest.mark.parametrize("authorization", [
    None, "", "Bearer", "Basic dXNlcjpwYXNz", "Bearer cpc_not-a-real-credential",
    "Bearer cpa_not-a-real-admin-key", "bearer x y", "Token abc", "Bearer \u00e9t\u00e9",
])
def test_missing_or_bad_credential(authorization: str | None, server: str, admin: Client) -> None:
    headers = {b"authorization": authorization.encode("latin-1")} if authorization is not None else {}
    csr = make_csr()[1]
    with httpx.Client(base_url=server, timeout=30) as anonymous:
        for send in (
            lambda: anonymous.post("/v1/requests", json={"template": "machine", "csr": csr},
                                   headers=headers),
            lambda: anonymous.get("/v1/policy", headers=headers),
            lambda: anonymous.get("/v1/audit", headers=headers),
        ):
            response = expect_refusal(admin, send, 401, "unauthenticated")
            assert response.headers["www-authenticate"].lower().startswith("bearer")


def test_unknown_enrollment_token(server: str, admin: Client) -> None:
    for token in ("cpt_not-a-token", "", "x" * 200, "\u00e9\u0000"):
        expect_refusal(admin, lambda t=token: httpx.post(f"{server}/v1/tokens/exchange",  # type: ignore[misc]
                                                         json={"token": t}, timeout=30),
                       401, "token-invalid")


def test_enrollment_token_too_long(server: str, admin: Client) -> None:
    expect_refusal(admin, lambda: httpx.post(f"{server}/v1/tokens/exchange",
                                             json={"token": "x" * 201}, timeout=30),
                   400, "malformed-request")


def test_enrollment_token_used_twice(ca: CA, server: str, admin: Client) -> None:
    token = ca.add_principal(_name("once"))
    first = httpx.post(f"{server}/v1/tokens/exchange", json={"token": token}, timeout=30)
    assert first.status_code == 200, first.text
    expect_refusal(admin, lambda: httpx.post(f"{server}/v1/tokens/exchange",
                                             json={"token": token}, timeout=30),
                   409, "token-used")
    # the first exchange's credential still works; the refused one minted nothing new
    assert Client(server, first.json()["credential"]).http.get("/v1/policy").status_code == 200


# -- management calls by a principal that is not a CA manager -----------------------------


MANAGER_ONLY: dict[str, tuple[str, str, dict[str, Any] | None]] = {
    "list-requests": ("GET", "/v1/requests", None),
    "list-issued-requests": ("GET", "/v1/requests?status=issued", None),
    "audit-log": ("GET", "/v1/audit", None),
    "approve": ("POST", "/v1/requests/1/approve", None),
    "deny": ("POST", "/v1/requests/1/deny", {"reason": "no"}),
    "revoke": ("POST", "/v1/certificates/1/revoke", {"reason": "key_compromise"}),
}


def test_principal_is_not_a_manager(machine: Client, admin: Client) -> None:
    # one principal for every call: each ``machine`` costs a CLI run
    for call, (method, path, body) in MANAGER_ONLY.items():
        response = expect_refusal(
            admin, lambda m=method, p=path, b=body: machine.http.request(m, p, json=b),  # type: ignore[misc]
            403, "forbidden")
        assert "manager" in response.json()["detail"], (call, response.text)


def test_requests_of_others_are_not_found(host: Client, outsider: Client) -> None:
    _, issued = host.enroll("machine")
    assert_problem(outsider.http.get(f"/v1/requests/{issued['id']}"), 404, "not-found")
    assert host.http.get(f"/v1/requests/{issued['id']}").status_code == 200


def test_ip_range_edges(host: Client, admin: Client) -> None:
    """The last addresses inside the allowed ranges are issued; the first one outside is not."""
    inside = make_csr(dns=["ip.example.internal"], ips=["10.255.255.255", "127.255.255.254", "::1"])[1]
    assert host.submit("webserver", inside).status_code == 201
    for address in ("11.0.0.0", "9.255.255.255", "::2"):
        outside = make_csr(dns=["ip.example.internal"], ips=[address])[1]
        expect_refusal(admin, lambda c=outside: host.submit("webserver", c),  # type: ignore[misc]
                       400, "name-not-allowed")
