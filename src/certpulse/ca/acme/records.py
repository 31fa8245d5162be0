"""Rows of the ACME tables as the values of :mod:`.model`, and back. Pure but for reading
related rows in the caller's transaction."""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

from cryptography import x509
from sqlalchemy import Connection, select

from certpulse.ca.acme import problems
from certpulse.ca.acme.model import Authorization, Challenge, ChallengeType, Identifier, Order
from certpulse.ca.storage import schema as t
from certpulse.errors import Reason, Refusal
from certpulse.pki import ari

# How long a client is told to wait before asking again about an order that is processing
# (waiting for a CA manager's approval): long enough not to poll the CA hard, short enough that
# an approved certificate is fetched soon after.
PROCESSING_RETRY_AFTER = dt.timedelta(seconds=60)
# Statuses of an authorization that can no longer become valid
DEAD_AUTHORIZATION = ("invalid", "deactivated", "expired", "revoked")


def identifiers_json(identifiers: tuple[Identifier, ...]) -> str:
    return json.dumps([{"type": i.type, "value": i.value} for i in identifiers])


def identifiers_of(text: str) -> tuple[Identifier, ...]:
    return tuple(Identifier(i["type"], i["value"]) for i in json.loads(text))


def require_id(value: int, what: str) -> None:
    """Ids come from URLs: anything but a plausible row id is simply not found."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value < 2**63:
        raise Refusal(Reason.NOT_FOUND, f"no {what} {str(value)[:24]}")


def replaces_text(conn: Connection, certificate_id: int | None) -> str | None:
    """The ARI identifier of the certificate an order replaces (stored by id)."""
    if certificate_id is None:
        return None
    der = conn.execute(select(t.certificates.c.der).where(t.certificates.c.id == certificate_id)).scalar()
    if der is None:
        return None
    try:
        return ari.certificate_id(x509.load_der_x509_certificate(der))
    except Refusal:
        return None


def as_order(row: Any, authorization_ids: tuple[int, ...], replaces: str | None) -> Order:
    return Order(
        id=row.id, account_id=row.account_id, status=row.status, expires_at=row.expires_at,
        identifiers=identifiers_of(row.identifiers), profile=row.profile, not_before=row.not_before,
        not_after=row.not_after, authorization_ids=authorization_ids,
        certificate_id=row.certificate_id if row.status == "valid" else None,
        error=problems.loads(row.error),
        retry_after=PROCESSING_RETRY_AFTER if row.status == "processing" else None,
        replaces=replaces,
    )


def as_challenge(row: Any) -> Challenge:
    kind: ChallengeType = row.type
    return Challenge(id=row.id, authorization_id=row.authorization_id, type=kind, token=row.token,
                     status=row.status, validated_at=row.validated_at, error=problems.loads(row.error))


def authorization_status(row: Any, now: dt.datetime) -> str:
    """An authorization's status at ``now``: a pending or valid one past its expiry is expired."""
    if row.status in ("pending", "valid") and now >= row.expires_at:
        return "expired"
    return str(row.status)


def as_authorization(row: Any, challenges: tuple[Challenge, ...], now: dt.datetime) -> Authorization:
    return Authorization(
        id=row.id, order_id=row.order_id,
        identifier=Identifier(row.identifier_type, row.identifier_value), wildcard=bool(row.wildcard),
        status=authorization_status(row, now), expires_at=row.expires_at, challenges=challenges,
    )
