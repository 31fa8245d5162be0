"""Detached signatures over bytes, used as proof of possession.

A renewal request carries a signature over the new CSR made with the key of the certificate
being renewed (the seed's renewal request is signed by the old certificate); a registration
authority co-signs the same way. The hash follows the key so no algorithm is negotiated.
"""

from __future__ import annotations

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa

from certpulse.pki.keys import PrivateKey

_EC_HASH: dict[str, type[hashes.HashAlgorithm]] = {
    "secp256r1": hashes.SHA256,
    "secp384r1": hashes.SHA384,
    "secp521r1": hashes.SHA512,
}


def _ec_hash(curve: ec.EllipticCurve) -> hashes.HashAlgorithm:
    return _EC_HASH.get(curve.name, hashes.SHA256)()


def sign_bytes(key: PrivateKey, data: bytes) -> bytes:
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return key.sign(data, ec.ECDSA(_ec_hash(key.curve)))
    return key.sign(data, padding.PKCS1v15(), hashes.SHA256())


def verify_bytes(public_key: object, signature: bytes, data: bytes) -> bool:
    """True when ``signature`` over ``data`` verifies with ``public_key``; never raises for bad input."""
    try:
        if isinstance(public_key, ec.EllipticCurvePublicKey):
            public_key.verify(signature, data, ec.ECDSA(_ec_hash(public_key.curve)))
            return True
        if isinstance(public_key, rsa.RSAPublicKey):
            public_key.verify(signature, data, padding.PKCS1v15(), hashes.SHA256())
            return True
    except (InvalidSignature, ValueError):
        return False
    return False
