"""The autoenrollment planner: options + policy + store + ``now`` -> ordered actions. Pure.

It follows SPEC "A pulse, in order" rule by rule; every action and every skip names the rule
that caused it (``5:stale``, ``6a:threshold``, ``6b:missing``, ``6c:expired``, ``cleanup:…``).
Skips are notes, not actions: a second pulse at the same instant, after the first one's actions
were carried out, plans no action at all. The result never depends on the order in which the
store lists its certificates.

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
    AUTH_STRENGTH,
    Action,
    IssuerPolicy,
    Kind,
    Options,
    PolicyServer,
    StoredCertificate,
    StoreSnapshot,
    TemplatePolicy,
)

STALE_PENDING = dt.timedelta(days=60)
LIFETIME_SHARE = 5  # renew when at most 1/5 (20 %) of the lifetime is left


@dataclasses.dataclass(frozen=True)
class Note:
    """Something the planner decided not to do, and the rule that says so."""

    rule: str
    template: str | None = None
    thumbprint: str | None = None
    detail: str = ""


@dataclasses.dataclass(frozen=True)
class Plan:
    actions: tuple[Action, ...]
    notes: tuple[Note, ...]


def renewal_window(cert: StoredCertificate, template: TemplatePolicy) -> dt.timedelta:
    """``min(renewal period, 20 % of the lifetime)``: how much time is left when renewal starts.

    Never negative: a (nonsensical) negative renewal period counts as zero, so renewal never
    falls due after the certificate has expired."""
    return max(dt.timedelta(0), min(template.renewal_period, cert.lifetime / LIFETIME_SHARE))


def renewal_time(cert: StoredCertificate, template: TemplatePolicy) -> dt.datetime:
    """When renewal becomes due: at 80 % of the lifetime or at the renewal period, the later."""
    return cert.not_after - renewal_window(cert, template)


def threshold_reached(cert: StoredCertificate, template: TemplatePolicy, now: dt.datetime) -> bool:
    return cert.not_after - now <= renewal_window(cert, template)


class _PolicyView:
    """The policy servers, grouped by policy id and ordered by cost then authentication strength.

    Lookups are indexed and remembered: a view lives for one planning pass over a policy that
    does not change meanwhile, and a pulse over thousands of certificates asks the same
    questions (a template by OID, its issuers, its successor) for each of them."""

    def __init__(self, servers: Iterable[PolicyServer]) -> None:
        groups: dict[str, list[PolicyServer]] = {}
        for server in servers:
            groups.setdefault(server.policy_id, []).append(server)
        for members in groups.values():
            members.sort(key=lambda s: (s.cost, AUTH_STRENGTH.get(s.auth, 9), s.url))
        self.groups = sorted(
            groups.values(), key=lambda g: (g[0].cost, AUTH_STRENGTH.get(g[0].auth, 9), g[0].policy_id))
        default = [g for g in self.groups if any(s.is_default for s in g)]
        self.default = default[0] if default else (self.groups[0] if self.groups else [])
        # Per group, per server in order: its templates by name and by OID (the first one listed,
        # as PolicyServer.template and template_by_oid answer).
        self._tables: dict[int, list[tuple[dict[str, TemplatePolicy], dict[str, TemplatePolicy]]]] = {}
        # Template name -> (group, template) for every template that supersedes it, in the order
        # groups, servers and templates are listed.
        self._successors: dict[str, list[tuple[list[PolicyServer], TemplatePolicy]]] = {}
        for group in self.groups:
            tables = self._tables.setdefault(id(group), [])
            for server in group:
                by_name: dict[str, TemplatePolicy] = {}
                by_oid: dict[str, TemplatePolicy] = {}
                for template in server.templates:
                    by_name.setdefault(template.name, template)
                    by_oid.setdefault(template.oid, template)
                    for old in dict.fromkeys(template.supersedes):
                        self._successors.setdefault(old, []).append((group, template))
                tables.append((by_name, by_oid))
        self._orders: dict[str | None, list[list[PolicyServer]]] = {}
        self._found: dict[tuple[str | None, str | None, str | None],
                          tuple[TemplatePolicy, list[PolicyServer]] | None] = {}
        self._issuers: dict[tuple[int, str, bool], tuple[tuple[PolicyServer, IssuerPolicy], ...]] = {}
        self._issuer_orders: dict[tuple[str, int, bool], tuple[tuple[str, ...], str | None]] = {}
        self._superseded: dict[tuple[str, str], TemplatePolicy | None] = {}

    def _ordered(self, policy_id: str | None) -> list[list[PolicyServer]]:
        """The groups to look in: the certificate's own, then the default, then the others."""
        ordered = self._orders.get(policy_id)
        if ordered is None:
            ordered = [g for g in self.groups if g[0].policy_id == policy_id]
            ordered += [self.default] if self.default and self.default not in ordered else []
            ordered += [g for g in self.groups if g not in ordered]
            self._orders[policy_id] = ordered
        return ordered

    def find(self, *, name: str | None = None, oid: str | None = None,
             policy_id: str | None = None) -> tuple[TemplatePolicy, list[PolicyServer]] | None:
        """A template by name or OID: in the certificate's own policy group first, then the default,
        then any (the seed: the default policy renews certificates whose policy id is unknown).
        The first group in which the template is applicable wins; when it is applicable in none,
        the first group that lists it (so the skip can be explained)."""
        key = (name, oid, policy_id)
        if key in self._found:
            return self._found[key]
        first: tuple[TemplatePolicy, list[PolicyServer]] | None = None
        for group in self._ordered(policy_id):
            for by_name, by_oid in self._tables[id(group)]:
                template = by_oid.get(oid) if oid else by_name.get(name or "")
                if template is not None:
                    if self.applicable(template, group):
                        self._found[key] = (template, group)
                        return template, group
                    first = first or (template, group)
                    break
        self._found[key] = first
        return first

    def _issuer_pairs(self, group: list[PolicyServer], template: str,
                      new_request: bool) -> tuple[tuple[PolicyServer, IssuerPolicy], ...]:
        key = (id(group), template, new_request)
        found = self._issuers.get(key)
        if found is None:
            pairs = [
                (server, issuer) for server in group for issuer in server.issuers
                if issuer.valid and template in issuer.templates and not (new_request and issuer.renewal_only)
            ]
            found = tuple(sorted(pairs, key=lambda pair: (not pair[1].reachable, pair[1].cost, pair[1].name)))
            self._issuers[key] = found
        return found

    def issuers_in(
        self, group: list[PolicyServer], template: str, *, new_request: bool
    ) -> list[tuple[PolicyServer, IssuerPolicy]]:
        return list(self._issuer_pairs(group, template, new_request))

    def issuer_order(
        self, template: str, group: list[PolicyServer], *, new_request: bool
    ) -> tuple[list[str], str | None]:
        """Issuers to try, best first: the template's group (or, for new requests, the default
        policy) by cost, then any other policy's issuers that serve the template."""
        first = self.default if new_request else group
        key = (template, id(first), new_request)
        found = self._issuer_orders.get(key)
        if found is None:
            pairs = list(self._issuer_pairs(first, template, new_request))
            for other in self.groups:
                if other is not first:
                    pairs += self._issuer_pairs(other, template, new_request)
            names: list[str] = []
            for _, issuer in pairs:
                if issuer.name not in names:
                    names.append(issuer.name)
            found = (tuple(names), pairs[0][0].url if pairs else None)
            self._issuer_orders[key] = found
        return list(found[0]), found[1]

    def applicable(self, template: TemplatePolicy, group: list[PolicyServer]) -> bool:
        """Autoenroll permission and some valid issuer in the group serves it."""
        return template.autoenroll and bool(self._issuer_pairs(group, template.name, False))

    def kra_valid(self, group: list[PolicyServer]) -> bool:
        return any(server.kra_valid for server in group)

    def superseded(self, template: TemplatePolicy, context: str) -> TemplatePolicy | None:
        """The template that replaces this one, when this client can enroll for it silently:
        applicable, subject not required in the request, fewer than two RA signatures, no user
        interaction on a machine, and a KRA when it archives keys. A successor this client cannot
        get leaves the old template renewing, rather than lapsing with nothing in its place."""
        key = (template.name, context)
        if key not in self._superseded:
            self._superseded[key] = next(
                (other for group, other in self._successors.get(template.name, ())
                 if self.applicable(other, group) and other.subject_source != "request" and other.ra_signatures < 2
                 and not (context == "machine" and other.user_interaction)
                 and (not other.archive_private_key or self.kra_valid(group))), None)
        return self._superseded[key]

    def all_templates(self) -> list[tuple[TemplatePolicy, list[PolicyServer]]]:
        """Every template by name, each from the first group (default first) where it applies."""
        names = sorted({t.name for group in self.groups for server in group for t in server.templates})
        found = [self.find(name=name) for name in names]
        return [entry for entry in found if entry is not None]


