"""The CA core's roles answer in types: each operation's result, read in process (no server).

One CA on SQLite for the module, made with the Python API; each test uses principals of its own.
The HTTP and CLI tests cover the same operations end to end; these check the typed values a
front end receives, and the audit rows each role writes."""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Iterator

import pytest
from cryptography import x509

from certpulse.ca.admin import CAAdmin
from certpulse.ca.config import CADir
from certpulse.ca.model import Caller, EnrollmentRequest
from certpulse.ca.results import (
    Approved,
    AuditLog,
    CertificateStatus,
    Credential,
    Denied,
    Issued,
    Pending,
    PolicyDocument,
    Replayed,
    RequestList,
    RequestSummary,
    Revoked,
)
from certpulse.ca.service import CAService
from certpulse.ca.setup import init_ca, open_service
from certpulse.errors import Reason, Refusal
from certpulse.pki.certs import thumbprint
from support import TEMPLATES, make_csr

OPERATOR = Caller(kind="operator", name="roles-test")


def now() -> dt.datetime:
    return dt.datetime.now(dt.UTC).replace(microsecond=0)


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CAService]:
    ca_dir = CADir(tmp_path_factory.mktemp("roles") / "ca")
    init_ca(ca_dir, name="Roles", key_type="ec-p256", now=now())
    service = open_service(ca_dir, pool_size=2)
    admin = CAAdmin(service, OPERATOR)
    for name in ("machine", "approval-required"):
        admin.add_template((TEMPLATES / f"{name}.toml").read_text(), now())
    try:
        yield service
    finally:
        service.engine.dispose()


def enrolled(service: CAService) -> tuple[Caller, Credential]:
    """A new machine principal, its credential, and the caller it authenticates as."""
    name = f"role-{uuid.uuid4().hex[:8]}.example.internal"
    token = CAAdmin(service, OPERATOR).add_principal(name, "machine", now())["token"]
    credential = service.auth.exchange_token(token, now())
    return service.auth.authenticate(credential.credential, now()), credential


def request(template: str = "machine", key: str | None = None) -> EnrollmentRequest:
    return EnrollmentRequest(template=template, csr=make_csr()[1].encode(), idempotency_key=key)


def actions(service: CAService, request_id: int) -> list[str]:
    return [e.action for e in reversed(service.audit.read(OPERATOR, now(), request_id=request_id).entries)]


def test_the_token_exchange_gives_a_credential_once(service: CAService) -> None:
    name = f"role-{uuid.uuid4().hex[:8]}.example.internal"
    token = CAAdmin(service, OPERATOR).add_principal(name, "machine", now())["token"]
    credential = service.auth.exchange_token(token, now())
    assert (credential.principal, credential.kind) == (name, "machine")
    assert credential.credential.startswith("cpc_") and credential.credential not in repr(credential)
    with pytest.raises(Refusal) as used:
        service.auth.exchange_token(token, now())
    assert used.value.reason is Reason.TOKEN_USED
    caller = service.auth.authenticate(credential.credential, now())
    assert (caller.kind, caller.name, caller.principal_kind) == ("principal", name, "machine")
    assert "machines" in caller.groups


def test_a_refused_credential_is_audited_by_authentication(service: CAService) -> None:
    before = service.audit.read(OPERATOR, now(), limit=1).entries[0].entry_id
    for secret in (None, "cpc_not-a-credential"):
        with pytest.raises(Refusal) as refused:
            service.auth.authenticate(secret, now())
        assert refused.value.reason is Reason.UNAUTHENTICATED
    newest = [e for e in service.audit.read(OPERATOR, now(), limit=10).entries if e.entry_id > before]
    expected = ("anonymous:-", "unauthenticated", "unauthenticated")
    assert [(e.actor, e.action, e.reason) for e in newest] == [expected, expected]


def test_a_submission_issues_with_a_typed_certificate(service: CAService) -> None:
    caller, _ = enrolled(service)
    issued = service.requests.submit(caller, request(), now())
    assert isinstance(issued, Issued)
    cert = x509.load_pem_x509_certificate(issued.certificate.encode())
    assert format(cert.serial_number, "x") == issued.serial and thumbprint(cert) == issued.thumbprint
    assert isinstance(issued.chain, tuple) and len(issued.chain) == 2
    cert.verify_directly_issued_by(x509.load_pem_x509_certificate(issued.chain[0].encode()))
    assert actions(service, issued.request_id) == ["issued"]


