"""Notification tasks: the registry (``task add``/``pin``/``remove``/``list``/``history``/``test``)
and the delivery of lifecycle events to them (the seed's New-CertificateNotificationTask).

Delivery is **at least once, in order, per task**. Each task has a cursor: every event up to it
was delivered, skipped, or given up on. The dispatcher runs the task for the next matching event,
stores the result and moves the cursor in one transaction. A crash after the command ran but
before that transaction commits runs it again for the same event, so a task must tolerate
running twice (SPEC "Notification tasks"); it must also re-read the certificate from the store
(``CERTPULSE_DIR``) rather than trust the event, which is only a hint.

A failed run is retried with exponential backoff; later events for the same task wait behind it
(in order). After ``task_retries`` retries the task is marked ``failed``, event 1103 is raised
and the cursor moves on, so one bad event does not stop delivery forever. A command that was
changed or became unsafe is never run: the task turns ``refused``, event 1104 is raised once,
and its cursor stays where it is until an operator re-pins it (``task pin``), after which the
events it missed are delivered. Events 1103/1104 never reach a task (``TASK_TYPES`` has no type
for them), so a failing task cannot feed itself.

What a task gets: argv ``[command, *registered args, OLD, NEW]`` (a thumbprint that does not
apply is ""), the event as one JSON line on standard input, working folder ``/``, and only these
environment variables: ``PATH`` (fixed), ``LANG=C.UTF-8``, ``HOME``, ``CERTPULSE_OLD_THUMBPRINT``,
``CERTPULSE_NEW_THUMBPRINT``, ``CERTPULSE_EVENT_ID``, ``CERTPULSE_EVENT_SEQ``,
``CERTPULSE_EVENT_NAME``, ``CERTPULSE_TASK``, ``CERTPULSE_DIR`` (the agent folder) and, for
``task test``, ``CERTPULSE_TEST=1`` (sequence number 0). Standard output and error are kept
together, up to 64 KiB per run, in the task's history.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import json
import os
import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Select, delete, literal, select, update

from certpulse.durations import backoff
from certpulse.errors import Reason, Refusal
from certpulse.machine import cursors
from certpulse.machine import log as event_log
from certpulse.machine import schema as t
from certpulse.machine.certstore import CertRecord, LocalStore
from certpulse.machine.events import CHANNELS, CertFacts, Event, EventDraft, EventId
from certpulse.machine.locks import try_lock
from certpulse.machine.schema import TaskState
from certpulse.pki.certs import normalize_thumbprint
from certpulse.sandbox import (
    DEFAULT_TIMEOUT,
    KILL_GRACE,
    RunResult,
    allowed_uids,
    check_command,
    run_command,
    task_environment,
)
from certpulse.sql.db import read, write

NAME_PATTERN = re.compile(r"[A-Za-z0-9._-]{1,64}")
THUMBPRINT_PATTERN = re.compile(r"[0-9A-F]{40}")
MIN_TIMEOUT, MAX_TIMEOUT = 1.0, 3600.0
MAX_ARGS, MAX_ARG_CHARS = 32, 4096
LOCK_NAME = "tasks.lock"
EVENT_BATCH = 200  # events read at a time per task
DEFAULT_MAX_RUNS = 50  # command runs per dispatch call ...
DEFAULT_BUDGET = 300.0  # ... and seconds: a call always returns; the next one carries on
PASS_QUOTA = 5  # runs per task before the other tasks get their turn
MAX_BACKOFF = dt.timedelta(days=1)
KEEP_RUNS = 100  # history rows kept per task (each holds up to 64 KiB of output)
PLACEHOLDER_TIME = dt.datetime(2000, 1, 1, tzinfo=dt.UTC)

# ``task add --type``: which events each task type reacts to. ``failure`` is ours: the failures
# of enrollment itself, and a clock skewed enough to make them (task failures do not trigger
# tasks, so a failing task cannot loop).
TASK_TYPES: dict[str, frozenset[EventId]] = {
    "new": frozenset({EventId.NEW}),
    "replace": frozenset({EventId.REPLACE}),
    "expire": frozenset({EventId.EXPIRED}),
    "close-to-expiration": frozenset({EventId.CLOSE_TO_EXPIRATION}),
    "delete": frozenset({EventId.DELETED}),
    "archive": frozenset({EventId.ARCHIVED}),
    "export": frozenset({EventId.EXPORTED}),
    "failure": frozenset({EventId.RENEWAL_FAILED, EventId.PENDING_DROPPED, EventId.REQUEST_DENIED,
                          EventId.NOT_DEPLOYED, EventId.BINDING_DRIFT, EventId.CLOCK_SKEW}),
}


@dataclasses.dataclass(frozen=True, slots=True)
class TaskSettings:
    """How a failed run is retried: ``retries`` more times, waiting ``base_backoff``, then twice
    that, and so on (capped at a day), before the task gives up on the event (1103)."""

    retries: int
    base_backoff: dt.timedelta


# -- what a task and a run are --------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Task:
    name: str
    task_type: str
    command: str
    args: tuple[str, ...]
    channel: str
    old_thumbprint: str | None
    timeout: float
    sha256: str
    created_at: dt.datetime
    cursor: int
    state: TaskState
    attempts: int
    next_attempt_at: dt.datetime | None
    runs: int
    failures: int
    last_run_at: dt.datetime | None
    last_outcome: str | None
    last_exit: int | None
    last_error: str | None

    @classmethod
    def from_row(cls, row: Any) -> Task:
        """From a row of :func:`_task_query` (the task with its cursor)."""
        return cls(name=row.name, task_type=row.task_type, command=row.command, args=tuple(json.loads(row.args)),
                   channel=row.channel, old_thumbprint=row.old_thumbprint, timeout=row.timeout, sha256=row.sha256,
                   created_at=row.created_at, cursor=row.cursor, state=row.state, attempts=row.attempts,
                   next_attempt_at=row.next_attempt_at, runs=row.runs, failures=row.failures,
                   last_run_at=row.last_run_at, last_outcome=row.last_outcome, last_exit=row.last_exit,
                   last_error=row.last_error)

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["args"] = list(self.args)
        for key in ("created_at", "next_attempt_at", "last_run_at"):
            data[key] = data[key].isoformat() if data[key] else None
        return data


@dataclasses.dataclass(frozen=True)
class TaskRun:
    id: int
    task_name: str
    event_seq: int | None
    event_id: int
    attempt: int
    started_at: dt.datetime
    finished_at: dt.datetime
    outcome: str  # ok | failed | timeout | refused | skipped (sandbox.RunResult's, or skipped)
    exit_status: int | None
    output: bytes
    output_truncated: bool
    detail: str
    test: bool
    reason: str | None = None  # a refusal's reason, on a run just made (history does not keep it)

    @classmethod
    def from_row(cls, row: Any) -> TaskRun:
        return cls(id=row.id, task_name=row.task_name, event_seq=row.event_seq, event_id=row.event_id,
                   attempt=row.attempt, started_at=row.started_at, finished_at=row.finished_at, outcome=row.outcome,
                   exit_status=row.exit_status, output=bytes(row.output), output_truncated=row.output_truncated,
                   detail=row.detail, test=row.test)

    @property
    def text(self) -> str:
        return self.output.decode("utf-8", errors="replace")

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "task": self.task_name, "event_seq": self.event_seq, "event_id": self.event_id,
                "attempt": self.attempt, "started_at": self.started_at.isoformat(),
                "finished_at": self.finished_at.isoformat(), "outcome": self.outcome,
                "exit_status": self.exit_status, "output": self.text, "output_truncated": self.output_truncated,
                "detail": self.detail, "test": self.test}


# -- the registry ---------------------------------------------------------------------------------

def _validate_name(name: str) -> None:
    if not NAME_PATTERN.fullmatch(name):
        raise Refusal(Reason.INVALID_ARGUMENT, f"task name {name!r} must be 1-64 letters, digits, '.', '_' or '-'")


def _validate_args(args: Sequence[str]) -> tuple[str, ...]:
    if len(args) > MAX_ARGS:
        raise Refusal(Reason.INVALID_ARGUMENT, f"at most {MAX_ARGS} --arg values")
    for arg in args:
        if "\0" in arg or len(arg) > MAX_ARG_CHARS:
            raise Refusal(Reason.INVALID_ARGUMENT, f"an --arg holds a NUL character or is over {MAX_ARG_CHARS} "
                                                   "characters")
    return tuple(args)


def _old_thumbprint(text: str) -> str:
    """``--old-thumbprint``: a whole SHA-1 thumbprint, however it was typed."""
    cleaned = normalize_thumbprint(text)
    if not THUMBPRINT_PATTERN.fullmatch(cleaned):
        raise Refusal(Reason.INVALID_ARGUMENT, f"--old-thumbprint {text!r} is not a 40-digit SHA-1 thumbprint")
    return cleaned


def _validate(name: str, task_type: str, channel: str, agent_channel: str, timeout: float) -> None:
    _validate_name(name)
    if task_type not in TASK_TYPES:
        raise Refusal(Reason.INVALID_ARGUMENT, f"task type {task_type!r} is not one of {', '.join(TASK_TYPES)}")
    if channel not in CHANNELS:
        raise Refusal(Reason.INVALID_ARGUMENT, f"channel {channel!r} is not one of {', '.join(CHANNELS)}")
    if channel != agent_channel:
        raise Refusal(Reason.INVALID_ARGUMENT, f"this agent raises events on the {agent_channel} channel only; "
                                               f"a task on the {channel} channel would never run")
    if not MIN_TIMEOUT <= timeout <= MAX_TIMEOUT:
        raise Refusal(Reason.INVALID_ARGUMENT, f"timeout must be {MIN_TIMEOUT:g} to {MAX_TIMEOUT:g} seconds")


def add_task(store: LocalStore, *, name: str, task_type: str, command: str | os.PathLike[str],
             args: Sequence[str] = (), channel: str, old_thumbprint: str | None = None,
             timeout: float = DEFAULT_TIMEOUT, now: dt.datetime, agent_channel: str, replace: bool = False) -> Task:
    """Register a task (or, with ``replace``, redefine one and re-pin it, keeping its cursor and
    history). The command is checked and its SHA-256 pinned now. A new task reacts to events
    raised from now on, never to the log's past."""
    _validate(name, task_type, channel, agent_channel, timeout)
    arguments = _validate_args(args)
    old = _old_thumbprint(old_thumbprint) if old_thumbprint else None
    path, digest = check_command(command, allowed_uids=allowed_uids())
    definition = {"task_type": task_type, "command": str(path), "args": json.dumps(list(arguments)),
                  "channel": channel, "old_thumbprint": old, "timeout": float(timeout), "sha256": digest,
                  "state": "ok", "attempts": 0, "next_attempt_at": None}
    with write(store.engine) as conn:
        exists = conn.execute(select(t.tasks.c.name).where(t.tasks.c.name == name)).first() is not None
        if exists and not replace:
            raise Refusal(Reason.CONFLICT, f"task {name} exists; use --replace to redefine it")
        if exists:
            conn.execute(update(t.tasks).where(t.tasks.c.name == name).values(**definition))
        else:
            conn.execute(t.tasks.insert().values(name=name, created_at=now, runs=0, failures=0, **definition))
            cursors.create(conn, cursors.task_consumer(name), event_log.latest_seq(conn))
    return get_task(store, name)


