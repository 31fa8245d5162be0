"""What goes into a certificate obeys the template, whatever the CSR says: attacked through a real
``ca serve`` (SQLite and PostgreSQL) and the real CLI.

Test vectors are made here, at test time, with ``cryptography`` (EC P-256 and RSA-2048 keys):

* subjects and SANs the library's builder writes directly; a value the builder refuses to write
  (a three-letter ``C``, a ``C`` as UTF8String) is made with ``NameAttribute``'s ``_type`` and
  ``_validate`` arguments, the library's own escape hatch for such names;
* a SAN whose bytes the builder would refuse (an IP address of 0, 3, 5, 8 or 17 bytes, an e-mail
  address that is not one, raw non-ASCII or NUL bytes) is the DER of a GeneralNames SEQUENCE
  written out below (:func:`raw_san`: each name is its context tag, [1] rfc822Name, [2] dNSName,
  [6] URI, [7] iPAddress, then its length and bytes) and put into the request as an
  ``UnrecognizedExtension`` under the subjectAltName OID, so the request is signed correctly
  over exactly those bytes;
* a signature with a hash the builder no longer offers (RSASSA-PSS with SHA-256 and the default,
  SHA-1, mask; PSS with all-default parameters = SHA-1) is made by signing the request's
  CertificationRequestInfo with the key directly and assembling the request by hand (RFC 2986:
  info, AlgorithmIdentifier, BIT STRING; RFC 4055 for the PSS parameters).
"""

from __future__ import annotations

import ipaddress
import uuid
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.x509.name import _ASN1Type
from cryptography.x509.oid import ExtensionOID, NameOID

from pki_factory import der, der_oid
from support import CA, Client, assert_problem, audit_since, load_cert, newest_audit_id, request_count

ORG_SERVER = """
name = "org-server"
validity = "30d"
[key]
ekus = ["server_auth"]
[subject]
source = "request"
allowed_attributes = ["CN", "O", "OU", "C", "ST", "L"]
repeatable_attributes = ["OU"]
[subject.values]
O = ["Example Corp"]
C = ["DE", "FR"]
[names]
dns = [".example.internal"]
[[permissions]]
group = "webservers"
rights = ["read", "enroll"]
"""

MAIL_DOMAINS = """
name = "mail-domains"
validity = "30d"
[key]
ekus = ["email_protection"]
[subject]
source = "request"
[names]
email = ["example.internal", ".mail.example.internal"]
[[permissions]]
group = "webservers"
rights = ["read", "enroll"]
"""

MAIL_OWN = """
name = "mail-own"
validity = "30d"
[key]
ekus = ["email_protection"]
[subject]
source = "request"
[names]
email = ["example.internal"]
email_local_part = "principal"
[[permissions]]
group = "webservers"
rights = ["read", "enroll"]
"""

SAN_TAG = {"email": 0x81, "dns": 0x82, "uri": 0x86, "ip": 0x87}


# -- building requests -----------------------------------------------------------------------


def raw_san(*names: tuple[str, bytes]) -> x509.UnrecognizedExtension:
    """A subjectAltName extension of exactly these (kind, bytes) names, however malformed."""
    return x509.UnrecognizedExtension(ExtensionOID.SUBJECT_ALTERNATIVE_NAME,
                                      der(0x30, b"".join(der(SAN_TAG[kind], value) for kind, value in names)))


def csr(subject: Sequence[x509.NameAttribute[Any]] | x509.Name = (), *, sans: Sequence[x509.GeneralName] = (),
        raw: x509.UnrecognizedExtension | None = None, key: Any = None,
        algorithm: hashes.HashAlgorithm | None = None, rsa_padding: Any = None) -> str:
    key = key or ec.generate_private_key(ec.SECP256R1())
    name = subject if isinstance(subject, x509.Name) else x509.Name(list(subject))
    builder = x509.CertificateSigningRequestBuilder().subject_name(name)
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(list(sans)), critical=False)
    if raw is not None:
        builder = builder.add_extension(raw, critical=False)
    signed = builder.sign(key, algorithm or hashes.SHA256(), rsa_padding=rsa_padding)
    return signed.public_bytes(serialization.Encoding.PEM).decode()


