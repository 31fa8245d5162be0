"""The statements of the issuance path, built once and run as DirectStatements.

An issuance writes a request row, reserves a serial, marks it issued and audits, inside one write
transaction that on SQLite is the whole database's one writer. SQLAlchemy's work around each
execution cost more CPU than the database did, so these few statements are compiled once per
dialect and sent to the driver directly (:class:`certpulse.sql.db.DirectStatement`). Everything
off the hot path uses ordinary Core statements where it is used.
"""

from __future__ import annotations

from sqlalchemy import Dialect, bindparam, exists, select, true, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.sql.expression import ClauseElement

from certpulse.ca.state import GENERATION
from certpulse.ca.storage import schema as t
from certpulse.errors import Reason, Refusal
from certpulse.sql.db import DirectStatement

AUDIT_COLUMNS = ("at", "actor", "action", "template_name", "request_id", "serial", "names", "reason", "detail")
REQUEST_COLUMNS = ("principal_id", "requester", "template_name", "template_major", "template_minor", "kind",
                   "csr_der", "subject", "names", "renewal_of", "authority_id", "status", "created_at",
                   "decided_at", "decided_by", "certificate_id", "idempotency_key", "key_sha256")
CERTIFICATE_COLUMNS = ("authority_id", "serial", "request_id", "principal_id", "template_name", "subject", "names",
                       "not_before", "not_after", "status", "created_at")

MARK_ISSUED = update(t.certificates).where(t.certificates.c.id == bindparam("certificate_id")).values(
    status="issued", der=bindparam("der"), thumbprint=bindparam("thumbprint"), request_id=bindparam("request_id"))
# The state generation, and whether a principal still holds a credential, in one round trip
CONFIRM = select(
    select(t.settings.c.value).where(t.settings.c.name == GENERATION).scalar_subquery(),
    exists().where(t.principals.c.id == bindparam("principal_id"),
                   t.principals.c.credential_hash == bindparam("credential_hash"), t.principals.c.enabled == true()),
)
# What the database says of a request's key (by SPKI SHA-256): the serial whose keyCompromise
# revocation blocked it, and whether another principal requested it. Two indexed lookups.
BLOCKED_BY = select(t.blocked_keys.c.serial).where(
    t.blocked_keys.c.key_sha256 == bindparam("key_sha256")).scalar_subquery()
OTHER_PRINCIPAL = exists().where(t.requests.c.key_sha256 == bindparam("key_sha256"),
                                 t.requests.c.principal_id != bindparam("principal_id"))
KEY_STANDING = select(BLOCKED_BY, OTHER_PRINCIPAL)
# A submission's confirmation and its key's standing in one round trip
CONFIRM_AND_KEY = select(*CONFIRM.selected_columns, BLOCKED_BY, OTHER_PRINCIPAL)
# A pending request approved: run as an ordinary statement (approvals are not the hot path)
REQUEST_ISSUED = update(t.requests).where(t.requests.c.id == bindparam("request_id")).values(
    status="issued", certificate_id=bindparam("certificate_id"), decided_at=bindparam("decided_at"),
    decided_by=bindparam("decided_by"))


def reserve_statement(dialect: str) -> ClauseElement:
    """INSERT of a certificate row that yields its id, or nothing when the serial is taken."""
    insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
    return (insert(t.certificates).on_conflict_do_nothing(index_elements=["authority_id", "serial"])
            .returning(t.certificates.c.id))


class Statements:
    """The issuance path's statements, for one database's dialect."""

    def __init__(self, dialect: Dialect) -> None:
        if dialect.name not in ("sqlite", "postgresql"):
            raise Refusal(Reason.STORE, f"unsupported database {dialect.name!r}")
        self.confirm = DirectStatement(CONFIRM, dialect)
        self.confirm_and_key = DirectStatement(CONFIRM_AND_KEY, dialect)
        self.key_standing = DirectStatement(KEY_STANDING, dialect)
        self.audit = DirectStatement(t.audit.insert(), dialect, AUDIT_COLUMNS)
        self.insert_request = DirectStatement(t.requests.insert().returning(t.requests.c.id), dialect,
                                              REQUEST_COLUMNS)
        self.reserve = DirectStatement(reserve_statement(dialect.name), dialect, CERTIFICATE_COLUMNS)
        self.mark_issued = DirectStatement(MARK_ISSUED, dialect)