class _Certs:
    """Certificates in a fixed order, indexed by template name. Each template's list keeps that
    order, so scanning one template's certificates finds what scanning all of them would, in
    time proportional to that template's share of the store rather than to the whole store."""

    def __init__(self, certs: Iterable[StoredCertificate], now: dt.datetime) -> None:
        self.all = list(certs)
        self.now = now
        self._of: dict[str | None, list[StoredCertificate]] = {}
        self._at: dict[str | None, list[int]] = {}
        for index, cert in enumerate(self.all):
            self._of.setdefault(cert.template_name, []).append(cert)
            self._at.setdefault(cert.template_name, []).append(index)
        self._newest: dict[str, StoredCertificate | None] = {}
        self._ra: bool | None = None
        self._by_thumb: dict[str, StoredCertificate] | None = None

    def of(self, template: str | None) -> list[StoredCertificate]:
        """The certificates whose template is named ``template``, in order (do not change it)."""
        return self._of.get(template, [])

    def unarchived_of(self, templates: Iterable[str]) -> list[StoredCertificate]:
        """``[c for c in all if not c.archived and c.template_name in templates]``."""
        indices = sorted({i for name in templates for i in self._at.get(name, ())})
        return [self.all[i] for i in indices if not self.all[i].archived]

    def newest_usable(self, template: str) -> StoredCertificate | None:
        if template not in self._newest:
            self._newest[template] = _newest_usable(self.of(template), template, self.now)
        return self._newest[template]

    def has_ra_certificate(self) -> bool:
        if self._ra is None:
            self._ra = _has_ra_certificate(self.all, self.now)
        return self._ra

    def by_thumbprint(self) -> dict[str, StoredCertificate]:
        if self._by_thumb is None:
            self._by_thumb = {c.thumbprint: c for c in self.all}
        return self._by_thumb