def pin_task(store: LocalStore, name: str) -> tuple[Task, str]:
    """Check the task's command again and pin its current bytes (after an intended change); the
    task turns ``ok`` and the events it missed while refused are delivered. Returns the task and
    the previous pin."""
    task = get_task(store, name)
    path, digest = check_command(task.command, allowed_uids=allowed_uids())
    with write(store.engine) as conn:
        conn.execute(update(t.tasks).where(t.tasks.c.name == name).values(
            command=str(path), sha256=digest, state="ok", attempts=0, next_attempt_at=None))
    return get_task(store, name), task.sha256


def remove_task(store: LocalStore, name: str) -> Task:
    """Forget a task and its history."""
    task = get_task(store, name)
    with write(store.engine) as conn:
        conn.execute(delete(t.tasks).where(t.tasks.c.name == name))
        conn.execute(delete(t.task_runs).where(t.task_runs.c.task_name == name))
        cursors.remove(conn, cursors.task_consumer(name))
    return task


def _task_query() -> Select[Any]:
    """Tasks with their cursor (kept in ``cursors`` with the other consumers of the log)."""
    consumer = literal(cursors.TASK_PREFIX) + t.tasks.c.name
    return (select(t.tasks, t.cursors.c.seq.label("cursor"))
            .join(t.cursors, t.cursors.c.consumer == consumer))


