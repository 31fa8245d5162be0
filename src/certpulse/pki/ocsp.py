"""OCSP messages (RFC 6960): reading a request, building a response. Pure: no clock, no I/O.

The responder answers for one certificate per request, as RFC 5019 (the profile every TLS
client and nginx use) asks: a request listing several is a ``malformedRequest``, and so is
anything that does not parse or names a hash algorithm this module does not know (MD5 and
the like: a CertID we could not compute for our issuers matches nothing and proves nothing).

Responses name their responder by key hash (the shorter form, and the one RFC 5019
recommends), carry the delegated signer's certificate so that a client can verify them with
the issuer alone, and echo the request's nonce when it sent one. The unsuccessful answers
(``malformedRequest``, ``unauthorized``, ``internalError``, ``tryLater``) are unsigned, as the
RFC has them.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from typing import Literal

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509 import ocsp
from cryptography.x509.oid import ExtendedKeyUsageOID

from certpulse.pki.build import end_entity_builder, signature_hash, simple_name
from certpulse.pki.keys import PrivateKey, PublicKey

# The CertID hash algorithms a request may use (cryptography knows no others in OCSP).
# SHA-1 is what almost every client sends (RFC 5019 requires it); SHA-256 is RFC 6960's advice.
CERT_ID_HASHES: dict[str, type[hashes.HashAlgorithm]] = {
    "sha1": hashes.SHA1, "sha224": hashes.SHA224, "sha256": hashes.SHA256,
    "sha384": hashes.SHA384, "sha512": hashes.SHA512,
}
MAX_SERIAL_BITS = 160  # RFC 5280 4.1.2.2: serials are at most 20 octets (and this CA's are 159 bits)
MAX_NONCE_BYTES = 128  # RFC 8954 asks for 1 to 32; some clients send more, none sensibly this much

Failure = Literal["malformedRequest", "unauthorized", "internalError", "tryLater"]
_FAILURES: dict[Failure, ocsp.OCSPResponseStatus] = {
    "malformedRequest": ocsp.OCSPResponseStatus.MALFORMED_REQUEST,
    "unauthorized": ocsp.OCSPResponseStatus.UNAUTHORIZED,
    "internalError": ocsp.OCSPResponseStatus.INTERNAL_ERROR,
    "tryLater": ocsp.OCSPResponseStatus.TRY_LATER,
}


class MalformedRequest(ValueError):
    """The request is not one we can answer: the responder says ``malformedRequest``."""


@dataclasses.dataclass(frozen=True, slots=True)
class CertID:
    """Which certificate a request asks about: its issuer's name and key hashes, and its serial."""

    hash_name: str  # a key of CERT_ID_HASHES
    issuer_name_hash: bytes
    issuer_key_hash: bytes
    serial: int

    @property
    def issuer(self) -> tuple[str, bytes, bytes]:
        """The key an issuer is found by (:func:`issuer_keys`)."""
        return self.hash_name, self.issuer_name_hash, self.issuer_key_hash


@dataclasses.dataclass(frozen=True, slots=True)
class ParsedRequest:
    cert_id: CertID
    nonce: bytes | None


def parse_request(data: bytes) -> ParsedRequest:
    """The one CertID and the nonce of a DER OCSPRequest; :class:`MalformedRequest` otherwise."""
    try:
        request = ocsp.load_der_ocsp_request(data)  # refuses zero or several requests in one
        hash_name = request.hash_algorithm.name
        cert_id = CertID(hash_name, request.issuer_name_hash, request.issuer_key_hash, request.serial_number)
        extensions = request.extensions
    except UnsupportedAlgorithm:
        raise MalformedRequest("the CertID's hash algorithm is not supported") from None
    except NotImplementedError:  # cryptography's word for several requests in one
        raise MalformedRequest("one certificate per request") from None
    except ValueError as exc:  # not DER, truncated, trailing bytes, a duplicate extension...
        raise MalformedRequest(f"not an OCSP request with one certificate: {exc}") from None
    if hash_name not in CERT_ID_HASHES:
        raise MalformedRequest("the CertID's hash algorithm is not supported")
    if not 0 <= cert_id.serial < 1 << MAX_SERIAL_BITS:
        raise MalformedRequest("a serial number that is negative or longer than 20 octets (RFC 5280 4.1.2.2)")
    nonce: bytes | None = None
    for extension in extensions:
        if isinstance(extension.value, x509.OCSPNonce):
            nonce = extension.value.nonce
        elif extension.critical:
            raise MalformedRequest(f"unsupported critical extension {extension.oid.dotted_string}")
    if nonce is not None and not 0 < len(nonce) <= MAX_NONCE_BYTES:
        raise MalformedRequest(f"a nonce of {len(nonce)} bytes")
    return ParsedRequest(cert_id, nonce)


