"""The autoenrollment planner: options + policy + store + ``now`` -> ordered actions. Pure.

It follows SPEC "A pulse, in order" rule by rule; every action and every skip names the rule
that caused it (``5:stale``, ``6a:threshold``, ``6b:missing``, ``6c:expired``, ``cleanup:…``).
Skips are notes, not actions: a second pulse at the same instant, after the first one's actions
were carried out, plans no action at all. The result never depends on the order in which the
store lists its certificates.

Each condition under which a rule does not act is one small check written once
(:mod:`certpulse.agent.rules`); each rule lists its checks in a chain in the seed's order, and
the first check that skips names the note (``6a:no-kra``). The policy and the store are read
through indexed views (:mod:`certpulse.agent.policy_view`). The plan also says which
certificates the agent takes care of itself (:attr:`Plan.handled`), from the same pass, so the
expiry monitor needs no second opinion.

Interpretations (the seed is silent or self-contradictory; SPEC's text wins over the seed where
they differ). Each is pinned by a case in ``tests/test_planner.py``:
* A template counts as *superseded* only when a template that supersedes it is itself
  applicable to this client (autoenroll permission and an issuer); otherwise a client that may
  not enroll for the successor keeps renewing what it has instead of letting it lapse (the
  question in the seed's comments, left unanswered there). The superseding enrollment replaces
  every unarchived personal certificate of the superseded templates, usable or not.
* A template listed by several policy groups is taken from the first group (the certificate's
  own, then the default, then by cost) in which it is applicable.
* One certificate per template is renewed: the most recent usable one (latest ``not_after``),
  and none while another usable certificate of the template is not due (a freshly installed
  certificate settles the template; older copies lapse and are not renewed).
* After a renewal the old certificate is always archived; a template that says "delete" has
  archived certificates deleted once they are expired or revoked (``cleanup:delete``);
  encryption certificates (purpose ``encryption`` or ``both``) are never deleted. When the
  certificate a request replaces is *already* expired or revoked under a "delete" template, the
  action lists it in ``delete_replaced``: the executor deletes it instead of archiving it once
  the new certificate is installed (SPEC 5: "archive the old certificate (or delete it if the
  template says so)"), so that the next pulse has no cleanup left to do.
* With ``retrieve_pending`` off, pending requests are neither polled nor dropped, but a request
  60 days old or more no longer blocks a new request for its template (it is dead by rule 5).
* Additional stores are monitored only (SPEC deviates from the seed): their certificates are
  never renewed and do not count as holding a template.
* 6(c): a manually enrolled certificate that is expired, revoked or fails validation gets a new
  request built from its subject (``6c:expired`` / ``6c:revoked`` / ``6c:invalid``); all such
  certificates of one template share one request. Any usable certificate of the template blocks
  that (``6c:newer``: the seed's "existing valid and non-expired certificate ... is found"), and
  a certificate that a 6(b) request already replaces is left to it (``6c:replaced``).
* A published directory certificate, like a stored one, is valid up to and including its
  ``not_after``. A negative renewal period counts as zero.
"""


from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Iterable

from certpulse.agent.model import (
    Action,
    Kind,
    Note,
    Options,
    Plan,
    PolicyServer,
    ReplaceAction,
    StoredCertificate,
    StoreSnapshot,
    TemplatePolicy,
    starts_later,
)
from certpulse.agent.policy_view import CertIndex, Group, PolicyView
from certpulse.agent.rules import (
    AUTO_STANDING,
    CLEANUP,
    ENROLL_NEW,
    MANUAL_STANDING,
    RENEW_AUTO,
    RENEW_MANUAL,
    Chain,
    RuleInput,
    Skip,
    carried_elsewhere,
    renewal_time,
    renewal_window,
    threshold_reached,
)
from certpulse.machine.current import recency

STALE_PENDING = dt.timedelta(days=60)


