"""Building certificates: CA certificates and end-entity certificates. Pure: no clock, no I/O.

The caller passes the validity window and the serial; this module only assembles extensions
and signs. End-entity extensions come from the template, never from the CSR.
"""

from __future__ import annotations

import datetime as dt
import secrets

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtensionOID, NameOID

from certpulse.pki.keys import PrivateKey, PublicKey

SERIAL_BITS = 159  # < 2**159 keeps the DER INTEGER within 20 octets, always positive
MIN_SERIAL = 2**64
KRA_EKU = x509.ObjectIdentifier("1.3.6.1.4.1.311.21.6")  # key recovery agent
KEY_USAGE = ExtensionOID.KEY_USAGE
SUBJECT_KEY_IDENTIFIER = ExtensionOID.SUBJECT_KEY_IDENTIFIER
AUTHORITY_KEY_IDENTIFIER = ExtensionOID.AUTHORITY_KEY_IDENTIFIER
EXTENDED_KEY_USAGE = ExtensionOID.EXTENDED_KEY_USAGE
SUBJECT_ALTERNATIVE_NAME = ExtensionOID.SUBJECT_ALTERNATIVE_NAME
_NOT_A_CA = x509.Extension(ExtensionOID.BASIC_CONSTRAINTS, True, x509.BasicConstraints(ca=False, path_length=None))


def random_serial() -> int:
    """A positive serial with at least 64 (in practice ~159) bits from the OS CSPRNG."""
    while True:
        serial = secrets.randbits(SERIAL_BITS)
        if serial >= MIN_SERIAL:
            return serial


def signature_hash(key: PrivateKey) -> hashes.SHA256 | hashes.SHA384 | hashes.SHA512:
    if isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.key_size > 256:
        return hashes.SHA384() if key.curve.key_size <= 384 else hashes.SHA512()
    return hashes.SHA256()


def simple_name(common_name: str, organization: str | None = None) -> x509.Name:
    attrs = [x509.NameAttribute(NameOID.COMMON_NAME, common_name)]
    if organization:
        attrs.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization))
    return x509.Name(attrs)


def inclusive_not_after(not_before: dt.datetime, validity: dt.timedelta) -> dt.datetime:
    """RFC 5280 validity is inclusive of notAfter: a 1-day certificate ends 1 second early."""
    return not_before + validity - dt.timedelta(seconds=1)


BACKDATE = dt.timedelta(minutes=10)  # notBefore lies this far before issuance (AD CS's default)
BACKDATE_SHARE = 100  # ... but never more than 1 % of the certificate's validity (whole seconds)


def backdated_start(now: dt.datetime, validity: dt.timedelta, *, floor: dt.datetime | None = None) -> dt.datetime:
    """The notBefore of a certificate issued at ``now`` with ``validity``: :data:`BACKDATE` earlier.

    A machine whose clock runs behind the CA's would otherwise hold a certificate that "has not
    started yet" for as long as it lags (and TLS peers behind the CA would refuse it). AD CS
    backdates 10 minutes, step-ca 1 minute, Boulder 1 hour; 10 minutes covers the drift that
    Kerberos (5 minutes) tolerates twice over. The backdate counts inside the validity (the
    caller computes notAfter from this start), so a certificate never lives longer than its
    template says; hence at most 1 % of a short validity, so that renewal at 80 % of the
    lifetime comes hardly sooner after issuance (a one-hour certificate is backdated 36 seconds;
    the agent copes with the rest of a skew itself). Never before ``floor`` (the issuer's own
    notBefore), and never after ``now``."""
    start = now - dt.timedelta(seconds=int(min(BACKDATE, validity / BACKDATE_SHARE).total_seconds()))
    if floor is not None:
        start = max(start, min(floor, now))
    return start


def _ca_key_usage() -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True, content_commitment=False, key_encipherment=False,
        data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
        encipher_only=False, decipher_only=False,
    )


