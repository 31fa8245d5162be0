"""The certificate template information extension (Microsoft's szOID_CERTIFICATE_TEMPLATE).

AD CS writes the template's OID and major/minor version into every certificate it issues,
so a client can tell, from the certificate alone, which template and version it came from;
the agent compares that major version with the policy's to force re-enrollment. We write the
same structure under the same OID so tools that know it can read ours::

    CertificateTemplate ::= SEQUENCE {
        templateID              OBJECT IDENTIFIER,
        templateMajorVersion    INTEGER,
        templateMinorVersion    INTEGER OPTIONAL }
"""

from __future__ import annotations

import dataclasses
import uuid

from cryptography import x509
from cryptography.hazmat import asn1

TEMPLATE_INFO_OID = x509.ObjectIdentifier("1.3.6.1.4.1.311.21.7")


@asn1.sequence
class _CertificateTemplate:
    template_id: x509.ObjectIdentifier
    major: int
    minor: int | None


@dataclasses.dataclass(frozen=True)
class TemplateInfo:
    oid: str
    major: int
    minor: int


def new_template_oid() -> str:
    """A template OID nobody else will mint: the UUID arc ``2.25`` (ITU-T X.667)."""
    return f"2.25.{uuid.uuid4().int}"


def encode(info: TemplateInfo) -> x509.UnrecognizedExtension:
    value = asn1.encode_der(
        _CertificateTemplate(
            template_id=x509.ObjectIdentifier(info.oid), major=info.major, minor=info.minor
        )
    )
    return x509.UnrecognizedExtension(TEMPLATE_INFO_OID, value)


def decode(cert: x509.Certificate) -> TemplateInfo | None:
    """The template a certificate names, or None when it names none (or names it badly)."""
    try:
        ext = cert.extensions.get_extension_for_oid(TEMPLATE_INFO_OID).value
    except (x509.ExtensionNotFound, ValueError):  # ValueError: an extension is malformed
        return None
    if isinstance(ext, x509.MSCertificateTemplate):
        # cryptography parses this OID itself on certificates it loads.
        if ext.major_version is None:
            return None
        return TemplateInfo(
            oid=ext.template_id.dotted_string,
            major=ext.major_version,
            minor=ext.minor_version if ext.minor_version is not None else 0,
        )
    if not isinstance(ext, x509.UnrecognizedExtension):
        return None
    try:
        parsed = asn1.decode_der(_CertificateTemplate, ext.value)
    except ValueError:
        return None
    return TemplateInfo(
        oid=parsed.template_id.dotted_string,
        major=parsed.major,
        minor=parsed.minor if parsed.minor is not None else 0,
    )
