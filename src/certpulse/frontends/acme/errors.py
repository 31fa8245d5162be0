"""ACME problem documents (RFC 8555 section 6.7): every refusal of an ACME route, as
``application/problem+json`` with an ``urn:ietf:params:acme:error:*`` type.

The core refuses with a :class:`~certpulse.errors.Reason`; :data:`ACME_ERRORS` is the one table
from reason to ACME error name and HTTP status. A reason not in it is about the request's
content: ``malformed``, 400. ``serverInternal`` is kept for what is really the server's fault
(the database down: 503 with ``Retry-After``; a bug: 500, logged, never from client input).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from certpulse.ca.acme.model import Identifier, Problem
from certpulse.errors import Reason, Refusal
from certpulse.pki.jose import ALGORITHMS

ERROR_PREFIX = "urn:ietf:params:acme:error:"
PROBLEM_MEDIA_TYPE = "application/problem+json"

# reason -> (ACME error name, HTTP status)
ACME_ERRORS: dict[Reason, tuple[str, int]] = {
    Reason.MALFORMED_REQUEST: ("malformed", 400),
    Reason.INVALID_ARGUMENT: ("malformed", 400),
    Reason.NOT_FOUND: ("malformed", 404),
    Reason.CONFLICT: ("malformed", 409),
    Reason.NOT_PENDING: ("malformed", 409),
    Reason.BODY_TOO_LARGE: ("malformed", 413),
    Reason.REQUEST_TIMEOUT: ("malformed", 408),
    Reason.HEADERS_TOO_LARGE: ("malformed", 431),
    Reason.BAD_NONCE: ("badNonce", 400),
    Reason.BAD_SIGNATURE_ALGORITHM: ("badSignatureAlgorithm", 400),
    Reason.BAD_PUBLIC_KEY: ("badPublicKey", 400),
    Reason.ACCOUNT_DOES_NOT_EXIST: ("accountDoesNotExist", 400),
    Reason.EXTERNAL_ACCOUNT_REQUIRED: ("externalAccountRequired", 400),
    Reason.USER_ACTION_REQUIRED: ("userActionRequired", 403),
    Reason.UNAUTHENTICATED: ("unauthorized", 403),
    Reason.FORBIDDEN: ("unauthorized", 403),
    Reason.TOKEN_INVALID: ("unauthorized", 403),
    Reason.TOKEN_EXPIRED: ("unauthorized", 403),
    Reason.TOKEN_USED: ("unauthorized", 403),
    Reason.SELF_APPROVAL: ("unauthorized", 403),
    Reason.REQUESTER_DISABLED: ("unauthorized", 403),
    Reason.TEMPLATE_NOT_PERMITTED: ("unauthorized", 403),
    Reason.REJECTED_IDENTIFIER: ("rejectedIdentifier", 400),
    Reason.NAME_NOT_ALLOWED: ("rejectedIdentifier", 400),
    Reason.NAME_NO_LONGER_ALLOWED: ("rejectedIdentifier", 400),
    Reason.UNSUPPORTED_IDENTIFIER: ("unsupportedIdentifier", 400),
    Reason.ORDER_NOT_READY: ("orderNotReady", 403),
    Reason.MALFORMED_CSR: ("badCSR", 400),
    Reason.BAD_CSR_SIGNATURE: ("badCSR", 400),
    Reason.WEAK_SIGNATURE_ALGORITHM: ("badCSR", 400),
    Reason.KEY_NOT_ALLOWED: ("badCSR", 400),
    Reason.KEY_BLOCKED: ("badCSR", 400),
    Reason.KEY_OF_ANOTHER_PRINCIPAL: ("badCSR", 400),
    Reason.BAD_REVOCATION_REASON: ("badRevocationReason", 400),
    Reason.ALREADY_REVOKED: ("alreadyRevoked", 400),
    Reason.ALREADY_REPLACED: ("alreadyReplaced", 409),
    Reason.INVALID_PROFILE: ("invalidProfile", 400),
    Reason.UNKNOWN_TEMPLATE: ("invalidProfile", 400),
    Reason.NO_ISSUER: ("invalidProfile", 400),
    Reason.UNKNOWN_ISSUER: ("invalidProfile", 400),
    Reason.ISSUER_RENEWAL_ONLY: ("invalidProfile", 400),
    Reason.RA_SIGNATURES_MISSING: ("invalidProfile", 400),
    Reason.KEY_ARCHIVAL_REQUIRED: ("invalidProfile", 400),
    Reason.INVALID_CONTACT: ("invalidContact", 400),
    Reason.UNSUPPORTED_CONTACT: ("unsupportedContact", 400),
    Reason.RATE_LIMITED: ("rateLimited", 429),
    Reason.UNAVAILABLE: ("serverInternal", 503),
    Reason.STORE: ("serverInternal", 503),
    Reason.VALIDATION_FAILED: ("incorrectResponse", 400),
}
DEFAULT_ERROR = ("malformed", 400)
# Every ACME error name (RFC 8555 section 6.7, RFC 9773, the profiles extension): a problem
# may name one of these itself (a failed validation: connection, dns, incorrectResponse, tls...;
# a contact: unsupportedContact); anything else it names is not passed on.
ACME_ERROR_NAMES = frozenset({
    "accountDoesNotExist", "alreadyRevoked", "alreadyReplaced", "badCSR", "badNonce", "badPublicKey",
    "badRevocationReason", "badSignatureAlgorithm", "caa", "compound", "connection", "dns",
    "externalAccountRequired", "incorrectResponse", "invalidContact", "invalidProfile", "malformed",
    "orderNotReady", "rateLimited", "rejectedIdentifier", "serverInternal", "tls", "unauthorized",
    "unsupportedContact", "unsupportedIdentifier", "userActionRequired"})


def error_name(reason: Reason, acme_type: str | None = None) -> str:
    if acme_type and acme_type in ACME_ERROR_NAMES:
        return acme_type
    if reason is Reason.VALIDATION_FAILED:
        return "connection"
    return ACME_ERRORS.get(reason, DEFAULT_ERROR)[0]


def status_of(reason: Reason) -> int:
    return ACME_ERRORS.get(reason, DEFAULT_ERROR)[1]


def identifier_document(identifier: Identifier) -> dict[str, str]:
    return {"type": identifier.type, "value": identifier.value}


def problem_document(problem: Problem, status: int | None = None) -> dict[str, Any]:
    """A stored or refused :class:`Problem` as RFC 8555's JSON (subproblems each with their
    identifier)."""
    document: dict[str, Any] = {"type": ERROR_PREFIX + error_name(problem.reason, problem.acme_type),
                                "detail": problem.detail}
    if status is not None:
        document["status"] = status
    if problem.identifier is not None:
        document["identifier"] = identifier_document(problem.identifier)
    if problem.subproblems:
        document["subproblems"] = [problem_document(sub) for sub in problem.subproblems]
    return document


def _subproblems(extra: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The subproblems a refusal carries (``extra["subproblems"]``: Problems or ready documents)."""
    found = extra.get("subproblems") or ()
    documents: list[dict[str, Any]] = []
    for item in found:
        if isinstance(item, Problem):
            documents.append(problem_document(item))
        elif isinstance(item, Mapping):
            documents.append(dict(item))
    return documents


