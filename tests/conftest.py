"""Fixtures: a CA made by the real CLI on SQLite and on PostgreSQL, and a real server for it.

PostgreSQL tests use the local server (127.0.0.1:5432, database ``test``, trust auth), each
CA in a schema of its own that is dropped afterwards. When no PostgreSQL answers they are
reported as skipped with the command that starts one, never passed silently; CI sets
``CERTPULSE_REQUIRE_POSTGRES=1`` so that a missing server fails the run instead.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

from support import CA, Client, init_ca, serve

PG_ADMIN_URL = os.environ.get("CERTPULSE_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
PG_HINT = ("PostgreSQL is not answering at 127.0.0.1:5432 (database 'test'); start it with: "
           "pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start")
BACKENDS = ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]

_pg_ok: bool | None = None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """A test marked ``sqlite_only`` in a module whose fixtures run on both backends is collected
    once, with SQLite (its point does not depend on the database, or it holds SQLite's writer
    lock): deselected for PostgreSQL, rather than reported as a skip."""
    kept: list[pytest.Item] = []
    dropped: list[pytest.Item] = []
    for item in items:
        callspec = getattr(item, "callspec", None)
        backend = callspec.params.get("backend") if callspec is not None else None
        if item.get_closest_marker("sqlite_only") is not None and backend not in (None, "sqlite"):
            dropped.append(item)
        else:
            kept.append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = kept


def postgres_available() -> bool:
    global _pg_ok
    if _pg_ok is None:
        try:
            engine = create_engine(PG_ADMIN_URL, connect_args={"connect_timeout": 3})
            with engine.connect() as conn:
                conn.execute(text("select 1"))
            engine.dispose()
            _pg_ok = True
        except Exception:
            _pg_ok = False
    return _pg_ok


def require_postgres() -> None:
    if postgres_available():
        return
    if os.environ.get("CERTPULSE_REQUIRE_POSTGRES") == "1":
        pytest.fail(PG_HINT)
    pytest.skip(PG_HINT)


def pytest_report_header() -> str:
    return "postgresql: " + ("reachable" if postgres_available() else PG_HINT)


@contextlib.contextmanager
def pg_schema() -> Iterator[str]:
    """A fresh, empty schema in the local PostgreSQL, as a database URL; dropped afterwards."""
    require_postgres()
    schema = f"cp_{uuid.uuid4().hex[:12]}"
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    try:
        yield f"{PG_ADMIN_URL}?options=-csearch_path%3D{schema}"
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


@contextlib.contextmanager
def database(backend: str, directory: Path) -> Iterator[str]:
    if backend == "sqlite":
        yield f"sqlite:///{directory / 'ca.db'}"
    else:
        with pg_schema() as url:
            yield url


@pytest.fixture(scope="module", params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(scope="module")
def ca(backend: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[CA]:
    """A CA with the example templates, shared by one test module, on each backend."""
    directory = tmp_path_factory.mktemp("ca") / "ca"
    with database(backend, directory.parent) as url:
        yield init_ca(directory, url)


@pytest.fixture(scope="module")
def server(ca: CA) -> Iterator[str]:
    with serve(ca) as base:
        yield base


@pytest.fixture
def fresh_ca(backend: str, tmp_path: Path) -> Iterator[CA]:
    """A CA of a test's own, for tests that change CA-wide state."""
    directory = tmp_path / "ca"
    with database(backend, tmp_path) as url:
        yield init_ca(directory, url)


@pytest.fixture(scope="module")
def admin(server: str, ca: CA) -> Client:
    return Client(server, ca.admin_key)


@pytest.fixture
def machine(ca: CA, server: str) -> Client:
    """A new machine principal (in group webservers), enrolled over HTTP."""
    name = f"host-{uuid.uuid4().hex[:8]}.example.internal"
    return Client.enrolled(server, ca.add_principal(name, "--group", "webservers"))


@pytest.fixture(scope="module")
def pki(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> CA:
    """A SQLite CA prepared for agent tests (see agent_support.prepare_ca), one per test module."""
    from agent_support import prepare_ca

    return prepare_ca(tmp_path_factory.mktemp(f"{request.module.__name__.removeprefix('test_')}-ca") / "ca")


@pytest.fixture(scope="module")
def ca_url(pki: CA) -> Iterator[str]:
    """That CA served over loopback with TLS (agents pin its root) for the whole module."""
    with serve(pki, tls=True) as base:
        yield base