def attr(oid: x509.ObjectIdentifier, value: str, **private: Any) -> x509.NameAttribute[Any]:
    with warnings.catch_warnings():  # the library warns of the three-letter C this test means to send
        warnings.simplefilter("ignore", UserWarning)
        return x509.NameAttribute(oid, value, **private)


CN = NameOID.COMMON_NAME
HOST = "www.example.internal"


def dns(*names: str) -> list[x509.GeneralName]:
    return [x509.DNSName(n) for n in names]


# -- fixtures --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def templates(ca: CA, tmp_path_factory: pytest.TempPathFactory) -> None:
    folder = tmp_path_factory.mktemp("name-templates")
    for index, text in enumerate((ORG_SERVER, MAIL_DOMAINS, MAIL_OWN)):
        path = folder / f"t{index}.toml"
        path.write_text(text)
        ca.cli("template", "add", str(path))


@pytest.fixture(scope="module")
def host_name() -> str:
    return f"names-{uuid.uuid4().hex[:8]}.example.internal"


@pytest.fixture(scope="module")
def host(ca: CA, server: str, templates: None, host_name: str) -> Client:
    """One machine principal in group webservers for the whole module."""
    return Client.enrolled(server, ca.add_principal(host_name, "--group", "webservers"))


def refused(admin: Client, host: Client, template: str, request: str, status: int, reason: str,
            *, mentions: str | None = None) -> dict[str, Any]:
    """The request is refused with this problem, audited, and no request row is written."""
    before_audit, before_requests = newest_audit_id(admin), request_count(admin)
    body = assert_problem(host.submit(template, request), status, reason)
    if mentions is not None:
        assert mentions in body["detail"], body
    rows = audit_since(admin, before_audit)
    assert any(r["action"] == "refused" and r["reason"] == reason for r in rows), rows
    assert request_count(admin) == before_requests
    return body


def issued(host: Client, template: str, request: str) -> x509.Certificate:
    response = host.submit(template, request)
    assert response.status_code == 201, response.text
    return load_cert(response.json()["certificate"])


def sans_of(cert: x509.Certificate) -> list[x509.GeneralName]:
    return list(cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value)


# -- subject attributes ----------------------------------------------------------------------

WEBSERVER_SUBJECT_REFUSALS: dict[str, tuple[list[x509.NameAttribute[Any]], str]] = {
    "O": ([attr(CN, HOST), attr(NameOID.ORGANIZATION_NAME, "Example Corp")], "attribute O "),
    "OU": ([attr(CN, HOST), attr(NameOID.ORGANIZATIONAL_UNIT_NAME, "Ops")], "attribute OU "),
    "C": ([attr(CN, HOST), attr(NameOID.COUNTRY_NAME, "DE")], "attribute C "),
    "ST": ([attr(CN, HOST), attr(NameOID.STATE_OR_PROVINCE_NAME, "Bavaria")], "attribute ST "),
    "L": ([attr(CN, HOST), attr(NameOID.LOCALITY_NAME, "Munich")], "attribute L "),
    "serialNumber": ([attr(CN, HOST), attr(NameOID.SERIAL_NUMBER, "42")], "attribute serialNumber "),
    "emailAddress": ([attr(CN, HOST), attr(NameOID.EMAIL_ADDRESS, "root@example.internal")],
                     "attribute emailAddress "),
    "unknown-oid": ([attr(CN, HOST), attr(x509.ObjectIdentifier("1.3.6.1.4.1.99999.42"), "x")],
                    "attribute 1.3.6.1.4.1.99999.42 "),
    "O-before-CN": ([attr(NameOID.ORGANIZATION_NAME, "Example Corp"), attr(CN, HOST)], "attribute O "),
}


