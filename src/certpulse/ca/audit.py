"""The audit trail: every CA decision and administrative change is a row, and so is every refusal.

A decision (issued, pending, approved, denied, revoked) is recorded inside the transaction that
makes it, so it exists exactly when the decision does. A refusal is recorded in a transaction of
its own, after the refused work rolled back: the refused work wrote nothing, but the attempt is
still on record (with the refusal's reason, which the metrics count). The requests role, the
administration (:mod:`certpulse.ca.admin`), setup and the front ends' own refusals all write here.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterable

from sqlalchemy import Connection, Engine, select

from certpulse.ca.model import Caller, require_manager
from certpulse.ca.results import AuditEntry, AuditLog
from certpulse.ca.row_ids import is_row_id, require_row_id
from certpulse.ca.storage import schema as t
from certpulse.ca.storage.statements import Statements
from certpulse.errors import Refusal
from certpulse.sql.db import read, write


class AuditTrail:
    def __init__(self, engine: Engine, statements: Statements) -> None:
        self.engine = engine
        self._insert = statements.audit

    def record(
        self, conn: Connection, now: dt.datetime, actor: str, action: str, *, template: str | None = None,
        request_id: int | None = None, serial: str | None = None, names: Iterable[str] = (),
        reason: str | None = None, detail: str | None = None,
    ) -> None:
        """One row, in ``conn``'s transaction. Caller-supplied text is cut to the column sizes."""
        self._insert.run(conn, {
            "at": now, "actor": storable(actor)[:128], "action": action,
            "template_name": storable(template)[:64] if template else None,
            "request_id": request_id if request_id is None or is_row_id(request_id) else None,
            "serial": serial, "names": json.dumps(list(names)) if names else None, "reason": reason,
            "detail": storable(detail)[:2000] if detail else None,
        })

    def refusal(self, actor: str, action: str, refusal: Refusal, now: dt.datetime, *,
                template: str | None = None, request_id: int | None = None) -> None:
        """Record a refusal in its own transaction (the refused work wrote nothing)."""
        with write(self.engine) as conn:
            self.record(conn, now, actor, action, template=template, request_id=request_id,
                        reason=refusal.reason.value, detail=refusal.detail)

    def require_manager(self, caller: Caller, now: dt.datetime, action: str) -> None:
        """Refuse a caller that is not a CA manager, auditing the refusal as ``action``. (Operations
        whose own refusal handling audits every refusal use :func:`certpulse.ca.model.require_manager`.)"""
        try:
            require_manager(caller)
        except Refusal as refusal:
            self.refusal(caller.actor, action, refusal, now)
            raise

    def read(self, caller: Caller, now: dt.datetime, *, limit: int = 100, request_id: int | None = None) -> AuditLog:
        """The newest ``limit`` rows (of one request, with ``request_id``), for CA managers."""
        self.require_manager(caller, now, "audit-refused")
        query = select(t.audit).order_by(t.audit.c.id.desc()).limit(max(1, min(limit, 10_000)))
        if request_id is not None:
            require_row_id(request_id, "request")
            query = query.where(t.audit.c.request_id == request_id)
        with read(self.engine) as conn:
            return AuditLog(tuple(
                AuditEntry(
                    entry_id=row.id, at=row.at, actor=row.actor, action=row.action, template=row.template_name,
                    request_id=row.request_id, serial=row.serial,
                    names=tuple(json.loads(row.names)) if row.names else (), reason=row.reason, detail=row.detail,
                )
                for row in conn.execute(query)
            ))


def storable(text: str) -> str:
    """Caller-supplied text as every database takes it: NUL (which PostgreSQL text refuses)
    and lone surrogates (which UTF-8 cannot encode) written as backslash escapes."""
    return text.replace("\x00", "\\x00").encode("utf-8", "backslashreplace").decode("utf-8")
