"""Decisions at every signature, against a real ``certpulse ca serve`` and the real CLI: a key
revoked for keyCompromise is never certified again, a key belongs to the principal that first
requested it, and an approval decides again on the template and the requester as they are now.
"""

from __future__ import annotations

import subprocess
import uuid
from pathlib import Path
from typing import Any

from support import (
    CA,
    Client,
    assert_problem,
    audit_since,
    cli_json,
    load_cert,
    make_csr,
    new_key,
    newest_audit_id,
    renewal_evidence,
)

APPROVED_TEMPLATE = """
name = "{name}"
validity = "30d"
renewal_period = "10d"
[subject]
source = "request"
[names]
dns = [".example.internal"]
[issuance]
manager_approval = true
[[permissions]]
group = "{group}"
rights = ["read", "enroll"]
"""


def new_principal(ca: CA, server: str, *groups: str) -> tuple[str, Client]:
    name = f"dec-{uuid.uuid4().hex[:8]}.example.internal"
    extra = [arg for group in groups for arg in ("--group", group)]
    return name, Client.enrolled(server, ca.add_principal(name, *extra))


def revoke(admin: Client, serial: str, reason: str) -> None:
    response = admin.http.post(f"/v1/certificates/{serial}/revoke", json={"reason": reason})
    assert response.status_code == 200, response.text


def refusals(admin: Client, after: int, reason: str) -> list[dict[str, Any]]:
    return [row for row in audit_since(admin, after) if row["reason"] == reason]


def assert_cli_refusal(result: subprocess.CompletedProcess[str], reason: str) -> str:
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"certpulse: error: {reason}"), result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    return lines[0]


# -- blocked keys ------------------------------------------------------------------------------


def test_a_key_revoked_for_key_compromise_is_never_certified_again(
        ca: CA, server: str, admin: Client, machine: Client) -> None:
    key = new_key()
    _, first = machine.enroll("machine", key=key)
    spare_key, spare = machine.enroll("machine")  # a second certificate, with another key, to renew
    revoke(admin, first["serial"], "keyCompromise")
    mark = newest_audit_id(admin)

    # the same principal, the same key: a new request, or through another template
    assert_problem(machine.submit("machine", make_csr(key)[1]), 400, "key-blocked")
    assert_problem(machine.submit("webserver", make_csr(key, cn="a.example.internal")[1]), 400, "key-blocked")
    # another principal with the same key (it holds the key: compromised means anyone may)
    _, other = new_principal(ca, server, "webservers")
    body = assert_problem(other.submit("machine", make_csr(key)[1]), 400, "key-blocked")
    assert first["serial"] in body["detail"]
    # as a renewal of a good certificate of the same principal
    _, csr = make_csr(key)
    renewal = machine.submit("machine", csr, renewal=renewal_evidence(spare_key, spare["certificate"], csr))
    assert_problem(renewal, 400, "key-blocked")
    # pending on an approval template: refused at submission, never queued
    assert_problem(machine.submit("approval-required", make_csr(key)[1]), 400, "key-blocked")

    rows = refusals(admin, mark, "key-blocked")
    assert len(rows) == 5 and {r["action"] for r in rows} == {"refused"}, rows
    # other keys are fine, for both principals
    machine.enroll("machine")
    other.enroll("machine")


def test_other_revocation_reasons_do_not_block_the_key(ca: CA, server: str, admin: Client, machine: Client) -> None:
    for reason in ("superseded", "unspecified", "cessationOfOperation"):
        key = new_key()
        _, body = machine.enroll("machine", key=key)
        revoke(admin, body["serial"], reason)
        again = machine.submit("machine", make_csr(key)[1])
        assert again.status_code == 201, (reason, again.text)


def test_key_compromise_through_the_cli_blocks_the_key(ca: CA, server: str, machine: Client) -> None:
    key = new_key()
    _, body = machine.enroll("machine", key=key)
    ca.cli("revoke", body["serial"], "--reason", "keyCompromise")
    assert_problem(machine.submit("machine", make_csr(key)[1]), 400, "key-blocked")