def get_task(store: LocalStore, name: str) -> Task:
    with read(store.engine) as conn:
        row = conn.execute(_task_query().where(t.tasks.c.name == name)).first()
    if row is None:
        raise Refusal(Reason.NOT_FOUND, f"no task named {name!r}")
    return Task.from_row(row)


def list_tasks(store: LocalStore) -> list[Task]:
    with read(store.engine) as conn:
        return [Task.from_row(r) for r in conn.execute(_task_query().order_by(t.tasks.c.name))]


def history(store: LocalStore, name: str, *, limit: int = 20) -> list[TaskRun]:
    """The task's newest ``limit`` runs (tests, skips and refusals included), oldest first."""
    get_task(store, name)
    query = (select(t.task_runs).where(t.task_runs.c.task_name == name)
             .order_by(t.task_runs.c.id.desc()).limit(max(1, limit)))
    with read(store.engine) as conn:
        rows = [TaskRun.from_row(r) for r in conn.execute(query)]
    return list(reversed(rows))


# -- what a task is given -------------------------------------------------------------------------

def task_env(task: Task, event: Event, directory: Path) -> dict[str, str]:
    """The whole environment of a run: fixed values plus the event's and the task's own."""
    values = {"CERTPULSE_OLD_THUMBPRINT": event.old_thumbprint, "CERTPULSE_NEW_THUMBPRINT": event.new_thumbprint,
              "CERTPULSE_EVENT_ID": str(event.event_id), "CERTPULSE_EVENT_SEQ": str(event.seq),
              "CERTPULSE_EVENT_NAME": event.name, "CERTPULSE_TASK": task.name,
              "CERTPULSE_DIR": str(directory)}
    if event.synthetic:
        values["CERTPULSE_TEST"] = "1"
    return task_environment(values)


