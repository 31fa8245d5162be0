"""The agent's metadata database (SQLite, next to the certificate folders).

Files hold the key material; these tables hold what the planner needs to know about each
certificate version and about requests that are at the CA ("flights"). A flight is written
before its request is sent, with the key, so a killed agent resumes it with the same key and
the same idempotency key instead of generating a new one.
"""

from __future__ import annotations

from sqlalchemy import Boolean, Column, Index, Integer, LargeBinary, MetaData, String, Table, Text

from certpulse.sql.types import UTCDateTime

metadata = MetaData(
    naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_N_name)s",
        "uq": "uq_%(table_name)s_%(column_0_N_name)s",
        "pk": "pk_%(table_name)s",
    }
)

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