def plan(options: Options, servers: Iterable[PolicyServer], store: StoreSnapshot, now: dt.datetime) -> Plan:
    """The whole pulse as an ordered list of actions (SPEC "A pulse, in order")."""
    if not options.enabled:
        return Plan((), (Note("1:disabled", detail="autoenrollment is disabled"),))
    view = _PolicyView(servers)
    certs = sorted(store.certificates, key=lambda c: c.thumbprint)
    personal = _Certs((c for c in certs if c.store == "personal"), now)
    actions: list[Action] = []
    notes: list[Note] = []
    pending_templates: set[str] = set()

    # 5. Pending requests.
    if options.retrieve_pending:
        for request in sorted(store.pending, key=lambda p: p.request_id):
            if now - request.submitted_at >= STALE_PENDING:
                actions.append(Action(Kind.DROP_STALE_REQUEST, "5:stale", template=request.template,
                                      request_id=request.request_id, thumbprint=request.renewal_of,
                                      detail="pending for 60 days or more"))
            else:
                pending_templates.add(request.template)
                actions.append(Action(Kind.POLL_PENDING, "5:poll", template=request.template,
                                      request_id=request.request_id, issuers=(request.issuer,),
                                      policy_url=request.policy_url, thumbprint=request.renewal_of))
    else:
        # Not examined, not dropped; but a request 60 days old is dead and no longer blocks.
        pending_templates.update(p.template for p in store.pending if now - p.submitted_at < STALE_PENDING)

    for template in sorted(set(store.in_flight)):
        if template not in pending_templates:
            pending_templates.add(template)
            notes.append(Note("5:in-flight", template, detail="a request awaits an answer; it is resent as it was"))
    covered: set[str] = set()  # templates that hold, or are about to hold, a usable certificate
    if options.enroll:
        actions += _renew_autoenrolled(options, view, personal, pending_templates, covered, notes, now)
        actions += _enroll_missing(options, view, personal, pending_templates, covered, notes, now)
    if options.manage:
        replaced = {thumb for action in actions for thumb in action.replaces}
        actions += _renew_manual(options, view, personal, pending_templates, replaced, notes, now)
    actions += _cleanup(view, personal, now)
    return Plan(tuple(_with_deletions(view, personal, action, now) for action in actions), tuple(notes))