class _Pass:
    """One planning pass: the inputs every rule shares, and the verdicts already reached.

    A chain whose checks look at the template, its group, the options and the store but not at
    a certificate gives every certificate of a template the same verdict: :meth:`verdict`
    reaches it once per template and group and remembers it, so a pass over 10,000 certificates
    of 500 templates asks each template's questions once (RENEW_AUTO, AUTO_STANDING,
    MANUAL_STANDING and CLEANUP are such chains; RENEW_MANUAL is not)."""

    def __init__(self, options: Options, view: PolicyView, personal: CertIndex, now: dt.datetime,
                 pending: frozenset[str]) -> None:
        self.options, self.view, self.personal, self.now, self.pending = options, view, personal, now, pending
        self._verdicts: dict[tuple[int, int, int], Skip | None] = {}

    def given(self, template: TemplatePolicy, group: Group, *, cert: StoredCertificate | None = None,
              replaced: frozenset[str] = frozenset()) -> RuleInput:
        return RuleInput(self.options, self.view, template, group, self.personal, self.now, self.pending,
                         cert, replaced)

    def verdict(self, chain: Chain, template: TemplatePolicy, group: Group) -> Skip | None:
        key = (id(chain), id(template), id(group))
        try:
            return self._verdicts[key]
        except KeyError:
            skip = self._verdicts[key] = chain.first_skip(self.given(template, group))
            return skip


def plan(options: Options, servers: Iterable[PolicyServer], store: StoreSnapshot, now: dt.datetime) -> Plan:
    """The whole pulse as an ordered list of actions (SPEC "A pulse, in order")."""
    if not options.enabled:
        return Plan((), (Note("1:disabled", detail="autoenrollment is disabled"),))
    certs = sorted(store.certificates, key=lambda c: c.thumbprint)
    personal = CertIndex((c for c in certs if c.store == "personal"), now)
    actions: list[Action] = []
    notes: list[Note] = []
    pending = _pending_requests(options, store, now, actions, notes)
    run = _Pass(options, PolicyView(servers), personal, now, frozenset(pending))
    covered: set[str] = set()  # templates that hold, or are about to hold, a usable certificate
    if options.enroll:
        actions += _renew_autoenrolled(run, covered, notes)
        actions += _enroll_missing(run, covered, notes)
    if options.manage:
        replaced = frozenset(thumb for action in actions for thumb in action.replaces)
        actions += _renew_manual(run, replaced, notes)
    actions += _cleanup(run)
    notes += _not_started(run)
    return Plan(tuple(_with_deletions(run, action) for action in actions), tuple(notes), _handled(run))


def _pending_requests(options: Options, store: StoreSnapshot, now: dt.datetime, actions: list[Action],
                      notes: list[Note]) -> set[str]:
    """5: poll pending requests and drop stale ones; the templates a live request still blocks."""
    pending: set[str] = set()
    if options.retrieve_pending:
        for request in sorted(store.pending, key=lambda p: p.request_id):
            if now - request.submitted_at >= STALE_PENDING:
                actions.append(Action(Kind.DROP_STALE_REQUEST, "5:stale", template=request.template,
                                      request_id=request.request_id, thumbprint=request.renewal_of,
                                      detail="pending for 60 days or more"))
            else:
                pending.add(request.template)
                actions.append(Action(Kind.POLL_PENDING, "5:poll", template=request.template,
                                      request_id=request.request_id, issuers=(request.issuer,),
                                      policy_url=request.policy_url, thumbprint=request.renewal_of))
    else:
        # Not examined, not dropped; but a request 60 days old is dead and no longer blocks.
        pending.update(p.template for p in store.pending if now - p.submitted_at < STALE_PENDING)
    for template in sorted(set(store.in_flight)):
        if template not in pending:
            pending.add(template)
            notes.append(Note("5:in-flight", template, detail="a request awaits an answer; it is resent as it was"))
    return pending


