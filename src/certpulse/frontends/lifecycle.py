"""A worker's life is bounded by its server's: it ends when ``ca serve`` dies, and a stop ends in time.

**Parent death.** ``ca serve --workers N`` runs N worker processes under one parent that holds
nothing but the listening socket and the supervision. Killed with SIGKILL, the parent could not
stop them: they went on serving, holding the port, and a restart failed with "Address already in
use". So each worker asks the kernel for SIGTERM when its parent dies (``PR_SET_PDEATHSIG``, on
Linux), and, for the cases the kernel's signal misses (another system; a parent gone before the
request was made), a watchdog thread checks once a second that its parent is still the server
that started it (:data:`SUPERVISOR_ENV`). Either way the worker stops as on any SIGTERM: within
the stop deadline below.

**Stop deadline.** A stop waits up to ``ca serve --shutdown-timeout`` seconds
(:data:`DEFAULT_SHUTDOWN_TIMEOUT`) for the requests in progress; uvicorn then cancels them
(``timeout_graceful_shutdown``) and :class:`CutAtStop` answers each one that has not begun its
answer with ``503`` + ``Retry-After`` and closes its connection, instead of the traceback and 500
uvicorn would give. A request whose handler thread cannot be interrupted (a database call that
hangs) would still hold the process; so from the first SIGTERM or SIGINT a timer ends the process
:data:`HARD_STOP_MARGIN` seconds after the deadline, whatever is left.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import signal
import sys
import threading
from types import FrameType
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from certpulse.errors import Reason
from certpulse.frontends.environment import whole_number_setting
from certpulse.frontends.problems import problem

log = logging.getLogger("certpulse.serve")

SUPERVISOR_ENV = "CERTPULSE_SUPERVISOR_PID"  # set by ``ca serve``: the pid of the server process
SHUTDOWN_TIMEOUT_ENV = "CERTPULSE_SHUTDOWN_TIMEOUT"
# Long enough for an issuance in progress (milliseconds; seconds on a loaded SQLite), short enough
# that a client holding a request half-sent delays a restart by seconds, not minutes.
DEFAULT_SHUTDOWN_TIMEOUT = 20
MAX_SHUTDOWN_TIMEOUT = 600
# After the deadline, time for the cancelled requests' answers and the audit's last rows.
HARD_STOP_MARGIN = 10
HARD_STOP_STATUS = 70  # the exit status when the timer had to end the process (EX_SOFTWARE)
STOPPING_RETRY_AFTER = 1  # seconds: another worker, or this server restarted, takes the retry
WATCH_EVERY = 1.0
_PR_SET_PDEATHSIG = 1


def shutdown_timeout_from_environment() -> int:
    """``CERTPULSE_SHUTDOWN_TIMEOUT`` (set by ``ca serve --shutdown-timeout``), else the default."""
    return whole_number_setting(SHUTDOWN_TIMEOUT_ENV, DEFAULT_SHUTDOWN_TIMEOUT, low=1, high=MAX_SHUTDOWN_TIMEOUT,
                                requirement=f"a whole number of seconds from 1 to {MAX_SHUTDOWN_TIMEOUT}")


def supervisor_from_environment() -> int | None:
    text = os.environ.get(SUPERVISOR_ENV, "").strip()
    return int(text) if text.isdigit() else None


def bind_to_supervisor(supervisor: int | None) -> None:
    """In a worker process of ``supervisor`` (the server's pid): be sent SIGTERM when it dies.
    Nothing in the server process itself (one worker: the server serves) or without a supervisor."""
    if supervisor is None or supervisor == os.getpid():
        return
    _ask_parent_death_signal()
    if os.getppid() != supervisor:  # died before the request was made: the kernel will not tell
        _parent_gone(supervisor)
        return
    threading.Thread(target=_watch_parent, args=(supervisor,), name="certpulse-parent-watch", daemon=True).start()


def _ask_parent_death_signal() -> None:
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)  # the C library the interpreter runs on
        if libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0) != 0:
            log.warning("could not ask for a signal at the server's death (errno %d); the watchdog stays",
                        ctypes.get_errno())
    except OSError as exc:
        log.warning("could not ask for a signal at the server's death (%s); the watchdog stays", exc)


def _watch_parent(supervisor: int) -> None:
    stopped = threading.Event()
    while not stopped.wait(WATCH_EVERY):
        if os.getppid() != supervisor:
            _parent_gone(supervisor)
            return


def _parent_gone(supervisor: int) -> None:
    log.error("the server process [%d] is gone: worker [%d] stops", supervisor, os.getpid())
    os.kill(os.getpid(), signal.SIGTERM)


def arm_stop_deadline(seconds: int, *, margin: int = HARD_STOP_MARGIN) -> None:
    """From the first SIGTERM or SIGINT on, end the process ``seconds + margin`` seconds later if
    it is still there. The handlers in place (uvicorn's graceful stop) still run first. Only from
    the main thread (the only one signal handlers can be set from); elsewhere nothing is armed."""
    if threading.current_thread() is not threading.main_thread():
        return
    armed = threading.Event()

    def hard_stop() -> None:
        log.error("the stop deadline (%d s) has passed: ending worker [%d] with requests still in progress",
                  seconds, os.getpid())
        logging.shutdown()
        os._exit(HARD_STOP_STATUS)

    for signum in (signal.SIGTERM, signal.SIGINT):
        previous = signal.getsignal(signum)

        def on_signal(sig: int, frame: FrameType | None, previous: Any = previous) -> None:
            if not armed.is_set():
                armed.set()
                timer = threading.Timer(seconds + margin, hard_stop)
                timer.daemon = True
                timer.start()
            if callable(previous):
                previous(sig, frame)
            elif previous == signal.SIG_DFL:
                signal.signal(sig, signal.SIG_DFL)
                signal.raise_signal(sig)

        signal.signal(signum, on_signal)


class CutAtStop:
    """The application's outermost layer: a request cancelled by the stop deadline is answered
    ``503`` (problem JSON, ``Retry-After``, connection closed) when its answer had not begun, and
    ends quietly either way (uvicorn would log a traceback and answer 500)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except asyncio.CancelledError:
            if not started:
                response = problem(Reason.UNAVAILABLE, "the server is stopping; retry", status=503,
                                   retry_after=STOPPING_RETRY_AFTER)
                response.headers["Retry-After"] = str(STOPPING_RETRY_AFTER)
                response.headers["Connection"] = "close"
                try:
                    await response(scope, receive, send)
                except Exception:  # the connection is gone: nothing to tell
                    log.debug("the stopping answer could not be sent", exc_info=True)


__all__ = ["DEFAULT_SHUTDOWN_TIMEOUT", "HARD_STOP_MARGIN", "HARD_STOP_STATUS", "MAX_SHUTDOWN_TIMEOUT",
           "SHUTDOWN_TIMEOUT_ENV", "SUPERVISOR_ENV", "CutAtStop", "arm_stop_deadline", "bind_to_supervisor",
           "shutdown_timeout_from_environment", "supervisor_from_environment"]
