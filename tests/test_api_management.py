"""Managing a real ``certpulse ca serve`` over loopback and through the real CLI: approval,
revocation, template versions, several issuers, the OpenAPI document, audit and listings."""

from __future__ import annotations

import datetime as dt
import json
import subprocess
import threading
import uuid
from pathlib import Path
from typing import Any

import httpx
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import rsa
from fastapi.routing import APIRoute

from certpulse.ca.config import CADir
from certpulse.ca.revocation import SerialQuery
from certpulse.ca.setup import open_service
from certpulse.frontends.acme import urls as acme_urls
from certpulse.frontends.http import create_app
from certpulse.pki import template_info
from support import (
    CA,
    TEMPLATES,
    Client,
    assert_chains_to_root,
    assert_problem,
    cli_json,
    load_cert,
    make_csr,
    renewal_evidence,
    run_cli,
    serve,
)

DAY = dt.timedelta(days=1)
SECOND = dt.timedelta(seconds=1)


def new_principal(ca: CA, server: str, prefix: str, *extra: str) -> tuple[str, Client]:
    """A principal of this test's own (so its name is known), enrolled over HTTP."""
    name = f"{prefix}-{uuid.uuid4().hex[:8]}.example.internal"
    return name, Client.enrolled(server, ca.add_principal(name, *extra))


def submit_pending(client: Client, template: str = "approval-required") -> int:
    response = client.submit(template, make_csr()[1])
    assert response.status_code == 202, response.text
    body = response.json()
    assert body["status"] == "pending" and "certificate" not in body, body
    return int(body["id"])


def get_request(client: Client, request_id: int) -> dict[str, Any]:
    response = client.http.get(f"/v1/requests/{request_id}")
    assert response.status_code == 200, response.text
    return dict(response.json())


def assert_cli_refusal(result: subprocess.CompletedProcess[str], reason: str) -> None:
    """The CLI's refusal contract: exit code 2 and one stderr line naming the reason."""
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"certpulse: error: {reason}"), result.stderr


def certificate_status(server: str, serial: str) -> dict[str, Any]:
    response = httpx.get(f"{server}/v1/certificates/{serial}", timeout=30)  # needs no credential
    assert response.status_code == 200, response.text
    return dict(response.json())


# -- approval -------------------------------------------------------------------------------

def test_pending_request_is_issued_once_approved(ca: CA, machine: Client) -> None:
    request_id = submit_pending(machine)
    pending = get_request(machine, request_id)
    assert pending["status"] == "pending" and pending["template"] == "approval-required"
    assert pending["kind"] == "new" and pending["requester"].startswith("principal:host-")
    assert "certificate" not in pending and "decided_at" not in pending

    listed = cli_json(ca, "request", "list", "--status", "pending")
    assert request_id in [r["id"] for r in listed]
    assert {r["status"] for r in listed} == {"pending"}

    approved = ca.cli("request", "approve", str(request_id))
    assert "approved" in approved.stdout

    done = get_request(machine, request_id)
    assert done["status"] == "issued" and done["decided_by"].startswith("operator:")
    assert done["decided_at"] and done["serial"]
    cert = load_cert(done["certificate"])
    assert format(cert.serial_number, "x") == done["serial"]
    assert_chains_to_root(ca, done["certificate"], done["chain"])
    name = done["requester"].removeprefix("principal:")
    assert cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value == name
    assert cert.not_valid_after_utc - cert.not_valid_before_utc == 180 * DAY - SECOND
    info = template_info.decode(cert)
    assert info is not None and (info.major, info.minor) == (1, 0)

    still = cli_json(ca, "request", "list", "--status", "pending")
    assert request_id not in [r["id"] for r in still]


