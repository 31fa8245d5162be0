"""The store on both databases: migrations match the schema, SQLite settings, constraints, types."""

from __future__ import annotations

import datetime as dt
import itertools
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import Connection, Engine, create_engine, event, func, inspect, select
from sqlalchemy.exc import IntegrityError, StatementError

from certpulse.ca.model import Caller
from certpulse.ca.service import CAService
from certpulse.ca.state import KeyRing
from certpulse.ca.stats import read_stats
from certpulse.ca.storage import MIGRATIONS, migrate
from certpulse.ca.storage import schema as t
from certpulse.errors import Reason, Refusal
from certpulse.sql.db import (
    BUSY_TIMEOUT_MS,
    alembic_config,
    make_engine,
    read,
    sqlite_url,
    write,
)
from certpulse.sql.types import UTCDateTime
from conftest import BACKENDS, database

NOW = dt.datetime(2030, 6, 1, 12, 0, 0, 123456, tzinfo=dt.UTC)


@pytest.fixture(params=BACKENDS)
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """An empty database of the test's own, on each backend."""
    with database(str(request.param), tmp_path) as url:
        yield url


@pytest.fixture
def empty_engine(store_url: str) -> Iterator[Engine]:
    engine = make_engine(store_url)
    yield engine
    engine.dispose()


@pytest.fixture
def engine(empty_engine: Engine) -> Engine:
    migrate(empty_engine)
    return empty_engine


@pytest.fixture
def sqlite_engine(tmp_path: Path) -> Iterator[Engine]:
    engine = make_engine(sqlite_url(tmp_path / "ca.db"))
    migrate(engine)
    yield engine
    engine.dispose()


def table_names(engine: Engine) -> set[str]:
    with engine.connect() as conn:
        return set(inspect(conn).get_table_names())


def head_revision() -> str:
    head = ScriptDirectory.from_config(alembic_config("sqlite://", MIGRATIONS)).get_current_head()
    assert head is not None
    return head


def schema_differences(engine: Engine) -> list[Any]:
    with engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"compare_type": True})
        return list(compare_metadata(context, t.metadata))


def add_authority(engine: Engine, name: str = "issuing-1") -> int:
    with write(engine) as conn:
        result = conn.execute(t.authorities.insert().values(
            name=name, role="issuer", certificate_der=b"\x30\x00", cost=0, renewal_only=False,
            enabled=True, created_at=NOW,
        ).returning(t.authorities.c.id))
        return int(result.scalar_one())


def add_certificate(engine: Engine, authority_id: int, serial: str) -> int:
    with write(engine) as conn:
        result = conn.execute(t.certificates.insert().values(
            authority_id=authority_id, serial=serial, template_name="machine",
            subject="CN=host1", names="{}", not_before=NOW, not_after=NOW + dt.timedelta(days=1),
            status="reserved", created_at=NOW,
        ).returning(t.certificates.c.id))
        return int(result.scalar_one())


# --- migrations -----------------------------------------------------------------------------


def test_migrate_creates_the_schema_from_empty(empty_engine: Engine) -> None:
    assert table_names(empty_engine) == set()
    migrate(empty_engine)
    assert table_names(empty_engine) == {*t.metadata.tables, "alembic_version"}
    with read(empty_engine) as conn:
        version = MigrationContext.configure(conn).get_current_revision()
    assert version == head_revision()


def test_migrated_database_matches_the_schema(engine: Engine) -> None:
    assert schema_differences(engine) == []


def test_migrate_is_idempotent(engine: Engine) -> None:
    with write(engine) as conn:
        conn.execute(t.settings.insert().values(name="generation", value="41"))
    migrate(engine)
    migrate(engine)
    assert table_names(engine) == {*t.metadata.tables, "alembic_version"}
    with read(engine) as conn:
        assert conn.execute(select(t.settings.c.value)).scalar_one() == "41"
        versions = conn.exec_driver_sql("SELECT version_num FROM alembic_version").scalars().all()
    assert versions == [head_revision()]
    assert schema_differences(engine) == []


