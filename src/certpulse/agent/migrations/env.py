"""Alembic environment of the agent's metadata database."""

from certpulse.agent.schema import metadata
from certpulse.sql.alembic_env import run_migrations

run_migrations(metadata)
