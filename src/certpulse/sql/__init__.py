"""SQL plumbing shared by every database certpulse keeps: engines for SQLite and PostgreSQL,
read and write transactions, precompiled hot-path statements, column types and migrations.

It knows no table: the CA's schema is in :mod:`certpulse.ca.storage`, the machine's in
:mod:`certpulse.machine`.
"""
