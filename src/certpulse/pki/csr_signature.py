"""A CSR's signature: made with an accepted hash, and verifying with the CSR's own key. Pure.

Accepted hashes are SHA-256, SHA-384, SHA-512 and SHA3-256/384/512; everything else (MD2, MD4,
MD5, SHA-1, SHA-224, SHA-512/224...) is ``weak-signature-algorithm``, checked before the signature
itself (the library reports a SHA-1 signature as invalid, which would hide the reason). That holds
for PKCS#1 v1.5 RSA, ECDSA and RSASSA-PSS alike; a PSS signature must moreover use MGF1 with its
own digest, so a strong digest cannot come with a SHA-1 mask. EdDSA names no hash and passes here
(the key rules refuse its keys).
"""

from __future__ import annotations

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.x509.oid import SignatureAlgorithmOID

from certpulse.errors import Reason, Refusal

ACCEPTED_HASHES = frozenset({"sha256", "sha384", "sha512", "sha3-256", "sha3-384", "sha3-512"})
# Signature algorithms over hashes so old that the library no longer names them (RFC 8017 A.2.4)
UNNAMED_WEAK_SIGNATURES = {"1.2.840.113549.1.1.2": "md2", "1.2.840.113549.1.1.3": "md4"}


def _weak(name: str) -> Refusal:
    return Refusal(Reason.WEAK_SIGNATURE_ALGORITHM,
                   f"CSR signed with {name}; use SHA-256 or better (SHA-256, SHA-384, SHA-512, SHA3)")


def check_csr_signature(csr: x509.CertificateSigningRequest) -> None:
    """Refuse a CSR signed with a weak hash, or whose signature does not verify with its key."""
    try:
        algorithm = csr.signature_hash_algorithm
    except Exception:  # algorithms the library does not know surface here
        weak = UNNAMED_WEAK_SIGNATURES.get(csr.signature_algorithm_oid.dotted_string)
        if weak:
            raise _weak(weak) from None
        raise Refusal(Reason.MALFORMED_CSR, "the CSR's signature algorithm is not supported") from None
    if algorithm is not None and algorithm.name not in ACCEPTED_HASHES:
        raise _weak(algorithm.name)
    try:
        valid = csr.is_signature_valid
    except Exception:  # unsupported or unparsable keys surface here
        raise Refusal(Reason.MALFORMED_CSR, "the CSR's key or signature algorithm is not supported") from None
    if not valid:
        raise Refusal(Reason.BAD_CSR_SIGNATURE, "the CSR's signature does not verify with its own key")
    if csr.signature_algorithm_oid == SignatureAlgorithmOID.RSASSA_PSS and algorithm is not None:
        _check_pss_mask(csr, algorithm)


def _check_pss_mask(csr: x509.CertificateSigningRequest, digest: hashes.HashAlgorithm) -> None:
    """The signature verified under its own parameters; it must verify as well with MGF1 over its
    digest, or its mask generation used another (weaker) hash."""
    key = csr.public_key()
    if not isinstance(key, rsa.RSAPublicKey):
        raise Refusal(Reason.MALFORMED_CSR, "an RSASSA-PSS signature by a key that is not RSA")
    try:
        key.verify(csr.signature, csr.tbs_certrequest_bytes,
                   padding.PSS(mgf=padding.MGF1(digest), salt_length=padding.PSS.AUTO), digest)
    except InvalidSignature:
        raise Refusal(Reason.WEAK_SIGNATURE_ALGORITHM,
                      f"CSR signed with RSASSA-PSS over {digest.name} whose mask generation uses another "
                      "hash; use MGF1 with the same SHA-256 or better hash") from None
