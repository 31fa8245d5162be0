"""One pulse: resume interrupted requests, gather, plan, execute. The executor lives here.

The executor treats every answer as hostile: an issued certificate must hold the key the
agent generated, chain to the policy's roots and name nothing that was not asked for, or it is
refused and the current certificate stays in place. Requests are persisted (key included)
before they are sent and resent with the same idempotency key after a crash, so a kill at any
point never leads to a second certificate for the same request.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import logging
from pathlib import Path
from typing import Any

from cryptography import x509

from certpulse.agent import gather as gather_mod
from certpulse.agent.client import CAClient, RequestAnswer, ServerRefused, ServerUnavailable
from certpulse.agent.config import AgentConfig, read_credential
from certpulse.agent.csr import build_csr, csr_pem, names_of, renewal_signature
from certpulse.agent.expiry import expiry_notices
from certpulse.agent.faults import fault_point
from certpulse.agent.model import Action, Kind, Options, StoreSnapshot, TemplatePolicy
from certpulse.agent.planner import Plan, plan
from certpulse.agent.store import Flight, open_store
from certpulse.errors import Refusal
from certpulse.events.log import prune
from certpulse.events.model import CertFacts, EventDraft, EventId
from certpulse.pki import template_info
from certpulse.pki.certs import pem, thumbprint
from certpulse.pki.keys import PrivateKey, generate_private_key, key_matches

log = logging.getLogger("certpulse.agent")


_policy_cache_key = gather_mod.policy_cache_key


@dataclasses.dataclass
class ActionOutcome:
    action: Action
    outcome: str  # done | pending | refused | unavailable | skipped
    detail: str = ""
    thumbprint: str | None = None
    retry_after: float | None = None  # the server's Retry-After, when it was unavailable
    evented: bool = False  # the failure already has its own event (a denial)

    def to_dict(self) -> dict[str, Any]:
        return {**self.action.to_dict(), "outcome": self.outcome, "outcome_detail": self.detail,
                **({"new_thumbprint": self.thumbprint} if self.thumbprint else {})}


@dataclasses.dataclass
class PulseResult:
    started_at: dt.datetime
    outcome: str  # ok | failed | disabled
    plan: Plan | None = None
    outcomes: list[ActionOutcome] = dataclasses.field(default_factory=list)
    error: str | None = None
    retry_after: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "started_at": self.started_at.isoformat(), "outcome": self.outcome, "error": self.error,
            "retry_after": self.retry_after, "actions": [o.to_dict() for o in self.outcomes],
            "notes": [dataclasses.asdict(n) for n in (self.plan.notes if self.plan else ())],
        }


class Agent:
    def __init__(self, directory: Path, config: AgentConfig) -> None:
        self.directory = directory
        self.config = config
        self.store = open_store(directory, config)
        self.policy_cache = config.policy_refresh
        self.clients: dict[str, CAClient] = {}
        for server in config.servers:
            verify: Any = str(directory / server.ca_file) if server.ca_file else True
            self.clients[server.url] = CAClient(server.url, read_credential(directory, server), verify=verify)
        self.policies: list[gather_mod.GatheredPolicy] = []

    def close(self) -> None:
        for client in self.clients.values():
            client.close()
        self.store.close()

    @property
    def options(self) -> Options:
        c = self.config
        return Options(enabled=c.enabled, enroll=c.enroll, manage=c.manage, retrieve_pending=c.retrieve_pending,
                       context="machine" if c.context == "machine" else "user")

    # -- gather ---------------------------------------------------------------------------

    def fetch_policies(self, now: dt.datetime, *, force: bool = False) -> list[gather_mod.GatheredPolicy]:
        """Policy from every server; cached, refreshed no more often than every 10 minutes."""
        gathered: list[gather_mod.GatheredPolicy] = []
        errors: list[str] = []
        retry_after: list[float] = []
        for server in self.config.servers:
            cache_key = _policy_cache_key(server.url)
            cached = self.store.get_state(cache_key)
            data: dict[str, Any] | None = None
            # A policy "fetched" after now was cached under a clock that has since been set back:
            # stale, not fresh for as long as the clock was ahead.
            age = now - dt.datetime.fromisoformat(cached["fetched_at"]) if cached else None
            if cached and not force and age is not None and dt.timedelta(0) <= age < self.policy_cache:
                data = cached["policy"]
            else:
                try:
                    data = self.clients[server.url].policy()
                    self.store.set_state(cache_key, {"fetched_at": now.isoformat(), "policy": data})
                except ServerUnavailable as exc:
                    errors.append(exc.detail)
                    retry_after += [exc.retry_after] if exc.retry_after is not None else []
                    data = cached["policy"] if cached else None
            if data is not None:
                gathered.append(gather_mod.parse_policy(
                    data, url=server.url, cost=server.cost, auth="token", is_default=server.is_default, now=now))
        if not gathered:
            raise ServerUnavailable("no policy server answered: " + "; ".join(errors),
                                    max(retry_after) if retry_after else None)
        self.policies = gathered
        return gathered

    def cached_templates(self, now: dt.datetime) -> dict[str, TemplatePolicy]:
        """Templates by OID from the last policy each server gave (no network)."""
        return gather_mod.cached_templates(self.config.servers, self.store.get_state, now)

    def snapshot(self, now: dt.datetime) -> StoreSnapshot:
        return gather_mod.snapshot(self.store, self.policies, now, revoked=self._revoked(now),
                                   additional=self._additional())

    def _revoked(self, now: dt.datetime) -> frozenset[str]:
        """Revocation status from the CA; offline or unknown is ignored (the seed's rule)."""
        known = self._revoked_set()
        client = next(iter(self.clients.values()))
        for record in self.store.certificates(include_archived=False):
            if record.issuer_name is None or record.thumbprint in known or record.not_after < now:
                continue
            try:
                if client.certificate_status(record.serial, record.issuer_name) == "revoked":
                    known.add(record.thumbprint)
            except (ServerUnavailable, ServerRefused):
                continue
        self.store.set_state("revoked", sorted(known))
        return frozenset(known)

    def plan(self, now: dt.datetime, *, force_policy: bool = False) -> Plan:
        self.fetch_policies(now, force=force_policy)
        return plan(self.options, [p.server for p in self.policies], self.snapshot(now), now)

    # -- pulse ----------------------------------------------------------------------------

    def pulse(self, now: dt.datetime, *, force_policy: bool = False) -> PulseResult:
        result = PulseResult(started_at=now, outcome="ok")
        if not self.config.enabled:
            log.info("autoenrollment is disabled; the pulse does nothing")
            result.outcome = "disabled"
            self._record(result)
            return result
        try:
            self.store.recover(now)
            self.fetch_policies(now, force=force_policy)
            for flight in self.store.flights():
                if flight.status == "created":
                    # Sent (or about to be) when the agent stopped: resent with the same key and
                    # idempotency key. One still unanswered stays in flight, and the planner makes no
                    # other request for its template.
                    result.outcomes.append(self._resume(flight, now))
            snapshot = self.snapshot(now)
            result.plan = plan(self.options, [p.server for p in self.policies], snapshot, now)
            for action in result.plan.actions:
                result.outcomes.append(self.execute(action, now))
        except ServerUnavailable as exc:
            result.outcome, result.error, result.retry_after = "failed", exc.detail, exc.retry_after
            snapshot = None
        self._raise_failures(result.outcomes, now)
        self._monitor_expiry(snapshot, result.plan, now)
        prune(self.store.engine, now=now, max_age=self.config.event_retention,
              max_count=self.config.event_retention_count)
        if any(o.outcome == "unavailable" for o in result.outcomes):
            result.outcome = "failed"
            result.error = result.error or "; ".join(o.detail for o in result.outcomes if o.outcome == "unavailable")
            # Honour the longest Retry-After any server gave (the daemon waits at least that long).
            delays = [d for d in (result.retry_after, *(o.retry_after for o in result.outcomes)) if d is not None]
            result.retry_after = max(delays) if delays else None
        self._record(result)
        return result

    def _record(self, result: PulseResult) -> None:
        self.store.set_state("last_pulse", result.to_dict())
        counts = self.store.get_state("pulse_counts") or {}
        counts[result.outcome] = int(counts.get(result.outcome, 0)) + 1
        self.store.set_state("pulse_counts", counts)

    # -- events a pulse raises besides the store's own -----------------------------------

    def _raise_failures(self, outcomes: list[ActionOutcome], now: dt.datetime) -> None:
        """1100 for a request that was due and failed (a denial has its own 1102). Raised once per
        certificate (or template) and cause, not at every pulse; a success clears it."""
        failing: dict[str, str] = self.store.get_state("failing") or {}
        before = dict(failing)
        drafts: list[EventDraft] = []
        for item in outcomes:
            action = item.action
            if action.kind not in (Kind.RENEW, Kind.ENROLL, Kind.RENEW_MANUAL):
                continue
            key = action.thumbprint or f"template:{action.template}"
            if item.outcome in ("done", "pending"):
                failing.pop(key, None)
                continue
            if item.outcome not in ("refused", "unavailable") or item.evented:
                continue
            cause = "unavailable" if item.outcome == "unavailable" else item.detail.partition(":")[0]
            if failing.get(key) == cause:
                continue
            failing[key] = cause
            drafts.append(EventDraft(
                EventId.RENEWAL_FAILED, action=action.kind.value, template=action.template,
                old=self.store.facts_if_held(action.thumbprint), detail=f"{item.outcome}: {item.detail}",
                data={"rule": action.rule, "outcome": item.outcome, "cause": cause}))
        if failing != before:
            self.store.set_state("failing", failing)
        self.store.record(drafts, now)

    def _monitor_expiry(self, snapshot: StoreSnapshot | None, planned: Plan | None, now: dt.datetime) -> None:
        """1003 and 1002 for certificates the agent will not renew itself (and additional stores):
        the plan says which ones it takes care of."""
        if snapshot is None:  # no policy server answered: watch what is on disk all the same
            snapshot = gather_mod.snapshot(self.store, self.policies, now, revoked=frozenset(self._revoked_set()),
                                           additional=self._additional())
        current = {r.thumbprint for r in self.store.certificates(include_archived=False)}
        watched = tuple(c for c in snapshot.certificates if c.store != "personal" or c.thumbprint in current)
        held = dataclasses.replace(snapshot, certificates=watched)
        if planned is None:  # no plan this pulse: planning is pure, so ask it about what is held
            planned = plan(self.options, [p.server for p in self.policies], held, now)
        notices = expiry_notices(self.options, held, now, handled=planned.handled,
                                 warning_percent=self.config.expiry_warning_percent, raised=self.store.expiry_raised())
        if not notices:
            return
        monitored = {thumbprint(c): (folder, c) for folder, c in gather_mod.monitored_files(self._additional())}
        drafts: list[tuple[str, str, EventDraft]] = []
        for notice in notices:
            if notice.store == "personal":
                facts = self.store.facts_if_held(notice.thumbprint)
            elif notice.thumbprint in monitored:
                folder, cert = monitored[notice.thumbprint]
                facts = CertFacts.of(cert, template=None, store=str(folder))
            else:
                facts = None
            if facts is None:
                continue
            event_id = EventId.EXPIRED if notice.threshold == "expired" else EventId.CLOSE_TO_EXPIRATION
            detail = (f"expired at {notice.not_after.isoformat()}" if notice.threshold == "expired"
                      else f"{self.config.expiry_warning_percent}% of its lifetime left; expires "
                           f"{notice.not_after.isoformat()}")
            drafts.append((notice.thumbprint, notice.threshold, EventDraft(event_id, old=facts, detail=detail)))
        self.store.raise_expiry(drafts, now)

    def _additional(self) -> list[Path]:
        return [Path(p) for p in self.config.additional_stores]

    # -- executor -------------------------------------------------------------------------

    def _template(self, name: str | None, url: str | None = None) -> tuple[TemplatePolicy, gather_mod.GatheredPolicy]:
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
                for flight in self.store.flights():
                    if flight.request_id == action.request_id:
                        self.store.drop_flight(flight.id, now, EventDraft(
                            EventId.PENDING_DROPPED, template=flight.template_name,
                            old=self.store.facts_if_held(flight.renewal_of), detail="pending for 60 days or more",
                            data={"request_id": flight.request_id, "issuer": flight.issuer}))
                return ActionOutcome(action, "done", "pending request dropped after 60 days")
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
        return ActionOutcome(action, "skipped", "nothing to do")

    def _request(self, action: Action, now: dt.datetime) -> ActionOutcome:
        template, policy = self._template(action.template, action.policy_url)
        old = self.store.find(action.thumbprint) if action.thumbprint else None
        old_cert = self.store.certificate(old.thumbprint) if old else None
        subject: x509.Name | None = None
        sans: list[x509.GeneralName] = []
        if old_cert is not None and template.subject_source == "request":
            subject, sans = old_cert.subject, names_of(old_cert)
        key = generate_private_key(template.default_key_type)
        csr = build_csr(key, subject, sans)
        renewal_of = old.thumbprint if old and not action.new_request and action.kind is not Kind.ENROLL else None
        flight = self.store.begin_flight(
            kind=action.kind.value, template=template.name, policy_url=policy.server.url, issuers=action.issuers,
            key=key, csr=csr, renewal_of=renewal_of, replaces=action.replaces, replace_action=action.replace_action,
            source="manual" if action.kind is Kind.RENEW_MANUAL else "auto", now=now)
        return self._submit(action, flight, now)

    def _submit(self, action: Action, flight: Flight, now: dt.datetime) -> ActionOutcome:
        client = self.clients[flight.policy_url]
        csr = x509.load_der_x509_csr(flight.csr_der)
        renewal: tuple[str, bytes] | None = None
        if flight.renewal_of:
            renewal = (pem(self.store.certificate(flight.renewal_of)),
                       renewal_signature(self.store.key(flight.renewal_of), csr))
        unavailable: list[str] = []
        retry_after: list[float] = []
        for issuer in flight.issuers:
            try:
                answer = client.submit(template=flight.template_name, csr_pem=csr_pem(csr), issuer=issuer,
                                       idempotency_key=flight.id, renewal=renewal)
            except ServerUnavailable as exc:
                unavailable.append(f"{issuer}: {exc.detail}")
                retry_after += [exc.retry_after] if exc.retry_after is not None else []
                continue
            except ServerRefused as exc:
                if exc.reason in ("no-issuer", "unknown-issuer", "issuer-renewal-only"):
                    unavailable.append(f"{issuer}: {exc.reason}")
                    continue
                self.store.drop_flight(flight.id)
                if exc.reason in ("renewal-of-revoked", "renewal-of-expired") and flight.renewal_of:
                    self._remember_revoked(flight.renewal_of)
                return ActionOutcome(action, "refused", f"{exc.reason}: {exc.detail}")
            return self._settle(action, flight, issuer, answer, now)
        return ActionOutcome(action, "unavailable", "; ".join(unavailable) or "no issuer to try",
                             retry_after=max(retry_after) if retry_after else None)

    def _revoked_set(self) -> set[str]:
        """Thumbprints known to be revoked (from status answers and refused renewals)."""
        return set(self.store.get_state("revoked") or [])

    def _remember_revoked(self, print_: str) -> None:
        self.store.set_state("revoked", sorted(self._revoked_set() | {print_}))

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
        template, policy = self._template(flight.template_name, flight.policy_url)
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
            template_name=template.name, replace_action=flight.replace_action)
        for doomed in action.delete_replaced:
            # Replaced and already expired or revoked under a "delete" template: cleanup's rule.
            with contextlib.suppress(Refusal):
                self.store.delete(doomed, now)
        return ActionOutcome(action, "done", f"installed {record.thumbprint}", record.thumbprint)

    def _check_answer(self, flight: Flight, cert: x509.Certificate, chain: list[x509.Certificate],
                      key: PrivateKey, template: TemplatePolicy, trust: gather_mod.Trust) -> str | None:
        """Why an issued certificate must not be installed, or None when it is acceptable."""
        if not key_matches(key, cert.public_key()):
            return "it does not hold the key this agent generated"
        if not gather_mod.chain_valid(cert, [*chain, *trust.issuers.values()], trust.roots, cert.not_valid_before_utc):
            return "it does not chain to the policy's roots"
        info = template_info.decode(cert)
        if info is None or info.oid != template.oid:
            return "it does not name the requested template"
        asked = {str(n.value).lower() for n in names_of(x509.load_der_x509_csr(flight.csr_der))}
        got = {str(n.value).lower() for n in names_of(cert)}
        if template.subject_source == "principal":
            allowed = {self.config.principal.lower()}
            cns = [str(a.value) for a in cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)]
            if any(cn.lower() != self.config.principal.lower() for cn in cns) or not got <= allowed:
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

    def _resume(self, flight: Flight, now: dt.datetime) -> ActionOutcome:
        """A request sent (or about to be) when the agent stopped: resend it, same key, same id."""
        action = Action(Kind(flight.kind) if flight.kind in {k.value for k in Kind} else Kind.ENROLL,
                        "resume", template=flight.template_name, issuers=flight.issuers,
                        thumbprint=flight.renewal_of or (flight.replaces[0] if flight.replaces else None),
                        replaces=flight.replaces, detail="resumed after an interruption")
        return self._submit(action, flight, now)