def _deletable(view: _PolicyView, cert: StoredCertificate, now: dt.datetime) -> bool:
    """Cleanup: the template says "delete revoked or expired" and it is; encryption never goes."""
    if not (cert.expired(now) or cert.revoked) or cert.template_oid is None:
        return False
    found = view.find(oid=cert.template_oid, policy_id=cert.policy_id)
    return (found is not None and found[0].old_certificate == "delete"
            and found[0].purpose not in ("encryption", "both"))


def _with_deletions(view: _PolicyView, personal: _Certs, action: Action,
                    now: dt.datetime) -> Action:
    """Name the replaced certificates the executor deletes instead of archiving: cleanup would
    delete them at the next pulse anyway, since they are already expired or revoked."""
    if action.kind is Kind.POLL_PENDING:
        replaced: tuple[str, ...] = (action.thumbprint,) if action.thumbprint else ()
    elif action.kind in (Kind.RENEW, Kind.ENROLL, Kind.RENEW_MANUAL):
        replaced = action.replaces
    else:
        return action
    by_thumb = personal.by_thumbprint()
    # Archived ones are left to cleanup, which deletes them in this very pulse.
    doomed = tuple(t for t in replaced if t in by_thumb and not by_thumb[t].archived
                   and _deletable(view, by_thumb[t], now))
    return dataclasses.replace(action, delete_replaced=doomed) if doomed else action


def _recency(cert: StoredCertificate) -> tuple[dt.datetime, dt.datetime, str]:
    return cert.not_after, cert.not_before, cert.thumbprint


def _newest_usable(certs: Iterable[StoredCertificate], template: str, now: dt.datetime) -> StoredCertificate | None:
    usable = [c for c in certs if c.template_name == template and c.usable(now)]
    return max(usable, key=_recency) if usable else None


def _carried_elsewhere(personal: _Certs, cert: StoredCertificate, template: TemplatePolicy,
                       now: dt.datetime, *, major: bool) -> StoredCertificate | None:
    """Another usable certificate of the template that carries it instead of ``cert``: a more
    recent one, or one that is not due (threshold not reached and, with ``major``, not of an
    older major version). One certificate per template is renewed, and never while another
    one needs no renewal: so a freshly installed certificate settles the template."""
    for other in personal.of(template.name):
        if other.thumbprint == cert.thumbprint or other.template_name != template.name or not other.usable(now):
            continue
        outdated = major and template.major_version > other.major_version
        if _recency(other) > _recency(cert) or not (threshold_reached(other, template, now) or outdated):
            return other
    return None


def _has_ra_certificate(certs: Iterable[StoredCertificate], now: dt.datetime) -> bool:
    return any(c.is_ra and c.usable(now) for c in certs)


