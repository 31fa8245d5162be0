"""The pure name rules, table by table: attribute values, mailboxes, control characters, the
template settings that govern names, :mod:`certpulse.ca.name_checks`, and row-id bounds.

Subjects and names are built in memory with ``cryptography``; templates come from
``parse_template``. No server, no store, no clock (the server-side attacks are in
``test_api_names.py``).
"""

from __future__ import annotations

import functools
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.x509.oid import ExtensionOID, NameOID

from certpulse.ca.model import Caller
from certpulse.ca.name_checks import checked_request_names
from certpulse.ca.row_ids import MAX_ROW_ID, is_row_id, require_row_id
from certpulse.ca.templates import SubjectRules, Template, parse_template
from certpulse.errors import Reason, Refusal
from certpulse.pki.csr_signature import check_csr_signature
from certpulse.pki.mailbox import mailbox_problem
from certpulse.pki.names import RequestedNames, control_character_in, csr_sans
from certpulse.pki.subject import attribute_named, not_text, value_problem

CALLER = Caller(kind="principal", name="alice", principal_id=3, principal_kind="user",
                groups=frozenset({"users"}))


def template(subject: dict[str, Any] | None = None, names: dict[str, Any] | None = None) -> Template:
    doc: dict[str, Any] = {"name": "t", "validity": "30d",
                           "subject": {"source": "request", **(subject or {})},
                           "names": {"dns": [".example.internal"], **(names or {})}}
    return parse_template(doc, default_oid="1.2.3")


def name(*attrs: tuple[x509.ObjectIdentifier, str]) -> x509.Name:
    return x509.Name([x509.NameAttribute(oid, value) for oid, value in attrs])


# --- characters and values -------------------------------------------------------------------

NOT_TEXT = [("plain", "www.example.internal", None), ("NUL", "a\x00", "U+0000"), ("ESC", "\x1b[31m", "U+001B"),
            ("DEL", "a\x7f", "U+007F"), ("C1", "a\x9b", "U+009B"), ("LS", "a\u2028", "U+2028"),
            ("PS", "a\u2029", "U+2029"), ("RLO", "\u202ea", "U+202E"), ("FSI", "\u2068", "U+2068"),
            ("ZWJ", "a\u200db", "U+200D"), ("BOM", "\ufeffa", "U+FEFF"), ("umlaut", "Müller", None),
            ("CJK", "東京", None), ("space", "Example Corp", None)]


@pytest.mark.parametrize(("text", "expected"), [c[1:] for c in NOT_TEXT], ids=[c[0] for c in NOT_TEXT])
def test_not_text(text: str, expected: str | None) -> None:
    assert not_text(text) == expected


VALUES: list[tuple[str, str, object, str | None]] = [
    ("C ok", "C", "DE", None),
    ("C lower", "C", "de", "two upper-case"),
    ("C three", "C", "DEU", "two upper-case"),
    ("C digits", "C", "D1", "two upper-case"),
    ("C one", "C", "D", "two upper-case"),
    ("CN 64", "CN", "x" * 64, None),
    ("CN 65", "CN", "x" * 65, "longer than 64"),
    ("CN empty", "CN", "", "empty"),
    ("CN bytes", "CN", b"abc", "not a text value"),
    ("CN control", "CN", "a\nb", "U+000A"),
    ("L 128", "L", "x" * 128, None),
    ("serialNumber printable", "serialNumber", "AB-12 (3)", None),
    ("serialNumber not printable", "serialNumber", "AB_12", "PrintableString"),
    ("serialNumber umlaut", "serialNumber", "Ä1", "PrintableString"),
    ("DC ascii", "DC", "example", None),
    ("DC non-ascii", "DC", "bücher", "ASCII"),
    ("O utf8", "O", "Müller GmbH", None),
]


@pytest.mark.parametrize(("label", "value", "expected"), [c[1:] for c in VALUES], ids=[c[0] for c in VALUES])
def test_value_problem(label: str, value: object, expected: str | None) -> None:
    attribute = attribute_named(label)
    assert attribute is not None
    problem = value_problem(attribute, value)
    if expected is None:
        assert problem is None
    else:
        assert problem is not None and expected in problem, problem


