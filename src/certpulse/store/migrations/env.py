"""Alembic environment of the CA database."""

from certpulse.store.alembic_env import run_migrations
from certpulse.store.schema import metadata

run_migrations(metadata)