def _execute(task: Task, event: Event, directory: Path, kill_grace: float) -> RunResult:
    """Run the task's pinned command for ``event``: argv is the registered path, its arguments,
    then the old and the new thumbprint ("" when one does not apply); the event is on stdin."""
    stdin = json.dumps(event.to_dict(), sort_keys=True, default=str).encode() + b"\n"
    return run_command(task.command, task.sha256, args=[*task.args, event.old_thumbprint, event.new_thumbprint],
                       stdin=stdin, env=task_env(task, event, directory), timeout=task.timeout,
                       kill_grace=kill_grace)


def matches(task: Task, event: Event) -> bool:
    """The event is one this task reacts to: its type, its channel, its old-thumbprint filter."""
    if event.event_id not in TASK_TYPES[task.task_type] or event.channel != task.channel:
        return False
    return not task.old_thumbprint or event.old_thumbprint.upper() == task.old_thumbprint


def trusted(task: Task, event: Event) -> bool:
    """A system-channel task runs with the agent's privileges: it never runs for an event that an
    unprivileged user's process raised (the seed: anyone can write to the user channel)."""
    return task.channel != "system" or event.uid in allowed_uids()


# -- the dispatcher -------------------------------------------------------------------------------

@dataclasses.dataclass
class DispatchSummary:
    busy: bool = False  # another dispatcher holds the lock: it delivers
    runs: int = 0  # command runs (ok, failed, timeout)
    ok: int = 0
    failed: int = 0  # failed or timed-out runs (retried, or given up on)
    gave_up: int = 0  # events given up on (1103 raised)
    refused: int = 0  # tasks that turned refused (1104 raised)
    skipped: int = 0  # untrusted events a system-channel task did not run for
    stopped_early: bool = False  # the run or time budget ran out; the next call carries on

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def dispatch_lock(directory: Path) -> contextlib.AbstractContextManager[bool]:
    """Hold ``<agent folder>/tasks.lock`` (non-blocking): True when this caller holds it."""
    return try_lock(directory / LOCK_NAME)


class _TaskChanged(Exception):
    """The task was removed or redefined while its command ran: the result is dropped."""