def test_attribute_names() -> None:
    assert attribute_named("cn") == attribute_named("CN") == attribute_named("2.5.4.3")
    assert attribute_named("emailaddress") == attribute_named("1.2.840.113549.1.9.1")
    unknown = attribute_named("1.3.6.1.4.1.99999.1")
    assert unknown is not None and unknown.label == "1.3.6.1.4.1.99999.1"
    assert attribute_named("Organisation") is None
    assert attribute_named("1.2.03") is None


MAILBOXES: list[tuple[str, str | None]] = [
    ("ops@example.internal", None),
    ("first.last+tag@sub.example.internal", None),
    ("ops@xn--bcher-kva.example", None),
    ("ops.example.internal", "not a valid mailbox"),
    ("ops@@example.internal", "not a valid mailbox"),
    ("a@b@example.internal", "not a valid mailbox"),
    ("@example.internal", "not a valid mailbox"),
    ("ops@", "not a valid mailbox"),
    ('"ops team"@example.internal', "not a valid mailbox"),
    ("ops@[192.0.2.1]", "not a valid mailbox"),
    ("ops@localhost", "not a valid mailbox"),
    ("ops@bad_host.example.internal", "not"),
    ("ops@-bad.example.internal", "not a valid mailbox"),
    (".ops@example.internal", "not a valid mailbox"),
    ("o..ps@example.internal", "not a valid mailbox"),
    ("o" * 65 + "@example.internal", "not a valid mailbox"),
    ("ops@" + ".".join(["a" * 63] * 4) + ".internal", "not a valid mailbox"),
    ("ops\x00@example.internal", "U+0000"),
    ("ops@example.internal\n", "U+000A"),
    ("öps@example.internal", "not ASCII"),
    ("ops@bücher.example", "not ASCII"),
]


@pytest.mark.parametrize(("address", "expected"), MAILBOXES, ids=[repr(m[0])[:40] for m in MAILBOXES])
def test_mailbox_problem(address: str, expected: str | None) -> None:
    problem = mailbox_problem(address)
    if expected is None:
        assert problem is None
    else:
        assert problem is not None and expected in problem, problem


# --- template settings -----------------------------------------------------------------------


def test_subject_rules_defaults_and_round_trip() -> None:
    plain = template()
    assert plain.subject_rules == SubjectRules()
    assert plain.names.email == () and plain.names.email_local_part == "any"
    rich = template({"allowed_attributes": ["cn", "O", "ou", "2.5.4.6", "1.3.6.1.4.1.99999.1"],
                     "repeatable_attributes": ["OU"], "multi_valued_rdns": True,
                     "values": {"O": ["Example Corp"], "C": ["DE", "FR"]}},
                    {"email": ["Example.internal", ".mail.example.internal"], "email_local_part": "principal"})
    assert rich.subject_rules.allowed == ("CN", "O", "OU", "C", "1.3.6.1.4.1.99999.1")
    assert rich.subject_rules.values_of("C") == ("DE", "FR")
    assert rich.subject_rules.values_of("OU") is None
    assert rich.names.email == ("example.internal", ".mail.example.internal")
    assert parse_template(rich.document(), default_oid="2.9") == rich
    assert parse_template(plain.document(), default_oid="2.9") == plain


@pytest.mark.parametrize(("given", "expected"), [(True, ("*",)), (False, ())])
def test_email_booleans_of_older_templates(given: bool, expected: tuple[str, ...]) -> None:
    assert template(names={"email": given}).names.email == expected


INVALID: list[tuple[str, dict[str, Any], dict[str, Any], str]] = [
    ("unknown attribute", {"allowed_attributes": ["CN", "Organisation"]}, {}, "subject.allowed_attributes"),
    ("bad OID", {"allowed_attributes": ["1.2.x"]}, {}, "subject.allowed_attributes"),
    ("CN repeatable", {"repeatable_attributes": ["CN"]}, {}, "subject.repeatable_attributes"),
    ("C repeatable", {"allowed_attributes": ["CN", "C"], "repeatable_attributes": ["C"]}, {},
     "subject.repeatable_attributes"),
    ("repeatable not allowed", {"repeatable_attributes": ["OU"]}, {}, "subject.repeatable_attributes"),
    ("values of an attribute not allowed", {"values": {"O": ["x"]}}, {}, "subject.values.O"),
    ("bad C value", {"allowed_attributes": ["CN", "C"], "values": {"C": ["de"]}}, {}, "subject.values.C"),
    ("control character in a value", {"allowed_attributes": ["CN", "O"], "values": {"O": ["a\x1bb"]}}, {},
     "subject.values.O"),
    ("empty value list", {"allowed_attributes": ["CN", "O"], "values": {"O": []}}, {}, "subject.values.O"),
    ("values not a table", {"values": ["O"]}, {}, "subject.values"),
    ("multi_valued_rdns not a bool", {"multi_valued_rdns": "yes"}, {}, "subject.multi_valued_rdns"),
    ("e-mail rule not a domain", {}, {"email": ["example .com"]}, "names.email"),
    ("e-mail rule with an @", {}, {"email": ["ops@example.com"]}, "names.email"),
    ("e-mail not a list", {}, {"email": "example.com"}, "names.email"),
    ("bad email_local_part", {}, {"email_local_part": "anyone"}, "names.email_local_part"),
]


