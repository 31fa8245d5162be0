"""Revocation and certificate status.

A revocation for keyCompromise also blocks the certificate's key (``blocked_keys``, in the same
transaction): the request policy refuses that key to anyone from then on.

Revocation lives in the certificate's own row (``revoked_at``, ``revocation_reason``), so a
status answer is one indexed lookup by serial; a CA manager revokes, anyone may ask the status
(it is what a relying party needs, and reveals nothing a certificate does not already show).

An agent asks about all its certificates at once (:meth:`Revocation.own_statuses`: every
unexpired certificate issued to the caller, by pages) and about any others by serial list
(:meth:`Revocation.statuses`), instead of one lookup per certificate per pulse.

A hold (reason certificateHold) is a revocation that can be taken back: :meth:`Revocation.unrevoke`
releases it (the certificate is good again and leaves the CRL), or a later revocation with a
final reason replaces it. While held, the status is "revoked" with reason certificateHold.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import re
from collections.abc import Callable, Sequence
from typing import Any

from cryptography import x509
from sqlalchemy import Connection, Engine, and_, select, update
from sqlalchemy.dialects import postgresql, sqlite

from certpulse.ca.audit import AuditTrail
from certpulse.ca.model import Caller, require_manager
from certpulse.ca.results import CertificateState, CertificateStatus, Revoked, SerialStatus, StatusList, Unrevoked
from certpulse.ca.storage import schema as t
from certpulse.errors import Reason, Refusal
from certpulse.pki.certs import parse_serial, serial_hex
from certpulse.pki.keys import spki_sha256
from certpulse.pki.names import names_from_json
from certpulse.sql.db import read, write

# RFC 5280 reason names, as cryptography spells them; removeFromCRL is for delta CRLs only
REVOCATION_REASONS = tuple(
    r.value for r in x509.ReasonFlags if r not in (x509.ReasonFlags.remove_from_crl,)
)
# A certificate revoked for this reason blocks its key for good: the policy never certifies it again
KEY_COMPROMISE = x509.ReasonFlags.key_compromise.value
# A hold: revoked until released (unrevoke) or revoked for good with another reason
CERTIFICATE_HOLD = x509.ReasonFlags.certificate_hold.value

# Serials per batch status call. 500, not 1,000: the API's default body limit is 64 KiB, and 500
# entries of the longest canonical serial (40 hex digits) with the longest issuer name (64
# characters), written compactly, take 65,019 bytes; 1,000 typical ones (about 75 bytes each)
# would not fit.
MAX_SERIALS_PER_CALL = 500
# The caller's own certificates per page: about 200 bytes each in JSON, so a page stays well
# under the 4 MiB an agent reads of one answer, and an agent with 10,000 certificates asks once.
OWN_PAGE = 10_000
# Serials per SQL IN list: far under every backend's limit on bound parameters (SQLite's 32,766,
# or 999 before 3.32), and short enough for the planner to use the serial index.
_IN_CHUNK = 250


@dataclasses.dataclass(frozen=True, slots=True)
class SerialQuery:
    """A serial asked about (any hex spelling), with the issuer's name when the caller knows it."""

    serial: str
    issuer: str | None = None


