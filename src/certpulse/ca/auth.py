"""Who is asking: credentials, the callers a process remembers, and the token exchange.

Two kinds of secret open the CA: an API key (``cpa_``, a CA manager at an administration
tool) and a principal's credential (``cpc_``, given once for a one-time enrollment token).
Both are stored only as SHA-256 hashes.

A submission is the hot path, and reading a principal with its groups is two queries; so a
principal this process has seen with a credential may be answered from memory, but only for
work done inside a write transaction that then confirms it (:meth:`~Authentication.confirm`):
that the credential still opens the same enabled principal and that no administrative change
(a new state generation) happened since its groups were read. Everything else reads the database.

Credentials can be withdrawn, and a withdrawn one stops working at once in every process: an
API key that is revoked or past its expiry, a principal that is disabled or removed. An API key
is never remembered (each use reads its row); a remembered principal serves only the submission,
whose write transaction confirms it against the database before anything is recorded, and a
submission refused before that transaction confirms it too (:meth:`~Authentication.current`).
Every other path reads the principal's row. So no process answers from memory for a principal
that the database says is disabled or gone.

Every refused credential is audited here, so a front end only has to find the secret in its
protocol (a bearer header, a client certificate...) and pass it on.
"""

from __future__ import annotations

import datetime as dt
import threading
from typing import Any

from sqlalchemy import Connection, Engine, and_, bindparam, select, update

from certpulse.ca.audit import AuditTrail
from certpulse.ca.model import ANONYMOUS, IMPLICIT_GROUPS, Caller, hash_secret, new_secret
from certpulse.ca.results import Credential
from certpulse.ca.state import read_generation
from certpulse.ca.storage import schema as t
from certpulse.ca.storage.statements import Statements
from certpulse.errors import Reason, Refusal
from certpulse.sql.db import read, write

# Built once (bound parameters): every ACME newOrder and finalize reads its principal this way
_PRINCIPAL_BY_ID = select(t.principals).where(t.principals.c.id == bindparam("p_id"))
_GROUPS_OF = select(t.group_members.c.group_name).where(t.group_members.c.principal_id == bindparam("p_id"))

# Principals remembered by credential (re-checked inside each write transaction that acts for them)
REMEMBERED_CALLERS = 65_536