def test_downgrade_to_nothing_and_back(engine: Engine) -> None:
    with engine.begin() as conn:
        config = alembic_config(engine.url.render_as_string(hide_password=False), MIGRATIONS)
        config.attributes["connection"] = conn
        command.downgrade(config, "base")
    assert table_names(engine) <= {"alembic_version"}
    migrate(engine)
    assert schema_differences(engine) == []


def test_compare_metadata_notices_a_missing_table(engine: Engine) -> None:
    """The comparison is live: the test above would fail if the schema drifted."""
    with engine.begin() as conn:
        conn.exec_driver_sql("DROP TABLE archived_keys")
    differences = schema_differences(engine)
    assert any(d[0] == "add_table" and d[1].name == "archived_keys" for d in differences)


def test_migrate_refuses_an_unreachable_database(tmp_path: Path) -> None:
    engines = [
        make_engine(sqlite_url(tmp_path / "no" / "such" / "dir" / "ca.db")),
        make_engine("postgresql://nobody@127.0.0.1:1/none?connect_timeout=2"),
    ]
    for engine in engines:
        with pytest.raises(Refusal) as info:
            migrate(engine)
        assert info.value.reason is Reason.STORE
        engine.dispose()


# --- SQLite settings ------------------------------------------------------------------------


def test_sqlite_runs_in_wal_mode_with_a_busy_timeout(sqlite_engine: Engine) -> None:
    for _ in range(2):  # the first pooled connection and a fresh one
        with sqlite_engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
            assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == BUSY_TIMEOUT_MS
            assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
        sqlite_engine.dispose()
    assert BUSY_TIMEOUT_MS >= 1000


def test_sqlite_readers_do_not_wait_for_an_open_writer(sqlite_engine: Engine) -> None:
    with write(sqlite_engine) as writer:
        writer.execute(t.settings.insert().values(name="k", value="uncommitted"))
        with read(sqlite_engine) as reader:  # would block (and time out) without WAL
            assert reader.execute(select(func.count()).select_from(t.settings)).scalar() == 0
    with read(sqlite_engine) as reader:
        assert reader.execute(select(t.settings.c.value)).scalar_one() == "uncommitted"


def test_sqlite_enforces_foreign_keys(sqlite_engine: Engine) -> None:
    with pytest.raises(IntegrityError):
        add_certificate(sqlite_engine, authority_id=999, serial="1")


def test_write_rolls_back_on_error(engine: Engine) -> None:
    with pytest.raises(RuntimeError), write(engine) as conn:
        conn.execute(t.settings.insert().values(name="k", value="v"))
        raise RuntimeError("boom")
    with read(engine) as conn:
        assert conn.execute(select(func.count()).select_from(t.settings)).scalar() == 0


# --- constraints ----------------------------------------------------------------------------


def test_duplicate_serial_at_one_authority_is_refused(engine: Engine) -> None:
    first, second = add_authority(engine, "issuing-1"), add_authority(engine, "issuing-2")
    add_certificate(engine, first, "1a2b3c")
    with pytest.raises(IntegrityError):
        add_certificate(engine, first, "1a2b3c")
    # the same serial at another authority is a different certificate
    add_certificate(engine, second, "1a2b3c")
    with read(engine) as conn:
        rows = conn.execute(select(t.certificates.c.authority_id, t.certificates.c.serial)
                            .order_by(t.certificates.c.authority_id)).all()
    assert [tuple(r) for r in rows] == [(first, "1a2b3c"), (second, "1a2b3c")]


def test_duplicate_authority_name_is_refused(engine: Engine) -> None:
    add_authority(engine, "issuing-1")
    with pytest.raises(IntegrityError):
        add_authority(engine, "issuing-1")


# --- UTCDateTime ----------------------------------------------------------------------------


_serials = itertools.count(1)


def store_and_load(engine: Engine, value: dt.datetime | None) -> dt.datetime | None:
    """Write ``value`` to a nullable UTCDateTime column (certificates.revoked_at), read it back."""
    serial = f"{next(_serials):x}"
    with write(engine) as conn:
        conn.execute(t.certificates.insert().values(
            authority_id=add_authority_in(conn), serial=serial, template_name="machine",
            subject="CN=x", names="{}", not_before=NOW, not_after=NOW, status="issued",
            created_at=NOW, revoked_at=value,
        ))
    with read(engine) as conn:
        result: dt.datetime | None = conn.execute(
            select(t.certificates.c.revoked_at).where(t.certificates.c.serial == serial)
        ).scalar_one()
    return result