def test_denied_request_reports_the_reason_and_cannot_be_approved(
    ca: CA, machine: Client, admin: Client
) -> None:
    request_id = submit_pending(machine)
    ca.cli("request", "deny", str(request_id), "--reason", "not a host we know")
    denied = get_request(machine, request_id)
    assert denied["status"] == "denied" and denied["reason"] == "not a host we know"
    assert denied["decided_by"].startswith("operator:") and "certificate" not in denied

    assert_cli_refusal(ca.cli("request", "approve", str(request_id), check=False), "not-pending")
    assert_problem(admin.http.post(f"/v1/requests/{request_id}/approve"), 409, "not-pending")
    assert_problem(admin.http.post(f"/v1/requests/{request_id}/deny", json={"reason": "again"}),
                   409, "not-pending")
    assert get_request(machine, request_id)["status"] == "denied"

    # An issued request is not pending either.
    _, issued = machine.enroll("machine")
    assert_problem(admin.http.post(f"/v1/requests/{issued['id']}/approve"), 409, "not-pending")
    assert_problem(admin.http.post("/v1/requests/987654321/approve"), 404, "not-found")
    assert_problem(admin.http.post(f"/v1/requests/{request_id}/deny", json={"reason": ""}),
                   400, "malformed-request")


def test_managers_cannot_approve_their_own_requests(
    ca: CA, server: str, admin: Client, machine: Client
) -> None:
    first_name, first = new_principal(ca, server, "manager-a", "--role", "ca-manager")
    second_name, second = new_principal(ca, server, "manager-b", "--role", "ca-manager")
    request_id = submit_pending(first)

    assert_problem(first.http.post(f"/v1/requests/{request_id}/approve"), 403, "self-approval")
    assert_problem(machine.http.post(f"/v1/requests/{request_id}/approve"), 403, "forbidden")
    assert_problem(machine.http.get(f"/v1/requests/{request_id}"), 404, "not-found")
    assert get_request(first, request_id)["status"] == "pending"
    pending = second.http.get("/v1/requests", params={"status": "pending"})
    assert pending.status_code == 200 and request_id in [r["id"] for r in pending.json()]

    approved = second.http.post(f"/v1/requests/{request_id}/approve")
    assert approved.status_code == 200, approved.text
    body = approved.json()
    assert body["status"] == "issued" and "BEGIN CERTIFICATE" in body["certificate"]
    assert_chains_to_root(ca, body["certificate"], body["chain"])
    done = get_request(first, request_id)
    assert done["status"] == "issued" and done["decided_by"] == f"principal:{second_name}"
    subject = load_cert(done["certificate"]).subject
    assert subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value == first_name

    other_id = submit_pending(first)
    by_admin = admin.http.post(f"/v1/requests/{other_id}/approve")
    assert by_admin.status_code == 200, by_admin.text
    assert get_request(first, other_id)["decided_by"] == "admin:admin"


# -- revocation -----------------------------------------------------------------------------

def test_revoke_through_the_cli(ca: CA, server: str, machine: Client, admin: Client) -> None:
    _, body = machine.enroll("machine")
    serial = body["serial"]
    good = certificate_status(server, serial)
    assert good["status"] == "good" and good["issuer"] == "issuing-1"
    assert good["template"] == "machine" and good["thumbprint"] == body["thumbprint"]
    assert good["revoked_at"] is None

    out = ca.cli("revoke", serial, "--reason", "keyCompromise")
    assert serial in out.stdout
    revoked = certificate_status(server, serial)
    assert revoked["status"] == "revoked" and revoked["revocation_reason"] == "keyCompromise"
    assert revoked["revoked_at"]
    # Serials may be written with colons and in upper case.
    padded = serial.upper().zfill(len(serial) + len(serial) % 2)
    spaced = ":".join(padded[i:i + 2] for i in range(0, len(padded), 2))
    assert certificate_status(server, spaced)["status"] == "revoked"

    assert_cli_refusal(ca.cli("revoke", serial, "--reason", "keyCompromise", check=False),
                       "already-revoked")
    assert_problem(admin.http.post(f"/v1/certificates/{serial}/revoke", json={"reason": "superseded"}),
                   409, "already-revoked")
    assert certificate_status(server, serial)["revocation_reason"] == "keyCompromise"