def _renew_autoenrolled(run: _Pass, covered: set[str], notes: list[Note]) -> list[Action]:
    """6(a): renew certificates of templates set up for autoenrollment."""
    actions: list[Action] = []
    view, personal, now = run.view, run.personal, run.now  # read once: the loop runs per certificate
    for cert in personal.all:
        if cert.archived or cert.source != "auto" or cert.template_oid is None:
            continue
        found = view.find(oid=cert.template_oid, policy_id=cert.policy_id)
        if found is None:
            notes.append(Note("6a:no-template", cert.template_name, cert.thumbprint, "template not in any policy"))
            continue
        template, group = found
        if not cert.usable(now):
            # Failed validation, revoked or expired: never renewed; 6(b) makes a new request.
            continue
        if carried_elsewhere(personal, cert, template, now, major=True) is not None:
            continue  # an older copy, or one beside a certificate that is not due: the template is held
        skip = run.verdict(RENEW_AUTO, template, group)
        if skip is None or skip.code != "ra-signatures":
            covered.add(template.name)  # with 2+ RA signatures, 6(b) is the way to a new certificate
        if skip is not None:
            notes.append(RENEW_AUTO.note(skip, template.name, cert.thumbprint))
            continue
        action = _renewal(run, cert, template, group)
        if action is not None:
            actions.append(action)
    return actions


def _renewal(run: _Pass, cert: StoredCertificate, template: TemplatePolicy, group: Group) -> Action | None:
    """6(a)'s renewal of ``cert`` if it is due: at its threshold, or early when the template's
    major version is higher than the certificate's (forced re-enrollment)."""
    if threshold_reached(cert, template, run.now):
        rule, why = "6a:threshold", f"renewal due since {renewal_time(cert, template).isoformat()}"
    elif template.major_version > cert.major_version:
        rule, why = "6a:major-version", f"template major version {template.major_version} > {cert.major_version}"
    else:
        return None
    issuers, url = run.view.issuer_order(template.name, group, new_request=False)
    return Action(Kind.RENEW, rule, template=template.name, thumbprint=cert.thumbprint, issuers=tuple(issuers),
                  policy_url=url, replaces=(cert.thumbprint,), replace_action="renew", detail=why)


def _enroll_missing(run: _Pass, covered: set[str], notes: list[Note]) -> list[Action]:
    """6(b): new requests for applicable templates that lack a valid certificate."""
    actions: list[Action] = []
    for template, group in run.view.all_templates():
        if template.name in covered:
            continue
        if not run.view.applicable(template, group):
            late = _issuer_starting_later(run, template, group)
            if late is not None:
                notes.append(late)
            continue
        if run.view.superseded(template, run.options.context) is not None:
            continue  # its successor enrolls instead
        if run.personal.newest_usable(template.name) is not None:
            continue
        skip = ENROLL_NEW.first_skip(run.given(template, group))
        if skip is not None:
            notes.append(ENROLL_NEW.note(skip, template.name))
            continue
        actions.append(_enrollment(run, template, group))
        covered.add(template.name)
    return actions


def _issuer_starting_later(run: _Pass, template: TemplatePolicy, group: Group) -> Note | None:
    """6(b) for a template no valid issuer serves because the issuer (or its root) starts after
    this machine's clock: say so, rather than plan nothing in silence."""
    if not template.autoenroll or run.personal.newest_usable(template.name) is not None:
        return None
    why = run.view.starting_later(group, template.name, run.now)
    return None if why is None else Note("6b:issuer-not-yet-valid", template.name, detail=why)


def _not_started(run: _Pass) -> list[Note]:
    """Held certificates that start after this machine's clock (it is behind the CA's): they
    count as held, so nothing is requested for their template; say why."""
    now = run.now
    return [Note("6b:not-yet-valid", cert.template_name, cert.thumbprint,
                 starts_later("the certificate", cert.not_before, now))
            for cert in run.personal.all
            if cert.template_name is not None and cert.not_started(now) and cert.usable(now)]


