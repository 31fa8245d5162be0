"""Every PKCS#10 request in pyca's test vectors, through a real server, for the ``machine`` template.

Provenance: cryptography-vectors 50.0.2 (PyPI), folder ``x509/requests/``. The expected outcome
of each file was decided by reading it (``openssl req -noout -text -verify`` and cryptography)
and is written down below with the reason. ``machine`` takes its subject and DNS name from the
principal, never from the CSR, so a well-signed request with an allowed key (EC P-256/P-384,
RSA >= 2048 with e=65537) is issued whatever its subject says. The server checks, in order:
parse -> signature hash (MD4/MD5/SHA-1 refused even when the signature itself verifies) ->
signature -> extensions -> key.

A file added to the folder by a later release fails :func:`test_table_covers_every_vector`
until someone looks at it and adds its row.
"""

from __future__ import annotations

import base64
import dataclasses
import importlib.metadata
import importlib.resources
import uuid
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from support import (
    CA,
    Client,
    assert_problem,
    audit_since,
    newest_audit_id,
    request_count,
)

VECTORS_RELEASE = "50.0.2"  # the release the table below was written against
FOLDER = "x509/requests"


@dataclasses.dataclass(frozen=True)
class Expected:
    status: int
    reason: str | None  # None: issued
    why: str


ISSUED = 201


def issued(why: str) -> Expected:
    return Expected(ISSUED, None, why)


def refused(reason: str, why: str, status: int = 400) -> Expected:
    return Expected(status, reason, why)


WEAK = "weak-signature-algorithm"
BAD_SIGNATURE = "bad-csr-signature"
MALFORMED = "malformed-csr"

EXPECTED: dict[str, Expected] = {
    "bad-version.pem": refused(MALFORMED, "version field is 1 (only v1 = 0 exists); unparseable"),
    "basic_constraints.pem": refused(WEAK, "RSA-2048 signed with SHA-1 (its signature fails too)"),
    "challenge-invalid.der": refused(
        BAD_SIGNATURE, "SHA-256, challengePassword of an invalid type; the signature does not verify"),
    "challenge-multi-valued.der": refused(
        BAD_SIGNATURE, "SHA-256, multi-valued challengePassword; the signature does not verify"),
    "challenge-unstructured.pem": issued(
        "RSA-2048/SHA-256, valid; challengePassword and unstructuredName attributes are ignored"),
    "challenge.pem": issued("RSA-2048/SHA-256, valid; a challengePassword attribute, ignored"),
    "dsa_sha1.der": refused(WEAK, "DSA-1024 signed with SHA-1 (the hash is refused before the key)"),
    "dsa_sha1.pem": refused(WEAK, "DSA-1024 signed with SHA-1 (the hash is refused before the key)"),
    "ec_sha256.der": issued("EC P-384/SHA-256, valid; P-384 is allowed by machine"),
    "ec_sha256.pem": issued("EC P-384/SHA-256, valid; P-384 is allowed by machine"),
    "ec_sha256_old_header.pem": issued(
        "the same request under the old 'BEGIN NEW CERTIFICATE REQUEST' PEM header"),
    "freeipa-bad-critical.pem": refused(
        MALFORMED, "FreeIPA request whose extensions encode critical=FALSE explicitly (not DER): unreadable"),
    "invalid_signature.pem": refused(BAD_SIGNATURE, "RSA-1024/SHA-256 whose signature does not verify"),
    "long-form-attribute.pem": refused(
        BAD_SIGNATURE, "SHA-256, attribute with a long-form tag; the signature does not verify"),
    "rsa_md4.der": refused(WEAK, "RSA-2048 signed with MD4 (md4WithRSAEncryption)"),
    "rsa_md4.pem": refused(WEAK, "RSA-2048 signed with MD4 (md4WithRSAEncryption)"),
    "rsa_sha1.der": refused(WEAK, "RSA-2048 signed with SHA-1 (the signature itself verifies)"),
    "rsa_sha1.pem": refused(WEAK, "RSA-2048 signed with SHA-1 (the signature itself verifies)"),
    "rsa_sha256.der": issued("RSA-2048/SHA-256, valid"),
    "rsa_sha256.pem": issued("RSA-2048/SHA-256, valid"),
    "san_rsa_sha1.der": refused(WEAK, "RSA-2048 signed with SHA-1, with a SAN extension"),
    "san_rsa_sha1.pem": refused(WEAK, "RSA-2048 signed with SHA-1, with a SAN extension"),
    "two_basic_constraints.pem": refused(
        WEAK, "SHA-1 (and a duplicated basicConstraints extension behind it)"),
    "unsupported_extension.pem": refused(WEAK, "SHA-1 (and an unknown non-critical extension)"),
    "unsupported_extension_critical.pem": refused(WEAK, "SHA-1 (and an unknown critical extension)"),
    "zero-element-attribute.pem": refused(
        MALFORMED, "an extensionRequest attribute whose SET of values is empty: unreadable"),
}