def test_revoke_through_the_api(server: str, machine: Client, admin: Client) -> None:
    _, body = machine.enroll("machine")
    serial = body["serial"]
    assert_problem(machine.http.post(f"/v1/certificates/{serial}/revoke", json={"reason": "superseded"}),
                   403, "forbidden")
    assert_problem(admin.http.post(f"/v1/certificates/{serial}/revoke", json={"reason": "becauseISaidSo"}),
                   400, "invalid-argument")
    assert certificate_status(server, serial)["status"] == "good"

    response = admin.http.post(f"/v1/certificates/{serial}/revoke", json={"reason": "superseded"})
    assert response.status_code == 200, response.text
    assert response.json()["status"] == "revoked" and response.json()["reason"] == "superseded"
    status = certificate_status(server, serial)
    assert status["status"] == "revoked" and status["revocation_reason"] == "superseded"

    again = admin.http.post(f"/v1/certificates/{serial}/revoke", json={"reason": "keyCompromise"})
    assert_problem(again, 409, "already-revoked")
    assert certificate_status(server, serial)["revocation_reason"] == "superseded"

    assert_problem(admin.http.post("/v1/certificates/abcdef0123/revoke", json={}), 404, "not-found")
    assert_problem(httpx.get(f"{server}/v1/certificates/abcdef0123", timeout=30), 404, "not-found")
    assert_problem(httpx.get(f"{server}/v1/certificates/not-hex", timeout=30), 400, "invalid-argument")


def test_batch_status_of_the_callers_own_certificates_and_of_a_serial_list(
        ca: CA, server: str, admin: Client) -> None:
    _, owner = new_principal(ca, server, "batch")
    serials = [owner.enroll("machine")[1]["serial"] for _ in range(3)]
    assert admin.http.post(f"/v1/certificates/{serials[1]}/revoke",
                           json={"reason": "keyCompromise"}).status_code == 200

    # The caller's own certificates, in one call: revoked ones included, with reason and time.
    own = owner.http.get("/v1/certificates/status")
    assert own.status_code == 200, own.text
    answers = own.json()["certificates"]
    assert [a["serial"] for a in answers] == serials and "next" not in own.json()
    assert [a["status"] for a in answers] == ["good", "revoked", "good"]
    assert answers[1]["revocation_reason"] == "keyCompromise" and answers[1]["revoked_at"]
    assert answers[0]["revoked_at"] is None and answers[0]["revocation_reason"] is None
    assert all(a["issuer"] == "issuing-1" and a["not_after"] for a in answers)
    # The route is not read as GET /v1/certificates/{serial} with serial "status" (400 before).
    assert_problem(httpx.get(f"{server}/v1/certificates/status", timeout=30), 401, "unauthenticated")
    assert_problem(admin.http.get("/v1/certificates/status"), 403, "forbidden")  # an API key has no certificates
    assert_problem(owner.http.get("/v1/certificates/status", params={"after": "x1"}), 400, "invalid-argument")

    # A list of serials: public, any hex spelling, unknown is an answer and not an error.
    padded = serials[1].upper().zfill(len(serials[1]) + len(serials[1]) % 2)
    spaced = ":".join(padded[i:i + 2] for i in range(0, len(padded), 2))
    listed = httpx.post(f"{server}/v1/certificates/status", timeout=30, json={"certificates": [
        {"serial": spaced}, {"serial": serials[0], "issuer": "issuing-1"}, {"serial": "abcdef0123"},
        {"serial": serials[2], "issuer": "no-such-issuer"}]})
    assert listed.status_code == 200, listed.text
    assert [(a["serial"], a["status"]) for a in listed.json()["certificates"]] == [
        (serials[1], "revoked"), (serials[0], "good"), ("abcdef0123", "unknown"), (serials[2], "unknown")]
    unknown = listed.json()["certificates"][3]
    assert unknown["issuer"] == "no-such-issuer" and unknown["not_after"] is None

    # The limit: 500 of the longest serials with the longest issuer names fit the 64 KiB body limit.
    longest = [{"serial": f"{i:040x}", "issuer": "i" * 64} for i in range(1, 501)]
    body = json.dumps({"certificates": longest}, separators=(",", ":")).encode()
    assert len(body) <= 64 * 1024
    full = httpx.post(f"{server}/v1/certificates/status", content=body, timeout=30,
                      headers={"Content-Type": "application/json"})
    assert full.status_code == 200, full.text
    assert {a["status"] for a in full.json()["certificates"]} == {"unknown"} and len(full.json()["certificates"]) == 500
    over = assert_problem(httpx.post(f"{server}/v1/certificates/status", timeout=30, json={
        "certificates": [{"serial": f"{i:x}"} for i in range(1, 502)]}), 400, "malformed-request")
    assert "500" in over["detail"]
    bad = assert_problem(httpx.post(f"{server}/v1/certificates/status", timeout=30, json={
        "certificates": [{"serial": "ab"}, {"serial": "not-hex"}]}), 400, "invalid-argument")
    assert "certificates[1]" in bad["detail"]
    assert_problem(httpx.post(f"{server}/v1/certificates/status", timeout=30, json={"serials": []}),
                   400, "malformed-request")