class Authentication:
    def __init__(self, engine: Engine, statements: Statements, audit: AuditTrail) -> None:
        self.engine = engine
        self._confirm = statements.confirm
        self._audit = audit
        self._callers: dict[str, Caller] = {}  # by credential hash
        self._lock = threading.Lock()

    def authenticate(self, secret: str | None, now: dt.datetime, *, remembered: bool = False) -> Caller:
        """The caller a credential belongs to; a refusal is audited. With ``remembered``, a
        principal this process has seen with this credential is answered from memory: only for
        callers that act through a write transaction that confirms them (a submission), never to
        authorise anything else."""
        try:
            return self._caller(secret, now, remembered)
        except Refusal as refusal:
            self._audit.refusal(ANONYMOUS.actor, "unauthenticated", refusal, now)
            raise

    def current(self, caller: Caller, now: dt.datetime) -> Caller:
        """``caller`` as the database has it now, for work that did not reach a write transaction
        that confirms it (a submission refused before it): refused (and audited) when its
        credential no longer opens an enabled principal."""
        if caller.credential_hash is None:
            return caller
        with read(self.engine) as conn:
            current = self._lookup_principal(conn, caller.credential_hash, read_generation(conn))
        if current is None:
            with self._lock:
                self._callers.pop(caller.credential_hash, None)
            refusal = Refusal(Reason.UNAUTHENTICATED, "the credential is not valid")
            self._audit.refusal(ANONYMOUS.actor, "unauthenticated", refusal, now)
            raise refusal
        return current

    def _caller(self, secret: str | None, now: dt.datetime, remembered: bool) -> Caller:
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
                if key is not None and api_key_valid(key, now):
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
        return self._as_caller(conn, row, digest, generation)

    def principal_by_id(self, conn: Connection, principal_id: int | None) -> Caller | None:
        """The principal with this id as the database has it now (its groups and roles), or None
        when it is disabled or gone: the requester of a request being approved."""
        if principal_id is None:
            return None
        row = conn.execute(_PRINCIPAL_BY_ID, {"p_id": principal_id}).first()
        return self._as_caller(conn, row, None, read_generation(conn))

    @staticmethod
    def _as_caller(conn: Connection, row: Any, digest: str | None, generation: int) -> Caller | None:
        """An enabled principal's row as a caller, with its groups (None when disabled or absent)."""
        if row is None or not row.enabled:
            return None
        groups = set(conn.execute(_GROUPS_OF, {"p_id": row.id}).scalars())
        groups.add(IMPLICIT_GROUPS[row.kind])
        return Caller(
            kind="principal", name=row.name, principal_id=row.id, principal_kind=row.kind,
            groups=frozenset(groups), roles=frozenset(r for r in row.roles.split(",") if r),
            credential_hash=digest, generation=generation,
        )

    @staticmethod
    def enabled(conn: Connection, principal_id: int | None) -> bool:
        """Whether a principal exists and is enabled (read in ``conn``'s transaction): a disabled
        or removed requester's pending request is not approved."""
        if principal_id is None:
            return False
        return bool(conn.execute(select(t.principals.c.enabled).where(t.principals.c.id == principal_id)).scalar())

    def _remember(self, caller: Caller) -> None:
        assert caller.credential_hash is not None
        with self._lock:
            while len(self._callers) >= REMEMBERED_CALLERS:
                del self._callers[next(iter(self._callers))]  # the oldest
            self._callers[caller.credential_hash] = caller

    def confirm(self, conn: Connection, caller: Caller) -> tuple[int, Caller]:
        """The state generation, and ``caller`` as the database has it now (inside the write
        transaction acting for it): the same object when its credential still opens an enabled
        principal and no administrative change moved the generation since its groups were read;
        read again otherwise; refused when the credential no longer opens anything."""
        digest = caller.credential_hash
        if digest is None:  # not authenticated by a credential (built by a trusted caller)
            return read_generation(conn), caller
        value, holds = self._confirm.run(
            conn, {"principal_id": caller.principal_id, "credential_hash": digest}).fetchone()
        return self.confirmed(conn, caller, value, holds)

    def confirmed(self, conn: Connection, caller: Caller, value: str | None, holds: bool) -> tuple[int, Caller]:
        """:meth:`confirm` on the two values of its statement (the generation, and whether the
        credential still opens the enabled principal) read by a caller that folded them into a
        statement of its own, to spare a round trip."""
        digest = caller.credential_hash
        assert digest is not None
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

    def exchange_token(self, token: str, now: dt.datetime) -> Credential:
        """Trade a one-time enrollment token for the principal's long-lived credential."""
        try:
            with write(self.engine) as conn:
                row = conn.execute(
                    select(t.enrollment_tokens, t.principals.c.name, t.principals.c.kind, t.principals.c.enabled)
                    .join(t.principals, t.principals.c.id == t.enrollment_tokens.c.principal_id)
                    .where(t.enrollment_tokens.c.token_hash == hash_secret(token))
                ).first()
                if row is None:
                    raise Refusal(Reason.TOKEN_INVALID, "the enrollment token is not known")
                if row.used_at is not None:
                    raise Refusal(Reason.TOKEN_USED, "the enrollment token was already used")
                if row.superseded_at is not None:
                    raise Refusal(Reason.TOKEN_INVALID, "the enrollment token was replaced by a newer one")
                if now >= row.expires_at:
                    raise Refusal(Reason.TOKEN_EXPIRED, "the enrollment token has expired")
                if not row.enabled:
                    raise Refusal(Reason.TOKEN_INVALID, "the principal is disabled")
                credential, digest = new_secret("cpc")
                claimed = conn.execute(
                    update(t.enrollment_tokens)
                    .where(and_(t.enrollment_tokens.c.token_hash == row.token_hash,
                                t.enrollment_tokens.c.used_at.is_(None),
                                t.enrollment_tokens.c.superseded_at.is_(None)))
                    .values(used_at=now)
                )
                if claimed.rowcount != 1:  # a concurrent exchange (or a newer token) won
                    raise Refusal(Reason.TOKEN_USED, "the enrollment token was already used or replaced")
                conn.execute(
                    update(t.principals).where(t.principals.c.id == row.principal_id)
                    .values(credential_hash=digest)
                )
                self._audit.record(conn, now, f"principal:{row.name}", "token-exchanged")
        except Refusal as refusal:
            self._audit.refusal(ANONYMOUS.actor, "token-refused", refusal, now)
            raise
        return Credential(principal=row.name, kind=row.kind, credential=credential)


def api_key_valid(key: Any, now: dt.datetime) -> bool:
    """Whether an ``api_keys`` row opens the CA at ``now``: not revoked, and not expired."""
    return key.revoked_at is None and (key.expires_at is None or now < key.expires_at)
