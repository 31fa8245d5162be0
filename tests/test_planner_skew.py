"""The planner when this machine's clock is behind the CA's (issue 16: clock skew never causes
re-enrollment), as a table in the style of ``tests/test_planner.py``.

A certificate issued to this machine (its key, its record: ``own``) counts as held however far
in the future it starts, and the plan says why nothing happens; an issuer that starts after this
machine's clock is named in a note instead of a silent "nothing to do". Certificates that are
not the machine's own keep the 5-minute allowance (pinned in ``tests/test_planner.py``).
"""

from __future__ import annotations

import dataclasses
import datetime as dt

import pytest

from certpulse.agent.model import IssuerPolicy, Kind, StoreSnapshot
from certpulse.agent.planner import plan
from test_planner import DAY, DUE, NOW, YEAR, Case, M, Options, act, cert, note, run, server

MINUTE = dt.timedelta(minutes=1)


def late_issuer(starts_at: dt.datetime | None, *, valid: bool = False) -> IssuerPolicy:
    return IssuerPolicy(name="CA1", cost=1, renewal_only=False, templates=frozenset({"Machine"}), valid=valid,
                        starts_at=starts_at)


CASES = [
    Case("own-certificate-starting-after-this-clock-is-held", (server(M),),
         certs=(cert("t1", M, left=YEAR + 8 * MINUTE, own=True),), actions=(),
         all_notes=("6b:not-yet-valid",)),
    Case("own-certificate-starting-days-after-this-clock-is-held", (server(M),),
         certs=(cert("t1", M, left=YEAR + 3 * DAY, own=True),), actions=(),
         notes=(note("6b:not-yet-valid", "Machine", "t1"),)),
    Case("own-certificate-starting-within-the-allowance-is-noted-too", (server(M),),
         certs=(cert("t1", M, left=YEAR + 2 * MINUTE, own=True),), actions=(),
         notes=(note("6b:not-yet-valid", "Machine", "t1"),)),
    Case("foreign-certificate-starting-beyond-the-allowance-is-not-held", (server(M),),
         certs=(cert("t1", M, left=YEAR + 10 * MINUTE),),
         actions=(act(Kind.ENROLL, "6b:missing", "Machine", replaces=("t1",)),), no_notes=("6b:not-yet-valid",)),
    Case("own-certificate-not-started-but-revoked-is-replaced", (server(M),),
         certs=(cert("t1", M, left=YEAR + 8 * MINUTE, own=True, revoked=True),),
         actions=(act(Kind.ENROLL, "6b:missing", "Machine", replaces=("t1",)),), no_notes=("6b:not-yet-valid",)),
    Case("own-certificate-not-started-failing-its-chain-is-replaced", (server(M),),
         certs=(cert("t1", M, left=YEAR + 8 * MINUTE, own=True, chain_valid=False),),
         actions=(act(Kind.ENROLL, "6b:missing", "Machine", replaces=("t1",)),)),
    Case("own-expired-certificate-is-replaced", (server(M),),
         certs=(cert("t1", M, left=-DAY, own=True),),
         actions=(act(Kind.ENROLL, "6b:missing", "Machine", replaces=("t1",)),), no_notes=("6b:not-yet-valid",)),
    Case("issuer-starting-after-this-clock-is-named", (server(M, issuers=(late_issuer(NOW + 30 * MINUTE),)),),
         actions=(), all_notes=("6b:issuer-not-yet-valid",)),
    Case("issuer-invalid-for-another-reason-is-not-blamed-on-the-clock", (server(M, issuers=(late_issuer(None),)),),
         actions=(), no_notes=("6b:issuer-not-yet-valid",)),
    Case("issuer-starting-later-beside-a-valid-one-enrolls", (server(M, issuers=(
        late_issuer(NOW + 30 * MINUTE), dataclasses.replace(late_issuer(None, valid=True), name="CA2"))),),
         actions=(act(Kind.ENROLL, "6b:missing", "Machine"),), no_notes=("6b:issuer-not-yet-valid",)),
    Case("issuer-starting-later-says-nothing-without-autoenroll", (server(
        dataclasses.replace(M, rights=frozenset({"read", "enroll"})), issuers=(late_issuer(NOW + 30 * MINUTE),)),),
         actions=(), no_notes=("6b:issuer-not-yet-valid",)),
    Case("due-renewal-with-an-issuer-starting-later-says-why", (server(M, issuers=(late_issuer(NOW + 30 * MINUTE),)),),
         certs=(cert("t1", M, left=DUE, own=True),), actions=(), all_notes=("6a:no-issuer",)),
    Case("disabled-agent-notes-only-that", (server(M),), certs=(cert("t1", M, left=YEAR + 8 * MINUTE, own=True),),
         options=Options(enabled=False), all_notes=("1:disabled",)),
]


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_plan_with_skew(case: Case) -> None:
    result = run(case)
    got = [{key: getattr(action, key) for key in expected} for action, expected in zip(result.actions, case.actions,
                                                                                      strict=False)]
    assert len(result.actions) == len(case.actions), f"planned {[a.to_dict() for a in result.actions]}"
    assert got == list(case.actions)
    for expected in case.notes:
        assert any(all(getattr(n, k) == v for k, v in expected.items()) for n in result.notes), result.notes
    for rule in case.no_notes:
        assert all(n.rule != rule for n in result.notes), f"{rule} among {result.notes}"
    if case.all_notes is not None:
        assert tuple(n.rule for n in result.notes) == case.all_notes


def test_the_notes_say_when_it_starts_and_what_to_do() -> None:
    held = run(CASES[0]).notes[0]
    assert held.detail == ("the certificate starts at 2030-06-01T12:08:00+00:00, 8 minutes after this machine's "
                           "clock; check the clock")
    issuer = run(next(c for c in CASES if c.id == "issuer-starting-after-this-clock-is-named")).notes[0]
    assert issuer.detail == ("the issuing CA 'CA1' starts at 2030-06-01T12:30:00+00:00, 30 minutes after this "
                             "machine's clock; check the clock")
    renewal = run(next(c for c in CASES if c.id == "due-renewal-with-an-issuer-starting-later-says-why")).notes[0]
    assert renewal.detail == "no valid issuer serves the template: " + issuer.detail


@pytest.mark.parametrize("behind", [6 * MINUTE, 10 * MINUTE, 2 * DAY])
def test_a_machine_behind_the_ca_enrolls_once_in_five_pulses(behind: dt.timedelta) -> None:
    """Five pulses an hour apart on a machine ``behind`` the CA, which dates each certificate
    from its own clock (no backdate): one enrollment, then notes only."""
    servers = (server(M),)
    store = StoreSnapshot()
    enrolled = 0
    for pulse in range(5):
        now = NOW + pulse * dt.timedelta(hours=1)
        result = plan(Options(), servers, store, now)
        for action in result.actions:
            assert action.kind is Kind.ENROLL
            enrolled += 1
            start = now + behind
            issued = dataclasses.replace(cert(f"c{pulse}", M, own=True), not_before=start, not_after=start + YEAR)
            store = StoreSnapshot(certificates=(*store.certificates, issued))
    assert enrolled == 1