def _enrollment(run: _Pass, template: TemplatePolicy, group: Group) -> Action:
    """A new request for ``template``. It replaces every unarchived certificate of the template
    and of the templates it supersedes, usable or not: none of those is renewed any more (6a),
    so leaving a broken one behind would only invite 6(c) to renew it."""
    issuers, url = run.view.issuer_order(template.name, group, new_request=True)
    replaced = run.personal.unarchived_of((template.name,))
    superseded = run.personal.unarchived_of(template.supersedes)
    action: ReplaceAction | None = "supersede" if superseded else ("renew" if replaced else None)
    why = ("supersedes " + ", ".join(sorted({c.template_name or "" for c in superseded})) if superseded
           else "no valid certificate" if replaced else "not enrolled yet")
    replaces = tuple(c.thumbprint for c in (*superseded, *replaced))
    return Action(Kind.ENROLL, "6b:supersede" if superseded else "6b:missing", template=template.name,
                  issuers=tuple(issuers), policy_url=url, replaces=replaces, replace_action=action,
                  new_request=True, detail=why)


def _renew_manual(run: _Pass, replaced: frozenset[str], notes: list[Note]) -> list[Action]:
    """6(c): renew manually enrolled certificates (the ``manage`` option).

    A usable certificate at its threshold is renewed (signed with its key). One that is expired,
    revoked or fails validation gets a new request built from its subject; all such manual
    certificates of one template share that single request, made from the most recent of them.
    """
    actions: list[Action] = []
    broken_of: dict[str | None, tuple[list[StoredCertificate], str]] = {}  # siblings, the most recent
    view, now = run.view, run.now  # read once: the loop runs per certificate
    for cert in run.personal.all:
        if cert.archived or cert.source != "manual" or cert.template_oid is None:
            continue
        found = view.find(oid=cert.template_oid, policy_id=cert.policy_id)
        if found is None:
            continue
        template, group = found
        broken = not cert.usable(now)  # expired, revoked or failing validation: a new request
        if not broken and not threshold_reached(cert, template, now):
            continue
        siblings: list[StoredCertificate] = []
        if broken and cert.thumbprint not in replaced:  # one 6(b) replaces is noted by the chain
            if cert.template_name not in broken_of:
                broken_of[cert.template_name] = _broken_siblings(run, cert, replaced)
            siblings, most_recent = broken_of[cert.template_name]
            if most_recent != cert.thumbprint:
                continue  # the most recent broken one speaks for the template, and replaces this one too
        skip = RENEW_MANUAL.first_skip(run.given(template, group, cert=cert, replaced=replaced))
        if skip is not None:
            notes.append(RENEW_MANUAL.note(skip, template.name, cert.thumbprint))
            continue
        actions.append(_manual_renewal(run, cert, template, group, siblings))
    return actions


def _broken_siblings(run: _Pass, cert: StoredCertificate,
                     replaced: frozenset[str]) -> tuple[list[StoredCertificate], str]:
    """The unusable manual certificates of ``cert``'s template that 6(b) does not replace, and
    the most recent of them (the one whose subject the shared new request reuses)."""
    found = [c for c in run.personal.of(cert.template_name) if not c.archived and c.source == "manual"
             and not c.usable(run.now) and c.thumbprint not in replaced]
    return found, max(found, key=recency).thumbprint


def _manual_renewal(run: _Pass, cert: StoredCertificate, template: TemplatePolicy, group: Group,
                    siblings: list[StoredCertificate]) -> Action:
    """6(c)'s request: a renewal signed with the key of a usable certificate, or for a broken one
    a new request from its subject that replaces all its broken siblings."""
    if cert.usable(run.now):
        issuers, url = run.view.issuer_order(template.name, group, new_request=False)
        return Action(Kind.RENEW_MANUAL, "6c:threshold", template=template.name, thumbprint=cert.thumbprint,
                      issuers=tuple(issuers), policy_url=url, replaces=(cert.thumbprint,), replace_action="renew",
                      detail="renewal due")
    issuers, url = run.view.issuer_order(template.name, group, new_request=True)
    rule = "6c:expired" if cert.expired(run.now) else "6c:revoked" if cert.revoked else "6c:invalid"
    return Action(Kind.RENEW_MANUAL, rule, template=template.name, thumbprint=cert.thumbprint, issuers=tuple(issuers),
                  policy_url=url, replaces=tuple(sorted(c.thumbprint for c in siblings)), replace_action="renew",
                  new_request=True, subject_from=cert.thumbprint, detail="new request from its subject")