class Dispatcher:
    """Delivers new events to every task, within a budget of runs and seconds."""

    def __init__(self, store: LocalStore, settings: TaskSettings, directory: Path, *,
                 max_runs: int = DEFAULT_MAX_RUNS, budget: float = DEFAULT_BUDGET,
                 kill_grace: float = KILL_GRACE) -> None:
        self.store = store
        self.settings = settings
        self.directory = directory
        self.max_runs = max_runs
        self.budget = budget
        self.kill_grace = kill_grace
        self.summary = DispatchSummary()
        self._now = PLACEHOLDER_TIME  # set by run(now)
        self._started = 0.0

    def run(self, now: dt.datetime) -> DispatchSummary:
        """One delivery round: returns at once when another dispatcher is at work."""
        self.summary = DispatchSummary()
        self._now, self._started = now, time.monotonic()
        with dispatch_lock(self.directory) as held:
            if not held:
                self.summary.busy = True
                return self.summary
            self._rounds([task.name for task in list_tasks(self.store)])
        return self.summary

    def _rounds(self, names: list[str]) -> None:
        """Give every task up to ``PASS_QUOTA`` runs per pass, so that one task's backlog does not
        starve the others, until nothing is left or the budget is spent."""
        while names:
            more: list[str] = []
            for name in names:
                if self._exhausted():
                    self.summary.stopped_early = True
                    return
                with contextlib.suppress(_TaskChanged, Refusal):  # Refusal: removed meanwhile
                    if self._deliver(get_task(self.store, name)):
                        more.append(name)
            names = more

    def _moment(self) -> dt.datetime:
        """``now`` as given, moved on by the time this round has taken."""
        return self._now + dt.timedelta(seconds=time.monotonic() - self._started)

    def _exhausted(self) -> bool:
        return self.summary.runs >= self.max_runs or self._out_of_time()

    def _out_of_time(self) -> bool:
        return time.monotonic() - self._started >= self.budget

    def _deliver(self, task: Task) -> bool:
        """Events after the cursor, in order, until the task must wait, its pass quota is used up
        (True: it has more) or the log is exhausted."""
        if task.state == "refused":
            return False  # until an operator re-pins it
        cursor, ran = task.cursor, 0
        while batch := event_log.read_events(self.store.engine, after=cursor, limit=EVENT_BATCH):
            for event in batch:
                if not matches(task, event):
                    cursor = event.seq
                    continue
                self._advance(task, cursor)
                task = get_task(self.store, task.name)
                if not trusted(task, event):
                    task = self._skip(task, event)
                elif ran >= PASS_QUOTA:
                    return True
                elif not self._due(task):
                    return False
                else:
                    task, ran = self._attempt(task, event), ran + 1
                    if task.cursor < event.seq:
                        return False  # retrying later, or refused
                cursor = event.seq
            if self._out_of_time():  # a long log of events that do not concern the task
                self.summary.stopped_early = True
                break
        self._advance(task, cursor)
        return False

    def _due(self, task: Task) -> bool:
        if self._exhausted():
            self.summary.stopped_early = True
            return False
        return task.next_attempt_at is None or task.next_attempt_at <= self._moment()

    def _advance(self, task: Task, cursor: int) -> None:
        """Move the cursor past events that do not concern the task (never backwards)."""
        if cursor <= task.cursor:
            return
        with write(self.store.engine) as conn:
            cursors.advance(conn, cursors.task_consumer(task.name), cursor)

    def _skip(self, task: Task, event: Event) -> Task:
        moment = self._moment()
        detail = (f"event {event.seq} was raised by uid {event.uid}, not by root or the agent's user: "
                  "a system-channel task does not run for it")
        with write(self.store.engine) as conn:
            self._update(conn, task, cursor=event.seq, last_run_at=moment, last_outcome="skipped", last_exit=None,
                         last_error=detail)
            _insert_run(conn, task.name, event.seq, event.event_id, task.attempts, moment, moment,
                        RunResult("skipped", None, b"", False, detail, 0.0), test=False)
        self.summary.skipped += 1
        return get_task(self.store, task.name)

    def _attempt(self, task: Task, event: Event) -> Task:
        started = self._moment()
        result = _execute(task, event, self.directory, self.kill_grace)
        finished = started + dt.timedelta(seconds=result.duration)
        if result.outcome == "refused":
            values, drafts = self._refused(task, event, result)
        else:
            self.summary.runs += 1
            values, drafts = self._ran(task, event, result, finished)
        with write(self.store.engine) as conn:
            self._update(conn, task, **values)
            _insert_run(conn, task.name, event.seq, event.event_id, task.attempts + 1, started, finished, result,
                        test=False)
            events = event_log.append(conn, drafts, now=finished, channel=self.store.channel)
        self.store.announce(events)
        return get_task(self.store, task.name)

    def _ran(self, task: Task, event: Event, result: RunResult,
             finished: dt.datetime) -> tuple[dict[str, Any], list[EventDraft]]:
        """The task's new state after a run, and the events it raises."""
        common = {"runs": task.runs + 1, "last_run_at": finished, "last_outcome": result.outcome,
                  "last_exit": result.exit_status, "last_error": None if result.outcome == "ok" else result.detail}
        if result.outcome == "ok":
            self.summary.ok += 1
            return {**common, "cursor": event.seq, "state": "ok", "attempts": 0, "next_attempt_at": None}, []
        self.summary.failed += 1
        attempts = task.attempts + 1
        if attempts <= self.settings.retries:
            wait = backoff(attempts, self.settings.base_backoff, MAX_BACKOFF)
            return {**common, "failures": task.failures + 1, "state": "retrying", "attempts": attempts,
                    "next_attempt_at": finished + wait}, []
        self.summary.gave_up += 1
        values = {**common, "failures": task.failures + 1, "cursor": event.seq, "state": "failed", "attempts": 0,
                  "next_attempt_at": None}
        return values, [_failed_event(task, event, result, attempts)]

    def _refused(self, task: Task, event: Event, result: RunResult) -> tuple[dict[str, Any], list[EventDraft]]:
        """Refused: not run, the cursor stays, 1104 raised when the task enters that state."""
        self.summary.refused += 1
        values = {"state": "refused", "next_attempt_at": None, "last_run_at": self._moment(),
                  "last_outcome": "refused", "last_exit": None, "last_error": result.detail}
        if task.state == "refused":
            return values, []
        return values, [_refused_event(task, event, result)]

    def _update(self, conn: Connection, task: Task, cursor: int | None = None, **values: Any) -> None:
        """Update the task as it was when its run began (and move its cursor to ``cursor``); anything
        else means it was removed or redefined meanwhile, and the result is dropped (rolled back)."""
        changed = conn.execute(update(t.tasks).where(
            t.tasks.c.name == task.name, t.tasks.c.sha256 == task.sha256,
            t.tasks.c.attempts == task.attempts).values(**values)).rowcount
        moved = cursors.move_from(conn, cursors.task_consumer(task.name), task.cursor,
                                  task.cursor if cursor is None else cursor)
        if not changed or not moved:
            raise _TaskChanged(task.name)


