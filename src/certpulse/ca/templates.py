"""Certificate templates: every server-side setting of the seeds, read from TOML.

A template is immutable once parsed. The TOML document is the source of truth an operator
edits; :func:`parse_template` validates it strictly (unknown keys are errors, so a typo
never silently changes policy) and :meth:`Template.document` gives it back in canonical form.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import ipaddress
import re
import tomllib
from collections.abc import Iterable, Mapping
from typing import Any, Literal

from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from certpulse.durations import format_duration, parse_duration
from certpulse.errors import Reason, Refusal
from certpulse.pki.keys import CURVES, KEY_SPECS
from certpulse.pki.names import is_hostname
from certpulse.pki.subject import COMMON_NAME, COUNTRY, Attribute, attribute_named, value_problem

RIGHTS = ("read", "enroll", "autoenroll")
KEY_USAGES = (
    "digital_signature",
    "content_commitment",
    "key_encipherment",
    "data_encipherment",
    "key_agreement",
)
EKU_NAMES: dict[str, str] = {
    "server_auth": ExtendedKeyUsageOID.SERVER_AUTH.dotted_string,
    "client_auth": ExtendedKeyUsageOID.CLIENT_AUTH.dotted_string,
    "code_signing": ExtendedKeyUsageOID.CODE_SIGNING.dotted_string,
    "email_protection": ExtendedKeyUsageOID.EMAIL_PROTECTION.dotted_string,
    "time_stamping": ExtendedKeyUsageOID.TIME_STAMPING.dotted_string,
    "ocsp_signing": ExtendedKeyUsageOID.OCSP_SIGNING.dotted_string,
    "smartcard_logon": "1.3.6.1.4.1.311.20.2.2",
    "encrypting_file_system": "1.3.6.1.4.1.311.10.3.4",
    "certificate_request_agent": "1.3.6.1.4.1.311.20.2.1",
}
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}\Z")
_OID = re.compile(r"^[0-2](\.[0-9]+)+\Z")

Purpose = Literal["signature", "encryption", "both"]
SubjectSource = Literal["principal", "request"]
OldCertificate = Literal["archive", "delete"]
EmailLocalPart = Literal["any", "principal"]


@dataclasses.dataclass(frozen=True)
class Permission:
    """Rights of one principal or one group on a template."""

    principal: str | None
    group: str | None
    rights: frozenset[str]


@dataclasses.dataclass(frozen=True)
class SubjectRules:
    """Which subject attributes a request may set, and with what values (when the subject comes
    from the request). By default only the common name, as Boulder and step-ca do."""

    allowed: tuple[str, ...] = ("CN",)  # attribute labels (short names or dotted OIDs)
    values: tuple[tuple[str, tuple[str, ...]], ...] = ()  # label -> the only values allowed
    repeatable: tuple[str, ...] = ()  # labels that may appear more than once
    multi_valued_rdns: bool = False  # RDNs such as CN=a+O=b

    def values_of(self, label: str) -> tuple[str, ...] | None:
        return dict(self.values).get(label)


@dataclasses.dataclass(frozen=True)
class NameRules:
    """Which subject alternative names a request may carry (when names come from the request)."""

    dns: tuple[str, ...] = ()
    wildcard: bool = False
    ip: bool = False
    ip_ranges: tuple[str, ...] = ()
    email: tuple[str, ...] = ()  # allowed e-mail domains: exact, ".suffix" (below it) or "*"
    email_local_part: EmailLocalPart = "any"  # "principal": the local part is the principal's name
    max: int = 10


@dataclasses.dataclass(frozen=True)
class Template:
    name: str
    display_name: str
    oid: str
    schema_version: int
    major_version: int
    minor_version: int
    validity: dt.timedelta
    renewal_period: dt.timedelta
    purpose: Purpose
    key_types: tuple[str, ...]
    default_key_type: str
    key_usage: tuple[str, ...]
    ekus: tuple[str, ...]
    archive_private_key: bool
    subject_source: SubjectSource
    renewal_subject_from_existing: bool
    subject_rules: SubjectRules
    names: NameRules
    manager_approval: bool
    ra_signatures: int
    ra_policy: str | None
    supersedes: tuple[str, ...]
    old_certificate: OldCertificate
    user_interaction: bool
    check_directory: bool
    permissions: tuple[Permission, ...]
    # Whether certificates point at the issuer's CRL (CRL distribution point) and at its OCSP
    # responder and certificate (authority information access). Only when the CA has a public
    # URL (ca.toml ``public_url``); off for certificates whose relying parties never check, or
    # check another way (a closed system with its own CRL distribution).
    crl_distribution_point: bool = True
    authority_information_access: bool = True
    # ACME (``[acme] trust_registered_names``): an order's identifier that is the principal's own
    # registered name (a machine principal's name as a DNS name) gets an authorization that is
    # valid without a challenge; the CA already knows that machine (the autoenrollment case).
    # Off by default: with it on, whoever holds the principal's EAB key gets its name unproven.
    trust_registered_names: bool = False

    @property
    def version(self) -> str:
        return f"{self.major_version}.{self.minor_version}"

    def rights_of(self, principal: str, groups: Iterable[str]) -> frozenset[str]:
        """The union of rights granted to ``principal`` directly and through ``groups``."""
        member_of = set(groups)
        rights: set[str] = set()
        for perm in self.permissions:
            if perm.principal == principal or (perm.group is not None and perm.group in member_of):
                rights |= perm.rights
        return frozenset(rights)

    def with_versions(self, major: int, minor: int) -> Template:
        return dataclasses.replace(self, major_version=major, minor_version=minor)

    def document(self) -> dict[str, Any]:
        """The canonical TOML-shaped document of this template (round-trips through parse)."""
        doc: dict[str, Any] = {
            "name": self.name,
            "display_name": self.display_name,
            "oid": self.oid,
            "schema_version": self.schema_version,
            "major_version": self.major_version,
            "minor_version": self.minor_version,
            "validity": format_duration(self.validity),
            "renewal_period": format_duration(self.renewal_period),
            "purpose": self.purpose,
            "supersedes": list(self.supersedes),
            "crl_distribution_point": self.crl_distribution_point,
            "authority_information_access": self.authority_information_access,
            "key": {
                "types": list(self.key_types),
                "default": self.default_key_type,
                "usage": list(self.key_usage),
                "ekus": list(self.ekus),
                "archive": self.archive_private_key,
            },
            "subject": {
                "source": self.subject_source,
                "use_existing_for_renewal": self.renewal_subject_from_existing,
                "allowed_attributes": list(self.subject_rules.allowed),
                "repeatable_attributes": list(self.subject_rules.repeatable),
                "multi_valued_rdns": self.subject_rules.multi_valued_rdns,
                "values": {label: list(values) for label, values in self.subject_rules.values},
            },
            "names": {
                "dns": list(self.names.dns),
                "wildcard": self.names.wildcard,
                "ip": self.names.ip,
                "ip_ranges": list(self.names.ip_ranges),
                "email": list(self.names.email),
                "email_local_part": self.names.email_local_part,
                "max": self.names.max,
            },
            "issuance": {
                "manager_approval": self.manager_approval,
                "ra_signatures": self.ra_signatures,
                "ra_policy": self.ra_policy or "",
            },
            "handling": {
                "old_certificate": self.old_certificate,
                "user_interaction": self.user_interaction,
                "check_directory": self.check_directory,
            },
            "acme": {"trust_registered_names": self.trust_registered_names},
            "permissions": [
                {
                    **({"principal": p.principal} if p.principal else {"group": p.group}),
                    "rights": sorted(p.rights, key=RIGHTS.index),
                }
                for p in self.permissions
            ],
        }
        return doc

    def key_usage_extension(self) -> x509.KeyUsage:
        chosen = set(self.key_usage)
        return x509.KeyUsage(
            digital_signature="digital_signature" in chosen,
            content_commitment="content_commitment" in chosen,
            key_encipherment="key_encipherment" in chosen,
            data_encipherment="data_encipherment" in chosen,
            key_agreement="key_agreement" in chosen,
            key_cert_sign=False,
            crl_sign=False,
            encipher_only=False,
            decipher_only=False,
        )


class _Reader:
    """Reads one table of the document, remembering the path for error messages."""

    def __init__(self, table: Mapping[str, Any], path: str) -> None:
        if not isinstance(table, Mapping):
            raise _invalid(path, "must be a table")
        self.table = table
        self.path = path
        self.seen: set[str] = set()

    def _get(self, key: str, default: Any) -> Any:
        self.seen.add(key)
        return self.table.get(key, default)

    def where(self, key: str) -> str:
        return f"{self.path}{key}" if not self.path else f"{self.path}.{key}"

    def string(self, key: str, default: str | None = None) -> str:
        value = self._get(key, default)
        if not isinstance(value, str):
            raise _invalid(self.where(key), "must be a string" if value is not None else "is required")
        return value

    def boolean(self, key: str, default: bool) -> bool:
        value = self._get(key, default)
        if not isinstance(value, bool):
            raise _invalid(self.where(key), "must be true or false")
        return value

    def integer(self, key: str, default: int, low: int, high: int) -> int:
        value = self._get(key, default)
        if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
            raise _invalid(self.where(key), f"must be a whole number from {low} to {high}")
        return value

    def strings(self, key: str, default: tuple[str, ...] = ()) -> tuple[str, ...]:
        value = self._get(key, list(default))
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise _invalid(self.where(key), "must be a list of strings")
        return tuple(value)

    def choice(self, key: str, default: str, options: tuple[str, ...]) -> str:
        value = self.string(key, default)
        if value not in options:
            raise _invalid(self.where(key), f"must be one of {', '.join(options)} (got {value!r})")
        return value

    def duration(self, key: str, default: str | None = None) -> dt.timedelta:
        text = self.string(key, default)
        try:
            return parse_duration(text)
        except Refusal as exc:
            raise _invalid(self.where(key), f"is not a valid duration: {exc.detail}") from None

    def sub(self, key: str) -> _Reader:
        return _Reader(self._get(key, {}), self.where(key))

    def done(self) -> None:
        unknown = sorted(set(self.table) - self.seen)
        if unknown:
            raise _invalid(self.where(unknown[0]), "is not a template setting")


def _invalid(path: str, message: str) -> Refusal:
    return Refusal(Reason.INVALID_TEMPLATE, f"{path or 'template'} {message}")


def _eku(value: str, path: str) -> str:
    if value in EKU_NAMES:
        return EKU_NAMES[value]
    if _OID.match(value):
        return value
    raise _invalid(path, f"has unknown extended key usage {value!r}")


def _attribute(name: str, path: str) -> Attribute:
    attribute = attribute_named(name)
    if attribute is None:
        raise _invalid(path, f"names an unknown attribute {name!r} (use a short name such as CN, O, OU, C, "
                       "ST, L, serialNumber, or a dotted OID)")
    return attribute


def _subject_rules(subject: _Reader) -> SubjectRules:
    """``[subject]``: allowed_attributes, repeatable_attributes, multi_valued_rdns and the
    ``[subject.values]`` table (attribute -> list of the only values allowed)."""
    where = subject.where("allowed_attributes")
    allowed = tuple(dict.fromkeys(_attribute(a, where).label for a in subject.strings("allowed_attributes",
                                                                                        ("CN",))))
    where = subject.where("repeatable_attributes")
    repeatable = tuple(dict.fromkeys(_attribute(a, where).label for a in subject.strings("repeatable_attributes")))
    for label in repeatable:
        if label in (COMMON_NAME.label, COUNTRY.label):
            raise _invalid(where, f"cannot make {label} repeatable: a subject has one")
        if label not in allowed:
            raise _invalid(where, f"names {label}, which allowed_attributes does not allow")
    multi_valued = subject.boolean("multi_valued_rdns", False)
    values_reader = subject.sub("values")
    values: list[tuple[str, tuple[str, ...]]] = []
    for key in sorted(values_reader.table):
        attribute = _attribute(key, values_reader.where(key))
        if attribute.label not in allowed:
            raise _invalid(values_reader.where(key), f"gives values for {attribute.label}, which "
                           "allowed_attributes does not allow")
        if any(label == attribute.label for label, _ in values):
            raise _invalid(values_reader.where(key), f"repeats the attribute {attribute.label}")
        listed = values_reader.strings(key)
        if not listed:
            raise _invalid(values_reader.where(key), "must list at least one value (or leave the attribute out)")
        for value in listed:
            problem = value_problem(attribute, value)
            if problem is not None:
                raise _invalid(values_reader.where(key), f"value {value!r} {problem}")
        values.append((attribute.label, listed))
    values_reader.done()
    return SubjectRules(allowed=allowed, values=tuple(values), repeatable=repeatable,
                        multi_valued_rdns=multi_valued)


def _email_domains(names: _Reader) -> tuple[str, ...]:
    """``names.email``: the domains e-mail SANs may use, as ``dns`` rules are written (exact,
    ``.suffix`` for any domain below, ``*`` for any). ``true``/``false`` are read as ``["*"]`` and
    ``[]``, as templates written before the list existed said it."""
    where = names.where("email")
    raw = names.table.get("email", [])
    if isinstance(raw, bool):
        names.seen.add("email")
        return ("*",) if raw else ()
    rules = tuple(dict.fromkeys(r.lower() for r in names.strings("email")))
    for rule in rules:
        if rule != "*" and not is_hostname(rule.removeprefix("."), allow_wildcard=False):
            raise _invalid(where, f"has {rule!r}, which is neither a domain, '.domain' nor '*'")
    return rules


def parse_template_toml(text: str, *, default_oid: str) -> Template:
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise Refusal(Reason.INVALID_TEMPLATE, f"not valid TOML: {exc}") from None
    return parse_template(document, default_oid=default_oid)


def parse_template(document: Mapping[str, Any], *, default_oid: str) -> Template:
    """Validate a template document; raise :class:`Refusal` naming the first bad setting."""
    top = _Reader(document, "")
    name = top.string("name")
    if not _NAME.match(name):
        raise _invalid("name", "must be 1-64 letters, digits, '.', '_' or '-'")
    display_name = top.string("display_name", name)
    oid = top.string("oid", default_oid)
    if not _OID.match(oid):
        raise _invalid("oid", f"is not a dotted object identifier ({oid!r})")
    schema_version = top.integer("schema_version", 2, 1, 4)
    major = top.integer("major_version", 1, 0, 2**31 - 1)
    minor = top.integer("minor_version", 0, 0, 2**31 - 1)
    validity = top.duration("validity")
    renewal_period = top.duration("renewal_period", "6w")
    purpose = top.choice("purpose", "signature", ("signature", "encryption", "both"))
    supersedes = top.strings("supersedes")
    if name in supersedes:
        raise _invalid("supersedes", "cannot name the template itself")
    crl_distribution_point = top.boolean("crl_distribution_point", True)
    authority_information_access = top.boolean("authority_information_access", True)

    key = top.sub("key")
    key_types = key.strings("types", ("ec-p256", "ec-p384", "rsa"))
    for spec in key_types:
        if spec not in (*KEY_SPECS, "rsa", "ec"):
            raise _invalid("key.types", f"has unknown key type {spec!r}")
    if not key_types:
        raise _invalid("key.types", "must allow at least one key type")
    default_key = key.string("default", "ec-p256" if "ec-p256" in key_types or "ec" in key_types
                             else ("rsa-2048" if "rsa" in key_types else key_types[0]))
    if default_key not in KEY_SPECS:
        raise _invalid("key.default", f"must be a concrete key type such as ec-p256 ({default_key!r})")
    family_ok = (default_key in key_types or ("rsa" in key_types and default_key.startswith("rsa"))
                 or ("ec" in key_types and default_key in CURVES))
    if not family_ok:
        raise _invalid("key.default", "must be one of key.types")
    default_usage = ("digital_signature", "key_encipherment") if purpose != "signature" else (
        "digital_signature",)
    key_usage = key.strings("usage", default_usage)
    for usage in key_usage:
        if usage not in KEY_USAGES:
            raise _invalid("key.usage", f"has unknown key usage {usage!r}")
    if purpose in ("encryption", "both") and not {"key_encipherment", "key_agreement"} & set(key_usage):
        raise _invalid("key.usage", "of an encryption template must include key_encipherment "
                       "or key_agreement")
    ekus = tuple(_eku(e, "key.ekus") for e in key.strings("ekus", ("client_auth",)))
    archive_private_key = key.boolean("archive", False)
    key.done()

    subject = top.sub("subject")
    subject_source = subject.choice("source", "principal", ("principal", "request"))
    use_existing = subject.boolean("use_existing_for_renewal", False)
    subject_rules = _subject_rules(subject)
    subject.done()

    names_reader = top.sub("names")
    dns = tuple(n.lower() for n in names_reader.strings("dns"))
    ip_ranges = names_reader.strings("ip_ranges")
    for net in ip_ranges:
        try:
            ipaddress.ip_network(net, strict=False)
        except ValueError:
            raise _invalid("names.ip_ranges", f"has an invalid network {net!r}") from None
    names = NameRules(
        dns=dns,
        wildcard=names_reader.boolean("wildcard", False),
        ip=names_reader.boolean("ip", False),
        ip_ranges=ip_ranges,
        email=_email_domains(names_reader),
        email_local_part=names_reader.choice(  # type: ignore[arg-type]
            "email_local_part", "any", ("any", "principal")),
        max=names_reader.integer("max", 10, 0, 100),
    )
    names_reader.done()

    issuance = top.sub("issuance")
    manager_approval = issuance.boolean("manager_approval", False)
    ra_signatures = issuance.integer("ra_signatures", 0, 0, 5)
    ra_policy_text = issuance.string("ra_policy", "")
    ra_policy = _eku(ra_policy_text, "issuance.ra_policy") if ra_policy_text else None
    issuance.done()

    handling = top.sub("handling")
    old_certificate = handling.choice("old_certificate", "archive", ("archive", "delete"))
    user_interaction = handling.boolean("user_interaction", False)
    check_directory = handling.boolean("check_directory", False)
    handling.done()

    acme = top.sub("acme")
    trust_registered_names = acme.boolean("trust_registered_names", False)
    acme.done()

    raw_permissions = top._get("permissions", [])
    if not isinstance(raw_permissions, list):
        raise _invalid("permissions", "must be a list of tables ([[permissions]])")
    permissions: list[Permission] = []
    for index, raw in enumerate(raw_permissions):
        perm = _Reader(raw, f"permissions[{index}]")
        principal = perm._get("principal", None)
        group = perm._get("group", None)
        if (principal is None) == (group is None):
            raise _invalid(perm.path, "must name exactly one of principal or group")
        who = principal if principal is not None else group
        if not isinstance(who, str) or not _NAME.match(who):
            raise _invalid(perm.path, "names an invalid principal or group")
        rights = perm.strings("rights")
        for right in rights:
            if right not in RIGHTS:
                raise _invalid(perm.where("rights"), f"has unknown right {right!r}")
        perm.done()
        permissions.append(Permission(principal, group, frozenset(rights)))
    top.done()

    return Template(
        name=name,
        display_name=display_name,
        oid=oid,
        schema_version=schema_version,
        major_version=major,
        minor_version=minor,
        validity=validity,
        renewal_period=renewal_period,
        purpose=purpose,  # type: ignore[arg-type]
        key_types=key_types,
        default_key_type=default_key,
        key_usage=key_usage,
        ekus=ekus,
        archive_private_key=archive_private_key,
        subject_source=subject_source,  # type: ignore[arg-type]
        renewal_subject_from_existing=use_existing,
        subject_rules=subject_rules,
        names=names,
        manager_approval=manager_approval,
        ra_signatures=ra_signatures,
        ra_policy=ra_policy,
        supersedes=supersedes,
        old_certificate=old_certificate,  # type: ignore[arg-type]
        user_interaction=user_interaction,
        check_directory=check_directory,
        permissions=tuple(permissions),
        crl_distribution_point=crl_distribution_point,
        authority_information_access=authority_information_access,
        trust_registered_names=trust_registered_names,
    )