def test_status_command_takes_several_serials(ca: CA, server: str, machine: Client, admin: Client) -> None:
    serials = [machine.enroll("machine")[1]["serial"] for _ in range(2)]
    assert admin.http.post(f"/v1/certificates/{serials[1]}/revoke", json={"reason": "keyCompromise"}).status_code == 200

    both = json.loads(ca.cli("status", *serials, "--json").stdout)
    assert [(s["serial"], s["status"], s["revocation_reason"]) for s in both] == [
        (serials[0], "good", None), (serials[1], "revoked", "keyCompromise")]
    assert both[1]["revoked_at"] and both[0]["not_after"]
    # One line each, with the revocation's reason and time; an unknown serial is listed, exit 1
    # (a refusal would be 2).
    text = ca.cli("status", *serials, "abcdef0123", "--issuer", "issuing-1", check=False)
    assert text.returncode == 1, text.stderr
    lines = [line for line in text.stdout.splitlines() if serials[1] in line or "abcdef0123" in line]
    assert len(lines) == 2 and "keyCompromise" in lines[0] and both[1]["revoked_at"][:10] in lines[0]
    assert "unknown" in lines[1]
    assert_cli_refusal(ca.cli("status", serials[0], "not-hex", check=False), "invalid-argument")


def test_own_statuses_page_by_cursor_and_leave_out_expired_certificates(ca: CA, server: str) -> None:
    _, owner = new_principal(ca, server, "pages")
    serials = [owner.enroll("machine")[1]["serial"] for _ in range(3)]
    credential = owner.http.headers["Authorization"].removeprefix("Bearer ")
    service = open_service(CADir(ca.dir), pool_size=1)
    try:
        now = dt.datetime.now(dt.UTC)
        caller = service.auth.authenticate(credential, now)
        first = service.revocation.own_statuses(caller, now, limit=2)
        assert [s.serial for s in first.certificates] == serials[:2] and first.next_cursor is not None
        second = service.revocation.own_statuses(caller, now, after=first.next_cursor, limit=2)
        assert [s.serial for s in second.certificates] == serials[2:] and second.next_cursor is None
        later = now + dt.timedelta(days=3650)  # all of them expired by then
        assert service.revocation.own_statuses(caller, later).certificates == ()
        assert [s.status for s in service.revocation.statuses(
            [SerialQuery(serials[0])], later).certificates] == ["expired"]
    finally:
        service.engine.dispose()


# -- template versions ----------------------------------------------------------------------

