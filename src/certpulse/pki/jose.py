"""JWS and JWK for ACME (RFC 7515, 7517, 7638, 8037; RFC 8555 section 6.2), over joserfc.

ACME sends every request as a flattened JSON JWS whose protected header carries either the
account's public key (``jwk``) or its URL (``kid``), a ``nonce`` and the ``url`` it was sent to.
This module parses such a body into a :class:`SignedMessage` (nothing verified yet, so the
caller can look up the key a ``kid`` names) and then verifies it with that key. The signature
checks, key parsing and RFC 7638 thumbprints are joserfc's; this module only decides what ACME
accepts: the flattened form alone, one of :data:`ALGORITHMS`, no private key material, RSA keys
of 2048 bits or more, ``nonce`` and ``url`` present, exactly one of ``jwk`` and ``kid``.

Every refusal is a :class:`~certpulse.errors.Refusal`: MALFORMED_REQUEST ("malformed"),
BAD_SIGNATURE_ALGORITHM, BAD_PUBLIC_KEY, UNAUTHENTICATED (a signature that does not verify).
"""

from __future__ import annotations

import binascii
import dataclasses
import json
import warnings
from base64 import urlsafe_b64decode
from collections.abc import Mapping
from typing import Any

from joserfc import jwk as joserfc_jwk
from joserfc import jws as joserfc_jws
from joserfc.errors import JoseError
from joserfc.jwk import ECKey, OctKey, OKPKey, RSAKey
from joserfc.registry import HeaderParameter

from certpulse.errors import Reason, Refusal

# What an account key may sign with (RFC 8555 section 6.2: ES256 and EdDSA SHOULD, RS256 MUST)
ALGORITHMS = ("RS256", "ES256", "ES384", "EdDSA")
# What an external account binding is MACed with (RFC 8555 section 7.3.4)
MAC_ALGORITHMS = ("HS256", "HS384", "HS512")
MIN_RSA_BITS = 2048
_CURVES = {"ES256": "P-256", "ES384": "P-384"}

PublicKey = RSAKey | ECKey | OKPKey

# RFC 9864 names fully specified Ed25519 algorithms, and joserfc warns on the polymorphic "EdDSA";
# ACME (RFC 8555) and its clients use "EdDSA", which for an OKP key on Ed25519 means exactly that.
warnings.filterwarnings("ignore", message="EdDSA is deprecated")

# ACME's own header parameters (RFC 8555 section 6.4, 6.5); joserfc checks only their type
_REGISTRY = joserfc_jws.JWSRegistry(
    header_registry={
        "nonce": HeaderParameter("ACME anti-replay nonce", "str"),
        "url": HeaderParameter("ACME request URL", "str"),
    },
    algorithms=[*ALGORITHMS, *MAC_ALGORITHMS],
)
# joserfc refuses protected headers over 512 bytes by default, but a newAccount request carries
# the account key's JWK in its header: an RSA key's alone is about 400 bytes (2048 bits) to 1400
# (8192 bits), so certbot's and lego's RSA accounts were refused. The server's request body
# limit already bounds the whole JWS; this bound only has to admit the largest key allowed.
_REGISTRY.max_header_length = 4096


@dataclasses.dataclass(frozen=True, slots=True)
class SignedMessage:
    """A parsed, not yet verified, flattened JWS."""

    protected: Mapping[str, Any]
    payload: bytes  # b"" for a POST-as-GET
    serialization: Mapping[str, str]  # the three members, as sent

    @property
    def algorithm(self) -> str:
        return str(self.protected["alg"])

    @property
    def jwk(self) -> Mapping[str, Any] | None:
        value = self.protected.get("jwk")
        return value if isinstance(value, dict) else None

    @property
    def kid(self) -> str | None:
        value = self.protected.get("kid")
        return value if isinstance(value, str) else None

    @property
    def nonce(self) -> str | None:
        value = self.protected.get("nonce")
        return value if isinstance(value, str) else None

    @property
    def url(self) -> str | None:
        value = self.protected.get("url")
        return value if isinstance(value, str) else None

    def json_payload(self) -> Any:
        """The payload as JSON (MALFORMED_REQUEST when it is not)."""
        try:
            return json.loads(self.payload)
        except (ValueError, UnicodeDecodeError):
            raise Refusal(Reason.MALFORMED_REQUEST, "the JWS payload is not JSON") from None


