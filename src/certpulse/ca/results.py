"""What the CA core answers: one frozen value per outcome, never a dictionary of a wire format.

Every front end (the native HTTP API now; ACME, EST, SCEP or CMP later) calls the same core
and maps these values, and :class:`~certpulse.errors.Refusal`, to its own protocol at its edge:
the core knows no status code and no JSON field name, so a new front end cannot change what an
existing one answers, and a renamed field is a type error instead of a silent ``KeyError``.

Times are timezone-aware UTC datetimes and certificates are PEM text: what every front end so
far sends. They are slotted because the issuance path builds one of them per request.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from typing import Literal

from certpulse.ca.templates import Template

RequestStatus = Literal["pending", "issued", "denied", "failed"]
CertificateState = Literal["good", "revoked", "expired"]
# What a batch status answer says of a serial: "unknown" when this CA issued no such certificate
SerialState = Literal["good", "revoked", "expired", "unknown"]


@dataclasses.dataclass(frozen=True, slots=True)
class Issued:
    """A certificate signed for a request: now, or when its approval was given."""

    request_id: int
    serial: str  # lower-case hex, as stored
    thumbprint: str  # SHA-1, upper-case hex
    certificate: str  # PEM
    chain: tuple[str, ...]  # PEM: the issuing CA first, up to the root


@dataclasses.dataclass(frozen=True, slots=True)
class Pending:
    """A request recorded to wait for a CA manager's approval."""

    request_id: int


@dataclasses.dataclass(frozen=True, slots=True)
class RequestSummary:
    """A recorded request as it stands, with its certificate once issued."""

    request_id: int
    status: RequestStatus
    template: str
    kind: str  # new | renewal
    requester: str
    subject: str
    names: tuple[str, ...]
    created_at: dt.datetime
    decided_at: dt.datetime | None
    decided_by: str | None
    reason: str | None  # why it was denied
    issued: Issued | None = None  # only where the operation reads the certificate (not in listings)


@dataclasses.dataclass(frozen=True, slots=True)
class Replayed:
    """A retry with an idempotency key already used for the same request: the first request as
    it stands now (issued, still pending, or denied), never a second certificate."""

    request: RequestSummary


@dataclasses.dataclass(frozen=True, slots=True)
class Approved:
    """A pending request approved by a CA manager, and the certificate it was issued."""

    issued: Issued


@dataclasses.dataclass(frozen=True, slots=True)
class Denied:
    request_id: int
    reason: str


@dataclasses.dataclass(frozen=True, slots=True)
class RequestList:
    requests: tuple[RequestSummary, ...]


@dataclasses.dataclass(frozen=True, slots=True)
class Revoked:
    serial: str
    reason: str  # an RFC 5280 reason name, e.g. keyCompromise
    revoked_at: dt.datetime


@dataclasses.dataclass(frozen=True, slots=True)
class Unrevoked:
    """A certificate released from hold (certificateHold): good again."""

    serial: str
    released_at: dt.datetime
    held_since: dt.datetime


@dataclasses.dataclass(frozen=True, slots=True)
class PublishedCRL:
    """An authority's CRL as published: the DER relying parties fetch, and what it says."""

    authority: str
    number: int  # the CRL number (RFC 5280 5.2.3): grows with every CRL signed
    revision: int  # the authority's revocation revision it reflects
    this_update: dt.datetime
    next_update: dt.datetime
    entries: int
    der: bytes = dataclasses.field(repr=False)
    refresh_at: dt.datetime  # when it is made again (thisUpdate + crl_period, at latest nextUpdate)

    @property
    def etag(self) -> str:
        """An HTTP entity tag: the CRL number names the contents (a new CRL, a new number)."""
        return f'"crl-{self.number}"'


@dataclasses.dataclass(frozen=True, slots=True)
class CertificateStatus:
    serial: str
    issuer: str
    status: CertificateState
    template: str
    subject: str
    not_before: dt.datetime
    not_after: dt.datetime
    revoked_at: dt.datetime | None
    revocation_reason: str | None
    thumbprint: str | None


@dataclasses.dataclass(frozen=True, slots=True)
class SerialStatus:
    """One certificate's status in a batch answer: only what a relying party or an agent acts on.
    An unknown serial has no dates and ``issuer`` is the one asked about (None when none was)."""

    serial: str  # lower-case hex, as stored
    issuer: str | None
    status: SerialState
    revoked_at: dt.datetime | None
    revocation_reason: str | None
    not_after: dt.datetime | None


@dataclasses.dataclass(frozen=True, slots=True)
class StatusList:
    """The status of many certificates in one answer. ``next_cursor``: where the next page of the
    caller's own certificates starts (None: this was the last one, or a list of serials was asked)."""

    certificates: tuple[SerialStatus, ...]
    next_cursor: str | None = None


@dataclasses.dataclass(frozen=True, slots=True)
class Credential:
    """A principal's long-lived bearer credential, given once for its enrollment token."""

    principal: str
    kind: str
    credential: str = dataclasses.field(repr=False)  # a secret: never in a log line or traceback


@dataclasses.dataclass(frozen=True, slots=True)
class AuditEntry:
    entry_id: int
    at: dt.datetime
    actor: str
    action: str
    template: str | None
    request_id: int | None
    serial: str | None
    names: tuple[str, ...]
    reason: str | None
    detail: str | None


@dataclasses.dataclass(frozen=True, slots=True)
class AuditLog:
    entries: tuple[AuditEntry, ...]  # newest first


@dataclasses.dataclass(frozen=True, slots=True)
class TemplateOffer:
    """A template the caller may read, with the rights it holds on it (the seed's CEP template)."""

    template: Template
    rights: frozenset[str]


@dataclasses.dataclass(frozen=True, slots=True)
class IssuerOffer:
    """An enabled issuing CA, its cost and the templates it serves."""

    name: str
    certificate: str  # PEM
    cost: int
    renewal_only: bool
    templates: tuple[str, ...]
    thumbprint: str


@dataclasses.dataclass(frozen=True, slots=True)
class PublishedCertificate:
    """One of the caller's valid certificates (the seed's userCertificate directory attribute)."""

    template: str
    serial: str
    thumbprint: str | None
    not_after: dt.datetime


@dataclasses.dataclass(frozen=True, slots=True)
class PolicyDocument:
    """The enrollment policy for one caller (the seed's CEP answer)."""

    policy_id: str
    generated_at: dt.datetime
    refresh_after_seconds: int
    templates: tuple[TemplateOffer, ...]
    issuers: tuple[IssuerOffer, ...]
    roots: tuple[str, ...]  # PEM
    intermediates: tuple[str, ...]  # PEM
    kra: tuple[str, ...]  # PEM
    directory: tuple[PublishedCertificate, ...]
    cross_certificates: tuple[str, ...] = ()  # PEM: a new root's subject and key, signed by an older root


Submission = Issued | Pending | Replayed
Result = (Submission | Approved | Denied | RequestSummary | RequestList | Revoked | Unrevoked | CertificateStatus
          | StatusList | Credential | AuditLog | PolicyDocument)
