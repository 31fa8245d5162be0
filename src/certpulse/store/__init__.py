"""The CA's database: one SQLAlchemy Core implementation for SQLite and PostgreSQL."""
