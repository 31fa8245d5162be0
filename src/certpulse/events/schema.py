"""Tables of the event log and the notification tasks, in the agent's ``meta.db``.

They live beside the certificate tables so that an event is committed in the same transaction
as the store change it describes: no change without its event, no event without its change.
"""

from __future__ import annotations

from sqlalchemy import (
    Boolean,
    Column,
    Float,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    PrimaryKeyConstraint,
    String,
    Table,
    Text,
)

from certpulse.sql.types import UTCDateTime

metadata = MetaData(
    naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_N_name)s",
        "uq": "uq_%(table_name)s_%(column_0_N_name)s",
        "pk": "pk_%(table_name)s",
    }
)

events = Table(
    "events",
    metadata,
    # AUTOINCREMENT: a sequence number is never reused, even after retention removed the newest.
    Column("seq", Integer, primary_key=True, autoincrement=True),
    Column("event_id", Integer, nullable=False),
    Column("channel", String(8), nullable=False),  # system | user
    Column("time", UTCDateTime, nullable=False),
    Column("uid", Integer, nullable=False),  # the user whose process raised it
    Column("action", String(32), nullable=True),
    Column("template", String(64), nullable=True),
    Column("old_thumbprint", String(40), nullable=True),
    Column("new_thumbprint", String(40), nullable=True),
    Column("body", Text, nullable=False),  # JSON: old/new certificate facts, detail, data
    Index(None, "event_id"),
    Index(None, "time"),
    sqlite_autoincrement=True,
)

tasks = Table(
    "tasks",
    metadata,
    Column("name", String(64), primary_key=True),
    Column("task_type", String(32), nullable=False),
    Column("command", Text, nullable=False),  # absolute path, as registered
    Column("args", Text, nullable=False),  # JSON list, before OLD and NEW
    Column("channel", String(8), nullable=False),
    Column("old_thumbprint", String(40), nullable=True),
    Column("timeout", Float, nullable=False),
    Column("sha256", String(64), nullable=False),  # pinned at registration
    Column("created_at", UTCDateTime, nullable=False),
    Column("cursor", Integer, nullable=False),  # every event up to this seq is delivered (or given up)
    Column("state", String(16), nullable=False),  # ok | retrying | failed | refused
    Column("attempts", Integer, nullable=False, default=0),  # failed attempts at the event after cursor
    Column("next_attempt_at", UTCDateTime, nullable=True),
    Column("runs", Integer, nullable=False, default=0),
    Column("failures", Integer, nullable=False, default=0),
    Column("last_run_at", UTCDateTime, nullable=True),
    Column("last_outcome", String(16), nullable=True),
    Column("last_exit", Integer, nullable=True),
    Column("last_error", Text, nullable=True),
)

task_runs = Table(
    "task_runs",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("task_name", String(64), nullable=False),
    Column("event_seq", Integer, nullable=True),  # None for ``task test``
    Column("event_id", Integer, nullable=False),
    Column("attempt", Integer, nullable=False),
    Column("started_at", UTCDateTime, nullable=False),
    Column("finished_at", UTCDateTime, nullable=False),
    Column("outcome", String(16), nullable=False),  # ok | failed | timeout | refused | skipped
    Column("exit_status", Integer, nullable=True),
    Column("output", LargeBinary, nullable=False),
    Column("output_truncated", Boolean, nullable=False),
    Column("detail", Text, nullable=False),
    Column("test", Boolean, nullable=False),
    Index(None, "task_name", "id"),
    sqlite_autoincrement=True,
)

expiry_notices = Table(
    "expiry_notices",
    metadata,
    Column("thumbprint", String(40), nullable=False),
    Column("threshold", String(16), nullable=False),  # close | expired
    Column("raised_at", UTCDateTime, nullable=False),
    Column("event_seq", Integer, nullable=False),
    PrimaryKeyConstraint("thumbprint", "threshold", name="pk_expiry_notices"),
)