def _renew_autoenrolled(
    options: Options, view: _PolicyView, personal: _Certs, pending: set[str],
    covered: set[str], notes: list[Note], now: dt.datetime,
) -> list[Action]:
    """6(a): renew certificates of templates set up for autoenrollment."""
    actions: list[Action] = []
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
        if _carried_elsewhere(personal, cert, template, now, major=True) is not None:
            continue  # an older copy, or one beside a certificate that is not due: the template is held
        skip = _autoenroll_skip(options, view, template, group)
        if skip is not None:
            notes.append(Note(skip[0], template.name, cert.thumbprint, skip[1]))
            if skip[0] != "6a:ra-signatures":
                covered.add(template.name)
            continue
        covered.add(template.name)
        if template.name in pending:
            notes.append(Note("6a:pending", template.name, cert.thumbprint, "a request for it is pending"))
            continue
        if threshold_reached(cert, template, now):
            rule, why = "6a:threshold", f"renewal due since {renewal_time(cert, template).isoformat()}"
        elif template.major_version > cert.major_version:
            rule, why = "6a:major-version", f"template major version {template.major_version} > {cert.major_version}"
        else:
            continue
        issuers, url = view.issuer_order(template.name, group, new_request=False)
        actions.append(Action(Kind.RENEW, rule, template=template.name, thumbprint=cert.thumbprint,
                              issuers=tuple(issuers), policy_url=url, replaces=(cert.thumbprint,),
                              replace_action="renew", detail=why))
    return actions


def _autoenroll_skip(options: Options, view: _PolicyView, template: TemplatePolicy,
                     group: list[PolicyServer]) -> tuple[str, str] | None:
    """The seed's list of reasons a certificate of this template is not renewed silently."""
    if not template.autoenroll:
        return "6a:no-autoenroll", "no autoenroll permission"
    if not view.issuers_in(group, template.name, new_request=False):
        return "6a:no-issuer", "no valid issuer serves the template"
    if template.archive_private_key and not view.kra_valid(group):
        return "6a:no-kra", "key archival required and no valid KRA certificate"
    if template.ra_signatures >= 2:
        return "6a:ra-signatures", "2+ RA signatures required: a new request instead"
    if template.subject_source == "request" and not template.renewal_subject_from_existing:
        return "6a:subject-required", "the subject must be supplied and may not come from the old certificate"
    if options.context == "machine" and template.user_interaction:
        return "6a:user-interaction", "a machine template that requires user interaction"
    successor = view.superseded(template, options.context)
    if successor is not None:
        return "6a:superseded", f"superseded by {successor.name!r}"
    return None


def _enroll_missing(
    options: Options, view: _PolicyView, personal: _Certs, pending: set[str],
    covered: set[str], notes: list[Note], now: dt.datetime,
) -> list[Action]:
    """6(b): new requests for applicable templates that lack a valid certificate."""
    actions: list[Action] = []
    for template, group in view.all_templates():
        if not view.applicable(template, group) or template.name in covered:
            continue
        if view.superseded(template, options.context) is not None:
            continue  # its successor enrolls instead
        if personal.newest_usable(template.name) is not None:
            continue
        if template.name in pending:
            notes.append(Note("6b:pending", template.name, detail="a request for it is pending"))
            continue
        in_directory = [t for (name, t) in _directory(group) if name == template.name and now <= t]
        skip: tuple[str, str] | None = None
        if template.check_directory and in_directory:
            skip = ("6b:directory", "a valid certificate is already published in the directory")
        elif template.ra_signatures >= 2:
            skip = ("6b:ra-signatures", "2+ RA signatures required")
        elif template.ra_signatures == 1 and not personal.has_ra_certificate():
            skip = ("6b:no-ra-certificate", "1 RA signature required and no RA certificate to co-sign")
        elif template.subject_source == "request":
            skip = ("6b:subject-required", "the subject must be supplied: enroll by hand (cert request)")
        elif options.context == "machine" and template.user_interaction:
            skip = ("6b:user-interaction", "a machine template that requires user interaction")
        elif template.archive_private_key and not view.kra_valid(group):
            skip = ("6b:no-kra", "key archival required and no valid KRA certificate")
        if skip is not None:
            notes.append(Note(skip[0], template.name, detail=skip[1]))
            continue
        issuers, url = view.issuer_order(template.name, group, new_request=True)
        if not issuers:
            notes.append(Note("6b:no-issuer", template.name, detail="no issuer serves the template for new requests"))
            continue
        replaced = personal.unarchived_of((template.name,))
        # Every certificate of a superseded template is replaced, usable or not: none of them is
        # renewed any more (6a), so leaving a broken one behind would only invite 6(c) to renew it.
        superseded = personal.unarchived_of(template.supersedes)
        replaces = tuple(c.thumbprint for c in (*superseded, *replaced))
        action = "supersede" if superseded else ("renew" if replaced else None)
        why = ("supersedes " + ", ".join(sorted({c.template_name or "" for c in superseded})) if superseded
               else "no valid certificate" if replaced else "not enrolled yet")
        actions.append(Action(Kind.ENROLL, "6b:supersede" if superseded else "6b:missing", template=template.name,
                              issuers=tuple(issuers), policy_url=url, replaces=replaces, replace_action=action,
                              new_request=True, detail=why))
        covered.add(template.name)
    return actions


