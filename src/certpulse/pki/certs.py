"""Loading, naming and fingerprinting certificates and CSRs."""

from __future__ import annotations

import base64
import datetime as dt
import re

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from certpulse.errors import Reason, Refusal

_PEM_CSR = re.compile(rb"-----BEGIN (NEW )?CERTIFICATE REQUEST-----")
_PEM_CERT = b"-----BEGIN CERTIFICATE-----"
_BASE64 = re.compile(rb"[A-Za-z0-9+/=\s]+")


def load_csr(data: bytes) -> x509.CertificateSigningRequest:
    """Parse a PKCS#10 request in PEM (either header), base64 DER or DER; refuse anything else."""
    try:
        if _PEM_CSR.search(data):
            return x509.load_pem_x509_csr(data)
        if _BASE64.fullmatch(data):
            data = base64.b64decode(b"".join(data.split()))
        return x509.load_der_x509_csr(data)
    except (ValueError, x509.InvalidVersion) as exc:  # InvalidVersion is no ValueError
        raise Refusal(Reason.MALFORMED_CSR, f"not a parseable PKCS#10 request: {exc}") from None


def load_certificate(data: bytes) -> x509.Certificate:
    try:
        if _PEM_CERT in data:
            return x509.load_pem_x509_certificate(data)
        return x509.load_der_x509_certificate(data)
    except (ValueError, x509.InvalidVersion) as exc:  # InvalidVersion is no ValueError
        raise Refusal(Reason.MALFORMED_REQUEST, f"not a parseable certificate: {exc}") from None


def pem(cert: x509.Certificate) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode("ascii")


def der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


def thumbprint(cert: x509.Certificate) -> str:
    """SHA-1 of the DER, upper-case hex, as Windows shows certificate thumbprints."""
    return cert.fingerprint(hashes.SHA1()).hex().upper()  # noqa: S303 - an identifier, not a security check


def normalize_thumbprint(text: str) -> str:
    """A thumbprint (or a prefix of one) as :func:`thumbprint` writes it, however a person typed
    it: upper case, without the colons or spaces some tools put between the bytes. Not checked:
    callers say what they accept (a whole SHA-1, or any prefix)."""
    return text.strip().upper().replace(":", "").replace(" ", "")


def sha256_thumbprint(cert: x509.Certificate) -> str:
    return cert.fingerprint(hashes.SHA256()).hex().upper()


def serial_hex(serial: int) -> str:
    """Canonical text form of a serial number: lower-case hex, no leading zeros."""
    return format(serial, "x")


MAX_SERIAL_HEX = 40  # RFC 5280 4.1.2.2: at most 20 octets


def parse_serial(text: str) -> int:
    """A serial number typed as hex (``0x`` and colons allowed), at most 40 hex digits; anything
    else is refused with a short quotation of it (a path can be long and hostile)."""
    cleaned = text.strip().lower().replace(":", "").removeprefix("0x")
    if not cleaned or not re.fullmatch(rf"[0-9a-f]{{1,{MAX_SERIAL_HEX}}}", cleaned):
        shown = repr(text[:48]) + ("..." if len(text) > 48 else "")
        raise Refusal(Reason.INVALID_ARGUMENT,
                      f"{shown} is not a serial number (at most {MAX_SERIAL_HEX} hexadecimal digits)")
    return int(cleaned, 16)


def not_before(cert: x509.Certificate) -> dt.datetime:
    return cert.not_valid_before_utc


def not_after(cert: x509.Certificate) -> dt.datetime:
    return cert.not_valid_after_utc


def subject_names(cert: x509.Certificate) -> list[str]:
    """The names a person would recognise: the subject CN first, then every SAN value."""
    names: list[str] = [
        str(attr.value) for attr in cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
    ]
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return names
    for general_name in san:
        value = str(general_name.value)
        if value not in names:
            names.append(value)
    return names