def test_template_edit_raises_minor_and_reenroll_all_raises_major(
    ca: CA, server: str, tmp_path: Path
) -> None:
    original = (TEMPLATES / "machine.toml").read_text()
    assert 'name = "machine"' in original
    text = original.replace('name = "machine"', 'name = "machine-versioned"')
    first = tmp_path / "versioned.toml"
    first.write_text(text)
    ca.cli("template", "add", str(first))
    _, client = new_principal(ca, server, "versions")

    def policy_entry() -> dict[str, Any]:
        templates = client.http.get("/v1/policy").json()["templates"]
        return dict(next(x for x in templates if x["name"] == "machine-versioned"))

    entry = policy_entry()
    oid = entry["oid"]
    assert (entry["major_version"], entry["minor_version"]) == (1, 0)

    def issued_info() -> tuple[str, int, int]:
        _, body = client.enroll("machine-versioned")
        info = template_info.decode(load_cert(body["certificate"]))
        assert info is not None
        return info.oid, info.major, info.minor

    assert issued_info() == (oid, 1, 0)

    edited = tmp_path / "edited.toml"
    edited.write_text(text.replace('display_name = "Machine"', 'display_name = "Machine (edited)"')
                      .replace('validity = "365d"', 'validity = "200d"'))
    ca.cli("template", "edit", "machine-versioned", str(edited))
    shown = cli_json(ca, "template", "show", "machine-versioned")
    assert (shown["major_version"], shown["minor_version"]) == (1, 1)
    assert shown["oid"] == oid and shown["display_name"] == "Machine (edited)"
    entry = policy_entry()
    assert (entry["major_version"], entry["minor_version"]) == (1, 1)
    assert entry["validity_seconds"] == 200 * 86400
    assert issued_info() == (oid, 1, 1)

    ca.cli("template", "reenroll-all", "machine-versioned")
    shown = cli_json(ca, "template", "show", "machine-versioned")
    assert (shown["major_version"], shown["minor_version"]) == (2, 0)
    assert shown["display_name"] == "Machine (edited)" and shown["validity"] == "200d"
    entry = policy_entry()
    assert (entry["major_version"], entry["minor_version"]) == (2, 0)
    assert issued_info() == (oid, 2, 0)
    # The example template it was copied from is untouched.
    templates = client.http.get("/v1/policy").json()["templates"]
    machine = next(x for x in templates if x["name"] == "machine")
    assert (machine["major_version"], machine["minor_version"]) == (1, 0)


# -- several issuers ------------------------------------------------------------------------

def test_issuers_by_cost_renewal_only_and_validity_clamp(fresh_ca: CA) -> None:
    ca = fresh_ca
    certs = ca.dir / "certs"
    ca.cli("ca", "add-issuer", "second", "--cost", "5", "--template", "machine")
    first = load_cert((certs / "issuer-issuing-1.pem").read_text())
    second = load_cert((certs / "issuer-second.pem").read_text())
    with serve(ca) as base:
        client = Client.enrolled(base, ca.add_principal("multi.example.internal"))

        def issuer_of(body: dict[str, Any]) -> x509.Certificate:
            return assert_chains_to_root(ca, body["certificate"], body["chain"])

        issuers = {x["name"]: x for x in client.http.get("/v1/policy").json()["issuers"]}
        assert issuers["second"]["cost"] == 5 and issuers["second"]["templates"] == ["machine"]
        assert issuers["second"]["renewal_only"] is False

        key_a, a = client.enroll("machine")
        assert issuer_of(a) == second
        assert certificate_status(base, a["serial"])["issuer"] == "second"
        rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        _, enc = client.enroll("encryption", key=rsa_key)  # not served by 'second'
        assert issuer_of(enc) == first

        ca.cli("ca", "set-issuer", "second", "--renewal-only")
        issuers = {x["name"]: x for x in client.http.get("/v1/policy").json()["issuers"]}
        assert issuers["second"]["renewal_only"] is True

        key_b, b = client.enroll("machine")
        assert issuer_of(b) == first
        _, csr = make_csr()
        assert_problem(client.submit("machine", csr, issuer="second"), 400, "issuer-renewal-only")
        assert_problem(client.submit("machine", csr, issuer="nope"), 400, "unknown-issuer")

        renewed = client.submit("machine", csr, issuer="second",
                                renewal=renewal_evidence(key_a, a["certificate"], csr))
        assert renewed.status_code == 201, renewed.text
        assert issuer_of(renewed.json()) == second
        assert get_request(client, renewed.json()["id"])["kind"] == "renewal"
        # A renewal naming no issuer goes to the cheapest issuer that renews: 'second'.
        _, csr = make_csr()
        cheapest = client.submit("machine", csr, renewal=renewal_evidence(key_b, b["certificate"], csr))
        assert cheapest.status_code == 201, cheapest.text
        assert issuer_of(cheapest.json()) == second

        ca.cli("ca", "add-issuer", "short", "--cost", "1", "--template", "machine", "--validity", "2d")
        short = load_cert((certs / "issuer-short.pem").read_text())
        assert short.not_valid_after_utc - short.not_valid_before_utc == 2 * DAY - SECOND
        _, c = client.enroll("machine")
        assert issuer_of(c) == short
        cert = load_cert(c["certificate"])
        assert cert.not_valid_after_utc == short.not_valid_after_utc
        assert cert.not_valid_after_utc - cert.not_valid_before_utc < 2 * DAY
        client.http.close()

    listed = {x["name"]: x for x in cli_json(ca, "ca", "issuers")}
    assert {n: x["role"] for n, x in listed.items()} == {
        "root": "root", "kra": "kra", "issuing-1": "issuer", "second": "issuer", "short": "issuer"}
    assert listed["second"]["renewal_only"] is True and listed["second"]["cost"] == 5
    assert listed["short"]["cost"] == 1 and listed["short"]["templates"] == ["machine"]


