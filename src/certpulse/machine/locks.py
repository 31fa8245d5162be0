"""Locks on files in the agent folder: who may work on the machine's store right now.

* :func:`try_lock` (non-blocking): one deliverer of events at a time (``tasks.lock``,
  ``rebind.lock``); a caller that does not get it leaves the work to the holder.
* :class:`AgentLock` (``agent.lock``): one pulse at a time, whether the daemon's or a one-shot
  ``agent pulse``. The file says who holds it: the pid, what it is (a daemon, which pulses on
  SIGHUP, or a one-shot pulse, which does not), since when, and the process start time.

flock locks belong to the open file: a process that dies releases them with its descriptors,
but what it wrote stays in the file and its pid may soon belong to another process. So what the
file says is believed only while the lock is held, only when the process with that pid started
when the file says it did, and a signal goes through a pidfd opened *before* that check, so it
cannot reach a process that took the pid afterwards.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import enum
import fcntl
import json
import os
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from certpulse.errors import Reason, Refusal

AGENT_LOCK = "agent.lock"
HANDOVER_POLL = 0.2  # seconds between looks at a lock held by a one-shot pulse
# A holder that has taken the lock but not yet written who it is, is looked at this long even
# with no wait asked for: it may be a daemon starting, which is woken rather than waited for.
HANDOVER_GRACE = 2.0


@contextlib.contextmanager
def try_lock(path: Path) -> Iterator[bool]:
    """Hold an flock on ``path`` if nobody else does: yields True when this caller holds it, False
    when another holds it (that one does the work). The lock is per open file, so a second call in
    the same process is refused too rather than deadlocking."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(fd)


class Role(enum.StrEnum):
    """What holds ``agent.lock``."""

    DAEMON = "daemon"  # ``agent run``: pulses on SIGHUP, delivers tasks on SIGUSR1
    PULSE = "pulse"  # a one-shot ``agent pulse``: has no use for either signal
    UNKNOWN = "unknown"  # held, but the file does not say by whom (being taken, or an older version)


@dataclasses.dataclass(frozen=True)
class Holder:
    """The process holding ``agent.lock``, as far as it can be trusted. ``pid`` is None when the
    lock is held but the file names no live process that started when it says (the lock is
    changing hands, or the process that wrote it is gone and a child still has the file open)."""

    pid: int | None
    role: Role
    since: str | None = None  # when it took the lock (ISO 8601, its own clock)
    start: int | None = None  # its start time, clock ticks after boot (/proc/PID/stat field 22)

    def describe(self) -> str:
        """``pid N, since T`` for messages."""
        return f"pid {self.pid if self.pid is not None else '?'}" + (f", since {self.since}" if self.since else "")


class AgentBusy(Refusal):
    """``agent.lock`` is held by another process (:attr:`holder`, None when it was let go)."""

    def __init__(self, holder: Holder | None) -> None:
        who = holder.describe() if holder is not None else "pid ?"
        if holder is not None and holder.role is Role.PULSE:
            detail = f"a pulse is already running on this store ({who}); try again when it is over"
        elif holder is not None and holder.role is Role.UNKNOWN:
            detail = f"another process holds this store's lock ({who}); try again when it lets go"
        else:
            detail = f"another agent is running on this store ({who}); use 'certpulse agent pulse' to make it pulse now"
        super().__init__(Reason.CONFLICT, detail)
        self.holder = holder


