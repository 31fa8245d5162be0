"""Rebind: when a certificate is replaced (1001), every binding that serves it moves to its
successor — deployed, reloaded, and probed until the endpoint really serves it — or is put back
the way it was, with a "renewed but not deployed" event (1105), and retried with backoff.

The engine reads the event log after its own durable cursor, like a notification task, so a
kill at any point loses nothing: a binding whose target is set and not yet reached is picked up
again. The old certificate stays unarchived while any binding serves it
(:meth:`LocalStore.release` archives it once the last one has moved). The drift check
(:func:`check`) compares what each probed endpoint serves with what it should serve.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from pathlib import Path
from typing import Any, Literal

from certpulse.durations import backoff
from certpulse.errors import Refusal
from certpulse.machine import cursors
from certpulse.machine.certstore import CertRecord, LocalStore
from certpulse.machine.current import recency
from certpulse.machine.events import EventDraft, EventId
from certpulse.machine.locks import try_lock
from certpulse.machine.log import latest_seq, read_events
from certpulse.rebind.bindings import Binding, get_binding, list_bindings, update_binding
from certpulse.rebind.deployers.base import Backup, Deployer, DeployFailed, Material, get_deployer
from certpulse.rebind.probe import parse_probe, probe_target, settled_probe
from certpulse.sql.db import read, write

RETRY_BASE = dt.timedelta(minutes=1)
RETRY_CAP = dt.timedelta(hours=1)
PROBE_WINDOW = 10.0  # seconds a reloaded service has to settle on serving the new certificate
CHECK_SETTLE_WINDOW = 3.0  # seconds the drift check asks again before an unexpected answer counts
PROBE_TIMEOUT = 5.0
LOCK_NAME = "rebind.lock"
Verdict = Literal["ok", "stale", "mismatch", "unreachable"]


@dataclasses.dataclass(frozen=True)
class Outcome:
    binding: str
    ok: bool
    thumbprint: str
    detail: str


@dataclasses.dataclass(frozen=True)
class CheckResult:
    binding: str
    configured: str | None
    served: str | None
    newest: str | None
    verdict: Verdict
    detail: str

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# -- deploying ------------------------------------------------------------------------------------


def deploy(store: LocalStore, binding: Binding, thumbprint: str, now: dt.datetime) -> Outcome:
    """Deploy ``thumbprint`` to ``binding``: files, reload, probe. On any failure put the previous
    files back (and reload them), raise 1105 with the output, and schedule a retry."""
    deployer = get_deployer(binding.kind)()
    old = binding.thumbprint if binding.thumbprint != thumbprint else None
    try:
        material = Material.from_folder(store.folder(thumbprint), thumbprint)
        backup = deployer.deploy(binding.options, material)  # a deploy that fails has put back what it wrote
    except (DeployFailed, Refusal) as exc:
        failure = exc if isinstance(exc, DeployFailed) else DeployFailed(exc.detail)
        return _failed(store, binding, thumbprint, failure, now)
    output = ""
    try:
        output = deployer.reload(binding.options, material, old_thumbprint=old)
        if binding.probe:
            served = settled_probe(parse_probe(binding.probe), window=PROBE_WINDOW, wanted=thumbprint,
                                   timeout=PROBE_TIMEOUT).thumbprint
            if served != thumbprint:
                raise DeployFailed(f"reloaded, but {binding.probe} serves {served or 'nothing'}, not {thumbprint}",
                                   output)
    except DeployFailed as failure:
        problem = _roll_back(store, binding, deployer, backup, thumbprint)
        if problem:
            failure = DeployFailed(f"{failure}; and putting the previous certificate back failed: {problem}",
                                   failure.output)
        return _failed(store, binding, thumbprint, failure, now)
    update_binding(store, binding.name, now, thumbprint=thumbprint, target=None, state="ok", attempts=0,
                   next_attempt_at=None, last_error=None, last_output=output[-4000:])
    if old:
        store.release(old, now)
    return Outcome(binding.name, True, thumbprint, "deployed" + (f" and {binding.probe} serves it" if binding.probe
                                                                  else ""))


def _roll_back(store: LocalStore, binding: Binding, deployer: Deployer, backup: Backup, failed: str) -> str:
    """The previous files back, and the consumer told to use them again (moving from the failed
    certificate back to the previous one). Returns what went wrong doing so, or ""."""
    try:
        deployer.restore(binding.options, backup)
        if binding.thumbprint and store.folder(binding.thumbprint).is_dir():
            previous = Material.from_folder(store.folder(binding.thumbprint), binding.thumbprint)
            deployer.reload(binding.options, previous, old_thumbprint=failed)
    except (DeployFailed, Refusal, OSError) as exc:
        return str(exc)
    return ""


def _failed(store: LocalStore, binding: Binding, thumbprint: str, failure: DeployFailed,
            now: dt.datetime) -> Outcome:
    attempts = binding.attempts + 1
    delay = backoff(attempts, RETRY_BASE, RETRY_CAP)
    output = (failure.output or "")[-4000:]
    update_binding(store, binding.name, now, target=thumbprint, state="failed", attempts=attempts,
                   next_attempt_at=now + delay, last_error=str(failure), last_output=output)
    store.record([EventDraft(
        EventId.NOT_DEPLOYED, action=binding.kind, old=store.facts_if_held(binding.thumbprint),
        new=store.facts_if_held(thumbprint), detail=f"binding {binding.name}: {failure}",
        data={"binding": binding.name, "output": output, "attempt": attempts,
              "next_attempt_at": (now + delay).isoformat()})], now)
    return Outcome(binding.name, False, thumbprint, str(failure))


# -- reacting to events ---------------------------------------------------------------------------


def process(store: LocalStore, directory: Path, now: dt.datetime) -> list[Outcome]:
    """Move bindings along the events since the cursor (1001: to the successor; 1006: a binding
    that follows a template and has nothing yet), then retry failed deployments that are due."""
    with try_lock(directory / LOCK_NAME) as held:
        if not held:
            return []
        cursor = ensure_cursor(store)
        with read(store.engine) as conn:
            scanned = latest_seq(conn)  # every event up to here is read below, or of no concern
        for event in read_events(store.engine, after=cursor, event_ids=[EventId.REPLACE, EventId.NEW]):
            _follow(store, event.event_id, event.old_thumbprint, event.new_thumbprint,
                    event.new.template if event.new else None, now)
            with write(store.engine) as conn:
                cursors.advance(conn, cursors.REBIND, event.seq)
        # Past the events that do not concern rebind too, so that retention may remove them.
        with write(store.engine) as conn:
            cursors.advance(conn, cursors.REBIND, scanned)
        outcomes = []
        for binding in list_bindings(store):
            due = binding.next_attempt_at is None or binding.next_attempt_at <= now
            if binding.target and binding.auto and binding.state in ("waiting", "pending", "failed") and due:
                outcomes.append(deploy(store, binding, binding.target, now))
        return outcomes


def ensure_cursor(store: LocalStore) -> int:
    """Where the engine reads the log from; set when the first binding is added (what happened
    before that is already in the certificate a new binding is deployed with). From then on
    retention keeps every event after it (:func:`certpulse.machine.log.prune`)."""
    with write(store.engine) as conn:
        cursor = cursors.get(conn, cursors.REBIND)
        if cursor is None:
            cursor = latest_seq(conn)
            cursors.create(conn, cursors.REBIND, cursor)
    return cursor


def _follow(store: LocalStore, event_id: int, old: str, new: str, template: str | None, now: dt.datetime) -> None:
    for binding in list_bindings(store):
        if event_id == EventId.REPLACE and old and binding.thumbprint == old:
            moves = True
        elif event_id == EventId.NEW and binding.template and binding.template == template:
            moves = binding.thumbprint is None or _newer(store, new, binding.thumbprint)
        else:
            moves = False
        if moves and binding.target != new and binding.thumbprint != new:
            update_binding(store, binding.name, now, target=new, state="pending" if binding.thumbprint else "waiting",
                           attempts=0, next_attempt_at=None)


def _newer(store: LocalStore, candidate: str, current: str) -> bool:
    """Whether ``candidate`` is more recent than ``current`` by the store's one rule (a certificate
    the store no longer knows is never the more recent one)."""
    try:
        return recency(store.find(candidate)) > recency(store.find(current))
    except Refusal:
        return True


def renew(store: LocalStore, old: str, new: str, now: dt.datetime) -> list[Outcome]:
    """``binding renew --old X --new Y``: every binding that serves X moves to Y now (``appcmd renew
    binding /oldcert /newcert``), automatic or not."""
    old_record, new_record = store.find(old), store.find(new)
    outcomes = []
    for binding in list_bindings(store):
        if binding.thumbprint == old_record.thumbprint:
            outcomes.append(deploy(store, binding, new_record.thumbprint, now))
    return outcomes


def initial_certificate(store: LocalStore, template: str | None, thumbprint: str | None) -> CertRecord | None:
    """What a new binding starts with: the named certificate, or the template's newest current one."""
    if thumbprint:
        return store.find(thumbprint)
    return newest_of(store, template) if template else None


