"""Engines for the two supported databases, transactions, and the migration runner.

Shared by the CA's database (:mod:`certpulse.ca.storage`) and the machine-local one
(:mod:`certpulse.machine`); each passes its own migrations folder to :func:`migrate`.

SQLite is the embedded default: WAL journal (readers never block the writer), a busy timeout
so concurrent writers wait instead of failing, foreign keys on, and write transactions opened
with ``BEGIN IMMEDIATE`` so two writers never deadlock upgrading a read lock.

SQLite has one writer at a time, and a writer that finds the lock taken polls for it with
growing sleeps (up to 100 ms each) until the busy timeout: with a server's dozens of threads in
several processes all writing, most of their time went to those sleeps, and the unlucky ones
waited seconds. So for an engine made with ``writer_lock=True`` (the CA's: ``ca serve``
workers and the ``ca`` commands alike), :func:`write` first queues for the database's writer
lock: a thread lock inside the process, then an ``flock`` on a file next to the database shared
by every process. A waiting writer sleeps in the kernel and wakes the moment the lock is free;
``BEGIN IMMEDIATE`` then finds SQLite's own lock free. Writers without it (the agent's store, a
person's sqlite3 shell) still wait for SQLite's lock as before.

PostgreSQL is reached through psycopg 3 (``postgresql+psycopg://``); its writers lock rows,
not the database, and need no queue. A pooled connection is checked before use without a round
trip to the server (a ``SELECT 1`` per checkout was one of ten per issuance): one the server has
closed (restart, ``pg_terminate_backend``, idle timeout) has its end of file waiting on the
socket, and is replaced.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import select
import sqlite3
import threading
import weakref
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import Connection, Dialect, Engine, create_engine, event
from sqlalchemy.exc import DBAPIError, DisconnectionError, OperationalError
from sqlalchemy.pool import ConnectionPoolEntry
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.expression import ClauseElement

from certpulse.errors import Reason, Refusal

if TYPE_CHECKING:
    from alembic.config import Config

BUSY_TIMEOUT_MS = 10_000


def sqlite_url(path: Path) -> str:
    return f"sqlite:///{path}"


class WriterLock:
    """One write transaction at a time on a SQLite database: a thread lock for this process,
    then an exclusive ``flock`` on ``path`` (none for an in-memory database) for all processes.

    Re-entrant within a thread (a nested write would wait for itself). The lock file is opened
    lazily in each process, so an engine inherited across ``fork`` gets its own descriptor.
    A process that dies holding it releases it with its descriptors.
    """

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._lock = threading.RLock()
        self._depth = 0
        self._fd: int | None = None
        self._pid = 0

    def _descriptor(self) -> int | None:
        if self.path is None:
            return None
        if self._fd is None or self._pid != os.getpid():
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            self._pid = os.getpid()
        return self._fd

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        with self._lock:
            fd = self._descriptor() if self._depth == 0 else None
            if fd is not None:
                fcntl.flock(fd, fcntl.LOCK_EX)  # releases the GIL while it waits
            self._depth += 1
            try:
                yield
            finally:
                self._depth -= 1
                if fd is not None:
                    fcntl.flock(fd, fcntl.LOCK_UN)


_WRITER_LOCKS: weakref.WeakKeyDictionary[Engine, WriterLock] = weakref.WeakKeyDictionary()


def writer_lock_path(database: str | None) -> Path | None:
    """The lock file of a SQLite database file (``ca.db`` -> ``ca.db-writer``); None in memory."""
    if not database or database == ":memory:" or database.startswith("file:"):
        return None
    return Path(database + "-writer")


def make_engine(url: str, *, pool_size: int = 8, writer_lock: bool = False) -> Engine:
    """An engine for ``url``; SQLite gets WAL, busy timeout, explicit BEGIN handling and, with
    ``writer_lock``, a queue for writers (see the module's description)."""
    if url.startswith("sqlite"):
        engine = create_engine(url, pool_size=pool_size, max_overflow=4)
        event.listen(engine, "connect", _sqlite_on_connect)
        event.listen(engine, "begin", _sqlite_on_begin)
        if writer_lock:
            _WRITER_LOCKS[engine] = WriterLock(writer_lock_path(engine.url.database))
        return engine
    if url.startswith("postgresql://"):
        url = "postgresql+psycopg://" + url.removeprefix("postgresql://")
    engine = create_engine(url, pool_size=pool_size, max_overflow=4)
    if engine.dialect.driver == "psycopg":
        event.listen(engine, "checkout", _postgres_on_checkout)
        return engine
    engine.dispose()
    return create_engine(url, pool_size=pool_size, max_overflow=4, pool_pre_ping=True)


def _postgres_on_checkout(dbapi_connection: Any, record: ConnectionPoolEntry, proxy: Any) -> None:
    """Refuse a pooled connection the server has closed; the pool then opens a new one.

    An idle connection has nothing to read, unless the server hung up (end of file, or the
    error it sent before closing) or sent a notice meanwhile: either way it is replaced.
    """
    if dbapi_connection.closed or dbapi_connection.broken:
        raise DisconnectionError("the connection was closed")
    poller = select.poll()
    poller.register(dbapi_connection.pgconn.socket, select.POLLIN | select.POLLERR | select.POLLHUP)
    if poller.poll(0):
        raise DisconnectionError("the server closed the connection, or has something unasked to say")


def _sqlite_on_connect(dbapi_connection: sqlite3.Connection, record: ConnectionPoolEntry) -> None:
    # Take transaction control away from the sqlite3 module; we issue BEGIN ourselves.
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    cursor.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
    cursor.execute("PRAGMA journal_mode = WAL")
    cursor.execute("PRAGMA synchronous = NORMAL")
    cursor.execute("PRAGMA foreign_keys = ON")
    cursor.close()


def _sqlite_on_begin(conn: Connection) -> None:
    """``BEGIN`` straight on the driver's connection: through SQLAlchemy's execution machinery it
    cost as much CPU as a short transaction's statement. Its errors (``database is locked``)
    become SQLAlchemy's exceptions all the same."""
    mode = conn.get_execution_options().get("sqlite_begin", "DEFERRED")
    statement = f"BEGIN {mode}"
    driver = conn.connection.dbapi_connection
    assert driver is not None
    try:
        driver.execute(statement)
    except sqlite3.Error as exc:
        raise DBAPIError.instance(statement, (), exc, sqlite3.Error, dialect=conn.dialect) from exc


@contextlib.contextmanager
def write(engine: Engine) -> Iterator[Connection]:
    """One write transaction: committed on success, rolled back on any exception. On SQLite
    (an engine from :func:`make_engine` with ``writer_lock``) it first waits its turn for the
    database's writer lock."""
    lock = _WRITER_LOCKS.get(engine)
    # The connection is taken from the pool (and given back) outside the writer's turn.
    with engine.connect().execution_options(sqlite_begin="IMMEDIATE") as conn, \
            lock.held() if lock is not None else contextlib.nullcontext(), conn.begin():
        yield conn


@contextlib.contextmanager
def read(engine: Engine) -> Iterator[Connection]:
    with engine.connect() as conn, conn.begin():
        yield conn


class DirectStatement:
    """A Core statement compiled once for a dialect, run on the driver's own cursor.

    SQLAlchemy's work around each execution (cache lookup, execution context, events, result
    object) cost more CPU per issuance than the database did. This sends the very SQL and bound
    values SQLAlchemy would (the same compilation and type processors: UTC datetimes, booleans,
    bytes) straight to the DBAPI connection, inside the transaction the :class:`Connection`
    holds. Driver errors become SQLAlchemy's own exceptions, and a lost connection is
    invalidated, as SQLAlchemy would do it. Only for the few statements of hot paths.
    """

    def __init__(self, statement: ClauseElement, dialect: Dialect, columns: Sequence[str] | None = None) -> None:
        compiled = statement.compile(dialect=dialect, column_keys=list(columns) if columns is not None else None)
        assert isinstance(compiled, SQLCompiler)
        self.sql = compiled.string
        self._compiled = compiled
        self._dialect = dialect
        self._order = list(compiled.positiontup or ()) if compiled.positional else None
        names = compiled.bind_names
        # what the statement itself binds (e.g. status="issued"), and what each execution must give
        self._fixed = {names[b]: b.effective_value for b in compiled.binds.values() if not b.required}
        self._required = frozenset(names[b] for b in compiled.binds.values() if b.required)
        self._processors = {
            name: processor for name, bind in compiled.binds.items()
            if (processor := bind.type.dialect_impl(dialect).bind_processor(dialect)) is not None
        }

    def parameters(self, values: Mapping[str, Any]) -> Any:
        """What goes to the driver for ``values``: a tuple (positional styles) or a dict."""
        missing = self._required.difference(values)
        if missing:
            raise KeyError(f"no value for {', '.join(sorted(missing))} in {self.sql!r}")
        params = {**self._fixed, **values}
        for name, processor in self._processors.items():
            params[name] = processor(params[name])
        return tuple(params[name] for name in self._order) if self._order is not None else params

    def run(self, conn: Connection, values: Mapping[str, Any]) -> Any:
        """Execute on ``conn``'s driver connection; the driver's cursor (for ``fetchone``)."""
        params = self.parameters(values)
        driver = conn.connection.dbapi_connection
        assert driver is not None
        cursor = driver.cursor()
        try:
            cursor.execute(self.sql, params)
        except self._dialect.loaded_dbapi.Error as exc:
            lost = self._dialect.is_disconnect(exc, driver, cursor)
            if lost:
                conn.invalidate(exc)
            raise DBAPIError.instance(self.sql, params, exc, self._dialect.loaded_dbapi.Error,
                                      connection_invalidated=lost, dialect=self._dialect) from exc
        return cursor


def alembic_config(url: str, location: Path) -> Config:
    from alembic.config import Config  # imported here: most commands never migrate

    config = Config()
    config.set_main_option("script_location", str(location))
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return config


# Alembic's migration context is process-global: two threads migrating at once (the agent
# daemon's pulse and its task thread, each opening a store it could not open before) take turns.
_MIGRATING = threading.Lock()


def migrate(engine: Engine, location: Path) -> None:
    """Bring the schema to the newest migration in ``location`` (creating it on an empty database)."""
    from alembic import command

    try:
        with _MIGRATING, engine.begin() as conn:
            config = alembic_config(engine.url.render_as_string(hide_password=False), location)
            config.attributes["connection"] = conn
            command.upgrade(config, "head")
    except OperationalError as exc:
        raise Refusal(Reason.STORE, f"cannot reach the database: {exc.orig}") from None