def test_a_pending_request_for_a_key_compromised_since_is_refused_at_approval(
        ca: CA, server: str, admin: Client, machine: Client) -> None:
    key = new_key()
    pending = machine.submit("approval-required", make_csr(key)[1])
    assert pending.status_code == 202, pending.text
    request_id = pending.json()["id"]
    # the same key certified under another template, then revoked for key compromise
    _, issued = machine.enroll("machine", key=key)
    revoke(admin, issued["serial"], "keyCompromise")
    assert_problem(admin.http.post(f"/v1/requests/{request_id}/approve"), 400, "key-blocked")
    assert machine.http.get(f"/v1/requests/{request_id}").json()["status"] == "failed"


# -- a key belongs to one principal ----------------------------------------------------------------


def test_a_captured_csr_gets_another_principal_nothing(ca: CA, server: str, admin: Client, machine: Client) -> None:
    key = new_key()
    _, captured = make_csr(key, cn="shared.example.internal", dns=["shared.example.internal"])
    first = machine.submit("webserver", captured)
    assert first.status_code == 201, first.text
    mark = newest_audit_id(admin)
    before = len(cli_json(ca, "request", "list"))

    _, thief = new_principal(ca, server, "webservers")
    # the very CSR, replayed; the same key in a CSR of its own; through another template
    assert_problem(thief.submit("webserver", captured), 400, "key-of-another-principal")
    assert_problem(thief.submit("machine", make_csr(key)[1]), 400, "key-of-another-principal")
    assert_problem(thief.submit("approval-required", make_csr(key)[1]), 400, "key-of-another-principal")
    assert len(refusals(admin, mark, "key-of-another-principal")) == 3
    assert len(cli_json(ca, "request", "list")) == before  # nothing recorded for the thief

    # the key's own principal may use it again; the thief its own keys
    again = machine.submit("machine", make_csr(key)[1])
    assert again.status_code == 201, again.text
    thief.enroll("machine")


def test_a_key_in_a_pending_request_belongs_to_its_requester(
        ca: CA, server: str, admin: Client, machine: Client) -> None:
    key = new_key()
    _, csr = make_csr(key)
    assert machine.submit("approval-required", csr).status_code == 202
    _, other = new_principal(ca, server)
    assert_problem(other.submit("approval-required", csr), 400, "key-of-another-principal")
    assert_problem(other.submit("machine", csr), 400, "key-of-another-principal")
    # a renewal does not lend the key either: the other principal renews its own certificate with it
    other_key, own = other.enroll("machine")
    renewal = other.submit("machine", csr, renewal=renewal_evidence(other_key, own["certificate"], csr))
    assert_problem(renewal, 400, "key-of-another-principal")


def test_a_certificate_issued_for_a_key_names_its_first_principal(
        ca: CA, server: str, machine: Client) -> None:
    key = new_key()
    name, owner = new_principal(ca, server)
    _, body = owner.enroll("machine", key=key)
    cert = load_cert(body["certificate"])
    assert cert.subject.rfc4514_string() == f"CN={name}"
    assert_problem(machine.submit("machine", make_csr(key)[1]), 400, "key-of-another-principal")


# -- approval decides again --------------------------------------------------------------------------


def approval_template(ca: CA, directory: Path, group: str) -> str:
    """A template of this test's own: names from the request under .example.internal, approval
    required, enrollment for ``group``."""
    name = f"appr-{uuid.uuid4().hex[:8]}"
    path = directory / f"{name}.toml"
    path.write_text(APPROVED_TEMPLATE.format(name=name, group=group))
    ca.cli("template", "add", str(path))
    return name


def pending_request(client: Client, template: str) -> int:
    response = client.submit(template, make_csr(cn="app.example.internal", dns=["app.example.internal"])[1])
    assert response.status_code == 202, response.text
    return int(response.json()["id"])