def process_start(pid: int) -> int | None:
    """The start time of process ``pid`` in clock ticks after boot, or None when there is no such
    process (or no /proc to ask). Two processes that had the same pid differ in it."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return None
    fields = stat[stat.rfind(b")") + 2:].split()  # the name in parentheses may hold anything
    try:
        return int(fields[19])  # field 22; fields[0] is field 3, the state
    except (IndexError, ValueError):
        return None


def _parse(text: str) -> Holder:
    """What the lock file says, unchecked. A bare pid is what an older version wrote."""
    text = text.strip()
    if text.isdigit():
        return Holder(int(text), Role.UNKNOWN)
    try:
        data = json.loads(text)
        pid, role = data["pid"], Role(data["role"])
        since, start = data.get("since"), data.get("start")
    except (ValueError, KeyError, TypeError):
        return Holder(None, Role.UNKNOWN)
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
        return Holder(None, Role.UNKNOWN)
    return Holder(pid, role, since if isinstance(since, str) else None, start if isinstance(start, int) else None)


def _alive_as_written(holder: Holder) -> bool:
    """Whether the process the file names is the one that wrote it (not a later one given its pid).
    Without /proc the flock alone vouches for a live pid; an older version wrote no start time."""
    if holder.pid is None:
        return False
    if not Path("/proc/self/stat").exists():
        return _exists(holder.pid)
    start = process_start(holder.pid)
    return start is not None and (holder.start is None or start == holder.start)


def _exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class AgentLock:
    """``<agent folder>/agent.lock``: held by the process that pulses, saying who that is."""

    def __init__(self, directory: Path) -> None:
        self.path = directory / AGENT_LOCK
        self.fd: int | None = None

    def acquire(self, role: Role, now: dt.datetime) -> None:
        """Take the lock as ``role`` or raise :class:`AgentBusy` naming the holder."""
        if not self.try_acquire(role, now):
            raise AgentBusy(self.holder())

    def try_acquire(self, role: Role, now: dt.datetime) -> bool:
        """Take the lock as ``role`` if nobody holds it; False when another does."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        record = {"pid": os.getpid(), "role": role.value, "since": now.isoformat(), "start": process_start(os.getpid())}
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(record).encode(), 0)
        except OSError:  # a full disk: the lock holds all the same; unnamed, its holder is waited for
            os.ftruncate(fd, 0)  # never signalled (Role.UNKNOWN), and the pulse reports the disk
        self.fd = fd
        return True

    def acquire_or_wake(self, role: Role, now: Callable[[], dt.datetime], wait: float, wake_signal: int, *,
                        waiting: Callable[[Holder], None] = lambda holder: None,
                        monotonic: Callable[[], float] = time.monotonic,
                        sleep: Callable[[float], None] = time.sleep) -> Holder | None:
        """Take the lock, waiting up to ``wait`` seconds while another one-shot pulse (or a holder
        the file does not name) has it; ``waiting`` is told once, when the wait begins. When a
        daemon holds it, it is sent ``wake_signal`` instead (it pulses when asked: no need to wait
        for it) and returned. None means this process now holds the lock. Raises
        :class:`AgentBusy` when the wait is over and the lock is still held."""
        started = monotonic()
        deadline = started + max(wait, 0.0)
        told = False
        while True:
            if self.try_acquire(role, now()):
                return None
            holder = self.holder()
            if holder is None:
                continue  # let go just now: try again at once
            if holder.role is Role.DAEMON and self.signal(holder, wake_signal):
                return holder
            unnamed = holder.pid is None and monotonic() < started + HANDOVER_GRACE
            if monotonic() >= deadline and not unnamed:
                raise AgentBusy(holder)
            if not told and not unnamed:
                waiting(holder)
                told = True
            sleep(HANDOVER_POLL if unnamed else min(HANDOVER_POLL, max(deadline - monotonic(), 0.0)))

    def release(self) -> None:
        """Let go, emptying the file first: a pid that outlives its lock must not be believed."""
        if self.fd is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(self.fd, 0)
            os.close(self.fd)
            self.fd = None

    def holder(self) -> Holder | None:
        """Who holds the lock, or None when nobody does. The pid is given only for a process that
        is the one that wrote it (see :class:`Holder`)."""
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                written = _parse(os.pread(fd, 4096, 0).decode(errors="replace"))
                if not _alive_as_written(written):
                    return Holder(None, Role.UNKNOWN)
                return written
            fcntl.flock(fd, fcntl.LOCK_UN)
            return None
        finally:
            os.close(fd)

    def signal(self, holder: Holder, signum: int) -> bool:
        """Send ``signum`` to ``holder`` if it is still the process holding the lock; True when
        sent. The pidfd is opened first and the lock checked after, so a pid freed and given to
        another process in between is never signalled."""
        if holder.pid is None:
            return False
        try:
            pidfd = os.pidfd_open(holder.pid)
        except ProcessLookupError:
            return False
        except OSError:  # no pidfd on this kernel: check, then signal by pid
            return self.holder() == holder and _kill(holder.pid, signum)
        try:
            if self.holder() != holder:
                return False
            try:
                signal.pidfd_send_signal(pidfd, signum)
            except ProcessLookupError:
                return False
            return True
        finally:
            os.close(pidfd)


def _kill(pid: int, signum: int) -> bool:
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        return False
    return True
