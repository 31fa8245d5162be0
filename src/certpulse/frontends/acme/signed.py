"""The checks every ACME POST goes through before the core sees it (RFC 8555 section 6.2-6.5).

In order, each refusing with its own ACME error:

1. ``Content-Type: application/jose+json`` (415 ``malformed`` otherwise);
2. the body is a flattened JWS with an accepted ``alg``, a ``nonce``, a ``url`` and exactly one
   of ``jwk`` and ``kid`` (:func:`certpulse.pki.jose.parse`);
3. ``url`` is exactly the URL the request was sent to (``unauthorized``);
4. ``jwk`` only where the signer has no account yet (newAccount, revokeCert by the
   certificate's key), ``kid`` everywhere else (``malformed``);
5. the nonce is one of ours and recent (no database);
6. the signature verifies with the ``jwk``, or with the key of the account that the ``kid``
   (this server's account URL) names (``accountDoesNotExist``, ``unauthorized`` when that
   account is deactivated);
7. the nonce is spent (``badNonce`` when it already was, on any worker).

The nonce is spent last, so a request that fails any check writes nothing, and nobody who
cannot sign can make the server write.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Mapping
from typing import Any

from certpulse.ca.acme.model import Account, AccountKey
from certpulse.ca.acme.nonces import Nonces
from certpulse.ca.acme.service import ACMEAuthority
from certpulse.errors import Reason, Refusal
from certpulse.frontends.acme.urls import Urls
from certpulse.pki import jose

JOSE_MEDIA_TYPE = "application/jose+json"
# Where a request may be signed with its own key (``jwk``) rather than an account's (``kid``)
JWK_OPERATIONS = frozenset({"newAccount", "revokeCert"})
KID_OPERATIONS = frozenset({"account", "orders", "keyChange", "newOrder", "order", "finalize", "authz",
                            "challenge", "certificate", "revokeCert"})


@dataclasses.dataclass(frozen=True, slots=True)
class SignedRequest:
    """A verified request: its JWS, and who signed it (an account, or a key of its own)."""

    message: jose.SignedMessage
    account: Account | None
    key: AccountKey | None  # the ``jwk`` it was signed with, for jwk requests

    @property
    def post_as_get(self) -> bool:
        return self.message.payload == b""

    def payload(self) -> dict[str, Any]:
        """The payload, a JSON object (MALFORMED_REQUEST otherwise)."""
        document = self.message.json_payload()
        if not isinstance(document, dict):
            raise Refusal(Reason.MALFORMED_REQUEST, "the JWS payload must be a JSON object")
        return document

    def require_account(self) -> Account:
        if self.account is None:
            raise Refusal(Reason.MALFORMED_REQUEST, "this request must be signed by an account (kid)")
        return self.account


def media_type(headers: Mapping[bytes, bytes]) -> str:
    value = headers.get(b"content-type", b"").decode("latin-1")
    return value.split(";", 1)[0].strip().lower()


def check_media_type(content_type: str) -> None:
    if content_type != JOSE_MEDIA_TYPE:
        raise Refusal(Reason.MALFORMED_REQUEST,
                      f"ACME requests must be sent as {JOSE_MEDIA_TYPE}", status=415)


def parse(body: bytes, request_url: str, operation: str) -> jose.SignedMessage:
    """Steps 2-4: the JWS's form and headers, before any key or database is looked at."""
    message = jose.parse(body)
    if message.url != request_url:
        raise Refusal(Reason.UNAUTHENTICATED, "the JWS 'url' header does not name the URL the request was sent to")
    if message.jwk is not None and operation not in JWK_OPERATIONS:
        raise Refusal(Reason.MALFORMED_REQUEST, "this request must be signed by an account key named by 'kid', "
                                                "not by a 'jwk'")
    if message.kid is not None and operation not in KID_OPERATIONS:
        raise Refusal(Reason.MALFORMED_REQUEST, "this request must carry the signing key itself as 'jwk', "
                                                "not a 'kid'")
    return message


def verify(message: jose.SignedMessage, urls: Urls, acme: ACMEAuthority, nonces: Nonces,
           now: dt.datetime) -> SignedRequest:
    """Steps 5-7, in a handler thread (a database read for a ``kid``, a write for the nonce)."""
    nonce = message.nonce
    if nonce is None:  # jose.parse refuses it first; kept for the type
        raise Refusal(Reason.BAD_NONCE, "the JWS protected header has no 'nonce'")
    nonces.check(nonce, now)
    account: Account | None = None
    key: AccountKey | None = None
    if message.kid is not None:
        account_id = urls.account_id(message.kid)
        if account_id is None:
            raise Refusal(Reason.ACCOUNT_DOES_NOT_EXIST, "the JWS 'kid' is not an account URL of this server")
        account = acme.account(account_id, now)
        jose.verify(message, account.jwk)
    else:
        jwk = message.jwk
        assert jwk is not None  # jose.parse: exactly one of jwk and kid
        jose.verify(message, jwk)
        key = AccountKey(jwk=dict(jwk), thumbprint=jose.thumbprint(jwk))
    nonces.spend(nonce, now)
    return SignedRequest(message, account, key)


__all__ = ["JOSE_MEDIA_TYPE", "SignedRequest", "check_media_type", "media_type", "parse", "verify"]
