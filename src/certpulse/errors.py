"""One error type for every refusal the system makes.

A :class:`Refusal` carries a machine-readable :class:`Reason` and a human sentence. The core
raises it; the edges translate it: the HTTP frontend into RFC 7807 problem JSON with a status
code (the only place status codes exist), the CLI into a one-line message and a non-zero exit.
"""

from __future__ import annotations

import enum
from typing import Any


class Reason(enum.StrEnum):
    """Why something was refused. The value is the slug used in problem ``type`` URIs."""

    # who is asking
    UNAUTHENTICATED = "unauthenticated"
    FORBIDDEN = "forbidden"
    TOKEN_INVALID = "token-invalid"  # noqa: S105 - a reason, not a secret
    TOKEN_USED = "token-used"  # noqa: S105
    TOKEN_EXPIRED = "token-expired"  # noqa: S105
    # what is asked about
    NOT_FOUND = "not-found"
    UNKNOWN_TEMPLATE = "unknown-template"
    TEMPLATE_NOT_PERMITTED = "template-not-permitted"
    UNKNOWN_ISSUER = "unknown-issuer"
    NO_ISSUER = "no-issuer"
    ISSUER_RENEWAL_ONLY = "issuer-renewal-only"
    # the request itself
    MALFORMED_REQUEST = "malformed-request"
    MALFORMED_CSR = "malformed-csr"
    BAD_CSR_SIGNATURE = "bad-csr-signature"
    WEAK_SIGNATURE_ALGORITHM = "weak-signature-algorithm"
    KEY_NOT_ALLOWED = "key-not-allowed"
    NAME_NOT_ALLOWED = "name-not-allowed"
    # names copied from the certificate being renewed that its template no longer allows: make
    # a new request from what is allowed (the agent does)
    NAME_NO_LONGER_ALLOWED = "name-no-longer-allowed"
    KEY_BLOCKED = "key-blocked"  # a certificate for this key was revoked for keyCompromise
    KEY_OF_ANOTHER_PRINCIPAL = "key-of-another-principal"  # certified to or requested by another
    BODY_TOO_LARGE = "body-too-large"
    REQUEST_TIMEOUT = "request-timeout"  # headers and body not received within the read deadline
    HEADERS_TOO_LARGE = "headers-too-large"
    # renewal and co-signatures
    RENEWAL_INVALID = "renewal-invalid"
    RENEWAL_OF_EXPIRED = "renewal-of-expired"
    RENEWAL_OF_REVOKED = "renewal-of-revoked"
    RA_SIGNATURES_MISSING = "ra-signatures-missing"
    KEY_ARCHIVAL_REQUIRED = "key-archival-required"
    # state
    CONFLICT = "conflict"
    NOT_PENDING = "not-pending"
    SELF_APPROVAL = "self-approval"
    REQUESTER_DISABLED = "requester-disabled"  # at approval: the requester is disabled or gone
    ALREADY_REVOKED = "already-revoked"
    NOT_ON_HOLD = "not-on-hold"  # unrevoke: only a certificate on hold (certificateHold) is released
    # configuration
    INVALID_TEMPLATE = "invalid-template"
    INVALID_ARGUMENT = "invalid-argument"
    STORE = "store"
    COMMAND_UNSAFE = "command-unsafe"  # a task's command others could change or replace
    COMMAND_CHANGED = "command-changed"  # a task's command no longer matches its pinned SHA-256
    # ACME (RFC 8555 section 6.7, RFC 9773): each maps to its urn:ietf:params:acme:error:* type
    BAD_NONCE = "bad-nonce"
    BAD_SIGNATURE_ALGORITHM = "bad-signature-algorithm"
    BAD_PUBLIC_KEY = "bad-public-key"
    ACCOUNT_DOES_NOT_EXIST = "account-does-not-exist"
    EXTERNAL_ACCOUNT_REQUIRED = "external-account-required"
    USER_ACTION_REQUIRED = "user-action-required"  # the terms of service must be agreed to
    REJECTED_IDENTIFIER = "rejected-identifier"
    UNSUPPORTED_IDENTIFIER = "unsupported-identifier"
    ORDER_NOT_READY = "order-not-ready"
    BAD_REVOCATION_REASON = "bad-revocation-reason"
    ALREADY_REPLACED = "already-replaced"
    INVALID_PROFILE = "invalid-profile"
    VALIDATION_FAILED = "validation-failed"  # a challenge failed; extra["acme_type"] names the ACME type
    INVALID_CONTACT = "invalid-contact"  # an account contact that is not a single printable mailto: address
    UNSUPPORTED_CONTACT = "unsupported-contact"  # a contact URL scheme other than mailto:
    # load
    RATE_LIMITED = "rate-limited"
    UNAVAILABLE = "unavailable"


class CertpulseError(Exception):
    """Base for every error certpulse raises on purpose."""


class Refusal(CertpulseError):
    """A decision not to do what was asked, with the reason named."""

    def __init__(self, reason: Reason, detail: str, **extra: Any) -> None:
        super().__init__(f"{reason.value}: {detail}")
        self.reason = reason
        self.detail = detail
        self.extra = extra
