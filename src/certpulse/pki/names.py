"""Subject alternative names: what a request asks for, and whether a rule set allows it."""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import re

from cryptography import x509

from certpulse.errors import Reason, Refusal
from certpulse.pki.subject import attribute_of, not_text

_LABEL = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)\Z")


@dataclasses.dataclass(frozen=True)
class RequestedNames:
    """The names a request carries, by kind, in the order they were given."""

    dns: tuple[str, ...] = ()
    ip: tuple[str, ...] = ()
    email: tuple[str, ...] = ()
    uri: tuple[str, ...] = ()

    def all(self) -> tuple[str, ...]:
        return (*self.dns, *self.ip, *self.email, *self.uri)


def csr_sans(csr: x509.CertificateSigningRequest) -> list[x509.GeneralName]:
    """The CSR's subject alternative names as parsed, refusing what no certificate may hold: an
    unreadable extension, or an IP address that is not 4 or 16 bytes (the library reads 8 and
    32 bytes as a network, which only name constraints may carry, RFC 5280 4.2.1.10)."""
    try:
        ext = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    except (ValueError, x509.DuplicateExtension) as exc:
        raise Refusal(Reason.MALFORMED_CSR, f"unreadable extensions in the CSR: {exc}") from None
    names = list(ext)
    for name in names:
        if isinstance(name, x509.IPAddress) and not isinstance(
                name.value, ipaddress.IPv4Address | ipaddress.IPv6Address):
            raise Refusal(Reason.MALFORMED_CSR, "an IP address SAN must be 4 or 16 bytes long")
    return names


def control_character_in(subject: x509.Name, sans: list[x509.GeneralName]) -> str | None:
    """Where a name holds a control character (C0, C1, DEL, format characters such as bidi
    overrides, U+2028/U+2029), as a phrase for a refusal; None when no name does. Every subject
    attribute and every textual SAN is looked at, whatever the template will make of them."""
    for attr in subject:
        if isinstance(attr.value, str) and (bad := not_text(attr.value)):
            return f"the subject attribute {attribute_of(attr.oid).label} holds the control character {bad}"
    for name in sans:
        if isinstance(name, x509.DNSName | x509.RFC822Name | x509.UniformResourceIdentifier):
            if bad := not_text(name.value):
                return f"the {_KIND[type(name)]} SAN {name.value!r} holds the control character {bad}"
        elif isinstance(name, x509.DirectoryName) and (inner := control_character_in(name.value, [])):
            return f"a directoryName SAN: {inner}"
    return None


_KIND: dict[type, str] = {x509.DNSName: "DNS", x509.RFC822Name: "e-mail", x509.UniformResourceIdentifier: "URI"}


def requested_names(csr: x509.CertificateSigningRequest) -> RequestedNames:
    """The SANs a CSR asks for; unsupported name kinds are refused, not silently dropped."""
    return names_of_sans(csr_sans(csr))


def names_of_sans(sans: list[x509.GeneralName]) -> RequestedNames:
    """The names of these SANs, by kind; kinds certpulse never issues are refused."""
    ext = sans
    dns: list[str] = []
    ips: list[str] = []
    emails: list[str] = []
    uris: list[str] = []
    for name in ext:
        if isinstance(name, x509.DNSName):
            dns.append(name.value.lower())
        elif isinstance(name, x509.IPAddress):
            ips.append(str(name.value))
        elif isinstance(name, x509.RFC822Name):
            emails.append(name.value)
        elif isinstance(name, x509.UniformResourceIdentifier):
            uris.append(name.value)
        else:
            raise Refusal(
                Reason.NAME_NOT_ALLOWED, f"subject alternative names of kind {type(name).__name__} are not allowed"
            )
    return RequestedNames(tuple(dns), tuple(ips), tuple(emails), tuple(uris))


def is_hostname(name: str, *, allow_wildcard: bool) -> bool:
    """A syntactically valid DNS name (LDH labels), optionally with one leading ``*.`` label."""
    if len(name) > 253 or not name:
        return False
    labels = name.split(".")
    if labels[0] == "*" and allow_wildcard:
        labels = labels[1:]
        if len(labels) < 2:
            return False
    return all(_LABEL.match(label) for label in labels)


def dns_name_matches(name: str, allowed: tuple[str, ...]) -> bool:
    """``allowed`` holds exact names, ``.suffix`` entries (any name below) or ``*`` (any name)."""
    bare = name.removeprefix("*.")
    for rule in allowed:
        if rule == "*" or name == rule:
            return True
        if rule.startswith(".") and bare.endswith(rule) and bare != rule[1:]:
            return True
        if rule.startswith(".") and name.startswith("*.") and bare == rule[1:]:
            return True
    return False


def ip_in_ranges(value: str, ranges: tuple[str, ...]) -> bool:
    address = ipaddress.ip_address(value)
    return any(address in ipaddress.ip_network(net, strict=False) for net in ranges)


def to_general_names(names: RequestedNames) -> list[x509.GeneralName]:
    result: list[x509.GeneralName] = [x509.DNSName(n) for n in names.dns]
    result += [x509.IPAddress(ipaddress.ip_address(n)) for n in names.ip]
    result += [x509.RFC822Name(n) for n in names.email]
    result += [x509.UniformResourceIdentifier(n) for n in names.uri]
    return result


def names_to_json(names: RequestedNames) -> str:
    """Names by kind, so they can be read back without guessing which kind a value was."""
    kinds = (("dns", names.dns), ("ip", names.ip), ("email", names.email), ("uri", names.uri))
    return json.dumps({k: list(v) for k, v in kinds if v})  # field order, as dataclasses.asdict gave it


def names_from_json(text: str) -> RequestedNames:
    data = json.loads(text)
    return RequestedNames(**{k: tuple(data.get(k, ())) for k in ("dns", "ip", "email", "uri")})