# -- OpenAPI --------------------------------------------------------------------------------

def test_openapi_documents_every_route(ca: CA, server: str) -> None:
    response = httpx.get(f"{server}/openapi.json", timeout=30)
    assert response.status_code == 200, response.text
    spec = response.json()
    documented = {(path, method.upper()) for path, ops in spec["paths"].items() for method in ops}

    service = open_service(CADir(ca.dir), pool_size=1)
    try:
        app = create_app(service)
        while not hasattr(app, "routes"):  # the FastAPI app inside the body-size guard and the direct submit route
            app = app.app
        routes = {(r.path, m) for r in app.routes if isinstance(r, APIRoute) for m in r.methods or ()}
    finally:
        service.engine.dispose()
    # The ACME routes are plain ASGI (frontends/acme), documented by hand: each documented path and
    # method is one the ACME router answers, and every ACME operation is documented.
    acme_documented = {(path, method) for path, method in documented if path.startswith("/acme/")}
    assert routes and routes == documented - acme_documented
    served = set()
    for path, method in acme_documented:
        found = acme_urls.match(path.replace("{id}", "7").replace("{certID}", "aGVsbG8.AQ"))
        assert found is not None and method in found.methods, (path, method)
        served.add(found.operation)
    assert served == set(acme_urls.ROUTES)

    required = {
        ("/healthz", "GET"), ("/livez", "GET"), ("/readyz", "GET"),
        ("/v1/tokens/exchange", "POST"), ("/v1/policy", "GET"),
        ("/v1/requests", "GET"), ("/v1/requests", "POST"), ("/v1/requests/{request_id}", "GET"),
        ("/v1/requests/{request_id}/approve", "POST"), ("/v1/requests/{request_id}/deny", "POST"),
        ("/v1/certificates/{serial}/revoke", "POST"), ("/v1/certificates/{serial}", "GET"),
        ("/v1/certificates/status", "GET"), ("/v1/certificates/status", "POST"),
        ("/v1/certificates/{serial}/revoke", "POST"), ("/v1/certificates/{serial}/unrevoke", "POST"),
        ("/v1/certificates/{serial}", "GET"),
        ("/v1/audit", "GET"),
    }
    assert required <= documented
    for path, ops in spec["paths"].items():
        for method, op in ops.items():
            assert op.get("summary"), (path, method)
    submit = spec["paths"]["/v1/requests"]["post"]["responses"]
    assert {"201", "202", "400", "401", "403"} <= set(submit)


