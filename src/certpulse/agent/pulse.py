"""One pulse: resume interrupted requests, gather, plan, execute, then say what went wrong.

:class:`Agent` composes the parts a pulse needs — the machine's store, one client per policy
server, the gather step, the pure planner, the :class:`~certpulse.agent.executor.Executor` —
and records every pulse's outcome. It raises the events a pulse raises besides the store's own:
1100 for a request that was due and failed or a local fault (:mod:`certpulse.machine.live_repair`,
:mod:`certpulse.agent.local_faults`), 1003/1002 for certificates the agent will not renew.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
from pathlib import Path
from typing import Any, Literal

import httpx
from cryptography import x509

from certpulse.agent import gather as gather_mod
from certpulse.agent import skew
from certpulse.agent.client import CAClient, ServerUnavailable
from certpulse.agent.config import AgentConfig, PolicyServerConfig, open_agent_store, read_credential
from certpulse.agent.executor import ActionOutcome, Executor
from certpulse.agent.expiry import expiry_notices
from certpulse.agent.local_faults import LOCAL_CAUSES, LOCAL_ERRORS, PULSE_KEY, PulseNotRecorded, describe
from certpulse.agent.model import Kind, Note, Options, StoreSnapshot
from certpulse.agent.planner import Plan, plan
from certpulse.agent.revocation import known_revoked, refresh_revoked
from certpulse.agent.trust import PinFile, ssl_context
from certpulse.machine import live_repair
from certpulse.machine.events import CertFacts, EventDraft, EventId
from certpulse.machine.live_repair import LocalFault
from certpulse.machine.log import prune
from certpulse.pki.certs import thumbprint
from certpulse.pki.fingerprint import ca_fingerprint

log = logging.getLogger("certpulse.agent")
PulseOutcome = Literal["ok", "failed", "disabled"]


@dataclasses.dataclass
class PulseResult:
    started_at: dt.datetime
    outcome: PulseOutcome
    plan: Plan | None = None
    outcomes: list[ActionOutcome] = dataclasses.field(default_factory=list)
    error: str | None = None
    retry_after: float | None = None
    trust_notes: list[Note] = dataclasses.field(default_factory=list)  # roots pinned or refused this pulse
    repairs: list[Note] = dataclasses.field(default_factory=list)  # local damage found and repaired

    def to_dict(self) -> dict[str, Any]:
        return {
            "started_at": self.started_at.isoformat(), "outcome": self.outcome, "error": self.error,
            "retry_after": self.retry_after, "actions": [o.to_dict() for o in self.outcomes],
            "notes": [dataclasses.asdict(n) for n in (*self.repairs, *(self.plan.notes if self.plan else ()),
                                                     *self.trust_notes)],
        }


class Agent:
    """The agent of one agent folder: its store, its policy servers, and the pulse.

    ``transport`` (httpx's own seam) replaces the network for every policy server: tests give it
    an ``httpx.MockTransport`` to answer as a hostile CA would, with no process in between."""

    def __init__(self, directory: Path, config: AgentConfig, *,
                 transport: httpx.BaseTransport | None = None) -> None:
        self.directory = directory
        self.config = config
        self.policy_cache = config.policy_refresh
        self.transport = transport
        self.clients: dict[str, CAClient] = {}
        self.pins: dict[str, list[x509.Certificate]] = {}
        for server in config.servers:
            self.pins[server.url] = self._pin_file(server).load()
            self.clients[server.url] = self._client(server)
        self.store = open_agent_store(directory, config)
        self.policies: list[gather_mod.GatheredPolicy] = []
        self.trust_notes: list[Note] = []

    def _pin_file(self, server: PolicyServerConfig) -> PinFile:
        assert server.trust_roots is not None  # load_config refuses a server without pins
        return PinFile(self.directory, server.trust_roots)

    def _client(self, server: PolicyServerConfig) -> CAClient:
        """A client that verifies the server's TLS certificate against its pinned roots alone."""
        return CAClient(server.url, read_credential(self.directory, server), verify=ssl_context(self.pins[server.url]),
                        transport=self.transport, deadline=self.config.http_deadline)

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
        self.trust_notes = []
        for server in self.config.servers:
            cache_key = gather_mod.policy_cache_key(server.url)
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
                policy = gather_mod.parse_policy(data, url=server.url, cost=server.cost, auth="token",
                                                 is_default=server.is_default, now=now, pins=self.pins[server.url])
                if policy.new_roots:
                    self._pin_new_roots(server, policy.new_roots)
                if policy.distrust is not None:
                    log.error("policy server %s: %s", server.url, policy.distrust)
                    self.trust_notes.append(Note(rule="untrusted-root", detail=f"{server.url}: {policy.distrust}"))
                gathered.append(policy)
        if not gathered:
            raise ServerUnavailable("no policy server answered: " + "; ".join(errors),
                                    max(retry_after) if retry_after else None)
        self.policies = gathered
        return gathered

    def _pin_new_roots(self, server: PolicyServerConfig, roots: tuple[x509.Certificate, ...]) -> None:
        """A root rollover: roots cross-signed by a pinned root join the pins, on disk first."""
        pins = [*self.pins[server.url], *roots]
        self._pin_file(server).save(pins)
        self.pins[server.url] = pins
        self.clients.pop(server.url).close()
        self.clients[server.url] = self._client(server)
        for root in roots:
            detail = (f"{server.url}: pinned the new root {root.subject.rfc4514_string()!r} "
                      f"(SHA-256 {ca_fingerprint(root)}), cross-signed by a pinned root")
            log.warning("%s", detail)
            self.trust_notes.append(Note(rule="root-pinned", detail=detail))

    def untrusted(self) -> list[str]:
        """Why policies gathered last are trusted for nothing (a root not under the pins)."""
        return [f"{p.server.url}: {p.distrust}" for p in self.policies if p.distrust is not None]

    def snapshot(self, now: dt.datetime, broken: frozenset[str] = frozenset()) -> StoreSnapshot:
        revoked = refresh_revoked(self.store, self.clients, self.policies, now)
        return gather_mod.snapshot(self.store, self.policies, now, revoked=revoked, additional=self._additional(),
                                   broken=broken)

    def executor(self) -> Executor:
        """An executor over the policies gathered last."""
        return Executor(self.store, self.clients, self.config.principal, self.policies)

    def plan(self, now: dt.datetime, *, force_policy: bool = False) -> Plan:
        self.fetch_policies(now, force=force_policy)
        planned = plan(self.options, [p.server for p in self.policies], self.snapshot(now), now)
        return dataclasses.replace(planned, notes=(*planned.notes, *self.trust_notes))

    # -- pulse ----------------------------------------------------------------------------

    def pulse(self, now: dt.datetime, *, force_policy: bool = False) -> PulseResult:
        """One pulse, always ending in a recorded outcome. A local fault (disk, files, database)
        fails the action it hit, or the pulse when it hit the pulse's own steps, in plain words;
        :class:`~certpulse.agent.local_faults.PulseNotRecorded` when even the outcome cannot be
        written."""
        result = PulseResult(started_at=now, outcome="ok")
        if not self.config.enabled:
            log.info("autoenrollment is disabled; the pulse does nothing")
            result.outcome = "disabled"
            self._record(result)
            return result
        snapshot: StoreSnapshot | None = None
        faults: list[LocalFault] = []
        broken: frozenset[str] = frozenset()
        complete = False
        try:
            found = live_repair.check(self.store)
            faults, broken = list(found.faults), found.broken
            for repair in found.repairs:
                log.warning("repaired: %s", repair.detail)
                result.repairs.append(Note(rule="repair", template=repair.template, thumbprint=repair.thumbprint,
                                           detail=repair.detail))
            for fault in faults:
                log.error("%s", fault.detail)
            self.store.recover(now)
            self.fetch_policies(now, force=force_policy)
            executor = self.executor()
            for flight in self.store.flights():
                if flight.status == "created":
                    # Sent (or about to be) when the agent stopped: resent with the same key and
                    # idempotency key. One still unanswered stays in flight, and the planner makes no
                    # other request for its template.
                    result.outcomes.append(executor.resume(flight, now))
            snapshot = self.snapshot(now, broken=broken)
            result.plan = plan(self.options, [p.server for p in self.policies], snapshot, now)
            for action in result.plan.actions:
                if action.kind in (Kind.RENEW, Kind.RENEW_MANUAL) and action.thumbprint in broken:
                    # Its key or certificate cannot be read: the fault above says so (one 1100).
                    result.outcomes.append(ActionOutcome(action, "skipped", "its files are damaged (see the error)"))
                    continue
                result.outcomes.append(executor.execute(action, now))
            complete = True
        except ServerUnavailable as exc:
            result.outcome, result.error, result.retry_after = "failed", exc.detail, exc.retry_after
            snapshot = None
        except LOCAL_ERRORS as exc:
            faults.append(self._pulse_fault(exc))
            snapshot = None
        try:
            self.trust_notes += self._clock_skew(now)
        except LOCAL_ERRORS as exc:
            faults.append(self._pulse_fault(exc))
        result.trust_notes = list(self.trust_notes)
        if self.untrusted():  # the pulse did what trusted servers allow, and fails saying why
            result.outcome = "failed"
            result.error = "; ".join(filter(None, [result.error, *self.untrusted()]))
        try:
            self._raise_failures(result.outcomes, faults, now, complete=complete)
            self._monitor_expiry(snapshot, result.plan, now, broken)
            prune(self.store.engine, now=now, max_age=self.config.event_retention,
                  max_count=self.config.event_retention_count)
        except LOCAL_ERRORS as exc:
            faults.append(self._pulse_fault(exc))
        if any(o.outcome == "unavailable" for o in result.outcomes):
            result.outcome = "failed"
            result.error = result.error or "; ".join(o.detail for o in result.outcomes if o.outcome == "unavailable")
            # Honour the longest Retry-After any server gave (the daemon waits at least that long).
            delays = [d for d in (result.retry_after, *(o.retry_after for o in result.outcomes)) if d is not None]
            result.retry_after = max(delays) if delays else None
        local = [*(f.detail for f in faults), *(o.detail for o in result.outcomes if o.outcome == "failed")]
        if local:
            result.outcome = "failed"
            result.error = "; ".join(filter(None, [result.error, *dict.fromkeys(local)]))
        self._record(result)
        return result

    def _pulse_fault(self, exc: BaseException) -> LocalFault:
        """A local error that ended the pulse's own steps (not one action's)."""
        cause, words = describe(exc, self.store.root)
        log.error("the pulse stopped: %s", words)
        return LocalFault(key=PULSE_KEY, cause=cause, detail=f"the pulse stopped: {words}")

    def _clock_skew(self, now: dt.datetime) -> list[Note]:
        """The clocks of the servers that answered in this pulse against this machine's (see
        :mod:`certpulse.agent.skew`); each measurement is used once."""
        measured = [skew.Measurement(url, c.clock_offset) for url, c in self.clients.items()
                    if c.clock_offset is not None]
        for client in self.clients.values():
            client.clock_offset = None
        return skew.observe(self.store, measured, now, self.config.clock_skew_warning)

    def _record(self, result: PulseResult) -> None:
        try:
            self.store.set_state("last_pulse", result.to_dict())
            counts = self.store.get_state("pulse_counts") or {}
            counts[result.outcome] = int(counts.get(result.outcome, 0)) + 1
            self.store.set_state("pulse_counts", counts)
        except LOCAL_ERRORS as exc:
            _, words = describe(exc, self.store.root)
            outcome = f"{result.outcome}: {result.error}" if result.error else result.outcome
            raise PulseNotRecorded(f"the pulse ended ({outcome}) and its outcome cannot be recorded: {words}") from None

    # -- events a pulse raises besides the store's own -----------------------------------

    def _raise_failures(self, outcomes: list[ActionOutcome], faults: list[LocalFault], now: dt.datetime, *,
                        complete: bool) -> None:
        """1100 for a request that was due and failed (a denial has its own 1102), and for a local
        fault. Raised once per certificate (or template, or the pulse) and cause, not at every
        pulse; a success clears it, and a local fault that a whole pulse (``complete``) no longer
        sees is cleared, so that it is raised again if it recurs."""
        failing: dict[str, str] = self.store.get_state("failing") or {}
        before = dict(failing)
        drafts: list[EventDraft] = []
        seen: set[str] = set()
        for fault in faults:
            seen.add(fault.key)
            if failing.get(fault.key) == fault.cause:
                continue
            failing[fault.key] = fault.cause
            drafts.append(EventDraft(
                EventId.RENEWAL_FAILED, action="check", template=fault.template,
                old=self.store.facts_if_held(fault.thumbprint), detail=f"failed: {fault.detail}",
                data={"rule": "local", "outcome": "failed", "cause": fault.cause}))
        for item in outcomes:
            action = item.action
            if action.kind not in (Kind.RENEW, Kind.ENROLL, Kind.RENEW_MANUAL):
                continue
            key = action.thumbprint or f"template:{action.template}"
            if item.outcome in ("done", "pending"):
                failing.pop(key, None)
                continue
            if item.outcome not in ("refused", "unavailable", "failed") or item.evented:
                continue
            seen.add(key)
            cause = ("unavailable" if item.outcome == "unavailable" else item.cause or "file-error"
                     if item.outcome == "failed" else item.detail.partition(":")[0])
            if failing.get(key) == cause:
                continue
            failing[key] = cause
            drafts.append(EventDraft(
                EventId.RENEWAL_FAILED, action=action.kind.value, template=action.template,
                old=self.store.facts_if_held(action.thumbprint), detail=f"{item.outcome}: {item.detail}",
                data={"rule": action.rule, "outcome": item.outcome, "cause": cause}))
        if complete:
            for key, cause in list(failing.items()):
                if cause in LOCAL_CAUSES and key not in seen:
                    failing.pop(key)
        if failing != before:
            self.store.set_state("failing", failing)
        self.store.record(drafts, now)

    def _monitor_expiry(self, snapshot: StoreSnapshot | None, planned: Plan | None, now: dt.datetime,
                        broken: frozenset[str] = frozenset()) -> None:
        """1003 and 1002 for certificates the agent will not renew itself (and additional stores):
        the plan says which ones it takes care of."""
        if snapshot is None:  # no policy server answered: watch what is on disk all the same
            snapshot = gather_mod.snapshot(self.store, self.policies, now, revoked=frozenset(known_revoked(self.store)),
                                           additional=self._additional(), broken=broken)
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