@pytest.mark.parametrize(("subject", "names", "setting"), [c[1:] for c in INVALID], ids=[c[0] for c in INVALID])
def test_invalid_name_settings_are_refused(subject: dict[str, Any], names: dict[str, Any], setting: str) -> None:
    with pytest.raises(Refusal) as info:
        template(subject, names)
    assert info.value.reason is Reason.INVALID_TEMPLATE
    assert setting in info.value.detail, info.value.detail


# --- name checks -----------------------------------------------------------------------------

CN = NameOID.COMMON_NAME
O_ = NameOID.ORGANIZATION_NAME
OU = NameOID.ORGANIZATIONAL_UNIT_NAME
C = NameOID.COUNTRY_NAME
ORG = {"allowed_attributes": ["CN", "O", "OU", "C"], "repeatable_attributes": ["OU"],
       "values": {"O": ["Example Corp"], "C": ["DE"]}}
WEB = RequestedNames(dns=("www.example.internal",))

CHECKS: list[tuple[str, dict[str, Any], dict[str, Any], x509.Name, RequestedNames, str | None]] = [
    ("CN only", {}, {}, name((CN, "www.example.internal")), WEB, None),
    ("O by default", {}, {}, name((CN, "www.example.internal"), (O_, "Example Corp")), WEB, "attribute O "),
    ("allowed O", ORG, {}, name((O_, "Example Corp"), (CN, "www.example.internal")), WEB, None),
    ("O value not listed", ORG, {}, name((O_, "Other")), WEB, "O='Other'"),
    ("two OUs", ORG, {}, name((OU, "a"), (OU, "b")), WEB, None),
    ("two Os", ORG, {}, name((O_, "Example Corp"), (O_, "Example Corp")), WEB, "more than one O"),
    ("C lower", ORG, {}, name((C, "de")), WEB, "upper-case"),
    ("multi-valued", ORG, {}, x509.Name([x509.RelativeDistinguishedName(
        [x509.NameAttribute(O_, "Example Corp"), x509.NameAttribute(OU, "a")])]), WEB, "multi-valued"),
    ("multi-valued allowed", {**ORG, "multi_valued_rdns": True}, {}, x509.Name([x509.RelativeDistinguishedName(
        [x509.NameAttribute(O_, "Example Corp"), x509.NameAttribute(OU, "a")])]), WEB, None),
    ("email off", {}, {}, name(), RequestedNames(email=("alice@example.internal",)), "e-mail"),
    ("email allowed", {}, {"email": ["example.internal"]}, name(), RequestedNames(email=("alice@example.internal",)),
     None),
    ("email other domain", {}, {"email": ["example.internal"]}, name(),
     RequestedNames(email=("alice@example.com",)), "domain 'example.com'"),
    ("email suffix", {}, {"email": [".example.internal"]}, name(),
     RequestedNames(email=("alice@mail.example.internal",)), None),
    ("email suffix itself", {}, {"email": [".example.internal"]}, name(),
     RequestedNames(email=("alice@example.internal",)), "not allowed"),
    ("email any domain", {}, {"email": ["*"]}, name(), RequestedNames(email=("alice@example.org",)), None),
    ("email own", {}, {"email": ["*"], "email_local_part": "principal"}, name(),
     RequestedNames(email=("Alice@example.org",)), None),
    ("email someone else's", {}, {"email": ["*"], "email_local_part": "principal"}, name(),
     RequestedNames(email=("bob@example.org",)), "principal"),
    ("emailAddress attribute", {"allowed_attributes": ["CN", "emailAddress"]}, {"email": ["example.internal"]},
     name((NameOID.EMAIL_ADDRESS, "alice@example.com")), WEB, "domain 'example.com'"),
    ("CN that is an e-mail SAN", {}, {"email": ["example.internal"]}, name((CN, "alice@example.internal")),
     RequestedNames(email=("alice@EXAMPLE.internal",)), None),
]