def add_authority_in(conn: Connection) -> int:
    existing = conn.execute(select(t.authorities.c.id).limit(1)).scalar()
    if existing is not None:
        return int(existing)
    return int(conn.execute(t.authorities.insert().values(
        name="issuing-1", role="issuer", certificate_der=b"\x30\x00", cost=0,
        renewal_only=False, enabled=True, created_at=NOW,
    ).returning(t.authorities.c.id)).scalar_one())


def test_utc_datetime_round_trips_aware_utc(engine: Engine) -> None:
    loaded = store_and_load(engine, NOW)
    assert loaded == NOW
    assert loaded is not None and loaded.tzinfo is dt.UTC
    assert loaded.microsecond == 123456


def test_utc_datetime_converts_other_offsets_to_utc(engine: Engine) -> None:
    plus_two = NOW.astimezone(dt.timezone(dt.timedelta(hours=2)))
    loaded = store_and_load(engine, plus_two)
    assert loaded == NOW  # the same instant
    assert loaded is not None and loaded.utcoffset() == dt.timedelta(0)
    assert loaded.hour == 12


def test_utc_datetime_keeps_none(engine: Engine) -> None:
    assert store_and_load(engine, None) is None


def test_utc_datetime_refuses_naive_datetimes(engine: Engine) -> None:
    with pytest.raises(StatementError) as info, write(engine) as conn:
        conn.execute(t.audit.insert().values(at=NOW.replace(tzinfo=None), actor="t",
                                             action="probe"))
    assert isinstance(info.value.orig, ValueError)
    assert "naive" in str(info.value.orig)
    with read(engine) as conn:
        assert conn.execute(select(func.count()).select_from(t.audit)).scalar() == 0


@pytest.mark.parametrize("url", ["sqlite://", "postgresql+psycopg://"])
def test_utc_datetime_type_directly(url: str) -> None:
    dialect = create_engine(url).dialect  # no connection is made
    column_type = UTCDateTime()
    with pytest.raises(ValueError, match="naive"):
        column_type.process_bind_param(dt.datetime(2030, 1, 1), dialect)
    assert column_type.process_bind_param(NOW, dialect) == NOW.replace(tzinfo=None)
    assert column_type.process_result_value(NOW.replace(tzinfo=None), dialect) == NOW
    assert column_type.process_bind_param(None, dialect) is None
    assert column_type.process_result_value(None, dialect) is None


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.datetimes(min_value=dt.datetime(1970, 1, 2), max_value=dt.datetime(2200, 1, 1),
                    timezones=st.sampled_from([
                        dt.UTC, dt.timezone(dt.timedelta(hours=-11)),
                        dt.timezone(dt.timedelta(hours=5, minutes=30)),
                    ])))
def test_utc_datetime_round_trip_property(engine: Engine, value: dt.datetime) -> None:
    loaded = store_and_load(engine, value)
    assert loaded == value
    assert loaded is not None and loaded.tzinfo is dt.UTC


# --- indexes behind the CA's listings and counts (migration 0003) -----------------------------

BIG_TABLE = re.compile(r"\b(FROM|JOIN|UPDATE)\s+(requests|certificates|audit)\b", re.IGNORECASE)


def plans_of(engine: Engine, operation: Callable[[], object]) -> list[tuple[str, str]]:
    """(statement, query plan) for every statement ``operation`` sends to the requests,
    certificates or audit tables: the service's own SQL, explained with its own parameters.
    On PostgreSQL sequential scans are switched off for the explanation, so that a plan over
    these near-empty tables says which index serves the query, as it does over a million rows."""
    sent: list[tuple[str, Any]] = []

    def record(conn: Any, cursor: Any, statement: str, parameters: Any, context: Any, many: bool) -> None:
        if BIG_TABLE.search(statement):
            sent.append((statement, parameters))

    event.listen(engine, "before_cursor_execute", record)
    try:
        operation()
    finally:
        event.remove(engine, "before_cursor_execute", record)
    assert sent, "the operation sent no statement to the big tables"
    raw = engine.raw_connection()
    try:
        cursor = raw.cursor()
        found = []
        for statement, parameters in sent:
            if engine.dialect.name == "sqlite":
                cursor.execute("EXPLAIN QUERY PLAN " + statement, parameters)
                found.append((statement, "\n".join(row[3] for row in cursor.fetchall())))
            else:
                cursor.execute("SET LOCAL enable_seqscan = off")
                cursor.execute("EXPLAIN " + statement, parameters)
                found.append((statement, "\n".join(row[0] for row in cursor.fetchall())))
        raw.rollback()
    finally:
        raw.close()
    return found