def dispatch(store: LocalStore, settings: TaskSettings, directory: Path, now: dt.datetime, *,
             max_runs: int = DEFAULT_MAX_RUNS, budget: float = DEFAULT_BUDGET,
             kill_grace: float = KILL_GRACE) -> DispatchSummary:
    """Deliver pending events to every task of the agent in ``directory`` (see :class:`Dispatcher`).

    Safe to call from any thread or process at any time: one dispatcher works per agent folder
    (``tasks.lock``); the others return at once with ``busy``. It returns after ``max_runs``
    command runs or ``budget`` seconds (plus at most one run's timeout); call it again later."""
    return Dispatcher(store, settings, directory, max_runs=max_runs, budget=budget, kill_grace=kill_grace).run(now)


def _failed_event(task: Task, event: Event, result: RunResult, attempts: int) -> EventDraft:
    """1103: the task gave up on an event; it names the certificates of that event."""
    return EventDraft(EventId.TASK_FAILED, action="task", old=event.old, new=event.new, template=event.template,
                      detail=f"task {task.name} gave up on event {event.seq} ({event.name}) after {attempts} runs: "
                             f"{result.detail}",
                      data={"task": task.name, "event_seq": event.seq, "event_id": event.event_id,
                            "exit_status": result.exit_status, "outcome": result.outcome, "attempts": attempts})


def _refused_event(task: Task, event: Event, result: RunResult) -> EventDraft:
    """1104: the task's command was not run (changed since it was pinned, or unsafe)."""
    return EventDraft(EventId.TASK_REFUSED, action="task", template=event.template,
                      detail=f"task {task.name} refused to run {task.command}: {result.detail}",
                      data={"task": task.name, "event_seq": event.seq, "event_id": event.event_id,
                            "reason": result.reason, "command": task.command, "pinned_sha256": task.sha256})