def _cleanup(run: _Pass) -> list[Action]:
    """Archived certificates of "delete" templates go once expired or revoked; encryption never."""
    now = run.now  # read once: the filter runs per certificate
    return [Action(Kind.DELETE, "cleanup:delete", template=cert.template_name, thumbprint=cert.thumbprint,
                   detail="archived and " + ("revoked" if cert.revoked else "expired"))
            for cert in run.personal.all
            if cert.archived and (cert.revoked or cert.expired(now)) and _deletable(run, cert)]


def _deletable(run: _Pass, cert: StoredCertificate) -> bool:
    """Cleanup: it is expired or revoked, and its template's CLEANUP chain keeps it for no reason."""
    if not (cert.expired(run.now) or cert.revoked) or cert.template_oid is None:
        return False
    found = run.view.find(oid=cert.template_oid, policy_id=cert.policy_id)
    return found is not None and run.verdict(CLEANUP, found[0], found[1]) is None


def _with_deletions(run: _Pass, action: Action) -> Action:
    """Name the replaced certificates the executor deletes instead of archiving: cleanup would
    delete them at the next pulse anyway, since they are already expired or revoked."""
    if action.kind is Kind.POLL_PENDING:
        replaced: tuple[str, ...] = (action.thumbprint,) if action.thumbprint else ()
    elif action.kind in (Kind.RENEW, Kind.ENROLL, Kind.RENEW_MANUAL):
        replaced = action.replaces
    else:
        return action
    by_thumb = run.personal.by_thumbprint()
    # Archived ones are left to cleanup, which deletes them in this very pulse.
    doomed = tuple(t for t in replaced if t in by_thumb and not by_thumb[t].archived
                   and _deletable(run, by_thumb[t]))
    return dataclasses.replace(action, delete_replaced=doomed) if doomed else action


def _handled(run: _Pass) -> frozenset[str]:
    """The personal certificates the agent takes care of itself (:attr:`Plan.handled`): an older
    copy of a template a newer usable certificate holds, whatever the options; with ``enroll``
    an autoenrolled one 6(a) may renew (its threshold and usability aside: 6(b) replaces a
    broken one) or a superseding template replaces; with ``manage`` a manual one none of 6(c)'s
    standing reasons keeps from renewal. A pending request is no reason to warn: its answer
    replaces the certificate."""
    handled: set[str] = set()
    view, personal, options = run.view, run.personal, run.options  # read once: the loop runs per certificate
    for cert in personal.all:
        if cert.archived or cert.template_oid is None:
            continue
        newest = personal.newest_usable(cert.template_name) if cert.template_name else None
        if newest is not None and recency(newest) > recency(cert):
            handled.add(cert.thumbprint)  # an older copy: the newer certificate holds the template
            continue
        found = view.find(oid=cert.template_oid, policy_id=cert.policy_id)
        if found is None:
            continue
        if cert.source == "auto" and options.enroll:
            chain = AUTO_STANDING
        elif cert.source == "manual" and options.manage:
            chain = MANUAL_STANDING
        else:
            continue
        skip = run.verdict(chain, *found)
        if skip is None or skip.code == "superseded":  # superseded: the successor's enrollment replaces it
            handled.add(cert.thumbprint)
    return frozenset(handled)


__all__ = ["Note", "Plan", "plan", "renewal_time", "renewal_window", "threshold_reached"]
