"""``agent run``: pulse at start, then every refresh interval (with jitter), or now on SIGHUP.

One agent per store: an exclusive lock on ``agent.lock`` (holding the daemon's pid). On
failure the next pulse backs off exponentially with jitter, from one minute up to a cap, and
never sooner than the server's ``Retry-After``; the current certificates stay in place however
long the CA is down.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import logging
import os
import random
import signal
import threading
from pathlib import Path
from types import FrameType

from certpulse import clock
from certpulse.agent.config import AgentConfig
from certpulse.agent.pulse import Agent, PulseResult
from certpulse.errors import Reason, Refusal

log = logging.getLogger("certpulse.agent")
BACKOFF_FLOOR = 60.0
LOCK_NAME = "agent.lock"


def next_delay(*, refresh: dt.timedelta, failures: int, retry_after: float | None, cap: dt.timedelta,
               rng: random.Random) -> float:
    """Seconds until the next pulse. Success: the refresh interval plus up to 10 % jitter.
    After ``failures`` failures in a row: exponential from one minute, capped, with jitter."""
    if failures == 0:
        base = refresh.total_seconds()
        return base + rng.uniform(0, base * 0.1)
    ceiling = min(cap.total_seconds(), BACKOFF_FLOOR * 2 ** (failures - 1))
    delay = max(BACKOFF_FLOOR, rng.uniform(ceiling / 2, ceiling))
    return max(delay, retry_after or 0.0)


class AgentLock:
    def __init__(self, directory: Path) -> None:
        self.path = directory / LOCK_NAME
        self.fd: int | None = None

    def acquire(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            holder = self.holder()
            raise Refusal(Reason.CONFLICT, f"another agent is running on this store (pid {holder or '?'}); "
                                           "use 'certpulse agent pulse' to make it pulse now") from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def holder(self) -> int | None:
        """The pid of the agent that holds the lock, or None when nobody does."""
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except FileNotFoundError:
            return None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                text = os.read(fd, 32).decode(errors="replace").strip()
                return int(text) if text.isdigit() else None
            fcntl.flock(fd, fcntl.LOCK_UN)
            return None
        finally:
            os.close(fd)


def run(directory: Path, config: AgentConfig, *, max_pulses: int | None = None) -> int:
    """The daemon loop. Returns when stopped by SIGTERM/SIGINT or after ``max_pulses``."""
    lock = AgentLock(directory)
    lock.acquire()
    wake = threading.Event()
    stop = threading.Event()

    def on_hup(signum: int, frame: FrameType | None) -> None:
        wake.set()

    def on_stop(signum: int, frame: FrameType | None) -> None:
        stop.set()
        wake.set()

    signal.signal(signal.SIGHUP, on_hup)
    signal.signal(signal.SIGTERM, on_stop)
    signal.signal(signal.SIGINT, on_stop)
    rng = random.Random()
    failures = 0
    pulses = 0
    agent = Agent(directory, config)
    try:
        while not stop.is_set():
            wake.clear()
            result: PulseResult = agent.pulse(clock.now())
            pulses += 1
            failures = failures + 1 if result.outcome == "failed" else 0
            log.info("pulse %s%s", result.outcome, f": {result.error}" if result.error else "")
            if max_pulses is not None and pulses >= max_pulses:
                break
            delay = next_delay(refresh=config.refresh_interval, failures=failures, retry_after=result.retry_after,
                               cap=config.backoff_cap, rng=rng)
            agent.store.set_state("next_pulse", (clock.now() + dt.timedelta(seconds=delay)).isoformat())
            wake.wait(timeout=delay)
    finally:
        agent.close()
        lock.release()
    return 0


def signal_running_agent(directory: Path) -> int | None:
    """Ask a running daemon to pulse now; the pid signalled, or None when no daemon runs."""
    pid = AgentLock(directory).holder()
    if pid is None:
        return None
    os.kill(pid, signal.SIGHUP)
    return pid
