"""The CA's database (the storage authority): its tables and their Alembic migrations.

One SQLAlchemy Core schema for SQLite and PostgreSQL (:mod:`.schema`); the migrations in
``migrations/versions`` build exactly it. Engines and transactions come from :mod:`certpulse.sql`.
"""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import Engine

from certpulse.sql import db

MIGRATIONS = Path(__file__).with_name("migrations")


def migrate(engine: Engine) -> None:
    """Bring the CA's schema to the newest migration (creating it on an empty database)."""
    db.migrate(engine, MIGRATIONS)


__all__ = ["MIGRATIONS", "migrate"]
