"""The CA server's pooled PostgreSQL connections: one the server closed while it sat in the pool
(a restart, ``pg_terminate_backend``, an idle timeout) is replaced when it is next taken, without
a round trip per checkout and without failing the request that takes it."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

from agent_support import wait_for
from conftest import PG_ADMIN_URL, pg_schema
from support import Client, init_ca, serve

pytestmark = pytest.mark.postgres


def test_connections_the_server_closed_are_replaced_unnoticed(tmp_path: Path) -> None:
    name = f"cp_reconnect_{uuid.uuid4().hex[:8]}"
    with pg_schema() as url:
        ca = init_ca(tmp_path / "ca", f"{url}&application_name={name}")
        with serve(ca) as base:
            client = Client.enrolled(base, ca.add_principal("reconnect.example.internal"))
            for _ in range(3):
                client.enroll("machine")  # the worker's pool now holds idle connections
            admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
            try:
                with admin.connect() as conn:
                    ended = conn.execute(text(
                        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE application_name = :n"),
                        {"n": name}).scalar_one()

                    def gone() -> bool:
                        # pg_terminate_backend only signals: a backend on a busy machine may take a
                        # moment to exit and close its socket. Until it has, the connection is not
                        # closed yet, and no checkout could know better.
                        return conn.execute(text("SELECT count(*) FROM pg_stat_activity WHERE application_name = :n"),
                                            {"n": name}).scalar_one() == 0

                    wait_for(gone, 60, "the terminated backends to exit")
            finally:
                admin.dispose()
            assert ended >= 1
            for _ in range(3):
                client.enroll("machine")