class Revocation:
    def __init__(self, engine: Engine, audit: AuditTrail,
                 on_change: Callable[[int, dt.datetime], None] | None = None) -> None:
        self.engine = engine
        self._audit = audit
        # called with the authority's id after a revocation, hold or release is committed (the
        # service makes the authority's CRL again there); it must not raise
        self._on_change = on_change

    def revoke(self, caller: Caller, serial: str, reason: str, now: dt.datetime,
               issuer: str | None = None) -> Revoked:
        """Revoke an issued certificate (CA managers; ``issuer`` when the serial exists at several).

        ``certificateHold`` puts it on hold: :meth:`unrevoke` releases it. A certificate on hold
        may be revoked again with any other reason, for good (the revocation date is then now)."""
        try:
            require_manager(caller)
            if reason not in REVOCATION_REASONS:
                raise Refusal(Reason.INVALID_ARGUMENT,
                              f"unknown revocation reason {reason!r}; use one of {', '.join(REVOCATION_REASONS)}")
            with write(self.engine) as conn:
                row = _find_certificate(conn, serial, issuer)
                held = row.revocation_reason == CERTIFICATE_HOLD
                if row.revoked_at is not None and (not held or reason == CERTIFICATE_HOLD):
                    what = "put on hold" if held else "revoked"
                    raise Refusal(Reason.ALREADY_REVOKED,
                                  f"certificate {row.serial} was {what} at {row.revoked_at.isoformat()}")
                as_read = (t.certificates.c.revocation_reason == CERTIFICATE_HOLD) if held \
                    else t.certificates.c.revoked_at.is_(None)
                revoked = conn.execute(
                    update(t.certificates)
                    .where(and_(t.certificates.c.id == row.id, as_read))
                    .values(revoked_at=now, revocation_reason=reason))
                if revoked.rowcount != 1:  # a concurrent call revoked it after we read the row
                    raise Refusal(Reason.ALREADY_REVOKED, f"certificate {row.serial} was revoked meanwhile")
                if reason == KEY_COMPROMISE:
                    _block_key(conn, row, now)
                bump_revocation_revision(conn, row.authority_id)
                self._audit.record(conn, now, caller.actor, "revoked", template=row.template_name,
                                   request_id=row.request_id, serial=row.serial,
                                   names=names_from_json(row.names).all(), reason=reason,
                                   detail=f"on hold since {row.revoked_at.isoformat()}" if held else None)
        except Refusal as refusal:
            self._audit.refusal(caller.actor, "revoke-refused", refusal, now)
            raise
        self._changed(row.authority_id, now)
        return Revoked(serial=row.serial, reason=reason, revoked_at=now)

    def unrevoke(self, caller: Caller, serial: str, now: dt.datetime, issuer: str | None = None) -> Unrevoked:
        """Release a certificate from hold (CA managers): it is good again, and leaves the CRL.
        Only a hold is released; a revocation for any other reason is final (RFC 5280 5.3.1)."""
        try:
            require_manager(caller)
            with write(self.engine) as conn:
                row = _find_certificate(conn, serial, issuer)
                if row.revoked_at is None:
                    raise Refusal(Reason.NOT_ON_HOLD, f"certificate {row.serial} is not revoked, nor on hold")
                if row.revocation_reason != CERTIFICATE_HOLD:
                    raise Refusal(Reason.NOT_ON_HOLD,
                                  f"certificate {row.serial} was revoked for {row.revocation_reason}, not put on "
                                  f"hold: only a hold ({CERTIFICATE_HOLD}) is released")
                released = conn.execute(
                    update(t.certificates)
                    .where(and_(t.certificates.c.id == row.id,
                                t.certificates.c.revocation_reason == CERTIFICATE_HOLD))
                    .values(revoked_at=None, revocation_reason=None))
                if released.rowcount != 1:  # revoked for good, or released, after we read the row
                    raise Refusal(Reason.NOT_ON_HOLD, f"certificate {row.serial} changed meanwhile; look again")
                bump_revocation_revision(conn, row.authority_id)
                self._audit.record(conn, now, caller.actor, "unrevoked", template=row.template_name,
                                   request_id=row.request_id, serial=row.serial,
                                   names=names_from_json(row.names).all(), reason=CERTIFICATE_HOLD,
                                   detail=f"released from hold (on hold since {row.revoked_at.isoformat()})")
        except Refusal as refusal:
            self._audit.refusal(caller.actor, "unrevoke-refused", refusal, now)
            raise
        self._changed(row.authority_id, now)
        return Unrevoked(serial=row.serial, released_at=now, held_since=row.revoked_at)

    def _changed(self, authority_id: int, now: dt.datetime) -> None:
        if self._on_change is not None:
            self._on_change(authority_id, now)

    def status(self, serial: str, now: dt.datetime, issuer: str | None = None) -> CertificateStatus:
        """Good, revoked or expired, at ``now``."""
        with read(self.engine) as conn:
            row = _find_certificate(conn, serial, issuer)
        return CertificateStatus(
            serial=row.serial, issuer=row.issuer_name, status=_state(row.revoked_at, row.not_after, now),
            template=row.template_name, subject=row.subject, not_before=row.not_before, not_after=row.not_after,
            revoked_at=row.revoked_at,
            revocation_reason=row.revocation_reason, thumbprint=row.thumbprint,
        )


    def own_statuses(self, caller: Caller, now: dt.datetime, *, after: str | None = None,
                     limit: int = OWN_PAGE) -> StatusList:
        """Every certificate issued to ``caller`` (a principal) that has not expired at ``now``,
        revoked ones included, in issue order: one page of at most ``limit``, from the cursor
        ``after`` (the ``next_cursor`` of the page before)."""
        if caller.principal_id is None:
            raise Refusal(Reason.FORBIDDEN, f"{caller.actor} is not a principal: it has no certificates of its own")
        start = _cursor(after)
        c = t.certificates.c
        query = (select(c.id, c.serial, c.revoked_at, c.revocation_reason, c.not_after,
                        t.authorities.c.name.label("issuer_name"))
                 .join(t.authorities, t.authorities.c.id == c.authority_id)
                 .where(and_(c.principal_id == caller.principal_id, c.status == "issued", c.not_after > now,
                             c.id > start))
                 .order_by(c.id).limit(limit + 1))
        with read(self.engine) as conn:
            rows = conn.execute(query).all()
        more = len(rows) > limit
        rows = rows[:limit]
        return StatusList(certificates=tuple(_serial_status(row, now) for row in rows),
                          next_cursor=str(rows[-1].id) if more else None)

    def statuses(self, queries: Sequence[SerialQuery], now: dt.datetime) -> StatusList:
        """The status of each serial asked about, in the order asked: a serial this CA never
        issued (at the issuer named) is "unknown", not an error; a serial at several issuers,
        asked without one, answers once per issuer. Public, as :meth:`status` is."""
        if len(queries) > MAX_SERIALS_PER_CALL:
            raise Refusal(Reason.INVALID_ARGUMENT,
                          f"at most {MAX_SERIALS_PER_CALL} serials per call ({len(queries)} were asked)")
        wanted: list[tuple[str, str | None]] = []
        for index, query in enumerate(queries):
            try:
                wanted.append((serial_hex(parse_serial(query.serial)), query.issuer))
            except Refusal as refusal:
                raise Refusal(refusal.reason, f"certificates[{index}]: {refusal.detail}") from None
        found: dict[str, list[Any]] = {}
        distinct = sorted({serial for serial, _ in wanted})
        c = t.certificates.c
        with read(self.engine) as conn:
            for start in range(0, len(distinct), _IN_CHUNK):
                chunk = distinct[start:start + _IN_CHUNK]
                lookup = (select(c.serial, c.revoked_at, c.revocation_reason, c.not_after,
                                 t.authorities.c.name.label("issuer_name"))
                          .join(t.authorities, t.authorities.c.id == c.authority_id)
                          .where(and_(c.serial.in_(chunk), c.status == "issued")))
                for row in conn.execute(lookup):
                    found.setdefault(row.serial, []).append(row)
        answers: list[SerialStatus] = []
        for serial, issuer in wanted:
            rows = [row for row in found.get(serial, ()) if issuer is None or row.issuer_name == issuer]
            if not rows:
                answers.append(SerialStatus(serial=serial, issuer=issuer, status="unknown", revoked_at=None,
                                            revocation_reason=None, not_after=None))
            answers.extend(_serial_status(row, now) for row in sorted(rows, key=lambda r: r.issuer_name))
        return StatusList(certificates=tuple(answers))


