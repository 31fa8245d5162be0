"""Subject attributes: their names, the rules every value obeys, and how an issued subject is built.

Templates name attributes by their RFC 4514 short names (``CN``, ``O``, ``C``...) or by a dotted
OID. Whatever a template allows, a value must be text, non-empty, within its upper bound (X.520 /
RFC 5280 appendix A), free of control characters, and encodable the way the issued certificate
encodes it: ``C``, ``serialNumber`` and ``dnQualifier`` as PrintableString, ``emailAddress`` and
``DC`` as IA5String, everything else as UTF8String. The issued subject is rebuilt from the values
(:func:`rebuild`), so the string types a CSR chose never reach a certificate. Pure.
"""

from __future__ import annotations

import dataclasses
import re
import unicodedata
from typing import Literal

from cryptography import x509
from cryptography.x509.oid import NameOID

Charset = Literal["utf8", "printable", "ia5"]
_PRINTABLE = re.compile(r"^[A-Za-z0-9 '()+,\-./:=?]*\Z")
_COUNTRY = re.compile(r"^[A-Z]{2}\Z")
_OID = re.compile(r"^[0-2](\.(0|[1-9][0-9]*))+\Z")
# Characters that are not text: C0 and C1 controls and DEL (Cc), format characters such as the
# bidirectional overrides and zero-width joiners (Cf), the line and paragraph separators U+2028
# and U+2029 (Zl, Zp), and lone surrogates (Cs).
_NOT_TEXT = frozenset({"Cc", "Cf", "Zl", "Zp", "Cs"})


@dataclasses.dataclass(frozen=True)
class Attribute:
    """One kind of subject attribute: how templates name it and what its values may be."""

    label: str  # the RFC 4514 short name, or the dotted OID when there is none
    oid: x509.ObjectIdentifier
    max_length: int
    charset: Charset = "utf8"


KNOWN: tuple[Attribute, ...] = (
    Attribute("CN", NameOID.COMMON_NAME, 64),
    Attribute("O", NameOID.ORGANIZATION_NAME, 64),
    Attribute("OU", NameOID.ORGANIZATIONAL_UNIT_NAME, 64),
    Attribute("C", NameOID.COUNTRY_NAME, 2, "printable"),
    Attribute("ST", NameOID.STATE_OR_PROVINCE_NAME, 128),
    Attribute("L", NameOID.LOCALITY_NAME, 128),
    Attribute("street", NameOID.STREET_ADDRESS, 128),
    Attribute("postalCode", NameOID.POSTAL_CODE, 40),
    Attribute("serialNumber", NameOID.SERIAL_NUMBER, 64, "printable"),
    Attribute("dnQualifier", NameOID.DN_QUALIFIER, 64, "printable"),
    Attribute("title", NameOID.TITLE, 64),
    Attribute("GN", NameOID.GIVEN_NAME, 64),
    Attribute("SN", NameOID.SURNAME, 64),
    Attribute("pseudonym", NameOID.PSEUDONYM, 128),
    Attribute("UID", NameOID.USER_ID, 64),
    Attribute("DC", NameOID.DOMAIN_COMPONENT, 63, "ia5"),
    Attribute("emailAddress", NameOID.EMAIL_ADDRESS, 255, "ia5"),
)
_BY_LABEL = {a.label.lower(): a for a in KNOWN}
_BY_OID = {a.oid: a for a in KNOWN}
EMAIL_ADDRESS = _BY_OID[NameOID.EMAIL_ADDRESS]
COMMON_NAME = _BY_OID[NameOID.COMMON_NAME]
COUNTRY = _BY_OID[NameOID.COUNTRY_NAME]


def attribute_named(name: str) -> Attribute | None:
    """The attribute a template names (short name, any case, or dotted OID); None when unknown."""
    known = _BY_LABEL.get(name.lower())
    if known is not None:
        return known
    if _OID.match(name):
        oid = x509.ObjectIdentifier(name)
        return _BY_OID.get(oid, Attribute(name, oid, 64))
    return None


def attribute_of(oid: x509.ObjectIdentifier) -> Attribute:
    """The kind of attribute an OID is; an unknown OID is labelled by its dotted form."""
    return _BY_OID.get(oid, Attribute(oid.dotted_string, oid, 64))


def not_text(value: str) -> str | None:
    """The first character of ``value`` that is not text (a control, format or separator
    character), as ``U+XXXX``; None when there is none."""
    if value.isascii() and value.isprintable():
        # The common case, decided in C: the only ASCII characters that are not text are the
        # C0 controls and DEL, exactly the ASCII characters ``isprintable`` refuses.
        return None
    for char in value:
        if unicodedata.category(char) in _NOT_TEXT:
            return f"U+{ord(char):04X}"
    return None


def value_problem(attribute: Attribute, value: object) -> str | None:
    """Why ``value`` cannot be this attribute's value in a certificate; None when it can."""
    if not isinstance(value, str):
        return "is not a text value"
    if not value:
        return "is empty"
    bad = not_text(value)
    if bad is not None:
        return f"contains the control character {bad}"
    if attribute.oid == NameOID.COUNTRY_NAME:
        if not _COUNTRY.match(value):
            return "must be two upper-case letters (an ISO 3166-1 alpha-2 code such as DE)"
        return None
    if len(value) > attribute.max_length:
        return f"is longer than {attribute.max_length} characters"
    if attribute.charset == "printable" and not _PRINTABLE.match(value):
        return "has characters a PrintableString cannot hold"
    if attribute.charset == "ia5" and not value.isascii():
        return "has characters outside ASCII"
    return None


def rebuild(rdns: list[list[tuple[x509.ObjectIdentifier, str]]]) -> x509.Name:
    """A subject of these RDNs, each value encoded as its attribute is in certificates (the
    library's standard string type per attribute), not as the request encoded it."""
    return x509.Name([
        x509.RelativeDistinguishedName([x509.NameAttribute(oid, value) for oid, value in rdn])
        for rdn in rdns
    ])
