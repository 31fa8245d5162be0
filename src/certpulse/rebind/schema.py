"""The bindings table, in the agent's ``meta.db``: the store reads it too, so that a certificate
a binding still serves is neither archived nor deleted."""

from __future__ import annotations

from sqlalchemy import Boolean, Column, Integer, MetaData, String, Table, Text

from certpulse.sql.types import UTCDateTime

metadata = MetaData(naming_convention={"pk": "pk_%(table_name)s"})

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
