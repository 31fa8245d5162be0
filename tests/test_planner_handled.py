"""Which personal certificates the agent takes care of itself, table-driven.

The expiry monitor raises 1003 / 1002 only for certificates autoenrollment will not renew (the
seed), so the planner has to say which ones it will: a certificate it renews at its threshold,
one a superseding template replaces, and an older copy of a template that a newer valid
certificate holds. Each case is a world and the exact set of thumbprints taken care of.
"""

from __future__ import annotations

import dataclasses

import pytest

from certpulse.agent.model import Options, PolicyServer, StoredCertificate, StoreSnapshot
from certpulse.agent.planner import plan
from test_planner import (
    DAY,
    DUE,
    ENROLL_ONLY,
    KRA,
    NO_AUTO,
    NOW,
    RA2,
    SUBJ,
    SUBJ_REUSE,
    T_NEW,
    T_NEW_NO_RIGHT,
    T_OLD,
    UI,
    WEB,
    M,
    cert,
    issuer,
    manual,
    manual_tpl,
    ra_cert,
    server,
    tpl,
)

GONE = tpl("Gone")  # a template no policy lists any more


@dataclasses.dataclass(frozen=True)
class HandledCase:
    id: str
    servers: tuple[PolicyServer, ...]
    certs: tuple[StoredCertificate, ...]
    handled: frozenset[str]
    options: Options = dataclasses.field(default_factory=Options)


def handled(case: HandledCase) -> frozenset[str]:
    return plan(case.options, case.servers, StoreSnapshot(certificates=case.certs), NOW).handled


def _case(id: str, servers: tuple[PolicyServer, ...], certs: tuple[StoredCertificate, ...], handled: set[str],
          options: Options | None = None) -> HandledCase:
    return HandledCase(id, servers, certs, frozenset(handled), options or Options())