def _b64(text: object, what: str) -> bytes:
    if not isinstance(text, str) or "=" in text:
        raise Refusal(Reason.MALFORMED_REQUEST, f"the JWS {what} is not unpadded base64url")
    try:
        return urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        raise Refusal(Reason.MALFORMED_REQUEST, f"the JWS {what} is not base64url") from None


def parse(body: bytes | Mapping[str, Any], *, account_request: bool = True) -> SignedMessage:
    """A request body as an ACME JWS: the flattened JSON serialization only (RFC 8555 section
    6.2), with ``alg``, ``nonce`` and ``url``, and exactly one of ``jwk`` and ``kid``. With
    ``account_request`` False (the inner JWS of a keyChange, an external account binding) the
    nonce is not required, and a ``kid`` may stand beside nothing else."""
    if isinstance(body, Mapping):
        document: Any = body
    else:
        try:
            document = json.loads(body)
        except (ValueError, UnicodeDecodeError):
            raise Refusal(Reason.MALFORMED_REQUEST, "the request body is not JSON") from None
    if not isinstance(document, dict):
        raise Refusal(Reason.MALFORMED_REQUEST, "the request body is not a JWS object")
    if set(document) != {"protected", "payload", "signature"}:
        raise Refusal(Reason.MALFORMED_REQUEST, "the request must be a flattened JSON JWS with exactly "
                                                "'protected', 'payload' and 'signature'")
    try:
        protected = json.loads(_b64(document["protected"], "protected header"))
    except (ValueError, UnicodeDecodeError):
        raise Refusal(Reason.MALFORMED_REQUEST, "the JWS protected header is not JSON") from None
    if not isinstance(protected, dict):
        raise Refusal(Reason.MALFORMED_REQUEST, "the JWS protected header is not an object")
    payload = _b64(document["payload"], "payload") if document["payload"] != "" else b""
    _b64(document["signature"], "signature")
    alg = protected.get("alg")
    if not isinstance(alg, str):
        raise Refusal(Reason.MALFORMED_REQUEST, "the JWS protected header has no 'alg'")
    message = SignedMessage(protected, payload, dict(document))
    if account_request:
        if alg not in ALGORITHMS:
            raise Refusal(Reason.BAD_SIGNATURE_ALGORITHM, f"the algorithm {printable_alg(alg)} is not accepted",
                          algorithms=list(ALGORITHMS))
        if message.nonce is None:
            raise Refusal(Reason.BAD_NONCE, "the JWS protected header has no 'nonce'")
        if ("jwk" in protected) == ("kid" in protected):
            raise Refusal(Reason.MALFORMED_REQUEST, "the JWS protected header must have exactly one of 'jwk' and 'kid'")
        if "jwk" in protected and message.jwk is None:
            raise Refusal(Reason.MALFORMED_REQUEST, "the JWS 'jwk' is not an object")
        if "kid" in protected and message.kid is None:
            raise Refusal(Reason.MALFORMED_REQUEST, "the JWS 'kid' is not a URL")
    if message.url is None:
        raise Refusal(Reason.MALFORMED_REQUEST, "the JWS protected header has no 'url'")
    return message


def printable_alg(alg: str) -> str:
    return repr(alg[:20]) if alg.isprintable() else "(unprintable)"


