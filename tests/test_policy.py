"""The request policy (``certpulse.ca.policy.decide``) over in-memory fakes: no store, no clock.

A root and an issuing CA are built in memory; templates come from ``parse_template``; what the
database would know of presented certificates is a plain ``Gathered.known`` mapping.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import functools
import ipaddress
import tomllib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.x509.oid import NameOID

from certpulse.ca.model import Authority, Caller, EnrollmentRequest, Evidence, KnownCertificate
from certpulse.ca.policy import Decision, Gathered, decide, validity
from certpulse.ca.templates import EKU_NAMES, Template, parse_template
from certpulse.errors import Reason, Refusal
from certpulse.pki import key_archival
from certpulse.pki.build import (
    BACKDATE,
    build_ca_certificate,
    build_kra_certificate,
    end_entity_builder,
    random_serial,
    signature_hash,
    simple_name,
)
from certpulse.pki.certs import serial_hex, thumbprint
from certpulse.pki.keys import PrivateKey
from certpulse.pki.names import RequestedNames
from certpulse.pki.signing import sign_bytes

NOW = dt.datetime(2030, 6, 1, 12, 0, 0, tzinfo=dt.UTC)
DAY = dt.timedelta(days=1)
SECOND = dt.timedelta(seconds=1)
MINUTE = dt.timedelta(minutes=1)
EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "templates"
RA_EKU = EKU_NAMES["certificate_request_agent"]
assert RA_EKU == "1.3.6.1.4.1.311.20.2.1"
TEMPLATE_NAMES = frozenset({"machine", "webserver", "approval-required", "ra", "archive",
                            "readonly", "legacy", "noreuse"})

MACHINE = Caller(kind="principal", name="host1.example.internal", principal_id=7,
                 principal_kind="machine", groups=frozenset({"machines", "webservers"}))
OTHER_MACHINE = dataclasses.replace(MACHINE, name="host2.example.internal", principal_id=8)
USER = Caller(kind="principal", name="alice.example", principal_id=20, principal_kind="user",
              groups=frozenset({"users"}))


# --- keys, CAs and authorities --------------------------------------------------------------


def new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


@functools.cache
def rsa_key(bits: int) -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=bits)


@functools.cache
def weak_rsa_key() -> rsa.RSAPrivateKey:
    # deliberately weak: the key rules must refuse it
    return rsa.generate_private_key(public_exponent=65537, key_size=1024)  # noqa: S505


@dataclasses.dataclass(frozen=True)
class CA:
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey


@functools.cache
def root() -> CA:
    key = new_key()
    cert = build_ca_certificate(
        subject=simple_name("Test Root CA", "certpulse"), public_key=key.public_key(),
        issuer_cert=None, signing_key=key, not_before=NOW - 2 * 365 * DAY,
        not_after=NOW + 20 * 365 * DAY, path_length=1,
    )
    return CA(cert, key)


@functools.cache
def sub_ca(name: str, not_before: dt.datetime, not_after: dt.datetime) -> CA:
    key = new_key()
    cert = build_ca_certificate(
        subject=simple_name(name, "certpulse"), public_key=key.public_key(),
        issuer_cert=root().cert, signing_key=root().key, not_before=not_before,
        not_after=not_after, path_length=0,
    )
    return CA(cert, key)


def issuing_ca() -> CA:
    return sub_ca("Issuing CA 1", NOW - 365 * DAY, NOW + 5 * 365 * DAY)


@functools.cache
def foreign_ca() -> CA:
    """A stranger's self-signed CA with exactly our issuing CA's subject name."""
    key = new_key()
    subject = issuing_ca().cert.subject
    cert = build_ca_certificate(subject=subject, public_key=key.public_key(), issuer_cert=None,
                                signing_key=key, not_before=NOW - 365 * DAY,
                                not_after=NOW + 5 * 365 * DAY, path_length=0)
    return CA(cert, key)


def authority(
    id: int, name: str, ca: CA, *, role: str = "issuer", cost: int = 0,
    renewal_only: bool = False, enabled: bool = True,
    templates: frozenset[str] = TEMPLATE_NAMES,
) -> Authority:
    return Authority(id=id, name=name, role=role, certificate=ca.cert, key_file=None, cost=cost,
                     renewal_only=renewal_only, enabled=enabled, templates=templates,
                     parent_id=None if role == "root" else 1)


def root_authority() -> Authority:
    return authority(1, "root", root(), role="root")


def issuer_authority(**kwargs: Any) -> Authority:
    return authority(2, "issuing-1", issuing_ca(), **kwargs)


@functools.cache
def kra() -> tuple[Authority, rsa.RSAPrivateKey]:
    key = rsa_key(2048)
    cert = build_kra_certificate(subject=simple_name("Key Recovery Agent"),
                                 public_key=key.public_key(), issuer_cert=issuing_ca().cert,
                                 issuer_key=issuing_ca().key, not_before=NOW - 365 * DAY,
                                 not_after=NOW + 5 * 365 * DAY)
    return Authority(id=9, name="kra", role="kra", certificate=cert, key_file=None, cost=0,
                     renewal_only=False, enabled=True, templates=frozenset(), parent_id=2), key


# --- templates --------------------------------------------------------------------------------


def example_document(name: str) -> dict[str, Any]:
    return tomllib.loads((EXAMPLES / f"{name}.toml").read_text())


def make_template(base: str, **changes: Any) -> Template:
    """An example template, with top-level settings or whole tables replaced."""
    doc = example_document(base)
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(doc.get(key), dict):
            doc[key] = {**doc[key], **value}
        else:
            doc[key] = value
    return parse_template(doc, default_oid="1.3.6.1.4.1.99999.7")


def machine_template() -> Template:
    return make_template("machine")


def webserver_template() -> Template:
    return make_template("webserver")


def ra_template(count: int, policy: str = "") -> Template:
    return make_template("machine", name="ra", issuance={"ra_signatures": count,
                                                         "ra_policy": policy})


def archive_template() -> Template:
    return make_template("machine", name="archive", key={"archive": True})


# --- requests ---------------------------------------------------------------------------------


def _tlv(tag: int, body: bytes) -> bytes:
    length = len(body)
    if length < 0x80:
        header = bytes([length])
    else:
        raw = length.to_bytes((length.bit_length() + 7) // 8, "big")
        header = bytes([0x80 | len(raw)]) + raw
    return bytes([tag]) + header + body


def make_csr(
    key: PrivateKey | None = None, *, cn: str | None = None, dns: Sequence[str] = (),
    ips: Sequence[str] = (), emails: Sequence[str] = (), uris: Sequence[str] = (),
    attributes: Sequence[x509.NameAttribute[Any]] = (),
) -> bytes:
    """A CSR in DER with the given subject and SANs."""
    key = key or new_key()
    attrs: list[x509.NameAttribute[Any]] = []
    if cn is not None:
        attrs.append(x509.NameAttribute(NameOID.COMMON_NAME, cn))
    attrs.extend(attributes)
    builder = x509.CertificateSigningRequestBuilder().subject_name(x509.Name(attrs))
    names: list[x509.GeneralName] = [x509.DNSName(d) for d in dns]
    names += [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
    names += [x509.RFC822Name(e) for e in emails]
    names += [x509.UniformResourceIdentifier(u) for u in uris]
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.DER)


def tampered(csr_der: bytes) -> bytes:
    """The same CSR with one bit of its signature flipped: it parses, it does not verify."""
    return csr_der[:-1] + bytes([csr_der[-1] ^ 0x01])


def sha1_csr(key: PrivateKey) -> bytes:
    """A CSR correctly signed with SHA-1 (``cryptography`` no longer builds these)."""
    info = x509.load_der_x509_csr(make_csr(key, cn="host1.example.internal")).tbs_certrequest_bytes
    if isinstance(key, ec.EllipticCurvePrivateKey):
        signature = key.sign(info, ec.ECDSA(hashes.SHA1()))  # noqa: S303 - the weak hash is the test
        algorithm = _tlv(0x30, _tlv(0x06, bytes.fromhex("2a8648ce3d0401")))
    else:
        signature = key.sign(info, padding.PKCS1v15(), hashes.SHA1())  # noqa: S303
        algorithm = _tlv(0x30, _tlv(0x06, bytes.fromhex("2a864886f70d010105")) + b"\x05\x00")
    return _tlv(0x30, info + algorithm + _tlv(0x03, b"\x00" + signature))


def gathered(
    template: Template | None, *, authorities: Sequence[Authority] | None = None,
    known: Mapping[str, KnownCertificate] | None = None, with_kra: bool = False,
) -> Gathered:
    kra_authority, kra_key = kra() if with_kra else (None, None)
    return Gathered(
        template=template,
        authorities=tuple(authorities if authorities is not None
                          else (root_authority(), issuer_authority())),
        known=dict(known or {}),
        kra=kra_authority,
        kra_key=kra_key,
    )


def request(template: str, csr: bytes, **kwargs: Any) -> EnrollmentRequest:
    return EnrollmentRequest(template=template, csr=csr, **kwargs)


def refusal(caller: Caller, req: EnrollmentRequest, state: Gathered,
            now: dt.datetime = NOW) -> Refusal:
    with pytest.raises(Refusal) as info:
        decide(caller, req, state, now)
    return info.value


def assert_refused(reason: Reason, caller: Caller, req: EnrollmentRequest, state: Gathered,
                   now: dt.datetime = NOW) -> Refusal:
    error = refusal(caller, req, state, now)
    assert error.reason is reason, f"expected {reason}, got {error.reason}: {error.detail}"
    assert error.detail
    return error


# --- issued certificates (renewal evidence, RA certificates) ---------------------------------


@dataclasses.dataclass(frozen=True)
class Issued:
    cert: x509.Certificate
    key: PrivateKey
    known: KnownCertificate

    def evidence(self, csr_der: bytes) -> Evidence:
        return Evidence(self.cert, sign_bytes(self.key, csr_der))


_next_id = iter(range(100, 10_000))


def issue(
    *, principal_id: int | None = MACHINE.principal_id, template_name: str = "webserver",
    cn: str = "old.example.internal", dns: Sequence[str] = ("old.example.internal",),
    ips: Sequence[str] = (), not_before: dt.datetime = NOW - 30 * DAY,
    not_after: dt.datetime = NOW + 60 * DAY, revoked_at: dt.datetime | None = None,
    ekus: tuple[str, ...] = (EKU_NAMES["server_auth"],), by: CA | None = None,
) -> Issued:
    """A certificate issued by the in-memory issuing CA, and what the database knows of it."""
    ca = by or issuing_ca()
    key = new_key()
    serial = random_serial()
    sans: list[x509.GeneralName] = [x509.DNSName(d) for d in dns]
    sans += [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
    cert = end_entity_builder(
        subject=simple_name(cn), public_key=key.public_key(), issuer_cert=ca.cert,
        issuer_key=ca.key, not_before=not_before, not_after=not_after, sans=sans,
        key_usage=machine_template().key_usage_extension(), ekus=ekus,
    ).serial_number(serial).sign(ca.key, signature_hash(ca.key))
    known = KnownCertificate(
        id=next(_next_id), authority_id=2, serial=serial_hex(serial), principal_id=principal_id,
        template_name=template_name, not_before=cert.not_valid_before_utc,
        not_after=cert.not_valid_after_utc, revoked_at=revoked_at,
    )
    return Issued(cert, key, known)


def known_map(*issued: Issued) -> dict[str, KnownCertificate]:
    return {thumbprint(i.cert): i.known for i in issued}


def ra_agent(principal_id: int | None, **kwargs: Any) -> Issued:
    kwargs.setdefault("ekus", (RA_EKU,))
    return issue(principal_id=principal_id, template_name="enrollment-agent",
                 cn=f"agent-{principal_id}", dns=(), **kwargs)


# ================================================================================================
# Order of the checks
# ================================================================================================


def test_unknown_template_wins_over_a_bad_csr() -> None:
    assert_refused(Reason.UNKNOWN_TEMPLATE, MACHINE, request("nope", b"garbage"), gathered(None))


def test_template_without_read_right_looks_unknown_even_with_a_bad_csr() -> None:
    # USER is in group "users" only; the machine template grants nothing to users.
    error = assert_refused(Reason.UNKNOWN_TEMPLATE, USER, request("machine", b"garbage"),
                           gathered(machine_template()))
    assert "machine" in error.detail


def test_read_without_enroll_is_not_permitted_before_the_csr_is_read() -> None:
    template = make_template("machine", name="readonly",
                             permissions=[{"group": "machines", "rights": ["read"]}])
    assert_refused(Reason.TEMPLATE_NOT_PERMITTED, MACHINE, request("readonly", b"garbage"),
                   gathered(template))


def test_autoenroll_alone_is_enough_to_enroll() -> None:
    template = make_template("machine", permissions=[
        {"group": "machines", "rights": ["read"]},
        {"principal": MACHINE.name, "rights": ["autoenroll"]},
    ])
    decision = decide(MACHINE, request("machine", make_csr()), gathered(template), NOW)
    assert decision.kind == "new"


def test_non_principal_callers_have_no_rights() -> None:
    admin = Caller(kind="admin", name="root-admin", groups=frozenset({"machines"}))
    assert_refused(Reason.UNKNOWN_TEMPLATE, admin, request("machine", make_csr()),
                   gathered(machine_template()))


def test_malformed_csr_is_refused_after_the_template() -> None:
    assert_refused(Reason.MALFORMED_CSR, MACHINE, request("machine", b"\x30\x03\x02\x01\x00"),
                   gathered(machine_template()))
    assert_refused(Reason.MALFORMED_CSR, MACHINE, request("machine", b"not a csr at all!"),
                   gathered(machine_template()))


def test_pem_csr_is_accepted() -> None:
    der = make_csr()
    pem = x509.load_der_x509_csr(der).public_bytes(serialization.Encoding.PEM)
    decision = decide(MACHINE, request("machine", pem), gathered(machine_template()), NOW)
    assert decision.csr_der == der


def test_bad_csr_signature_wins_over_a_disallowed_key() -> None:
    csr = tampered(make_csr(weak_rsa_key(), cn="host1.example.internal"))
    assert_refused(Reason.BAD_CSR_SIGNATURE, MACHINE, request("machine", csr),
                   gathered(machine_template()))


@pytest.mark.parametrize("key_kind", ["ec", "rsa"])
def test_sha1_csr_is_a_weak_signature_algorithm(key_kind: str) -> None:
    key: PrivateKey = new_key() if key_kind == "ec" else rsa_key(2048)
    error = assert_refused(Reason.WEAK_SIGNATURE_ALGORITHM, MACHINE,
                           request("machine", sha1_csr(key)), gathered(machine_template()))
    assert "sha1" in error.detail


def test_weak_hash_wins_over_a_disallowed_key() -> None:
    assert_refused(Reason.WEAK_SIGNATURE_ALGORITHM, MACHINE,
                   request("machine", sha1_csr(weak_rsa_key())), gathered(machine_template()))


def test_ed25519_csr_is_refused_by_the_key_rules() -> None:
    key = ed25519.Ed25519PrivateKey.generate()
    csr = (x509.CertificateSigningRequestBuilder().subject_name(simple_name("host"))
           .sign(key, None).public_bytes(serialization.Encoding.DER))
    assert_refused(Reason.KEY_NOT_ALLOWED, MACHINE, request("machine", csr),
                   gathered(machine_template()))


def test_disallowed_key_wins_over_disallowed_names() -> None:
    csr = make_csr(weak_rsa_key(), cn="evil.example.com", dns=["evil.example.com"])
    assert_refused(Reason.KEY_NOT_ALLOWED, MACHINE, request("webserver", csr),
                   gathered(webserver_template()))


def test_key_outside_the_template_families_is_refused() -> None:
    template = make_template("encryption")  # rsa only
    assert_refused(Reason.KEY_NOT_ALLOWED, MACHINE, request("encryption", make_csr()),
                   gathered(template))


def test_disallowed_names_win_over_no_issuer() -> None:
    csr = make_csr(cn="evil.example.com", dns=["evil.example.com"])
    assert_refused(Reason.NAME_NOT_ALLOWED, MACHINE, request("webserver", csr),
                   gathered(webserver_template(), authorities=[root_authority()]))


def test_bad_renewal_evidence_wins_over_missing_ra_signatures_and_a_bad_key() -> None:
    old = issue(template_name="ra")
    csr = make_csr(weak_rsa_key(), cn="host1.example.internal")
    evidence = Evidence(old.cert, b"not a signature")
    assert_refused(Reason.RENEWAL_INVALID, MACHINE, request("ra", csr, renewal=evidence),
                   gathered(ra_template(1), known=known_map(old)))


def test_missing_ra_signatures_win_over_a_bad_key() -> None:
    csr = make_csr(weak_rsa_key())
    assert_refused(Reason.RA_SIGNATURES_MISSING, MACHINE, request("ra", csr),
                   gathered(ra_template(1)))


def test_missing_key_archival_wins_over_a_disallowed_key() -> None:
    """README and the policy docstring: renewal, RA and key archival come before key rules."""
    assert_refused(Reason.KEY_ARCHIVAL_REQUIRED, MACHINE,
                   request("archive", make_csr(weak_rsa_key())),
                   gathered(archive_template(), with_kra=True))


def test_matching_envelope_still_needs_an_allowed_key() -> None:
    key = weak_rsa_key()
    envelope = key_archival.seal(key, kra()[0].certificate)
    assert_refused(Reason.KEY_NOT_ALLOWED, MACHINE,
                   request("archive", make_csr(key), archived_key=envelope),
                   gathered(archive_template(), with_kra=True))


def test_missing_key_archival_wins_over_disallowed_names() -> None:
    template = make_template("webserver", name="archive", key={"archive": True})
    csr = make_csr(cn="evil.example.com", dns=["evil.example.com"])
    assert_refused(Reason.KEY_ARCHIVAL_REQUIRED, MACHINE, request("archive", csr),
                   gathered(template, with_kra=True))


# ================================================================================================
# Subject and names
# ================================================================================================


def test_principal_built_subject_ignores_the_csr() -> None:
    csr = make_csr(cn="evil.example.com", dns=["evil.example.com", "other.example.internal"],
                   ips=["10.9.9.9"])
    decision = decide(MACHINE, request("machine", csr), gathered(machine_template()), NOW)
    assert decision.subject == x509.Name([x509.NameAttribute(NameOID.COMMON_NAME,
                                                             "host1.example.internal")])
    assert decision.names == RequestedNames(dns=("host1.example.internal",))
    assert decision.sans() == [x509.DNSName("host1.example.internal")]
    assert decision.subject_text() == "CN=host1.example.internal"
    assert decision.kind == "new"
    assert decision.pending is False
    assert decision.renewal_of is None and decision.archived_key is None


def test_principal_subject_lowercases_the_dns_name_only() -> None:
    caller = dataclasses.replace(MACHINE, name="Host1.Example.Internal")
    decision = decide(caller, request("machine", make_csr()), gathered(machine_template()), NOW)
    assert decision.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == (
        "Host1.Example.Internal")
    assert decision.names.dns == ("host1.example.internal",)


@pytest.mark.parametrize("name", ["host_1", "web_server.example.internal", "-dash"])
def test_machine_with_a_non_hostname_name_gets_no_dns_san(name: str) -> None:
    caller = dataclasses.replace(MACHINE, name=name)
    decision = decide(caller, request("machine", make_csr()), gathered(machine_template()), NOW)
    assert decision.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == name
    assert decision.names == RequestedNames()
    assert decision.sans() == []


def test_user_principal_gets_no_dns_san_even_with_a_hostname_like_name() -> None:
    template = make_template("approval-required")
    decision = decide(USER, request("approval-required", make_csr(dns=["alice.example"])),
                      gathered(template), NOW)
    assert decision.subject_text() == "CN=alice.example"
    assert decision.names == RequestedNames()


def webserver_decision(csr: bytes, template: Template | None = None) -> Decision:
    return decide(MACHINE, request("webserver", csr), gathered(template or webserver_template()),
                  NOW)


def test_request_supplied_names() -> None:
    # webserver allows only CN (the default); this test's copy of it allows O as well
    csr = make_csr(cn="www.example.internal",
                   dns=["www.example.internal", "api.example.internal", "localhost"],
                   ips=["10.1.2.3", "::1"],
                   attributes=[x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Example")])
    decision = webserver_decision(csr, make_template("webserver", subject={"allowed_attributes": ["CN", "O"]}))
    assert decision.subject == x509.load_der_x509_csr(csr).subject
    assert decision.names == RequestedNames(
        dns=("www.example.internal", "api.example.internal", "localhost"),
        ip=("10.1.2.3", "::1"),
    )


def test_request_names_are_lowercased_and_cn_compared_case_insensitively() -> None:
    csr = make_csr(cn="WWW.Example.Internal", dns=["WWW.EXAMPLE.INTERNAL"])
    decision = webserver_decision(csr)
    assert decision.names.dns == ("www.example.internal",)
    assert decision.subject_text() == "CN=WWW.Example.Internal"


def test_cn_only_request_becomes_a_dns_san() -> None:
    decision = webserver_decision(make_csr(cn="www.example.internal"))
    assert decision.names == RequestedNames(dns=("www.example.internal",))


def test_request_with_only_sans_and_empty_subject() -> None:
    decision = webserver_decision(make_csr(dns=["www.example.internal"]))
    assert len(decision.subject) == 0
    assert decision.names.dns == ("www.example.internal",)


NAME_REFUSALS: list[tuple[str, dict[str, Any], dict[str, Any]]] = [
    ("no names at all", {}, {}),
    ("CN that is not a host name and no SAN", {"cn": "Web Server"}, {}),
    ("CN not among the SANs", {"cn": "www.example.internal", "dns": ["api.example.internal"]}, {}),
    ("name outside the allowed suffix", {"dns": ["www.example.com"]}, {}),
    ("the suffix itself", {"dns": ["example.internal"]}, {}),
    ("look-alike suffix", {"dns": ["www.badexample.internal"]}, {}),
    ("wildcard when wildcards are off", {"dns": ["*.example.internal"]}, {}),
    ("invalid DNS syntax", {"dns": ["bad_name.example.internal"]}, {}),
    ("IP outside the ranges", {"dns": ["www.example.internal"], "ips": ["192.168.1.1"]}, {}),
    ("IP when IPs are off", {"dns": ["www.example.internal"], "ips": ["10.0.0.1"]},
     {"names": {"ip": False}}),
    ("too many names", {"dns": [f"h{i}.example.internal" for i in range(4)]},
     {"names": {"max": 3}}),
    ("e-mail names are off", {"dns": ["www.example.internal"], "emails": ["a@example.internal"]},
     {}),
    ("URI names", {"dns": ["www.example.internal"], "uris": ["https://www.example.internal/"]}, {}),
    ("subject attribute outside the allowed set",
     {"dns": ["www.example.internal"],
      "attributes": [x509.NameAttribute(NameOID.EMAIL_ADDRESS, "a@example.internal")]}, {}),
    ("two common names",
     {"cn": "www.example.internal", "dns": ["www.example.internal", "api.example.internal"],
      "attributes": [x509.NameAttribute(NameOID.COMMON_NAME, "api.example.internal")]}, {}),
]


@pytest.mark.parametrize(("csr_args", "changes"), [c[1:] for c in NAME_REFUSALS],
                         ids=[c[0] for c in NAME_REFUSALS])
def test_request_name_refusals(csr_args: dict[str, Any], changes: dict[str, Any]) -> None:
    template = make_template("webserver", **changes)
    assert_refused(Reason.NAME_NOT_ALLOWED, MACHINE, request("webserver", make_csr(**csr_args)),
                   gathered(template))


def test_wildcard_and_email_when_the_template_allows_them() -> None:
    template = make_template("webserver", names={"wildcard": True, "email": True})
    csr = make_csr(dns=["*.example.internal", "*.a.example.internal"],
                   emails=["ops@example.internal"])
    decision = webserver_decision(csr, template)
    assert decision.names.dns == ("*.example.internal", "*.a.example.internal")
    assert decision.names.email == ("ops@example.internal",)


def test_ip_without_ranges_allows_any_address() -> None:
    template = make_template("webserver", names={"ip_ranges": []})
    decision = webserver_decision(make_csr(dns=["a.example.internal"], ips=["203.0.113.5"]),
                                  template)
    assert decision.names.ip == ("203.0.113.5",)


# ================================================================================================
# Renewal evidence
# ================================================================================================


def renewal_request(old: Issued, csr: bytes, template: str = "webserver") -> EnrollmentRequest:
    return request(template, csr, renewal=old.evidence(csr))


def test_valid_renewal() -> None:
    old = issue()
    csr = make_csr(cn="new.example.internal", dns=["new.example.internal"])
    decision = decide(MACHINE, renewal_request(old, csr), gathered(
        make_template("webserver", subject={"use_existing_for_renewal": False}),
        known=known_map(old)), NOW)
    assert decision.kind == "renewal"
    assert decision.renewal_of == old.known
    # without use_existing_for_renewal the new CSR's names are used (and checked)
    assert decision.names.dns == ("new.example.internal",)


def test_renewal_with_use_existing_copies_the_old_subject_and_sans() -> None:
    old = issue(cn="old.example.internal", dns=["old.example.internal", "alt.example.internal"],
                ips=["10.0.0.9"])
    csr = make_csr(cn="evil.example.com", dns=["evil.example.com"])  # ignored
    decision = decide(MACHINE, renewal_request(old, csr),
                      gathered(webserver_template(), known=known_map(old)), NOW)
    assert decision.kind == "renewal"
    assert decision.subject == old.cert.subject
    assert decision.names == RequestedNames(dns=("old.example.internal", "alt.example.internal"),
                                            ip=("10.0.0.9",))


def test_renewal_without_use_existing_checks_the_new_names() -> None:
    old = issue()
    csr = make_csr(cn="evil.example.com", dns=["evil.example.com"])
    template = make_template("webserver", subject={"use_existing_for_renewal": False})
    assert_refused(Reason.NAME_NOT_ALLOWED, MACHINE, renewal_request(old, csr),
                   gathered(template, known=known_map(old)))


def test_principal_template_renewal_still_builds_the_subject_from_the_principal() -> None:
    old = issue(template_name="machine", cn="stale-name", dns=["stale.example.internal"])
    decision = decide(MACHINE, renewal_request(old, make_csr(), "machine"),
                      gathered(machine_template(), known=known_map(old)), NOW)
    assert decision.kind == "renewal"
    assert decision.subject_text() == "CN=host1.example.internal"
    assert decision.names.dns == ("host1.example.internal",)


def test_renewal_of_an_expired_certificate() -> None:
    old = issue(not_before=NOW - 100 * DAY, not_after=NOW - SECOND)
    assert_refused(Reason.RENEWAL_OF_EXPIRED, MACHINE, renewal_request(old, make_csr()),
                   gathered(webserver_template(), known=known_map(old)))


def test_renewal_at_the_last_second_of_validity_is_allowed() -> None:
    old = issue(not_before=NOW - 100 * DAY, not_after=NOW)
    decision = decide(MACHINE, renewal_request(old, make_csr()),
                      gathered(webserver_template(), known=known_map(old)), NOW)
    assert decision.kind == "renewal"


def test_renewal_of_a_revoked_certificate() -> None:
    old = issue(revoked_at=NOW - DAY)
    assert_refused(Reason.RENEWAL_OF_REVOKED, MACHINE, renewal_request(old, make_csr()),
                   gathered(webserver_template(), known=known_map(old)))


def test_renewal_of_another_principals_certificate() -> None:
    old = issue(principal_id=OTHER_MACHINE.principal_id)
    error = assert_refused(Reason.RENEWAL_INVALID, MACHINE, renewal_request(old, make_csr()),
                           gathered(webserver_template(), known=known_map(old)))
    assert "someone else" in error.detail


def test_renewal_of_a_certificate_without_principal() -> None:
    old = issue(principal_id=None)
    assert_refused(Reason.RENEWAL_INVALID, MACHINE, renewal_request(old, make_csr()),
                   gathered(webserver_template(), known=known_map(old)))


def test_renewal_with_a_bad_signature() -> None:
    old = issue()
    csr = make_csr()
    other_csr = make_csr()
    wrong_data = Evidence(old.cert, sign_bytes(old.key, other_csr))
    wrong_key = Evidence(old.cert, sign_bytes(new_key(), csr))
    for evidence in (wrong_data, wrong_key, Evidence(old.cert, b"")):
        error = assert_refused(Reason.RENEWAL_INVALID, MACHINE,
                               request("webserver", csr, renewal=evidence),
                               gathered(webserver_template(), known=known_map(old)))
        assert "signature" in error.detail


def test_renewal_of_a_certificate_the_database_does_not_know() -> None:
    old = issue()
    assert_refused(Reason.RENEWAL_INVALID, MACHINE, renewal_request(old, make_csr()),
                   gathered(webserver_template(), known={}))


def test_renewal_of_a_certificate_from_a_foreign_ca_with_the_same_issuer_name() -> None:
    old = issue(by=foreign_ca())
    assert old.cert.issuer == issuing_ca().cert.subject
    assert_refused(Reason.RENEWAL_INVALID, MACHINE, renewal_request(old, make_csr()),
                   gathered(webserver_template(), known=known_map(old)))


class _FaultyVerification:
    """A real certificate whose issuer check fails with a programming error, not a verdict."""

    def __init__(self, cert: x509.Certificate) -> None:
        self._cert = cert

    def __getattr__(self, name: str) -> Any:
        return getattr(self._cert, name)

    def verify_directly_issued_by(self, issuer: x509.Certificate) -> None:
        raise RuntimeError("a fault inside signature verification")


def test_a_fault_in_signature_verification_is_not_a_verdict() -> None:
    """Only what verification raises for another issuer's certificate means "not issued by us";
    a fault must not be swallowed as a refusal (nor cached as one)."""
    old = issue()
    csr = make_csr()
    faulty = Evidence(_FaultyVerification(old.cert), sign_bytes(old.key, csr))  # type: ignore[arg-type]
    with pytest.raises(RuntimeError, match="a fault inside signature verification"):
        decide(MACHINE, request("webserver", csr, renewal=faulty),
               gathered(webserver_template(), known=known_map(old)), NOW)


def test_renewal_across_templates_needs_supersedes() -> None:
    old = issue(template_name="legacy")
    csr = make_csr()
    assert_refused(Reason.RENEWAL_INVALID, MACHINE, renewal_request(old, csr),
                   gathered(webserver_template(), known=known_map(old)))
    superseding = make_template("webserver", supersedes=["legacy"])
    decision = decide(MACHINE, renewal_request(old, csr),
                      gathered(superseding, known=known_map(old)), NOW)
    assert decision.kind == "renewal"


def test_renewal_of_a_not_yet_valid_certificate() -> None:
    old = issue(not_before=NOW + DAY, not_after=NOW + 90 * DAY)
    assert_refused(Reason.RENEWAL_INVALID, MACHINE, renewal_request(old, make_csr()),
                   gathered(webserver_template(), known=known_map(old)))


# ================================================================================================
# Registration-authority co-signatures
# ================================================================================================


def ra_request(csr: bytes, *agents: Issued) -> EnrollmentRequest:
    return request("ra", csr, ra_signatures=tuple(a.evidence(csr) for a in agents))


def test_no_ra_signatures_needed_ignores_any_given() -> None:
    csr = make_csr()
    junk = Evidence(issue().cert, b"junk")
    decision = decide(MACHINE, request("ra", csr, ra_signatures=(junk,)),
                      gathered(ra_template(0)), NOW)
    assert decision.kind == "new"


@pytest.mark.parametrize("required", [1, 2])
def test_ra_signatures_missing(required: int) -> None:
    error = assert_refused(Reason.RA_SIGNATURES_MISSING, MACHINE, ra_request(make_csr()),
                           gathered(ra_template(required)))
    assert f"needs {required}" in error.detail and "0 valid" in error.detail


def test_one_valid_ra_signature() -> None:
    agent = ra_agent(50)
    csr = make_csr()
    decision = decide(MACHINE, ra_request(csr, agent), gathered(ra_template(1),
                                                                known=known_map(agent)), NOW)
    assert decision.kind == "new"


def test_two_ra_signatures_from_two_agents() -> None:
    a, b = ra_agent(50), ra_agent(51)
    csr = make_csr()
    decide(MACHINE, ra_request(csr, a, b), gathered(ra_template(2), known=known_map(a, b)), NOW)


def test_two_signatures_from_one_agent_count_once() -> None:
    a1, a2 = ra_agent(50), ra_agent(50)
    csr = make_csr()
    error = assert_refused(Reason.RA_SIGNATURES_MISSING, MACHINE, ra_request(csr, a1, a2),
                           gathered(ra_template(2), known=known_map(a1, a2)))
    assert "1 valid" in error.detail
    # the same certificate twice counts once too
    assert_refused(Reason.RA_SIGNATURES_MISSING, MACHINE, ra_request(csr, a1, a1),
                   gathered(ra_template(2), known=known_map(a1)))


INVALID_AGENTS = ["wrong EKU", "no EKU at all", "revoked", "expired", "not yet valid",
                  "unknown to the database", "issued by a foreign CA", "bad signature",
                  "no principal"]


@functools.cache
def _invalid_agents() -> dict[str, tuple[Issued, bool, bytes | None]]:
    """label -> (agent, whether the database knows it, a signature override)."""
    return {
        "wrong EKU": (ra_agent(60, ekus=(EKU_NAMES["client_auth"],)), True, None),
        "no EKU at all": (ra_agent(61, ekus=()), True, None),
        "revoked": (ra_agent(62, revoked_at=NOW - DAY), True, None),
        "expired": (ra_agent(63, not_before=NOW - 90 * DAY, not_after=NOW - DAY), True, None),
        "not yet valid": (ra_agent(64, not_before=NOW + DAY, not_after=NOW + 90 * DAY), True,
                          None),
        "unknown to the database": (ra_agent(65), False, None),
        "issued by a foreign CA": (ra_agent(66, by=foreign_ca()), True, None),
        "bad signature": (ra_agent(67), True, b"\x30\x06\x02\x01\x01\x02\x01\x01"),
        "no principal": (ra_agent(None), True, None),
    }


@pytest.mark.parametrize("label", INVALID_AGENTS)
def test_invalid_co_signer_does_not_count(label: str) -> None:
    bad, is_known, signature = _invalid_agents()[label]
    good = ra_agent(70)
    csr = make_csr()
    bad_evidence = bad.evidence(csr) if signature is None else Evidence(bad.cert, signature)
    known = known_map(good, *([bad] if is_known else []))
    req = request("ra", csr, ra_signatures=(good.evidence(csr), bad_evidence))
    # one valid of two required
    error = assert_refused(Reason.RA_SIGNATURES_MISSING, MACHINE, req,
                           gathered(ra_template(2), known=known))
    assert "1 valid" in error.detail
    # and the good one alone satisfies a template that needs one
    decide(MACHINE, req, gathered(ra_template(1), known=known), NOW)


def test_ra_signature_over_another_csr_does_not_count() -> None:
    agent = ra_agent(50)
    csr = make_csr()
    req = request("ra", csr, ra_signatures=(agent.evidence(make_csr()),))
    assert_refused(Reason.RA_SIGNATURES_MISSING, MACHINE, req,
                   gathered(ra_template(1), known=known_map(agent)))


def test_template_specific_ra_policy() -> None:
    policy = "1.3.6.1.4.1.99999.42"
    default_agent = ra_agent(50)
    special_agent = ra_agent(51, ekus=(policy,))
    csr = make_csr()
    known = known_map(default_agent, special_agent)
    assert_refused(Reason.RA_SIGNATURES_MISSING, MACHINE, ra_request(csr, default_agent),
                   gathered(ra_template(1, policy), known=known))
    decide(MACHINE, ra_request(csr, special_agent), gathered(ra_template(1, policy), known=known),
           NOW)


# ================================================================================================
# Key archival
# ================================================================================================


def test_key_archival_with_a_matching_envelope() -> None:
    key = new_key()
    envelope = key_archival.seal(key, kra()[0].certificate)
    decision = decide(MACHINE, request("archive", make_csr(key), archived_key=envelope),
                      gathered(archive_template(), with_kra=True), NOW)
    assert decision.archived_key == envelope


def test_key_archival_with_an_rsa_key() -> None:
    key = rsa_key(2048)
    envelope = key_archival.seal(key, kra()[0].certificate)
    decision = decide(MACHINE, request("archive", make_csr(key), archived_key=envelope),
                      gathered(archive_template(), with_kra=True), NOW)
    assert decision.archived_key == envelope


def test_key_archival_required_without_an_envelope() -> None:
    assert_refused(Reason.KEY_ARCHIVAL_REQUIRED, MACHINE, request("archive", make_csr()),
                   gathered(archive_template(), with_kra=True))


def test_key_archival_with_the_envelope_of_another_key() -> None:
    envelope = key_archival.seal(new_key(), kra()[0].certificate)
    error = assert_refused(Reason.KEY_ARCHIVAL_REQUIRED, MACHINE,
                           request("archive", make_csr(new_key()), archived_key=envelope),
                           gathered(archive_template(), with_kra=True))
    assert "not the CSR's key" in error.detail


def test_key_archival_to_another_kra() -> None:
    other_kra_key = rsa_key(3072)
    other = build_kra_certificate(subject=simple_name("Other KRA"),
                                  public_key=other_kra_key.public_key(),
                                  issuer_cert=issuing_ca().cert, issuer_key=issuing_ca().key,
                                  not_before=NOW - DAY, not_after=NOW + 365 * DAY)
    key = new_key()
    envelope = key_archival.seal(key, other)
    assert_refused(Reason.KEY_ARCHIVAL_REQUIRED, MACHINE,
                   request("archive", make_csr(key), archived_key=envelope),
                   gathered(archive_template(), with_kra=True))


@pytest.mark.parametrize("field", ["wrapped_key", "nonce", "ciphertext"])
def test_key_archival_with_a_corrupt_envelope(field: str) -> None:
    key = new_key()
    envelope = dict(key_archival.seal(key, kra()[0].certificate))
    envelope[field] = "AAAA" + envelope[field][4:]
    assert_refused(Reason.KEY_ARCHIVAL_REQUIRED, MACHINE,
                   request("archive", make_csr(key), archived_key=envelope),
                   gathered(archive_template(), with_kra=True))
    envelope[field] = "***not base64***"
    assert_refused(Reason.KEY_ARCHIVAL_REQUIRED, MACHINE,
                   request("archive", make_csr(key), archived_key=envelope),
                   gathered(archive_template(), with_kra=True))


def test_key_archival_on_a_ca_without_kra() -> None:
    key = new_key()
    envelope = key_archival.seal(key, kra()[0].certificate)
    assert_refused(Reason.KEY_ARCHIVAL_REQUIRED, MACHINE,
                   request("archive", make_csr(key), archived_key=envelope),
                   gathered(archive_template(), with_kra=False))


def test_envelope_is_ignored_when_the_template_does_not_archive() -> None:
    key = new_key()
    envelope = key_archival.seal(key, kra()[0].certificate)
    decision = decide(MACHINE, request("machine", make_csr(key), archived_key=envelope),
                      gathered(machine_template(), with_kra=True), NOW)
    assert decision.archived_key is None


# ================================================================================================
# Issuer choice and validity
# ================================================================================================


def issuer(id: int, name: str, *, not_before: dt.datetime = NOW - 365 * DAY,
           not_after: dt.datetime = NOW + 5 * 365 * DAY, **kwargs: Any) -> Authority:
    return authority(id, name, sub_ca(name, not_before, not_after), **kwargs)


def choose(authorities: Sequence[Authority], *, named: str | None = None,
           renewal_of: Issued | None = None) -> Authority:
    csr = make_csr()
    req = request("machine", csr, issuer=named,
                  renewal=renewal_of.evidence(csr) if renewal_of else None)
    state = gathered(machine_template(), authorities=[root_authority(), *authorities],
                     known=known_map(renewal_of) if renewal_of else None)
    return decide(MACHINE, req, state, NOW).issuer


def choose_refused(authorities: Sequence[Authority], reason: Reason, *,
                   named: str | None = None) -> Refusal:
    req = request("machine", make_csr(), issuer=named)
    state = gathered(machine_template(), authorities=[root_authority(), *authorities])
    return assert_refused(reason, MACHINE, req, state)


def test_lowest_cost_issuer_is_chosen() -> None:
    cheap, pricey = issuer(3, "cheap", cost=1), issuer(4, "pricey", cost=5)
    assert choose([pricey, cheap]).name == "cheap"
    assert choose([cheap, pricey]).name == "cheap"


def test_equal_cost_is_broken_by_name() -> None:
    b, a = issuer(3, "bravo", cost=2), issuer(4, "alpha", cost=2)
    assert choose([b, a]).name == "alpha"


def test_named_issuer_is_used_even_if_not_cheapest() -> None:
    cheap, pricey = issuer(3, "cheap", cost=1), issuer(4, "pricey", cost=5)
    assert choose([cheap, pricey], named="pricey").name == "pricey"


def test_unknown_named_issuer() -> None:
    choose_refused([issuer(3, "cheap")], Reason.UNKNOWN_ISSUER, named="nope")
    # the root is not an issuer, even by name
    choose_refused([issuer(3, "cheap")], Reason.UNKNOWN_ISSUER, named="root")


def test_named_issuer_that_does_not_serve_the_template() -> None:
    other = issuer(3, "other", templates=frozenset({"webserver"}))
    choose_refused([other, issuer(4, "main")], Reason.NO_ISSUER, named="other")


def test_issuers_not_serving_the_template_are_skipped() -> None:
    cheap_other = issuer(3, "other", cost=0, templates=frozenset({"webserver"}))
    assert choose([cheap_other, issuer(4, "main", cost=9)]).name == "main"


def test_disabled_issuer_is_skipped() -> None:
    assert choose([issuer(3, "off", cost=0, enabled=False), issuer(4, "on", cost=9)]).name == "on"
    choose_refused([issuer(3, "off", enabled=False)], Reason.NO_ISSUER, named="off")


def test_renewal_only_issuer_refuses_new_requests() -> None:
    retiring = issuer(3, "retiring", cost=0, renewal_only=True)
    choose_refused([retiring], Reason.NO_ISSUER)
    choose_refused([retiring], Reason.ISSUER_RENEWAL_ONLY, named="retiring")
    assert choose([retiring, issuer(4, "new", cost=9)]).name == "new"


def test_renewal_only_issuer_serves_renewals() -> None:
    retiring = issuer(3, "retiring", cost=0, renewal_only=True)
    old = issue(template_name="machine")  # issued by issuing-1, which is also present below
    both = [retiring, issuer(4, "new", cost=9), issuer_authority(cost=20)]
    assert choose(both, renewal_of=old).name == "retiring"
    assert choose([retiring, issuer_authority(cost=20)], renewal_of=old,
                  named="retiring").name == "retiring"


def test_expired_and_not_yet_valid_issuers_are_skipped() -> None:
    expired = issuer(3, "expired", cost=0, not_before=NOW - 400 * DAY, not_after=NOW - SECOND)
    future = issuer(5, "future", cost=0, not_before=NOW + DAY, not_after=NOW + 900 * DAY)
    assert choose([expired, future, issuer(4, "current", cost=9)]).name == "current"
    choose_refused([expired], Reason.NO_ISSUER, named="expired")
    choose_refused([expired, future], Reason.NO_ISSUER)


def test_no_issuer_at_all() -> None:
    error = choose_refused([], Reason.NO_ISSUER)
    assert "machine" in error.detail


def test_validity_is_inclusive() -> None:
    """Backdated 10 minutes (a machine whose clock lags the CA's holds a valid certificate at
    once), and the backdate counts inside the validity: the lifetime never grows."""
    decision = decide(MACHINE, request("machine", make_csr()), gathered(machine_template()), NOW)
    assert decision.not_before == NOW - BACKDATE == NOW - 10 * MINUTE
    assert decision.not_after == NOW - 10 * MINUTE + dt.timedelta(days=365) - SECOND
    short = make_template("machine", validity="1d")
    decision = decide(MACHINE, request("machine", make_csr()), gathered(short), NOW)
    assert decision.not_after == dt.datetime(2030, 6, 2, 11, 49, 59, tzinfo=dt.UTC)


def test_backdate_is_at_most_a_hundredth_of_the_validity_and_never_before_the_issuer() -> None:
    hour = make_template("machine", validity="1h")
    decision = decide(MACHINE, request("machine", make_csr()), gathered(hour), NOW)
    assert decision.not_before == NOW - 36 * SECOND
    assert decide(MACHINE, request("machine", make_csr()), gathered(make_template("machine", validity="20s")),
                  NOW).not_before == NOW  # 0.2 s: whole seconds only
    assert decision.not_after - decision.not_before == dt.timedelta(hours=1) - SECOND
    young = issuer(3, "young", not_before=NOW - 3 * MINUTE)
    decision = decide(MACHINE, request("machine", make_csr()),
                      gathered(machine_template(), authorities=[root_authority(), young]), NOW)
    assert decision.issuer.name == "young"
    assert decision.not_before == NOW - 3 * MINUTE == young.certificate.not_valid_before_utc
    assert decision.not_after == NOW - 3 * MINUTE + dt.timedelta(days=365) - SECOND


def test_validity_is_clamped_to_the_issuers_not_after() -> None:
    ending = issuer(3, "ending", not_after=NOW + 10 * DAY)
    state = gathered(machine_template(), authorities=[root_authority(), ending])
    decision = decide(MACHINE, request("machine", make_csr()), state, NOW)
    assert decision.issuer.name == "ending"
    assert decision.not_after == NOW + 10 * DAY == ending.certificate.not_valid_after_utc
    assert decision.not_after <= decision.issuer.certificate.not_valid_after_utc


def test_validity_shorter_than_the_issuer_is_not_clamped() -> None:
    ending = issuer(3, "ending", not_after=NOW + 400 * DAY)
    state = gathered(machine_template(), authorities=[root_authority(), ending])
    decision = decide(MACHINE, request("machine", make_csr()), state, NOW)
    assert decision.not_after == NOW - BACKDATE + 365 * DAY - SECOND


def test_one_validity_rule_for_decisions_and_approvals() -> None:
    """``validity`` is the rule ``decide`` applies, and approval issues with it too."""
    template = machine_template()
    for ending in (issuer(3, "ending", not_after=NOW + 10 * DAY), issuer(4, "lasting", not_after=NOW + 400 * DAY)):
        decision = decide(MACHINE, request("machine", make_csr()),
                          gathered(template, authorities=[root_authority(), ending]), NOW)
        assert validity(template, ending, NOW) == (decision.not_before, decision.not_after)
    start = NOW - BACKDATE
    assert validity(template, issuer(3, "ending", not_after=NOW + 10 * DAY), NOW) == (start, NOW + 10 * DAY)
    assert validity(template, issuer(4, "lasting", not_after=NOW + 400 * DAY), NOW) == (
        start, start + 365 * DAY - SECOND)


# ================================================================================================
# Pending (manager approval)
# ================================================================================================


def test_manager_approval_makes_the_decision_pending() -> None:
    template = make_template("approval-required")
    decision = decide(MACHINE, request("approval-required", make_csr()), gathered(template), NOW)
    assert decision.pending is True
    assert decision.template is template


def test_no_manager_approval_is_not_pending() -> None:
    for template in (machine_template(), webserver_template()):
        csr = make_csr(dns=["www.example.internal"])
        decision = decide(MACHINE, request(template.name, csr), gathered(template), NOW)
        assert decision.pending is False


def test_decision_carries_the_csr_key() -> None:
    key = new_key()
    decision = decide(MACHINE, request("machine", make_csr(key)), gathered(machine_template()),
                      NOW)
    fmt = serialization.PublicFormat.SubjectPublicKeyInfo
    enc = serialization.Encoding.DER
    assert decision.public_key.public_bytes(enc, fmt) == key.public_key().public_bytes(enc, fmt)
