"""Key specifications: generate keys, name public keys, enforce the key rules.

A key spec is a short string such as ``ec-p256`` or ``rsa-3072``. The same names are used
in templates, on the command line and in the policy an agent downloads.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import TypeAlias

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes

from certpulse.errors import Reason, Refusal

PrivateKey: TypeAlias = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
PublicKey: TypeAlias = ec.EllipticCurvePublicKey | rsa.RSAPublicKey

CURVES: dict[str, ec.EllipticCurve] = {
    "ec-p256": ec.SECP256R1(),
    "ec-p384": ec.SECP384R1(),
    "ec-p521": ec.SECP521R1(),
}
_CURVE_SPEC = {type(curve).__name__: spec for spec, curve in CURVES.items()}
RSA_SIZES = (2048, 3072, 4096)
KEY_SPECS = (*CURVES, *(f"rsa-{bits}" for bits in RSA_SIZES))
MIN_RSA_BITS = 2048
RSA_EXPONENT = 65537


def generate_private_key(spec: str) -> PrivateKey:
    """A fresh private key for ``spec`` (one of :data:`KEY_SPECS`)."""
    if spec in CURVES:
        return ec.generate_private_key(CURVES[spec])
    if spec.startswith("rsa-") and spec[4:].isdigit() and int(spec[4:]) in RSA_SIZES:
        return rsa.generate_private_key(public_exponent=RSA_EXPONENT, key_size=int(spec[4:]))
    raise Refusal(Reason.INVALID_ARGUMENT, f"unknown key type {spec!r}; use one of {KEY_SPECS}")


def describe_public_key(key: object) -> str:
    """The key spec of a public key (``ec-p256``, ``rsa-2048``), or a description of a foreign one."""
    if isinstance(key, ec.EllipticCurvePublicKey):
        return _CURVE_SPEC.get(type(key.curve).__name__, f"ec-{key.curve.name}")
    if isinstance(key, rsa.RSAPublicKey):
        return f"rsa-{key.key_size}"
    return type(key).__name__.removeprefix("_").lower()


def check_public_key(key: object, allowed: tuple[str, ...]) -> PublicKey:
    """Enforce the global key rules, then the template's ``allowed`` families.

    Global rules: RSA at least 2048 bits, a multiple of 8, exponent 65537; EC only on
    P-256, P-384 or P-521; nothing else. ``allowed`` holds specs such as ``ec-p256`` or the
    family ``rsa`` (any RSA key that passes the global rules).
    """
    if isinstance(key, rsa.RSAPublicKey):
        size = key.key_size
        exponent = key.public_numbers().e
        if size < MIN_RSA_BITS or size % 8:
            raise Refusal(
                Reason.KEY_NOT_ALLOWED,
                f"RSA keys must be at least {MIN_RSA_BITS} bits and a multiple of 8 (got {size})",
            )
        if exponent != RSA_EXPONENT:
            raise Refusal(Reason.KEY_NOT_ALLOWED, f"RSA exponent must be 65537 (got {exponent})")
        spec = f"rsa-{size}"
        if "rsa" not in allowed and spec not in allowed:
            raise Refusal(Reason.KEY_NOT_ALLOWED, f"{spec} keys are not allowed by this template")
        return key
    if isinstance(key, ec.EllipticCurvePublicKey):
        spec = describe_public_key(key)
        if spec not in CURVES:
            raise Refusal(Reason.KEY_NOT_ALLOWED, f"EC curve {key.curve.name} is not allowed")
        if spec not in allowed and "ec" not in allowed:
            raise Refusal(Reason.KEY_NOT_ALLOWED, f"{spec} keys are not allowed by this template")
        return key
    raise Refusal(Reason.KEY_NOT_ALLOWED, f"{describe_public_key(key)} keys are not supported")


def key_matches(private_key: PrivateKey, public_key: CertificatePublicKeyTypes) -> bool:
    """True when ``public_key`` is the public half of ``private_key`` (compared as SPKI DER)."""
    fmt = serialization.PublicFormat.SubjectPublicKeyInfo
    enc = serialization.Encoding.DER
    return private_key.public_key().public_bytes(enc, fmt) == public_key.public_bytes(enc, fmt)


def spki_sha256(public_key: CertificatePublicKeyTypes) -> str:
    """The SHA-256 of a public key's SubjectPublicKeyInfo (DER), in hex: the name a key is known
    by whatever certificate or request carries it (blocked keys, the key-to-principal rule)."""
    der = public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(der).hexdigest()


def private_key_pem(key: PrivateKey) -> bytes:
    """PKCS#8 PEM, unencrypted: file permissions protect it."""
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def load_private_key_pem(data: bytes) -> PrivateKey:
    key = serialization.load_pem_private_key(data, password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
        raise Refusal(Reason.KEY_NOT_ALLOWED, "only EC and RSA private keys are supported")
    return key


def write_private_key(path: Path, key: PrivateKey) -> None:
    """Write a key file 0600 from the first byte (never world-readable, even briefly), atomically."""
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, private_key_pem(key))
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
