"""The checks that make every signature a fresh decision, over in-memory fakes (no store, no clock):
names a renewal copies against the template as it is now, the key's standing (blocked for
keyCompromise, requested by another principal), and the decision again at approval.

The fakes (an in-memory root and issuing CA, example templates) are those of test_policy.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from typing import Any

import pytest
from cryptography import x509

from certpulse.ca.model import Caller
from certpulse.ca.policy import (
    CLEAN_KEY,
    Gathered,
    KeyStanding,
    StoredRequest,
    decide,
    decide_approval,
)
from certpulse.ca.templates import Template
from certpulse.errors import Reason, Refusal
from certpulse.pki.build import BACKDATE
from certpulse.pki.keys import spki_sha256
from certpulse.pki.names import RequestedNames
from test_policy import (
    MACHINE,
    NOW,
    OTHER_MACHINE,
    USER,
    gathered,
    issue,
    issuer_authority,
    known_map,
    make_csr,
    make_template,
    new_key,
    renewal_request,
    request,
    root_authority,
)

BLOCKED = KeyStanding(blocked_by="7f00aa")
ELSEWHERE = KeyStanding(other_principal=True)


def refused(reason: Reason, call: Any, *args: Any) -> Refusal:
    with pytest.raises(Refusal) as info:
        call(*args)
    assert info.value.reason is reason, f"expected {reason}, got {info.value.reason}: {info.value.detail}"
    assert info.value.detail
    return info.value


def with_key(state: Gathered, standing: KeyStanding) -> Gathered:
    return dataclasses.replace(state, key=standing)


# ================================================================================================
# Renewals that copy names re-check them against the template as it is now
# ================================================================================================

NARROWED = {"dns": ["new.example.internal"]}  # the old certificate's names are no longer allowed


@pytest.mark.parametrize(("template", "old_names", "outcome"), [
    # the example webserver template copies the old names on renewal
    (make_template("webserver"), {"dns": ["old.example.internal"]}, "copied"),
    (make_template("webserver", names=NARROWED), {"dns": ["old.example.internal"]}, Reason.NAME_NO_LONGER_ALLOWED),
    # an IP address, when the template no longer allows IP addresses / this range
    (make_template("webserver", names={"ip": False}), {"dns": ["old.example.internal"], "ips": ["10.0.0.9"]},
     Reason.NAME_NO_LONGER_ALLOWED),
    (make_template("webserver", names={"ip_ranges": ["192.168.0.0/16"]}),
     {"dns": ["old.example.internal"], "ips": ["10.0.0.9"]}, Reason.NAME_NO_LONGER_ALLOWED),
    # fewer names allowed than the old certificate carries
    (make_template("webserver", names={"max": 1}), {"dns": ["old.example.internal", "b.example.internal"]},
     Reason.NAME_NO_LONGER_ALLOWED),
    # a wildcard, once allowed and no longer
    (make_template("webserver", names={"wildcard": False}), {"dns": ["*.example.internal"]},
     Reason.NAME_NO_LONGER_ALLOWED),
])
def test_copied_names_meet_the_templates_current_rules(
        template: Template, old_names: dict[str, Any], outcome: Reason | str) -> None:
    cn = old_names["dns"][0]
    old = issue(cn=cn, dns=old_names["dns"], ips=old_names.get("ips", ()))
    csr = make_csr(cn="new.example.internal", dns=["new.example.internal"])  # ignored: names are copied
    state = gathered(template, known=known_map(old))
    if outcome == "copied":
        decision = decide(MACHINE, renewal_request(old, csr), state, NOW)
        assert decision.subject == old.cert.subject and decision.names.dns == tuple(old_names["dns"])
    else:
        error = refused(outcome, decide, MACHINE, renewal_request(old, csr), state, NOW)
        assert error.extra["refused_as"] == Reason.NAME_NOT_ALLOWED.value


def test_renewal_into_a_superseding_template_checks_the_copied_names_against_it() -> None:
    old = issue(template_name="webserver", cn="old.example.internal", dns=["old.example.internal"])
    successor = make_template("webserver", name="webserver-v2", supersedes=["webserver"], names=NARROWED)
    csr = make_csr(cn="new.example.internal", dns=["new.example.internal"])
    serving = (root_authority(), issuer_authority(templates=frozenset({"webserver", "webserver-v2"})))
    state = gathered(successor, known=known_map(old), authorities=serving)
    refused(Reason.NAME_NO_LONGER_ALLOWED, decide, MACHINE, renewal_request(old, csr, "webserver-v2"), state, NOW)
    # the successor allowing the old names: they are copied into it
    allowing = make_template("webserver", name="webserver-v2", supersedes=["webserver"])
    decision = decide(MACHINE, renewal_request(old, csr, "webserver-v2"), gathered(allowing, known=known_map(old),
                                                                                  authorities=serving), NOW)
    assert decision.template.name == "webserver-v2" and decision.names.dns == ("old.example.internal",)


def test_a_new_request_after_the_refusal_gets_what_is_allowed() -> None:
    """What the agent does next: no renewal evidence, names the template allows."""
    template = make_template("webserver", names=NARROWED)
    csr = make_csr(cn="new.example.internal", dns=["new.example.internal"])
    decision = decide(MACHINE, request("webserver", csr), gathered(template), NOW)
    assert decision.kind == "new" and decision.names.dns == ("new.example.internal",)


# ================================================================================================
# The key's standing
# ================================================================================================


@pytest.mark.parametrize(("standing", "outcome"), [
    (CLEAN_KEY, None),
    (BLOCKED, Reason.KEY_BLOCKED),
    (ELSEWHERE, Reason.KEY_OF_ANOTHER_PRINCIPAL),
    (KeyStanding(blocked_by="01", other_principal=True), Reason.KEY_BLOCKED),  # compromise named first
])
@pytest.mark.parametrize("kind", ["new", "renewal"])
def test_key_standing_in_submissions(standing: KeyStanding, outcome: Reason | None, kind: str) -> None:
    if kind == "new":
        req = request("machine", make_csr())
        state = gathered(make_template("machine"))
    else:
        old = issue(template_name="machine")
        req = renewal_request(old, make_csr(), "machine")
        state = gathered(make_template("machine"), known=known_map(old))
    state = with_key(state, standing)
    if outcome is None:
        assert decide(MACHINE, req, state, NOW).kind == kind
    else:
        refused(outcome, decide, MACHINE, req, state, NOW)


def test_key_standing_comes_after_the_template_and_the_csr() -> None:
    """An unauthorised caller learns nothing of a key's standing; a bad CSR is named as such."""
    state = with_key(gathered(make_template("machine")), BLOCKED)
    refused(Reason.UNKNOWN_TEMPLATE, decide, USER, request("machine", make_csr()), state, NOW)
    refused(Reason.MALFORMED_CSR, decide, MACHINE, request("machine", b"garbage"), state, NOW)