def _cursor(after: str | None) -> int:
    """The certificate id a page starts after (0: the first page); anything but one we gave is refused."""
    if after is None:
        return 0
    if not re.fullmatch(r"[0-9]{1,18}", after):
        raise Refusal(Reason.INVALID_ARGUMENT, "the cursor is not one this CA gave")
    return int(after)


def _state(revoked_at: dt.datetime | None, not_after: dt.datetime, now: dt.datetime) -> CertificateState:
    """Revoked before expired: a revoked certificate stays revoked once it has expired too."""
    return "revoked" if revoked_at else ("expired" if now > not_after else "good")


def _serial_status(row: Any, now: dt.datetime) -> SerialStatus:
    return SerialStatus(serial=row.serial, issuer=row.issuer_name, status=_state(row.revoked_at, row.not_after, now),
                        revoked_at=row.revoked_at, revocation_reason=row.revocation_reason, not_after=row.not_after)


def bump_revocation_revision(conn: Connection, authority_id: int) -> None:
    """Mark the authority's published revocation state (CRL, cached OCSP answers) stale, in the
    transaction that changed it."""
    conn.execute(update(t.authorities).where(t.authorities.c.id == authority_id)
                 .values(revocation_revision=t.authorities.c.revocation_revision + 1))


def _block_key(conn: Connection, row: Any, now: dt.datetime) -> None:
    """Record a compromised certificate's key as blocked (the first serial that blocked it stays)."""
    key = spki_sha256(x509.load_der_x509_certificate(row.der).public_key())
    insert = postgresql.insert if conn.dialect.name == "postgresql" else sqlite.insert
    conn.execute(insert(t.blocked_keys).values(
        key_sha256=key, serial=row.serial, authority_id=row.authority_id, blocked_at=now,
    ).on_conflict_do_nothing(index_elements=["key_sha256"]))


def _find_certificate(conn: Connection, serial: str, issuer: str | None) -> Any:
    """The issued certificate with this serial (any spelling of the hex), with its issuer's name."""
    canonical = serial_hex(parse_serial(serial))
    query = select(t.certificates, t.authorities.c.name.label("issuer_name")).join(
        t.authorities, t.authorities.c.id == t.certificates.c.authority_id
    ).where(and_(t.certificates.c.serial == canonical, t.certificates.c.status == "issued"))
    if issuer is not None:
        query = query.where(t.authorities.c.name == issuer)
    rows = conn.execute(query).all()
    if not rows:
        raise Refusal(Reason.NOT_FOUND, f"no certificate with serial {canonical}")
    if len(rows) > 1:
        raise Refusal(Reason.INVALID_ARGUMENT, f"serial {canonical} exists at several issuers; name one")
    return rows[0]
