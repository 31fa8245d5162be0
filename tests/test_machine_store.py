"""The machine-local database (``meta.db``): its migrations build exactly its one schema, an
agent folder from before the cursors table keeps every consumer's place in the log, and the
store's one rule for "the current certificate of a template" (defect D2)."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import Any

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from sqlalchemy import Engine, inspect, select, text

from certpulse.machine import cursors
from certpulse.machine import schema as t
from certpulse.machine.certstore import LocalStore
from certpulse.machine.current import current, newest, recency
from certpulse.machine.db import MIGRATIONS, open_database
from certpulse.machine.events import EventId
from certpulse.machine.log import read_events
from certpulse.pki import template_info
from certpulse.sql.db import alembic_config, make_engine, read, write

NOW = dt.datetime(2031, 3, 1, 12, tzinfo=dt.UTC)
DAY = dt.timedelta(days=1)
TEMPLATE_OID = "1.3.6.1.4.1.311.21.8.1.2.3.4"


def differences(engine: Engine) -> list[Any]:
    with engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"compare_type": True})
        return list(compare_metadata(context, t.metadata))


def upgrade(engine: Engine, revision: str) -> None:
    with engine.begin() as conn:
        config = alembic_config(engine.url.render_as_string(hide_password=False), MIGRATIONS)
        config.attributes["connection"] = conn
        command.upgrade(config, revision)


def downgrade(engine: Engine, revision: str) -> None:
    with engine.begin() as conn:
        config = alembic_config(engine.url.render_as_string(hide_password=False), MIGRATIONS)
        config.attributes["connection"] = conn
        command.downgrade(config, revision)


# -- migrations ------------------------------------------------------------------------------------

def test_the_migrations_build_exactly_the_one_schema(tmp_path: Path) -> None:
    engine = open_database(tmp_path)
    try:
        assert differences(engine) == []
        with engine.connect() as conn:
            assert set(inspect(conn).get_table_names()) == {*t.metadata.tables, "alembic_version"}
            version = MigrationContext.configure(conn).get_current_revision()
        assert version == ScriptDirectory.from_config(alembic_config("sqlite://", MIGRATIONS)).get_current_head()
    finally:
        engine.dispose()


def test_the_comparison_is_live(tmp_path: Path) -> None:
    engine = open_database(tmp_path)
    try:
        with engine.begin() as conn:
            conn.exec_driver_sql("DROP TABLE cursors")
        assert any(d[0] == "add_table" and d[1].name == "cursors" for d in differences(engine))
    finally:
        engine.dispose()


def test_a_store_from_before_the_cursors_table_keeps_every_consumers_place(tmp_path: Path) -> None:
    """a003 kept task cursors in ``tasks.cursor`` and rebind's in ``state['rebind_cursor']``;
    a004 moves both into ``cursors`` (and back on downgrade) without losing a position."""
    engine = make_engine(f"sqlite:///{tmp_path / 'meta.db'}")
    try:
        upgrade(engine, "a003")
        with write(engine) as conn:
            for name, cursor in (("reload", 17), ("audit", 4)):
                conn.execute(text(
                    "INSERT INTO tasks (name, task_type, command, args, channel, timeout, sha256, created_at, "
                    "cursor, state, attempts, runs, failures) VALUES (:n, 'replace', '/bin/true', '[]', 'system', "
                    "5, :pin, :at, :c, 'ok', 0, 0, 0)"),
                    {"n": name, "c": cursor, "pin": "0" * 64, "at": NOW.replace(tzinfo=None)})
            conn.execute(text("INSERT INTO state (name, value) VALUES ('rebind_cursor', '23')"))
        upgrade(engine, "head")
        with read(engine) as conn:
            found = dict(conn.execute(select(t.cursors.c.consumer, t.cursors.c.seq)).all())
            assert conn.execute(select(t.state.c.name)).scalars().all() == []
        assert found == {"task:reload": 17, "task:audit": 4, "rebind": 23}
        assert differences(engine) == []

        downgrade(engine, "a003")
        with read(engine) as conn:
            tasks = dict(conn.execute(text("SELECT name, cursor FROM tasks")).all())
            rebind = conn.execute(text("SELECT value FROM state WHERE name = 'rebind_cursor'")).scalar()
        assert tasks == {"reload": 17, "audit": 4}
        assert json.loads(rebind) == 23
    finally:
        engine.dispose()


def test_a_store_from_before_the_issuing_server_was_recorded_still_opens(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'meta.db'}")
    try:
        upgrade(engine, "a004")
        with engine.connect() as conn:
            assert "policy_url" not in {c["name"] for c in inspect(conn).get_columns("certificates")}
    finally:
        engine.dispose()
    store = LocalStore(tmp_path)  # opening migrates
    try:
        with store.engine.connect() as conn:
            assert "policy_url" in {c["name"] for c in inspect(conn).get_columns("certificates")}
    finally:
        store.close()


# -- the current certificate of a template ----------------------------------------------------------

def _certificate(cn: str, not_before: dt.datetime, not_after: dt.datetime) -> tuple[Any, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, cn)])
    info = template_info.encode(template_info.TemplateInfo(TEMPLATE_OID, 1, 0))
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(not_before).not_valid_after(not_after)
            .add_extension(info, critical=False).sign(key, hashes.SHA256()))
    return key, cert


@pytest.fixture
def store(tmp_path: Path) -> Any:
    opened = LocalStore(tmp_path / "store")
    yield opened
    opened.close()


def _install(store: LocalStore, cn: str, not_before: dt.datetime, not_after: dt.datetime) -> str:
    key, cert = _certificate(cn, not_before, not_after)
    return store.install(key=key, cert=cert, chain=[], source="manual", now=NOW, template_name="web").thumbprint


def _live(store: LocalStore) -> str:
    return store.live_link("web").resolve().name


def _bind(store: LocalStore, thumbprint: str) -> None:
    with write(store.engine) as conn:
        conn.execute(t.bindings.insert().values(
            name="nginx", kind="files", template=None, thumbprint=thumbprint, target=None, options="{}",
            probe=None, auto=True, state="ok", attempts=0, created_at=NOW, updated_at=NOW))


def test_replace_moves_the_live_link_even_while_a_binding_holds_the_old_one(store: LocalStore) -> None:
    """D2: OLD expires after NEW and a binding serves OLD. ``cert replace OLD NEW`` keeps OLD
    unarchived (the binding still needs its files) but OLD is no longer current: the live link
    must name NEW, as rebind's bindings do. Before the one rule, the link stayed on OLD."""
    old = _install(store, "old.example", NOW - DAY, NOW + 300 * DAY)
    new = _install(store, "new.example", NOW, NOW + 200 * DAY)
    _bind(store, old)
    replaced, _ = store.replace(old, new, NOW)
    assert (replaced.archived, replaced.replaced_by) == (False, new)
    assert _live(store) == new
    assert store.current("web") is not None and store.current("web").thumbprint == new  # type: ignore[union-attr]
    store.recover(NOW)  # a later repair agrees
    assert _live(store) == new
    ids = [e.event_id for e in read_events(store.engine)]
    assert ids.count(EventId.REPLACE) == 1 and EventId.ARCHIVED not in ids  # archived once the binding moves


