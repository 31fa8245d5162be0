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
7. the nonce is spent (``badNonce`` when it already was, on any worker), and, in that same
   write transaction, the account is confirmed to be still as it was checked.

The nonce is spent last, so a request that fails any check writes nothing, and nobody who
cannot sign can make the server write.

Every ACME client signs all its requests with one account, so each worker remembers the
accounts it has checked and their imported keys (:class:`KnownAccounts`): a request of a known
account is verified with the remembered key and needs no read transaction; step 7 then confirms
in the database that the account is still valid, with the same key, contacts and enabled
principal. If it is not (deactivated or re-keyed by another worker a moment ago), nothing is
written and the request is checked again from the database, exactly as for an unknown account,
with the same answers and audit rows.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Mapping
from typing import Any

from certpulse.ca.acme.model import Account, AccountKey
from certpulse.ca.acme.nonces import AccountChanged, Nonces
from certpulse.ca.acme.service import ACMEAuthority
from certpulse.errors import Reason, Refusal
from certpulse.frontends.acme.urls import Urls
from certpulse.pki import jose

JOSE_MEDIA_TYPE = "application/jose+json"
# Where a request may be signed with its own key (``jwk``) rather than an account's (``kid``)
JWK_OPERATIONS = frozenset({"newAccount", "revokeCert"})
KID_OPERATIONS = frozenset({"account", "orders", "keyChange", "newOrder", "order", "finalize", "authz",
                            "challenge", "certificate", "revokeCert"})
KNOWN_ACCOUNTS = 4096  # accounts a worker remembers; all are forgotten when it would remember more
CHECK_ATTEMPTS = 3  # reads of an account that keeps changing under a request before it is refused


class KnownAccounts:
    """The accounts this worker has checked, with their imported keys: only ever a first guess,
    confirmed in the nonce's write transaction (:meth:`Nonces.spend`)."""

    def __init__(self, limit: int = KNOWN_ACCOUNTS) -> None:
        self.limit = limit
        self._known: dict[int, tuple[Account, jose.PublicKey]] = {}

    def get(self, account_id: int) -> tuple[Account, jose.PublicKey] | None:
        return self._known.get(account_id)

    def remember(self, account: Account, key: jose.PublicKey) -> None:
        if len(self._known) >= self.limit:
            self._known.clear()
        self._known[account.id] = (account, key)

    def forget(self, account_id: int) -> None:
        self._known.pop(account_id, None)


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
           now: dt.datetime, known: KnownAccounts | None = None) -> SignedRequest:
    """Steps 5-7, in a handler thread (a write for the nonce; a read for a ``kid`` whose account
    this worker does not know yet)."""
    nonce = message.nonce
    if nonce is None:  # jose.parse refuses it first; kept for the type
        raise Refusal(Reason.BAD_NONCE, "the JWS protected header has no 'nonce'")
    nonces.check(nonce, now)
    if message.kid is not None:
        account_id = urls.account_id(message.kid)
        if account_id is None:
            raise Refusal(Reason.ACCOUNT_DOES_NOT_EXIST, "the JWS 'kid' is not an account URL of this server")
        return SignedRequest(message, _signing_account(message, account_id, acme, nonces, now,
                                                       known or KnownAccounts()), None)
    jwk = message.jwk
    assert jwk is not None  # jose.parse: exactly one of jwk and kid
    jose.verify(message, jwk)
    key = AccountKey(jwk=dict(jwk), thumbprint=jose.thumbprint(jwk))
    nonces.spend(nonce, now)
    return SignedRequest(message, None, key)


def _signing_account(message: jose.SignedMessage, account_id: int, acme: ACMEAuthority, nonces: Nonces,
                     now: dt.datetime, known: KnownAccounts) -> Account:
    """The account that signed ``message``, its nonce spent (steps 6 and 7 for a ``kid``)."""
    nonce = message.nonce
    assert nonce is not None
    remembered = known.get(account_id)
    if remembered is not None:
        account, key = remembered
        try:
            jose.verify(message, account.jwk, key)
            nonces.spend(nonce, now, account)
            return account
        except AccountChanged:
            known.forget(account_id)
        except Refusal as refusal:
            if refusal.reason is Reason.BAD_NONCE:  # the account was confirmed: the nonce is the problem
                raise
            # Maybe signed with a key the account changed to: checked afresh below. The remembered
            # account stays (a forged request must not make its owner's next one slower).
    for _ in range(CHECK_ATTEMPTS):
        account = acme.account(account_id, now)  # refuses (and audits) an unknown or unusable account
        key = jose.verify(message, account.jwk)
        try:
            nonces.spend(nonce, now, account)
        except AccountChanged:
            continue
        known.remember(account, key)
        return account
    raise Refusal(Reason.UNAUTHENTICATED, f"account {account_id} kept changing while this request was checked; "
                                          "send it again")


__all__ = ["JOSE_MEDIA_TYPE", "KnownAccounts", "SignedRequest", "check_media_type", "media_type", "parse", "verify"]
