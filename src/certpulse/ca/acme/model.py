"""Value types of the ACME core: what the front end passes in and gets back.

Identifiers of rows are the database ids; the front end builds every URL from them
(``/acme/order/{id}`` and so on), so the core never knows where it is served.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Mapping
from typing import Any, Literal

from certpulse.errors import Reason

IdentifierType = Literal["dns", "ip"]
ChallengeType = Literal["http-01", "dns-01", "tls-alpn-01"]
CHALLENGE_TYPES: tuple[ChallengeType, ...] = ("http-01", "dns-01", "tls-alpn-01")


@dataclasses.dataclass(frozen=True, slots=True)
class Identifier:
    type: IdentifierType
    value: str  # dns: lower-case, without a trailing dot; a wildcard order keeps its "*." here


@dataclasses.dataclass(frozen=True, slots=True)
class AccountKey:
    """A verified account key: its public JWK (as the client sent it) and RFC 7638 thumbprint."""

    jwk: Mapping[str, Any]
    thumbprint: str


@dataclasses.dataclass(frozen=True, slots=True)
class Problem:
    """An ACME problem, as stored on an invalid order or challenge and as answered.
    ``identifier`` is set on a subproblem (RFC 8555 section 6.7.1)."""

    reason: Reason
    detail: str
    identifier: Identifier | None = None
    subproblems: tuple[Problem, ...] = ()
    acme_type: str | None = None  # the ACME error name when the reason alone does not say it
    #                               (a failed validation: connection, dns, incorrectResponse, tls...)


@dataclasses.dataclass(frozen=True, slots=True)
class Account:
    id: int
    status: str  # valid | deactivated | revoked
    contact: tuple[str, ...]
    key_thumbprint: str
    jwk: Mapping[str, Any]
    principal_id: int | None
    principal_name: str | None
    eab_kid: str | None
    created_at: dt.datetime


@dataclasses.dataclass(frozen=True, slots=True)
class Challenge:
    id: int
    authorization_id: int
    type: ChallengeType
    token: str
    status: str  # pending | processing | valid | invalid
    validated_at: dt.datetime | None
    error: Problem | None


@dataclasses.dataclass(frozen=True, slots=True)
class Authorization:
    id: int
    order_id: int
    identifier: Identifier  # without "*." for a wildcard (RFC 8555 section 7.1.4)
    wildcard: bool
    status: str  # pending | valid | invalid | deactivated | expired | revoked
    expires_at: dt.datetime
    challenges: tuple[Challenge, ...]


@dataclasses.dataclass(frozen=True, slots=True)
class Order:
    id: int
    account_id: int
    status: str  # pending | ready | processing | valid | invalid
    expires_at: dt.datetime
    identifiers: tuple[Identifier, ...]
    profile: str
    not_before: dt.datetime | None
    not_after: dt.datetime | None
    authorization_ids: tuple[int, ...]
    certificate_id: int | None  # set when valid: /acme/cert/{certificate_id}
    error: Problem | None
    retry_after: dt.timedelta | None  # while processing (e.g. waiting for a CA manager's approval)
    replaces: str | None  # the ARI certificate identifier it replaces, as the client sent it


@dataclasses.dataclass(frozen=True, slots=True)
class OrderPage:
    order_ids: tuple[int, ...]
    next_after: int | None  # pass back to get the next page; None on the last


@dataclasses.dataclass(frozen=True, slots=True)
class CertificateChains:
    """A certificate with its chain (PEM: leaf first) and how many alternate chains exist
    (``/acme/cert/{id}/{n}`` for n in 1..alternates, RFC 8555 section 7.4.2)."""

    pem: str
    alternates: int


@dataclasses.dataclass(frozen=True, slots=True)
class DirectoryMeta:
    profiles: Mapping[str, str]  # template name -> its display name
    default_profile: str | None
    external_account_required: bool
    terms_of_service: str | None
    website: str | None


@dataclasses.dataclass(frozen=True, slots=True)
class ValidationJob:
    """A challenge to validate, as the front end hands it to :mod:`certpulse.validation`."""

    challenge_id: int
    type: ChallengeType
    identifier: Identifier
    token: str
    key_authorization: str  # token "." account key thumbprint (RFC 8555 section 8.1)


@dataclasses.dataclass(frozen=True, slots=True)
class ValidationResult:
    """What validating a :class:`ValidationJob` found, handed back to the core."""

    valid: bool
    problem: Problem | None = None  # why not, when not valid
    record: Mapping[str, Any] | None = None  # what was reached (URL, address, port, resolver)


@dataclasses.dataclass(frozen=True, slots=True)
class RenewalInfo:
    """RFC 9773's answer for one certificate."""

    start: dt.datetime
    end: dt.datetime
    retry_after: dt.timedelta
    explanation: str | None = None  # a short text for the operator (why the window moved), or None
