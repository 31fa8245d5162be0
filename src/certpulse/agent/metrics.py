"""Prometheus metrics for the agent, read from its folder when Prometheus scrapes.

Nothing is counted in memory: every number comes from what the agent already keeps in its
store (``meta.db``, the certificate folders, the additional stores), so the same collector
serves both ways of exporting them and both agree:

* ``certpulse agent metrics`` prints the text exposition once (for node_exporter's textfile
  collector, a cron job, or a look by hand); no daemon needs to run.
* ``certpulse agent run --metrics-listen HOST:PORT`` answers scrapes over HTTP from a thread of
  the daemon, while it pulses.

A scrape never contacts the CA: renewal times come from the policy the last pulse cached. Time
is an argument (``now``), read once per scrape. All the database numbers of one scrape are read
in one transaction, so a scrape during a pulse sees the store before or after each of its
steps, never half of one (a certificate installed and its request still counted as pending).

The HTTP endpoint is unauthenticated, as Prometheus expects. It reveals subjects, thumbprints,
template and task names and failure causes, never keys: bind it to loopback (or a network only
the monitoring system reaches).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import func, select

from certpulse.agent import gather, skew
from certpulse.agent.config import AgentConfig
from certpulse.display import printable
from certpulse.errors import Reason, Refusal
from certpulse.machine import schema as machine_tables
from certpulse.machine.certstore import CertRecord, Flight, LocalStore
from certpulse.machine.events import event_name
from certpulse.machine.log import latest_seq
from certpulse.machine.schema import TASK_STATES
from certpulse.pki.certs import thumbprint
from certpulse.sql.db import read

# Outcomes a pulse records (PulseResult.outcome) and states a task can be in (machine.schema):
# always exported, at zero when unseen, so that rate() and alerts work from the first scrape.
PULSE_OUTCOMES = ("ok", "failed", "disabled")
PERSONAL = "personal"
_STATE_NAMES = ("pulse_counts", "last_pulse", "next_pulse", "failing", skew.STATE)


@dataclasses.dataclass(frozen=True)
class _Snapshot:
    """What one scrape read from ``meta.db``, in one transaction."""

    certificates: list[CertRecord]
    flights: list[Flight]
    state: dict[str, Any]
    tasks: list[Any]
    events_by_id: list[tuple[int, int]]
    last_seq: int


def _timestamp(value: dt.datetime) -> float:
    return value.timestamp()


def _parse_time(value: Any) -> dt.datetime | None:
    """An ISO time from the state table, or None when it is missing or not a time (the state is
    written by this program, but a scrape must not fail on one odd entry)."""
    if not isinstance(value, str):
        return None
    try:
        parsed = dt.datetime.fromisoformat(value)
    except ValueError:
        return None
    return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=dt.UTC)


class AgentCollector(Collector):
    """A custom collector over one agent folder. Thread-safe: the store's engine hands each
    scrape its own pooled SQLite connection, so the HTTP server's threads and the daemon's
    pulses (another engine, the same WAL database) never share one."""

    def __init__(self, directory: Path, config: AgentConfig, now: Callable[[], dt.datetime]) -> None:
        self.directory = directory
        self.config = config
        self.now = now
        self.store = LocalStore(directory / "store", channel=config.channel)

    def close(self) -> None:
        self.store.close()

    def describe(self) -> list[Metric]:
        """Nothing: registering must not read the store (and the families vary with it)."""
        return []

    def _read(self) -> _Snapshot:
        with read(self.store.engine) as conn:
            certificates = [CertRecord.from_row(r) for r in conn.execute(
                select(machine_tables.certificates).where(machine_tables.certificates.c.archived.is_(False))
                .order_by(machine_tables.certificates.c.installed_at, machine_tables.certificates.c.thumbprint))]
            flights = [Flight.from_row(r) for r in conn.execute(
                select(machine_tables.flights).order_by(machine_tables.flights.c.created_at))]
            state: dict[str, Any] = {}
            names = [*_STATE_NAMES, *(gather.policy_cache_key(s.url) for s in self.config.servers)]
            for name, value in conn.execute(select(machine_tables.state.c.name, machine_tables.state.c.value)
                                            .where(machine_tables.state.c.name.in_(names))):
                with contextlib.suppress(ValueError):
                    state[name] = json.loads(value)
            tasks = list(conn.execute(select(machine_tables.tasks).order_by(machine_tables.tasks.c.name)))
            events = machine_tables.events
            by_id = [(int(i), int(n)) for i, n in conn.execute(
                select(events.c.event_id, func.count()).group_by(events.c.event_id).order_by(events.c.event_id))]
            last = latest_seq(conn)
        return _Snapshot(certificates, flights, state, tasks, by_id, last)

    def collect(self) -> Iterator[Metric]:
        now = self.now()
        snap = self._read()
        yield from self._certificates(snap, now)
        yield from self._pulses(snap.state)
        yield from self._pending(snap.flights, now)
        yield from self._failing(snap.state)
        yield from self._clock_skew(snap.state)
        yield from self._tasks(snap.tasks)
        yield from self._events(snap)

    # -- families -------------------------------------------------------------------------

    def _certificates(self, snap: _Snapshot, now: dt.datetime) -> Iterator[Metric]:
        expiry = GaugeMetricFamily(
            "certpulse_certificate_expiry_timestamp_seconds",
            "notAfter of each current certificate: the personal store (store=personal) and the "
            "additional monitored stores (store=the folder)",
            labels=["thumbprint", "template", "store", "subject"])
        renewal = GaugeMetricFamily(
            "certpulse_certificate_renewal_timestamp_seconds",
            "When the agent plans to renew each personal certificate, by the policy the last pulse cached "
            "(absent when its template is not in that policy)",
            labels=["thumbprint", "template"])
        templates = gather.cached_templates(self.config.servers, snap.state.get, now)
        for record in snap.certificates:
            template = record.template_name or ""
            # A subject is a certificate's free text: its label is printable (certpulse.display), so
            # neither a dashboard nor `agent metrics` on a terminal is sent a control code.
            expiry.add_metric([record.thumbprint, template, PERSONAL, printable(record.subject)],
                              _timestamp(record.not_after))
            try:
                cert = self.store.certificate(record.thumbprint)
            except (OSError, ValueError):
                continue  # deleted since the transaction above: gone by the next scrape
            due = gather.planned_renewal(record, cert, templates, now)
            if due is not None:
                renewal.add_metric([record.thumbprint, template], _timestamp(due))
        seen: set[tuple[str, str]] = set()
        for folder, extra in gather.monitored_files(Path(p) for p in self.config.additional_stores):
            print_ = thumbprint(extra)
            if (print_, str(folder)) in seen:  # one certificate in two files of a folder: one series
                continue
            seen.add((print_, str(folder)))
            expiry.add_metric([print_, "", printable(folder), printable(extra.subject.rfc4514_string())],
                              _timestamp(extra.not_valid_after_utc))
        yield expiry
        yield renewal

    def _pulses(self, state: dict[str, Any]) -> Iterator[Metric]:
        total = CounterMetricFamily("certpulse_pulses", "Pulses since the store was created, by outcome",
                                    labels=["outcome"])
        counts = state.get("pulse_counts")
        counts = counts if isinstance(counts, dict) else {}
        for outcome in sorted({*PULSE_OUTCOMES, *counts}):
            value = counts.get(outcome, 0)
            total.add_metric([str(outcome)], float(value) if isinstance(value, int | float) else 0.0)
        yield total
        last_time = GaugeMetricFamily("certpulse_last_pulse_timestamp_seconds", "When the last pulse started")
        success = GaugeMetricFamily(
            "certpulse_last_pulse_success",
            "1 unless the last pulse failed (a pulse with autoenrollment disabled is not a failure)")
        last = state.get("last_pulse")
        if isinstance(last, dict):
            started = _parse_time(last.get("started_at"))
            if started is not None:
                last_time.add_metric([], _timestamp(started))
            success.add_metric([], 0.0 if last.get("outcome") == "failed" else 1.0)
        yield last_time
        yield success
        upcoming = GaugeMetricFamily("certpulse_next_pulse_timestamp_seconds",
                                     "When the daemon plans its next pulse (as it last said; absent before the "
                                     "first daemon pulse)")
        next_at = _parse_time(state.get("next_pulse"))
        if next_at is not None:
            upcoming.add_metric([], _timestamp(next_at))
        yield upcoming

    def _pending(self, flights: list[Flight], now: dt.datetime) -> Iterator[Metric]:
        yield GaugeMetricFamily("certpulse_pending_requests",
                                "Requests at the CA not yet settled: awaiting approval (pending) or sent and "
                                "unanswered (created)", value=len(flights))
        age = GaugeMetricFamily("certpulse_pending_request_age_seconds",
                                "Seconds since each unsettled request was submitted (created, before it was)",
                                labels=["request_id", "template", "status"])
        oldest: dict[tuple[str, str, str], float] = {}
        for flight in flights:
            key = (str(flight.request_id) if flight.request_id is not None else "", flight.template_name,
                   flight.status)
            seconds = (now - (flight.submitted_at or flight.created_at)).total_seconds()
            oldest[key] = max(seconds, oldest.get(key, seconds))
        for key, seconds in sorted(oldest.items()):
            age.add_metric(list(key), seconds)
        yield age

    def _failing(self, state: dict[str, Any]) -> Iterator[Metric]:
        failing = GaugeMetricFamily(
            "certpulse_renewal_failing",
            "1 for each certificate (thumbprint) or template (template:NAME) whose renewal or enrollment is "
            "failing, with the cause; cleared by the next success",
            labels=["key", "cause"])
        entries = state.get("failing")
        if isinstance(entries, dict):
            for key, cause in sorted(entries.items()):
                failing.add_metric([str(key), str(cause)], 1.0)
        yield failing

    def _clock_skew(self, state: dict[str, Any]) -> Iterator[Metric]:
        offset = GaugeMetricFamily(
            "certpulse_clock_skew_seconds",
            "The CA's clock minus this machine's, by the Date header of the last pulse's answers "
            "(positive: this machine is behind; absent before any measurement)")
        measured = state.get(skew.STATE)
        value = measured.get("offset_seconds") if isinstance(measured, dict) else None
        if isinstance(value, int | float) and not isinstance(value, bool):
            offset.add_metric([], float(value))
        yield offset

    def _tasks(self, rows: list[Any]) -> Iterator[Metric]:
        runs = CounterMetricFamily("certpulse_task_runs", "Runs of each notification task", labels=["task"])
        failures = CounterMetricFamily("certpulse_task_failures", "Failed runs of each notification task",
                                       labels=["task"])
        states = GaugeMetricFamily("certpulse_task_state", "1 for the state each notification task is in",
                                   labels=["task", "state"])
        last_run = GaugeMetricFamily("certpulse_task_last_run_timestamp_seconds",
                                     "When each notification task last ran", labels=["task"])
        for row in rows:
            runs.add_metric([row.name], float(row.runs or 0))
            failures.add_metric([row.name], float(row.failures or 0))
            for state in sorted({*TASK_STATES, row.state}):
                states.add_metric([row.name, state], 1.0 if state == row.state else 0.0)
            if row.last_run_at is not None:
                last_run.add_metric([row.name], _timestamp(row.last_run_at))
        yield from (runs, failures, states, last_run)

    def _events(self, snap: _Snapshot) -> Iterator[Metric]:
        yield GaugeMetricFamily("certpulse_events_last_seq",
                                "Highest lifecycle event sequence number ever given (retention notwithstanding)",
                                value=snap.last_seq)
        retained = GaugeMetricFamily("certpulse_events_retained",
                                     "Lifecycle events in the retained log, by event id", labels=["id", "name"])
        for event_id, count in snap.events_by_id:
            retained.add_metric([str(event_id), event_name(event_id)], float(count))
        yield retained


def registry_for(collector: AgentCollector) -> CollectorRegistry:
    """A registry holding only ``collector``: no process or platform metrics of the CLI process,
    which would describe a short-lived command rather than the agent."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    return registry


def parse_listen(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:PORT`` for IPv6) -> (host, port); a refusal names what is wrong."""
    host, sep, port_text = text.rpartition(":")
    host = host.removeprefix("[").removesuffix("]") if host.startswith("[") else host
    if not sep or not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise Refusal(Reason.INVALID_ARGUMENT, f"--metrics-listen must be HOST:PORT with a port from 1 to 65535 "
                                               f"(got {text!r})")
    return host, int(port_text)


class MetricsServer:
    """prometheus_client's HTTP server for one collector, in a daemon thread."""

    def __init__(self, collector: AgentCollector, listen: str) -> None:
        host, port = parse_listen(listen)
        try:
            self.server, self.thread = start_http_server(port, addr=host, registry=registry_for(collector))
        except OSError as exc:
            raise Refusal(Reason.INVALID_ARGUMENT, f"cannot serve metrics on {listen}: {exc.strerror or exc}") from None

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)