def newest_of(store: LocalStore, template: str) -> CertRecord | None:
    """The template's current certificate: what a binding that follows the template serves."""
    return store.current(template)


# -- the drift check --------------------------------------------------------------------------------


def check(store: LocalStore, now: dt.datetime, *, names: list[str] | None = None) -> list[CheckResult]:
    """For every probed binding: configured, served and newest valid certificate, and a verdict.
    A verdict that turns bad raises 1106 (once, until it changes)."""
    results = []
    records = {r.thumbprint: r for r in store.certificates()}
    for binding in list_bindings(store):
        if not binding.probe or (names and binding.name not in names):
            continue
        newest = _newest_for(store, binding, records)
        target = parse_probe(binding.probe)
        expected = newest or binding.thumbprint
        seen = probe_target(target, timeout=PROBE_TIMEOUT)
        if seen.thumbprint is not None and seen.thumbprint != expected:
            # Perhaps a reload still handing over (old and new workers both accepting): drift only
            # when the answer holds over several connections.
            seen = settled_probe(target, window=CHECK_SETTLE_WINDOW, timeout=PROBE_TIMEOUT)
        verdict: Verdict
        if seen.thumbprint is None:
            verdict, detail = "unreachable", seen.error or "no answer"
        elif seen.thumbprint == expected:
            verdict, detail = "ok", "serves the newest certificate"
        elif seen.thumbprint in records:
            verdict, detail = "stale", f"serves {seen.thumbprint}, replaced by {expected}"
        else:
            verdict, detail = "mismatch", f"serves {seen.thumbprint}, a certificate this store does not hold"
        if verdict != "ok" and verdict != binding.verdict:
            store.record([EventDraft(EventId.BINDING_DRIFT, action=verdict, old=store.facts_if_held(seen.thumbprint),
                                     new=store.facts_if_held(expected), detail=f"binding {binding.name}: {detail}",
                                     data={"binding": binding.name, "verdict": verdict, "served": seen.thumbprint,
                                           "configured": binding.thumbprint, "newest": newest})], now)
        update_binding(store, binding.name, binding.updated_at, verdict=verdict, served=seen.thumbprint,
                       checked_at=now)
        results.append(CheckResult(binding.name, binding.thumbprint, seen.thumbprint, newest, verdict, detail))
    return results


def _newest_for(store: LocalStore, binding: Binding, records: dict[str, CertRecord]) -> str | None:
    """The newest valid certificate the binding should serve: its template's, or the end of the
    chain of replacements that starts at its certificate."""
    if binding.template:
        found = newest_of(store, binding.template)
        return found.thumbprint if found else None
    current = binding.thumbprint
    seen: set[str] = set()
    while current and current in records and records[current].replaced_by and current not in seen:
        seen.add(current)
        current = records[current].replaced_by
    return current


__all__ = ["CheckResult", "Outcome", "check", "deploy", "get_binding", "initial_certificate", "process", "renew"]