@pytest.mark.parametrize("case", list(WEBSERVER_SUBJECT_REFUSALS))
def test_default_template_allows_only_the_common_name(case: str, host: Client, admin: Client) -> None:
    """webserver allows CN only (the default): every other attribute is refused, by name."""
    subject, mentions = WEBSERVER_SUBJECT_REFUSALS[case]
    refused(admin, host, "webserver", csr(subject, sans=dns(HOST)), 400, "name-not-allowed", mentions=mentions)


def test_multi_valued_rdn_is_refused_even_of_allowed_attributes(host: Client, admin: Client) -> None:
    rdn = x509.RelativeDistinguishedName([attr(CN, HOST), attr(NameOID.ORGANIZATION_NAME, "Example Corp")])
    refused(admin, host, "org-server", csr(x509.Name([rdn]), sans=dns(HOST)), 400, "name-not-allowed",
            mentions="multi-valued")


ORG_SERVER_REFUSALS: dict[str, tuple[list[x509.NameAttribute[Any]], str]] = {
    "O-value-not-listed": ([attr(CN, HOST), attr(NameOID.ORGANIZATION_NAME, "Evil Corp")], "O='Evil Corp'"),
    "C-lowercase": ([attr(CN, HOST), attr(NameOID.COUNTRY_NAME, "de")], "two upper-case letters"),
    "C-three-letters": ([attr(CN, HOST), attr(NameOID.COUNTRY_NAME, "DEU", _validate=False)],
                        "two upper-case letters"),
    "C-not-listed": ([attr(CN, HOST), attr(NameOID.COUNTRY_NAME, "US")], "C='US'"),
    "O-twice": ([attr(CN, HOST), attr(NameOID.ORGANIZATION_NAME, "Example Corp"),
                 attr(NameOID.ORGANIZATION_NAME, "Example Corp")], "more than one O"),
    "CN-twice": ([attr(CN, HOST), attr(CN, "api.example.internal")], "more than one common name"),
    "serialNumber-not-allowed": ([attr(CN, HOST), attr(NameOID.SERIAL_NUMBER, "1")], "serialNumber"),
    "L-too-long": ([attr(CN, HOST), attr(NameOID.LOCALITY_NAME, "x" * 129)], "longer than 128"),
}


@pytest.mark.parametrize("case", list(ORG_SERVER_REFUSALS))
def test_allowed_attributes_keep_to_their_values(case: str, host: Client, admin: Client) -> None:
    subject, mentions = ORG_SERVER_REFUSALS[case]
    refused(admin, host, "org-server", csr(subject, sans=dns(HOST)), 400, "name-not-allowed", mentions=mentions)


def test_allowed_attributes_reach_the_certificate_re_encoded(host: Client) -> None:
    """O, two OUs and C (sent as UTF8String) are issued in the CSR's order; C as PrintableString."""
    subject = [attr(NameOID.COUNTRY_NAME, "DE", _type=_ASN1Type.UTF8String),
               attr(NameOID.ORGANIZATION_NAME, "Example Corp"),
               attr(NameOID.ORGANIZATIONAL_UNIT_NAME, "Ops"), attr(NameOID.ORGANIZATIONAL_UNIT_NAME, "Web"),
               attr(CN, HOST)]
    cert = issued(host, "org-server", csr(subject, sans=dns(HOST)))
    assert [(a.oid, a.value) for a in cert.subject] == [(a.oid, a.value) for a in subject]
    country = der_oid("2.5.4.6") + der(0x13, b"DE")  # PrintableString
    assert country in cert.subject.public_bytes(), cert.subject.public_bytes().hex()
    assert der_oid("2.5.4.6") + der(0x0C, b"DE") not in cert.subject.public_bytes()


# -- control characters: in every subject attribute and every SAN, on every template ----------

CONTROLS = {"NUL": "\x00", "ESC": "\x1b", "DEL": "\x7f", "C1-NEL": "\x85", "LINE-SEPARATOR": "\u2028",
            "PARAGRAPH-SEPARATOR": "\u2029", "RLO": "\u202e", "LRI": "\u2066", "ZWSP": "\u200b"}