def refusal_document(refusal: Refusal) -> tuple[int, dict[str, Any]]:
    """The status and problem document of a refusal on an ACME route."""
    given = refusal.extra.get("status")
    status = given if isinstance(given, int) and 400 <= given <= 599 else status_of(refusal.reason)
    acme_type = refusal.extra.get("acme_type")
    document: dict[str, Any] = {
        "type": ERROR_PREFIX + error_name(refusal.reason, acme_type if isinstance(acme_type, str) else None),
        "detail": refusal.detail, "status": status}
    algorithms = refusal.extra.get("algorithms")
    if refusal.reason is Reason.BAD_SIGNATURE_ALGORITHM:
        document["algorithms"] = list(algorithms) if algorithms else list(ALGORITHMS)
    subproblems = _subproblems(refusal.extra)
    if subproblems:
        document["subproblems"] = subproblems
    identifier = refusal.extra.get("identifier")
    if isinstance(identifier, Identifier):
        document["identifier"] = identifier_document(identifier)
    retry_after = refusal.extra.get("retry_after")
    if isinstance(retry_after, int):
        document["retry_after"] = retry_after
    return status, document


def encode(document: Any) -> bytes:
    return json.dumps(document, separators=(",", ":"), ensure_ascii=False).encode()


__all__ = ["ACME_ERRORS", "ERROR_PREFIX", "PROBLEM_MEDIA_TYPE", "encode", "error_name", "problem_document",
           "refusal_document", "status_of"]
