"""The append-only event log: written inside the caller's transaction, read by sequence number.

:func:`append` takes the caller's open connection, so the store commits an event together with
the change it describes (an outbox: listeners hear of it only after the commit). Nothing updates
an event; retention (:func:`prune`) only removes the oldest ones, and never one that a consumer
of the log (a notification task, the rebind engine: :mod:`certpulse.machine.cursors`) has not
had yet, unless the log has grown past its hard limit.
"""

from __future__ import annotations

import datetime as dt
import json
import os
from collections.abc import Iterable, Sequence
from typing import Any

from sqlalchemy import Connection, Engine, delete, func, select

from certpulse.machine import cursors
from certpulse.machine.events import CertFacts, Event, EventDraft
from certpulse.machine.schema import events as t
from certpulse.sql.db import read, write

HARD_LIMIT_FACTOR = 10  # undelivered events are kept, up to ten times the retention count


def append(conn: Connection, drafts: Iterable[EventDraft], *, now: dt.datetime, channel: str,
           uid: int | None = None) -> list[Event]:
    """Write ``drafts`` in order on ``conn`` (the caller's transaction); the events as written."""
    raised_by = os.geteuid() if uid is None else uid
    written: list[Event] = []
    for draft in drafts:
        body = {"old": draft.old.to_dict() if draft.old else None, "new": draft.new.to_dict() if draft.new else None,
                "detail": draft.detail, "data": draft.data}
        template = draft.template or (draft.new.template if draft.new else None) or (
            draft.old.template if draft.old else None)
        result = conn.execute(t.insert().values(
            event_id=int(draft.event_id), channel=channel, time=now, uid=raised_by, action=draft.action,
            template=template, old_thumbprint=draft.old.thumbprint if draft.old else None,
            new_thumbprint=draft.new.thumbprint if draft.new else None, body=json.dumps(body, default=str)))
        seq = result.inserted_primary_key[0] if result.inserted_primary_key else None
        written.append(Event(seq=int(seq or 0), event_id=int(draft.event_id), channel=channel, time=now,
                             uid=raised_by, action=draft.action, old=draft.old, new=draft.new, template=template,
                             detail=draft.detail, data=draft.data))
    return written


def event_from_row(row: Any) -> Event:
    body = json.loads(row.body)
    return Event(seq=row.seq, event_id=row.event_id, channel=row.channel, time=row.time, uid=row.uid,
                 action=row.action, old=CertFacts.from_dict(body["old"]) if body.get("old") else None,
                 new=CertFacts.from_dict(body["new"]) if body.get("new") else None, template=row.template,
                 detail=body.get("detail", ""), data=body.get("data") or {})


def read_events(engine: Engine, *, after: int = 0, event_ids: Sequence[int] = (), channel: str | None = None,
                since: dt.datetime | None = None, limit: int | None = None, newest: bool = False) -> list[Event]:
    """Events after sequence number ``after``, oldest first (the newest ``limit`` with ``newest``)."""
    query = select(t).where(t.c.seq > after)
    if event_ids:
        query = query.where(t.c.event_id.in_([int(i) for i in event_ids]))
    if channel is not None:
        query = query.where(t.c.channel == channel)
    if since is not None:
        query = query.where(t.c.time >= since)
    query = query.order_by(t.c.seq.desc() if newest else t.c.seq)
    if limit is not None:
        query = query.limit(limit)
    with read(engine) as conn:
        found = [event_from_row(r) for r in conn.execute(query)]
    return list(reversed(found)) if newest else found


def latest_seq(conn: Connection) -> int:
    """The highest sequence number ever given (0 for an empty log), retention notwithstanding."""
    value = conn.execute(select(func.max(t.c.seq))).scalar()
    if conn.dialect.name == "sqlite":
        # AUTOINCREMENT remembers the highest number even when retention removed that row.
        remembered = conn.exec_driver_sql("SELECT seq FROM sqlite_sequence WHERE name = 'events'").scalar()
        value = max(value or 0, remembered or 0)
    return int(value or 0)


def prune(engine: Engine, *, now: dt.datetime, max_age: dt.timedelta, max_count: int) -> int:
    """Remove events older than ``max_age`` or beyond the newest ``max_count``: only those every
    consumer of the log has had (tasks and rebind alike), unless the log is past
    ``HARD_LIMIT_FACTOR`` times ``max_count``. Returns how many were removed."""
    with write(engine) as conn:
        newest = latest_seq(conn)
        delivered = cursors.lowest(conn)
        keep_from_count = newest - max_count  # seq <= this is beyond the count
        limit = delivered if delivered is not None else newest
        removed = conn.execute(delete(t).where(
            t.c.seq <= limit,
            (t.c.time < now - max_age) | (t.c.seq <= keep_from_count))).rowcount
        hard = newest - max_count * HARD_LIMIT_FACTOR
        removed += conn.execute(delete(t).where(t.c.seq <= hard)).rowcount
    return int(removed or 0)