def vector_files() -> dict[str, bytes]:
    folder = importlib.resources.files("cryptography_vectors").joinpath(*FOLDER.split("/"))
    return {entry.name: entry.read_bytes() for entry in folder.iterdir() if entry.is_file()}


def as_submitted(name: str, data: bytes) -> str:
    """The API takes PEM as it is and DER as base64."""
    if name.endswith(".der"):
        return base64.b64encode(data).decode()
    return data.decode("ascii")


def test_table_covers_every_vector() -> None:
    installed = importlib.metadata.version("cryptography_vectors")
    found = set(vector_files())
    assert found == set(EXPECTED), (
        f"cryptography-vectors {installed} has x509/requests/ files the table (written for "
        f"{VECTORS_RELEASE}) does not list, or lacks some it lists: "
        f"new {sorted(found - set(EXPECTED))}, gone {sorted(set(EXPECTED) - found)}"
    )


@dataclasses.dataclass(frozen=True)
class Principal:
    name: str
    client: Client


@pytest.fixture(scope="module")
def vector_host(ca: CA, server: str) -> Principal:
    """One machine principal for all the vectors (each ``principal add`` is a CLI run)."""
    name = f"vectors-{uuid.uuid4().hex[:8]}.example.internal"
    return Principal(name, Client.enrolled(server, ca.add_principal(name)))


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_vector(name: str, vector_host: Principal, admin: Client) -> None:
    data = vector_files().get(name)
    if data is None:
        pytest.fail(f"{FOLDER}/{name} is not in the installed cryptography-vectors")
    expected = EXPECTED[name]
    before_id = newest_audit_id(admin)
    before_requests = request_count(admin)

    response = vector_host.client.submit("machine", as_submitted(name, data))

    assert response.status_code < 500, f"{name}: {response.status_code} {response.text}"
    rows = audit_since(admin, before_id)
    if expected.reason is None:
        assert response.status_code == ISSUED, f"{name} ({expected.why}): {response.text}"
        check_issued(name, data, response.json(), vector_host)
        assert [row["action"] for row in rows] == ["issued"], rows
        assert request_count(admin) == before_requests + 1
    else:
        assert_problem(response, expected.status, expected.reason)
        assert [row["reason"] for row in rows] == [expected.reason], rows
        assert request_count(admin) == before_requests, f"{name} was refused but left a request"


def _load_csr(name: str, data: bytes) -> x509.CertificateSigningRequest:
    if name.endswith(".der"):
        return x509.load_der_x509_csr(data)
    return x509.load_pem_x509_csr(data)


def check_issued(name: str, data: bytes, result: dict[str, Any], host: Principal) -> None:
    """The certificate carries the CSR's key, and the principal's name rather than the CSR's."""
    assert result["status"] == "issued", result
    cert = x509.load_pem_x509_certificate(result["certificate"].encode())
    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    assert cert.public_key().public_bytes(*spki) == _load_csr(name, data).public_key().public_bytes(*spki)
    assert cert.subject == x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, host.name)]), (
        name, cert.subject)
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == [host.name], (name, sans)
    directory = host.client.http.get("/v1/policy").json()["directory"]
    assert result["serial"] in [entry["serial"] for entry in directory]
