"""The ACME operations (RFC 8555 section 7, RFC 9773): each turns a verified request into the
core's call and its answer (status, resource, ``Location``, ``Link``, ``Retry-After``).

Each runs in a handler thread, after :mod:`.signed` has verified the request; a refusal raised
here or by the core becomes a problem document in :mod:`.routes`.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import math
import time
from collections.abc import Callable

import certpulse.frontends.acme.payloads as payloads
import certpulse.frontends.acme.resources as resources
from certpulse.ca.acme.model import Account, AccountKey, Order
from certpulse.ca.acme.service import ACMEAuthority
from certpulse.errors import Reason, Refusal
from certpulse.frontends.acme.answers import Answer
from certpulse.frontends.acme.signed import SignedRequest
from certpulse.frontends.acme.urls import Urls
from certpulse.frontends.acme.validations import ValidationRunner
from certpulse.frontends.metrics import observe_submission
from certpulse.pki import jose

PEM_CHAIN_MEDIA_TYPE = "application/pem-certificate-chain"
ORDERS_PAGE = 50  # order URLs per page of an account's orders list


@dataclasses.dataclass(frozen=True, slots=True)
class Call:
    """One verified request, with what its operation needs."""

    acme: ACMEAuthority
    urls: Urls
    request: SignedRequest
    ids: tuple[int, ...]
    query: dict[str, str]
    now: dt.datetime
    runner: ValidationRunner


def seconds(delta: dt.timedelta) -> str:
    return str(max(1, math.ceil(delta.total_seconds())))


def _own_account(call: Call) -> Account:
    account = call.request.require_account()
    if account.id != call.ids[0]:
        raise Refusal(Reason.FORBIDDEN, "the account signing this request is not the account it names")
    return account


def _order_answer(call: Call, order: Order, status: int = 200) -> Answer:
    answer = Answer.json(resources.order(call.urls, order), status).header("location", call.urls.order(order.id))
    if order.status == "processing":
        answer.header("retry-after", seconds(order.retry_after or dt.timedelta(seconds=5)))
    return answer


def new_account(call: Call) -> Answer:
    key = call.request.key
    if key is None:
        raise Refusal(Reason.MALFORMED_REQUEST, "newAccount must be signed with the account's own key (jwk)")
    payload = call.request.payload()
    binding = payload.get("externalAccountBinding")
    if binding is not None and not isinstance(binding, dict):
        raise payloads.malformed("'externalAccountBinding' must be a JWS object")
    account, created = call.acme.new_account(
        key, contact=payloads.contacts(payload) or (), terms_agreed=payloads.flag(payload, "termsOfServiceAgreed"),
        only_return_existing=payloads.flag(payload, "onlyReturnExisting"), external_binding=binding,
        url=call.urls.new_account, now=call.now)
    return (Answer.json(resources.account(call.urls, account), 201 if created else 200)
            .header("location", call.urls.account(account.id)))


def account(call: Call) -> Answer:
    current = _own_account(call)
    if not call.request.post_as_get:
        payload = call.request.payload()
        status = payloads.text(payload, "status", limit=32)
        if status is not None and status != "deactivated":
            raise payloads.malformed("an account's status can only be changed to 'deactivated'")
        contact = payloads.contacts(payload)
        if status is not None or contact is not None:
            current = call.acme.update_account(current, contact=contact, deactivate=status == "deactivated",
                                               now=call.now)
    return Answer.json(resources.account(call.urls, current)).header("location", call.urls.account(current.id))


def orders(call: Call) -> Answer:
    current = _own_account(call)
    cursor_text = call.query.get("cursor")
    after: int | None = None
    if cursor_text is not None:
        if not cursor_text.isdigit() or len(cursor_text) > 9 or not cursor_text.isascii():
            raise payloads.malformed("'cursor' must be the one a 'next' link gave")
        after = int(cursor_text)
    page = call.acme.orders(current, after=after, limit=ORDERS_PAGE, now=call.now)
    answer = Answer.json({"orders": [call.urls.order(i) for i in page.order_ids]})
    if page.next_after is not None:
        answer.link(call.urls.orders(current.id, page.next_after), "next")
    return answer


def key_change(call: Call) -> Answer:
    current = call.request.require_account()
    inner = jose.parse(call.request.payload(), account_request=False)
    new_jwk = inner.jwk
    if new_jwk is None or inner.kid is not None:
        raise payloads.malformed("the inner JWS of a keyChange must carry the new key as 'jwk'")
    if inner.url != call.request.message.url:
        raise payloads.malformed("the inner JWS's 'url' must be the keyChange URL, as the outer one's is")
    if inner.algorithm not in jose.ALGORITHMS:
        raise Refusal(Reason.BAD_SIGNATURE_ALGORITHM, f"the algorithm {jose.printable_alg(inner.algorithm)} is "
                                                      "not accepted", algorithms=list(jose.ALGORITHMS))
    jose.verify(inner, new_jwk)
    change = inner.json_payload()
    if not isinstance(change, dict):
        raise payloads.malformed("the inner payload must be a keyChange object")
    if payloads.text(change, "account", required=True) != call.urls.account(current.id):
        raise Refusal(Reason.UNAUTHENTICATED, "the keyChange 'account' is not the account signing the request")
    old_key = change.get("oldKey")
    if not isinstance(old_key, dict):
        raise payloads.malformed("the keyChange 'oldKey' must be the account's current key (a JWK)")
    if jose.thumbprint(old_key) != current.key_thumbprint:
        raise Refusal(Reason.UNAUTHENTICATED, "the keyChange 'oldKey' is not the account's current key")
    new_key = AccountKey(jwk=dict(new_jwk), thumbprint=jose.thumbprint(new_jwk))
    if new_key.thumbprint == current.key_thumbprint:
        raise Refusal(Reason.MALFORMED_REQUEST, "the new key is the account's current key")
    updated = call.acme.change_key(current, new_key, call.now)
    return Answer.json(resources.account(call.urls, updated)).header("location", call.urls.account(updated.id))


def new_order(call: Call) -> Answer:
    current = call.request.require_account()
    payload = call.request.payload()
    order = call.acme.new_order(
        current, payloads.identifiers(payload), profile=payloads.text(payload, "profile", limit=64),
        not_before=payloads.moment(payload, "notBefore"), not_after=payloads.moment(payload, "notAfter"),
        replaces=payloads.text(payload, "replaces", limit=512), now=call.now)
    return _order_answer(call, order, 201)


def order(call: Call) -> Answer:
    _require_post_as_get(call, "an order")
    return _order_answer(call, call.acme.order(call.request.require_account(), call.ids[0], call.now))


def finalize(call: Call) -> Answer:
    """Finalize; an issuance (or a request left for approval) is timed in the same histograms as a
    native submission's, so the CA's metrics do not tell ACME certificates apart."""
    current = call.request.require_account()
    csr = payloads.base64url(call.request.payload(), "csr")
    started = time.perf_counter()
    order = call.acme.finalize(current, call.ids[0], csr, call.now)
    if order.status in ("valid", "processing"):
        observe_submission("issued" if order.status == "valid" else "pending", started)
    return _order_answer(call, order)


# While a validation runs, clients are told to look again in a second (RFC 8555 section 8.2):
# without it lego waits 5 s, though a validation on loopback or a LAN takes milliseconds.
VALIDATION_RETRY_AFTER = "1"


def authz(call: Call) -> Answer:
    current = call.request.require_account()
    if call.request.post_as_get:
        item = call.acme.authorization(current, call.ids[0], call.now)
    else:
        status = payloads.text(call.request.payload(), "status", limit=32)
        if status != "deactivated":
            raise payloads.malformed("an authorization's status can only be changed to 'deactivated'")
        item = call.acme.deactivate_authorization(current, call.ids[0], call.now)
    answer = Answer.json(resources.authorization(call.urls, item)).link(call.urls.order(item.order_id), "up")
    if item.status == "pending" and any(c.status == "processing" for c in item.challenges):
        answer.header("retry-after", VALIDATION_RETRY_AFTER)
    return answer


def challenge(call: Call) -> Answer:
    current = call.request.require_account()
    if call.request.post_as_get:
        item = call.acme.challenge(current, call.ids[0], call.now)
    else:
        call.request.payload()  # "{}": the client is ready (RFC 8555 section 7.5.1)
        item, job = call.acme.respond_to_challenge(current, call.ids[0], call.now)
        if job is not None and call.runner.recorded(call.runner.start(job)):
            item = call.acme.challenge(current, item.id, call.now)  # decided: answered as it is now
    answer = Answer.json(resources.challenge(call.urls, item)).link(call.urls.authz(item.authorization_id), "up")
    if item.status == "processing":
        answer.header("retry-after", VALIDATION_RETRY_AFTER)
    return answer


def certificate(call: Call) -> Answer:
    _require_post_as_get(call, "a certificate")
    certificate_id = call.ids[0]
    alternate = call.ids[1] if len(call.ids) > 1 else 0
    chains = call.acme.certificate(call.request.require_account(), certificate_id, alternate, call.now)
    answer = Answer(200, chains.pem.encode("ascii"), PEM_CHAIN_MEDIA_TYPE)
    for n in range(chains.alternates + 1):
        if n != alternate:
            answer.link(call.urls.certificate(certificate_id, n), "alternate")
    return answer


def revoke_cert(call: Call) -> Answer:
    payload = call.request.payload()
    der = payloads.base64url(payload, "certificate")
    reason = payloads.revocation_reason(payload)
    key = call.request.key
    call.acme.revoke(der, reason, account=call.request.account, signer_jwk=key.jwk if key is not None else None,
                     now=call.now)
    return Answer(200)


def _require_post_as_get(call: Call, what: str) -> None:
    if not call.request.post_as_get:
        raise payloads.malformed(f"{what} is read with a POST-as-GET: an empty payload")


OPERATIONS: dict[str, Callable[[Call], Answer]] = {
    "newAccount": new_account,
    "account": account,
    "orders": orders,
    "keyChange": key_change,
    "newOrder": new_order,
    "order": order,
    "finalize": finalize,
    "authz": authz,
    "challenge": challenge,
    "certificate": certificate,
    "revokeCert": revoke_cert,
}

__all__ = ["OPERATIONS", "PEM_CHAIN_MEDIA_TYPE", "Call"]
