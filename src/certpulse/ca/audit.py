"""The audit trail: every CA decision and administrative change is a row, and so is every refusal.

A decision (issued, pending, approved, denied, revoked) is recorded inside the transaction that
makes it, so it exists exactly when the decision does. A refusal is recorded in a transaction of
its own, after the refused work rolled back: the refused work wrote nothing, but the attempt is
still on record (with the refusal's reason, which the metrics count). The requests role, the
administration (:mod:`certpulse.ca.admin`), setup and the front ends' own refusals all write here.

Refusals of anonymous callers (no credential, a bad one, a bad token, a malformed or oversized
body, a request too slow to arrive) are sampled, not written one by one: nobody is accountable
for them, and a flood of them must not grow the table without bound. Per process, per refused
action and reason, per minute, the first :data:`ANONYMOUS_ROWS_PER_WINDOW` get a row each as
before; the rest are counted, and one row ``"N more refused ..."`` (reason and action as theirs)
is written when the minute is over (at the next anonymous refusal, the next :meth:`~AuditTrail.flush`,
or at shutdown). Every one of them is still counted by the listener the front end sets
(:attr:`AuditTrail.on_anonymous`, a Prometheus counter). A refusal of an authenticated caller is
always one row: it is accountable.
"""

from __future__ import annotations

import datetime as dt
import json
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from sqlalchemy import Connection, Engine, select

from certpulse.ca.model import ANONYMOUS, Caller, require_manager
from certpulse.ca.results import AuditEntry, AuditLog
from certpulse.ca.row_ids import is_row_id, require_row_id
from certpulse.ca.storage import schema as t
from certpulse.ca.storage.statements import Statements
from certpulse.errors import Refusal
from certpulse.sql.db import read, write

# Anonymous refusals written one by one per (action, reason) per window, per process: one a second
# on average, enough to diagnose a misconfigured client from its details; past that a flood adds
# one summary row a minute. (ca serve --audit-anonymous-rows sets it for a server.)
ANONYMOUS_ROWS_PER_WINDOW = 60
ANONYMOUS_WINDOW = dt.timedelta(minutes=1)


@dataclass(frozen=True)
class Unrecorded:
    """Anonymous refusals of one action and reason in one window that got no row of their own."""

    action: str
    reason: str
    count: int
    start: dt.datetime
    end: dt.datetime

    def detail(self) -> str:
        return (f"{self.count} more refused {self.action} ({self.reason}) from anonymous callers between "
                f"{self.start.isoformat()} and {self.end.isoformat()}, not recorded one by one")


class AnonymousSample:
    """Which anonymous refusals get a row: the first ``rows`` per (action, reason) per ``window``;
    the others are counted and reported as :class:`Unrecorded` once their window is over.

    Pure bookkeeping (the time is an argument); thread-safe, as handlers run on several threads."""

    def __init__(self, rows: int = ANONYMOUS_ROWS_PER_WINDOW, window: dt.timedelta = ANONYMOUS_WINDOW) -> None:
        self.rows = rows
        self.window = window
        self._windows: dict[tuple[str, str], tuple[dt.datetime, int]] = {}  # start, refusals seen in it
        self._lock = threading.Lock()

    def admit(self, action: str, reason: str, now: dt.datetime) -> tuple[bool, list[Unrecorded]]:
        """Whether this refusal gets its own row, and the windows that are over (to be written)."""
        with self._lock:
            over = self._close(now, everything=False)
            start, seen = self._windows.get((action, reason), (now, 0))
            self._windows[(action, reason)] = (start, seen + 1)
            return seen < self.rows, over

    def close(self, now: dt.datetime, *, everything: bool = False) -> list[Unrecorded]:
        """The windows over at ``now`` (every window with ``everything``, e.g. at shutdown)."""
        with self._lock:
            return self._close(now, everything=everything)

    def _close(self, now: dt.datetime, *, everything: bool) -> list[Unrecorded]:
        over: list[Unrecorded] = []
        for key, (start, seen) in list(self._windows.items()):
            if everything or now >= start + self.window:
                del self._windows[key]
                if seen > self.rows:
                    over.append(Unrecorded(key[0], key[1], seen - self.rows, start, max(now, start)))
        return over


class AuditTrail:
    def __init__(self, engine: Engine, statements: Statements, *,
                 sample: AnonymousSample | None = None) -> None:
        self.engine = engine
        self._insert = statements.audit
        self.sample = sample or AnonymousSample()
        # Told of every anonymous refusal (action, reason), recorded or not: the front end counts them.
        self.on_anonymous: Callable[[str, str], None] | None = None

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
        """Record a refusal in its own transaction (the refused work wrote nothing); an anonymous
        caller's is sampled (see the module's description)."""
        own_row, over = True, list[Unrecorded]()
        if actor == ANONYMOUS.actor:
            if self.on_anonymous is not None:
                self.on_anonymous(action, refusal.reason.value)
            own_row, over = self.sample.admit(action, refusal.reason.value, now)
        if not own_row and not over:
            return
        with write(self.engine) as conn:
            self._write_unrecorded(conn, now, over)
            if own_row:
                self.record(conn, now, actor, action, template=template, request_id=request_id,
                            reason=refusal.reason.value, detail=refusal.detail)

    def flush(self, now: dt.datetime, *, everything: bool = False) -> int:
        """Write the rows of the anonymous refusals whose window is over (all, with ``everything``:
        at shutdown); how many rows were written."""
        over = self.sample.close(now, everything=everything)
        if over:
            with write(self.engine) as conn:
                self._write_unrecorded(conn, now, over)
        return len(over)

    def _write_unrecorded(self, conn: Connection, now: dt.datetime, over: list[Unrecorded]) -> None:
        for item in over:
            self.record(conn, now, ANONYMOUS.actor, item.action, reason=item.reason, detail=item.detail())

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
