"""Where each consumer of the event log has read to: one row per consumer in ``cursors``.

Consumers are the notification tasks (``task:<name>``) and the rebind engine (``rebind``). Every
event up to a consumer's sequence number was handled by it (or given up on). Retention
(:func:`certpulse.machine.log.prune`) keeps everything after the lowest cursor, so no consumer
misses an event because the log was pruned under it. All functions take the caller's open
connection, so a cursor moves in the same transaction as what the consumer recorded.
"""

from __future__ import annotations

from sqlalchemy import Connection, delete, func, select, update

from certpulse.machine.schema import cursors as t

REBIND = "rebind"
TASK_PREFIX = "task:"


def task_consumer(name: str) -> str:
    """The consumer name of notification task ``name``."""
    return TASK_PREFIX + name


def get(conn: Connection, consumer: str) -> int | None:
    """The consumer's cursor, or None when it has none yet."""
    value = conn.execute(select(t.c.seq).where(t.c.consumer == consumer)).scalar()
    return None if value is None else int(value)


def create(conn: Connection, consumer: str, seq: int) -> None:
    """Start a consumer at ``seq`` (it will be given the events after it)."""
    conn.execute(t.insert().values(consumer=consumer, seq=seq))


def advance(conn: Connection, consumer: str, seq: int) -> bool:
    """Move the cursor forward to ``seq`` (never backwards). True when it moved."""
    moved = conn.execute(update(t).where(t.c.consumer == consumer, t.c.seq < seq).values(seq=seq)).rowcount
    return bool(moved)


def move_from(conn: Connection, consumer: str, expected: int, seq: int) -> bool:
    """Set the cursor to ``seq`` only if it is still at ``expected`` (what the caller read before
    its work began): False when another writer moved it meanwhile, or the consumer is gone."""
    moved = conn.execute(update(t).where(t.c.consumer == consumer, t.c.seq == expected).values(seq=seq)).rowcount
    return bool(moved)


def remove(conn: Connection, consumer: str) -> None:
    conn.execute(delete(t).where(t.c.consumer == consumer))


def lowest(conn: Connection) -> int | None:
    """The lowest cursor of any consumer: every event after it is still owed to someone."""
    value = conn.execute(select(func.min(t.c.seq))).scalar()
    return None if value is None else int(value)