@pytest.mark.parametrize("template", ["webserver", "machine", "org-server"])
@pytest.mark.parametrize("control", list(CONTROLS))
def test_control_character_in_a_subject_attribute(template: str, control: str, host: Client,
                                                  admin: Client) -> None:
    char = CONTROLS[control]
    oid = CN if template != "org-server" else NameOID.ORGANIZATIONAL_UNIT_NAME
    subject = [attr(oid, f"www{char}x")] if oid == CN else [attr(CN, HOST), attr(oid, f"ops{char}")]
    refused(admin, host, template, csr(subject, sans=dns(HOST)), 400, "name-not-allowed",
            mentions=f"U+{ord(char):04X}")


SAN_CONTROLS: dict[str, tuple[str, bytes]] = {
    "dns-NUL": ("dns", b"www\x00.example.internal"),
    "dns-ESC": ("dns", b"www\x1b[2J.example.internal"),
    "dns-DEL": ("dns", b"www\x7f.example.internal"),
    "email-NUL": ("email", b"ops\x00@example.internal"),
    "email-newline": ("email", b"ops@example.internal\r\nBcc: x@example.com"),
    "uri-ESC": ("uri", b"https://www.example.internal/\x1b]0;x\x07"),
}


@pytest.mark.parametrize("template", ["webserver", "mail-domains", "machine"])
@pytest.mark.parametrize("case", list(SAN_CONTROLS))
def test_control_character_in_a_san(template: str, case: str, host: Client, admin: Client) -> None:
    """Raw IA5 bytes, so the library's builder cannot clean them up on the way."""
    kind, value = SAN_CONTROLS[case]
    body = refused(admin, host, template, csr(raw=raw_san(("dns", HOST.encode()), (kind, value))), 400,
                   "name-not-allowed", mentions="control character")
    assert "\x1b" not in body["detail"] and "\x00" not in body["detail"]


# -- e-mail SANs -----------------------------------------------------------------------------


def test_email_sans_in_allowed_domains_are_issued(host: Client) -> None:
    for address in ("ops@example.internal", "Ops.Team@a.mail.EXAMPLE.internal",
                    "ops@xn--bcher-kva.mail.example.internal"):
        cert = issued(host, "mail-domains", csr(sans=[x509.RFC822Name(address)]))
        local, _, domain = address.rpartition("@")
        assert sans_of(cert) == [x509.RFC822Name(f"{local}@{domain.lower()}")]


EMAIL_REFUSALS: dict[str, tuple[str, bytes, str, str]] = {
    # case: (template, raw address, reason, detail mentions)
    "no-at": ("mail-domains", b"ops.example.internal", "name-not-allowed", "not a valid mailbox"),
    "two-at": ("mail-domains", b"ops@x@example.internal", "name-not-allowed", "not a valid mailbox"),
    "empty-local": ("mail-domains", b"@example.internal", "name-not-allowed", "not a valid mailbox"),
    "quoted-local": ("mail-domains", b'"ops team"@example.internal', "name-not-allowed", "not a valid mailbox"),
    "local-too-long": ("mail-domains", b"o" * 65 + b"@example.internal", "name-not-allowed", "not a valid"),
    "address-literal": ("mail-domains", b"ops@[192.0.2.1]", "name-not-allowed", "not a valid mailbox"),
    "domain-not-allowed": ("mail-domains", b"ops@example.com", "name-not-allowed", "domain 'example.com'"),
    "suffix-itself": ("mail-domains", b"ops@mail.example.internal", "name-not-allowed", "is not allowed"),
    "look-alike": ("mail-domains", b"ops@evilexample.internal", "name-not-allowed", "is not allowed"),
    "idn-a-label-elsewhere": ("mail-domains", b"ops@xn--bcher-kva.example", "name-not-allowed", "is not allowed"),
    "idn-u-label-bytes": ("mail-domains", "ops@bücher.example.internal".encode(), "name-not-allowed", "not ASCII"),
    "no-email-in-template": ("webserver", b"ops@example.internal", "name-not-allowed", "e-mail"),
    "not-the-principal": ("mail-own", b"someone-else@example.internal", "name-not-allowed", "principal"),
}