def test_installing_a_version_that_is_not_the_most_recent_leaves_the_link_on_the_current_one(
        store: LocalStore) -> None:
    """The live link follows the one rule at install too: a later pulse's repair would otherwise
    move it back (an import of an older certificate once flipped the link twice)."""
    old = _install(store, "old.example", NOW - DAY, NOW + 300 * DAY)
    _install(store, "new.example", NOW, NOW + 200 * DAY)
    assert _live(store) == old
    store.recover(NOW)
    assert _live(store) == old


def test_replace_without_a_binding_archives_and_moves_the_link(store: LocalStore) -> None:
    old = _install(store, "old.example", NOW - DAY, NOW + 300 * DAY)
    new = _install(store, "new.example", NOW, NOW + 200 * DAY)
    replaced, _ = store.replace(old, new, NOW)
    assert replaced.archived
    assert _live(store) == new


def test_recency_orders_by_not_after_then_not_before_then_thumbprint() -> None:
    class C:
        def __init__(self, thumbprint: str, not_before: dt.datetime, not_after: dt.datetime) -> None:
            self.thumbprint, self.not_before, self.not_after = thumbprint, not_before, not_after

    a = C("A", NOW, NOW + 10 * DAY)
    b = C("B", NOW + DAY, NOW + 10 * DAY)  # same end, started later
    c = C("C", NOW + DAY, NOW + 10 * DAY)  # a tie but for the thumbprint
    d = C("D", NOW - DAY, NOW + 11 * DAY)  # ends last
    assert newest([a, b]) is b
    assert newest([c, b, a]) is c and newest([a, b, c]) is c  # whatever the order listed
    assert newest([a, b, c, d]) is d
    assert recency(a) < recency(b) < recency(c) < recency(d)
    assert newest([]) is None


def test_current_skips_archived_replaced_and_keyless_versions(store: LocalStore) -> None:
    first = _install(store, "a.example", NOW - DAY, NOW + 100 * DAY)
    second = _install(store, "b.example", NOW - DAY, NOW + 200 * DAY)
    records = store.certificates()
    assert current(records, "web").thumbprint == second  # type: ignore[union-attr]
    store.replace(second, first, NOW)  # an operator says: first replaces second
    assert store.current("web").thumbprint == first  # type: ignore[union-attr]
    assert current(store.certificates(), "other") is None


def test_cursor_helpers_on_a_fresh_store(store: LocalStore) -> None:
    with write(store.engine) as conn:
        assert cursors.lowest(conn) is None
        cursors.create(conn, cursors.task_consumer("x"), 3)
        assert cursors.get(conn, "task:x") == 3
        cursors.remove(conn, "task:x")
        assert cursors.get(conn, "task:x") is None
