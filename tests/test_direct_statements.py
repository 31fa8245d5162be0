"""The issuance path's DirectStatements (ca/storage/statements.py, run by sql/db.py) send the
driver exactly what SQLAlchemy would send for the same statement and values, on SQLite and
PostgreSQL, and a driver error leaves them as SQLAlchemy's own exception."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import Connection, event
from sqlalchemy.exc import IntegrityError

from certpulse.ca.config import CADir
from certpulse.ca.service import CAService
from certpulse.ca.setup import open_service
from certpulse.ca.storage.statements import Statements
from support import CA

NOW = dt.datetime(2030, 1, 2, 3, 4, 5, 678901, tzinfo=dt.UTC)

SAMPLES: dict[str, dict[str, Any]] = {
    "audit": {"at": NOW, "actor": "principal:x", "action": "issued", "template_name": "machine", "request_id": 7,
              "serial": "abc", "names": '["x"]', "reason": None, "detail": "d"},
    "insert_request": {"principal_id": None, "requester": "principal:x", "template_name": "machine",
                       "template_major": 1, "template_minor": 0, "kind": "new", "csr_der": b"\x30\x00",
                       "subject": "CN=x", "names": '{"dns": []}', "renewal_of": None, "authority_id": 1,
                       "status": "issued", "created_at": NOW, "decided_at": NOW, "decided_by": None,
                       "certificate_id": None, "idempotency_key": None, "key_sha256": "ab" * 32},
    "mark_issued": {"certificate_id": 1, "der": b"\x30\x01", "thumbprint": "ff", "request_id": 2},
    "confirm": {"principal_id": 1, "credential_hash": "00"},
    "confirm_and_key": {"principal_id": 1, "credential_hash": "00", "key_sha256": "ab" * 32},
    "key_standing": {"principal_id": 1, "key_sha256": "ab" * 32},
    "reserve": {"authority_id": 1, "serial": "1234abcd", "request_id": None, "principal_id": None,
                "template_name": "machine", "subject": "CN=x", "names": '{"dns": []}', "not_before": NOW,
                "not_after": NOW, "status": "reserved", "created_at": NOW},
}


@pytest.fixture
def service(ca: CA) -> Iterator[CAService]:
    service = open_service(CADir(ca.dir), pool_size=1)
    try:
        yield service
    finally:
        service.engine.dispose()


def sent(conn: Connection, run: Any) -> tuple[str, Any]:
    """The statement and parameters that reach the driver's cursor while ``run`` runs."""
    seen: list[tuple[str, Any]] = []

    def capture(conn: Any, cursor: Any, statement: str, parameters: Any, context: Any, many: bool) -> None:
        seen.append((statement, parameters))

    event.listen(conn, "before_cursor_execute", capture)
    try:
        run()
    finally:
        event.remove(conn, "before_cursor_execute", capture)
    assert len(seen) == 1, seen
    return seen[0]


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_a_direct_statement_sends_what_sqlalchemy_sends(service: CAService, name: str) -> None:
    direct = getattr(Statements(service.engine.dialect), name)
    with service.engine.connect() as conn, conn.begin():
        statement, parameters = sent(conn, lambda: conn.execute(direct._compiled.statement, SAMPLES[name]))
        conn.rollback()
    assert direct.sql == statement
    assert plain(direct.parameters(SAMPLES[name])) == plain(parameters)


def plain(parameters: Any) -> Any:
    """Parameters comparable by value (psycopg wraps bytes in Binary objects that compare by identity)."""
    def value(v: Any) -> Any:
        return bytes(v.obj) if type(v).__name__ == "Binary" else v

    if isinstance(parameters, dict):
        return {k: value(v) for k, v in parameters.items()}
    return tuple(value(v) for v in parameters)


def test_a_driver_error_is_sqlalchemys_exception(service: CAService) -> None:
    values = {"authority_id": 10**6, "serial": "1", "request_id": None, "principal_id": None, "template_name": "t",
              "subject": "CN=x", "names": "{}", "not_before": NOW, "not_after": NOW, "status": "reserved",
              "created_at": NOW}
    with pytest.raises(IntegrityError), service.engine.connect() as conn, conn.begin():  # no such authority
        Statements(service.engine.dialect).reserve.run(conn, values)