def test_decision_names_the_key_it_certifies() -> None:
    key = new_key()
    decision = decide(MACHINE, request("machine", make_csr(key)), gathered(make_template("machine")), NOW)
    assert decision.key_sha256 == spki_sha256(key.public_key())
    assert decision.key_sha256 != spki_sha256(new_key().public_key())


# ================================================================================================
# Approval decides again
# ================================================================================================


def stored(template: str = "approval-required", kind: str = "new", csr: bytes | None = None,
           subject: str = "CN=host1.example.internal", dns: tuple[str, ...] = ("host1.example.internal",),
           issuer_id: int = 2) -> StoredRequest:
    return StoredRequest(template=template, kind=kind, csr_der=csr or make_csr(),
                         subject=x509.Name.from_rfc4514_string(subject), names=RequestedNames(dns=dns),
                         issuer_id=issuer_id)


APPROVAL = make_template("approval-required")
NOT_MACHINES = make_template("approval-required", permissions=[{"group": "users", "rights": ["read", "enroll"]}])
READ_ONLY = make_template("approval-required", permissions=[{"group": "machines", "rights": ["read"]}])
EC_ONLY_P384 = make_template("approval-required", key={"types": ["ec-p384"], "default": "ec-p384"})
NO_LONGER_IN_GROUP = dataclasses.replace(MACHINE, groups=frozenset({"webservers"}))