@pytest.mark.parametrize("case", list(EMAIL_REFUSALS))
def test_email_sans_are_refused(case: str, host: Client, admin: Client) -> None:
    template, address, reason, mentions = EMAIL_REFUSALS[case]
    refused(admin, host, template, csr(raw=raw_san(("email", address))), 400, reason, mentions=mentions)


def test_email_bound_to_the_principal(host: Client, host_name: str) -> None:
    cert = issued(host, "mail-own", csr(sans=[x509.RFC822Name(f"{host_name}@example.internal")]))
    assert sans_of(cert) == [x509.RFC822Name(f"{host_name}@example.internal")]


# -- IP SANs of the wrong length: malformed, never a 500 ----------------------------------------


@pytest.mark.parametrize("template", ["webserver", "machine"])
@pytest.mark.parametrize("size", [0, 3, 5, 8, 15, 17, 32])
def test_ip_san_that_is_not_4_or_16_bytes(template: str, size: int, host: Client, admin: Client) -> None:
    value = bytes([10, 0, 0, 1] * 8)[:size]
    refused(admin, host, template, csr(raw=raw_san(("dns", HOST.encode()), ("ip", value))), 400, "malformed-csr")


def test_ip_sans_of_4_and_16_bytes_are_issued(host: Client) -> None:
    good = raw_san(("dns", HOST.encode()), ("ip", bytes([10, 1, 2, 3])), ("ip", bytes(15) + b"\x01"))
    cert = issued(host, "webserver", csr(raw=good))
    assert sans_of(cert)[1:] == [x509.IPAddress(ipaddress.ip_address("10.1.2.3")),
                                 x509.IPAddress(ipaddress.ip_address("::1"))]


# -- signature hashes -------------------------------------------------------------------------


def _rsa() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def pss_assembled(digest: hashes.HashAlgorithm, mask: hashes.HashAlgorithm, params: bytes) -> str:
    """A PSS request signed by the key directly, its AlgorithmIdentifier written out by hand."""
    key = _rsa()
    info = x509.load_pem_x509_csr(csr(key=key).encode()).tbs_certrequest_bytes
    signature = key.sign(info, padding.PSS(padding.MGF1(mask), digest.digest_size), digest)
    algorithm = der(0x30, der_oid("1.2.840.113549.1.1.10") + params)
    request = der(0x30, info + algorithm + der(0x03, b"\x00" + signature))
    return x509.load_der_x509_csr(request).public_bytes(serialization.Encoding.PEM).decode()


SHA256_ID = der(0x30, der_oid("2.16.840.1.101.3.4.2.1") + b"\x05\x00")
WEAK_SIGNATURES = {
    "rsa-pkcs1-sha224": lambda: csr(key=_rsa(), algorithm=hashes.SHA224()),
    "ecdsa-sha224": lambda: csr(algorithm=hashes.SHA224()),
    "ecdsa-p384-sha224": lambda: csr(key=ec.generate_private_key(ec.SECP384R1()), algorithm=hashes.SHA224()),
    "rsa-pss-sha224": lambda: csr(key=_rsa(), algorithm=hashes.SHA224(),
                                  rsa_padding=padding.PSS(padding.MGF1(hashes.SHA224()), 28)),
    # SEQUENCE { [0] sha256, [2] saltLength 32 }: maskGenAlgorithm left at its default, MGF1 with SHA-1
    "rsa-pss-sha256-mask-sha1": lambda: pss_assembled(
        hashes.SHA256(), hashes.SHA1(), der(0x30, der(0xA0, SHA256_ID) + der(0xA2, der(0x02, b"\x20")))),  # noqa: S303
    # an empty parameter SEQUENCE: every default, SHA-1 throughout (RFC 4055 section 3.1)
    "rsa-pss-all-defaults-sha1": lambda: pss_assembled(hashes.SHA1(), hashes.SHA1(), der(0x30, b"")),  # noqa: S303
}


