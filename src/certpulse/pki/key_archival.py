"""Private-key archival envelopes: a private key encrypted to a key recovery agent (KRA).

When a template requires key archival, the requester encrypts its new private key to the
KRA certificate the policy publishes (RSA-OAEP wraps a fresh AES-256-GCM key that encrypts the
PKCS#8 key). The CA checks, with the KRA's key, that the envelope holds the private half of
the CSR's public key before it issues, and keeps the envelope for recovery.
"""

from __future__ import annotations

import base64
import json
import os
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from certpulse.errors import Reason, Refusal
from certpulse.pki.certs import thumbprint
from certpulse.pki.keys import PrivateKey, load_private_key_pem, private_key_pem

_OAEP = padding.OAEP(mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=None)


def seal(key: PrivateKey, kra: x509.Certificate) -> dict[str, str]:
    kra_public = kra.public_key()
    if not isinstance(kra_public, rsa.RSAPublicKey):
        raise Refusal(Reason.KEY_ARCHIVAL_REQUIRED, "the KRA certificate does not hold an RSA key")
    content_key = AESGCM.generate_key(bit_length=256)
    nonce = os.urandom(12)
    ciphertext = AESGCM(content_key).encrypt(nonce, private_key_pem(key), None)
    return {
        "kra": thumbprint(kra),
        "wrapped_key": base64.b64encode(kra_public.encrypt(content_key, _OAEP)).decode(),
        "nonce": base64.b64encode(nonce).decode(),
        "ciphertext": base64.b64encode(ciphertext).decode(),
    }


def open_envelope(envelope: Any, kra_key: rsa.RSAPrivateKey) -> PrivateKey:
    """The private key inside ``envelope``; every malformation is a named refusal."""
    try:
        wrapped = base64.b64decode(envelope["wrapped_key"], validate=True)
        nonce = base64.b64decode(envelope["nonce"], validate=True)
        ciphertext = base64.b64decode(envelope["ciphertext"], validate=True)
        content_key = kra_key.decrypt(wrapped, _OAEP)
        return load_private_key_pem(AESGCM(content_key).decrypt(nonce, ciphertext, None))
    except Refusal:
        raise
    except Exception:  # every decoding or decryption failure means the same thing here
        raise Refusal(
            Reason.KEY_ARCHIVAL_REQUIRED, "the archived-key envelope cannot be opened by the KRA"
        ) from None


def dumps(envelope: dict[str, str]) -> str:
    return json.dumps(envelope, sort_keys=True)