def test_a_retry_with_the_same_key_replays_the_first_request(service: CAService) -> None:
    caller, _ = enrolled(service)
    first = request(key=uuid.uuid4().hex)
    issued = service.requests.submit(caller, first, now())
    assert isinstance(issued, Issued)
    replay = service.requests.submit(caller, first, now())
    assert isinstance(replay, Replayed) and replay.request.issued == issued
    assert (replay.request.request_id, replay.request.status) == (issued.request_id, "issued")

    waiting = request("approval-required", key=uuid.uuid4().hex)
    pending = service.requests.submit(caller, waiting, now())
    assert isinstance(pending, Pending)
    again = service.requests.submit(caller, waiting, now())
    assert isinstance(again, Replayed) and again.request.status == "pending" and again.request.issued is None
    assert actions(service, issued.request_id) == ["issued"]  # a replay writes nothing


def test_pending_requests_are_approved_or_denied(service: CAService) -> None:
    caller, _ = enrolled(service)
    pending = service.requests.submit(caller, request("approval-required"), now())
    assert isinstance(pending, Pending)
    summary = service.requests.get(caller, pending.request_id)
    assert isinstance(summary, RequestSummary) and summary.status == "pending" and summary.issued is None
    assert summary.names == (caller.name,) and summary.requester == caller.actor

    approved = service.requests.approve(OPERATOR, pending.request_id, now())
    assert isinstance(approved, Approved) and approved.issued.request_id == pending.request_id
    done = service.requests.get(caller, pending.request_id)
    assert done.status == "issued" and done.issued == approved.issued and done.decided_by == OPERATOR.actor
    assert actions(service, pending.request_id) == ["pending", "approved", "issued"]

    other = service.requests.submit(caller, request("approval-required"), now())
    assert isinstance(other, Pending)
    assert service.requests.deny(OPERATOR, other.request_id, "not today", now()) == Denied(other.request_id,
                                                                                          "not today")
    denied = service.requests.get(OPERATOR, other.request_id)
    assert (denied.status, denied.reason, denied.decided_by) == ("denied", "not today", OPERATOR.actor)
    with pytest.raises(Refusal) as refused:
        service.requests.approve(OPERATOR, other.request_id, now())
    assert refused.value.reason is Reason.NOT_PENDING
    assert actions(service, other.request_id) == ["pending", "denied", "approve-refused"]


def test_listings_are_typed_and_for_managers_only(service: CAService) -> None:
    caller, _ = enrolled(service)
    pending = service.requests.submit(caller, request("approval-required"), now())
    assert isinstance(pending, Pending)
    listed = service.requests.list(OPERATOR, now(), "pending", limit=10_000)
    assert isinstance(listed, RequestList) and {r.status for r in listed.requests} == {"pending"}
    assert pending.request_id in [r.request_id for r in listed.requests]
    assert all(r.issued is None for r in listed.requests)  # a listing reads no certificate
    for refused_read in (lambda: service.requests.list(caller, now()), lambda: service.audit.read(caller, now())):
        with pytest.raises(Refusal) as refused:
            refused_read()
        assert refused.value.reason is Reason.FORBIDDEN


def test_revocation_and_status(service: CAService) -> None:
    caller, _ = enrolled(service)
    issued = service.requests.submit(caller, request(), now())
    assert isinstance(issued, Issued)
    good = service.revocation.status(issued.serial, now())
    assert isinstance(good, CertificateStatus) and (good.status, good.issuer) == ("good", "issuing-1")
    assert good.revoked_at is None and good.thumbprint == issued.thumbprint
    at = now()
    revoked = service.revocation.revoke(OPERATOR, issued.serial.upper(), "keyCompromise", at)
    assert revoked == Revoked(issued.serial, "keyCompromise", at)
    status = service.revocation.status(issued.serial, now())
    assert (status.status, status.revoked_at, status.revocation_reason) == ("revoked", at, "keyCompromise")
    assert actions(service, issued.request_id) == ["issued", "revoked"]


def test_the_policy_document_offers_what_the_caller_may_read(service: CAService) -> None:
    caller, _ = enrolled(service)
    issued = service.requests.submit(caller, request(), now())
    assert isinstance(issued, Issued)
    document = service.policy.document(caller, now())
    assert isinstance(document, PolicyDocument)
    offers = {o.template.name: o.rights for o in document.templates}
    assert offers == {"approval-required": frozenset({"read", "enroll", "autoenroll"}),
                      "machine": frozenset({"read", "enroll", "autoenroll"})}
    assert [i.name for i in document.issuers] == ["issuing-1"] and len(document.roots) == 1
    assert [(c.serial, c.thumbprint) for c in document.directory] == [(issued.serial, issued.thumbprint)]
    admin_view = service.policy.document(Caller(kind="admin", name="admin"), now())
    assert {o.rights for o in admin_view.templates} == {frozenset({"read"})} and admin_view.directory == ()


def test_the_audit_log_is_typed_newest_first(service: CAService) -> None:
    log = service.audit.read(OPERATOR, now(), limit=50)
    assert isinstance(log, AuditLog) and log.entries
    ids = [e.entry_id for e in log.entries]
    assert ids == sorted(ids, reverse=True)
    assert all(isinstance(e.names, tuple) for e in log.entries)