# -- audit ----------------------------------------------------------------------------------

def test_every_decision_leaves_an_audit_row(
    ca: CA, server: str, admin: Client, machine: Client
) -> None:
    _, issued = machine.enroll("machine")
    name = get_request(machine, issued["id"])["requester"].removeprefix("principal:")
    actor = f"principal:{name}"
    approved_id = submit_pending(machine)
    assert admin.http.post(f"/v1/requests/{approved_id}/approve").status_code == 200
    denied_id = submit_pending(machine)
    deny = admin.http.post(f"/v1/requests/{denied_id}/deny", json={"reason": "duplicate request"})
    assert deny.status_code == 200 and deny.json()["status"] == "denied", deny.text
    revoke = admin.http.post(f"/v1/certificates/{issued['serial']}/revoke",
                             json={"reason": "cessationOfOperation"})
    assert revoke.status_code == 200, revoke.text
    assert_problem(machine.submit("no-such-template", make_csr()[1]), 400, "unknown-template")

    response = admin.http.get("/v1/audit", params={"limit": 1000})
    assert response.status_code == 200, response.text
    rows: list[dict[str, Any]] = response.json()
    ids = [r["id"] for r in rows]
    assert ids == sorted(ids, reverse=True)  # newest first

    def one(action: str, **match: Any) -> dict[str, Any]:
        found = [r for r in rows if r["action"] == action
                 and all(r[k] == v for k, v in match.items())]
        assert len(found) == 1, (action, match, found)
        row = found[0]
        at = dt.datetime.fromisoformat(row["at"])
        assert abs(dt.datetime.now(dt.UTC) - at.replace(tzinfo=at.tzinfo or dt.UTC)) < 10 * 60 * SECOND
        return row

    row = one("issued", request_id=issued["id"])
    assert (row["actor"], row["template"], row["serial"], row["names"]) == (
        actor, "machine", issued["serial"], [name])
    row = one("pending", request_id=approved_id)
    assert (row["actor"], row["template"], row["names"]) == (actor, "approval-required", [name])
    row = one("approved", request_id=approved_id)
    assert (row["actor"], row["template"], row["names"]) == ("admin:admin", "approval-required", [name])
    row = one("issued", request_id=approved_id)
    assert (row["actor"], row["template"], row["names"]) == ("admin:admin", "approval-required", [name])
    assert row["serial"] == get_request(machine, approved_id)["serial"]
    row = one("pending", request_id=denied_id)
    assert row["actor"] == actor
    row = one("denied", request_id=denied_id)
    assert (row["actor"], row["template"], row["names"]) == ("admin:admin", "approval-required", [name])
    assert row["detail"] == "duplicate request"
    row = one("revoked", serial=issued["serial"])
    assert (row["actor"], row["template"], row["names"], row["reason"]) == (
        "admin:admin", "machine", [name], "cessationOfOperation")
    row = one("refused", actor=actor, template="no-such-template")
    assert row["reason"] == "unknown-template"

    only = admin.http.get("/v1/audit", params={"request_id": approved_id}).json()
    assert [r["action"] for r in only] == ["issued", "approved", "pending"]

    from_cli = {r["id"]: r for r in cli_json(ca, "audit", "--limit", "1000")}
    for row in rows[:20]:
        assert from_cli[row["id"]] == row

    assert_problem(machine.http.get("/v1/audit"), 403, "forbidden")
    assert_problem(httpx.get(f"{server}/v1/audit", timeout=30), 401, "unauthenticated")


# -- CLI listings ---------------------------------------------------------------------------

