"""Opening the machine-local database: ``meta.db`` in the store folder, migrated to the newest
schema (:mod:`certpulse.machine.schema`) on every open, so any command may be the first to run
after an upgrade."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import Engine

from certpulse.sql.db import make_engine, migrate

MIGRATIONS = Path(__file__).with_name("migrations")
DATABASE_NAME = "meta.db"


def open_database(store_root: Path) -> Engine:
    """The engine of ``<store_root>/meta.db``, its schema brought up to date."""
    engine = make_engine(f"sqlite:///{(store_root / DATABASE_NAME).resolve()}", pool_size=2)
    migrate(engine, MIGRATIONS)  # one thread at a time: Alembic's context is process-global
    return engine
