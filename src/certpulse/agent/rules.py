"""The planner's rules, each condition written once: a skip check is one small pure function of a
:class:`RuleInput` that answers a :class:`Skip` or None, and each rule of SPEC 6(a), 6(b), 6(c)
and cleanup lists its checks in a :class:`Chain`, in the order the seed lists them. The first
check that skips decides and names the note (``6a:no-kra``), as cert-manager's policy chains do.
Also here: when renewal falls due (``min(renewal period, 20 % of the lifetime)`` before expiry).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Callable
from typing import Literal, TypeAlias

from certpulse.agent.model import Note, Options, StoredCertificate, TemplatePolicy
from certpulse.agent.policy_view import CertIndex, Group, PolicyView
from certpulse.machine.current import recency

LIFETIME_SHARE = 5  # renew when at most 1/5 (20 %) of the lifetime is left

Section = Literal["6a", "6b", "6c", "cleanup"]
SkipCode = Literal[
    "pending", "no-autoenroll", "no-issuer", "renewal-only", "no-kra", "ra-signatures", "no-ra-certificate",
    "subject-required", "user-interaction", "superseded", "directory", "newer", "replaced",
    "archive", "encryption",
]


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
    view: PolicyView
    template: TemplatePolicy
    group: Group
    certs: CertIndex
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
    late = given.view.starting_later(given.group, given.template.name, given.now)
    return Skip("no-issuer", "no valid issuer serves the template" + (f": {late}" if late else ""))


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
            name == given.template.name and given.now <= not_after for name, not_after in directory_of(given.group)):
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
              else carried_elsewhere(given.certs, cert, given.template, given.now, major=False))
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


def directory_of(group: Group) -> list[tuple[str, dt.datetime]]:
    return [entry for server in group for entry in server.directory]


def carried_elsewhere(personal: CertIndex, cert: StoredCertificate, template: TemplatePolicy,
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