def build_ca_certificate(
    *,
    subject: x509.Name,
    public_key: PublicKey,
    issuer_cert: x509.Certificate | None,
    signing_key: PrivateKey,
    not_before: dt.datetime,
    not_after: dt.datetime,
    path_length: int | None,
    extra: tuple[x509.ExtensionType, ...] = (),
) -> x509.Certificate:
    """A root (``issuer_cert`` None: self-signed) or a subordinate CA certificate; ``extra``
    non-critical extensions (a subordinate's CRL distribution point and AIA) come last."""
    ski = x509.SubjectKeyIdentifier.from_public_key(public_key)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer_cert.subject if issuer_cert else subject)
        .public_key(public_key)
        .serial_number(random_serial())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=path_length), critical=True)
        .add_extension(_ca_key_usage(), critical=True)
        .add_extension(ski, critical=False)
    )
    if issuer_cert is not None:
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_cert.public_key()),  # type: ignore[arg-type]
            critical=False,
        )
    for ext in extra:
        builder = builder.add_extension(ext, critical=False)
    return builder.sign(signing_key, signature_hash(signing_key))


def end_entity_builder(
    *,
    subject: x509.Name,
    public_key: PublicKey,
    issuer_cert: x509.Certificate,
    issuer_key: PrivateKey,
    not_before: dt.datetime,
    not_after: dt.datetime,
    sans: list[x509.GeneralName],
    key_usage: x509.KeyUsage,
    ekus: tuple[str, ...],
    extra: tuple[x509.ExtensionType, ...] = (),
    issuer_ski: x509.SubjectKeyIdentifier | None = None,
) -> x509.CertificateBuilder:
    """An end-entity certificate whose extensions all come from the caller (the template), but for
    its serial and signature: a CA assembles it before it has reserved the serial, then
    ``.serial_number(s).sign(key, signature_hash(key))`` (cryptography's builders are immutable)."""
    aki = (
        x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(issuer_ski)
        if issuer_ski is not None
        else x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key())
    )
    # The extensions are handed to the builder in one list: adding them one by one checks each
    # against all before it (quadratic, and a tenth of an issuance's Python calls with the CRL
    # distribution point and AIA). The one check that matters, no extension twice, is made here.
    extensions: list[x509.Extension[x509.ExtensionType]] = [
        _NOT_A_CA,
        x509.Extension(KEY_USAGE, True, key_usage),
        x509.Extension(SUBJECT_KEY_IDENTIFIER, False, x509.SubjectKeyIdentifier.from_public_key(public_key)),
        x509.Extension(AUTHORITY_KEY_IDENTIFIER, False, aki),
    ]
    if ekus:
        extensions.append(x509.Extension(EXTENDED_KEY_USAGE, False,
                                         x509.ExtendedKeyUsage([x509.ObjectIdentifier(e) for e in ekus])))
    if sans:
        # RFC 5280 4.2.1.6: critical when the subject is empty.
        extensions.append(x509.Extension(SUBJECT_ALTERNATIVE_NAME, len(subject) == 0,
                                         x509.SubjectAlternativeName(sans)))
    for ext in extra:
        extensions.append(x509.Extension(ext.oid, False, ext))
    if len({e.oid for e in extensions}) != len(extensions):
        raise ValueError("an extension appears twice")
    return (
        x509.CertificateBuilder(extensions=extensions)
        .subject_name(subject)
        .issuer_name(issuer_cert.subject)
        .public_key(public_key)
        .not_valid_before(not_before)
        .not_valid_after(not_after)
    )


def build_kra_certificate(
    *,
    subject: x509.Name,
    public_key: rsa.RSAPublicKey,
    issuer_cert: x509.Certificate,
    issuer_key: PrivateKey,
    not_before: dt.datetime,
    not_after: dt.datetime,
) -> x509.Certificate:
    """The key recovery agent's certificate: agents encrypt archived private keys to it."""
    usage = x509.KeyUsage(
        digital_signature=False, content_commitment=False, key_encipherment=True,
        data_encipherment=False, key_agreement=False, key_cert_sign=False, crl_sign=False,
        encipher_only=False, decipher_only=False,
    )
    builder = end_entity_builder(
        subject=subject, public_key=public_key, issuer_cert=issuer_cert, issuer_key=issuer_key,
        not_before=not_before, not_after=not_after, sans=[], key_usage=usage, ekus=(KRA_EKU.dotted_string,),
    )
    return builder.serial_number(random_serial()).sign(issuer_key, signature_hash(issuer_key))
