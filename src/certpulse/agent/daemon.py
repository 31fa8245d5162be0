"""``agent run``: pulse at start, then every refresh interval (with jitter), or now on SIGHUP.

Rebinding and notification tasks run on a thread of their own (:class:`TaskDelivery`), woken by
every committed event, by SIGUSR1 and every half minute for retries, and the binding drift check
runs there after every pulse: a pulse never waits for a task or a service.

One agent per store: an exclusive lock on ``agent.lock`` (saying it is the daemon, and its pid);
only a daemon is ever signalled, never a one-shot pulse that holds the lock. A server
shedding load gives a ``Retry-After``, and the next pulse comes then (with a little jitter), for
the first few such failures in a row; otherwise, on failure the next pulse backs off
exponentially with jitter, from one minute up to a cap, never sooner than a ``Retry-After``. The
current certificates stay in place however long the CA is down.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import random
import signal
import threading
from pathlib import Path
from types import FrameType

from certpulse import clock
from certpulse.agent.config import AgentConfig
from certpulse.agent.local_faults import LOCAL_ERRORS, PulseNotRecorded, describe, store_unreachable
from certpulse.agent.pulse import Agent, PulseResult
from certpulse.durations import backoff
from certpulse.errors import Refusal
from certpulse.events.tasks import Dispatcher, TaskSettings
from certpulse.faults import fault_point
from certpulse.machine.certstore import LocalStore
from certpulse.machine.locks import AgentLock, Role
from certpulse.rebind import engine as rebind

log = logging.getLogger("certpulse.agent")
BACKOFF_FLOOR = 60.0
# Failed pulses in a row that follow the server's Retry-After as given. A server that keeps
# shedding the same agent (or a proxy answering 503 with a tiny Retry-After for hours) gets the
# exponential backoff after these, so the agent never polls it every second for long.
SCHEDULED_RETRIES = 5
MIN_SCHEDULED_WAIT = 1.0
TASK_POLL_SECONDS = 30.0  # retries fall due between events; the delivery thread looks this often


def follows_retry_after(failures: int, retry_after: float | None) -> bool:
    """Whether the wait after ``failures`` failed pulses in a row is the server's ``Retry-After``
    as given rather than the exponential backoff: for the first :data:`SCHEDULED_RETRIES`."""
    return retry_after is not None and 0 < failures <= SCHEDULED_RETRIES


def next_delay(*, refresh: dt.timedelta, failures: int, retry_after: float | None, cap: dt.timedelta,
               rng: random.Random) -> float:
    """Seconds until the next pulse. Success: the refresh interval plus up to 10 % jitter.

    A failed pulse that carries a ``Retry-After`` (a server shedding load gives each client a
    turn sized from its capacity, :mod:`certpulse.frontends.retry_schedule`) waits that long plus
    up to a tenth more (at least a second of spread, at least one second in all), for the first
    :data:`SCHEDULED_RETRIES` failures in a row: a storm then drains at the CA's rate instead of
    the agents' backoff. Any other failure, and every failure after those, backs off
    exponentially from one minute, capped, with jitter, never sooner than a ``Retry-After``,
    spread over up to half as long again within the cap (agents shed together got about the same
    answer, and the one-minute floor alone would bring them back in the same second)."""
    if failures == 0:
        base = refresh.total_seconds()
        return base + rng.uniform(0, base * 0.1)
    if retry_after is not None and follows_retry_after(failures, retry_after):
        wait = max(retry_after, MIN_SCHEDULED_WAIT)
        return min(wait + rng.uniform(0, max(1.0, wait * 0.1)), max(wait, cap.total_seconds()))
    backed_off = failures - SCHEDULED_RETRIES if retry_after is not None else failures
    ceiling = backoff(backed_off, dt.timedelta(seconds=BACKOFF_FLOOR), cap).total_seconds()
    delay = max(BACKOFF_FLOOR, rng.uniform(ceiling / 2, ceiling))
    if retry_after is None:
        return delay
    low = max(delay, retry_after)
    return rng.uniform(low, max(low, min(low * 1.5, max(cap.total_seconds(), BACKOFF_FLOOR))))


def deliver_tasks(directory: Path, config: AgentConfig, store: LocalStore) -> None:
    """Give new events to the notification tasks: through the running daemon (SIGUSR1) when there
    is one, here otherwise. Called after the change is committed, so it never holds up a pulse."""
    fault_point("before-tasks", store.root)
    lock = AgentLock(directory)
    holder = lock.holder()
    if (holder is not None and holder.role is Role.DAEMON and holder.pid != os.getpid()
            and lock.signal(holder, signal.SIGUSR1)):
        return
    deliver(store, config, directory)


def task_settings(config: AgentConfig) -> TaskSettings:
    """The notification tasks' retry settings, from the agent's configuration."""
    return TaskSettings(retries=config.task_retries, base_backoff=config.task_retry_backoff)


def deliver(store: LocalStore, config: AgentConfig, directory: Path) -> bool:
    """Rebind first (services keep serving a valid certificate), then notification tasks. True
    when the task dispatcher stopped early and should be called again soon."""
    rebind.process(store, directory, clock.now())
    return Dispatcher(store, task_settings(config), directory).run(clock.now()).stopped_early


class TaskDelivery:
    """The daemon's task thread: delivers events to tasks while pulses go on."""

    def __init__(self, directory: Path, config: AgentConfig) -> None:
        self.directory = directory
        self.config = config
        self.wake = threading.Event()
        self.stop = threading.Event()
        self.check_due = threading.Event()  # the drift check runs after each pulse
        self.thread = threading.Thread(target=self._loop, name="certpulse-tasks", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def nudge(self, events: object = None) -> None:
        """Deliver soon (a store listener, a signal handler, the end of a pulse)."""
        self.wake.set()

    def close(self, timeout: float | None = 5.0) -> None:
        """Stop after the delivery in progress; ``timeout=None`` waits for it to finish."""
        self.stop.set()
        self.wake.set()
        self.thread.join(timeout)

    def _loop(self) -> None:
        store: LocalStore | None = None
        try:
            while not self.stop.is_set():
                if store is None:
                    try:
                        store = LocalStore(self.directory / "store", channel=self.config.channel)  # its own
                    except Exception:  # the pulse reports a store that cannot be opened; retried later
                        self.wake.wait(timeout=TASK_POLL_SECONDS)
                        self.wake.clear()
                        continue
                self.wake.clear()
                more = False
                # Read before delivering: the pulse sets it after its changes are committed, so this
                # delivery deploys them first and the check never judges a deployment still to come.
                check = self.check_due.is_set()
                self.check_due.clear()
                try:
                    fault_point("before-tasks", store.root)
                    more = deliver(store, self.config, self.directory)
                    if check:
                        rebind.check(store, clock.now())
                except Exception:  # a task problem must never stop the daemon; it is logged and retried
                    log.exception("rebind or notification task delivery failed")
                self.wake.wait(timeout=0.0 if more else TASK_POLL_SECONDS)
        finally:
            if store is not None:
                store.close()


def run(directory: Path, config: AgentConfig, *, max_pulses: int | None = None) -> int:
    """The daemon loop. Returns when stopped by SIGTERM/SIGINT or after ``max_pulses``."""
    wake = threading.Event()
    stop = threading.Event()

    def on_hup(signum: int, frame: FrameType | None) -> None:
        wake.set()

    def on_stop(signum: int, frame: FrameType | None) -> None:
        stop.set()
        wake.set()

    delivery = TaskDelivery(directory, config)

    def on_usr1(signum: int, frame: FrameType | None) -> None:
        delivery.nudge()

    signal.signal(signal.SIGHUP, on_hup)
    signal.signal(signal.SIGTERM, on_stop)
    signal.signal(signal.SIGINT, on_stop)
    signal.signal(signal.SIGUSR1, on_usr1)
    lock = AgentLock(directory)  # taken once SIGHUP and SIGUSR1 are handled: the lock invites them
    lock.acquire(Role.DAEMON, clock.now())
    rng = random.Random()
    failures = 0
    pulses = 0
    agent: Agent | None = None
    delivery.start()
    try:
        while not stop.is_set():
            wake.clear()
            result: PulseResult | None = None
            try:
                if agent is None:  # opened here, not before the loop: a damaged store is retried, not fatal
                    agent = Agent(directory, config)
                    agent.store.listeners.append(delivery.nudge)
                result = agent.pulse(clock.now())
            except PulseNotRecorded as exc:
                log.error("%s", exc)
            except LOCAL_ERRORS as exc:  # the store could not even be opened
                log.error("the pulse cannot run: %s", describe(exc, directory / "store")[1])
            except Refusal as exc:
                if not store_unreachable(exc):
                    raise
                log.error("the pulse cannot run: %s", describe(exc, directory / "store")[1])
            except Exception as exc:  # last resort: the daemon outlives any one pulse, and says why it failed
                log.error("the pulse failed unexpectedly: %s: %s", type(exc).__name__, exc)
            delivery.check_due.set()
            delivery.nudge()
            pulses += 1
            failures = failures + 1 if result is None or result.outcome == "failed" else 0
            if result is not None:
                log.info("pulse %s%s", result.outcome, f": {result.error}" if result.error else "")
            if max_pulses is not None and pulses >= max_pulses:
                # Let a deployment in progress finish (it holds the rebind lock), then deliver what
                # the last pulse raised and check the bindings here.
                delivery.close(timeout=None)
                if agent is not None:
                    try:
                        deliver(agent.store, config, directory)
                        rebind.check(agent.store, clock.now())
                    except LOCAL_ERRORS as exc:
                        log.error("rebind or notification task delivery failed: %s",
                                  describe(exc, agent.store.root)[1])
                break
            delay = next_delay(refresh=config.refresh_interval, failures=failures,
                               retry_after=result.retry_after if result is not None else None,
                               cap=config.backoff_cap, rng=rng)
            if agent is not None:
                try:
                    agent.store.set_state("next_pulse", (clock.now() + dt.timedelta(seconds=delay)).isoformat())
                except LOCAL_ERRORS as exc:
                    log.error("the next pulse time cannot be recorded: %s", describe(exc, agent.store.root)[1])
            if result is None or result.outcome == "failed":
                log.info("backing off: next pulse in %.0f s", delay)
            wake.wait(timeout=delay)
    finally:
        delivery.close()
        if agent is not None:
            agent.close()
        lock.release()
    return 0
