"""The registration authority: certificate requests, from submission to a decision.

A submission is checked against the request policy (:func:`certpulse.ca.policy.decide`) and
then issued at once, left pending for a CA manager, or refused; a retry carrying an idempotency
key already used gets the first request back instead. CA managers approve or deny pending
requests; requesters and managers read them.

The submission is the hot path (hundreds a second), so its CPU work stays out of the write
transaction: the request is decided first, on the cached state snapshot and a remembered caller,
and its certificate prepared; the write transaction then only confirms that neither moved (the
state generation, the caller's credential, what the database says of presented certificates)
before it records and signs. Anything that moved, and every refusal, is decided again inside
the transaction against the database as it is. On SQLite the write transaction is the one writer
of the whole database, so this is what lets several workers issue at once.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from typing import Any

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from sqlalchemy import Connection, Engine, and_, select, update
from sqlalchemy.exc import IntegrityError

from certpulse.ca import policy as request_policy
from certpulse.ca.audit import AuditTrail
from certpulse.ca.auth import Authentication
from certpulse.ca.issuance import CertificateAuthority, Unsigned
from certpulse.ca.model import Caller, EnrollmentRequest, KnownCertificate, require_manager
from certpulse.ca.policy import CLEAN_KEY, KeyStanding
from certpulse.ca.results import (
    Approved,
    Denied,
    Issued,
    Pending,
    Replayed,
    RequestList,
    RequestSummary,
    Submission,
)
from certpulse.ca.row_ids import require_row_id
from certpulse.ca.state import KeyRing, Snapshot, SnapshotCache
from certpulse.ca.storage import schema as t
from certpulse.ca.storage.statements import REQUEST_ISSUED, Statements
from certpulse.errors import Reason, Refusal
from certpulse.pki.certs import load_csr, pem, thumbprint
from certpulse.pki.key_archival import dumps as envelope_json
from certpulse.pki.keys import spki_sha256
from certpulse.pki.names import names_from_json
from certpulse.sql.db import read, write


@dataclasses.dataclass(frozen=True, slots=True)
class _Ahead:
    """A decision made before the write transaction, and the state it rested on."""

    decision: request_policy.Decision
    generation: int
    known: dict[str, KnownCertificate]
    unsigned: Unsigned | None  # None when the request waits for approval


class RegistrationAuthority:
    def __init__(self, engine: Engine, statements: Statements, state: SnapshotCache, keyring: KeyRing,
                 auth: Authentication, ca: CertificateAuthority, audit: AuditTrail) -> None:
        self.engine = engine
        self._insert_request_row = statements.insert_request
        self._confirm_and_key = statements.confirm_and_key
        self._key_standing_row = statements.key_standing
        self._state = state
        self._keyring = keyring
        self._auth = auth
        self._ca = ca
        self._audit = audit

    # -- submission ---------------------------------------------------------------------

    def submit(self, caller: Caller, req: EnrollmentRequest, now: dt.datetime) -> Submission:
        """Check a request and either issue, leave it pending, or refuse it (audited either way)."""
        try:
            if caller.kind != "principal":
                raise Refusal(Reason.FORBIDDEN, "only principals enroll; use the principal's credential")
            ahead = self._decide_ahead(caller, req, now)
            key = ahead.decision.key_sha256 if ahead is not None else _key_of(req)
            with write(self.engine) as conn:
                generation, current, standing = self._confirm(conn, caller, key)
                if current is not caller:
                    ahead, caller = None, current
                if req.idempotency_key is not None:
                    replay = self._replay(conn, caller, req)
                    if replay is not None:
                        return replay
                presents = req.renewal is not None or bool(req.ra_signatures)
                if ahead is not None and ahead.generation == generation and standing == CLEAN_KEY and (
                        not presents or self._known(conn, req) == ahead.known):
                    decision, unsigned = ahead.decision, ahead.unsigned
                else:  # the state moved (or the policy refused): decide on the database as it is now
                    decision = request_policy.decide(caller, req, self._gather(conn, req, standing), now)
                    unsigned = None
                if not decision.pending:
                    return self._issue(conn, unsigned or self._ca.prepare(decision), now, generation,
                                       actor=caller.actor, principal_id=caller.principal_id,
                                       new_by=caller, idempotency_key=req.idempotency_key, lineage=req.lineage)
                request_id = self._insert_request(conn, caller, decision, now, req.idempotency_key,
                                                  lineage=req.lineage)
                self._audit.record(conn, now, caller.actor, "pending", template=decision.template.name,
                                   request_id=request_id, names=decision.names.all(),
                                   detail=f"{decision.kind} request awaits CA-manager approval")
                return Pending(request_id)
        except Refusal as refusal:
            self._audit.refusal(caller.actor, "refused", refusal, now, template=req.template)
            raise
        except IntegrityError:
            # On PostgreSQL a principal removed while its submission was in flight fails the
            # submission's foreign key: refused as unauthenticated (audited) when that is what happened
            self._auth.current(caller, now)
            raise

    def _confirm(self, conn: Connection, caller: Caller, key: str | None) -> tuple[int, Caller, KeyStanding]:
        """The caller confirmed (:meth:`Authentication.confirm`) and the standing of the request's
        key, read in one round trip: a submission's only reads before it writes."""
        if caller.credential_hash is None:
            generation, current = self._auth.confirm(conn, caller)
            return generation, current, self._key_standing(conn, key, current.principal_id)
        value, holds, blocked_by, other = self._confirm_and_key.run(conn, {
            "principal_id": caller.principal_id, "credential_hash": caller.credential_hash, "key_sha256": key,
        }).fetchone()
        generation, current = self._auth.confirmed(conn, caller, value, holds)
        if current.principal_id != caller.principal_id:
            return generation, current, self._key_standing(conn, key, current.principal_id)
        return generation, current, KeyStanding(blocked_by, bool(other))

    def _key_standing(self, conn: Connection, key: str | None, principal_id: int | None) -> KeyStanding:
        """What the database says of a key: blocked, or requested by a principal other than this one."""
        if key is None:  # a CSR without a readable key: the policy refuses it anyway
            return CLEAN_KEY
        blocked_by, other = self._key_standing_row.run(
            conn, {"key_sha256": key, "principal_id": principal_id}).fetchone()
        return KeyStanding(blocked_by, bool(other))

    def _replay(self, conn: Connection, caller: Caller, req: EnrollmentRequest) -> Replayed | None:
        """The earlier request with the same idempotency key, if any: a retry after a lost answer
        gets the first result (and never a second certificate)."""
        row = conn.execute(select(t.requests).where(and_(
            t.requests.c.principal_id == caller.principal_id,
            t.requests.c.idempotency_key == req.idempotency_key,
        ))).first()
        if row is None:
            return None
        try:
            same = x509.load_der_x509_csr(row.csr_der) == load_csr(req.csr)
        except Refusal:
            same = False
        if not same or row.template_name != req.template:
            raise Refusal(Reason.CONFLICT, "this idempotency key was used for a different request")
        return Replayed(self._with_certificate(conn, row))

    def _decide_ahead(self, caller: Caller, req: EnrollmentRequest, now: dt.datetime) -> _Ahead | None:
        """The policy's decision before the write transaction, on the cached snapshot (read when
        there is none yet) and, when the request presents certificates, on what the database says
        of them now; with its certificate prepared. None when the policy refuses: a refusal is
        decided again in the transaction, after any replay and against the current state, so that
        it is never a stale one."""
        snap = self._state.current
        known: dict[str, KnownCertificate] = {}
        if snap is None or req.renewal is not None or req.ra_signatures:
            with read(self.engine) as conn:
                snap = self._state.get(conn)
                known = self._known(conn, req)
        try:
            decision = request_policy.decide(caller, req, self._gathered(snap, req, known), now)
        except Refusal:
            return None
        return _Ahead(decision, snap.generation, known, None if decision.pending else self._ca.prepare(decision))

    def _gather(self, conn: Connection, req: EnrollmentRequest, key: KeyStanding) -> request_policy.Gathered:
        return dataclasses.replace(self._gathered(self._state.get(conn), req, self._known(conn, req)), key=key)

    @staticmethod
    def _known(conn: Connection, req: EnrollmentRequest) -> dict[str, KnownCertificate]:
        """What the database says of the certificates a request presents (renewal, RA signatures)."""
        presented = [e.certificate for e in (*req.ra_signatures, *([req.renewal] if req.renewal else []))]
        known: dict[str, KnownCertificate] = {}
        if presented:
            prints = [thumbprint(c) for c in presented]
            for row in conn.execute(select(t.certificates).where(t.certificates.c.thumbprint.in_(prints))):
                known[row.thumbprint] = KnownCertificate(
                    id=row.id, authority_id=row.authority_id, serial=row.serial,
                    principal_id=row.principal_id, template_name=row.template_name,
                    not_before=row.not_before, not_after=row.not_after, revoked_at=row.revoked_at,
                )
        return known

    def _gathered(self, snap: Snapshot, req: EnrollmentRequest,
                  known: dict[str, KnownCertificate]) -> request_policy.Gathered:
        template = snap.templates.get(req.template)
        kra = snap.kra() if template is not None and template.archive_private_key else None
        return request_policy.Gathered(
            template=template, authorities=snap.authorities, known=known,
            kra=kra, kra_key=self._keyring.kra_key(kra),
        )

    def _insert_request(self, conn: Connection, caller: Caller, d: request_policy.Decision, now: dt.datetime,
                        idempotency_key: str | None = None, certificate_id: int | None = None,
                        lineage: int | None = None) -> int:
        """The request's row: pending, or (with ``certificate_id``) issued now. ``lineage``: the
        certificate a trusted front end says it replaces, when it presented no renewal evidence."""
        renewal_of = d.renewal_of.id if d.renewal_of else lineage
        cursor = self._insert_request_row.run(conn, {
            "principal_id": caller.principal_id, "requester": caller.actor, "template_name": d.template.name,
            "template_major": d.template.major_version, "template_minor": d.template.minor_version,
            "kind": "renewal" if renewal_of is not None else d.kind, "csr_der": d.csr_der,
            "subject": d.subject_text(), "names": d.names_json(),
            "renewal_of": renewal_of, "authority_id": d.issuer.id,
            "status": "issued" if certificate_id is not None else "pending", "created_at": now,
            "decided_at": now if certificate_id is not None else None, "decided_by": None,
            "certificate_id": certificate_id, "idempotency_key": idempotency_key, "key_sha256": d.key_sha256,
        })
        request_id = int(cursor.fetchone()[0])
        if d.archived_key is not None:
            kra_id = conn.execute(
                select(t.authorities.c.id).where(t.authorities.c.role == "kra").order_by(t.authorities.c.id)
            ).scalar_one()
            conn.execute(t.archived_keys.insert().values(
                request_id=request_id, authority_id=kra_id,
                envelope=envelope_json(dict(d.archived_key)), created_at=now,
            ))
        return request_id

    def _issue(self, conn: Connection, unsigned: Unsigned, now: dt.datetime, generation: int, *, actor: str,
               principal_id: int | None, request_id: int | None = None, new_by: Caller | None = None,
               idempotency_key: str | None = None, lineage: int | None = None) -> Issued:
        """Sign and record, in ``conn``'s transaction. ``request_id`` names a pending request being
        approved; a new submission by ``new_by`` has its request row written issued once the
        certificate's row exists (one statement fewer than writing it and then updating it)."""
        d = unsigned.decision
        signed = self._ca.sign(conn, unsigned, now, request_id=request_id, principal_id=principal_id)
        if request_id is None:
            assert new_by is not None
            request_id = self._insert_request(conn, new_by, d, now, idempotency_key,
                                              certificate_id=signed.certificate_id, lineage=lineage)
        else:
            conn.execute(REQUEST_ISSUED, {
                "request_id": request_id, "certificate_id": signed.certificate_id, "decided_at": now,
                "decided_by": actor if actor.startswith(("admin:", "operator:")) or d.pending else None,
            })
        return self._ca.record(conn, unsigned, signed, request_id=request_id, actor=actor, now=now,
                               generation=generation)

    # -- reading ------------------------------------------------------------------------

    def get(self, caller: Caller, request_id: int) -> RequestSummary:
        """A request its requester (or a CA manager) may see, with its certificate once issued."""
        require_row_id(request_id, "request")
        with read(self.engine) as conn:
            row = conn.execute(select(t.requests).where(t.requests.c.id == request_id)).first()
            # By id, not by name: a principal added again under a removed one's name is a new one
            if row is None or (not caller.is_manager and (
                    row.principal_id is None or row.principal_id != caller.principal_id)):
                raise Refusal(Reason.NOT_FOUND, f"no request {request_id}")
            return self._with_certificate(conn, row)

    def _with_certificate(self, conn: Connection, row: Any) -> RequestSummary:
        """A request's summary, with its certificate and chain once it is issued."""
        if row.status != "issued" or row.certificate_id is None:
            return summary(row)
        cert = conn.execute(select(t.certificates).where(t.certificates.c.id == row.certificate_id)).one()
        chain = self._state.get(conn).chain(row.authority_id)
        issued = Issued(request_id=row.id, serial=cert.serial, thumbprint=cert.thumbprint,
                        certificate=pem(x509.load_der_x509_certificate(cert.der)), chain=chain)
        return summary(row, issued)

    # -- decisions by CA managers -------------------------------------------------------

    def approve(self, caller: Caller, request_id: int, now: dt.datetime) -> Approved:
        """Issue a pending request's certificate now, decided again on the template, the
        requester's rights, the key's standing and the issuer as they are now. A refusal then
        fails the request (status ``failed``, the refusal as its reason; the requester may submit
        again) and is audited in the same transaction."""
        failed: Refusal | None = None
        try:
            require_manager(caller)
            with write(self.engine) as conn:
                row = self._pending_row(conn, request_id)
                if row.requester == caller.actor:
                    raise Refusal(Reason.SELF_APPROVAL, "a requester cannot approve its own request")
                if not self._auth.enabled(conn, row.principal_id):
                    # kept pending: disabling may be for a while; the manager enables or denies
                    raise Refusal(Reason.REQUESTER_DISABLED, f"the requester {row.requester} is disabled; "
                                                             "enable it again or deny the request")
                snap = self._state.get(conn)
                try:
                    decision = self._approved_decision(conn, row, snap, now)
                except Refusal as refusal:
                    failed = refusal
                    self._fail(conn, row, refusal, caller.actor, now)
                else:
                    self._audit.record(conn, now, caller.actor, "approved", template=decision.template.name,
                                       request_id=request_id, names=decision.names.all())
                    return Approved(self._issue(conn, self._ca.prepare(decision), now, snap.generation,
                                                actor=caller.actor, principal_id=row.principal_id,
                                                request_id=request_id))
            assert failed is not None  # the transaction either returned or recorded the failure
            raise failed
        except Refusal as refusal:
            if refusal is not failed:  # a failed request's refusal is audited with it
                self._audit.refusal(caller.actor, "approve-refused", refusal, now, request_id=request_id)
            raise

    def _approved_decision(self, conn: Connection, row: Any, snap: Snapshot,
                           now: dt.datetime) -> request_policy.Decision:
        """The stored request decided again (:func:`~certpulse.ca.policy.decide_approval`) on
        what is gathered now: the requester as the database has it, the key's standing, the
        template and issuer of the current state."""
        requester = self._auth.principal_by_id(conn, row.principal_id)
        try:
            key: str | None = spki_sha256(x509.load_der_x509_csr(row.csr_der).public_key())
        except (ValueError, TypeError, UnsupportedAlgorithm):
            key = None  # the policy refuses the CSR itself
        gathered = request_policy.Gathered(
            template=snap.templates.get(row.template_name), authorities=snap.authorities, known={},
            key=self._key_standing(conn, key, row.principal_id),
        )
        stored = request_policy.StoredRequest(
            template=row.template_name, kind=row.kind, csr_der=row.csr_der,
            subject=x509.Name.from_rfc4514_string(row.subject), names=names_from_json(row.names),
            issuer_id=row.authority_id,
        )
        return request_policy.decide_approval(requester, stored, gathered, now)

    def _fail(self, conn: Connection, row: Any, refusal: Refusal, actor: str, now: dt.datetime) -> None:
        """A pending request the policy refuses at approval: failed, with the refusal as its reason."""
        conn.execute(update(t.requests).where(t.requests.c.id == row.id).values(
            status="failed", reason=f"{refusal.reason.value}: {refusal.detail}", decided_at=now, decided_by=actor))
        self._audit.record(conn, now, actor, "approve-refused", template=row.template_name, request_id=row.id,
                           names=names_from_json(row.names).all(), reason=refusal.reason.value,
                           detail=refusal.detail)

    def deny(self, caller: Caller, request_id: int, reason: str, now: dt.datetime) -> Denied:
        try:
            require_manager(caller)
            if not reason.strip():
                raise Refusal(Reason.INVALID_ARGUMENT, "a denial needs a reason")
            with write(self.engine) as conn:
                row = self._pending_row(conn, request_id)
                conn.execute(update(t.requests).where(t.requests.c.id == request_id).values(
                    status="denied", reason=reason, decided_at=now, decided_by=caller.actor))
                self._audit.record(conn, now, caller.actor, "denied", template=row.template_name,
                                   request_id=request_id, names=names_from_json(row.names).all(),
                                   reason="denied-by-manager", detail=reason)
        except Refusal as refusal:
            self._audit.refusal(caller.actor, "deny-refused", refusal, now, request_id=request_id)
            raise
        return Denied(request_id, reason)

    @staticmethod
    def _pending_row(conn: Connection, request_id: int) -> Any:
        require_row_id(request_id, "request")
        # FOR UPDATE: concurrent approvals/denials of one request on PostgreSQL queue here, and all
        # but the first then see it decided (SQLite's BEGIN IMMEDIATE already serialises them).
        row = conn.execute(
            select(t.requests).where(t.requests.c.id == request_id).with_for_update()
        ).first()
        if row is None:
            raise Refusal(Reason.NOT_FOUND, f"no request {request_id}")
        if row.status != "pending":
            raise Refusal(Reason.NOT_PENDING, f"request {request_id} is {row.status}, not pending")
        return row

    def list(self, caller: Caller, now: dt.datetime, status: str | None = None,
             limit: int = 500) -> RequestList:
        """Requests in id order (with one ``status`` only, when given), for CA managers."""
        self._audit.require_manager(caller, now, "list-refused")
        query = select(t.requests).order_by(t.requests.c.id).limit(max(1, min(limit, 10_000)))
        if status:
            query = query.where(t.requests.c.status == status)
        with read(self.engine) as conn:
            return RequestList(tuple(summary(row) for row in conn.execute(query)))


def summary(row: Any, issued: Issued | None = None) -> RequestSummary:
    """A ``requests`` row as a result."""
    return RequestSummary(
        request_id=row.id, status=row.status, template=row.template_name, kind=row.kind, requester=row.requester,
        subject=row.subject, names=tuple(names_from_json(row.names).all()), created_at=row.created_at,
        decided_at=row.decided_at, decided_by=row.decided_by, reason=row.reason, issued=issued,
    )


def _key_of(req: EnrollmentRequest) -> str | None:
    """The SPKI SHA-256 of a request's key, when its CSR parses (the policy refuses it otherwise)."""
    try:
        return spki_sha256(load_csr(req.csr).public_key())
    except (Refusal, ValueError, TypeError, UnsupportedAlgorithm):
        return None
