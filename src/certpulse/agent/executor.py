"""The executor: carries out the planner's actions against the CA and the machine's store.

Every answer is hostile: an issued certificate must hold the key the agent generated, chain to
a pinned root, name the requested template and nothing that was not asked for, or it is
refused and the current certificate stays in place. Requests are persisted (key included)
before they are sent and resent with the same idempotency key after a crash, so a kill at any
point never leads to a second certificate for the same request. A template that archives keys
gets the new key sealed to the KRA the policy names, sent with the request.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import logging
from collections.abc import Mapping, Sequence
from typing import Any, Literal

from cryptography import x509

from certpulse.agent import gather
from certpulse.agent.client import CAClient, RequestAnswer, ServerRefused, ServerUnavailable
from certpulse.agent.csr import build_csr, csr_pem, names_of, renewal_signature
from certpulse.agent.local_faults import LOCAL_ERRORS, describe
from certpulse.agent.model import Action, Kind, TemplatePolicy
from certpulse.agent.revocation import remember_revoked
from certpulse.errors import Reason, Refusal
from certpulse.faults import fault_point
from certpulse.machine.certstore import Flight, LocalStore
from certpulse.machine.events import EventDraft, EventId
from certpulse.pki import key_archival, template_info
from certpulse.pki.certs import pem
from certpulse.pki.keys import PrivateKey, generate_private_key, key_matches
from certpulse.pki.names import is_hostname

log = logging.getLogger("certpulse.agent")

# "failed": a local fault (disk, files, database) stopped this action; the others go on.
Outcome = Literal["done", "pending", "refused", "unavailable", "skipped", "failed"]
# Refusals that mean "not this issuer": the next one in the action's list is tried.
TRY_NEXT_ISSUER = ("no-issuer", "unknown-issuer", "issuer-renewal-only")
# Refusals of names a renewal copied from the old certificate (by the CA, or into the CSR by this
# agent) that the template no longer allows: one new request from the principal's own names follows.
COPIED_NAMES_REFUSED = ("name-no-longer-allowed", "name-not-allowed")


@dataclasses.dataclass
class ActionOutcome:
    action: Action
    outcome: Outcome
    detail: str = ""
    thumbprint: str | None = None
    retry_after: float | None = None  # the server's Retry-After, when it was unavailable
    evented: bool = False  # the failure already has its own event (a denial)
    reason: str | None = None  # the CA's reason, when it refused the request
    cause: str | None = None  # the local fault's cause (local_faults.LOCAL_CAUSES), when it failed

    def to_dict(self) -> dict[str, Any]:
        return {**self.action.to_dict(), "outcome": self.outcome, "outcome_detail": self.detail,
                **({"new_thumbprint": self.thumbprint} if self.thumbprint else {})}


class Executor:
    """Carries out actions for one pulse (or one manual request) with the policies it gathered.

    ``clients`` are keyed by policy server URL; ``principal`` is the name this machine enrolls
    as (a certificate built from the principal must name it and nothing else)."""

    def __init__(self, store: LocalStore, clients: Mapping[str, CAClient], principal: str,
                 policies: Sequence[gather.GatheredPolicy]) -> None:
        self.store = store
        self.clients = clients
        self.principal = principal
        self.policies = list(policies)

    def template(self, name: str | None, url: str | None = None) -> tuple[TemplatePolicy, gather.GatheredPolicy]:
        """The template as the policy server at ``url`` describes it (any server when None)."""
        for policy in sorted(self.policies, key=lambda p: p.server.url != url):
            template = policy.server.template(name or "")
            if template is not None:
                return template, policy
        raise ServerUnavailable(f"template {name!r} vanished from the policy")

    def execute(self, action: Action, now: dt.datetime) -> ActionOutcome:
        try:
            if action.kind in (Kind.RENEW, Kind.ENROLL, Kind.RENEW_MANUAL):
                return self._request(action, now)
            if action.kind is Kind.POLL_PENDING:
                return self._poll(action, now)
            if action.kind is Kind.DROP_STALE_REQUEST:
                return self._drop_stale(action, now)
            if action.kind is Kind.DELETE and action.thumbprint:
                try:
                    self.store.delete(action.thumbprint, now)
                except Refusal as exc:  # a binding still serves it
                    return ActionOutcome(action, "skipped", exc.detail)
                return ActionOutcome(action, "done")
        except ServerUnavailable as exc:
            return ActionOutcome(action, "unavailable", exc.detail, retry_after=exc.retry_after)
        except ServerRefused as exc:
            return ActionOutcome(action, "refused", f"{exc.reason}: {exc.detail}")
        except LOCAL_ERRORS as exc:  # this action's files or rows: the pulse goes on with the others
            return self._failed(action, exc)
        return ActionOutcome(action, "skipped", "nothing to do")

    def _failed(self, action: Action, exc: BaseException) -> ActionOutcome:
        cause, words = describe(exc, self.store.root)
        what = f"{action.kind.value} of template {action.template}" if action.template else action.kind.value
        log.error("%s failed: %s", what, words)
        return ActionOutcome(action, "failed", f"{what}: {words}", cause=cause)

    def resume(self, flight: Flight, now: dt.datetime) -> ActionOutcome:
        """A request sent (or about to be) when the agent stopped: resend it, same key, same id."""
        action = Action(Kind(flight.kind) if flight.kind in {k.value for k in Kind} else Kind.ENROLL,
                        "resume", template=flight.template_name, issuers=flight.issuers,
                        thumbprint=flight.renewal_of or (flight.replaces[0] if flight.replaces else None),
                        replaces=flight.replaces, detail="resumed after an interruption")
        try:
            return self.submit(action, flight, now)
        except LOCAL_ERRORS as exc:
            return self._failed(action, exc)

    def _drop_stale(self, action: Action, now: dt.datetime) -> ActionOutcome:
        for flight in self.store.flights():
            if flight.request_id == action.request_id:
                self.store.drop_flight(flight.id, now, EventDraft(
                    EventId.PENDING_DROPPED, template=flight.template_name,
                    old=self.store.facts_if_held(flight.renewal_of), detail="pending for 60 days or more",
                    data={"request_id": flight.request_id, "issuer": flight.issuer}))
        return ActionOutcome(action, "done", "pending request dropped after 60 days")

    def _request(self, action: Action, now: dt.datetime) -> ActionOutcome:
        template, policy = self.template(action.template, action.policy_url)
        old = self.store.find(action.thumbprint) if action.thumbprint else None
        subject_of = action.subject_from or (old.thumbprint if old else None)
        subject: x509.Name | None = None
        sans: list[x509.GeneralName] = []
        if subject_of is not None and template.subject_source == "request":
            old_cert = self.store.certificate(subject_of)
            subject, sans = old_cert.subject, names_of(old_cert)
        key = generate_private_key(template.default_key_type)
        csr = build_csr(key, subject, sans)
        renewal_of = old.thumbprint if old and not action.new_request and action.kind is not Kind.ENROLL else None
        flight = self.store.begin_flight(
            kind=action.kind.value, template=template.name, policy_url=policy.server.url, issuers=action.issuers,
            key=key, csr=csr, renewal_of=renewal_of, replaces=action.replaces, replace_action=action.replace_action,
            source="manual" if action.kind is Kind.RENEW_MANUAL else "auto", now=now)
        outcome = self.submit(action, flight, now)
        copied = subject is not None or (renewal_of is not None and template.subject_source == "request"
                                         and template.renewal_subject_from_existing)
        if outcome.reason in COPIED_NAMES_REFUSED and copied:
            return self._request_own_names(action, template, policy, outcome, now)
        return outcome

    def _request_own_names(self, action: Action, template: TemplatePolicy, policy: gather.GatheredPolicy,
                           refused: ActionOutcome, now: dt.datetime) -> ActionOutcome:
        """The template no longer allows the names the old certificate carried: a new request
        (no renewal evidence, which would copy them again) from what is this principal's own, its
        name as the subject and, when it is a host name, as the one DNS name. Once per action: a
        refusal of these names too ends it, and the next pulse starts over from the renewal."""
        principal = self.principal.lower()
        subject = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, self.principal)])
        sans: list[x509.GeneralName] = [x509.DNSName(principal)] if is_hostname(principal, allow_wildcard=False) else []
        key = generate_private_key(template.default_key_type)
        flight = self.store.begin_flight(
            kind=Kind.ENROLL.value, template=template.name, policy_url=policy.server.url, issuers=action.issuers,
            key=key, csr=build_csr(key, subject, sans), renewal_of=None, replaces=action.replaces,
            replace_action=action.replace_action, source="auto", now=now)
        log.info("%s: the old names are no longer allowed (%s); requesting the principal's own names instead",
                 template.name, refused.detail)
        outcome = self.submit(action, flight, now)
        return dataclasses.replace(outcome, detail=f"{outcome.detail} (after {refused.detail})".strip())

    def _sealed_key(self, flight: Flight) -> dict[str, str] | None:
        """The flight's key sealed to the KRA, when its template archives keys (None otherwise).

        Sealed to the first valid KRA certificate the policy lists: the CA checks the envelope
        against its first enabled KRA, which the policy lists first. Sealed again on a resend (the
        envelope is random; the CA answers a resend from the first request's record). A template the
        policy no longer lists is sent as it is: the CA's refusal then says why."""
        try:
            template, policy = self.template(flight.template_name, flight.policy_url)
        except ServerUnavailable:
            return None
        if not template.archive_private_key:
            return None
        if not policy.trust.kra:
            raise Refusal(Reason.KEY_ARCHIVAL_REQUIRED,
                          f"template {template.name!r} archives keys and the policy names no valid KRA")
        return key_archival.seal(self.store.flight_key(flight.id), policy.trust.kra[0])

    def submit(self, action: Action, flight: Flight, now: dt.datetime) -> ActionOutcome:
        """Send the flight to its issuers in order of preference until one takes it."""
        client = self.clients[flight.policy_url]
        csr = x509.load_der_x509_csr(flight.csr_der)
        renewal: tuple[str, bytes] | None = None
        if flight.renewal_of:
            renewal = (pem(self.store.certificate(flight.renewal_of)),
                       renewal_signature(self.store.key(flight.renewal_of), csr))
        try:
            sealed = self._sealed_key(flight)
        except Refusal as exc:  # no KRA to seal to, or not one that can wrap a key
            self.store.drop_flight(flight.id)
            return ActionOutcome(action, "refused", f"{exc.reason.value}: {exc.detail}")
        unavailable: list[str] = []
        retry_after: list[float] = []
        for issuer in flight.issuers:
            try:
                answer = client.submit(template=flight.template_name, csr_pem=csr_pem(csr), issuer=issuer,
                                       idempotency_key=flight.id, renewal=renewal, archived_key=sealed)
            except ServerUnavailable as exc:
                unavailable.append(f"{issuer}: {exc.detail}")
                retry_after += [exc.retry_after] if exc.retry_after is not None else []
                continue
            except ServerRefused as exc:
                if exc.reason in TRY_NEXT_ISSUER:
                    unavailable.append(f"{issuer}: {exc.reason}")
                    continue
                self.store.drop_flight(flight.id)
                if exc.reason in ("renewal-of-revoked", "renewal-of-expired") and flight.renewal_of:
                    remember_revoked(self.store, flight.renewal_of)
                return ActionOutcome(action, "refused", f"{exc.reason}: {exc.detail}", reason=exc.reason)
            return self._settle(action, flight, issuer, answer, now)
        return ActionOutcome(action, "unavailable", "; ".join(unavailable) or "no issuer to try",
                             retry_after=max(retry_after) if retry_after else None)

    def _settle(self, action: Action, flight: Flight, issuer: str, answer: RequestAnswer,
                now: dt.datetime) -> ActionOutcome:
        if answer.status == "pending":
            self.store.mark_pending(flight.id, issuer, answer.request_id, now)
            return ActionOutcome(action, "pending", f"request {answer.request_id} awaits approval")
        if answer.status != "issued" or answer.certificate is None:
            why = f"request {answer.request_id} {answer.status}: {answer.reason or ''}"
            self.store.drop_flight(flight.id, now, EventDraft(
                EventId.REQUEST_DENIED, action=flight.kind, template=flight.template_name,
                old=self.store.facts_if_held(flight.renewal_of or (flight.replaces[0] if flight.replaces else None)),
                detail=why, data={"request_id": answer.request_id, "issuer": issuer, "status": answer.status}))
            return ActionOutcome(action, "refused", why, evented=True)
        template, policy = self.template(flight.template_name, flight.policy_url)
        key = self.store.flight_key(flight.id)
        try:
            cert = x509.load_pem_x509_certificate(answer.certificate.encode())
            chain = [x509.load_pem_x509_certificate(c.encode()) for c in answer.chain]
            problem = self._check_answer(flight, cert, chain, key, template, policy.trust)
        except ValueError:
            problem = "not a parseable certificate"
        if problem is not None:
            log.warning("refusing the certificate for %s: %s", flight.template_name, problem)
            self.store.drop_flight(flight.id)
            return ActionOutcome(action, "refused", f"certificate refused: {problem}")
        fault_point("before-install", self.store.root)
        record = self.store.install(
            key=key, cert=cert, chain=chain, source=flight.source, now=now,
            policy_id=policy.server.policy_id, issuer_name=issuer, replaces=flight.replaces, flight_id=flight.id,
            template_name=template.name, replace_action=flight.replace_action, policy_url=flight.policy_url)
        for doomed in action.delete_replaced:
            # Replaced and already expired or revoked under a "delete" template: cleanup's rule.
            with contextlib.suppress(Refusal):
                self.store.delete(doomed, now)
        return ActionOutcome(action, "done", f"installed {record.thumbprint}", record.thumbprint)

    def _check_answer(self, flight: Flight, cert: x509.Certificate, chain: list[x509.Certificate],
                      key: PrivateKey, template: TemplatePolicy, trust: gather.Trust) -> str | None:
        """Why an issued certificate must not be installed, or None when it is acceptable."""
        if not key_matches(key, cert.public_key()):
            return "it does not hold the key this agent generated"
        if not gather.chain_valid(cert, [*chain, *trust.issuers.values()], trust.roots, cert.not_valid_before_utc):
            return "it does not chain to a pinned root"
        info = template_info.decode(cert)
        if info is None or info.oid != template.oid:
            return "it does not name the requested template"
        asked = {str(n.value).lower() for n in names_of(x509.load_der_x509_csr(flight.csr_der))}
        got = {str(n.value).lower() for n in names_of(cert)}
        if template.subject_source == "principal":
            allowed = {self.principal.lower()}
            cns = [str(a.value) for a in cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)]
            if any(cn.lower() != self.principal.lower() for cn in cns) or not got <= allowed:
                return f"it names {sorted(got | set(cns))}, not this principal"
        elif not got <= asked and flight.renewal_of is None:
            return f"it names {sorted(got - asked)}, which were not asked for"
        return None

    def _poll(self, action: Action, now: dt.datetime) -> ActionOutcome:
        flight = next((f for f in self.store.flights() if f.request_id == action.request_id), None)
        if flight is None:
            return ActionOutcome(action, "skipped", "no such pending request")
        try:
            answer = self.clients[flight.policy_url].request(flight.request_id or 0)
        except ServerUnavailable as exc:
            return ActionOutcome(action, "pending", f"issuer unreachable, kept: {exc.detail}")
        except ServerRefused as exc:
            if exc.status == 404:
                self.store.drop_flight(flight.id)
                return ActionOutcome(action, "refused", "the CA no longer knows the request")
            raise
        if answer.status == "pending":
            return ActionOutcome(action, "pending", "still pending")
        return self._settle(action, flight, flight.issuer or "", answer, now)
