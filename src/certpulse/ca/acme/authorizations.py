"""Authorizations and challenges (RFC 8555 sections 7.5, 8): who proved control of which name.

The core does not connect anywhere: :meth:`Authorizations.respond` hands the front end a
:class:`~.model.ValidationJob` (the challenge is then ``processing``), the front end runs it
with :mod:`certpulse.validation` and reports the outcome to :meth:`Authorizations.record`. A
challenge left processing for twice the validation timeout (the process that ran it died) is
handed out again when the client asks once more.
"""

from __future__ import annotations

import datetime as dt
import json
from typing import TYPE_CHECKING, Any

from sqlalchemy import Connection, and_, select, update

from certpulse.ca.acme import problems, records
from certpulse.ca.acme.accounts import actor_of
from certpulse.ca.acme.model import (
    Account,
    Authorization,
    Challenge,
    Identifier,
    Problem,
    ValidationJob,
    ValidationResult,
)
from certpulse.ca.storage import schema as t
from certpulse.errors import Reason, Refusal
from certpulse.sql.db import read, write

if TYPE_CHECKING:
    from certpulse.ca.acme.service import ACMEAuthority

MAX_RECORD = 4000  # what validation saw, as stored


def _record_json(result: ValidationResult) -> str | None:
    """What validation saw, as stored: JSON, cut to a bounded size (still JSON when cut)."""
    if result.record is None:
        return None
    text = json.dumps(dict(result.record), default=str)
    return text if len(text) <= MAX_RECORD else json.dumps({"truncated": text[:MAX_RECORD // 2]})


class Authorizations:
    def __init__(self, authority: ACMEAuthority) -> None:
        self._acme = authority
        self.engine = authority.service.engine

    # -- reading ------------------------------------------------------------------------

    @staticmethod
    def _authorization_row(conn: Connection, account: Account, authorization_id: int, *,
                           lock: bool = False) -> Any:
        records.require_id(authorization_id, "authorization")
        a = t.acme_authorizations.c
        query = select(t.acme_authorizations).where(and_(a.id == authorization_id, a.account_id == account.id))
        row = conn.execute(query.with_for_update() if lock else query).first()
        if row is None:
            raise Refusal(Reason.NOT_FOUND, f"no authorization {authorization_id}")
        return row

    @staticmethod
    def _challenges(conn: Connection, authorization_id: int) -> tuple[Challenge, ...]:
        c = t.acme_challenges.c
        return tuple(records.as_challenge(row) for row in conn.execute(
            select(t.acme_challenges).where(c.authorization_id == authorization_id).order_by(c.id)))

    def authorization(self, account: Account, authorization_id: int, now: dt.datetime) -> Authorization:
        with read(self.engine) as conn:
            row = self._authorization_row(conn, account, authorization_id)
            return records.as_authorization(row, self._challenges(conn, row.id), now)

    @staticmethod
    def _challenge_row(conn: Connection, account: Account, challenge_id: int, *, lock: bool = False) -> Any:
        records.require_id(challenge_id, "challenge")
        c, a = t.acme_challenges.c, t.acme_authorizations.c
        query = (select(t.acme_challenges, a.account_id, a.status.label("authorization_status"),
                        a.expires_at, a.identifier_type, a.identifier_value, a.order_id)
                 .join(t.acme_authorizations, a.id == c.authorization_id)
                 .where(and_(c.id == challenge_id, a.account_id == account.id)))
        row = conn.execute(query.with_for_update() if lock else query).first()
        if row is None:
            raise Refusal(Reason.NOT_FOUND, f"no challenge {challenge_id}")
        return row

    def challenge(self, account: Account, challenge_id: int, now: dt.datetime) -> Challenge:
        with read(self.engine) as conn:
            return records.as_challenge(self._challenge_row(conn, account, challenge_id))

    # -- validation ---------------------------------------------------------------------

    def respond(self, account: Account, challenge_id: int, now: dt.datetime) -> tuple[Challenge, ValidationJob | None]:
        """The client is ready: start validating a pending challenge (or one whose validator
        died), or answer it as it is."""
        stale = now - 2 * self._acme.config.duration("validation_timeout")
        with write(self.engine) as conn:
            row = self._challenge_row(conn, account, challenge_id, lock=True)
            if now >= row.expires_at and row.authorization_status == "pending":
                raise Refusal(Reason.MALFORMED_REQUEST, f"authorization {row.authorization_id} has expired")
            startable = row.status == "pending" or (
                row.status == "processing" and (row.started_at is None or row.started_at <= stale))
            if row.authorization_status != "pending" or not startable:
                return records.as_challenge(row), None
            conn.execute(update(t.acme_challenges).where(t.acme_challenges.c.id == row.id)
                         .values(status="processing", started_at=now))
            row = self._challenge_row(conn, account, challenge_id)
        job = ValidationJob(challenge_id=row.id, type=row.type,
                            identifier=Identifier(row.identifier_type, row.identifier_value), token=row.token,
                            key_authorization=f"{row.token}.{account.key_thumbprint}")
        return records.as_challenge(row), job

    def record(self, job: ValidationJob, result: ValidationResult, now: dt.datetime) -> None:
        """A validation's outcome: the challenge and its authorization valid or invalid, and the
        order ready when every authorization is valid, invalid as soon as one is not. An outcome
        for a challenge no longer processing (handed out again, or decided) changes nothing."""
        c, a = t.acme_challenges.c, t.acme_authorizations.c
        with write(self.engine) as conn:
            row = conn.execute(
                select(t.acme_challenges, a.order_id, a.account_id, a.status.label("authorization_status"),
                       a.identifier_type, a.identifier_value, a.wildcard)
                .join(t.acme_authorizations, a.id == c.authorization_id)
                .where(c.id == job.challenge_id).with_for_update()).first()
            if row is None or row.status != "processing" or row.token != job.token:
                return
            identifier = Identifier(row.identifier_type, row.identifier_value)
            problem = None if result.valid else (result.problem or Problem(
                Reason.VALIDATION_FAILED, "the challenge did not validate", acme_type="unauthorized"))
            if problem is not None and problem.identifier is None:
                problem = Problem(problem.reason, problem.detail, identifier, problem.subproblems, problem.acme_type)
            seen = _record_json(result)
            conn.execute(update(t.acme_challenges).where(c.id == row.id).values(
                status="valid" if result.valid else "invalid", validated_at=now if result.valid else None,
                error=problems.dumps(problem), record=seen))
            if row.authorization_status != "pending":
                return
            conn.execute(update(t.acme_authorizations).where(a.id == row.authorization_id)
                         .values(status="valid" if result.valid else "invalid"))
            shown = ("*." if row.wildcard else "") + row.identifier_value
            self._acme.service.audit.record(
                conn, now, f"acme-account:{row.account_id}",
                "acme-authorization-valid" if result.valid else "acme-authorization-invalid",
                names=[shown], reason=None if problem is None else problem.reason.value,
                detail=f"authorization {row.authorization_id} by {row.type}"
                       + ("" if problem is None else f": {problem.detail}"))
            self._settle_order(conn, row.order_id, now, problem)

    def _settle_order(self, conn: Connection, order_id: int, now: dt.datetime, problem: Problem | None) -> None:
        """A pending order after one of its authorizations changed: ready, invalid, or still pending."""
        o, a = t.acme_orders.c, t.acme_authorizations.c
        # The order's row first: two validations of one order's authorizations finishing at once
        # then read the statuses one after the other, and the second sees the first's (PostgreSQL)
        conn.execute(select(o.id).where(o.id == order_id).with_for_update())
        statuses = list(conn.execute(select(a.status).where(a.order_id == order_id)).scalars())
        if any(s in records.DEAD_AUTHORIZATION for s in statuses):
            error = Problem(Reason.VALIDATION_FAILED if problem is not None else Reason.UNAUTHENTICATED,
                            "an authorization of the order failed" if problem is not None
                            else "an authorization of the order was deactivated",
                            subproblems=(problem,) if problem is not None else (),
                            acme_type="unauthorized")
            conn.execute(update(t.acme_orders).where(and_(o.id == order_id, o.status.in_(("pending", "ready"))))
                         .values(status="invalid", error=problems.dumps(error), updated_at=now))
        elif all(s == "valid" for s in statuses):
            conn.execute(update(t.acme_orders).where(and_(o.id == order_id, o.status == "pending"))
                         .values(status="ready", updated_at=now))

    def deactivate(self, account: Account, authorization_id: int, now: dt.datetime) -> Authorization:
        """The client gives up an authorization (RFC 8555 section 7.5.2); its order can no longer
        be finalized."""
        with write(self.engine) as conn:
            row = self._authorization_row(conn, account, authorization_id, lock=True)
            if records.authorization_status(row, now) not in ("pending", "valid"):
                raise Refusal(Reason.MALFORMED_REQUEST, f"authorization {authorization_id} is "
                                                        f"{records.authorization_status(row, now)}; only a pending "
                                                        "or valid one is deactivated")
            conn.execute(update(t.acme_authorizations).where(t.acme_authorizations.c.id == row.id)
                         .values(status="deactivated"))
            self._acme.service.audit.record(
                conn, now, actor_of(account), "acme-authorization-deactivated",
                names=[("*." if row.wildcard else "") + row.identifier_value],
                detail=f"authorization {row.id} of order {row.order_id}")
            self._settle_order(conn, row.order_id, now, None)
            row = self._authorization_row(conn, account, authorization_id)
            return records.as_authorization(row, self._challenges(conn, row.id), now)