def public_key_bits(key: PublicKey) -> bytes:
    """The subjectPublicKey BIT STRING's content, which the CertID's issuerKeyHash hashes."""
    if isinstance(key, ec.EllipticCurvePublicKey):
        return key.public_bytes(serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint)
    if isinstance(key, rsa.RSAPublicKey):
        return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.PKCS1)
    raise TypeError(f"unsupported issuer key {type(key).__name__}")


def issuer_keys(issuer: x509.Certificate) -> list[tuple[str, bytes, bytes]]:
    """Every (hash name, issuer name hash, issuer key hash) a request may name ``issuer`` by."""
    name = issuer.subject.public_bytes()
    key = public_key_bits(issuer.public_key())  # type: ignore[arg-type]
    keys = []
    for hash_name, algorithm in CERT_ID_HASHES.items():
        keys.append((hash_name, _digest(algorithm(), name), _digest(algorithm(), key)))
    return keys


def _digest(algorithm: hashes.HashAlgorithm, data: bytes) -> bytes:
    h = hashes.Hash(algorithm)
    h.update(data)
    return h.finalize()


CertStatus = Literal["good", "revoked", "unknown"]


@dataclasses.dataclass(frozen=True, slots=True)
class SingleAnswer:
    """What the responder says about one certificate, and for how long."""

    status: CertStatus
    this_update: dt.datetime
    next_update: dt.datetime
    revoked_at: dt.datetime | None = None
    reason: str | None = None  # an RFC 5280 reason name as cryptography spells it; None: not given


@dataclasses.dataclass(frozen=True, slots=True)
class ResponseSigner:
    """A delegated OCSP signer: its certificate and key."""

    certificate: x509.Certificate
    key: PrivateKey


_STATUS = {"good": ocsp.OCSPCertStatus.GOOD, "revoked": ocsp.OCSPCertStatus.REVOKED,
           "unknown": ocsp.OCSPCertStatus.UNKNOWN}


def build_response(cert_id: CertID, answer: SingleAnswer, signer: ResponseSigner, nonce: bytes | None) -> bytes:
    """A signed, successful BasicOCSPResponse (DER) answering ``cert_id`` (with its own hash
    algorithm, as the client asked), by ``signer``, the nonce echoed when there is one."""
    revoked = answer.status == "revoked"
    reason = None
    if revoked and answer.reason is not None and answer.reason != x509.ReasonFlags.unspecified.value:
        reason = x509.ReasonFlags(answer.reason)  # "unspecified" is left out, as RFC 5280 5.3.1 asks of CRLs
    builder = ocsp.OCSPResponseBuilder().add_response_by_hash(
        issuer_name_hash=cert_id.issuer_name_hash, issuer_key_hash=cert_id.issuer_key_hash,
        serial_number=cert_id.serial, algorithm=CERT_ID_HASHES[cert_id.hash_name](),
        cert_status=_STATUS[answer.status], this_update=answer.this_update, next_update=answer.next_update,
        revocation_time=answer.revoked_at if revoked else None, revocation_reason=reason,
    ).responder_id(ocsp.OCSPResponderEncoding.HASH, signer.certificate).certificates([signer.certificate])
    if nonce is not None:
        builder = builder.add_extension(x509.OCSPNonce(nonce), critical=False)
    response = builder.sign(signer.key, signature_hash(signer.key))
    return response.public_bytes(serialization.Encoding.DER)


def unsuccessful(status: Failure) -> bytes:
    """The unsigned answer of a request the responder does not answer (DER)."""
    return ocsp.OCSPResponseBuilder.build_unsuccessful(_FAILURES[status]).public_bytes(serialization.Encoding.DER)


def ocsp_signer_builder(*, authority_name: str, public_key: PublicKey, issuer_cert: x509.Certificate,
                        issuer_key: PrivateKey, not_before: dt.datetime,
                        not_after: dt.datetime) -> x509.CertificateBuilder:
    """A delegated OCSP signing certificate (RFC 6960 4.2.2.2), but for its serial and signature:
    EKU id-kp-OCSPSigning (the one purpose, so the key signs nothing else a client would accept),
    id-pkix-ocsp-nocheck (a client need not ask about the responder's own certificate: its short
    life is the revocation), key usage digitalSignature."""
    usage = x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                          data_encipherment=False, key_agreement=False, key_cert_sign=False, crl_sign=False,
                          encipher_only=False, decipher_only=False)
    return end_entity_builder(
        subject=simple_name(f"{authority_name} OCSP responder"), public_key=public_key, issuer_cert=issuer_cert,
        issuer_key=issuer_key, not_before=not_before, not_after=not_after, sans=[], key_usage=usage,
        ekus=(ExtendedKeyUsageOID.OCSP_SIGNING.dotted_string,), extra=(x509.OCSPNoCheck(),))


__all__ = ["CERT_ID_HASHES", "CertID", "MalformedRequest", "ParsedRequest", "ResponseSigner", "SingleAnswer",
           "build_response", "issuer_keys", "ocsp_signer_builder", "parse_request", "unsuccessful"]