def full_reads(plan: str) -> list[str]:
    """Plan lines that read a whole big table or sort every row they found."""
    return [line for line in plan.splitlines()
            if re.search(r"^\s*(->\s*)?(Parallel )?Seq Scan on (requests|certificates|audit)\b", line)
            or re.fullmatch(r"\s*SCAN (requests|certificates|audit)", line)]


@pytest.fixture
def service(engine: Engine, tmp_path: Path) -> CAService:
    return CAService(engine, KeyRing(tmp_path), policy_id="p", token_lifetime=dt.timedelta(hours=1))


OPERATOR = Caller(kind="operator", name="test")


def test_listing_requests_by_status_reads_them_in_id_order_from_an_index(service: CAService) -> None:
    for status in ("pending", "issued"):
        [(_, plan)] = plans_of(service.engine, lambda s=status: service.requests.list(OPERATOR, NOW, s))
        assert "ix_requests_status_id" in plan, plan
        assert "TEMP B-TREE" not in plan and "Sort" not in plan, plan  # no sort of every matching row


def test_metrics_counts_are_read_from_indexes(service: CAService) -> None:
    def stats() -> None:
        with read(service.engine) as conn:
            read_stats(conn, NOW)

    plans = plans_of(service.engine, stats)
    used = "\n".join(plan for _, plan in plans)
    for index in ("ix_requests_template_name_status_created_at", "ix_audit_reason_action_template_name",
                  "ix_certificates_counts"):
        assert index in used, used
    assert not [line for _, plan in plans for line in full_reads(plan)], used


def refused(operation: Callable[..., object], *args: object) -> None:
    with pytest.raises(Refusal):
        operation(*args)


def test_lookups_and_listings_read_no_whole_table(service: CAService) -> None:
    """Every other statement of the request, audit and status operations uses a key or an
    index (or walks the primary key and stops at its LIMIT)."""
    operations: list[Callable[[], object]] = [
        lambda: service.requests.list(OPERATOR, NOW),
        lambda: service.audit.read(OPERATOR, NOW),
        lambda: service.audit.read(OPERATOR, NOW, request_id=7),
        lambda: refused(service.revocation.status, "1f", NOW),
        lambda: refused(service.requests.get, OPERATOR, 7),
    ]
    for operation in operations:
        for statement, plan in plans_of(service.engine, operation):
            bounded = "LIMIT" in statement and "TEMP B-TREE" not in plan  # primary-key order, stops at LIMIT
            assert bounded or not full_reads(plan), (statement, plan)


def test_sqlite_lookups_by_serial_and_principal_keep_their_selective_indexes(sqlite_engine: Engine,
                                                                             tmp_path: Path) -> None:
    """SQLite plans without statistics (the CA never runs ANALYZE): an index led by a column of a
    few values, such as status, would win over the serial and principal indexes for lookups that
    also say status = 'issued', and read every issued certificate. None of 0003's does."""
    service = CAService(sqlite_engine, KeyRing(tmp_path), policy_id="p", token_lifetime=dt.timedelta(hours=1))
    machine = Caller(kind="principal", name="host", principal_id=1, principal_kind="machine")
    [(_, plan)] = plans_of(sqlite_engine, lambda: refused(service.revocation.status, "1f", NOW))
    assert "ix_certificates_serial" in plan, plan
    plans = plans_of(sqlite_engine, lambda: service.policy.document(machine, NOW))
    assert any("ix_certificates_principal_id_template_name" in plan for _, plan in plans), plans