@pytest.mark.parametrize(("requester", "template", "standing", "authorities", "outcome"), [
    (MACHINE, APPROVAL, CLEAN_KEY, None, None),
    (None, APPROVAL, CLEAN_KEY, None, Reason.REQUESTER_DISABLED),  # disabled or removed
    (NO_LONGER_IN_GROUP, APPROVAL, CLEAN_KEY, None, Reason.TEMPLATE_NOT_PERMITTED),
    (MACHINE, NOT_MACHINES, CLEAN_KEY, None, Reason.TEMPLATE_NOT_PERMITTED),
    (MACHINE, READ_ONLY, CLEAN_KEY, None, Reason.TEMPLATE_NOT_PERMITTED),
    (MACHINE, None, CLEAN_KEY, None, Reason.UNKNOWN_TEMPLATE),  # removed since
    (MACHINE, EC_ONLY_P384, CLEAN_KEY, None, Reason.KEY_NOT_ALLOWED),
    (MACHINE, APPROVAL, BLOCKED, None, Reason.KEY_BLOCKED),
    (MACHINE, APPROVAL, ELSEWHERE, None, Reason.KEY_OF_ANOTHER_PRINCIPAL),
    (MACHINE, APPROVAL, CLEAN_KEY, (root_authority(), issuer_authority(enabled=False)), Reason.NO_ISSUER),
    (MACHINE, APPROVAL, CLEAN_KEY, (root_authority(), issuer_authority(templates=frozenset({"machine"}))),
     Reason.NO_ISSUER),
    (MACHINE, APPROVAL, CLEAN_KEY, (root_authority(),), Reason.NO_ISSUER),  # the issuer is gone
])
def test_approval_decides_again(requester: Caller | None, template: Template | None, standing: KeyStanding,
                                authorities: tuple[Any, ...] | None, outcome: Reason | None) -> None:
    state = with_key(gathered(template, authorities=authorities), standing)
    if outcome is None:
        decision = decide_approval(requester, stored(), state, NOW)
        assert decision.subject_text() == "CN=host1.example.internal" and decision.pending
    else:
        refused(outcome, decide_approval, requester, stored(), state, NOW)


def test_approval_rechecks_a_request_source_template_names() -> None:
    csr = make_csr(cn="www.example.internal", dns=["www.example.internal"])
    request_names = make_template("webserver", issuance={"manager_approval": True})
    at = stored("webserver", csr=csr, subject="CN=www.example.internal", dns=("www.example.internal",))
    assert decide_approval(MACHINE, at, gathered(request_names), NOW).names.dns == ("www.example.internal",)
    narrowed = make_template("webserver", issuance={"manager_approval": True}, names={"dns": ["localhost"]})
    refused(Reason.NAME_NOT_ALLOWED, decide_approval, MACHINE, at, gathered(narrowed), NOW)
    # a pending renewal whose names were copied from the old certificate
    renewal = stored("webserver", kind="renewal", csr=make_csr(), subject="CN=www.example.internal",
                     dns=("www.example.internal",))
    assert decide_approval(MACHINE, renewal, gathered(request_names), NOW).names.dns == ("www.example.internal",)
    refused(Reason.NAME_NO_LONGER_ALLOWED, decide_approval, MACHINE, renewal, gathered(narrowed), NOW)


def test_approval_of_a_principal_template_names_the_requester_as_it_is() -> None:
    decision = decide_approval(OTHER_MACHINE, stored(), gathered(APPROVAL), NOW)
    assert decision.subject_text() == "CN=host2.example.internal"


def test_approval_validity_starts_at_approval() -> None:
    later = NOW + dt.timedelta(days=3)
    decision = decide_approval(MACHINE, stored(), gathered(APPROVAL), later)
    assert decision.not_before == later - BACKDATE
