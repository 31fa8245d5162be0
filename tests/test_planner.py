"""The autoenrollment planner (``certpulse.agent.planner.plan``), table-driven: no network, no clock.

Every case is a named world (options, policy servers, store snapshot, ``now``) and what the
planner must decide for it: the exact, ordered list of actions (only the fields a case names are
compared) and notes that must (or must not) be among the skips. The cases walk SPEC "A pulse, in
order": options (1), pending requests (5), renewal of autoenroll certificates (6a), new requests
(6b), renewal of manually enrolled certificates (6c) and cleanup, with the boundaries of each
rule. Every table case is also replayed through a small executor simulation: a second pulse at
the same instant must plan nothing. Hypothesis then checks three properties over generated
worlds: the renewal time lies within the certificate's validity, a second pulse is quiet, and the
plan does not depend on the order in which the store lists its contents.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Sequence
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from certpulse.agent.model import (
    Action,
    IssuerPolicy,
    Kind,
    Options,
    PendingRequest,
    PolicyServer,
    StoredCertificate,
    StoreSnapshot,
    TemplatePolicy,
)
from certpulse.agent.planner import Note, Plan, plan, renewal_time, threshold_reached

NOW = dt.datetime(2030, 6, 1, 12, 0, tzinfo=dt.UTC)
SECOND = dt.timedelta(seconds=1)
DAY = dt.timedelta(days=1)
YEAR = 365 * DAY
SIX_WEEKS = 42 * DAY
ALL_RIGHTS = frozenset({"read", "enroll", "autoenroll"})
ENROLL_ONLY = frozenset({"read", "enroll"})
READ_ONLY = frozenset({"read"})

Expect = dict[str, object]

# -- builders ---------------------------------------------------------------------------------


def oid_of(name: str) -> str:
    return "1.3.6.1.4.1.311.21.8.77." + ".".join(str(ord(ch)) for ch in name)


_BASE_TEMPLATE = TemplatePolicy(
    name="", oid="", major_version=2, minor_version=0, validity=YEAR, renewal_period=SIX_WEEKS,
    purpose="signature", key_types=("ec-p256",), default_key_type="ec-p256", archive_private_key=False,
    subject_source="principal", renewal_subject_from_existing=False, manager_approval=False, ra_signatures=0,
    ra_policy=None, supersedes=(), old_certificate="archive", user_interaction=False, check_directory=False,
    rights=ALL_RIGHTS,
)


def tpl(name: str, **changes: Any) -> TemplatePolicy:
    """A template set up for autoenrollment (1 year, six-week renewal period) unless told otherwise."""
    return dataclasses.replace(_BASE_TEMPLATE, name=name, oid=oid_of(name), **changes)


def manual_tpl(name: str, **changes: Any) -> TemplatePolicy:
    """The classic manually enrolled template: the subject is supplied in the request, renewals reuse it."""
    return tpl(name, **{"subject_source": "request", "renewal_subject_from_existing": True, **changes})


def issuer(name: str, *templates: str, cost: int = 1, renewal_only: bool = False, valid: bool = True,
           reachable: bool = True) -> IssuerPolicy:
    return IssuerPolicy(name=name, cost=cost, renewal_only=renewal_only, templates=frozenset(templates),
                        valid=valid, reachable=reachable)


def server(*templates: TemplatePolicy, issuers: Sequence[IssuerPolicy] | None = None, policy_id: str = "pol-a",
           url: str | None = None, cost: int = 1, auth: str = "certificate", is_default: bool = True,
           kra_valid: bool = True, directory: Sequence[tuple[str, dt.datetime]] = ()) -> PolicyServer:
    """A policy server; by default one issuer ``CA1`` serves every template it lists."""
    if issuers is None:
        issuers = (issuer("CA1", *(t.name for t in templates)),)
    return PolicyServer(url=url or f"https://{policy_id}.example/cep", policy_id=policy_id, cost=cost, auth=auth,
                        is_default=is_default, templates=tuple(templates), issuers=tuple(issuers),
                        kra_valid=kra_valid, directory=tuple(directory))


def cert(thumb: str, template: TemplatePolicy | None, *, left: dt.timedelta = 200 * DAY,
         lifetime: dt.timedelta = YEAR, **changes: Any) -> StoredCertificate:
    """A certificate with ``left`` time to run at ``NOW`` (negative: expired that long ago)."""
    not_after = NOW + left
    made = StoredCertificate(
        thumbprint=thumb, subject=f"CN={thumb}", not_before=not_after - lifetime, not_after=not_after,
        template_oid=template.oid if template else None, template_name=template.name if template else None,
        major_version=template.major_version if template else 0,
        minor_version=template.minor_version if template else 0, source="auto", policy_id="pol-a")
    return dataclasses.replace(made, **changes)


def manual(thumb: str, template: TemplatePolicy, **kwargs: Any) -> StoredCertificate:
    return cert(thumb, template, source="manual", **kwargs)


def ra_cert(thumb: str = "ra", **changes: Any) -> StoredCertificate:
    """A registration-authority (certificate request agent) certificate of no policy template."""
    return cert(thumb, None, is_ra=True, source="manual", policy_id=None, **changes)


def pend(request_id: int, template: TemplatePolicy, age: dt.timedelta, *, renewal_of: str | None = None,
         issuer_name: str = "CA1", policy_url: str = "https://pol-a.example/cep") -> PendingRequest:
    return PendingRequest(request_id=request_id, template=template.name, issuer=issuer_name,
                          policy_url=policy_url, submitted_at=NOW - age, renewal_of=renewal_of)


def act(kind: Kind, rule: str, template: str | None = None, thumbprint: str | None = None,
        **fields: object) -> Expect:
    """An expected action: kind, rule, template and thumbprint always; other fields when named."""
    return {"kind": kind, "rule": rule, "template": template, "thumbprint": thumbprint, **fields}


def note(rule: str, template: str | None = None, thumbprint: str | None = None) -> Expect:
    found: Expect = {"rule": rule}
    if template is not None:
        found["template"] = template
    if thumbprint is not None:
        found["thumbprint"] = thumbprint
    return found


@dataclasses.dataclass(frozen=True)
class Case:
    id: str
    servers: tuple[PolicyServer, ...]
    certs: tuple[StoredCertificate, ...] = ()
    pending: tuple[PendingRequest, ...] = ()
    options: Options = dataclasses.field(default_factory=Options)
    actions: tuple[Expect, ...] = ()  # the exact, ordered list of actions
    notes: tuple[Expect, ...] = ()  # notes that must be among the plan's notes
    no_notes: tuple[str, ...] = ()  # note rules that must not appear
    all_notes: tuple[str, ...] | None = None  # when given: exactly these note rules, in order
    now: dt.datetime = NOW
    in_flight: tuple[str, ...] = ()  # templates with a request the CA has not acknowledged

    @property
    def store(self) -> StoreSnapshot:
        return StoreSnapshot(certificates=self.certs, pending=self.pending, in_flight=self.in_flight)


def run(case: Case) -> Plan:
    return plan(case.options, case.servers, case.store, case.now)


# -- the world of the cases -------------------------------------------------------------------

M = tpl("Machine")  # autoenroll, subject from the principal, 1 year, 6 weeks renewal period
WEB = manual_tpl("WebServer")  # enrolled by hand, renewed by the agent
DUE = SIX_WEEKS  # a 1-year certificate with exactly the renewal period left
NOT_DUE = SIX_WEEKS + SECOND
URL_A = "https://pol-a.example/cep"
URL_B = "https://pol-b.example/cep"

ENC_DELETE = tpl("Encrypt", purpose="encryption", old_certificate="delete")
BOTH_DELETE = tpl("SignEncrypt", purpose="both", old_certificate="delete")
SIG_DELETE = tpl("Sign", old_certificate="delete")
SIG_ARCHIVE = tpl("SignKeep", old_certificate="archive")

T_OLD = tpl("Old")
T_NEW = tpl("New", supersedes=("Old",))
T_NEW_NO_RIGHT = tpl("New", supersedes=("Old",), rights=ENROLL_ONLY)

SHORT = tpl("Short", validity=10 * DAY, renewal_period=SIX_WEEKS)  # 6 weeks > 20 % of 10 days
HUNDRED = tpl("Hundred", validity=100 * DAY, renewal_period=SIX_WEEKS)

RA1 = tpl("RA1", ra_signatures=1, ra_policy="1.3.6.1.4.1.311.20.2.1")
RA2 = tpl("RA2", ra_signatures=2, ra_policy="1.3.6.1.4.1.311.20.2.1")
KRA = tpl("Archive", archive_private_key=True, purpose="encryption")
UI = tpl("Interactive", user_interaction=True)
SUBJ = tpl("Subject", subject_source="request", renewal_subject_from_existing=False)
SUBJ_REUSE = tpl("SubjectReuse", subject_source="request", renewal_subject_from_existing=True)
DIR = tpl("Directory", check_directory=True)
NO_AUTO = tpl("EnrollOnly", rights=ENROLL_ONLY)

T_NEW_NEEDS_SUBJECT = tpl("New", supersedes=("Old",), subject_source="request")
MINUTE = dt.timedelta(minutes=1)

CASES: list[Case] = [
    # -- requests the CA has not acknowledged: resent as they were, never doubled --------------
    Case("in-flight-request-blocks-a-new-request", (server(M),), in_flight=("Machine",),
         actions=(), notes=(note("5:in-flight", "Machine"),), no_notes=("6b:missing",)),
    Case("in-flight-request-blocks-a-due-renewal", (server(M),), certs=(cert("t1", M, left=DUE),),
         in_flight=("Machine",), actions=(), notes=(note("5:in-flight", "Machine"), note("6a:pending", "Machine"))),
    # -- a successor this client cannot get silently does not stop the old template renewing ---
    Case("successor-needing-a-supplied-subject-leaves-the-old-template-renewing",
         (server(T_OLD, T_NEW_NEEDS_SUBJECT),), certs=(cert("t1", T_OLD, left=DUE),),
         actions=(act(Kind.RENEW, "6a:threshold", "Old", "t1"),), no_notes=("6a:superseded",)),
    # -- clock skew: a certificate the CA dated a little ahead of this machine counts as held --
    Case("certificate-starting-within-the-clock-skew-counts-as-held", (server(M),),
         certs=(cert("t1", M, left=YEAR + 2 * MINUTE),), actions=()),
    Case("certificate-starting-beyond-the-clock-skew-is-not-held", (server(M),),
         certs=(cert("t1", M, left=YEAR + 10 * MINUTE),),
         actions=(act(Kind.ENROLL, "6b:missing", "Machine", replaces=("t1",)),)),
    # 1. Options ------------------------------------------------------------------------------
    Case("disabled-plans-nothing", (server(M, WEB),),
         certs=(cert("c1", M, left=DAY), manual("m1", WEB, left=-DAY)),
         pending=(pend(1, M, 70 * DAY), pend(2, WEB, DAY)),
         options=Options(enabled=False), all_notes=("1:disabled",)),
    Case("enroll-off-skips-a-and-b-but-not-c", (server(M, tpl("Missing"), WEB),),
         certs=(cert("c1", M, left=DUE), manual("m1", WEB, left=DUE)),
         options=Options(enroll=False),
         actions=(act(Kind.RENEW_MANUAL, "6c:threshold", "WebServer", "m1"),)),
    Case("manage-off-skips-c", (server(M, WEB),),
         certs=(cert("c1", M, left=DUE), manual("m1", WEB, left=DUE), manual("m2", WEB, left=-DAY)),
         options=Options(manage=False),
         actions=(act(Kind.RENEW, "6a:threshold", "Machine", "c1"),)),
    Case("retrieve-pending-off-does-not-poll-and-pending-still-blocks", (server(M),),
         pending=(pend(7, M, 10 * DAY),), options=Options(retrieve_pending=False),
         notes=(note("6b:pending", "Machine"),)),
    Case("retrieve-pending-off-59-days-still-blocks", (server(M),),
         pending=(pend(7, M, 59 * DAY),), options=Options(retrieve_pending=False),
         notes=(note("6b:pending", "Machine"),)),
    Case("retrieve-pending-off-stale-request-neither-dropped-nor-blocking", (server(M),),
         pending=(pend(7, M, 60 * DAY),), options=Options(retrieve_pending=False),
         actions=(act(Kind.ENROLL, "6b:missing", "Machine"),)),
    # 5. Pending requests ------------------------------------------------------------------------
    Case("pending-59-days-polled-and-blocks-duplicate", (server(M),),
         pending=(pend(7, M, 59 * DAY),),
         actions=(act(Kind.POLL_PENDING, "5:poll", "Machine", request_id=7, issuers=("CA1",), policy_url=URL_A),),
         notes=(note("6b:pending", "Machine"),)),
    Case("pending-one-second-short-of-60-days-polled", (server(M),),
         pending=(pend(7, M, 60 * DAY - SECOND),),
         actions=(act(Kind.POLL_PENDING, "5:poll", "Machine", request_id=7),)),
    Case("pending-exactly-60-days-dropped-then-enrolled", (server(M),),
         pending=(pend(7, M, 60 * DAY),),
         actions=(act(Kind.DROP_STALE_REQUEST, "5:stale", "Machine", request_id=7),
                  act(Kind.ENROLL, "6b:missing", "Machine", new_request=True))),
    Case("pending-renewal-blocks-duplicate-renewal", (server(M),),
         certs=(cert("c1", M, left=DUE),), pending=(pend(7, M, DAY, renewal_of="c1"),),
         actions=(act(Kind.POLL_PENDING, "5:poll", "Machine", "c1", request_id=7),),
         notes=(note("6a:pending", "Machine", "c1"),)),
    Case("stale-renewal-request-dropped-then-renewed", (server(M),),
         certs=(cert("c1", M, left=DUE),), pending=(pend(7, M, 61 * DAY, renewal_of="c1"),),
         actions=(act(Kind.DROP_STALE_REQUEST, "5:stale", "Machine", "c1", request_id=7),
                  act(Kind.RENEW, "6a:threshold", "Machine", "c1"))),
    Case("pending-blocks-manual-renewal", (server(WEB),),
         certs=(manual("m1", WEB, left=DUE),), pending=(pend(3, WEB, DAY, renewal_of="m1"),),
         actions=(act(Kind.POLL_PENDING, "5:poll", "WebServer", "m1", request_id=3),),
         notes=(note("6c:pending", "WebServer", "m1"),)),
    Case("pending-blocks-new-request-after-expiry", (server(M),),
         certs=(cert("c1", M, left=-DAY),), pending=(pend(3, M, DAY),),
         actions=(act(Kind.POLL_PENDING, "5:poll", "Machine", request_id=3),),
         notes=(note("6b:pending", "Machine"),)),
    # 6(a) Renewal threshold ---------------------------------------------------------------------
    Case("renew-at-exactly-the-renewal-period", (server(M),),
         certs=(cert("c1", M, left=DUE),),
         actions=(act(Kind.RENEW, "6a:threshold", "Machine", "c1", issuers=("CA1",), policy_url=URL_A,
                      replaces=("c1",), replace_action="renew", new_request=False),)),
    Case("nothing-one-second-before-the-renewal-period", (server(M),),
         certs=(cert("c1", M, left=NOT_DUE),)),
    Case("renew-at-exactly-80-percent-when-it-comes-first", (server(HUNDRED),),
         certs=(cert("c1", HUNDRED, lifetime=100 * DAY, left=20 * DAY),),
         actions=(act(Kind.RENEW, "6a:threshold", "Hundred", "c1"),)),
    Case("nothing-one-second-before-80-percent", (server(HUNDRED),),
         certs=(cert("c1", HUNDRED, lifetime=100 * DAY, left=20 * DAY + SECOND),)),
    Case("long-renewal-period-waits-nothing-at-day-7-of-10", (server(SHORT),),
         certs=(cert("c1", SHORT, lifetime=10 * DAY, left=3 * DAY),)),
    Case("long-renewal-period-waits-nothing-a-second-before-day-8", (server(SHORT),),
         certs=(cert("c1", SHORT, lifetime=10 * DAY, left=2 * DAY + SECOND),)),
    Case("long-renewal-period-renews-at-exactly-day-8-of-10", (server(SHORT),),
         certs=(cert("c1", SHORT, lifetime=10 * DAY, left=2 * DAY),),
         actions=(act(Kind.RENEW, "6a:threshold", "Short", "c1"),)),
    Case("renew-at-the-last-valid-instant", (server(M),),
         certs=(cert("c1", M, left=dt.timedelta(0)),),
         actions=(act(Kind.RENEW, "6a:threshold", "Machine", "c1", new_request=False),)),
    Case("only-the-newest-copy-carries-the-template", (server(M),),
         certs=(cert("c-old", M, left=DAY), cert("c-new", M, left=300 * DAY))),
    Case("renewal-waits-while-another-copy-is-not-due", (server(M),),
         certs=(cert("c-long", M, left=DUE), cert("c-short", M, lifetime=100 * DAY, left=30 * DAY))),
    Case("major-version-renewal-not-needed-beside-a-current-copy", (server(tpl("Machine", major_version=3)),),
         certs=(cert("c-old", M, left=300 * DAY, major_version=2), cert("c-cur", M, left=200 * DAY, major_version=3))),
    Case("certificate-without-template-ignored", (server(M),),
         certs=(cert("c0", None, left=DAY), cert("c1", M)), no_notes=("6a:no-template",)),
    Case("certificate-of-unknown-template-noted", (server(M),),
         certs=(cert("c0", tpl("Gone"), left=DAY), cert("c1", M)),
         notes=(note("6a:no-template", "Gone", "c0"),)),
    Case("additional-store-only-monitored", (server(M),),
         certs=(cert("x1", M, left=DAY, store="/etc/ssl/extra"),),
         actions=(act(Kind.ENROLL, "6b:missing", "Machine", replaces=()),)),
    # 6(a) Forced re-enrollment -----------------------------------------------------------------
    Case("major-version-raised-renews-early", (server(tpl("Machine", major_version=3)),),
         certs=(cert("c1", M, left=300 * DAY, major_version=2),),
         actions=(act(Kind.RENEW, "6a:major-version", "Machine", "c1", replaces=("c1",)),)),
    Case("minor-version-raised-does-not", (server(tpl("Machine", minor_version=5)),),
         certs=(cert("c1", M, left=300 * DAY, minor_version=0),)),
    Case("template-major-version-lower-does-not", (server(M),),
         certs=(cert("c1", M, left=300 * DAY, major_version=3),)),
    # 6(a) Skip conditions / (b) matching conditions ----------------------------------------------
    Case("superseded-template-enrolls-its-successor", (server(T_OLD, T_NEW),),
         certs=(cert("t1", T_OLD, left=DUE),),
         actions=(act(Kind.ENROLL, "6b:supersede", "New", replaces=("t1",), replace_action="supersede",
                      new_request=True),),
         notes=(note("6a:superseded", "Old", "t1"),)),
    Case("superseded-template-replaced-before-its-threshold", (server(T_OLD, T_NEW),),
         certs=(cert("t1", T_OLD, left=300 * DAY),),
         actions=(act(Kind.ENROLL, "6b:supersede", "New", replaces=("t1",), replace_action="supersede"),)),
    Case("superseding-enrollment-replaces-every-certificate-of-the-old-template", (server(T_OLD, T_NEW),),
         certs=(cert("t1", T_OLD, left=300 * DAY), manual("t0", T_OLD, left=-DAY)),
         actions=(act(Kind.ENROLL, "6b:supersede", "New", replaces=("t0", "t1"), replace_action="supersede"),),
         notes=(note("6a:superseded", "Old", "t1"), note("6c:replaced", "Old", "t0"))),
    Case("superseded-template-not-enrolled-without-certificate", (server(T_OLD, T_NEW),),
         actions=(act(Kind.ENROLL, "6b:missing", "New", replaces=(), replace_action=None),)),
    Case("successor-without-autoenroll-right-old-keeps-renewing", (server(T_OLD, T_NEW_NO_RIGHT),),
         certs=(cert("t1", T_OLD, left=DUE),),
         actions=(act(Kind.RENEW, "6a:threshold", "Old", "t1"),), no_notes=("6a:superseded",)),
    Case("successor-without-issuer-old-keeps-renewing",
         (server(T_OLD, T_NEW, issuers=(issuer("CA1", "Old"),)),),
         certs=(cert("t1", T_OLD, left=DUE),),
         actions=(act(Kind.RENEW, "6a:threshold", "Old", "t1"),), no_notes=("6a:superseded",)),
    Case("no-autoenroll-right-never-renewed", (server(NO_AUTO),),
         certs=(cert("e1", NO_AUTO, left=DUE),), notes=(note("6a:no-autoenroll", "EnrollOnly", "e1"),)),
    Case("no-autoenroll-right-never-enrolled", (server(NO_AUTO),)),
    Case("read-only-right-never-enrolled", (server(tpl("ReadOnly", rights=READ_ONLY)),)),
    Case("no-issuer-for-template-not-renewed", (server(M, issuers=(issuer("CA1", "Other"),)),),
         certs=(cert("c1", M, left=DUE),), notes=(note("6a:no-issuer", "Machine", "c1"),)),
    Case("ra-0-enrolls", (server(M),), actions=(act(Kind.ENROLL, "6b:missing", "Machine"),)),
    Case("ra-1-with-ra-certificate-enrolls", (server(RA1),), certs=(ra_cert(),),
         actions=(act(Kind.ENROLL, "6b:missing", "RA1"),)),
    Case("ra-1-without-ra-certificate-skipped", (server(RA1),),
         notes=(note("6b:no-ra-certificate", "RA1"),)),
    Case("ra-1-with-expired-ra-certificate-skipped", (server(RA1),), certs=(ra_cert(left=-SECOND),),
         notes=(note("6b:no-ra-certificate", "RA1"),)),
    Case("ra-1-with-revoked-ra-certificate-skipped", (server(RA1),), certs=(ra_cert(revoked=True),),
         notes=(note("6b:no-ra-certificate", "RA1"),)),
    Case("ra-1-with-non-ra-certificate-skipped", (server(RA1, M),), certs=(cert("c1", M),),
         notes=(note("6b:no-ra-certificate", "RA1"),)),
    Case("ra-1-renewal-goes-ahead", (server(RA1),), certs=(cert("r1", RA1, left=DUE),),
         actions=(act(Kind.RENEW, "6a:threshold", "RA1", "r1"),)),
    Case("ra-2-certificate-not-renewed", (server(RA2),), certs=(cert("r2", RA2, left=DUE),),
         notes=(note("6a:ra-signatures", "RA2", "r2"),)),
    Case("ra-2-no-new-request", (server(RA2),), certs=(ra_cert(),),
         notes=(note("6b:ra-signatures", "RA2"),)),
    Case("ra-2-expired-certificate-no-new-request", (server(RA2),), certs=(cert("r2", RA2, left=-DAY), ra_cert()),
         notes=(note("6b:ra-signatures", "RA2"),)),
    Case("key-archival-without-kra-not-renewed", (server(KRA, kra_valid=False),),
         certs=(cert("k1", KRA, left=DUE),), notes=(note("6a:no-kra", "Archive", "k1"),)),
    Case("key-archival-without-kra-not-enrolled", (server(KRA, kra_valid=False),),
         notes=(note("6b:no-kra", "Archive"),)),
    Case("key-archival-with-kra-renewed", (server(KRA, kra_valid=True),),
         certs=(cert("k1", KRA, left=DUE),), actions=(act(Kind.RENEW, "6a:threshold", "Archive", "k1"),)),
    Case("key-archival-with-kra-enrolled", (server(KRA, kra_valid=True),),
         actions=(act(Kind.ENROLL, "6b:missing", "Archive"),)),
    Case("machine-template-with-user-interaction-not-renewed", (server(UI),),
         certs=(cert("u1", UI, left=DUE),), notes=(note("6a:user-interaction", "Interactive", "u1"),)),
    Case("machine-template-with-user-interaction-not-enrolled", (server(UI),),
         notes=(note("6b:user-interaction", "Interactive"),)),
    Case("user-context-with-user-interaction-renewed", (server(UI),), options=Options(context="user"),
         certs=(cert("u1", UI, left=DUE),), actions=(act(Kind.RENEW, "6a:threshold", "Interactive", "u1"),)),
    Case("user-context-with-user-interaction-enrolled", (server(UI),), options=Options(context="user"),
         actions=(act(Kind.ENROLL, "6b:missing", "Interactive"),)),
    Case("subject-in-request-not-renewed-silently", (server(SUBJ),),
         certs=(cert("s1", SUBJ, left=DUE),), notes=(note("6a:subject-required", "Subject", "s1"),)),
    Case("subject-in-request-not-enrolled", (server(SUBJ),), notes=(note("6b:subject-required", "Subject"),)),
    Case("subject-from-existing-renewed", (server(SUBJ_REUSE),),
         certs=(cert("s1", SUBJ_REUSE, left=DUE),), actions=(act(Kind.RENEW, "6a:threshold", "SubjectReuse", "s1"),)),
    Case("subject-from-existing-still-not-enrolled", (server(SUBJ_REUSE),),
         notes=(note("6b:subject-required", "SubjectReuse"),)),
    Case("directory-holds-valid-certificate", (server(DIR, directory=(("Directory", NOW + 10 * DAY),)),),
         notes=(note("6b:directory", "Directory"),)),
    Case("directory-certificate-at-its-last-valid-instant", (server(DIR, directory=(("Directory", NOW),)),),
         notes=(note("6b:directory", "Directory"),)),
    Case("directory-certificate-expired", (server(DIR, directory=(("Directory", NOW - SECOND),)),),
         actions=(act(Kind.ENROLL, "6b:missing", "Directory"),)),
    Case("directory-certificate-of-other-template", (server(DIR, directory=(("Machine", NOW + 10 * DAY),)),),
         actions=(act(Kind.ENROLL, "6b:missing", "Directory"),)),
    Case("directory-not-checked", (server(M, directory=(("Machine", NOW + 10 * DAY),)),),
         actions=(act(Kind.ENROLL, "6b:missing", "Machine"),)),
    # Revoked, failed validation, expired: a new request, never a renewal --------------------------
    Case("revoked-certificate-replaced-by-new-request", (server(M),),
         certs=(cert("c1", M, left=DUE, revoked=True),),
         actions=(act(Kind.ENROLL, "6b:missing", "Machine", replaces=("c1",), replace_action="renew",
                      new_request=True),)),
    Case("chain-validation-failure-new-request", (server(M),),
         certs=(cert("c1", M, left=300 * DAY, chain_valid=False),),
         actions=(act(Kind.ENROLL, "6b:missing", "Machine", replaces=("c1",), new_request=True),)),
    Case("expired-autoenroll-certificate-new-request", (server(M),),
         certs=(cert("c1", M, left=-SECOND),),
         actions=(act(Kind.ENROLL, "6b:missing", "Machine", replaces=("c1",), replace_action="renew",
                      new_request=True),)),
    Case("archived-certificate-is-not-holding-the-template", (server(M),),
         certs=(cert("c1", M, archived=True),),
         actions=(act(Kind.ENROLL, "6b:missing", "Machine", replaces=(), replace_action=None),)),
    # 6(b) Issuer choice -------------------------------------------------------------------------
    Case("issuer-lowest-cost-first-next-as-fallback",
         (server(M, issuers=(issuer("CA-hi", "Machine", cost=5), issuer("CA-lo", "Machine", cost=1))),),
         actions=(act(Kind.ENROLL, "6b:missing", "Machine", issuers=("CA-lo", "CA-hi")),)),
    Case("unreachable-issuer-sorted-after-reachable",
         (server(M, issuers=(issuer("CA-hi", "Machine", cost=5),
                             issuer("CA-lo", "Machine", cost=1, reachable=False))),),
         actions=(act(Kind.ENROLL, "6b:missing", "Machine", issuers=("CA-hi", "CA-lo")),)),
    Case("invalid-issuer-never-used",
         (server(M, issuers=(issuer("CA-hi", "Machine", cost=5), issuer("CA-lo", "Machine", cost=1, valid=False))),),
         certs=(cert("c1", M, left=DUE),),
         actions=(act(Kind.RENEW, "6a:threshold", "Machine", "c1", issuers=("CA-hi",)),)),
    Case("only-invalid-issuer-nothing-enrolled",
         (server(M, issuers=(issuer("CA-lo", "Machine", valid=False),)),), no_notes=("6b:missing",)),
    Case("renewal-only-issuer-listed-for-renewal",
         (server(M, issuers=(issuer("RO", "Machine", cost=0, renewal_only=True), issuer("CA", "Machine", cost=5))),),
         certs=(cert("c1", M, left=DUE),),
         actions=(act(Kind.RENEW, "6a:threshold", "Machine", "c1", issuers=("RO", "CA")),)),
    Case("renewal-only-issuer-never-for-new-requests",
         (server(M, issuers=(issuer("RO", "Machine", cost=0, renewal_only=True), issuer("CA", "Machine", cost=5))),),
         actions=(act(Kind.ENROLL, "6b:missing", "Machine", issuers=("CA",)),)),
    Case("renewal-only-issuer-alone-no-new-request",
         (server(M, issuers=(issuer("RO", "Machine", renewal_only=True),)),),
         certs=(cert("c1", M, left=-DAY),), notes=(note("6b:no-issuer", "Machine"),)),
    Case("default-policy-preferred-for-new-requests",
         (server(M, policy_id="pol-a", cost=1, is_default=False, issuers=(issuer("CA-a", "Machine", cost=0),)),
          server(M, policy_id="pol-b", cost=5, is_default=True, issuers=(issuer("CA-b", "Machine", cost=9),))),
         actions=(act(Kind.ENROLL, "6b:missing", "Machine", issuers=("CA-b", "CA-a"), policy_url=URL_B),)),
    Case("renewal-uses-the-certificates-own-policy-first",
         (server(M, policy_id="pol-a", cost=1, is_default=False, issuers=(issuer("CA-a", "Machine", cost=0),)),
          server(M, policy_id="pol-b", cost=5, is_default=True, issuers=(issuer("CA-b", "Machine", cost=9),))),
         certs=(cert("c1", M, left=DUE, policy_id="pol-b"),),
         actions=(act(Kind.RENEW, "6a:threshold", "Machine", "c1", issuers=("CA-b", "CA-a"), policy_url=URL_B),)),
    Case("renewal-of-certificate-of-cheaper-policy",
         (server(M, policy_id="pol-a", cost=1, is_default=False, issuers=(issuer("CA-a", "Machine", cost=0),)),
          server(M, policy_id="pol-b", cost=5, is_default=True, issuers=(issuer("CA-b", "Machine", cost=9),))),
         certs=(cert("c1", M, left=DUE, policy_id="pol-a"),),
         actions=(act(Kind.RENEW, "6a:threshold", "Machine", "c1", issuers=("CA-a", "CA-b"), policy_url=URL_A),)),
    Case("default-policy-without-issuer-falls-back-to-other-policy",
         (server(M, policy_id="pol-a", cost=1, is_default=True, issuers=(issuer("CA-a", "Other"),)),
          server(M, policy_id="pol-b", cost=5, is_default=False, issuers=(issuer("CA-b", "Machine", cost=9),))),
         actions=(act(Kind.ENROLL, "6b:missing", "Machine", issuers=("CA-b",), policy_url=URL_B),)),
    Case("two-policy-servers-different-templates",
         (server(tpl("A1"), policy_id="pol-a", cost=1, issuers=(issuer("CA-a", "A1", cost=3),)),
          server(tpl("B1"), policy_id="pol-b", cost=2, is_default=False, issuers=(issuer("CA-b", "B1", cost=0),))),
         actions=(act(Kind.ENROLL, "6b:missing", "A1", issuers=("CA-a",), policy_url=URL_A),
                  act(Kind.ENROLL, "6b:missing", "B1", issuers=("CA-b",), policy_url=URL_B))),
    Case("without-a-default-the-cheapest-policy-group-comes-first",
         (server(M, policy_id="pol-a", cost=2, is_default=False, issuers=(issuer("CA-a", "Machine", cost=0),)),
          server(M, policy_id="pol-b", cost=1, is_default=False, issuers=(issuer("CA-b", "Machine", cost=9),))),
         actions=(act(Kind.ENROLL, "6b:missing", "Machine", issuers=("CA-b", "CA-a"), policy_url=URL_B),)),
    Case("equal-cost-groups-ordered-by-authentication-strength",
         (server(M, policy_id="pol-a", cost=1, auth="password", is_default=False,
                 issuers=(issuer("CA-a", "Machine", cost=0),)),
          server(M, policy_id="pol-b", cost=1, auth="certificate", is_default=False,
                 issuers=(issuer("CA-b", "Machine", cost=9),))),
         actions=(act(Kind.ENROLL, "6b:missing", "Machine", issuers=("CA-b", "CA-a"), policy_url=URL_B),)),
    Case("servers-of-one-policy-id-form-one-group",
         (server(M, policy_id="pol-a", url="https://one.example/cep", auth="certificate",
                 issuers=(issuer("CA-1", "Machine", cost=5),)),
          server(M, policy_id="pol-a", url="https://two.example/cep", auth="token",
                 issuers=(issuer("CA-2", "Machine", cost=1),))),
         actions=(act(Kind.ENROLL, "6b:missing", "Machine", issuers=("CA-2", "CA-1"),
                      policy_url="https://two.example/cep"),)),
    # 6(c) Manually enrolled certificates ---------------------------------------------------------
    Case("manual-expired-new-request-from-its-subject", (server(WEB),),
         certs=(manual("m1", WEB, left=-SECOND),),
         actions=(act(Kind.RENEW_MANUAL, "6c:expired", "WebServer", "m1", new_request=True, subject_from="m1",
                      replaces=("m1",), issuers=("CA1",)),)),
    Case("manual-at-threshold-renewed", (server(WEB),), certs=(manual("m1", WEB, left=DUE),),
         actions=(act(Kind.RENEW_MANUAL, "6c:threshold", "WebServer", "m1", new_request=False, subject_from=None,
                      replaces=("m1",), replace_action="renew"),)),
    Case("manual-one-second-before-threshold", (server(WEB),), certs=(manual("m1", WEB, left=NOT_DUE),)),
    Case("manual-with-newer-valid-certificate", (server(WEB),),
         certs=(manual("m1", WEB, left=DUE), manual("m2", WEB, left=300 * DAY)),
         notes=(note("6c:newer", "WebServer", "m1"),)),
    Case("manual-expired-with-another-valid-certificate", (server(WEB),),
         certs=(manual("m1", WEB, left=-DAY, lifetime=30 * DAY), manual("m2", WEB, left=100 * DAY, lifetime=2 * YEAR)),
         notes=(note("6c:newer", "WebServer", "m1"),)),
    Case("two-expired-manual-certificates-one-new-request", (server(WEB),),
         certs=(manual("m1", WEB, left=-2 * DAY), manual("m2", WEB, left=-DAY)),
         actions=(act(Kind.RENEW_MANUAL, "6c:expired", "WebServer", "m2", subject_from="m2",
                      replaces=("m1", "m2")),)),
    Case("manual-expired-of-autoenrollable-template-enrolled-once", (server(M),),
         certs=(manual("m1", M, left=-DAY),),
         actions=(act(Kind.ENROLL, "6b:missing", "Machine", replaces=("m1",)),)),
    Case("manual-revoked-new-request", (server(WEB),), certs=(manual("m1", WEB, left=DUE, revoked=True),),
         actions=(act(Kind.RENEW_MANUAL, "6c:revoked", "WebServer", "m1", new_request=True, subject_from="m1"),)),
    Case("manual-without-autoenroll-right", (server(manual_tpl("WebServer", rights=ENROLL_ONLY)),),
         certs=(manual("m1", WEB, left=DUE),), notes=(note("6c:no-autoenroll", "WebServer", "m1"),)),
    Case("manual-key-archival-without-kra",
         (server(manual_tpl("WebServer", archive_private_key=True), kra_valid=False),),
         certs=(manual("m1", WEB, left=DUE),), notes=(note("6c:no-kra", "WebServer", "m1"),)),
    Case("manual-key-archival-with-kra",
         (server(manual_tpl("WebServer", archive_private_key=True), kra_valid=True),),
         certs=(manual("m1", WEB, left=DUE),), actions=(act(Kind.RENEW_MANUAL, "6c:threshold", "WebServer", "m1"),)),
    Case("manual-subject-required-without-reuse",
         (server(manual_tpl("WebServer", renewal_subject_from_existing=False)),),
         certs=(manual("m1", WEB, left=DUE),), notes=(note("6c:subject-required", "WebServer", "m1"),)),
    Case("manual-user-interaction-machine", (server(manual_tpl("WebServer", user_interaction=True)),),
         certs=(manual("m1", WEB, left=DUE),), notes=(note("6c:user-interaction", "WebServer", "m1"),)),
    Case("manual-user-interaction-user", (server(manual_tpl("WebServer", user_interaction=True)),),
         options=Options(context="user"), certs=(manual("m1", WEB, left=DUE),),
         actions=(act(Kind.RENEW_MANUAL, "6c:threshold", "WebServer", "m1"),)),
    Case("manual-ra-2-without-ra-certificate", (server(manual_tpl("WebServer", ra_signatures=2)),),
         certs=(manual("m1", WEB, left=DUE),), notes=(note("6c:ra-signatures", "WebServer", "m1"),)),
    Case("manual-ra-2-with-ra-certificate", (server(manual_tpl("WebServer", ra_signatures=2)),),
         certs=(manual("m1", WEB, left=DUE), ra_cert()),
         actions=(act(Kind.RENEW_MANUAL, "6c:threshold", "WebServer", "m1"),)),
    Case("manual-expired-only-renewal-only-issuer",
         (server(WEB, issuers=(issuer("RO", "WebServer", renewal_only=True),)),),
         certs=(manual("m1", WEB, left=-DAY),), notes=(note("6c:renewal-only", "WebServer", "m1"),)),
    Case("manual-due-renewal-only-issuer-renews",
         (server(WEB, issuers=(issuer("RO", "WebServer", renewal_only=True),)),),
         certs=(manual("m1", WEB, left=DUE),),
         actions=(act(Kind.RENEW_MANUAL, "6c:threshold", "WebServer", "m1", issuers=("RO",)),)),
    Case("manual-expired-no-valid-issuer", (server(WEB, issuers=(issuer("CA1", "WebServer", valid=False),)),),
         certs=(manual("m1", WEB, left=-DAY),), notes=(note("6c:no-issuer", "WebServer", "m1"),),
         no_notes=("6c:renewal-only",)),
    # Cleanup -------------------------------------------------------------------------------------
    Case("archived-encryption-certificates-never-deleted", (server(ENC_DELETE),),
         certs=(cert("e-exp", ENC_DELETE, archived=True, left=-DAY), cert("e-rev", ENC_DELETE, archived=True,
                                                                            revoked=True),
                cert("e-cur", ENC_DELETE))),
    Case("archived-sign-and-encrypt-certificates-never-deleted", (server(BOTH_DELETE),),
         certs=(cert("b-exp", BOTH_DELETE, archived=True, left=-DAY), cert("b-cur", BOTH_DELETE))),
    Case("delete-template-deletes-archived-expired", (server(SIG_DELETE),),
         certs=(cert("s-old", SIG_DELETE, archived=True, left=-SECOND), cert("s-cur", SIG_DELETE)),
         actions=(act(Kind.DELETE, "cleanup:delete", "Sign", "s-old"),)),
    Case("delete-template-deletes-archived-revoked", (server(SIG_DELETE),),
         certs=(cert("s-old", SIG_DELETE, archived=True, revoked=True, left=100 * DAY), cert("s-cur", SIG_DELETE)),
         actions=(act(Kind.DELETE, "cleanup:delete", "Sign", "s-old"),)),
    Case("delete-template-keeps-archived-until-expiry", (server(SIG_DELETE),),
         certs=(cert("s-old", SIG_DELETE, archived=True, left=dt.timedelta(0)), cert("s-cur", SIG_DELETE))),
    Case("archive-template-keeps-archived-expired", (server(SIG_ARCHIVE),),
         certs=(cert("k-old", SIG_ARCHIVE, archived=True, left=-DAY, revoked=True), cert("k-cur", SIG_ARCHIVE))),
    Case("replacing-expired-certificate-of-delete-template-deletes-it", (server(SIG_DELETE),),
         certs=(cert("s1", SIG_DELETE, left=-DAY),),
         actions=(act(Kind.ENROLL, "6b:missing", "Sign", replaces=("s1",), delete_replaced=("s1",)),)),
    Case("renewing-valid-certificate-of-delete-template-archives-it", (server(SIG_DELETE),),
         certs=(cert("s1", SIG_DELETE, left=DUE),),
         actions=(act(Kind.RENEW, "6a:threshold", "Sign", "s1", replaces=("s1",), delete_replaced=()),)),
    Case("replacing-expired-encryption-certificate-archives-it", (server(ENC_DELETE),),
         certs=(cert("e1", ENC_DELETE, left=-DAY),),
         actions=(act(Kind.ENROLL, "6b:missing", "Encrypt", replaces=("e1",), delete_replaced=()),)),
    Case("issued-renewal-of-expired-certificate-of-delete-template-deletes-it", (server(SIG_DELETE),),
         certs=(cert("s1", SIG_DELETE, left=-DAY),), pending=(pend(4, SIG_DELETE, 3 * DAY, renewal_of="s1"),),
         actions=(act(Kind.POLL_PENDING, "5:poll", "Sign", "s1", delete_replaced=("s1",)),)),
]


def test_case_ids_are_unique() -> None:
    ids = [case.id for case in CASES]
    assert len(ids) == len(set(ids))


def _matches(obj: Action | Note, expected: Expect) -> bool:
    return all(getattr(obj, key) == value for key, value in expected.items())


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_plan(case: Case) -> None:
    result = run(case)
    got = [{key: getattr(action, key) for key in expected} for action, expected in zip(result.actions, case.actions,
                                                                                      strict=False)]
    assert len(result.actions) == len(case.actions), f"planned {[a.to_dict() for a in result.actions]}"
    assert got == list(case.actions)
    for expected in case.notes:
        assert any(_matches(n, expected) for n in result.notes), f"{expected} not among {result.notes}"
    for rule in case.no_notes:
        assert all(n.rule != rule for n in result.notes), f"{rule} among {result.notes}"
    if case.all_notes is not None:
        assert tuple(n.rule for n in result.notes) == case.all_notes


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_second_pulse_of_case_is_quiet(case: Case) -> None:
    first = run(case)
    after = simulate(first, case.servers, case.store, case.now)
    second = plan(case.options, case.servers, after, case.now)
    assert second.actions == (), f"second pulse planned {[a.to_dict() for a in second.actions]}"


def test_every_action_names_a_rule_and_every_note_too() -> None:
    for case in CASES:
        result = run(case)
        assert all(a.rule for a in result.actions) and all(n.rule for n in result.notes)
        assert all(a.kind not in (Kind.SKIP, Kind.ARCHIVE) for a in result.actions)


# -- the executor, simulated ------------------------------------------------------------------


def _template_named(servers: Sequence[PolicyServer], name: str) -> TemplatePolicy:
    for srv in servers:
        found = srv.template(name)
        if found is not None:
            return found
    return tpl(name, major_version=0)  # the CA issued a template the policy no longer lists


def simulate(result: Plan, servers: Sequence[PolicyServer], store: StoreSnapshot, now: dt.datetime) -> StoreSnapshot:
    """Carry a plan out the way the executor does, with every request issued at once.

    RENEW / ENROLL / RENEW_MANUAL install a new certificate valid from ``now`` for the template's
    validity with its current versions, archiving what it replaces (deleting those the action
    says to delete); POLL_PENDING is answered "issued" and installs likewise, replacing the
    request's ``renewal_of``; DROP_STALE_REQUEST removes the request; DELETE removes the
    certificate.
    """
    certs = {c.thumbprint: c for c in store.certificates}
    pending = {p.request_id: p for p in store.pending}
    policy_of = {srv.url: srv.policy_id for srv in servers}

    def install(n: int, template_name: str, source: str, policy_id: str | None, replaces: Sequence[str],
                delete: Sequence[str]) -> None:
        template = _template_named(servers, template_name)
        new = StoredCertificate(
            thumbprint=f"new{n:04d}", subject=f"CN=new-{template_name}", not_before=now,
            not_after=now + template.validity, template_oid=template.oid, template_name=template.name,
            major_version=template.major_version, minor_version=template.minor_version,
            source="manual" if source == "manual" else "auto", policy_id=policy_id)
        for old in replaces:
            if old in delete:
                certs.pop(old, None)
            elif old in certs:
                certs[old] = dataclasses.replace(certs[old], archived=True)
        certs[new.thumbprint] = new

    for n, action in enumerate(result.actions):
        if action.kind is Kind.DROP_STALE_REQUEST:
            assert action.request_id is not None
            del pending[action.request_id]
        elif action.kind is Kind.POLL_PENDING:
            assert action.request_id is not None
            request = pending.pop(action.request_id)
            old = certs.get(request.renewal_of or "")
            install(n, request.template, old.source if old else "auto", policy_of.get(request.policy_url),
                    (request.renewal_of,) if request.renewal_of else (), action.delete_replaced)
        elif action.kind in (Kind.RENEW, Kind.ENROLL, Kind.RENEW_MANUAL):
            assert action.template is not None
            old = certs.get(action.thumbprint or "")
            policy_id = old.policy_id if old is not None else policy_of.get(action.policy_url or "")
            install(n, action.template, "manual" if action.kind is Kind.RENEW_MANUAL else "auto", policy_id,
                    action.replaces, action.delete_replaced)
        elif action.kind is Kind.DELETE:
            assert action.thumbprint is not None
            del certs[action.thumbprint]
        else:
            raise AssertionError(f"the planner is not expected to plan {action.kind}")
    return StoreSnapshot(certificates=tuple(certs.values()), pending=tuple(pending.values()),
                         in_flight=store.in_flight)  # unanswered: still in flight


# -- properties -------------------------------------------------------------------------------

PROPERTY_SETTINGS = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@PROPERTY_SETTINGS
@given(
    lifetime=st.integers(min_value=1_000_000, max_value=20 * 365 * 86_400 * 1_000_000),
    period=st.integers(min_value=-5 * 365 * 86_400, max_value=50 * 365 * 86_400),
    start=st.integers(min_value=-10 * 365 * 86_400, max_value=10 * 365 * 86_400),
)
def test_renewal_time_lies_within_validity(lifetime: int, period: int, start: int) -> None:
    """For any lifetime of a second or more and any renewal period (even a nonsensical negative one)."""
    template = tpl("T", renewal_period=dt.timedelta(seconds=period))
    not_before = NOW + dt.timedelta(seconds=start)
    c = cert("c", template, lifetime=dt.timedelta(microseconds=lifetime))
    c = dataclasses.replace(c, not_before=not_before, not_after=not_before + dt.timedelta(microseconds=lifetime))
    due = renewal_time(c, template)
    assert c.not_before <= due <= c.not_after
    assert due >= c.not_after - c.lifetime / 5  # never before 80 % of the lifetime
    assert threshold_reached(c, template, due)
    assert not threshold_reached(c, template, due - dt.timedelta(microseconds=1))


NAMES = ("A", "B", "C", "D")
POLICY_IDS = ("pol-a", "pol-b")


@dataclasses.dataclass(frozen=True)
class World:
    options: Options
    servers: tuple[PolicyServer, ...]
    store: StoreSnapshot


def _seconds(draw: st.DrawFn, low: int, high: int) -> dt.timedelta:
    return dt.timedelta(seconds=draw(st.integers(min_value=low, max_value=high)))


@st.composite
def templates_for(draw: st.DrawFn, names: Sequence[str]) -> list[TemplatePolicy]:
    """About half the templates are plainly set up for autoenrollment; the rest vary every setting."""
    templates: list[TemplatePolicy] = []
    for i, name in enumerate(names):
        common: dict[str, Any] = {
            "major_version": draw(st.integers(0, 3)), "minor_version": draw(st.integers(0, 2)),
            "validity": _seconds(draw, 1, 3 * 365 * 86_400),
            "renewal_period": _seconds(draw, 0, 400 * 86_400),
            "purpose": draw(st.sampled_from(("signature", "encryption", "both"))),
            "supersedes": tuple(draw(st.lists(st.sampled_from(names[:i]), unique=True, max_size=2))) if i else (),
            "old_certificate": draw(st.sampled_from(("archive", "delete"))),
        }
        if not draw(st.booleans()):
            common.update(
                archive_private_key=draw(st.booleans()),
                subject_source=draw(st.sampled_from(("principal", "request"))),
                renewal_subject_from_existing=draw(st.booleans()),
                ra_signatures=draw(st.sampled_from((0, 1, 2))),
                user_interaction=draw(st.booleans()),
                check_directory=draw(st.booleans()),
                rights=draw(st.sampled_from((ALL_RIGHTS, ENROLL_ONLY, READ_ONLY))))
        templates.append(tpl(name, **common))
    return templates


def _times(draw: st.DrawFn, template: TemplatePolicy | None) -> tuple[dt.datetime, dt.datetime]:
    """Validity of a stored certificate, often on or next to a boundary the planner cares about."""
    own = template is not None and draw(st.booleans())
    lifetime = template.validity if template is not None and own else _seconds(draw, 1, 3 * 365 * 86_400)
    window = min(template.renewal_period, lifetime / 5) if template else lifetime / 5
    boundaries = st.sampled_from((window, window + SECOND, window - SECOND, dt.timedelta(0), -SECOND, lifetime))
    anywhere = st.builds(lambda s: dt.timedelta(seconds=s), st.integers(-400 * 86_400, 3 * 365 * 86_400))
    left = draw(st.one_of(boundaries, boundaries, anywhere))
    left = min(left, lifetime + 10 * DAY)  # not issued more than ten days in the future
    return NOW + left - lifetime, NOW + left


@st.composite
def worlds(draw: st.DrawFn) -> World:
    names = draw(st.lists(st.sampled_from(NAMES), min_size=1, max_size=len(NAMES), unique=True))
    templates = draw(templates_for(names))
    servers: list[PolicyServer] = []
    issuer_names: list[str] = []
    for s in range(draw(st.integers(1, 3))):
        issuers = []
        for j in range(draw(st.integers(1, 2))):
            name = f"CA{s}{j}"
            issuer_names.append(name)
            served = draw(st.one_of(st.just(set(names)), st.sets(st.sampled_from(names))))
            issuers.append(issuer(
                name, *sorted(served), cost=draw(st.integers(0, 3)),
                renewal_only=draw(st.sampled_from((False, False, False, True))),
                valid=draw(st.sampled_from((True, True, True, False))), reachable=draw(st.booleans())))
        listed = [t for t in templates if draw(st.sampled_from((True, True, False)))] or templates[:1]
        servers.append(server(
            *listed, issuers=issuers, policy_id=draw(st.sampled_from(POLICY_IDS)), url=f"https://s{s}.example/cep",
            cost=draw(st.integers(0, 3)), auth=draw(st.sampled_from(("certificate", "token", "password"))),
            is_default=draw(st.booleans()), kra_valid=draw(st.sampled_from((True, True, False))),
            directory=[(draw(st.sampled_from(names)), NOW + _seconds(draw, -30 * 86_400, 30 * 86_400))
                       for _ in range(draw(st.integers(0, 2)))]))
    by_name = {t.name: t for t in templates}
    certs: list[StoredCertificate] = []
    for i in range(draw(st.integers(0, 6))):
        choice = draw(st.sampled_from((*names, *names, "Z", None)))
        template = by_name.get(choice) if choice in by_name else (tpl("Z") if choice == "Z" else None)
        not_before, not_after = _times(draw, template)
        major = template.major_version if template else 0
        c = cert(f"{i:02d}" * 20, template)
        certs.append(dataclasses.replace(
            c, not_before=not_before, not_after=not_after,
            major_version=draw(st.sampled_from((major, major, max(major - 1, 0), major + 1))),
            minor_version=draw(st.integers(0, 2)),
            source=draw(st.sampled_from(("auto", "auto", "manual"))),
            policy_id=draw(st.sampled_from((*[srv.policy_id for srv in servers], None))),
            archived=draw(st.sampled_from((False, False, False, True))),
            chain_valid=draw(st.sampled_from((True, True, True, True, False))),
            revoked=draw(st.sampled_from((False, False, False, False, True))),
            is_ra=draw(st.sampled_from((False, False, False, True))),
            store=draw(st.sampled_from(("personal", "personal", "personal", "/srv/extra")))))
    pending: list[PendingRequest] = []
    for r in range(draw(st.integers(0, 2))):
        age = draw(st.one_of(st.sampled_from((59 * DAY, 60 * DAY, 60 * DAY - SECOND)),
                             st.builds(lambda s: dt.timedelta(seconds=s), st.integers(0, 120 * 86_400))))
        template_name = draw(st.sampled_from(names))
        renewable = [c.thumbprint for c in certs if c.template_name == template_name]  # as the executor records it
        pending.append(PendingRequest(
            request_id=100 + r, template=template_name,
            issuer=draw(st.sampled_from(issuer_names)), policy_url=draw(st.sampled_from([s.url for s in servers])),
            submitted_at=NOW - age, renewal_of=draw(st.sampled_from((None, *renewable)))))
    options = Options(
        enabled=draw(st.sampled_from((True, True, True, True, False))),
        enroll=draw(st.sampled_from((True, True, False))), manage=draw(st.sampled_from((True, True, False))),
        retrieve_pending=draw(st.sampled_from((True, True, False))),
        context=draw(st.sampled_from(("machine", "user"))))
    return World(options, tuple(servers), StoreSnapshot(tuple(certs), tuple(pending)))


@PROPERTY_SETTINGS
@given(world=worlds())
def test_second_pulse_at_the_same_instant_plans_nothing(world: World) -> None:
    first = plan(world.options, world.servers, world.store, NOW)
    after = simulate(first, world.servers, world.store, NOW)
    second = plan(world.options, world.servers, after, NOW)
    assert second.actions == (), (
        f"first pulse: {[a.to_dict() for a in first.actions]}\nsecond pulse: {[a.to_dict() for a in second.actions]}")


@PROPERTY_SETTINGS
@given(world=worlds(), data=st.data())
def test_plan_does_not_depend_on_listing_order(world: World, data: st.DataObject) -> None:
    certs = data.draw(st.permutations(world.store.certificates), label="certificates")
    pending = data.draw(st.permutations(world.store.pending), label="pending")
    servers = data.draw(st.permutations(world.servers), label="servers")
    shuffled = StoreSnapshot(tuple(certs), tuple(pending))
    assert plan(world.options, servers, shuffled, NOW) == plan(world.options, world.servers, world.store, NOW)