def _directory(group: list[PolicyServer]) -> list[tuple[str, dt.datetime]]:
    return [entry for server in group for entry in server.directory]


def _renew_manual(
    options: Options, view: _PolicyView, personal: _Certs, pending: set[str],
    replaced: set[str], notes: list[Note], now: dt.datetime,
) -> list[Action]:
    """6(c): renew manually enrolled certificates (the ``manage`` option).

    A usable certificate at its threshold is renewed (signed with its key). One that is expired,
    revoked or fails validation gets a new request built from its subject; all such manual
    certificates of one template share that single request, made from the most recent of them.
    """
    actions: list[Action] = []
    broken_of: dict[str | None, tuple[list[StoredCertificate], str]] = {}  # siblings, the most recent
    for cert in personal.all:
        if cert.archived or cert.source != "manual" or cert.template_oid is None:
            continue
        found = view.find(oid=cert.template_oid, policy_id=cert.policy_id)
        if found is None:
            continue
        template, group = found
        broken = not cert.usable(now)  # expired, revoked or failing validation: a new request
        if not broken and not threshold_reached(cert, template, now):
            continue
        if cert.thumbprint in replaced:
            notes.append(Note("6c:replaced", template.name, cert.thumbprint, "a request planned in 6(b) replaces it"))
            continue
        siblings: list[StoredCertificate] = []
        if broken:
            if cert.template_name not in broken_of:
                found_siblings = [c for c in personal.of(cert.template_name) if not c.archived and c.source == "manual"
                                  and not c.usable(now) and c.thumbprint not in replaced]
                broken_of[cert.template_name] = found_siblings, max(found_siblings, key=_recency).thumbprint
            siblings, most_recent = broken_of[cert.template_name]
            if most_recent != cert.thumbprint:
                continue  # the most recent broken one speaks for the template, and replaces this one too
        holder = (personal.newest_usable(template.name) if broken
                  else _carried_elsewhere(personal, cert, template, now, major=False))
        skip: tuple[str, str] | None = None
        if holder is not None:
            skip = ("6c:newer", f"another valid certificate of the template is in the store ({holder.thumbprint})")
        elif not template.autoenroll:
            skip = ("6c:no-autoenroll", "no autoenroll permission")
        elif template.archive_private_key and not view.kra_valid(group):
            skip = ("6c:no-kra", "key archival required and no valid KRA certificate")
        elif template.subject_source == "request" and not template.renewal_subject_from_existing:
            skip = ("6c:subject-required", "the subject must be supplied and may not come from the old certificate")
        elif options.context == "machine" and template.user_interaction:
            skip = ("6c:user-interaction", "a machine template that requires user interaction")
        elif template.ra_signatures >= 2 and not personal.has_ra_certificate():
            skip = ("6c:ra-signatures", "2+ RA signatures required and no RA certificate")
        elif template.name in pending:
            skip = ("6c:pending", "a request for it is pending")
        if skip is not None:
            notes.append(Note(skip[0], template.name, cert.thumbprint, skip[1]))
            continue
        issuers, url = view.issuer_order(template.name, group, new_request=broken)
        if not issuers:
            renewal_only = broken and bool(view.issuer_order(template.name, group, new_request=False)[0])
            rule = "6c:renewal-only" if renewal_only else "6c:no-issuer"
            why = "only renewal-only issuers serve it, and this is a new request" if renewal_only \
                else "no valid issuer serves the template"
            notes.append(Note(rule, template.name, cert.thumbprint, why))
            continue
        if broken:
            rule = "6c:expired" if cert.expired(now) else "6c:revoked" if cert.revoked else "6c:invalid"
            actions.append(Action(
                Kind.RENEW_MANUAL, rule, template=template.name, thumbprint=cert.thumbprint, issuers=tuple(issuers),
                policy_url=url, replaces=tuple(sorted(c.thumbprint for c in siblings)), replace_action="renew",
                new_request=True, subject_from=cert.thumbprint, detail="new request from its subject"))
        else:
            actions.append(Action(
                Kind.RENEW_MANUAL, "6c:threshold", template=template.name, thumbprint=cert.thumbprint,
                issuers=tuple(issuers), policy_url=url, replaces=(cert.thumbprint,), replace_action="renew",
                detail="renewal due"))
    return actions


