"""Locks on files in the agent folder: who may work on the machine's store right now.

* :func:`try_lock` (non-blocking): one deliverer of events at a time (``tasks.lock``,
  ``rebind.lock``); a caller that does not get it leaves the work to the holder.
* :class:`AgentLock` (``agent.lock``, holding the holder's pid): one pulse at a time, whether
  the daemon's or a one-shot ``agent pulse``.

flock locks belong to the open file: a process that dies releases them with its descriptors.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

from certpulse.errors import Reason, Refusal

AGENT_LOCK = "agent.lock"


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


class AgentLock:
    """``<agent folder>/agent.lock``: held by the process that pulses, with its pid inside."""

    def __init__(self, directory: Path) -> None:
        self.path = directory / AGENT_LOCK
        self.fd: int | None = None

    def acquire(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
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
        """The pid of the process that holds the lock, or None when nobody does."""
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
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
