"""Template parsing: the example templates, the canonical round trip, and strict validation."""

from __future__ import annotations

import copy
import datetime as dt
import tomllib
from pathlib import Path
from typing import Any

import pytest
import tomli_w

from certpulse.ca.templates import (
    EKU_NAMES,
    Permission,
    Template,
    parse_template,
    parse_template_toml,
)
from certpulse.errors import Reason, Refusal

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "templates"
EXAMPLE_NAMES = ("machine", "webserver", "approval-required", "encryption")
DEFAULT_OID = "1.3.6.1.4.1.99999.1"
SERVER_AUTH = EKU_NAMES["server_auth"]
CLIENT_AUTH = EKU_NAMES["client_auth"]


def example(name: str) -> Template:
    return parse_template_toml((EXAMPLES / f"{name}.toml").read_text(), default_oid=DEFAULT_OID)


def example_document(name: str) -> dict[str, Any]:
    return tomllib.loads((EXAMPLES / f"{name}.toml").read_text())


def minimal(**overrides: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {"name": "t", "validity": "30d"}
    doc.update(overrides)
    return doc


def refused(document: dict[str, Any]) -> Refusal:
    with pytest.raises(Refusal) as info:
        parse_template(document, default_oid=DEFAULT_OID)
    return info.value


# --- the four example templates -------------------------------------------------------------


def test_examples_directory_holds_the_four_templates() -> None:
    assert sorted(p.stem for p in EXAMPLES.glob("*.toml")) == sorted(EXAMPLE_NAMES)


def test_machine_template() -> None:
    t = example("machine")
    assert t.name == "machine"
    assert t.display_name == "Machine"
    assert t.oid == DEFAULT_OID  # no oid in the file: the default is taken
    assert t.validity == dt.timedelta(days=365)
    assert t.renewal_period == dt.timedelta(weeks=6)
    assert t.purpose == "signature"
    assert t.subject_source == "principal"
    assert t.key_types == ("ec-p256", "ec-p384", "rsa")
    assert t.default_key_type == "ec-p256"
    assert t.key_usage == ("digital_signature",)
    assert t.ekus == (CLIENT_AUTH, SERVER_AUTH)
    assert t.old_certificate == "archive"
    assert not t.manager_approval and t.ra_signatures == 0 and not t.archive_private_key
    assert t.version == "1.0"
    assert t.rights_of("host1", ["machines"]) == {"read", "enroll", "autoenroll"}
    assert "autoenroll" in t.rights_of("host1", {"machines"})
    assert t.rights_of("alice", ["users"]) == frozenset()


def test_webserver_template() -> None:
    t = example("webserver")
    assert t.subject_source == "request"
    assert t.renewal_subject_from_existing is True
    assert t.validity == dt.timedelta(days=90)
    assert t.renewal_period == dt.timedelta(days=30)
    assert t.names.dns == (".example.internal", "localhost")
    assert t.names.wildcard is False
    assert t.names.ip is True
    assert t.names.ip_ranges == ("127.0.0.0/8", "::1/128", "10.0.0.0/8")
    assert t.names.email == ()  # no e-mail SANs unless a template lists their domains
    assert t.subject_rules.allowed == ("CN",)
    assert t.names.max == 20
    assert t.ekus == (SERVER_AUTH,)
    assert t.key_usage == ("digital_signature", "key_encipherment")
    assert t.rights_of("web1", ["webservers"]) == {"read", "enroll", "autoenroll"}
    assert t.rights_of("host1", ["machines"]) == {"read"}


def test_approval_required_template() -> None:
    t = example("approval-required")
    assert t.manager_approval is True
    assert t.validity == dt.timedelta(days=180)
    assert t.renewal_period == dt.timedelta(weeks=3)
    assert t.rights_of("alice", ["users"]) == {"read", "enroll"}
    assert t.rights_of("host1", ["machines"]) == {"read", "enroll", "autoenroll"}


def test_encryption_template() -> None:
    t = example("encryption")
    assert t.purpose == "encryption"
    assert "key_encipherment" in t.key_usage
    assert t.key_usage == ("key_encipherment", "data_encipherment")
    assert t.key_types == ("rsa",)
    assert t.default_key_type == "rsa-2048"
    assert t.old_certificate == "archive"
    assert t.ekus == (EKU_NAMES["email_protection"], EKU_NAMES["encrypting_file_system"])
    usage = t.key_usage_extension()
    assert usage.key_encipherment and usage.data_encipherment and not usage.digital_signature
    assert not usage.key_cert_sign and not usage.crl_sign


@pytest.mark.parametrize("name", EXAMPLE_NAMES)
def test_round_trip_of_document(name: str) -> None:
    t = example(name)
    assert parse_template(t.document(), default_oid="2.999") == t


@pytest.mark.parametrize("name", EXAMPLE_NAMES)
def test_round_trip_through_toml_text(name: str) -> None:
    t = example(name)
    text = tomli_w.dumps(t.document())
    assert parse_template_toml(text, default_oid="2.999") == t


def test_round_trip_of_every_setting() -> None:
    doc: dict[str, Any] = {
        "name": "everything",
        "display_name": "Every setting",
        "oid": "1.2.3.4.5",
        "schema_version": 4,
        "major_version": 7,
        "minor_version": 3,
        "validity": "1y",
        "renewal_period": "1d12h",
        "purpose": "both",
        "supersedes": ["old-one", "older"],
        "key": {
            "types": ["ec", "rsa-3072", "rsa-4096"],
            "default": "ec-p384",
            "usage": ["digital_signature", "key_agreement"],
            "ekus": ["client_auth", "smartcard_logon", "1.2.3.99"],
            "archive": True,
        },
        "subject": {"source": "request", "use_existing_for_renewal": True},
        "names": {
            "dns": [".Example.COM", "exact.example.org"],
            "wildcard": True,
            "ip": True,
            "ip_ranges": ["192.0.2.0/24"],
            "email": True,
            "max": 3,
        },
        "issuance": {"manager_approval": True, "ra_signatures": 2, "ra_policy": "1.2.3.77"},
        "handling": {"old_certificate": "delete", "user_interaction": True, "check_directory": True},
        "permissions": [
            {"principal": "alice", "rights": ["autoenroll", "read"]},
            {"group": "ops", "rights": ["enroll"]},
        ],
    }
    t = parse_template(doc, default_oid=DEFAULT_OID)
    assert t.validity == dt.timedelta(days=365)
    assert t.renewal_period == dt.timedelta(hours=36)
    assert t.names.dns == (".example.com", "exact.example.org")
    assert t.ekus == (CLIENT_AUTH, "1.3.6.1.4.1.311.20.2.2", "1.2.3.99")
    assert t.ra_policy == "1.2.3.77"
    assert t.version == "7.3"
    assert parse_template(t.document(), default_oid="2.999") == t
    assert parse_template_toml(tomli_w.dumps(t.document()), default_oid="2.999") == t


def test_defaults_of_a_minimal_template() -> None:
    t = parse_template(minimal(), default_oid=DEFAULT_OID)
    assert t.display_name == "t"
    assert t.renewal_period == dt.timedelta(weeks=6)
    assert t.purpose == "signature"
    assert t.key_types == ("ec-p256", "ec-p384", "rsa")
    assert t.default_key_type == "ec-p256"
    assert t.key_usage == ("digital_signature",)
    assert t.ekus == (CLIENT_AUTH,)
    assert t.subject_source == "principal"
    assert t.permissions == ()
    assert parse_template(t.document(), default_oid="2.999") == t


def test_with_versions_changes_only_versions() -> None:
    t = example("machine")
    bumped = t.with_versions(2, 0)
    assert (bumped.major_version, bumped.minor_version) == (2, 0)
    assert bumped.version == "2.0"
    assert bumped.with_versions(1, 0) == t


# --- rights ---------------------------------------------------------------------------------


def test_rights_of_is_the_union_of_principal_and_group_permissions() -> None:
    t = parse_template(
        minimal(permissions=[
            {"principal": "alice", "rights": ["read"]},
            {"group": "ops", "rights": ["enroll"]},
            {"group": "auto", "rights": ["read", "autoenroll"]},
            {"principal": "bob", "rights": ["enroll"]},
        ]),
        default_oid=DEFAULT_OID,
    )
    assert t.rights_of("alice", []) == {"read"}
    assert t.rights_of("alice", ["ops"]) == {"read", "enroll"}
    assert t.rights_of("alice", ["ops", "auto"]) == {"read", "enroll", "autoenroll"}
    assert t.rights_of("carol", ["ops"]) == {"enroll"}
    assert t.rights_of("carol", ["nobody"]) == frozenset()
    # a group named like a principal grants nothing to that principal, and vice versa
    assert t.rights_of("ops", []) == frozenset()
    assert t.rights_of("carol", ["alice", "bob"]) == frozenset()
    assert t.rights_of("bob", iter(["auto"])) == {"enroll", "read", "autoenroll"}


def test_permission_value_type() -> None:
    t = parse_template(minimal(permissions=[{"group": "g", "rights": []}]), default_oid="1.2")
    assert t.permissions == (Permission(principal=None, group="g", rights=frozenset()),)


# --- strict validation ----------------------------------------------------------------------

INVALID: list[tuple[str, dict[str, Any], str]] = [
    ("unknown top-level key", minimal(valdity="30d"), "valdity"),
    ("unknown key in [key]", minimal(key={"types": ["rsa"], "size": 2048}), "key.size"),
    ("unknown key in [subject]", minimal(subject={"sorce": "request"}), "subject.sorce"),
    ("unknown key in [names]", minimal(names={"dns": ["a.b"], "wildcards": True}),
     "names.wildcards"),
    ("unknown key in [issuance]", minimal(issuance={"approval": True}), "issuance.approval"),
    ("unknown key in [handling]", minimal(handling={"old_cert": "delete"}),
     "handling.old_cert"),
    ("unknown key in a permission",
     minimal(permissions=[{"group": "g", "rights": ["read"], "extra": 1}]),
     "permissions[0].extra"),
    ("a table that is not a table", minimal(key="rsa"), "key"),
    ("missing name", {"validity": "30d"}, "name"),
    ("bad name", minimal(name="has space"), "name"),
    ("missing validity", {"name": "t"}, "validity"),
    ("validity not a string", minimal(validity=30), "validity"),
    ("bad oid", minimal(oid="1.2.x"), "oid"),
    ("schema_version out of range", minimal(schema_version=5), "schema_version"),
    ("major_version is a bool", minimal(major_version=True), "major_version"),
    ("bad purpose", minimal(purpose="everything"), "purpose"),
    ("bad key type", minimal(key={"types": ["dsa-1024"]}), "key.types"),
    ("RSA size outside the list", minimal(key={"types": ["rsa-1024"]}), "key.types"),
    ("no key type", minimal(key={"types": []}), "key.types"),
    ("default key not concrete", minimal(key={"types": ["rsa"], "default": "rsa"}),
     "key.default"),
    ("default key outside types", minimal(key={"types": ["rsa"], "default": "ec-p256"}),
     "key.default"),
    ("bad key usage", minimal(key={"usage": ["key_cert_sign"]}), "key.usage"),
    ("bad EKU name", minimal(key={"ekus": ["server-auth"]}), "key.ekus"),
    ("bad EKU list type", minimal(key={"ekus": "server_auth"}), "key.ekus"),
    ("bad RA policy", minimal(issuance={"ra_signatures": 1, "ra_policy": "agent"}),
     "issuance.ra_policy"),
    ("too many RA signatures", minimal(issuance={"ra_signatures": 6}), "issuance.ra_signatures"),
    ("manager_approval not a bool", minimal(issuance={"manager_approval": "yes"}),
     "issuance.manager_approval"),
    ("encryption purpose without key_encipherment",
     minimal(purpose="encryption", key={"usage": ["digital_signature"]}), "key.usage"),
    ("both purpose without key_encipherment",
     minimal(purpose="both", key={"usage": ["digital_signature", "data_encipherment"]}),
     "key.usage"),
    ("bad subject source", minimal(subject={"source": "csr"}), "subject.source"),
    ("bad IP range", minimal(names={"ip_ranges": ["10.0.0.0/33"]}), "names.ip_ranges"),
    ("names.max too large", minimal(names={"max": 101}), "names.max"),
    ("bad old_certificate", minimal(handling={"old_certificate": "keep"}),
     "handling.old_certificate"),
    ("permission names both", minimal(permissions=[
        {"principal": "a", "group": "g", "rights": ["read"]}]), "permissions[0]"),
    ("permission names neither", minimal(permissions=[{"rights": ["read"]}]), "permissions[0]"),
    ("permission with a bad principal", minimal(permissions=[
        {"principal": "not valid", "rights": ["read"]}]), "permissions[0]"),
    ("unknown right", minimal(permissions=[
        {"group": "g", "rights": ["read"]}, {"group": "h", "rights": ["issue"]}]),
     "permissions[1].rights"),
    ("permissions not a list", minimal(permissions={"group": "g"}), "permissions"),
    ("template supersedes itself", minimal(supersedes=["other", "t"]), "supersedes"),
]


@pytest.mark.parametrize(("document", "setting"), [(d, s) for _, d, s in INVALID],
                         ids=[label for label, _, _ in INVALID])
def test_invalid_templates_are_refused_naming_the_setting(
    document: dict[str, Any], setting: str
) -> None:
    error = refused(document)
    assert error.reason is Reason.INVALID_TEMPLATE
    assert setting in error.detail, error.detail


@pytest.mark.parametrize("key", ["validity", "renewal_period"])
@pytest.mark.parametrize("value", ["30", "3q", "1d-2h", "", "0d", "d", "12 parsecs"])
def test_bad_durations_are_refused_naming_the_setting(key: str, value: str) -> None:
    error = refused(minimal(**{key: value}))
    # A bad duration is a bad template: the same reason as every other bad setting.
    assert error.reason is Reason.INVALID_TEMPLATE
    assert key in error.detail, error.detail


def test_unknown_keys_in_the_examples_are_refused() -> None:
    """Strictness applies to a real file too: one typo anywhere is an error."""
    for name in EXAMPLE_NAMES:
        doc = example_document(name)
        for table in ("key", "subject"):
            bad = copy.deepcopy(doc)
            bad.setdefault(table, {})["tpyo"] = True
            error = refused(bad)
            assert error.reason is Reason.INVALID_TEMPLATE
            assert f"{table}.tpyo" in error.detail


def test_invalid_toml_text_is_refused() -> None:
    with pytest.raises(Refusal) as info:
        parse_template_toml('name = "t"\nvalidity = ', default_oid=DEFAULT_OID)
    assert info.value.reason is Reason.INVALID_TEMPLATE


def test_document_of_a_refused_setting_never_reaches_a_template() -> None:
    """A valid document stays valid after the round trip; a mutated one is refused again."""
    doc = example("webserver").document()
    doc["names"]["ip_ranges"].append("not-a-network")
    error = refused(doc)
    assert "names.ip_ranges" in error.detail