@pytest.mark.parametrize(("subject_rules", "name_rules", "subject", "names", "refusal"), [c[1:] for c in CHECKS],
                         ids=[c[0] for c in CHECKS])
def test_checked_request_names(subject_rules: dict[str, Any], name_rules: dict[str, Any], subject: x509.Name,
                               names: RequestedNames, refusal: str | None) -> None:
    rules = template(subject_rules, name_rules)
    if refusal is None:
        issued_subject, issued_names = checked_request_names(CALLER, rules, subject, names)
        assert [(a.oid, a.value) for a in issued_subject] == [(a.oid, a.value) for a in subject]
        assert [n.lower() for n in issued_names.all()] == [n.lower() for n in names.all()]
        return
    with pytest.raises(Refusal) as info:
        checked_request_names(CALLER, rules, subject, names)
    assert info.value.reason is Reason.NAME_NOT_ALLOWED
    assert refusal in info.value.detail, info.value.detail


def test_issued_email_domain_is_lower_cased() -> None:
    rules = template(names={"email": ["example.internal"]})
    _, names = checked_request_names(CALLER, rules, name(), RequestedNames(email=("Alice@EXAMPLE.Internal",)))
    assert names.email == ("Alice@example.internal",)


# --- row ids ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("value", "ok"), [(0, True), (1, True), (MAX_ROW_ID, True), (MAX_ROW_ID + 1, False),
                                           (2**63 - 1, False), (2**63, False), (-1, False), (10**30, False),
                                           (-(2**63), False)])
def test_row_ids(value: int, ok: bool) -> None:
    assert MAX_ROW_ID == 2**31 - 1  # PostgreSQL's INTEGER; SQLite's holds more
    assert is_row_id(value) is ok
    if ok:
        assert require_row_id(value, "request") == value
        return
    with pytest.raises(Refusal) as info:
        require_row_id(value, "request")
    assert info.value.reason is Reason.NOT_FOUND and len(info.value.detail) < 120


# --- the CSR itself: signature hashes, SAN bytes, control characters --------------------------
# Requests made here with cryptography's builder, EC P-256 or RSA-2048 keys; the SAN bytes the
# builder would refuse go in as an UnrecognizedExtension under the subjectAltName OID.


@functools.cache
def rsa_2048() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def built(key: Any = None, algorithm: hashes.HashAlgorithm | None = None, rsa_padding: Any = None,
          subject: x509.Name | None = None, san: bytes | None = None) -> x509.CertificateSigningRequest:
    builder = x509.CertificateSigningRequestBuilder().subject_name(subject or x509.Name([]))
    if san is not None:
        builder = builder.add_extension(
            x509.UnrecognizedExtension(ExtensionOID.SUBJECT_ALTERNATIVE_NAME, san), critical=False)
    return builder.sign(key or ec.generate_private_key(ec.SECP256R1()), algorithm or hashes.SHA256(),
                        rsa_padding=rsa_padding)


SIGNATURES: list[tuple[str, Any, Reason | None]] = [
    ("ecdsa-sha256", lambda: built(), None),
    ("ecdsa-sha384", lambda: built(algorithm=hashes.SHA384()), None),
    ("ecdsa-sha3-256", lambda: built(algorithm=hashes.SHA3_256()), None),
    ("rsa-sha512", lambda: built(rsa_2048(), hashes.SHA512()), None),
    ("rsa-pss-sha256", lambda: built(rsa_2048(), hashes.SHA256(), padding.PSS(padding.MGF1(hashes.SHA256()), 32)),
     None),
    ("ecdsa-sha224", lambda: built(algorithm=hashes.SHA224()), Reason.WEAK_SIGNATURE_ALGORITHM),
    ("rsa-sha224", lambda: built(rsa_2048(), hashes.SHA224()), Reason.WEAK_SIGNATURE_ALGORITHM),
    ("rsa-pss-sha224", lambda: built(rsa_2048(), hashes.SHA224(), padding.PSS(padding.MGF1(hashes.SHA224()), 28)),
     Reason.WEAK_SIGNATURE_ALGORITHM),
    ("ecdsa-sha256-tampered", lambda: x509.load_der_x509_csr(
        (d := built().public_bytes(serialization.Encoding.DER))[:-1] + bytes([d[-1] ^ 1])),
     Reason.BAD_CSR_SIGNATURE),
]


