"""The ACME renewal information certificate identifier (RFC 9773 section 4.1). Pure.

A certificate is named by its issuer's key identifier (the keyIdentifier of its Authority Key
Identifier extension) and its serial number, each base64url-encoded without padding and joined
by a dot. The serial is the content octets of its DER INTEGER: big-endian two's complement, so a
positive serial whose top bit is set starts with a zero octet. Both halves come from the
network when a client asks, so decoding bounds them and refuses anything else.
"""

from __future__ import annotations

import base64
import binascii
import re

from cryptography import x509

from certpulse.errors import Reason, Refusal

MAX_KEY_ID_BYTES = 64  # SHA-1 (20) is usual; SHA-512 truncated to anything is at most 64
MAX_SERIAL_BYTES = 21  # RFC 5280: 20 octets, plus the zero octet a top-bit serial gets
_B64URL = re.compile(r"[A-Za-z0-9_-]+\Z")


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def serial_octets(serial: int) -> bytes:
    """The content octets of a positive serial's DER INTEGER."""
    if serial <= 0:
        raise ValueError("a certificate serial is positive")
    return serial.to_bytes(serial.bit_length() // 8 + 1, "big")


def encode(key_id: bytes, serial: int) -> str:
    return f"{_b64(key_id)}.{_b64(serial_octets(serial))}"


def certificate_id(cert: x509.Certificate) -> str:
    """The identifier of ``cert``: it must carry an Authority Key Identifier with a keyIdentifier."""
    try:
        aki = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    except x509.ExtensionNotFound:
        raise Refusal(Reason.MALFORMED_REQUEST, "the certificate has no authority key identifier") from None
    if aki.key_identifier is None:
        raise Refusal(Reason.MALFORMED_REQUEST, "the certificate's authority key identifier has no keyIdentifier")
    return encode(aki.key_identifier, cert.serial_number)


def _decode_part(text: str, what: str, limit: int) -> bytes:
    if not text or len(text) > (limit * 4 + 2) // 3 or not _B64URL.match(text):
        raise Refusal(Reason.MALFORMED_REQUEST, f"the certificate identifier's {what} is not unpadded base64url "
                                                f"of at most {limit} octets")
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        raise Refusal(Reason.MALFORMED_REQUEST, f"the certificate identifier's {what} is not base64url") from None


def decode(identifier: str) -> tuple[bytes, int]:
    """The key identifier and serial an identifier names; MALFORMED_REQUEST for anything that is
    not exactly two base64url parts, or whose serial is not a positive, minimally encoded INTEGER."""
    if not isinstance(identifier, str) or identifier.count(".") != 1:
        raise Refusal(Reason.MALFORMED_REQUEST, "a certificate identifier is base64url(key identifier) "
                                                "'.' base64url(serial)")
    key_text, serial_text = identifier.split(".")
    key_id = _decode_part(key_text, "key identifier", MAX_KEY_ID_BYTES)
    octets = _decode_part(serial_text, "serial", MAX_SERIAL_BYTES)
    serial = int.from_bytes(octets, "big", signed=True)
    if serial <= 0 or octets != serial_octets(serial):
        raise Refusal(Reason.MALFORMED_REQUEST, "the certificate identifier's serial is not a positive DER INTEGER")
    return key_id, serial
