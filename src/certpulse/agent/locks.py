"""A non-blocking exclusive lock on a file in the agent folder: one deliverer of events at a time."""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path


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