def _insert_run(conn: Connection, name: str, seq: int | None, event_id: int, attempt: int, started: dt.datetime,
                finished: dt.datetime, result: RunResult, *, test: bool) -> int:
    """One history row, then forget the task's oldest rows beyond ``KEEP_RUNS``."""
    inserted = conn.execute(t.task_runs.insert().values(
        task_name=name, event_seq=seq, event_id=event_id, attempt=attempt, started_at=started,
        finished_at=finished, outcome=result.outcome, exit_status=result.exit_status, output=result.output,
        output_truncated=result.truncated, detail=result.detail, test=test))
    run_id = int(inserted.inserted_primary_key[0]) if inserted.inserted_primary_key else 0
    oldest_kept = conn.execute(select(t.task_runs.c.id).where(t.task_runs.c.task_name == name)
                               .order_by(t.task_runs.c.id.desc()).offset(KEEP_RUNS - 1).limit(1)).scalar()
    if oldest_kept is not None:
        conn.execute(delete(t.task_runs).where(t.task_runs.c.task_name == name, t.task_runs.c.id < oldest_kept))
    return run_id


# -- task test ------------------------------------------------------------------------------------

def _placeholder(thumbprint: str | None, now: dt.datetime, digit: str = "0") -> CertFacts:
    """Made-up facts for ``task test`` on an empty store (old: zeros, new: ones)."""
    return CertFacts(thumbprint=thumbprint or digit * 40, sha256=digit * 64, subject="CN=certpulse task test",
                     subject_names=("certpulse-task-test.invalid",), ekus=(), template=None, template_oid=None,
                     store="personal", not_before=now, expiration=now + dt.timedelta(days=365))


def _newest_current(store: LocalStore) -> CertRecord | None:
    current = store.certificates(include_archived=False)
    return max(current, key=lambda r: (r.installed_at, r.not_after)) if current else None


def _predecessor(store: LocalStore, record: CertRecord | None) -> CertFacts | None:
    """The certificate ``record`` replaced, if the store still knows it."""
    if record is None:
        return None
    replaced = next((r for r in store.certificates() if r.replaced_by == record.thumbprint), None)
    return store.facts_if_held(replaced.thumbprint) if replaced else None


def synthetic_event(store: LocalStore, task: Task, now: dt.datetime) -> Event:
    """A made-up event of the task's type (``synthetic``, seq 0): the newest current certificate
    of the store stands in for the certificate concerned, the one it replaced (or the task's
    --old-thumbprint) for the old one, placeholders when the store has none."""
    event_id = min(TASK_TYPES[task.task_type])
    newest = _newest_current(store)
    current = store.facts_if_held(newest.thumbprint) if newest else None
    old: CertFacts | None
    new: CertFacts | None
    if event_id == EventId.NEW:
        old, new = None, current or _placeholder(None, now, "1")
    elif event_id == EventId.REPLACE:
        old, new = _predecessor(store, newest) or _placeholder(None, now), current or _placeholder(None, now, "1")
    else:
        old, new = current or _placeholder(None, now), None
    if old is not None and task.old_thumbprint and old.thumbprint != task.old_thumbprint:
        old = store.facts_if_held(task.old_thumbprint) or _placeholder(task.old_thumbprint, now)
    shown = new or old
    return Event(seq=0, event_id=int(event_id), channel=task.channel, time=now, uid=os.geteuid(), action="test",
                 old=old, new=new, template=shown.template if shown else None,
                 detail="synthetic event from 'certpulse task test'", data={}, synthetic=True)


def run_test(store: LocalStore, name: str, *, directory: Path, now: dt.datetime,
             kill_grace: float = KILL_GRACE) -> TaskRun:
    """Run the task once now for a synthetic event (``CERTPULSE_TEST=1``), like Windows'
    ``Switch-Certificate -NotifyOnly``: recorded in its history as a test; cursor, state and
    counters are untouched."""
    task = get_task(store, name)
    event = synthetic_event(store, task, now)
    result = _execute(task, event, directory, kill_grace)
    finished = now + dt.timedelta(seconds=result.duration)
    with write(store.engine) as conn:
        run_id = _insert_run(conn, task.name, None, event.event_id, 0, now, finished, result, test=True)
    return TaskRun(id=run_id, task_name=task.name, event_seq=None, event_id=event.event_id, attempt=0,
                   started_at=now, finished_at=finished, outcome=result.outcome, exit_status=result.exit_status,
                   output=result.output, output_truncated=result.truncated, detail=result.detail, test=True,
                   reason=result.reason)


__all__ = ["TASK_TYPES", "DispatchSummary", "Dispatcher", "Task", "TaskRun", "TaskSettings", "add_task", "dispatch",
           "dispatch_lock", "get_task", "history", "list_tasks", "matches", "pin_task", "remove_task", "run_test",
           "synthetic_event", "trusted"]