@pytest.mark.parametrize(("make", "reason"), [c[1:] for c in SIGNATURES], ids=[c[0] for c in SIGNATURES])
def test_csr_signature(make: Any, reason: Reason | None) -> None:
    request = make()
    if reason is None:
        check_csr_signature(request)
        return
    with pytest.raises(Refusal) as info:
        check_csr_signature(request)
    assert info.value.reason is reason


def _san(tag: int, value: bytes) -> bytes:
    inner = bytes([tag, len(value)]) + value
    return bytes([0x30, len(inner)]) + inner


@pytest.mark.parametrize("size", [0, 1, 3, 5, 8, 12, 15, 17, 32])
def test_ip_san_bytes_other_than_4_or_16_are_malformed(size: int) -> None:
    request = built(san=_san(0x87, bytes(range(1, size + 1))))
    with pytest.raises(Refusal) as info:
        csr_sans(request)
    assert info.value.reason is Reason.MALFORMED_CSR


@pytest.mark.parametrize("size", [4, 16])
def test_ip_san_of_4_or_16_bytes(size: int) -> None:
    [name_] = csr_sans(built(san=_san(0x87, bytes(range(1, size + 1)))))
    assert isinstance(name_, x509.IPAddress)


CONTROL_PLACES: list[tuple[str, x509.Name, list[x509.GeneralName], str | None]] = [
    ("clean", name((CN, "www.example.internal")), [x509.DNSName("www.example.internal")], None),
    ("CN", name((CN, "www\x1b.example.internal")), [], "subject attribute CN"),
    ("O", name((O_, "Evil\u202eCorp")), [], "subject attribute O"),
    ("unknown OID", name((x509.ObjectIdentifier("1.2.3.4"), "a\x00")), [], "subject attribute 1.2.3.4"),
    ("DNS", name(), [x509.DNSName("www\x00.example.internal")], "DNS SAN"),
    ("e-mail", name(), [x509.RFC822Name("ops@example.internal\n")], "e-mail SAN"),
    ("URI", name(), [x509.UniformResourceIdentifier("https://a/\x7f")], "URI SAN"),
    ("directoryName", name(), [x509.DirectoryName(name((CN, "a\u2028b")))], "directoryName SAN"),
]


@pytest.mark.parametrize(("subject", "sans", "where"), [c[1:] for c in CONTROL_PLACES],
                         ids=[c[0] for c in CONTROL_PLACES])
def test_control_character_in(subject: x509.Name, sans: list[x509.GeneralName], where: str | None) -> None:
    found = control_character_in(subject, sans)
    if where is None:
        assert found is None
    else:
        assert found is not None and where in found and "control character U+" in found, found


# -- a trailing line break is no part of a name ---------------------------------------------------
# ``re.match`` with ``$`` also matches before a final "\n": every pattern that judges a whole name
# ends with ``\Z`` instead, so "web1\n" is refused wherever "web1" is a name.

@pytest.mark.parametrize("name", ["web1.example.internal\n", "web1.example.internal\r\n", "web1\n.example.internal"])
def test_a_host_name_with_a_line_break_is_no_host_name(name: str) -> None:
    from certpulse.pki.names import is_hostname

    assert is_hostname("web1.example.internal", allow_wildcard=False)
    assert not is_hostname(name, allow_wildcard=False)


def test_a_template_name_with_a_trailing_line_break_is_refused() -> None:
    document = {"name": "web\n", "validity": "30d", "renewal_period": "7d"}
    with pytest.raises(Refusal) as refused:
        parse_template(document, default_oid="1.3.6.1.4.1.99999.1")
    assert refused.value.reason is Reason.INVALID_TEMPLATE and "name" in refused.value.detail


def test_a_principal_name_with_a_trailing_line_break_is_refused(tmp_path: Any) -> None:
    from support import init_ca, run_cli

    ca = init_ca(tmp_path / "ca", f"sqlite:///{tmp_path}/ca.db")
    refused = run_cli("principal", "add", "web1.example.internal\n", "--dir", str(ca.dir), check=False)
    assert refused.returncode != 0 and "Traceback" not in refused.stderr
    assert "web1.example.internal" not in ca.cli("principal", "list").stdout