HANDLED_CASES: list[HandledCase] = [
    # Autoenrolled certificates: taken care of when 6(a) may renew them, due or not ------------------
    _case("auto-not-due", (server(M),), (cert("a", M),), {"a"}),
    _case("auto-due", (server(M),), (cert("a", M, left=DUE),), {"a"}),
    _case("auto-expired-is-replaced-by-6b", (server(M),), (cert("a", M, left=-DAY),), {"a"}),
    _case("auto-revoked-is-replaced-by-6b", (server(M),), (cert("a", M, left=DUE, revoked=True),), {"a"}),
    _case("auto-with-enroll-off", (server(M),), (cert("a", M, left=DUE),), set(), Options(enroll=False)),
    _case("auto-with-manage-off", (server(M),), (cert("a", M, left=DUE),), {"a"}, Options(manage=False)),
    _case("auto-no-autoenroll-right", (server(NO_AUTO),), (cert("a", NO_AUTO, left=DUE),), set()),
    _case("auto-no-issuer", (server(M, issuers=(issuer("CA1", "Other"),)),), (cert("a", M, left=DUE),), set()),
    _case("auto-only-invalid-issuer", (server(M, issuers=(issuer("CA1", "Machine", valid=False),)),),
          (cert("a", M, left=DUE),), set()),
    _case("auto-renewal-only-issuer-still-renews", (server(M, issuers=(issuer("RO", "Machine", renewal_only=True),)),),
          (cert("a", M, left=DUE),), {"a"}),
    _case("auto-key-archival-without-kra", (server(KRA, kra_valid=False),), (cert("a", KRA, left=DUE),), set()),
    _case("auto-key-archival-with-kra", (server(KRA, kra_valid=True),), (cert("a", KRA, left=DUE),), {"a"}),
    _case("auto-two-ra-signatures", (server(RA2),), (cert("a", RA2, left=DUE), ra_cert()), set()),
    _case("auto-subject-required", (server(SUBJ),), (cert("a", SUBJ, left=DUE),), set()),
    _case("auto-subject-from-existing", (server(SUBJ_REUSE),), (cert("a", SUBJ_REUSE, left=DUE),), {"a"}),
    _case("auto-user-interaction-on-a-machine", (server(UI),), (cert("a", UI, left=DUE),), set()),
    _case("auto-user-interaction-for-a-user", (server(UI),), (cert("a", UI, left=DUE),), {"a"},
          Options(context="user")),
    _case("auto-superseded-is-replaced-by-its-successor", (server(T_OLD, T_NEW),), (cert("a", T_OLD, left=DUE),),
          {"a"}),
    _case("auto-superseded-with-enroll-off", (server(T_OLD, T_NEW),), (cert("a", T_OLD, left=DUE),), set(),
          Options(enroll=False)),
    _case("auto-successor-out-of-reach-keeps-renewing", (server(T_OLD, T_NEW_NO_RIGHT),),
          (cert("a", T_OLD, left=DUE),), {"a"}),
    _case("auto-of-a-template-no-policy-lists", (server(M),), (cert("a", GONE, left=DUE),), set()),
    # Manually enrolled certificates: taken care of when 6(c)'s standing conditions allow it -------
    _case("manual-due", (server(WEB),), (manual("m", WEB, left=DUE),), {"m"}),
    _case("manual-with-manage-off", (server(WEB),), (manual("m", WEB, left=DUE),), set(), Options(manage=False)),
    _case("manual-with-enroll-off", (server(WEB),), (manual("m", WEB, left=DUE),), {"m"}, Options(enroll=False)),
    _case("manual-of-an-autoenroll-template", (server(M),), (manual("m", M, left=DUE),), {"m"}),
    _case("manual-without-autoenroll-right", (server(manual_tpl("WebServer", rights=ENROLL_ONLY)),),
          (manual("m", WEB, left=DUE),), set()),
    _case("manual-no-valid-issuer", (server(WEB, issuers=(issuer("CA1", "WebServer", valid=False),)),),
          (manual("m", WEB, left=DUE),), set()),
    # Today's rule looks for any issuer, renewal-only ones included, even for an expired certificate
    # (whose new request 6(c) cannot send to a renewal-only issuer: 6c:renewal-only).
    _case("manual-expired-with-only-a-renewal-only-issuer",
          (server(WEB, issuers=(issuer("RO", "WebServer", renewal_only=True),)),), (manual("m", WEB, left=-DAY),),
          {"m"}),
    _case("manual-key-archival-without-kra", (server(manual_tpl("WebServer", archive_private_key=True),
                                                     kra_valid=False),),
          (manual("m", WEB, left=DUE),), set()),
    _case("manual-subject-required-without-reuse", (server(manual_tpl("WebServer",
                                                                      renewal_subject_from_existing=False)),),
          (manual("m", WEB, left=DUE),), set()),
    _case("manual-user-interaction-on-a-machine", (server(manual_tpl("WebServer", user_interaction=True)),),
          (manual("m", WEB, left=DUE),), set()),
    _case("manual-user-interaction-for-a-user", (server(manual_tpl("WebServer", user_interaction=True)),),
          (manual("m", WEB, left=DUE),), {"m"}, Options(context="user")),
    _case("manual-two-ra-signatures-without-ra-certificate", (server(manual_tpl("WebServer", ra_signatures=2)),),
          (manual("m", WEB, left=DUE),), set()),
    _case("manual-two-ra-signatures-with-ra-certificate", (server(manual_tpl("WebServer", ra_signatures=2)),),
          (manual("m", WEB, left=DUE), ra_cert()), {"m"}),
    _case("manual-two-ra-signatures-with-revoked-ra-certificate",
          (server(manual_tpl("WebServer", ra_signatures=2)),), (manual("m", WEB, left=DUE), ra_cert(revoked=True)),
          set()),
    _case("manual-expired-is-renewed-from-its-subject", (server(WEB),), (manual("m", WEB, left=-DAY),), {"m"}),
    # A pending request is not a standing reason: the request, once issued, replaces it.
    _case("manual-with-a-pending-request", (server(WEB),), (manual("m", WEB, left=DUE),), {"m"}),
    # Older copies: a newer usable certificate of the template holds it, whatever the options -----
    _case("older-auto-copy", (server(M),), (cert("old", M, left=DAY), cert("new", M, left=300 * DAY)),
          {"old", "new"}),
    _case("older-auto-copy-with-enroll-off", (server(M),),
          (cert("old", M, left=DAY), cert("new", M, left=300 * DAY)), {"old"}, Options(enroll=False)),
    _case("older-copy-of-a-template-no-policy-lists", (server(M),),
          (cert("old", GONE, left=DAY), cert("new", GONE, left=300 * DAY)), {"old"}),
    _case("older-copy-of-a-template-without-autoenroll-right", (server(NO_AUTO),),
          (cert("old", NO_AUTO, left=DAY), cert("new", NO_AUTO, left=300 * DAY)), {"old"}),
    _case("older-manual-copy", (server(WEB),),
          (manual("old", WEB, left=DUE), manual("new", WEB, left=300 * DAY)), {"old", "new"}),
    _case("older-manual-copy-with-manage-off", (server(WEB),),
          (manual("old", WEB, left=DUE), manual("new", WEB, left=300 * DAY)), {"old"}, Options(manage=False)),
    _case("newer-copy-revoked-holds-nothing", (server(NO_AUTO),),
          (cert("old", NO_AUTO, left=DAY), cert("new", NO_AUTO, left=300 * DAY, revoked=True)), set()),
    _case("newer-copy-failing-validation-holds-nothing", (server(NO_AUTO),),
          (cert("old", NO_AUTO, left=DAY), cert("new", NO_AUTO, left=300 * DAY, chain_valid=False)), set()),
    _case("newer-copy-archived-holds-nothing", (server(NO_AUTO),),
          (cert("old", NO_AUTO, left=DAY), cert("new", NO_AUTO, left=300 * DAY, archived=True)), set()),
    _case("newer-copy-in-an-additional-store-holds-nothing", (server(NO_AUTO),),
          (cert("old", NO_AUTO, left=DAY), cert("new", NO_AUTO, left=300 * DAY, store="/etc/ssl/extra")), set()),
    _case("same-not-after-the-later-start-is-newer", (server(NO_AUTO),),
          (cert("short", NO_AUTO, left=DAY, lifetime=30 * DAY), cert("long", NO_AUTO, left=DAY)), {"long"}),
    # Never taken care of ---------------------------------------------------------------------------
    _case("no-template", (server(M),), (cert("x", None, left=DAY, source="manual"),
                                        cert("y", None, left=300 * DAY, source="manual")), set()),
    _case("archived", (server(M),), (cert("a", M, left=DUE, archived=True),), set()),
    _case("additional-store", (server(M),), (cert("a", M, left=DUE, store="/etc/ssl/extra"),), set()),
    _case("disabled", (server(M, WEB),), (cert("a", M, left=DUE), manual("m", WEB, left=DUE)), set(),
          Options(enabled=False)),
    # Which policy group decides ------------------------------------------------------------------
    # The certificate's own group, where the template is not applicable, gives way to the default.
    _case("template-applicable-in-another-group",
          (server(M, policy_id="pol-a", is_default=True),
           server(tpl("Machine", rights=ENROLL_ONLY), policy_id="pol-b", is_default=False)),
          (cert("b", M, left=DUE, policy_id="pol-b"),), {"b"}),
    _case("template-applicable-in-no-group",
          (server(NO_AUTO, policy_id="pol-a", is_default=True),
           server(NO_AUTO, policy_id="pol-b", is_default=False, issuers=())),
          (cert("b", NO_AUTO, left=DUE, policy_id="pol-b"),), set()),
]


def test_handled_case_ids_are_unique() -> None:
    ids = [case.id for case in HANDLED_CASES]
    assert len(ids) == len(set(ids))


@pytest.mark.parametrize("case", HANDLED_CASES, ids=[case.id for case in HANDLED_CASES])
def test_handled(case: HandledCase) -> None:
    assert handled(case) == case.handled