def public_key(jwk: Mapping[str, Any]) -> PublicKey:
    """An account's public key from its JWK: RSA (2048 bits or more), EC P-256/P-384 or Ed25519;
    never one that carries private material (BAD_PUBLIC_KEY)."""
    if not isinstance(jwk, Mapping) or any(not isinstance(k, str) for k in jwk):
        raise Refusal(Reason.BAD_PUBLIC_KEY, "the JWK is not an object")
    if "d" in jwk or "p" in jwk or "k" in jwk:
        raise Refusal(Reason.BAD_PUBLIC_KEY, "the JWK holds private key material; send the public key only")
    kty = jwk.get("kty")
    if kty not in ("RSA", "EC", "OKP"):
        raise Refusal(Reason.BAD_PUBLIC_KEY, "the JWK key type must be RSA, EC or OKP")
    try:
        key: PublicKey | OctKey = joserfc_jwk.import_key(dict(jwk), kty)
    except (JoseError, ValueError, TypeError, KeyError):
        raise Refusal(Reason.BAD_PUBLIC_KEY, "the JWK is not a valid public key") from None
    if isinstance(key, RSAKey):
        if key.raw_value.key_size < MIN_RSA_BITS:
            raise Refusal(Reason.BAD_PUBLIC_KEY, f"RSA account keys must have at least {MIN_RSA_BITS} bits")
    elif isinstance(key, ECKey):
        if jwk.get("crv") not in ("P-256", "P-384"):
            raise Refusal(Reason.BAD_PUBLIC_KEY, "EC account keys must be on P-256 or P-384")
    elif isinstance(key, OKPKey):
        if jwk.get("crv") != "Ed25519":
            raise Refusal(Reason.BAD_PUBLIC_KEY, "OKP account keys must be Ed25519")
    else:
        raise Refusal(Reason.BAD_PUBLIC_KEY, "the JWK key type must be RSA, EC or OKP")
    return key


def thumbprint(jwk: Mapping[str, Any]) -> str:
    """The RFC 7638 SHA-256 thumbprint of a public JWK (base64url, 43 characters)."""
    try:
        return str(joserfc_jwk.thumbprint(dict(jwk)))
    except (JoseError, ValueError, TypeError, KeyError):
        raise Refusal(Reason.BAD_PUBLIC_KEY, "the JWK is not a valid public key") from None


def _key_fits(alg: str, key: PublicKey, jwk: Mapping[str, Any]) -> bool:
    if alg == "RS256":
        return isinstance(key, RSAKey)
    if alg in _CURVES:
        return isinstance(key, ECKey) and jwk.get("crv") == _CURVES[alg]
    return alg == "EdDSA" and isinstance(key, OKPKey)


def verify(message: SignedMessage, jwk: Mapping[str, Any], key: PublicKey | None = None) -> PublicKey:
    """Verify ``message`` with the public key ``jwk`` (the header's own, or the account's that
    its ``kid`` names). UNAUTHENTICATED when the signature does not verify;
    BAD_SIGNATURE_ALGORITHM when the algorithm does not fit the key.

    ``key`` is ``jwk`` as :func:`public_key` imported it before (the value this returned for the
    same ``jwk``): a caller verifying many requests of one account imports its key once."""
    if key is None:
        key = public_key(jwk)
    if not _key_fits(message.algorithm, key, jwk):
        raise Refusal(Reason.BAD_SIGNATURE_ALGORITHM,
                      f"the algorithm {printable_alg(message.algorithm)} does not fit the account key",
                      algorithms=list(ALGORITHMS))
    _check(message, key, [message.algorithm])
    return key


def verify_mac(message: SignedMessage, key: bytes) -> None:
    """Verify an HMAC-signed JWS (an external account binding) with ``key``."""
    if message.algorithm not in MAC_ALGORITHMS:
        raise Refusal(Reason.BAD_SIGNATURE_ALGORITHM, "the external account binding must be MACed with HS256, "
                                                      "HS384 or HS512")
    _check(message, OctKey.import_key(key), [message.algorithm])


def _check(message: SignedMessage, key: OctKey | PublicKey, algorithms: list[str]) -> None:
    try:
        joserfc_jws.deserialize_json(dict(message.serialization), key,  # type: ignore[call-overload]
                                     algorithms=algorithms, registry=_REGISTRY)
    except JoseError:
        raise Refusal(Reason.UNAUTHENTICATED, "the JWS signature does not verify") from None
    except (ValueError, TypeError):
        raise Refusal(Reason.MALFORMED_REQUEST, "the JWS cannot be checked") from None
