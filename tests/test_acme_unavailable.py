"""The ACME routes while the database does not answer: every request a 503 problem document
(``serverInternal``) with ``Retry-After``, never a 500; when the database is back, ACME works
again. PostgreSQL behind a TCP relay the test cuts (as test_ca_reconnect does)."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
from sqlalchemy import make_url

from acme_client import ACMEClient, configure_acme, eab_for, problem_type
from agent_support import wait_for
from conftest import pg_schema
from support import init_ca, serve
from test_ca_reconnect import TcpRelay

pytestmark = pytest.mark.postgres


def test_acme_answers_503_with_retry_after_while_the_database_is_gone(tmp_path: Path) -> None:
    with pg_schema() as url:
        parsed = make_url(url)
        relay = TcpRelay((parsed.host or "127.0.0.1", parsed.port or 5432))
        relay.start()
        try:
            ca = init_ca(tmp_path / "ca", url.replace(f"{parsed.host}:{parsed.port or 5432}",
                                                     f"127.0.0.1:{relay.port}", 1))
            ca.cli("principal", "add", "acme-down", "--group", "webservers")
            configure_acme(ca.dir, default_profile="webserver")
            with serve(ca) as base:
                client = ACMEClient(f"{base}/acme/directory")
                assert client.new_account(eab=eab_for(ca, "acme-down")).status_code == 201
                relay.stop()
                for response in (client.post(client.url("newOrder"),
                                             {"identifiers": [{"type": "dns", "value": "d.example.internal"}]},
                                             retry_bad_nonce=False),
                                 client.get(client.account_url or "")):
                    assert response.status_code == 503, response.text
                    assert problem_type(response) == "serverInternal", response.text
                    assert response.headers["retry-after"] == "10"
                    assert "database" in response.json()["detail"]
                relay.start()

                def works() -> httpx.Response | None:
                    answer = client.get(client.account_url or "")
                    return answer if answer.status_code == 200 else None

                wait_for(works, 60, "ACME to answer again once the database is back")
        finally:
            relay.stop()