def test_cli_listings_are_json_and_the_folder_comes_from_the_environment(
    ca: CA, machine: Client
) -> None:
    _, body = machine.enroll("machine")
    name = get_request(machine, body["id"])["requester"].removeprefix("principal:")
    env = {"CERTPULSE_CA_DIR": str(ca.dir)}

    templates = json.loads(run_cli("template", "list", "--json", env=env).stdout)
    assert {"machine", "webserver", "approval-required", "encryption"} <= {t["name"] for t in templates}

    principals = {p["name"]: p for p in json.loads(run_cli("principal", "list", "--json", env=env).stdout)}
    assert principals[name]["kind"] == "machine" and principals[name]["enrolled"] is True
    assert principals[name]["groups"] == ["machines", "webservers"]

    issuers = {x["name"]: x for x in json.loads(run_cli("ca", "issuers", "--json", env=env).stdout)}
    assert issuers["issuing-1"]["role"] == "issuer" and issuers["root"]["role"] == "root"
    assert issuers["kra"]["role"] == "kra"

    requests = json.loads(run_cli("request", "list", "--json", env=env).stdout)
    mine = [r for r in requests if r["id"] == body["id"]]
    assert len(mine) == 1 and mine[0]["status"] == "issued" and mine[0]["names"] == [name]



# -- concurrent decisions -------------------------------------------------------------------

Call = tuple[str, str, Any]  # method, path, JSON body


def race(server: str, credential: str, calls: list[Call]) -> list[httpx.Response]:
    """Make every call at the same moment, each on a connection of its own; in call order."""
    barrier = threading.Barrier(len(calls))
    results: list[httpx.Response | None] = [None] * len(calls)

    def make(index: int) -> None:
        method, path, body = calls[index]
        with Client(server, credential).http as http:
            barrier.wait()
            results[index] = http.request(method, path, json=body)

    threads = [threading.Thread(target=make, args=(i,)) for i in range(len(calls))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert all(r is not None for r in results)
    return [r for r in results if r is not None]


def test_a_request_or_revocation_is_decided_exactly_once(
    ca: CA, server: str, machine: Client, admin: Client
) -> None:
    request_id = submit_pending(machine)
    results = race(server, ca.admin_key, [("POST", f"/v1/requests/{request_id}/approve", None)] * 6)
    assert sorted(r.status_code for r in results) == [200] + [409] * 5, [r.text for r in results]
    for refused in (r for r in results if r.status_code == 409):
        assert_problem(refused, 409, "not-pending")
    actions = [r["action"] for r in admin.http.get("/v1/audit", params={"request_id": request_id}).json()]
    assert actions.count("issued") == 1 and actions.count("approved") == 1, actions

    # Approvals and denials at once: one wins, and the request ends as the winner says.
    contested = submit_pending(machine)
    calls: list[Call] = [("POST", f"/v1/requests/{contested}/approve", None),
                         ("POST", f"/v1/requests/{contested}/deny", {"reason": "raced"})] * 3
    results = race(server, ca.admin_key, calls)
    winners = [r for r in results if r.status_code == 200]
    assert len(winners) == 1 and sorted(r.status_code for r in results)[1:] == [409] * 5
    assert get_request(machine, contested)["status"] == winners[0].json()["status"]

    serial = get_request(machine, request_id)["serial"]
    calls = [("POST", f"/v1/certificates/{serial}/revoke", {"reason": "superseded"})] * 6
    results = race(server, ca.admin_key, calls)
    assert sorted(r.status_code for r in results) == [200] + [409] * 5, [r.text for r in results]
    for refused in (r for r in results if r.status_code == 409):
        assert_problem(refused, 409, "already-revoked")


def test_an_enrollment_token_is_exchanged_exactly_once(ca: CA, server: str) -> None:
    token = ca.add_principal("race-token.example.internal")
    results = race(server, "", [("POST", "/v1/tokens/exchange", {"token": token})] * 6)
    assert sorted(r.status_code for r in results) == [200] + [409] * 5, [r.text for r in results]
    for refused in (r for r in results if r.status_code == 409):
        assert_problem(refused, 409, "token-used")
    credential = next(r for r in results if r.status_code == 200).json()["credential"]
    assert Client(server, credential).http.get("/v1/policy").status_code == 200