@pytest.mark.parametrize("template", ["machine", "webserver"])
@pytest.mark.parametrize("case", list(WEAK_SIGNATURES))
def test_weak_signature_hashes_are_refused(template: str, case: str, host: Client, admin: Client) -> None:
    request = WEAK_SIGNATURES[case]()
    refused(admin, host, template, request, 400, "weak-signature-algorithm")


@pytest.mark.parametrize("algorithm", [hashes.SHA256(), hashes.SHA384(), hashes.SHA512(), hashes.SHA3_256()],
                         ids=lambda a: a.name)
def test_strong_signature_hashes_are_issued(algorithm: hashes.HashAlgorithm, host: Client) -> None:
    issued(host, "machine", csr(algorithm=algorithm))
    issued(host, "machine", csr(key=_rsa(), algorithm=algorithm,
                                rsa_padding=padding.PSS(padding.MGF1(algorithm), algorithm.digest_size)))


# -- ids and serials in paths and queries --------------------------------------------------------

# 2^31 and 2^63-1 fit SQLite's INTEGER but not PostgreSQL's; 2^63 fits neither (certpulse.ca.row_ids)
OUT_OF_RANGE = ["2147483648", "9223372036854775807", "9223372036854775808", "-1", "1" + "0" * 30]


@pytest.mark.parametrize("value", OUT_OF_RANGE)
def test_request_ids_out_of_range_are_not_found(value: str, admin: Client, host: Client) -> None:
    for client in (admin, host):
        assert_problem(client.http.get(f"/v1/requests/{value}"), 404, "not-found")
    before = newest_audit_id(admin)
    assert_problem(admin.http.post(f"/v1/requests/{value}/approve"), 404, "not-found")
    assert_problem(admin.http.post(f"/v1/requests/{value}/deny", json={"reason": "no"}), 404, "not-found")
    assert_problem(admin.http.get("/v1/audit", params={"request_id": value}), 404, "not-found")
    # the refused decisions are audited, without an id no column could hold
    rows = audit_since(admin, before)
    assert sorted(r["action"] for r in rows) == ["approve-refused", "deny-refused"], rows
    assert all(r["reason"] == "not-found" and r["request_id"] is None and value[:20] in r["detail"] for r in rows)


def test_largest_request_id_is_a_plain_not_found(admin: Client) -> None:
    """2^31-1, the largest id an INTEGER column holds on both databases, reaches the database."""
    body = assert_problem(admin.http.get(f"/v1/requests/{2**31 - 1}"), 404, "not-found")
    assert body["detail"] == f"no request {2**31 - 1}"
    assert_problem(admin.http.post(f"/v1/requests/{2**31 - 1}/approve"), 404, "not-found")
    response = admin.http.get("/v1/audit", params={"request_id": 2**31 - 1})
    assert response.status_code == 200, response.text
    assert [(r["action"], r["reason"]) for r in response.json()] == [("approve-refused", "not-found")]


@pytest.mark.parametrize("serial", ["f" * 41, "xyz", "0x", "a" * 3000, "12%0a34"])
def test_bad_serials_in_paths_are_refused(serial: str, admin: Client) -> None:
    body = assert_problem(admin.http.get(f"/v1/certificates/{serial}"), 400, "invalid-argument")
    assert len(body["detail"]) < 200
    assert_problem(admin.http.post(f"/v1/certificates/{serial}/revoke", json={"reason": "keyCompromise"}),
                   400, "invalid-argument")


@pytest.mark.parametrize("command", [("request", "show"), ("request", "approve"),
                                     ("request", "deny", "--reason", "no")])
def test_cli_request_ids_out_of_range(command: tuple[str, ...], ca: CA, server: str) -> None:
    for value in ("2147483648", "9223372036854775808", "1" + "0" * 30):
        args = [*command[:2], value, *command[2:]]
        result = ca.cli(*args, check=False)
        assert result.returncode == 2, (result.stdout, result.stderr)
        assert "Traceback" not in result.stderr
        assert "not-found" in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_cli_bad_serial(ca: CA, tmp_path: Path) -> None:
    result = ca.cli("status", "f" * 41, check=False)
    assert result.returncode == 2 and "invalid-argument" in result.stderr and "Traceback" not in result.stderr
