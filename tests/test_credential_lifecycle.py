"""Credentials can be withdrawn, through the real CLI and a real two-worker server.

API keys are listed (never shown), revoked and expire; the last valid one cannot be revoked.
Principals are disabled, enabled and removed; a new enrollment token supersedes unused ones.
Every withdrawal takes effect at once on every worker, including for a principal a worker
remembers from a recent submission, and every one is audited.

A request cannot be sent to a chosen worker, so "every worker" is tested by numbers: each check
opens many fresh connections (the kernel hands each to either worker), so a worker that still
answered from memory would be hit with near certainty (one in 2^15 to miss it with 16).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from alembic import command
from alembic.migration import MigrationContext
from sqlalchemy import inspect, select

from agent_support import faketime_prefix
from certpulse.ca.storage import MIGRATIONS, migrate
from certpulse.ca.storage import schema as t
from certpulse.sql.db import alembic_config, make_engine, read, write
from conftest import database
from support import (
    CA,
    CERTPULSE,
    Client,
    assert_problem,
    cli_json,
    make_csr,
    renewal_evidence,
    serve,
)

FRESH_CONNECTIONS = 16  # per check: a worker that answered from memory is missed with p = 2^-15
ORDINAL = itertools.count(1)


@pytest.fixture(scope="module")
def two_workers(ca: CA) -> Iterator[str]:
    with serve(ca, "--workers", "2") as base:
        yield base


def unique(prefix: str) -> str:
    return f"{prefix}-{next(ORDINAL)}-{uuid.uuid4().hex[:6]}"


def add_key(ca: CA, name: str, *extra: str, faketime: str | None = None) -> str:
    """``apikey add`` through the CLI (optionally with its clock moved); the printed key."""
    result = subprocess.run([*faketime_prefix(faketime), *CERTPULSE, "apikey", "add", name, *extra,
                             "--dir", str(ca.dir)], capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    return next(line.strip() for line in result.stdout.splitlines() if line.strip().startswith("cpa_"))


def on_fresh_connections(base: str, secret: str | None, method: str, path: str,
                         body: Any = None, times: int = FRESH_CONNECTIONS) -> list[httpx.Response]:
    """The same request, each time on a new connection (so on either worker)."""
    headers = {"Authorization": f"Bearer {secret}"} if secret else {}
    answers = []
    for _ in range(times):
        with httpx.Client(base_url=base, headers=headers, timeout=30) as http:
            answers.append(http.request(method, path, json=body))
    return answers


def assert_all_unauthenticated(answers: list[httpx.Response]) -> None:
    for answer in answers:
        body = assert_problem(answer, 401, "unauthenticated")
        assert body["detail"] == "the credential is not valid", body  # said as of an unknown one


def audit(ca: CA, after: int = 0) -> list[dict[str, Any]]:
    """Audit rows newer than ``after``, oldest first, read through ``certpulse audit --json``."""
    rows: list[dict[str, Any]] = cli_json(ca, "audit", "--limit", "10000")
    return sorted((r for r in rows if r["id"] > after), key=lambda r: r["id"])


def newest_audit_id(ca: CA) -> int:
    rows = cli_json(ca, "audit", "--limit", "1")
    return int(rows[0]["id"]) if rows else 0


def enrolled(ca: CA, base: str, name: str, *extra: str) -> tuple[Client, str]:
    token = ca.add_principal(name, *extra)
    client = Client.enrolled(base, token)
    return client, str(client.http.headers["Authorization"]).removeprefix("Bearer ")


def submissions(base: str, credential: str, times: int = FRESH_CONNECTIONS) -> list[httpx.Response]:
    """``times`` submissions of a new CSR each, each on a new connection (the SubmitRoute path)."""
    answers = []
    for _ in range(times):
        with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {credential}"}, timeout=30) as http:
            answers.append(http.post("/v1/requests", json={"template": "machine", "csr": make_csr()[1]}))
    return answers


# -- API keys -------------------------------------------------------------------------------------

def test_a_revoked_api_key_is_refused_on_every_route_and_worker(ca: CA, two_workers: str) -> None:
    name = unique("ops")
    key = add_key(ca, name)
    assert all(a.status_code == 200 for a in on_fresh_connections(two_workers, key, "GET", "/v1/requests"))
    listed = ca.cli("apikey", "list", "--json")
    assert key not in listed.stdout and hashlib.sha256(key.encode()).hexdigest() not in listed.stdout
    row = next(r for r in json.loads(listed.stdout) if r["name"] == name)
    assert row["state"] == "valid" and row["revoked_at"] is None and row["expires_at"] is None
    before = newest_audit_id(ca)

    ca.cli("apikey", "revoke", name)

    assert_all_unauthenticated(on_fresh_connections(two_workers, key, "GET", "/v1/requests"))
    assert_all_unauthenticated(on_fresh_connections(two_workers, key, "GET", "/v1/audit"))
    assert_all_unauthenticated(on_fresh_connections(two_workers, key, "POST", "/v1/requests/1/deny",
                                                    {"reason": "x"}, times=4))
    assert_all_unauthenticated(on_fresh_connections(two_workers, key, "POST", "/v1/certificates/1f/revoke",
                                                    {"reason": "keyCompromise"}, times=4))
    unknown = on_fresh_connections(two_workers, "cpa_" + "x" * 43, "GET", "/v1/requests", times=1)[0]
    assert unknown.json()["detail"] == on_fresh_connections(two_workers, key, "GET", "/v1/requests",
                                                            times=1)[0].json()["detail"]
    row = next(r for r in cli_json(ca, "apikey", "list") if r["name"] == name)
    assert row["state"] == "revoked" and row["revoked_at"] is not None
    rows = audit(ca, before)
    revoked = [r for r in rows if r["action"] == "api-key-revoked"]
    assert len(revoked) == 1 and revoked[0]["detail"] == name and revoked[0]["actor"].startswith("operator:")
    refusals = [r for r in rows if r["action"] == "unauthenticated"]
    assert len(refusals) >= 2 * FRESH_CONNECTIONS + 8
    assert all(r["reason"] == "unauthenticated" and r["actor"] == "anonymous:-" for r in refusals)
    again = ca.cli("apikey", "revoke", name, check=False)
    assert again.returncode != 0 and "already revoked" in again.stderr and "Traceback" not in again.stderr


def test_an_api_key_expires(ca: CA, two_workers: str) -> None:
    name = unique("short")
    key = add_key(ca, name, "--expires", "1d")
    row = next(r for r in cli_json(ca, "apikey", "list") if r["name"] == name)
    assert row["state"] == "valid" and row["expires_at"] is not None
    assert all(a.status_code == 200 for a in on_fresh_connections(two_workers, key, "GET", "/v1/audit", times=4))
    # The same key, asked two days later: a whole server whose clock moved
    with serve(ca, prefix=tuple(faketime_prefix("+2d"))) as later:
        assert_all_unauthenticated(on_fresh_connections(later, key, "GET", "/v1/audit", times=4))
        assert Client(later, ca.admin_key).http.get("/v1/audit").status_code == 200  # no expiry: still valid
    # A key made two days ago for one day, asked now
    stale_name = unique("stale")
    stale = add_key(ca, stale_name, "--expires", "1d", faketime="-2d")
    assert_all_unauthenticated(on_fresh_connections(two_workers, stale, "GET", "/v1/requests", times=4))
    assert next(r for r in cli_json(ca, "apikey", "list") if r["name"] == stale_name)["state"] == "expired"
    added = [r for r in audit(ca) if r["action"] == "api-key-added" and r["detail"].startswith(name + ";")]
    assert len(added) == 1 and "expires" in added[0]["detail"]


@pytest.mark.parametrize("expires", ["0d", "-1d", "soon", "1x"])
def test_an_api_key_lifetime_must_be_a_positive_duration(ca: CA, expires: str) -> None:
    name = unique("bad")
    result = ca.cli("apikey", "add", name, "--expires", expires, check=False)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert name not in {r["name"] for r in cli_json(ca, "apikey", "list")}


def test_the_last_valid_api_key_cannot_be_revoked(fresh_ca: CA) -> None:
    ca = fresh_ca
    refused = ca.cli("apikey", "revoke", "admin", check=False)
    assert refused.returncode != 0 and "Traceback" not in refused.stderr
    assert "last valid" in refused.stderr and "apikey add" in refused.stderr
    # An expired key does not count as another valid one
    add_key(ca, "expired", "--expires", "1h", faketime="-1d")
    assert ca.cli("apikey", "revoke", "admin", check=False).returncode != 0
    with serve(ca) as base:
        assert Client(base, ca.admin_key).http.get("/v1/requests").status_code == 200
        second = add_key(ca, "second", "--expires", "90d")
        ca.cli("apikey", "revoke", "admin")  # the key printed at init, now that another exists
        assert_all_unauthenticated(on_fresh_connections(base, ca.admin_key, "GET", "/v1/requests", times=4))
        assert Client(base, second).http.get("/v1/requests").status_code == 200
        last = ca.cli("apikey", "revoke", "second", check=False)
        assert last.returncode != 0 and "last valid" in last.stderr
        assert Client(base, second).http.get("/v1/requests").status_code == 200
    # The CLI on the CA host needs no key: it still manages the CA
    ca.cli("principal", "add", "after-lockout.example.internal")
    states = {r["name"]: r["state"] for r in cli_json(ca, "apikey", "list")}
    assert states == {"admin": "revoked", "expired": "expired", "second": "valid"}
    refusals = [r for r in audit(ca) if r["action"] == "api-key-revoke-refused"]
    assert len(refusals) == 3 and all(r["reason"] == "conflict" for r in refusals)


def test_unknown_api_key_name_is_refused(ca: CA) -> None:
    result = ca.cli("apikey", "revoke", "no-such-key", check=False)
    assert result.returncode != 0 and "no API key named" in result.stderr and "Traceback" not in result.stderr


# -- principals -----------------------------------------------------------------------------------

def test_a_disabled_principal_is_refused_at_once_on_every_worker(ca: CA, two_workers: str) -> None:
    name = unique("off") + ".example.internal"
    client, credential = enrolled(ca, two_workers, name)
    first = client.submit("machine", make_csr()[1])
    assert first.status_code == 201, first.text
    # Both workers remember the caller (submissions are answered from memory, then confirmed)
    assert [a.status_code for a in submissions(two_workers, credential)] == [201] * FRESH_CONNECTIONS
    before = newest_audit_id(ca)

    ca.cli("principal", "disable", name)

    # The very next submission on the kept-alive connection, then on fresh ones, then the reads
    assert_problem(client.submit("machine", make_csr()[1]), 401, "unauthenticated")
    assert_all_unauthenticated(submissions(two_workers, credential))
    assert_all_unauthenticated(on_fresh_connections(two_workers, credential, "GET", "/v1/policy"))
    assert_all_unauthenticated(on_fresh_connections(
        two_workers, credential, "GET", f"/v1/requests/{first.json()['id']}", times=4))
    assert name in {p["name"] for p in cli_json(ca, "principal", "list") if not p["enabled"]}
    rows = audit(ca, before)
    assert [r["detail"] for r in rows if r["action"] == "principal-disabled"] == [f"machine {name}"]
    assert not [r for r in rows if r["action"] in ("issued", "pending")]

    ca.cli("principal", "enable", name)

    assert [a.status_code for a in submissions(two_workers, credential)] == [201] * FRESH_CONNECTIONS
    assert client.http.get("/v1/policy").status_code == 200
    assert [r["actor"].startswith("operator:") for r in audit(ca, before)
            if r["action"] in ("principal-disabled", "principal-enabled")] == [True, True]

    # Disabled again while both workers remember it: a submission refused before its write
    # transaction (malformed evidence) is refused as unauthenticated, not told what was malformed
    ca.cli("principal", "disable", name)
    bad_evidence = {"template": "machine", "csr": make_csr()[1],
                    "renewal": {"certificate": first.json()["certificate"], "signature": "not base64!"}}
    assert_problem(client.http.post("/v1/requests", json=bad_evidence), 401, "unauthenticated")
    assert_all_unauthenticated(on_fresh_connections(two_workers, credential, "POST", "/v1/requests", bad_evidence))


def test_a_disabled_principal_cannot_exchange_a_token_or_have_a_request_approved(
        ca: CA, two_workers: str) -> None:
    name = unique("held") + ".example.internal"
    client, _ = enrolled(ca, two_workers, name)
    pending = client.submit("approval-required", make_csr()[1])
    assert pending.status_code == 202, pending.text
    request_id = pending.json()["id"]
    token = json.loads(ca.cli("principal", "token", name, "--json").stdout)["token"]
    ca.cli("principal", "disable", name)
    admin = Client(two_workers, ca.admin_key)

    refused = admin.http.post(f"/v1/requests/{request_id}/approve")
    assert_problem(refused, 409, "requester-disabled")
    assert "disabled" in refused.json()["detail"]
    cli_refused = ca.cli("request", "approve", str(request_id), check=False)
    assert cli_refused.returncode != 0 and "disabled" in cli_refused.stderr
    exchange = httpx.post(f"{two_workers}/v1/tokens/exchange", json={"token": token}, timeout=30)
    assert_problem(exchange, 401, "token-invalid")
    assert admin.http.get(f"/v1/requests/{request_id}").json()["status"] == "pending"

    ca.cli("principal", "enable", name)
    approved = admin.http.post(f"/v1/requests/{request_id}/approve")
    assert approved.status_code == 200, approved.text
    refusals = [r for r in audit(ca) if r["action"] == "approve-refused" and r["request_id"] == request_id]
    assert len(refusals) == 2 and all(r["reason"] == "requester-disabled" for r in refusals)


def test_a_disabled_manager_principal_loses_its_rights_at_once(ca: CA, two_workers: str) -> None:
    name = unique("boss")
    manager, credential = enrolled(ca, two_workers, name, "--kind", "user", "--role", "ca-manager")
    assert all(a.status_code == 200 for a in on_fresh_connections(two_workers, credential, "GET", "/v1/audit"))
    ca.cli("principal", "disable", name)
    assert_all_unauthenticated(on_fresh_connections(two_workers, credential, "GET", "/v1/requests"))
    assert_all_unauthenticated(on_fresh_connections(two_workers, credential, "POST", "/v1/requests/1/approve",
                                                    times=4))
    assert_all_unauthenticated(on_fresh_connections(two_workers, credential, "POST", "/v1/certificates/1f/revoke",
                                                    {"reason": "keyCompromise"}, times=4))
    ca.cli("principal", "enable", name)
    assert manager.http.get("/v1/audit", params={"limit": 1}).status_code == 200


def test_a_removed_principal_is_gone_and_its_name_makes_a_new_one(ca: CA, two_workers: str) -> None:
    name = unique("gone") + ".example.internal"
    client, credential = enrolled(ca, two_workers, name, "--group", "webservers")
    old_key, csr = make_csr()
    issued = client.submit("machine", csr)
    assert issued.status_code == 201, issued.text
    pending = client.submit("approval-required", make_csr()[1])
    assert pending.status_code == 202, pending.text
    unused_token = json.loads(ca.cli("principal", "token", name, "--json").stdout)["token"]
    assert [a.status_code for a in submissions(two_workers, credential, times=8)] == [201] * 8
    before = newest_audit_id(ca)

    removed = json.loads(ca.cli("principal", "remove", name, "--json").stdout)
    assert removed["pending_denied"] == 1 and removed["certificates_kept"] == 9 and removed["requests_kept"] == 10

    assert_all_unauthenticated(submissions(two_workers, credential))
    assert_all_unauthenticated(on_fresh_connections(two_workers, credential, "GET", "/v1/policy"))
    exchange = httpx.post(f"{two_workers}/v1/tokens/exchange", json={"token": unused_token}, timeout=30)
    assert_problem(exchange, 401, "token-invalid")
    assert name not in {p["name"] for p in cli_json(ca, "principal", "list")}
    admin = Client(two_workers, ca.admin_key)
    denied = admin.http.get(f"/v1/requests/{pending.json()['id']}").json()
    assert denied["status"] == "denied" and "removed" in denied["reason"]
    kept = admin.http.get(f"/v1/requests/{issued.json()['id']}").json()
    assert kept["status"] == "issued" and kept["requester"] == f"principal:{name}"
    assert httpx.get(f"{two_workers}/v1/certificates/{issued.json()['serial']}").json()["status"] == "good"
    rows = audit(ca, before)
    assert [r["action"] for r in rows if r["action"] in ("denied", "principal-removed")] == [
        "denied", "principal-removed"]
    assert any(r["action"] == "issued" and r["actor"] == f"principal:{name}" for r in audit(ca))  # history kept

    # The name again: a new principal, that neither reads nor renews what the removed one had
    again, _ = enrolled(ca, two_workers, name, "--group", "webservers")
    assert again.enroll()[1]["serial"]
    assert_problem(again.http.get(f"/v1/requests/{issued.json()['id']}"), 404, "not-found")
    _, new_csr = make_csr()
    renewal = again.submit("machine", new_csr,
                           renewal=renewal_evidence(old_key, issued.json()["certificate"], new_csr))
    assert renewal.status_code in (400, 403), renewal.text
    assert renewal.json()["reason"] == "renewal-invalid"
    missing = ca.cli("principal", "remove", "no-such.example.internal", check=False)
    assert missing.returncode != 0 and "no principal named" in missing.stderr


def test_a_new_token_supersedes_unused_ones_and_keeps_the_credential_until_exchanged(
        ca: CA, two_workers: str) -> None:
    name = unique("tok") + ".example.internal"
    first_token = ca.add_principal(name)
    second = json.loads(ca.cli("principal", "token", name, "--json").stdout)
    assert second["superseded"] == 1
    exchange = httpx.post(f"{two_workers}/v1/tokens/exchange", json={"token": first_token}, timeout=30)
    assert_problem(exchange, 401, "token-invalid")
    assert "replaced" in exchange.json()["detail"]
    client = Client.enrolled(two_workers, second["token"])
    assert client.submit("machine", make_csr()[1]).status_code == 201

    third = json.loads(ca.cli("principal", "token", name, "--json").stdout)
    assert third["superseded"] == 0  # the second was used: nothing left to supersede
    assert client.submit("machine", make_csr()[1]).status_code == 201  # a token alone withdraws nothing
    replacement = Client.enrolled(two_workers, third["token"])
    old = str(client.http.headers["Authorization"]).removeprefix("Bearer ")
    assert_all_unauthenticated(submissions(two_workers, old, times=8))  # the exchange replaced it
    assert replacement.submit("machine", make_csr()[1]).status_code == 201
    rows = [r for r in audit(ca) if name in (r["detail"] or "")]
    actions = [r["action"] for r in rows]
    assert actions == ["principal-added", "token-superseded", "token-issued", "token-issued"], actions
    refused = [r for r in audit(ca) if r["action"] == "token-refused" and "replaced" in (r["detail"] or "")]
    assert refused and refused[-1]["reason"] == "token-invalid"


@pytest.mark.parametrize("command_", ["disable", "enable", "token"])
def test_principal_commands_refuse_an_unknown_name(ca: CA, command_: str) -> None:
    result = ca.cli("principal", command_, "nobody.example.internal", check=False)
    assert result.returncode != 0 and "no principal named" in result.stderr and "Traceback" not in result.stderr


# -- migration 0004 -------------------------------------------------------------------------------

def test_migration_0004_upgrades_a_0003_database_with_rows_and_downgrades(backend: str, tmp_path: Path) -> None:
    with database(backend, tmp_path) as url:
        engine = make_engine(url)
        try:
            config = alembic_config(engine.url.render_as_string(hide_password=False), MIGRATIONS)
            with engine.begin() as conn:
                config.attributes["connection"] = conn
                command.upgrade(config, "0003")
                conn.exec_driver_sql(
                    "INSERT INTO api_keys (key_hash, name, role, created_at) "
                    "VALUES ('ab', 'admin', 'admin', '2026-01-01 00:00:00.000000')")
            with engine.begin() as conn:
                config.attributes["connection"] = conn
                command.upgrade(config, "0004")
            with read(engine) as conn:
                assert MigrationContext.configure(conn).get_current_revision() == "0004"
                key = conn.execute(select(t.api_keys)).one()
            assert key.name == "admin" and key.expires_at is None and key.revoked_at is None
            with engine.begin() as conn:
                config.attributes["connection"] = conn
                command.downgrade(config, "0003")
            with engine.connect() as conn:
                columns = {c["name"] for c in inspect(conn).get_columns("api_keys")}
                token_columns = {c["name"] for c in inspect(conn).get_columns("enrollment_tokens")}
                assert conn.exec_driver_sql("SELECT name FROM api_keys").scalars().all() == ["admin"]
            assert columns == {"key_hash", "name", "role", "created_at"}
            assert "superseded_at" not in token_columns
            migrate(engine)
            with write(engine) as conn:
                assert conn.execute(select(t.api_keys.c.revoked_at)).scalar_one() is None
        finally:
            engine.dispose()
