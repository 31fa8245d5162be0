"""The machine-local database (``meta.db``, SQLite, next to the certificate folders): one schema.

Files hold the key material; these tables hold what the agent, the event consumers and rebind
need to know, in one database so that a store change and the event that describes it commit in
one transaction:

* ``certificates``: each certificate version in the store; ``flights``: requests at the CA,
  written (with the key, on disk) before a request is sent, so a killed agent resumes it with
  the same key and idempotency key; ``state``: small named values (policy cache, last pulse).
* ``events``: the append-only lifecycle log; ``cursors``: how far each consumer of the log has
  read it (``task:<name>`` for each notification task, ``rebind`` for the rebind engine), so
  that retention keeps every event some consumer has not had yet.
* ``tasks``, ``task_runs``: notification tasks and their history; ``expiry_notices``: which
  1003/1002 were raised; ``bindings``: consumers of certificates (the store reads it too, so a
  certificate a binding still serves is neither archived nor deleted).

The migrations in ``migrations/versions`` build exactly this (a test compares them).
"""

from __future__ import annotations

import json
from typing import Any, Literal, get_args

from cryptography import x509
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

from certpulse.pki.certs import serial_hex, sha256_thumbprint, subject_names, thumbprint
from certpulse.pki.template_info import TemplateInfo
from certpulse.sql.types import UTCDateTime

metadata = MetaData(
    naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_N_name)s",
        "uq": "uq_%(table_name)s_%(column_0_N_name)s",
        "pk": "pk_%(table_name)s",
    }
)

# -- the certificate store ------------------------------------------------------------------------

certificates = Table(
    "certificates",
    metadata,
    Column("thumbprint", String(40), primary_key=True),  # SHA-1, upper-case hex
    Column("sha256", String(64), nullable=False),
    Column("subject", Text, nullable=False),
    Column("names", Text, nullable=False),  # JSON list
    Column("serial", String(40), nullable=False),
    Column("issuer", Text, nullable=False),
    Column("not_before", UTCDateTime, nullable=False),
    Column("not_after", UTCDateTime, nullable=False),
    Column("template_oid", String(128), nullable=True),
    Column("template_name", String(64), nullable=True),
    Column("major_version", Integer, nullable=False, default=0),
    Column("minor_version", Integer, nullable=False, default=0),
    Column("source", String(16), nullable=False),  # auto | manual
    Column("policy_id", String(64), nullable=True),
    Column("issuer_name", String(64), nullable=True),
    Column("has_key", Boolean, nullable=False, default=True),
    Column("archived", Boolean, nullable=False, default=False),
    Column("archived_at", UTCDateTime, nullable=True),
    Column("replaced_by", String(40), nullable=True),
    Column("installed_at", UTCDateTime, nullable=False),
    # The policy server (its URL, as configured) that issued it: revocation status is asked there.
    # None for imported certificates and for those installed before it was recorded.
    Column("policy_url", Text, nullable=True),
    Index(None, "template_name", "archived"),
    Index(None, "not_after"),
)

flights = Table(
    "flights",
    metadata,
    Column("id", String(32), primary_key=True),  # also the Idempotency-Key sent to the CA
    Column("kind", String(16), nullable=False),  # renew | enroll | renew-manual | request
    Column("template_name", String(64), nullable=False),
    Column("policy_url", Text, nullable=False),
    Column("issuers", Text, nullable=False),  # JSON list, in order of preference
    Column("issuer", String(64), nullable=True),  # the one that took it
    Column("request_id", Integer, nullable=True),
    Column("status", String(16), nullable=False),  # created | pending
    Column("csr_der", LargeBinary, nullable=False),
    Column("renewal_of", String(40), nullable=True),
    Column("replaces", Text, nullable=False),  # JSON list of thumbprints
    Column("replace_action", String(16), nullable=True),
    Column("source", String(16), nullable=False),
    Column("created_at", UTCDateTime, nullable=False),
    Column("submitted_at", UTCDateTime, nullable=True),
)

state = Table(
    "state",
    metadata,
    Column("name", String(64), primary_key=True),
    Column("value", Text, nullable=False),
)

# -- the event log and its consumers ----------------------------------------------------------------

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

cursors = Table(
    "cursors",
    metadata,
    Column("consumer", String(80), primary_key=True),  # task:<name> | rebind
    Column("seq", Integer, nullable=False),  # every event up to this one was handled (or given up)
)

# What ``tasks.state`` holds; ``bindings.state`` likewise.
TaskState = Literal["ok", "retrying", "failed", "refused"]
TASK_STATES: tuple[TaskState, ...] = get_args(TaskState)
BindingState = Literal["ok", "waiting", "pending", "failed"]

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
    Column("state", String(16), nullable=False),  # ok | retrying | failed | refused
    Column("attempts", Integer, nullable=False, default=0),  # failed attempts at the event after the cursor
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

# -- rebind -----------------------------------------------------------------------------------------

bindings = Table(
    "bindings",
    metadata,
    Column("name", String(64), primary_key=True),
    Column("kind", String(32), nullable=False),
    Column("template", String(64), nullable=True),  # follows this template's newest certificate
    Column("thumbprint", String(40), nullable=True),  # the certificate it serves (deployed last)
    Column("target", String(40), nullable=True),  # the certificate it should move to, when not there yet
    Column("options", Text, nullable=False),  # JSON, as the deployer parsed them
    Column("probe", Text, nullable=True),  # HOST:PORT[,sni=NAME]
    Column("auto", Boolean, nullable=False),
    Column("state", String(16), nullable=False),  # ok | waiting | pending | failed
    Column("attempts", Integer, nullable=False),
    Column("next_attempt_at", UTCDateTime, nullable=True),
    Column("last_error", Text, nullable=True),
    Column("last_output", Text, nullable=True),
    Column("verdict", String(16), nullable=True),  # the last drift check: ok | stale | mismatch | unreachable
    Column("served", String(40), nullable=True),  # what the last probe saw
    Column("checked_at", UTCDateTime, nullable=True),
    Column("created_at", UTCDateTime, nullable=False),
    Column("updated_at", UTCDateTime, nullable=False),
)


def certificate_columns(cert: x509.Certificate, info: TemplateInfo | None) -> dict[str, Any]:
    """The columns of a ``certificates`` row that the certificate itself gives (with its
    template-information extension, ``info``); the caller adds how it came to the store."""
    return {
        "thumbprint": thumbprint(cert), "sha256": sha256_thumbprint(cert), "subject": cert.subject.rfc4514_string(),
        "names": json.dumps(subject_names(cert)), "serial": serial_hex(cert.serial_number),
        "issuer": cert.issuer.rfc4514_string(), "not_before": cert.not_valid_before_utc,
        "not_after": cert.not_valid_after_utc, "template_oid": info.oid if info else None,
        "major_version": info.major if info else 0, "minor_version": info.minor if info else 0,
    }
