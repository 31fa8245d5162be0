"""The pure name rules, table by table: attribute values, mailboxes, control characters, the
template settings that govern names, :mod:`certpulse.ca.name_checks`, and row-id bounds.

Subjects and names are built in memory with ``cryptography``; templates come from
``parse_template``. No server, no store, no clock (the server-side attacks are in
``test_api_names.py``).
"""

from __future__ import annotations

from typing import Any

import pytest
from cryptography import x509
from cryptography.x509.oid import NameOID

from certpulse.ca.model import Caller
from certpulse.ca.name_checks import checked_request_names
from certpulse.ca.row_ids import MAX_ROW_ID, is_row_id, require_row_id
from certpulse.ca.templates import SubjectRules, Template, parse_template
from certpulse.errors import Reason, Refusal
from certpulse.pki.mailbox import mailbox_problem
from certpulse.pki.names import RequestedNames
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
                                           (-1, False), (10**30, False), (-(2**63), False)])
def test_row_ids(value: int, ok: bool) -> None:
    assert is_row_id(value) is ok
    if ok:
        assert require_row_id(value, "request") == value
        return
    with pytest.raises(Refusal) as info:
        require_row_id(value, "request")
    assert info.value.reason is Reason.NOT_FOUND and len(info.value.detail) < 120
