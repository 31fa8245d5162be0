"""The planner's skip checks one by one, and the chains that compose them.

Each check is asked about a world built for it and must answer the exact skip (code and the
sentence the pulse report shows) or nothing. Each chain is then walked through a template that
fails every one of its checks: lifting the conditions one at a time in the seed's order, the
chain must name each in turn, since the first check that skips decides.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import pytest

from certpulse.agent import planner, rules
from certpulse.agent.model import Note, Options, PolicyServer, StoredCertificate, TemplatePolicy
from certpulse.agent.policy_view import CertIndex, PolicyView
from certpulse.agent.rules import (
    CLEANUP,
    ENROLL_NEW,
    RENEW_AUTO,
    RENEW_MANUAL,
    Chain,
    Check,
    RuleInput,
    Skip,
)
from test_planner import (
    ALL_RIGHTS,
    BOTH_DELETE,
    DAY,
    DIR,
    DUE,
    ENC_DELETE,
    ENROLL_ONLY,
    KRA,
    NO_AUTO,
    NOW,
    RA1,
    RA2,
    SECOND,
    SIG_ARCHIVE,
    SIG_DELETE,
    SUBJ,
    SUBJ_REUSE,
    T_NEW,
    T_NEW_NO_RIGHT,
    T_OLD,
    UI,
    WEB,
    M,
    issuer,
    manual,
    ra_cert,
    server,
    tpl,
)


def given(template: TemplatePolicy, *, servers: Sequence[PolicyServer] | None = None,
          certs: Sequence[StoredCertificate] = (), options: Options | None = None, pending: Sequence[str] = (),
          cert: StoredCertificate | None = None, replaced: Sequence[str] = ()) -> RuleInput:
    """The input a chain sees for ``template``, found in the policy the way the planner finds it."""
    view = PolicyView(servers if servers is not None else (server(template),))
    found = view.find(name=template.name)
    assert found is not None, f"{template.name} is in no policy"
    return RuleInput(options or Options(), view, found[0], found[1], CertIndex(certs, NOW), NOW,
                     frozenset(pending), cert, frozenset(replaced))


NEW_REQUESTS_ONLY_RO = (issuer("RO", "WebServer", renewal_only=True),)

# (id, check, input, the skip it must answer, or None)
CHECK_CASES: list[tuple[str, Check, Callable[[], RuleInput], Skip | None]] = [
    ("pending", rules.request_pending, lambda: given(M, pending=("Machine",)),
     Skip("pending", "a request for it is pending")),
    ("pending-other-template", rules.request_pending, lambda: given(M, pending=("Other",)), None),
    ("no-autoenroll", rules.no_autoenroll, lambda: given(NO_AUTO), Skip("no-autoenroll", "no autoenroll permission")),
    ("autoenroll", rules.no_autoenroll, lambda: given(M), None),
    ("no-issuer", rules.no_issuer, lambda: given(M, servers=(server(M, issuers=(issuer("CA1", "Other"),)),)),
     Skip("no-issuer", "no valid issuer serves the template")),
    ("no-issuer-invalid-one", rules.no_issuer,
     lambda: given(M, servers=(server(M, issuers=(issuer("CA1", "Machine", valid=False),)),)),
     Skip("no-issuer", "no valid issuer serves the template")),
    ("no-issuer-renewal-only-serves-a-renewal", rules.no_issuer,
     lambda: given(M, servers=(server(M, issuers=(issuer("RO", "Machine", renewal_only=True),)),)), None),
    ("no-issuer-other-group-does-not-count", rules.no_issuer,
     lambda: given(M, servers=(server(M, issuers=(issuer("CA1", "Other"),)),
                               server(tpl("Other"), policy_id="pol-b", is_default=False,
                                      issuers=(issuer("CB", "Machine"),)))),
     Skip("no-issuer", "no valid issuer serves the template")),
    ("new-request-renewal-only", rules.no_issuer_for_new_request,
     lambda: given(M, servers=(server(M, issuers=(issuer("RO", "Machine", renewal_only=True),)),)),
     Skip("no-issuer", "no issuer serves the template for new requests")),
    ("new-request-other-group-counts", rules.no_issuer_for_new_request,
     lambda: given(M, servers=(server(M, issuers=(issuer("RO", "Machine", renewal_only=True),)),
                               server(tpl("Other"), policy_id="pol-b", is_default=False,
                                      issuers=(issuer("CB", "Machine"),)))), None),
    ("manual-broken-renewal-only", rules.no_issuer_or_renewal_only,
     lambda: given(WEB, servers=(server(WEB, issuers=NEW_REQUESTS_ONLY_RO),), cert=manual("m", WEB, left=-DAY)),
     Skip("renewal-only", "only renewal-only issuers serve it, and this is a new request")),
    ("manual-due-renewal-only", rules.no_issuer_or_renewal_only,
     lambda: given(WEB, servers=(server(WEB, issuers=NEW_REQUESTS_ONLY_RO),), cert=manual("m", WEB, left=DUE)), None),
    ("manual-broken-no-valid-issuer", rules.no_issuer_or_renewal_only,
     lambda: given(WEB, servers=(server(WEB, issuers=(issuer("CA1", "WebServer", valid=False),)),),
                   cert=manual("m", WEB, left=-DAY)),
     Skip("no-issuer", "no valid issuer serves the template")),
    ("no-kra", rules.needs_kra, lambda: given(KRA, servers=(server(KRA, kra_valid=False),)),
     Skip("no-kra", "key archival required and no valid KRA certificate")),
    ("kra", rules.needs_kra, lambda: given(KRA, servers=(server(KRA, kra_valid=True),)), None),
    ("no-archival-no-kra-needed", rules.needs_kra, lambda: given(M, servers=(server(M, kra_valid=False),)), None),
    ("6a-ra-2", rules.ra_signatures_new_request_instead, lambda: given(RA2),
     Skip("ra-signatures", "2+ RA signatures required: a new request instead")),
    ("6a-ra-1", rules.ra_signatures_new_request_instead, lambda: given(RA1), None),
    ("6b-ra-2", rules.ra_signatures, lambda: given(RA2, certs=(ra_cert(),)),
     Skip("ra-signatures", "2+ RA signatures required")),
    ("6b-ra-1", rules.ra_signatures, lambda: given(RA1), None),
    ("ra-1-without-ra-certificate", rules.one_ra_without_ra_certificate, lambda: given(RA1),
     Skip("no-ra-certificate", "1 RA signature required and no RA certificate to co-sign")),
    ("ra-1-with-expired-ra-certificate", rules.one_ra_without_ra_certificate,
     lambda: given(RA1, certs=(ra_cert(left=-SECOND),)),
     Skip("no-ra-certificate", "1 RA signature required and no RA certificate to co-sign")),
    ("ra-1-with-ra-certificate", rules.one_ra_without_ra_certificate, lambda: given(RA1, certs=(ra_cert(),)), None),
    ("ra-2-is-not-one", rules.one_ra_without_ra_certificate, lambda: given(RA2), None),
    ("6c-ra-2-without-ra-certificate", rules.ra_signatures_without_ra_certificate, lambda: given(RA2),
     Skip("ra-signatures", "2+ RA signatures required and no RA certificate")),
    ("6c-ra-2-with-ra-certificate", rules.ra_signatures_without_ra_certificate,
     lambda: given(RA2, certs=(ra_cert(),)), None),
    ("subject-required", rules.subject_required, lambda: given(SUBJ),
     Skip("subject-required", "the subject must be supplied and may not come from the old certificate")),
    ("subject-from-existing", rules.subject_required, lambda: given(SUBJ_REUSE), None),
    ("subject-supplied", rules.subject_supplied, lambda: given(SUBJ_REUSE),
     Skip("subject-required", "the subject must be supplied: enroll by hand (cert request)")),
    ("subject-from-principal", rules.subject_supplied, lambda: given(M), None),
    ("user-interaction-machine", rules.user_interaction_on_machine, lambda: given(UI),
     Skip("user-interaction", "a machine template that requires user interaction")),
    ("user-interaction-user", rules.user_interaction_on_machine, lambda: given(UI, options=Options(context="user")),
     None),
    ("superseded", rules.superseded, lambda: given(T_OLD, servers=(server(T_OLD, T_NEW),)),
     Skip("superseded", "superseded by 'New'")),
    ("successor-out-of-reach", rules.superseded, lambda: given(T_OLD, servers=(server(T_OLD, T_NEW_NO_RIGHT),)),
     None),
    ("directory", rules.published_in_directory,
     lambda: given(DIR, servers=(server(DIR, directory=(("Directory", NOW),)),)),
     Skip("directory", "a valid certificate is already published in the directory")),
    ("directory-expired", rules.published_in_directory,
     lambda: given(DIR, servers=(server(DIR, directory=(("Directory", NOW - SECOND),)),)), None),
    ("directory-not-checked", rules.published_in_directory,
     lambda: given(M, servers=(server(M, directory=(("Machine", NOW + DAY),)),)), None),
    ("replaced", rules.replaced_by_new_request,
     lambda: given(WEB, cert=manual("m", WEB, left=-DAY), replaced=("m",)),
     Skip("replaced", "a request planned in 6(b) replaces it")),
    ("not-replaced", rules.replaced_by_new_request,
     lambda: given(WEB, cert=manual("m", WEB, left=-DAY), replaced=("other",)), None),
    ("newer-copy", rules.newer_valid_copy,
     lambda: given(WEB, cert=manual("m1", WEB, left=DUE),
                   certs=(manual("m1", WEB, left=DUE), manual("m2", WEB, left=300 * DAY))),
     Skip("newer", "another valid certificate of the template is in the store (m2)")),
    ("broken-beside-an-older-valid-copy", rules.newer_valid_copy,
     lambda: given(WEB, cert=manual("m1", WEB, left=-DAY, lifetime=30 * DAY),
                   certs=(manual("m1", WEB, left=-DAY, lifetime=30 * DAY), manual("m2", WEB, left=DAY))),
     Skip("newer", "another valid certificate of the template is in the store (m2)")),
    ("due-beside-an-older-due-copy", rules.newer_valid_copy,
     lambda: given(WEB, cert=manual("m2", WEB, left=DUE),
                   certs=(manual("m1", WEB, left=DAY), manual("m2", WEB, left=DUE))), None),
    ("alone", rules.newer_valid_copy,
     lambda: given(WEB, cert=manual("m1", WEB, left=DUE), certs=(manual("m1", WEB, left=DUE),)), None),
    ("archive-template", rules.old_certificate_archived, lambda: given(SIG_ARCHIVE),
     Skip("archive", "the template keeps old certificates archived")),
    ("delete-template", rules.old_certificate_archived, lambda: given(SIG_DELETE), None),
    ("encryption", rules.encryption_certificate, lambda: given(ENC_DELETE),
     Skip("encryption", "an encryption certificate is only ever archived")),
    ("signature-and-encryption", rules.encryption_certificate, lambda: given(BOTH_DELETE),
     Skip("encryption", "an encryption certificate is only ever archived")),
    ("signature", rules.encryption_certificate, lambda: given(SIG_DELETE), None),
]


def test_check_case_ids_are_unique() -> None:
    ids = [case[0] for case in CHECK_CASES]
    assert len(ids) == len(set(ids))


@pytest.mark.parametrize(("check", "world", "expected"), [c[1:] for c in CHECK_CASES], ids=[c[0] for c in CHECK_CASES])
def test_check(check: Check, world: Callable[[], RuleInput], expected: Skip | None) -> None:
    assert check(world()) == expected


# -- the chain ----------------------------------------------------------------------------------


def test_the_first_skip_wins_and_the_rest_are_not_asked() -> None:
    asked: list[str] = []

    def passes(given: RuleInput) -> Skip | None:
        asked.append("passes")
        return None

    def first(given: RuleInput) -> Skip | None:
        asked.append("first")
        return Skip("no-kra", "first")

    def second(given: RuleInput) -> Skip | None:
        asked.append("second")
        return Skip("superseded", "second")

    chain = Chain("6b", (passes, first, second))
    skip = chain.first_skip(given(M))
    assert skip == Skip("no-kra", "first")
    assert asked == ["passes", "first"]
    assert chain.note(skip, "Machine", "t1") == Note("6b:no-kra", "Machine", "t1", "first")
    assert Chain("6b", (passes, passes)).first_skip(given(M)) is None


def _walk(chain: Chain, order: Sequence[str], world: Callable[[set[str]], RuleInput]) -> list[str | None]:
    """Lift the conditions one at a time, in ``order``: the code the chain names at each step."""
    lifted: set[str] = set()
    named: list[str | None] = []
    for condition in (*order, None):
        skip = chain.first_skip(world(lifted))
        named.append(skip.code if skip is not None else None)
        if condition is not None:
            lifted.add(condition)
    return named


def _failing_template(lifted: set[str], *, ra: int, **changes: Any) -> TemplatePolicy:
    """Template ``X``, failing every condition common to the chains that is not ``lifted``."""
    return tpl("X", rights=ALL_RIGHTS if "no-autoenroll" in lifted else ENROLL_ONLY,
               archive_private_key="no-kra" not in lifted, ra_signatures=ra,
               subject_source="principal" if "subject-required" in lifted else "request",
               user_interaction="user-interaction" not in lifted, **changes)


def test_renew_auto_names_the_seeds_conditions_in_order() -> None:
    order = ["no-autoenroll", "no-issuer", "no-kra", "ra-signatures", "subject-required", "user-interaction",
             "superseded", "pending"]

    def world(lifted: set[str]) -> RuleInput:
        x = _failing_template(lifted, ra=0 if "ra-signatures" in lifted else 2)
        successor = tpl("New", supersedes=() if "superseded" in lifted else ("X",))
        served = ("X", "New") if "no-issuer" in lifted else ("New",)
        servers = (server(x, successor, issuers=(issuer("CA1", *served),), kra_valid=False),)
        return given(x, servers=servers, pending=() if "pending" in lifted else ("X",))

    assert _walk(RENEW_AUTO, order, world) == [*order, None]


def test_enroll_new_names_the_seeds_conditions_in_order() -> None:
    order = ["pending", "directory", "ra-signatures", "no-ra-certificate", "subject-required", "user-interaction",
             "no-kra", "no-issuer"]

    def world(lifted: set[str]) -> RuleInput:
        ra = 2 if "ra-signatures" not in lifted else 1 if "no-ra-certificate" not in lifted else 0
        x = _failing_template(lifted | {"no-autoenroll"}, ra=ra, check_directory="directory" not in lifted)
        ro = "no-issuer" not in lifted
        servers = (server(x, issuers=(issuer("CA1", "X", renewal_only=ro),), kra_valid=False,
                          directory=(("X", NOW + DAY),)),)
        return given(x, servers=servers, pending=() if "pending" in lifted else ("X",))

    assert _walk(ENROLL_NEW, order, world) == [*order, None]


def test_renew_manual_names_the_seeds_conditions_in_order() -> None:
    order = ["replaced", "newer", "no-autoenroll", "no-kra", "subject-required", "user-interaction",
             "ra-signatures", "pending", "no-issuer"]

    def world(lifted: set[str]) -> RuleInput:
        x = _failing_template(lifted, ra=0 if "ra-signatures" in lifted else 2)
        mine = manual("m1", x, left=DUE)
        certs = (mine,) if "newer" in lifted else (mine, manual("m2", x, left=300 * DAY))
        servers = (server(x, issuers=(issuer("CA1", "X", valid="no-issuer" in lifted),), kra_valid=False),)
        return given(x, servers=servers, certs=certs, cert=mine, pending=() if "pending" in lifted else ("X",),
                     replaced=() if "replaced" in lifted else ("m1",))

    assert _walk(RENEW_MANUAL, order, world) == [*order, None]


def test_cleanup_keeps_what_the_template_archives_then_encryption_certificates() -> None:
    order = ["archive", "encryption"]

    def world(lifted: set[str]) -> RuleInput:
        return given(tpl("X", old_certificate="delete" if "archive" in lifted else "archive",
                         purpose="signature" if "encryption" in lifted else "encryption"))

    assert _walk(CLEANUP, order, world) == [*order, None]


def test_a_chain_prefixes_its_section() -> None:
    skip = RENEW_AUTO.first_skip(given(KRA, servers=(server(KRA, kra_valid=False),)))
    assert skip is not None
    assert RENEW_AUTO.note(skip, "Archive", "k1") == Note(
        "6a:no-kra", "Archive", "k1", "key archival required and no valid KRA certificate")
    skip = ENROLL_NEW.first_skip(given(KRA, servers=(server(KRA, kra_valid=False),)))
    assert skip is not None and ENROLL_NEW.rule(skip) == "6b:no-kra"


def test_a_template_verdict_is_reached_once_per_pass() -> None:
    """A pass over many certificates of one template asks its chain once."""
    asked: list[str] = []

    def counted(given: RuleInput) -> Skip | None:
        asked.append(given.template.name)
        return None

    view = PolicyView((server(M),))
    found = view.find(name="Machine")
    assert found is not None
    run = planner._Pass(Options(), view, CertIndex((), NOW), NOW, frozenset())
    chain = Chain("6a", (counted,))
    for _ in range(3):
        assert run.verdict(chain, *found) is None
    assert asked == ["Machine"]

