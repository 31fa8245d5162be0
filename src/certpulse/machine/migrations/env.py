"""Alembic environment of the machine-local database (``meta.db``)."""

from certpulse.machine.schema import metadata
from certpulse.sql.alembic_env import run_migrations

run_migrations(metadata)
