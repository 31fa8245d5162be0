"""The autoenrollment planner: options + policy + store + ``now`` -> ordered actions. Pure.

It follows SPEC "A pulse, in order" rule by rule; every action and every skip names the rule
that caused it (``5:stale``, ``6a:threshold``, ``6b:missing``, ``6c:expired``, ``cleanup:…``).
Skips are notes, not actions: a second pulse at the same instant, after the first one's actions
were carried out, plans no action at all. The result never depends on the order in which the
store lists its certificates.

Each condition under which a rule does not act is one small check (``needs_kra``, ``superseded``,
…) written once; each rule lists its checks in a :class:`Chain` in the seed's order, and the
first check that skips names the note (``6a:no-kra``). The plan also says which certificates
the agent takes care of itself (:attr:`Plan.handled`), from the same pass, so the expiry monitor
needs no second opinion.

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
from collections.abc import Callable, Iterable
from typing import Literal, TypeAlias

from certpulse.agent.model import (
    AUTH_STRENGTH,
    Action,
    IssuerPolicy,
    Kind,
    Options,
    PolicyServer,
    ReplaceAction,
    StoredCertificate,
    StoreSnapshot,
    TemplatePolicy,
)
from certpulse.machine.current import newest, recency

STALE_PENDING = dt.timedelta(days=60)
LIFETIME_SHARE = 5  # renew when at most 1/5 (20 %) of the lifetime is left

Group: TypeAlias = tuple[PolicyServer, ...]  # the servers of one policy id, best first
Section = Literal["6a", "6b", "6c", "cleanup"]
SkipCode = Literal[
    "pending", "no-autoenroll", "no-issuer", "renewal-only", "no-kra", "ra-signatures", "no-ra-certificate",
    "subject-required", "user-interaction", "superseded", "directory", "newer", "replaced",
    "archive", "encryption",
]


@dataclasses.dataclass(frozen=True)
class Note:
    """Something the planner decided not to do, and the rule that says so."""

    rule: str
    template: str | None = None
    thumbprint: str | None = None
    detail: str = ""


@dataclasses.dataclass(frozen=True)
class Plan:
    """The pulse's actions in order, the skips as notes, and ``handled``: the personal
    certificates the agent takes care of itself. Those it renews (6a, 6c), those a superseding
    template replaces, and older copies of a template a newer valid certificate holds; the
    expiry monitor warns (1003 / 1002) about every other one, since the seed raises those events
    only for what autoenrollment will not renew."""

    actions: tuple[Action, ...]
    notes: tuple[Note, ...]
    handled: frozenset[str] = frozenset()


@dataclasses.dataclass(frozen=True, slots=True)
class Skip:
    """Why a rule does not act: a code (``no-kra``) and a sentence. The chain that found it adds
    its section (``6a:no-kra``), so one check serves every rule that lists the same condition."""

    code: SkipCode
    detail: str


@dataclasses.dataclass(frozen=True, slots=True)
class RuleInput:
    """What a skip check may look at: the options, the policy, the template (in the policy group
    it was found in), the personal store, ``now``, the templates with a request pending or in
    flight and, for the rules about one certificate (6c), that certificate and the ones a new
    request of 6(b) already replaces."""

    options: Options
    view: _PolicyView
    template: TemplatePolicy
    group: Group
    certs: _Certs
    now: dt.datetime
    pending: frozenset[str] = frozenset()
    cert: StoredCertificate | None = None
    replaced: frozenset[str] = frozenset()


Check: TypeAlias = Callable[[RuleInput], Skip | None]


@dataclasses.dataclass(frozen=True, slots=True)
class Chain:
    """A rule's skip checks in the order SPEC and the seed list them. The first check that skips
    decides and the rest are not asked (cert-manager's policy chains work the same way)."""

    section: Section
    checks: tuple[Check, ...]

    def first_skip(self, given: RuleInput) -> Skip | None:
        for check in self.checks:
            skip = check(given)
            if skip is not None:
                return skip
        return None

    def rule(self, skip: Skip) -> str:
        return f"{self.section}:{skip.code}"

    def note(self, skip: Skip, template: str, thumbprint: str | None = None) -> Note:
        return Note(self.rule(skip), template, thumbprint, skip.detail)


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


def serving_issuers(group: Iterable[PolicyServer], template: str, *,
                    new_request: bool) -> tuple[tuple[PolicyServer, IssuerPolicy], ...]:
    """The group's valid issuers that serve the template, best first: reachable ones, then by
    cost and name. A new request cannot go to a renewal-only issuer."""
    pairs = [(server, issuer) for server in group for issuer in server.issuers
             if issuer.valid and template in issuer.templates and not (new_request and issuer.renewal_only)]
    return tuple(sorted(pairs, key=lambda pair: (not pair[1].reachable, pair[1].cost, pair[1].name)))


class _PolicyView:
    """The policy servers, grouped by policy id and ordered by cost then authentication strength.

    Lookups are indexed and remembered: a view lives for one planning pass over a policy that
    does not change meanwhile, and a pulse over thousands of certificates asks the same
    questions (a template by OID, its issuers, its successor) for each of them."""

    def __init__(self, servers: Iterable[PolicyServer]) -> None:
        members: dict[str, list[PolicyServer]] = {}
        for server in servers:
            members.setdefault(server.policy_id, []).append(server)
        groups = (tuple(sorted(m, key=lambda s: (s.cost, AUTH_STRENGTH.get(s.auth, 9), s.url)))
                  for m in members.values())
        self.groups: list[Group] = sorted(
            groups, key=lambda g: (g[0].cost, AUTH_STRENGTH.get(g[0].auth, 9), g[0].policy_id))
        default = [g for g in self.groups if any(s.is_default for s in g)]
        self.default: Group = default[0] if default else (self.groups[0] if self.groups else ())
        # Per group, per server in order: its templates by name and by OID (the first one listed,
        # as PolicyServer.template answers).
        self._tables: dict[int, list[tuple[dict[str, TemplatePolicy], dict[str, TemplatePolicy]]]] = {}
        # Template name -> (group, template) for every template that supersedes it, in the order
        # groups, servers and templates are listed.
        self._successors: dict[str, list[tuple[Group, TemplatePolicy]]] = {}
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
        self._orders: dict[str | None, list[Group]] = {}
        self._found: dict[tuple[str | None, str | None, str | None], tuple[TemplatePolicy, Group] | None] = {}
        self._issuers: dict[tuple[int, str, bool], tuple[tuple[PolicyServer, IssuerPolicy], ...]] = {}
        self._issuer_orders: dict[tuple[str, int, bool], tuple[tuple[str, ...], str | None]] = {}
        self._superseded: dict[tuple[str, str], TemplatePolicy | None] = {}

    def _ordered(self, policy_id: str | None) -> list[Group]:
        """The groups to look in: the certificate's own, then the default, then the others."""
        ordered = self._orders.get(policy_id)
        if ordered is None:
            ordered = [g for g in self.groups if g[0].policy_id == policy_id]
            ordered += [self.default] if self.default and self.default not in ordered else []
            ordered += [g for g in self.groups if g not in ordered]
            self._orders[policy_id] = ordered
        return ordered

    def find(self, *, name: str | None = None, oid: str | None = None,
             policy_id: str | None = None) -> tuple[TemplatePolicy, Group] | None:
        """A template by name or OID: in the certificate's own policy group first, then the default,
        then any (the seed: the default policy renews certificates whose policy id is unknown).
        The first group in which the template is applicable wins; when it is applicable in none,
        the first group that lists it (so the skip can be explained)."""
        key = (name, oid, policy_id)
        if key in self._found:
            return self._found[key]
        first: tuple[TemplatePolicy, Group] | None = None
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

    def _issuer_pairs(self, group: Group, template: str,
                      new_request: bool) -> tuple[tuple[PolicyServer, IssuerPolicy], ...]:
        key = (id(group), template, new_request)
        found = self._issuers.get(key)
        if found is None:
            found = self._issuers[key] = serving_issuers(group, template, new_request=new_request)
        return found

    def serves(self, group: Group, template: str) -> bool:
        """Some valid issuer of the group serves the template (a renewal-only one will do)."""
        return bool(self._issuer_pairs(group, template, False))

    def issuer_order(self, template: str, group: Group, *, new_request: bool) -> tuple[list[str], str | None]:
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

    def applicable(self, template: TemplatePolicy, group: Group) -> bool:
        """Autoenroll permission and some valid issuer in the group serves it."""
        return template.autoenroll and self.serves(group, template.name)

    def kra_valid(self, group: Group) -> bool:
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

    def all_templates(self) -> list[tuple[TemplatePolicy, Group]]:
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


# -- the skip checks ----------------------------------------------------------------------------
# One function per condition of SPEC 6a / 6b / 6c and cleanup, each written once and listed by
# every chain whose rule names it. A check looks only at its input and answers a Skip or None.


def request_pending(given: RuleInput) -> Skip | None:
    """A request for the template awaits the CA (or an answer, in flight): its outcome settles
    the template, and a second request would double it."""
    return Skip("pending", "a request for it is pending") if given.template.name in given.pending else None


def no_autoenroll(given: RuleInput) -> Skip | None:
    """The client lacks the autoenroll permission: nothing is renewed or requested silently."""
    return None if given.template.autoenroll else Skip("no-autoenroll", "no autoenroll permission")


def no_issuer(given: RuleInput) -> Skip | None:
    """No valid issuer of the template's policy group serves it (a renewal-only one would do)."""
    if given.view.serves(given.group, given.template.name):
        return None
    return Skip("no-issuer", "no valid issuer serves the template")


def no_issuer_for_new_request(given: RuleInput) -> Skip | None:
    """No issuer of any policy takes a new request for the template (renewal-only ones do not)."""
    if given.view.issuer_order(given.template.name, given.group, new_request=True)[0]:
        return None
    return Skip("no-issuer", "no issuer serves the template for new requests")


def no_issuer_or_renewal_only(given: RuleInput) -> Skip | None:
    """6(c): no issuer takes this request. A broken certificate needs a new request, which a
    renewal-only issuer refuses (the seed's "Renewal Only" endpoint), so say when only such
    issuers are left."""
    new_request = given.cert is not None and not given.cert.usable(given.now)
    name, group = given.template.name, given.group
    if given.view.issuer_order(name, group, new_request=new_request)[0]:
        return None
    if new_request and given.view.issuer_order(name, group, new_request=False)[0]:
        return Skip("renewal-only", "only renewal-only issuers serve it, and this is a new request")
    return Skip("no-issuer", "no valid issuer serves the template")


def needs_kra(given: RuleInput) -> Skip | None:
    """The template archives the private key and no valid KRA certificate of its CA is present:
    the CA would refuse the request."""
    if given.template.archive_private_key and not given.view.kra_valid(given.group):
        return Skip("no-kra", "key archival required and no valid KRA certificate")
    return None


def ra_signatures_new_request_instead(given: RuleInput) -> Skip | None:
    """6(a): 2+ registration-authority signatures: not renewed; the seed sends it to 6(b)."""
    if given.template.ra_signatures >= 2:
        return Skip("ra-signatures", "2+ RA signatures required: a new request instead")
    return None


def ra_signatures(given: RuleInput) -> Skip | None:
    """6(b): 2+ RA signatures: the agent cannot gather them for a new request."""
    return Skip("ra-signatures", "2+ RA signatures required") if given.template.ra_signatures >= 2 else None


def one_ra_without_ra_certificate(given: RuleInput) -> Skip | None:
    """6(b): one RA signature and no valid RA certificate in the personal store to co-sign."""
    if given.template.ra_signatures == 1 and not given.certs.has_ra_certificate():
        return Skip("no-ra-certificate", "1 RA signature required and no RA certificate to co-sign")
    return None


def ra_signatures_without_ra_certificate(given: RuleInput) -> Skip | None:
    """6(c): 2+ RA signatures and no valid RA certificate in the personal store to sign with."""
    if given.template.ra_signatures >= 2 and not given.certs.has_ra_certificate():
        return Skip("ra-signatures", "2+ RA signatures required and no RA certificate")
    return None


def subject_required(given: RuleInput) -> Skip | None:
    """A renewal: the subject must be supplied and the template does not let it come from the
    existing certificate, so no one is there to supply it."""
    template = given.template
    if template.subject_source == "request" and not template.renewal_subject_from_existing:
        return Skip("subject-required", "the subject must be supplied and may not come from the old certificate")
    return None


def subject_supplied(given: RuleInput) -> Skip | None:
    """A first request: the subject must be supplied, and there is no old certificate to take
    it from; a person enrolls by hand."""
    if given.template.subject_source == "request":
        return Skip("subject-required", "the subject must be supplied: enroll by hand (cert request)")
    return None


def user_interaction_on_machine(given: RuleInput) -> Skip | None:
    """A machine has no one to answer: templates that require user interaction are users' only."""
    if given.options.context == "machine" and given.template.user_interaction:
        return Skip("user-interaction", "a machine template that requires user interaction")
    return None


def superseded(given: RuleInput) -> Skip | None:
    """A template this client can enroll for silently supersedes this one: 6(b) enrolls it in
    this template's place."""
    successor = given.view.superseded(given.template, given.options.context)
    return None if successor is None else Skip("superseded", f"superseded by {successor.name!r}")


def published_in_directory(given: RuleInput) -> Skip | None:
    """The template checks the directory and a certificate of it published for this principal is
    still valid (up to and including its ``not_after``)."""
    if given.template.check_directory and any(
            name == given.template.name and given.now <= not_after for name, not_after in _directory(given.group)):
        return Skip("directory", "a valid certificate is already published in the directory")
    return None


def replaced_by_new_request(given: RuleInput) -> Skip | None:
    """6(c): a request planned in 6(b) already replaces this certificate."""
    if given.cert is not None and given.cert.thumbprint in given.replaced:
        return Skip("replaced", "a request planned in 6(b) replaces it")
    return None


def newer_valid_copy(given: RuleInput) -> Skip | None:
    """6(c): another usable certificate of the template holds it: for a broken certificate any
    usable one; for a usable one a more recent copy, or one that is not due."""
    cert = given.cert
    if cert is None:
        return None
    holder = (given.certs.newest_usable(given.template.name) if not cert.usable(given.now)
              else _carried_elsewhere(given.certs, cert, given.template, given.now, major=False))
    if holder is None:
        return None
    return Skip("newer", f"another valid certificate of the template is in the store ({holder.thumbprint})")


def old_certificate_archived(given: RuleInput) -> Skip | None:
    """Cleanup: the template keeps replaced certificates archived rather than deleting them."""
    if given.template.old_certificate != "delete":
        return Skip("archive", "the template keeps old certificates archived")
    return None


def encryption_certificate(given: RuleInput) -> Skip | None:
    """Cleanup: an encryption certificate (purpose ``encryption`` or ``both``) may still be needed
    to decrypt, so it is only ever archived."""
    if given.template.purpose in ("encryption", "both"):
        return Skip("encryption", "an encryption certificate is only ever archived")
    return None


# -- the chains ---------------------------------------------------------------------------------

# 6(a)'s standing reasons (the seed's list): with none of them, the agent renews the certificate.
AUTO_STANDING = Chain("6a", (no_autoenroll, no_issuer, needs_kra, ra_signatures_new_request_instead,
                             subject_required, user_interaction_on_machine, superseded))
RENEW_AUTO = Chain("6a", (*AUTO_STANDING.checks, request_pending))
ENROLL_NEW = Chain("6b", (request_pending, published_in_directory, ra_signatures, one_ra_without_ra_certificate,
                          subject_supplied, user_interaction_on_machine, needs_kra, no_issuer_for_new_request))
RENEW_MANUAL = Chain("6c", (replaced_by_new_request, newer_valid_copy, no_autoenroll, needs_kra, subject_required,
                            user_interaction_on_machine, ra_signatures_without_ra_certificate, request_pending,
                            no_issuer_or_renewal_only))
# 6(c)'s standing reasons: those that do not depend on the certificate's own state or on this
# pulse (a newer copy, a pending or planned request), with the issuer looked for in its group.
MANUAL_STANDING = Chain("6c", (no_autoenroll, needs_kra, subject_required, user_interaction_on_machine,
                               ra_signatures_without_ra_certificate, no_issuer))
# Reasons an archived certificate that is expired or revoked is kept.
CLEANUP = Chain("cleanup", (old_certificate_archived, encryption_certificate))


class _Pass:
    """One planning pass: the inputs every rule shares, and the verdicts already reached.

    A chain whose checks look at the template, its group, the options and the store but not at
    a certificate gives every certificate of a template the same verdict: :meth:`verdict`
    reaches it once per template and group and remembers it, so a pass over 10,000 certificates
    of 500 templates asks each template's questions once (RENEW_AUTO, AUTO_STANDING,
    MANUAL_STANDING and CLEANUP are such chains; RENEW_MANUAL is not)."""

    def __init__(self, options: Options, view: _PolicyView, personal: _Certs, now: dt.datetime,
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
    personal = _Certs((c for c in certs if c.store == "personal"), now)
    actions: list[Action] = []
    notes: list[Note] = []
    pending = _pending_requests(options, store, now, actions, notes)
    run = _Pass(options, _PolicyView(servers), personal, now, frozenset(pending))
    covered: set[str] = set()  # templates that hold, or are about to hold, a usable certificate
    if options.enroll:
        actions += _renew_autoenrolled(run, covered, notes)
        actions += _enroll_missing(run, covered, notes)
    if options.manage:
        replaced = frozenset(thumb for action in actions for thumb in action.replaces)
        actions += _renew_manual(run, replaced, notes)
    actions += _cleanup(run)
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
        if _carried_elsewhere(personal, cert, template, now, major=True) is not None:
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
        if not run.view.applicable(template, group) or template.name in covered:
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


def _directory(group: Group) -> list[tuple[str, dt.datetime]]:
    return [entry for server in group for entry in server.directory]


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


def _newest_usable(certs: Iterable[StoredCertificate], template: str, now: dt.datetime) -> StoredCertificate | None:
    """The template's most recent usable certificate, by the store's one rule of recency
    (:mod:`certpulse.machine.current`): what the live link names is what the planner renews."""
    return newest(c for c in certs if c.template_name == template and c.usable(now))


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
        if recency(other) > recency(cert) or not (threshold_reached(other, template, now) or outdated):
            return other
    return None


def _has_ra_certificate(certs: Iterable[StoredCertificate], now: dt.datetime) -> bool:
    return any(c.is_ra and c.usable(now) for c in certs)
