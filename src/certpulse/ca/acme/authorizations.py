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

from sqlalchemy import Connection, and_, bindparam, select, update

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

# The statements of every order's requests, built once: building a statement and its cache key
# at each call cost more CPU than running it.
_a, _c = t.acme_authorizations.c, t.acme_challenges.c
_AUTHORIZATION = select(t.acme_authorizations).where(and_(_a.id == bindparam("p_id"),
                                                          _a.account_id == bindparam("p_account")))
_AUTHORIZATION_LOCKED = _AUTHORIZATION.with_for_update()
_CHALLENGES = select(t.acme_challenges).where(_c.authorization_id == bindparam("p_id")).order_by(_c.id)
_CHALLENGE = (select(t.acme_challenges, _a.account_id, _a.status.label("authorization_status"), _a.expires_at,
                     _a.identifier_type, _a.identifier_value, _a.order_id)
              .join(t.acme_authorizations, _a.id == _c.authorization_id)
              .where(and_(_c.id == bindparam("p_id"), _a.account_id == bindparam("p_account"))))
_CHALLENGE_LOCKED = _CHALLENGE.with_for_update()
_START = (update(t.acme_challenges).where(_c.id == bindparam("p_id"))
          .values(status="processing", started_at=bindparam("p_now")))
_RECORDED_CHALLENGE = (select(t.acme_challenges, _a.order_id, _a.account_id, _a.status.label("authorization_status"),
                              _a.identifier_type, _a.identifier_value, _a.wildcard)
                       .join(t.acme_authorizations, _a.id == _c.authorization_id)
                       .where(_c.id == bindparam("p_id")).with_for_update())
_DECIDE_CHALLENGE = (update(t.acme_challenges).where(_c.id == bindparam("p_id"))
                     .values(status=bindparam("p_status"), validated_at=bindparam("p_validated"),
                             error=bindparam("p_error"), record=bindparam("p_record")))
_DECIDE_AUTHORIZATION = update(t.acme_authorizations).where(_a.id == bindparam("p_id")).values(
    status=bindparam("p_status"))
_LOCK_ORDER = select(t.acme_orders.c.id).where(t.acme_orders.c.id == bindparam("p_id")).with_for_update()
_ORDER_STATUSES = select(_a.status).where(_a.order_id == bindparam("p_id"))
_ORDER_READY = (update(t.acme_orders).where(and_(t.acme_orders.c.id == bindparam("p_id"),
                                                 t.acme_orders.c.status == "pending"))
                .values(status="ready", updated_at=bindparam("p_now")))


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
        row = conn.execute(_AUTHORIZATION_LOCKED if lock else _AUTHORIZATION,
                           {"p_id": authorization_id, "p_account": account.id}).first()
        if row is None:
            raise Refusal(Reason.NOT_FOUND, f"no authorization {authorization_id}")
        return row

    @staticmethod
    def _challenges(conn: Connection, authorization_id: int) -> tuple[Challenge, ...]:
        return tuple(records.as_challenge(row) for row in conn.execute(_CHALLENGES, {"p_id": authorization_id}))

    def authorization(self, account: Account, authorization_id: int, now: dt.datetime) -> Authorization:
        with read(self.engine) as conn:
            row = self._authorization_row(conn, account, authorization_id)
            return records.as_authorization(row, self._challenges(conn, row.id), now)

    @staticmethod
    def _challenge_row(conn: Connection, account: Account, challenge_id: int, *, lock: bool = False) -> Any:
        records.require_id(challenge_id, "challenge")
        row = conn.execute(_CHALLENGE_LOCKED if lock else _CHALLENGE,
                           {"p_id": challenge_id, "p_account": account.id}).first()
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
            conn.execute(_START, {"p_id": row.id, "p_now": now})
            row = self._challenge_row(conn, account, challenge_id)
        job = ValidationJob(challenge_id=row.id, type=row.type,
                            identifier=Identifier(row.identifier_type, row.identifier_value), token=row.token,
                            key_authorization=f"{row.token}.{account.key_thumbprint}")
        return records.as_challenge(row), job

    def record(self, job: ValidationJob, result: ValidationResult, now: dt.datetime) -> None:
        """A validation's outcome: the challenge and its authorization valid or invalid, and the
        order ready when every authorization is valid, invalid as soon as one is not. An outcome
        for a challenge no longer processing (handed out again, or decided) changes nothing."""
        with write(self.engine) as conn:
            row = conn.execute(_RECORDED_CHALLENGE, {"p_id": job.challenge_id}).first()
            if row is None or row.status != "processing" or row.token != job.token:
                return
            identifier = Identifier(row.identifier_type, row.identifier_value)
            problem = None if result.valid else (result.problem or Problem(
                Reason.VALIDATION_FAILED, "the challenge did not validate", acme_type="unauthorized"))
            if problem is not None and problem.identifier is None:
                problem = Problem(problem.reason, problem.detail, identifier, problem.subproblems, problem.acme_type)
            seen = _record_json(result)
            conn.execute(_DECIDE_CHALLENGE, {
                "p_id": row.id, "p_status": "valid" if result.valid else "invalid",
                "p_validated": now if result.valid else None, "p_error": problems.dumps(problem), "p_record": seen})
            if row.authorization_status != "pending":
                return
            conn.execute(_DECIDE_AUTHORIZATION, {"p_id": row.authorization_id,
                                                 "p_status": "valid" if result.valid else "invalid"})
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
        o = t.acme_orders.c
        # The order's row first: two validations of one order's authorizations finishing at once
        # then read the statuses one after the other, and the second sees the first's (PostgreSQL)
        conn.execute(_LOCK_ORDER, {"p_id": order_id})
        statuses = list(conn.execute(_ORDER_STATUSES, {"p_id": order_id}).scalars())
        if any(s in records.DEAD_AUTHORIZATION for s in statuses):
            error = Problem(Reason.VALIDATION_FAILED if problem is not None else Reason.UNAUTHENTICATED,
                            "an authorization of the order failed" if problem is not None
                            else "an authorization of the order was deactivated",
                            subproblems=(problem,) if problem is not None else (),
                            acme_type="unauthorized")
            conn.execute(update(t.acme_orders).where(and_(o.id == order_id, o.status.in_(("pending", "ready"))))
                         .values(status="invalid", error=problems.dumps(error), updated_at=now))
        elif all(s == "valid" for s in statuses):
            conn.execute(_ORDER_READY, {"p_id": order_id, "p_now": now})

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