def _cleanup(view: _PolicyView, personal: _Certs, now: dt.datetime) -> list[Action]:
    """Archived certificates of "delete" templates go once expired or revoked; encryption never."""
    actions: list[Action] = []
    for cert in personal.all:
        if cert.archived and _deletable(view, cert, now):
            actions.append(Action(Kind.DELETE, "cleanup:delete", template=cert.template_name,
                                  thumbprint=cert.thumbprint,
                                  detail="archived and " + ("revoked" if cert.revoked else "expired")))
    return actions


def renewed_by_agent(options: Options, servers: Iterable[PolicyServer], store: StoreSnapshot,
                     now: dt.datetime) -> frozenset[str]:
    """Personal certificates the agent takes care of itself: it renews them at their threshold, a
    superseding template replaces them, or a newer valid certificate of the template already
    holds it. The expiry monitor warns (1003/1002) about every other certificate: the seed raises
    those events only for what autoenrollment will not renew."""
    if not options.enabled:
        return frozenset()
    view = _PolicyView(servers)
    personal = _Certs((c for c in store.certificates if c.store == "personal" and not c.archived), now)
    handled: set[str] = set()
    for cert in personal.all:
        if cert.template_oid is None:
            continue
        newest = personal.newest_usable(cert.template_name) if cert.template_name else None
        if newest is not None and _recency(newest) > _recency(cert):
            handled.add(cert.thumbprint)  # an older copy: the newer certificate holds the template
            continue
        found = view.find(oid=cert.template_oid, policy_id=cert.policy_id)
        if found is None:
            continue
        template, group = found
        if cert.source == "auto" and options.enroll:
            skip = _autoenroll_skip(options, view, template, group)
            if skip is None or skip[0] == "6a:superseded":
                handled.add(cert.thumbprint)
        elif cert.source == "manual" and options.manage and _manual_renewable(options, view, template, group,
                                                                               personal, now):
            handled.add(cert.thumbprint)
    return frozenset(handled)


def _manual_renewable(options: Options, view: _PolicyView, template: TemplatePolicy, group: list[PolicyServer],
                      personal: _Certs, now: dt.datetime) -> bool:
    """6(c)'s standing reasons not to renew a manually enrolled certificate, none of which holds."""
    return (template.autoenroll and bool(view.issuers_in(group, template.name, new_request=False))
            and not (template.archive_private_key and not view.kra_valid(group))
            and not (template.subject_source == "request" and not template.renewal_subject_from_existing)
            and not (options.context == "machine" and template.user_interaction)
            and not (template.ra_signatures >= 2 and not personal.has_ra_certificate()))
