"""The enrollment service: authentication, requests, approval, revocation, policy, audit.

This is the part trusted to sign. It knows nothing of HTTP: the frontends call it with a
:class:`Caller` and ``now`` and translate its :class:`Refusal` into their own terms. Every
decision (issued, pending, denied, approved, revoked, refused) is written to the audit table;
an issuance is one transaction that records the serial before the certificate is signed.

The issuance path is the hot one (hundreds a second), so its CPU work stays out of the write
transaction: a request is checked against the policy first, with the cached state snapshot and
a remembered caller, and the write transaction then only confirms that neither moved (the
state generation, the caller's credential, what the database says of presented certificates)
before it records and signs. Anything that moved, and every refusal, is decided again inside
the transaction against the database as it is. On SQLite the write transaction is the one
writer of the whole database, so this is what lets several workers issue at once.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import threading
from collections.abc import Iterable
from typing import Any

from cryptography import x509
from sqlalchemy import Connection, Dialect, Engine, and_, bindparam, exists, select, true, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.sql.expression import ClauseElement

from certpulse.ca import policy as request_policy
from certpulse.ca.model import (
    IMPLICIT_GROUPS,
    Caller,
    EnrollmentRequest,
    KnownCertificate,
    Signer,
    hash_secret,
    new_secret,
)
from certpulse.ca.state import GENERATION, KeyRing, Snapshot, load_snapshot, read_generation
from certpulse.ca.stats import CAStats, current_stats
from certpulse.ca.storage import schema as t
from certpulse.ca.templates import Template
from certpulse.errors import Reason, Refusal
from certpulse.pki import template_info
from certpulse.pki.build import end_entity_builder, random_serial, signature_hash
from certpulse.pki.certs import der, load_csr, parse_serial, pem, serial_hex, thumbprint
from certpulse.pki.key_archival import dumps as envelope_json
from certpulse.pki.keys import PublicKey
from certpulse.pki.names import names_from_json, names_to_json
from certpulse.sql.db import DirectStatement, read, write

REVOCATION_REASONS = tuple(
    r.value for r in x509.ReasonFlags if r not in (x509.ReasonFlags.remove_from_crl,)
)
# Principals remembered by credential (re-checked inside each write transaction that acts for them)
REMEMBERED_CALLERS = 65_536

# Statements of the issuance path, built once and run as DirectStatements (compiled once per
# dialect, sent to the driver without SQLAlchemy's per-execution work).
_AUDIT_COLUMNS = ("at", "actor", "action", "template_name", "request_id", "serial", "names", "reason", "detail")
_REQUEST_COLUMNS = ("principal_id", "requester", "template_name", "template_major", "template_minor", "kind",
                    "csr_der", "subject", "names", "renewal_of", "authority_id", "status", "created_at",
                    "decided_at", "decided_by", "certificate_id", "idempotency_key")
_CERTIFICATE_COLUMNS = ("authority_id", "serial", "request_id", "principal_id", "template_name", "subject", "names",
                        "not_before", "not_after", "status", "created_at")
_MARK_ISSUED = update(t.certificates).where(t.certificates.c.id == bindparam("certificate_id")).values(
    status="issued", der=bindparam("der"), thumbprint=bindparam("thumbprint"), request_id=bindparam("request_id"))
# The state generation, and whether a principal still holds a credential, in one round trip
_CONFIRM = select(
    select(t.settings.c.value).where(t.settings.c.name == GENERATION).scalar_subquery(),
    exists().where(t.principals.c.id == bindparam("principal_id"),
                   t.principals.c.credential_hash == bindparam("credential_hash"), t.principals.c.enabled == true()),
)
_REQUEST_ISSUED = update(t.requests).where(t.requests.c.id == bindparam("request_id")).values(
    status="issued", certificate_id=bindparam("certificate_id"), decided_at=bindparam("decided_at"),
    decided_by=bindparam("decided_by"))


def _reserve_statement(dialect: str) -> ClauseElement:
    """INSERT of a certificate row that yields its id, or nothing when the serial is taken."""
    insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
    return (insert(t.certificates).on_conflict_do_nothing(index_elements=["authority_id", "serial"])
            .returning(t.certificates.c.id))


class _Statements:
    """The issuance path's statements, for one database's dialect."""

    def __init__(self, dialect: Dialect) -> None:
        self.confirm = DirectStatement(_CONFIRM, dialect)
        self.audit = DirectStatement(t.audit.insert(), dialect, _AUDIT_COLUMNS)
        self.insert_request = DirectStatement(t.requests.insert().returning(t.requests.c.id), dialect,
                                              _REQUEST_COLUMNS)
        self.reserve = DirectStatement(_reserve_statement(dialect.name), dialect, _CERTIFICATE_COLUMNS)
        self.mark_issued = DirectStatement(_MARK_ISSUED, dialect)


@dataclasses.dataclass(frozen=True)
class _Ahead:
    """A decision made before the write transaction, and the state it rested on."""

    decision: request_policy.Decision
    generation: int
    known: dict[str, KnownCertificate]
    unsigned: _Unsigned | None  # None when the request waits for approval


@dataclasses.dataclass(frozen=True)
class _Unsigned:
    """A certificate assembled but for its serial (reserved in the write transaction) and signature."""

    builder: x509.CertificateBuilder
    signer: Signer


class CAService:
    def __init__(self, engine: Engine, keyring: KeyRing, *, policy_id: str, token_lifetime: dt.timedelta) -> None:
        self.engine = engine
        self.keyring = keyring
        self.policy_id = policy_id
        self.token_lifetime = token_lifetime
        self._snapshot: Snapshot | None = None
        self._lock = threading.Lock()
        if engine.dialect.name not in ("sqlite", "postgresql"):
            raise Refusal(Reason.STORE, f"unsupported database {engine.dialect.name!r}")
        self._sql = _Statements(engine.dialect)
        self._callers: dict[str, Caller] = {}  # by credential hash
        self._chains: dict[tuple[int, int], list[str]] = {}  # (generation, issuer id) -> PEM chain
        self._issuer_skis: dict[str, x509.SubjectKeyIdentifier] = {}  # by key file
        self._template_extensions: dict[template_info.TemplateInfo, x509.UnrecognizedExtension] = {}

    # -- state --------------------------------------------------------------------------

    def snapshot(self, conn: Connection) -> Snapshot:
        """The cached snapshot, reloaded when an administrative change moved the generation."""
        generation = read_generation(conn)
        current = self._snapshot
        if current is None or current.generation != generation:
            with self._lock:
                current = load_snapshot(conn)
                self._snapshot = current
        return current

    def stats(self, now: dt.datetime) -> CAStats:
        """The counts an operator watches (what ``/metrics`` exposes), read now."""
        return current_stats(self.engine, now)

    # -- audit --------------------------------------------------------------------------

    def _audit(
        self, conn: Connection, now: dt.datetime, actor: str, action: str, *, template: str | None = None,
        request_id: int | None = None, serial: str | None = None, names: Iterable[str] = (),
        reason: str | None = None, detail: str | None = None,
    ) -> None:
        self._sql.audit.run(conn, {
            "at": now, "actor": _storable(actor)[:128], "action": action,
            "template_name": _storable(template)[:64] if template else None, "request_id": request_id,
            "serial": serial, "names": json.dumps(list(names)) if names else None, "reason": reason,
            "detail": _storable(detail)[:2000] if detail else None,
        })

    def audit_refusal(self, actor: str, action: str, refusal: Refusal, now: dt.datetime, *,
                      template: str | None = None, request_id: int | None = None) -> None:
        """Record a refusal in its own transaction (the refused work wrote nothing)."""
        with write(self.engine) as conn:
            self._audit(conn, now, actor, action, template=template, request_id=request_id,
                        reason=refusal.reason.value, detail=refusal.detail)

    def audit_log(self, caller: Caller, now: dt.datetime, *, limit: int = 100,
                  request_id: int | None = None) -> list[dict[str, Any]]:
        self._require_manager(caller, now, "audit-refused")
        query = select(t.audit).order_by(t.audit.c.id.desc()).limit(max(1, min(limit, 10_000)))
        if request_id is not None:
            query = query.where(t.audit.c.request_id == request_id)
        with read(self.engine) as conn:
            return [
                {
                    "id": row.id, "at": row.at.isoformat(), "actor": row.actor, "action": row.action,
                    "template": row.template_name, "request_id": row.request_id, "serial": row.serial,
                    "names": json.loads(row.names) if row.names else [], "reason": row.reason,
                    "detail": row.detail,
                }
                for row in conn.execute(query)
            ]

    # -- authentication -----------------------------------------------------------------

    def authenticate(self, secret: str | None, *, remembered: bool = False) -> Caller:
        """The caller a credential belongs to. With ``remembered``, a principal this process has
        seen with this credential is answered from memory: only for callers that act through a
        write transaction that re-checks them (:meth:`submit`), never to authorise anything else."""
        if not secret:
            raise Refusal(Reason.UNAUTHENTICATED, "no credential was presented")
        digest = hash_secret(secret)
        if remembered and not secret.startswith("cpa_"):
            known = self._callers.get(digest)
            if known is not None:
                return known
        with read(self.engine) as conn:
            if secret.startswith("cpa_"):
                key = conn.execute(select(t.api_keys).where(t.api_keys.c.key_hash == digest)).first()
                if key is not None:
                    return Caller(kind="admin", name=key.name)
            else:
                caller = self._lookup_principal(conn, digest, read_generation(conn))
                if caller is not None:
                    if remembered:
                        self._remember(caller)
                    return caller
        raise Refusal(Reason.UNAUTHENTICATED, "the credential is not valid")

    def _lookup_principal(self, conn: Connection, digest: str, generation: int) -> Caller | None:
        """The enabled principal holding this credential; ``generation`` must have been read first
        in this transaction, so that a change to its groups after the read moves it."""
        row = conn.execute(select(t.principals).where(t.principals.c.credential_hash == digest)).first()
        if row is None or not row.enabled:
            return None
        groups = set(
            conn.execute(
                select(t.group_members.c.group_name).where(t.group_members.c.principal_id == row.id)
            ).scalars()
        )
        groups.add(IMPLICIT_GROUPS[row.kind])
        return Caller(
            kind="principal", name=row.name, principal_id=row.id, principal_kind=row.kind,
            groups=frozenset(groups), roles=frozenset(r for r in row.roles.split(",") if r),
            credential_hash=digest, generation=generation,
        )

    def _remember(self, caller: Caller) -> None:
        assert caller.credential_hash is not None
        with self._lock:
            while len(self._callers) >= REMEMBERED_CALLERS:
                del self._callers[next(iter(self._callers))]  # the oldest
            self._callers[caller.credential_hash] = caller

    def _confirm(self, conn: Connection, caller: Caller) -> tuple[int, Caller]:
        """The state generation, and ``caller`` as the database has it now (inside the write
        transaction acting for it): the same when its credential still opens an enabled principal
        and no administrative change moved the generation since its groups were read; read again
        otherwise; refused when the credential no longer opens anything."""
        digest = caller.credential_hash
        if digest is None:  # not authenticated by a credential (built by a trusted caller)
            return read_generation(conn), caller
        value, holds = self._sql.confirm.run(
            conn, {"principal_id": caller.principal_id, "credential_hash": digest}).fetchone()
        generation = int(value) if value is not None else 0
        if holds and caller.generation == generation:
            return generation, caller
        with self._lock:
            self._callers.pop(digest, None)
        current = self._lookup_principal(conn, digest, generation)
        if current is None:
            raise Refusal(Reason.UNAUTHENTICATED, "the credential is not valid")
        self._remember(current)
        return generation, current

    def exchange_token(self, token: str, now: dt.datetime) -> dict[str, str]:
        """Trade a one-time enrollment token for the principal's long-lived credential."""
        try:
            with write(self.engine) as conn:
                row = conn.execute(
                    select(t.enrollment_tokens, t.principals.c.name, t.principals.c.kind)
                    .join(t.principals, t.principals.c.id == t.enrollment_tokens.c.principal_id)
                    .where(t.enrollment_tokens.c.token_hash == hash_secret(token))
                ).first()
                if row is None:
                    raise Refusal(Reason.TOKEN_INVALID, "the enrollment token is not known")
                if row.used_at is not None:
                    raise Refusal(Reason.TOKEN_USED, "the enrollment token was already used")
                if now >= row.expires_at:
                    raise Refusal(Reason.TOKEN_EXPIRED, "the enrollment token has expired")
                credential, digest = new_secret("cpc")
                claimed = conn.execute(
                    update(t.enrollment_tokens)
                    .where(and_(t.enrollment_tokens.c.token_hash == row.token_hash,
                                t.enrollment_tokens.c.used_at.is_(None)))
                    .values(used_at=now)
                )
                if claimed.rowcount != 1:  # a concurrent exchange of the same token won
                    raise Refusal(Reason.TOKEN_USED, "the enrollment token was already used")
                conn.execute(
                    update(t.principals).where(t.principals.c.id == row.principal_id)
                    .values(credential_hash=digest)
                )
                self._audit(conn, now, f"principal:{row.name}", "token-exchanged")
        except Refusal as refusal:
            self.audit_refusal("anonymous:-", "token-refused", refusal, now)
            raise
        return {"principal": row.name, "kind": row.kind, "credential": credential}

    # -- policy (the seed's CEP) --------------------------------------------------------

    def policy(self, caller: Caller, now: dt.datetime) -> dict[str, Any]:
        with read(self.engine) as conn:
            snap = self.snapshot(conn)
            directory = self._directory(conn, caller, now)
        templates = []
        for template in sorted(snap.templates.values(), key=lambda x: x.name):
            rights = template.rights_of(caller.name, caller.groups) if caller.kind == "principal" else frozenset()
            if caller.kind == "admin":
                rights = frozenset({"read"})
            if "read" not in rights:
                continue
            templates.append(template_policy(template, rights))
        issuers = [
            {
                "name": a.name, "certificate": pem(a.certificate), "cost": a.cost,
                "renewal_only": a.renewal_only, "templates": sorted(a.templates),
                "thumbprint": thumbprint(a.certificate),
            }
            for a in snap.by_role("issuer") if a.enabled
        ]
        return {
            "policy_id": self.policy_id,
            "generated_at": now.isoformat(),
            "refresh_after_seconds": 600,
            "templates": templates,
            "issuers": issuers,
            "roots": [pem(a.certificate) for a in snap.by_role("root")],
            "intermediates": [pem(a.certificate) for a in snap.by_role("issuer")],
            "kra": [pem(a.certificate) for a in snap.by_role("kra") if a.enabled],
            "directory": directory,
        }

    def _directory(self, conn: Connection, caller: Caller, now: dt.datetime) -> list[dict[str, Any]]:
        """The caller's published, valid certificates (the seed's userCertificate attribute)."""
        if caller.principal_id is None:
            return []
        rows = conn.execute(
            select(t.certificates.c.template_name, t.certificates.c.serial, t.certificates.c.thumbprint,
                   t.certificates.c.not_after)
            .where(and_(
                t.certificates.c.principal_id == caller.principal_id,
                t.certificates.c.status == "issued",
                t.certificates.c.revoked_at.is_(None),
                t.certificates.c.not_after > now,
            ))
            .order_by(t.certificates.c.id)
        )
        return [
            {"template": r.template_name, "serial": r.serial, "thumbprint": r.thumbprint,
             "not_after": r.not_after.isoformat()}
            for r in rows
        ]

    # -- requests -----------------------------------------------------------------------

    def submit(self, caller: Caller, req: EnrollmentRequest, now: dt.datetime) -> dict[str, Any]:
        """Check a request and either issue, leave it pending, or refuse it (audited either way)."""
        try:
            if caller.kind != "principal":
                raise Refusal(Reason.FORBIDDEN, "only principals enroll; use the principal's credential")
            ahead = self._decide_ahead(caller, req, now)
            with write(self.engine) as conn:
                generation, current = self._confirm(conn, caller)
                if current is not caller:
                    ahead, caller = None, current
                if req.idempotency_key is not None:
                    replay = self._replay(conn, caller, req)
                    if replay is not None:
                        return replay
                presents = req.renewal is not None or bool(req.ra_signatures)
                if ahead is not None and ahead.generation == generation and (
                        not presents or self._known(conn, req) == ahead.known):
                    decision, unsigned = ahead.decision, ahead.unsigned
                else:  # the state moved (or the policy refused): decide on the database as it is now
                    decision = request_policy.decide(caller, req, self._gather(conn, req), now)
                    unsigned = None
                if not decision.pending:
                    return self._issue(conn, caller.actor, None, decision, now, caller.principal_id, generation,
                                       caller=caller, idempotency_key=req.idempotency_key, unsigned=unsigned)
                request_id = self._insert_request(conn, caller, decision, now, req.idempotency_key)
                self._audit(conn, now, caller.actor, "pending", template=decision.template.name,
                            request_id=request_id, names=decision.names.all(),
                            detail=f"{decision.kind} request awaits CA-manager approval")
                return {"id": request_id, "status": "pending"}
        except Refusal as refusal:
            self.audit_refusal(caller.actor, "refused", refusal, now, template=req.template)
            raise

    def _replay(self, conn: Connection, caller: Caller, req: EnrollmentRequest) -> dict[str, Any] | None:
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
        result = self._with_certificate(conn, row, _request_summary(row))
        result["replayed"] = True
        return result

    def _decide_ahead(self, caller: Caller, req: EnrollmentRequest, now: dt.datetime) -> _Ahead | None:
        """The policy's decision before the write transaction, on the cached snapshot (read when
        there is none yet) and, when the request presents certificates, on what the database says
        of them now. None when the policy refuses: a refusal is decided again in the transaction,
        after any replay and against the current state, so that it is never a stale one."""
        snap = self._snapshot
        known: dict[str, KnownCertificate] = {}
        if snap is None or req.renewal is not None or req.ra_signatures:
            with read(self.engine) as conn:
                snap = self.snapshot(conn)
                known = self._known(conn, req)
        try:
            decision = request_policy.decide(caller, req, self._gathered(snap, req, known), now)
        except Refusal:
            return None
        return _Ahead(decision, snap.generation, known, None if decision.pending else self._unsigned(decision))

    def _gather(self, conn: Connection, req: EnrollmentRequest) -> request_policy.Gathered:
        return self._gathered(self.snapshot(conn), req, self._known(conn, req))

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
            kra=kra, kra_key=self.keyring.kra_key(kra),
        )

    def _insert_request(self, conn: Connection, caller: Caller, d: request_policy.Decision, now: dt.datetime,
                        idempotency_key: str | None = None, certificate_id: int | None = None) -> int:
        """The request's row: pending, or (with ``certificate_id``) issued now."""
        cursor = self._sql.insert_request.run(conn, {
            "principal_id": caller.principal_id, "requester": caller.actor, "template_name": d.template.name,
            "template_major": d.template.major_version, "template_minor": d.template.minor_version,
            "kind": d.kind, "csr_der": d.csr_der, "subject": d.subject_text(), "names": names_to_json(d.names),
            "renewal_of": d.renewal_of.id if d.renewal_of else None, "authority_id": d.issuer.id,
            "status": "issued" if certificate_id is not None else "pending", "created_at": now,
            "decided_at": now if certificate_id is not None else None, "decided_by": None,
            "certificate_id": certificate_id, "idempotency_key": idempotency_key,
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

    def _issue(
        self, conn: Connection, actor: str, request_id: int | None, d: request_policy.Decision,
        now: dt.datetime, principal_id: int | None, generation: int, *,
        caller: Caller | None = None, idempotency_key: str | None = None, unsigned: _Unsigned | None = None,
    ) -> dict[str, Any]:
        """Reserve a serial, sign, record. ``request_id`` names a pending request being approved;
        None for a new submission by ``caller``, whose request row is written issued once the
        certificate's row exists (one statement fewer than writing it and then updating it).
        ``unsigned``: the certificate assembled before the transaction from this decision."""
        unsigned = unsigned or self._unsigned(d)
        serial, cert_id = self._reserve_serial(conn, d, request_id, principal_id, now)
        key = unsigned.signer.key
        cert = unsigned.builder.serial_number(serial).sign(key, signature_hash(key))
        print_ = thumbprint(cert)
        if request_id is None:
            assert caller is not None
            request_id = self._insert_request(conn, caller, d, now, idempotency_key, certificate_id=cert_id)
        else:
            conn.execute(_REQUEST_ISSUED, {
                "request_id": request_id, "certificate_id": cert_id, "decided_at": now,
                "decided_by": actor if actor.startswith(("admin:", "operator:")) or d.pending else None,
            })
        self._sql.mark_issued.run(conn, {"certificate_id": cert_id, "der": der(cert), "thumbprint": print_,
                                         "request_id": request_id})
        self._audit(conn, now, actor, "issued", template=d.template.name, request_id=request_id,
                    serial=serial_hex(serial), names=d.names.all() or (d.subject_text(),),
                    detail=f"{d.kind}; issuer {d.issuer.name}; thumbprint {print_}")
        return {
            "id": request_id, "status": "issued", "serial": serial_hex(serial), "thumbprint": print_,
            "certificate": pem(cert), "chain": self._chain_pems(conn, d.issuer.id, generation),
        }

    def _unsigned(self, d: request_policy.Decision) -> _Unsigned:
        """The decided certificate, assembled but for its serial and signature: work that needs
        no database, done before the write transaction (on SQLite, outside the one writer's turn)."""
        signer = self.keyring.signer(d.issuer)
        info = template_info.TemplateInfo(d.template.oid, d.template.major_version, d.template.minor_version)
        extension = self._template_extensions.get(info)
        if extension is None:  # the same bytes for every certificate of this template version
            extension = template_info.encode(info)
            with self._lock:
                if len(self._template_extensions) > 1024:
                    self._template_extensions.clear()
                self._template_extensions[info] = extension
        builder = end_entity_builder(
            subject=d.subject, public_key=d.public_key, issuer_cert=d.issuer.certificate,
            issuer_key=signer.key, not_before=d.not_before, not_after=d.not_after,
            sans=d.sans(), key_usage=d.template.key_usage_extension(), ekus=d.template.ekus,
            extra=(extension,), issuer_ski=self._issuer_ski(signer),
        )
        return _Unsigned(builder, signer)

    def _reserve_serial(self, conn: Connection, d: request_policy.Decision, request_id: int | None,
                        principal_id: int | None, now: dt.datetime) -> tuple[int, int]:
        """Insert the serial's row before signing (the unique constraint on issuer and serial
        forbids any reuse); the serial and the row's id."""
        for _ in range(5):
            serial = random_serial()
            row = self._sql.reserve.run(conn, {
                "authority_id": d.issuer.id, "serial": serial_hex(serial), "request_id": request_id,
                "principal_id": principal_id, "template_name": d.template.name,
                "subject": d.subject_text(), "names": names_to_json(d.names),
                "not_before": d.not_before, "not_after": d.not_after, "status": "reserved", "created_at": now,
            }).fetchone()
            if row is not None:
                return serial, int(row[0])
        raise Refusal(Reason.STORE, "could not reserve a unique serial number")

    def _issuer_ski(self, signer: Signer) -> x509.SubjectKeyIdentifier:
        """The issuing key's identifier (what the certificates' AKI names), computed once per key."""
        key_file = signer.authority.key_file or signer.authority.name
        ski = self._issuer_skis.get(key_file)
        if ski is None:
            ski = x509.SubjectKeyIdentifier.from_public_key(signer.key.public_key())
            self._issuer_skis[key_file] = ski
        return ski

    def _chain_pems(self, conn: Connection, issuer_id: int, generation: int | None = None) -> list[str]:
        """The issuer's certificate and its parents up to the root, from the cached snapshot;
        ``generation``, when the transaction has read it, spares reading it again."""
        if generation is not None:
            cached = self._chains.get((generation, issuer_id))
            if cached is not None:
                return list(cached)
        snap = self.snapshot(conn)
        cached = self._chains.get((snap.generation, issuer_id))
        if cached is not None:
            return list(cached)
        chain: list[str] = []
        authority = snap.authority(issuer_id)
        while True:
            chain.append(pem(authority.certificate))
            if authority.parent_id is None:
                break
            authority = snap.authority(authority.parent_id)
        with self._lock:
            if len(self._chains) > 64:
                self._chains.clear()
            self._chains[(snap.generation, issuer_id)] = chain
        return list(chain)

    def get_request(self, caller: Caller, request_id: int) -> dict[str, Any]:
        with read(self.engine) as conn:
            row = conn.execute(select(t.requests).where(t.requests.c.id == request_id)).first()
            if row is None or (not caller.is_manager and row.requester != caller.actor):
                raise Refusal(Reason.NOT_FOUND, f"no request {request_id}")
            return self._with_certificate(conn, row, _request_summary(row))

    def _with_certificate(self, conn: Connection, row: Any, result: dict[str, Any]) -> dict[str, Any]:
        """A request's summary, with its certificate and chain once it is issued."""
        if row.status == "issued" and row.certificate_id is not None:
            cert = conn.execute(select(t.certificates).where(t.certificates.c.id == row.certificate_id)).one()
            result.update(serial=cert.serial, thumbprint=cert.thumbprint,
                          certificate=pem(x509.load_der_x509_certificate(cert.der)),
                          chain=self._chain_pems(conn, row.authority_id))
        return result

    def list_requests(self, caller: Caller, now: dt.datetime, status: str | None = None,
                      limit: int = 500) -> list[dict[str, Any]]:
        self._require_manager(caller, now, "list-refused")
        query = select(t.requests).order_by(t.requests.c.id).limit(max(1, min(limit, 10_000)))
        if status:
            query = query.where(t.requests.c.status == status)
        with read(self.engine) as conn:
            return [_request_summary(row) for row in conn.execute(query)]

    def approve(self, caller: Caller, request_id: int, now: dt.datetime) -> dict[str, Any]:
        try:
            self._require_manager(caller)
            with write(self.engine) as conn:
                row = self._pending_row(conn, request_id)
                if row.requester == caller.actor:
                    raise Refusal(Reason.SELF_APPROVAL, "a requester cannot approve its own request")
                snap = self.snapshot(conn)
                template = snap.templates.get(row.template_name)
                if template is None:
                    raise Refusal(Reason.UNKNOWN_TEMPLATE, f"template {row.template_name!r} no longer exists")
                issuer = snap.authority(row.authority_id)
                if not issuer.serves(template.name) or not issuer.valid_at(now):
                    raise Refusal(Reason.NO_ISSUER, f"issuer {issuer.name!r} no longer serves {template.name!r}")
                csr = x509.load_der_x509_csr(row.csr_der)
                public_key: PublicKey = csr.public_key()  # type: ignore[assignment]
                names = names_from_json(row.names)
                not_before, not_after = request_policy.validity(template, issuer, now)
                decision = request_policy.Decision(
                    template=template, kind=row.kind, subject=x509.Name.from_rfc4514_string(row.subject),
                    names=names, public_key=public_key, csr_der=row.csr_der,
                    issuer=issuer, not_before=not_before, not_after=not_after,
                    pending=True, renewal_of=None, archived_key=None,
                )
                self._audit(conn, now, caller.actor, "approved", template=template.name,
                            request_id=request_id, names=names.all())
                return self._issue(conn, caller.actor, request_id, decision, now, row.principal_id, snap.generation)
        except Refusal as refusal:
            self.audit_refusal(caller.actor, "approve-refused", refusal, now, request_id=request_id)
            raise

    def deny(self, caller: Caller, request_id: int, reason: str, now: dt.datetime) -> dict[str, Any]:
        try:
            self._require_manager(caller)
            if not reason.strip():
                raise Refusal(Reason.INVALID_ARGUMENT, "a denial needs a reason")
            with write(self.engine) as conn:
                row = self._pending_row(conn, request_id)
                conn.execute(update(t.requests).where(t.requests.c.id == request_id).values(
                    status="denied", reason=reason, decided_at=now, decided_by=caller.actor))
                self._audit(conn, now, caller.actor, "denied", template=row.template_name,
                            request_id=request_id, names=names_from_json(row.names).all(), reason="denied-by-manager",
                            detail=reason)
        except Refusal as refusal:
            self.audit_refusal(caller.actor, "deny-refused", refusal, now, request_id=request_id)
            raise
        return {"id": request_id, "status": "denied", "reason": reason}

    @staticmethod
    def _pending_row(conn: Connection, request_id: int) -> Any:
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

    def _require_manager(self, caller: Caller, now: dt.datetime | None = None, audit_as: str | None = None) -> None:
        """Refuse a caller that is not a CA manager; with ``audit_as``, the refusal is audited here
        (callers whose own refusal handling audits pass neither)."""
        if not caller.is_manager:
            refusal = Refusal(Reason.FORBIDDEN, f"{caller.actor} is not a CA manager")
            if audit_as is not None and now is not None:
                self.audit_refusal(caller.actor, audit_as, refusal, now)
            raise refusal

    # -- revocation and status ----------------------------------------------------------

    def revoke(self, caller: Caller, serial: str, reason: str, now: dt.datetime,
               issuer: str | None = None) -> dict[str, Any]:
        try:
            self._require_manager(caller)
            if reason not in REVOCATION_REASONS:
                raise Refusal(Reason.INVALID_ARGUMENT,
                              f"unknown revocation reason {reason!r}; use one of {', '.join(REVOCATION_REASONS)}")
            with write(self.engine) as conn:
                row = self._find_certificate(conn, serial, issuer)
                if row.revoked_at is not None:
                    raise Refusal(Reason.ALREADY_REVOKED,
                                  f"certificate {row.serial} was revoked at {row.revoked_at.isoformat()}")
                revoked = conn.execute(
                    update(t.certificates)
                    .where(and_(t.certificates.c.id == row.id, t.certificates.c.revoked_at.is_(None)))
                    .values(revoked_at=now, revocation_reason=reason))
                if revoked.rowcount != 1:  # a concurrent call revoked it after we read the row
                    raise Refusal(Reason.ALREADY_REVOKED, f"certificate {row.serial} was revoked meanwhile")
                self._audit(conn, now, caller.actor, "revoked", template=row.template_name,
                            request_id=row.request_id, serial=row.serial, names=names_from_json(row.names).all(),
                            reason=reason)
        except Refusal as refusal:
            self.audit_refusal(caller.actor, "revoke-refused", refusal, now)
            raise
        return {"serial": row.serial, "status": "revoked", "reason": reason, "revoked_at": now.isoformat()}

    def _find_certificate(self, conn: Connection, serial: str, issuer: str | None) -> Any:
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

    def status(self, serial: str, now: dt.datetime, issuer: str | None = None) -> dict[str, Any]:
        with read(self.engine) as conn:
            row = self._find_certificate(conn, serial, issuer)
        state = "revoked" if row.revoked_at else ("expired" if now > row.not_after else "good")
        return {
            "serial": row.serial, "issuer": row.issuer_name, "status": state,
            "template": row.template_name, "subject": row.subject,
            "not_before": row.not_before.isoformat(), "not_after": row.not_after.isoformat(),
            "revoked_at": row.revoked_at.isoformat() if row.revoked_at else None,
            "revocation_reason": row.revocation_reason, "thumbprint": row.thumbprint,
        }


def _storable(text: str) -> str:
    """Caller-supplied text as every database takes it: NUL (which PostgreSQL text refuses)
    and lone surrogates (which UTF-8 cannot encode) written as backslash escapes."""
    return text.replace("\x00", "\\x00").encode("utf-8", "backslashreplace").decode("utf-8")


def template_policy(template: Template, rights: frozenset[str]) -> dict[str, Any]:
    """What an agent needs to know about a template (the seed's CEP template attributes)."""
    return {
        "name": template.name,
        "display_name": template.display_name,
        "oid": template.oid,
        "schema_version": template.schema_version,
        "major_version": template.major_version,
        "minor_version": template.minor_version,
        "validity_seconds": int(template.validity.total_seconds()),
        "renewal_period_seconds": int(template.renewal_period.total_seconds()),
        "purpose": template.purpose,
        "key": {"types": list(template.key_types), "default": template.default_key_type,
                "archive": template.archive_private_key},
        "key_usage": list(template.key_usage),
        "ekus": list(template.ekus),
        "subject_source": template.subject_source,
        "renewal_subject_from_existing": template.renewal_subject_from_existing,
        "manager_approval": template.manager_approval,
        "ra_signatures": template.ra_signatures,
        "ra_policy": template.ra_policy,
        "supersedes": list(template.supersedes),
        "old_certificate": template.old_certificate,
        "user_interaction": template.user_interaction,
        "check_directory": template.check_directory,
        "rights": sorted(rights),
    }


def _request_summary(row: Any) -> dict[str, Any]:
    return {
        "id": row.id, "status": row.status, "template": row.template_name, "kind": row.kind,
        "requester": row.requester, "subject": row.subject, "names": list(names_from_json(row.names).all()),
        "created_at": row.created_at.isoformat(),
        "decided_at": row.decided_at.isoformat() if row.decided_at else None,
        "decided_by": row.decided_by, "reason": row.reason,
    }
