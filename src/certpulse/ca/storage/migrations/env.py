"""Alembic environment of the CA database."""

from certpulse.sql.alembic_env import run_migrations
from certpulse.ca.storage.schema import metadata

run_migrations(metadata)