def assert_failed_and_audited(ca: CA, admin: Client, request_id: int, reason: str, mark: int) -> None:
    shown = cli_json(ca, "request", "show", str(request_id))
    assert shown["status"] == "failed" and shown["reason"].startswith(f"{reason}: "), shown
    assert shown["decided_by"] and "certificate" not in shown
    rows = [r for r in audit_since(admin, mark) if r["request_id"] == request_id]
    assert [(r["action"], r["reason"]) for r in rows] == [("approve-refused", reason)], rows
    assert not [r for r in rows if r["action"] in ("approved", "issued")]
    # decided: not pending any more, so it cannot be approved later by mistake
    assert_problem(admin.http.post(f"/v1/requests/{request_id}/approve"), 409, "not-pending")


def test_approval_refused_when_the_requester_left_the_group(
        ca: CA, server: str, admin: Client, tmp_path: Path) -> None:
    group = f"g{uuid.uuid4().hex[:6]}"
    template = approval_template(ca, tmp_path, group)
    name, requester = new_principal(ca, server, group)
    request_id = pending_request(requester, template)
    ca.cli("principal", "groups", name, "--remove", group)
    mark = newest_audit_id(admin)
    body = assert_problem(admin.http.post(f"/v1/requests/{request_id}/approve"), 403, "template-not-permitted")
    assert name in body["detail"]
    assert_failed_and_audited(ca, admin, request_id, "template-not-permitted", mark)
    # the requester sees why
    seen = requester.http.get(f"/v1/requests/{request_id}").json()
    assert seen["status"] == "failed" and seen["reason"].startswith("template-not-permitted")


def test_approval_refused_when_the_template_no_longer_allows_the_name(
        ca: CA, server: str, admin: Client, tmp_path: Path) -> None:
    group = f"g{uuid.uuid4().hex[:6]}"
    template = approval_template(ca, tmp_path, group)
    _, requester = new_principal(ca, server, group)
    request_id = pending_request(requester, template)
    keep_id = pending_request(requester, template)
    narrowed = tmp_path / "narrowed.toml"
    narrowed.write_text(APPROVED_TEMPLATE.format(name=template, group=group).replace(
        '[".example.internal"]', '["other.example.internal"]'))
    ca.cli("template", "edit", template, str(narrowed))
    mark = newest_audit_id(admin)
    line = assert_cli_refusal(ca.cli("request", "approve", str(request_id), check=False), "name-not-allowed")
    assert "app.example.internal" in line
    assert_failed_and_audited(ca, admin, request_id, "name-not-allowed", mark)
    # the template allowing the name again: the other pending request is approved and issued
    wide = tmp_path / "wide.toml"
    wide.write_text(APPROVED_TEMPLATE.format(name=template, group=group))
    ca.cli("template", "edit", template, str(wide))
    approved = admin.http.post(f"/v1/requests/{keep_id}/approve")
    assert approved.status_code == 200, approved.text
    assert approved.json()["status"] == "issued"


def test_approval_refused_while_the_requester_is_disabled(
        ca: CA, server: str, admin: Client, tmp_path: Path) -> None:
    """A disabled requester's request stays pending (disabling may be for a while): the approval
    is refused with the reason and audited; once enabled again it can be approved."""
    group = f"g{uuid.uuid4().hex[:6]}"
    template = approval_template(ca, tmp_path, group)
    name, requester = new_principal(ca, server, group)
    request_id = pending_request(requester, template)
    ca.cli("principal", "disable", name)
    mark = newest_audit_id(admin)
    line = assert_cli_refusal(ca.cli("request", "approve", str(request_id), check=False), "requester-disabled")
    assert "disabled" in line
    assert_problem(admin.http.post(f"/v1/requests/{request_id}/approve"), 409, "requester-disabled")
    assert cli_json(ca, "request", "show", str(request_id))["status"] == "pending"
    rows = [r for r in audit_since(admin, mark) if r["request_id"] == request_id]
    assert [(r["action"], r["reason"]) for r in rows] == [("approve-refused", "requester-disabled")] * 2, rows
    ca.cli("principal", "enable", name)
    assert admin.http.post(f"/v1/requests/{request_id}/approve").status_code == 200
