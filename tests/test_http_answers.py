"""Each of the CA core's results as the HTTP API answers it (``frontends/http.answer``): status
code and JSON document, field by field and in order. The API tests exercise these answers end
to end; these pin every result type, with and without its optional fields, in one place."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
from typing import Any

import pytest

from certpulse.ca import results
from certpulse.ca.templates import parse_template_toml
from certpulse.frontends.http import SUBMISSION_OUTCOMES, answer
from support import TEMPLATES

AT = dt.datetime(2031, 2, 3, 4, 5, 6, tzinfo=dt.UTC)
LATER = AT + dt.timedelta(hours=1)
ISSUED = results.Issued(request_id=7, serial="5f00aa", thumbprint="AB" * 20, certificate="LEAF PEM",
                        chain=("ISSUER PEM", "ROOT PEM"))
PENDING_SUMMARY = results.RequestSummary(
    request_id=8, status="pending", template="approval-required", kind="new", requester="principal:h1",
    subject="CN=h1", names=("h1.example.internal",), created_at=AT, decided_at=None, decided_by=None, reason=None)
ISSUED_SUMMARY = dataclasses.replace(PENDING_SUMMARY, request_id=7, status="issued", decided_at=LATER,
                                     decided_by="admin:admin", issued=ISSUED)
DENIED_SUMMARY = dataclasses.replace(PENDING_SUMMARY, status="denied", decided_at=LATER, decided_by="admin:admin",
                                     reason="unknown host")
SUMMARY_FIELDS = {"id": 8, "status": "pending", "template": "approval-required", "kind": "new",
                  "requester": "principal:h1", "subject": "CN=h1", "names": ["h1.example.internal"],
                  "created_at": "2031-02-03T04:05:06+00:00"}
ISSUED_FIELDS = {"serial": "5f00aa", "thumbprint": "AB" * 20, "certificate": "LEAF PEM",
                 "chain": ["ISSUER PEM", "ROOT PEM"]}


def answered(result: results.Result) -> tuple[int, str, Any]:
    response = answer(result)
    return response.status_code, response.headers["content-type"], json.loads(bytes(response.body))


def assert_document(result: results.Result, status: int, document: Any) -> None:
    code, content_type, body = answered(result)
    assert (code, content_type) == (status, "application/json")
    assert body == document
    if isinstance(document, dict):
        assert list(body) == list(document), "fields in the documented order"


def test_a_new_certificate_is_201_with_its_chain() -> None:
    assert_document(ISSUED, 201, {"id": 7, "status": "issued", **ISSUED_FIELDS})


def test_a_request_left_for_approval_is_202() -> None:
    assert_document(results.Pending(8), 202, {"id": 8, "status": "pending"})


@pytest.mark.parametrize(("summary", "status", "extra"), [
    (ISSUED_SUMMARY, 200, {"id": 7, "status": "issued", "decided_at": "2031-02-03T05:05:06+00:00",
                           "decided_by": "admin:admin", "reason": None, **ISSUED_FIELDS}),
    (PENDING_SUMMARY, 202, {"decided_at": None, "decided_by": None, "reason": None}),
    (DENIED_SUMMARY, 200, {"status": "denied", "decided_at": "2031-02-03T05:05:06+00:00",
                           "decided_by": "admin:admin", "reason": "unknown host"}),
], ids=["issued", "pending", "denied"])
def test_a_replay_shows_the_first_request_with_every_field(summary: results.RequestSummary, status: int,
                                                           extra: dict[str, Any]) -> None:
    """Empty fields included (unlike a read), flagged; 202 while it still waits, 200 once decided."""
    assert_document(results.Replayed(summary), status, {**SUMMARY_FIELDS, **extra, "replayed": True})


def test_an_approval_answers_the_certificate_with_200() -> None:
    assert_document(results.Approved(ISSUED), 200, {"id": 7, "status": "issued", **ISSUED_FIELDS})


def test_a_denial() -> None:
    assert_document(results.Denied(8, "unknown host"), 200, {"id": 8, "status": "denied", "reason": "unknown host"})


def test_reading_a_request_leaves_out_empty_fields() -> None:
    assert_document(PENDING_SUMMARY, 200, SUMMARY_FIELDS)
    assert_document(ISSUED_SUMMARY, 200, {**SUMMARY_FIELDS, "id": 7, "status": "issued",
                                          "decided_at": "2031-02-03T05:05:06+00:00", "decided_by": "admin:admin",
                                          **ISSUED_FIELDS})


def test_a_listing_leaves_out_empty_fields_of_each_request() -> None:
    listed = results.RequestList((PENDING_SUMMARY, dataclasses.replace(DENIED_SUMMARY, request_id=9)))
    assert_document(listed, 200, [SUMMARY_FIELDS, {**SUMMARY_FIELDS, "id": 9, "status": "denied",
                                                   "decided_at": "2031-02-03T05:05:06+00:00",
                                                   "decided_by": "admin:admin", "reason": "unknown host"}])
    assert_document(results.RequestList(()), 200, [])


def test_a_revocation() -> None:
    assert_document(results.Revoked("5f00aa", "keyCompromise", LATER), 200,
                    {"serial": "5f00aa", "status": "revoked", "reason": "keyCompromise",
                     "revoked_at": "2031-02-03T05:05:06+00:00"})


@pytest.mark.parametrize("revoked", [False, True])
def test_a_certificate_status_has_every_field(revoked: bool) -> None:
    status = results.CertificateStatus(
        serial="5f00aa", issuer="issuing-1", status="revoked" if revoked else "good", template="machine",
        subject="CN=h1", not_before=AT, not_after=LATER, revoked_at=LATER if revoked else None,
        revocation_reason="superseded" if revoked else None, thumbprint="AB" * 20)
    assert_document(status, 200, {
        "serial": "5f00aa", "issuer": "issuing-1", "status": "revoked" if revoked else "good", "template": "machine",
        "subject": "CN=h1", "not_before": "2031-02-03T04:05:06+00:00", "not_after": "2031-02-03T05:05:06+00:00",
        "revoked_at": "2031-02-03T05:05:06+00:00" if revoked else None,
        "revocation_reason": "superseded" if revoked else None, "thumbprint": "AB" * 20})


def test_a_credential_is_shown_once_in_the_answer_and_never_in_a_repr() -> None:
    credential = results.Credential("h1.example.internal", "machine", "cpc_secret-value")
    assert_document(credential, 200, {"principal": "h1.example.internal", "kind": "machine",
                                      "credential": "cpc_secret-value"})
    assert "cpc_secret-value" not in repr(credential)


def test_the_audit_log_has_every_field() -> None:
    entries = (
        results.AuditEntry(entry_id=2, at=LATER, actor="anonymous:-", action="unauthenticated", template=None,
                           request_id=None, serial=None, names=(), reason="unauthenticated", detail="no credential"),
        results.AuditEntry(entry_id=1, at=AT, actor="principal:h1", action="issued", template="machine",
                           request_id=7, serial="5f00aa", names=("h1.example.internal",), reason=None, detail="new"),
    )
    assert_document(results.AuditLog(entries), 200, [
        {"id": 2, "at": "2031-02-03T05:05:06+00:00", "actor": "anonymous:-", "action": "unauthenticated",
         "template": None, "request_id": None, "serial": None, "names": [], "reason": "unauthenticated",
         "detail": "no credential"},
        {"id": 1, "at": "2031-02-03T04:05:06+00:00", "actor": "principal:h1", "action": "issued",
         "template": "machine", "request_id": 7, "serial": "5f00aa", "names": ["h1.example.internal"],
         "reason": None, "detail": "new"},
    ])


def test_the_policy_document() -> None:
    template = parse_template_toml((TEMPLATES / "machine.toml").read_text(), default_oid="1.3.6.1.4.1.99999.1")
    document = results.PolicyDocument(
        policy_id="p-1", generated_at=AT, refresh_after_seconds=600,
        templates=(results.TemplateOffer(template, frozenset({"read", "enroll"})),),
        issuers=(results.IssuerOffer(name="issuing-1", certificate="ISSUER PEM", cost=10, renewal_only=False,
                                     templates=("machine",), thumbprint="CD" * 20),),
        roots=("ROOT PEM",), intermediates=("ISSUER PEM",), kra=("KRA PEM",),
        directory=(results.PublishedCertificate(template="machine", serial="5f00aa", thumbprint="AB" * 20,
                                                not_after=LATER),),
    )
    code, _, body = answered(document)
    assert code == 200
    assert list(body) == ["policy_id", "generated_at", "refresh_after_seconds", "templates", "issuers", "roots",
                          "cross_certificates", "intermediates", "kra", "directory"]
    assert body["generated_at"] == "2031-02-03T04:05:06+00:00" and body["refresh_after_seconds"] == 600
    offered = body["templates"][0]
    assert list(offered) == [
        "name", "display_name", "oid", "schema_version", "major_version", "minor_version", "validity_seconds",
        "renewal_period_seconds", "purpose", "key", "key_usage", "ekus", "subject_source",
        "renewal_subject_from_existing", "manager_approval", "ra_signatures", "ra_policy", "supersedes",
        "old_certificate", "user_interaction", "check_directory", "rights"]
    assert offered["name"] == "machine" and offered["oid"] == "1.3.6.1.4.1.99999.1"
    assert offered["rights"] == ["enroll", "read"]  # sorted
    assert offered["validity_seconds"] == int(template.validity.total_seconds())
    assert offered["key"] == {"types": list(template.key_types), "default": template.default_key_type,
                              "archive": False}
    assert body["issuers"] == [{"name": "issuing-1", "certificate": "ISSUER PEM", "cost": 10, "renewal_only": False,
                                "templates": ["machine"], "thumbprint": "CD" * 20}]
    assert (body["roots"], body["intermediates"], body["kra"]) == (["ROOT PEM"], ["ISSUER PEM"], ["KRA PEM"])
    assert body["directory"] == [{"template": "machine", "serial": "5f00aa", "thumbprint": "AB" * 20,
                                  "not_after": "2031-02-03T05:05:06+00:00"}]


def test_every_submission_result_has_a_latency_outcome() -> None:
    assert {SUBMISSION_OUTCOMES[type(r)] for r in (ISSUED, results.Pending(8), results.Replayed(PENDING_SUMMARY))} \
        == {"issued", "pending", "replayed"}
