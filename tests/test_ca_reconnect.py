"""The CA server's pooled PostgreSQL connections: one the server closed while it sat in the pool
(a restart, ``pg_terminate_backend``, an idle timeout) is replaced when it is next taken, without
a round trip per checkout and without failing the request that takes it. A database that cannot
be reached at all makes the server answer 503 with Retry-After and report itself not ready."""

from __future__ import annotations

import contextlib
import socket
import threading
import uuid
from pathlib import Path

import httpx
import pytest
from sqlalchemy import create_engine, make_url, text

from agent_support import wait_for
from conftest import PG_ADMIN_URL, pg_schema
from support import Client, assert_problem, free_port, init_ca, make_csr, serve

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


class TcpRelay:
    """A loopback TCP relay to PostgreSQL that a test can cut (the database becomes unreachable:
    connections end, new ones are refused) and restore on the same port."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self.port = free_port()
        self._sockets: set[socket.socket] = set()
        self._listener: socket.socket | None = None
        self._lock = threading.Lock()

    def start(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def stop(self) -> None:
        with self._lock:
            listener, self._listener = self._listener, None
            sockets, self._sockets = self._sockets, set()
        if listener is not None:
            with contextlib.suppress(OSError):
                listener.shutdown(socket.SHUT_RDWR)  # wakes the accepting thread; a close alone would not
            listener.close()
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
                server = socket.create_connection(self.upstream, timeout=30)
            except OSError:
                return
            server.settimeout(None)
            with self._lock:
                self._sockets |= {client, server}
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(source: socket.socket, target: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                target.sendall(data)
        except OSError:
            pass
        with contextlib.suppress(OSError):
            target.shutdown(socket.SHUT_WR)


def test_an_unreachable_database_is_503_with_retry_after_and_not_ready(tmp_path: Path) -> None:
    """The database goes away under a running server: submissions are 503 problems with
    Retry-After, /readyz is 503 with Retry-After, /livez stays 200; when it is back, all recover."""
    with pg_schema() as url:
        parsed = make_url(url)
        relay = TcpRelay((parsed.host or "127.0.0.1", parsed.port or 5432))
        relay.start()
        try:
            ca = init_ca(tmp_path / "ca", url.replace(f"{parsed.host}:{parsed.port or 5432}",
                                                     f"127.0.0.1:{relay.port}", 1))
            with serve(ca, "--workers", "2") as base:
                client = Client.enrolled(base, ca.add_principal("unreachable.example.internal"))
                client.enroll("machine")
                assert httpx.get(f"{base}/readyz", timeout=30).json()["database"] == "ok"

                relay.stop()
                submitted = client.submit("machine", make_csr()[1])
                body = assert_problem(submitted, 503, "unavailable")
                assert submitted.headers["retry-after"] == "10" and body["retry_after"] == 10, submitted.headers
                assert "database is unavailable" in body["detail"]

                def not_ready() -> httpx.Response | None:
                    answer = httpx.get(f"{base}/readyz", timeout=30)
                    return answer if answer.status_code == 503 else None

                for _ in range(4):  # both workers say so (the kernel picks which one answers)
                    ready = wait_for(not_ready, 60, "/readyz to report the database unavailable")
                    assert ready.headers["retry-after"] == "10", ready.headers
                    assert ready.json()["database"] == "unavailable" and ready.json()["status"] == "unavailable"
                scrape = httpx.get(f"{base}/metrics", timeout=30)
                assert_problem(scrape, 503, "unavailable")
                assert scrape.headers["retry-after"] == "10", scrape.headers
                live = httpx.get(f"{base}/livez", timeout=30)
                assert live.status_code == 200 and live.json()["status"] == "alive"
                assert httpx.get(f"{base}/healthz", timeout=30).status_code == 200  # saturation only, as documented

                relay.start()
                wait_for(lambda: httpx.get(f"{base}/readyz", timeout=30).status_code == 200, 60,
                         "/readyz to recover")
                client.enroll("machine")
        finally:
            relay.stop()
