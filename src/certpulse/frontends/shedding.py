"""Load shedding: a cap on the requests one worker process has in progress.

A CA that takes every request during a storm (a thousand machines logging on at once, or every
certificate crossing its renewal threshold together) queues them inside the worker, answers
each later than the one before, and ends up doing work for clients that have already given up.
This ASGI middleware sits in front of the application: when a worker already has
``max_inflight`` requests in progress, the next one is answered at once with ``503`` and a
``Retry-After`` as an RFC 7807 problem, before a credential is checked or the database is
touched. Its body has been read by then (:class:`certpulse.frontends.limits.BodyLimit` sits
outside this limit, with a size limit and a deadline): a request counts against the limit only
from the moment it is whole, so clients trickling their bodies cannot hold the places.
Clients come back later; the certpulse agent keeps its current certificates and comes back when
it was told (:mod:`certpulse.agent.daemon`).

503 rather than 429: the limit is the server's capacity, not one client's rate, and a load
balancer in front of several CA servers treats 503 as "try another one". ``Retry-After`` is a
turn: whole seconds sized from the capacity this worker measured and the clients it has already
told to come back (:mod:`certpulse.frontends.retry_schedule`), so that clients shed together
return spread at the rate the worker can take them.

The probes (``/healthz``, ``/livez``, ``/readyz``) and ``/metrics`` are never shed (nor counted):
a probe or a scrape must answer precisely when the server is busiest. The limit is per worker process (``ca serve
--max-inflight N``, passed to the workers as ``CERTPULSE_MAX_INFLIGHT``; 0 turns shedding off).
The event loop of a worker is single-threaded, so the count needs no lock.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Iterable
from typing import TypeVar

from starlette.types import ASGIApp, Receive, Scope, Send

from certpulse.errors import Reason, Refusal
from certpulse.frontends.environment import whole_number_setting
from certpulse.frontends.metrics import (
    observe_inflight,
    observe_inflight_peak,
    observe_shed,
    set_inflight_limit,
    set_measured_capacity,
)
from certpulse.frontends.problems import problem
from certpulse.frontends.retry_schedule import RetrySchedule

MAX_INFLIGHT_ENV = "CERTPULSE_MAX_INFLIGHT"
# A worker runs its blocking handlers on a few threads (frontends/threads.py, default 4): 64 lets a
# queue form on the event loop behind them, enough to keep every thread busy, and no longer than
# about a tenth of a second of issuances.
DEFAULT_MAX_INFLIGHT = 64
EXEMPT_PATHS = frozenset({"/healthz", "/livez", "/readyz", "/metrics"})
_T = TypeVar("_T")
# Another protocol's answer to a refusal on its own paths (the ACME routes answer RFC 8555
# problems); None: the API's own problem document.
RefusalAnswers = Callable[[Scope, Refusal], ASGIApp | None]


class LoadShedding:
    """Answer ``503`` + ``Retry-After`` when ``max_inflight`` requests are already in progress."""

    def __init__(self, app: ASGIApp, max_inflight: int, *, schedule: RetrySchedule | None = None,
                 exempt: Iterable[str] = EXEMPT_PATHS, monotonic: Callable[[], float] = time.monotonic,
                 threads: int | None = None, refusals: RefusalAnswers | None = None) -> None:
        if max_inflight < 1:
            raise ValueError("max_inflight must be at least 1")
        self.app = app
        self.max_inflight = max_inflight
        self.schedule = schedule or RetrySchedule()
        self.exempt = frozenset(exempt)
        self.monotonic = monotonic
        self.peak = 0
        self.threads = threads or self.schedule.saturated_at  # handler threads (frontends/threads.py)
        self.refusals = refusals
        self.full_since: float | None = None  # since when every place has been taken (None: not now)
        self.busy_since: float | None = None  # since when every handler thread has had a request
        set_inflight_limit(max_inflight)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("path") in self.exempt:
            await self.app(scope, receive, send)
            return
        if self.schedule.inflight >= self.max_inflight:
            await self._shed(scope, receive, send)
            return
        self.schedule.started(self.monotonic())
        self._note_load(self.monotonic())
        observe_inflight(+1)
        if self.schedule.inflight > self.peak:
            self.peak = self.schedule.inflight
            observe_inflight_peak(self.peak)
        try:
            await self.app(scope, receive, send)
        finally:
            self._measure(self.schedule.completed)
            self._note_load(self.monotonic())
            observe_inflight(-1)

    def _note_load(self, now: float) -> None:
        """Keep since when the places, and the handler threads, have all been taken (for /healthz)."""
        inflight = self.schedule.inflight
        if inflight < self.max_inflight:
            self.full_since = None
        elif self.full_since is None:
            self.full_since = now
        if inflight < self.threads:
            self.busy_since = None
        elif self.busy_since is None:
            self.busy_since = now

    @property
    def inflight(self) -> int:
        return self.schedule.inflight

    def _measure(self, event: Callable[[float], _T]) -> _T:
        """Tell the schedule what happened now, and publish the capacity when it was remeasured."""
        capacity = self.schedule.capacity
        answer = event(self.monotonic())
        if self.schedule.capacity is not None and self.schedule.capacity != capacity:
            set_measured_capacity(self.schedule.capacity)
        return answer

    async def _shed(self, scope: Scope, receive: Receive, send: Send) -> None:
        observe_shed()
        client = client_digest(scope)
        seconds = self._measure(lambda now: self.schedule.shed(now, client))
        detail = (f"the server is at its limit of {self.max_inflight} requests in progress; "
                  f"retry after {seconds} s")
        other = self.refusals(scope, Refusal(Reason.RATE_LIMITED, detail, retry_after=seconds)) \
            if self.refusals is not None else None
        if other is not None:
            await other(scope, receive, send)
            return
        response = problem(Reason.UNAVAILABLE,
                           f"the server is at its limit of {self.max_inflight} requests in progress; "
                           f"retry after {seconds} s", status=503, retry_after=seconds)
        response.headers["Retry-After"] = str(seconds)
        await response(scope, receive, send)


def client_digest(scope: Scope) -> bytes | None:
    """A digest of the request's ``Authorization`` header (the client's credential), to give each
    client one turn; None without one. The credential itself is neither kept nor logged."""
    for name, value in scope.get("headers", ()):
        if name == b"authorization":
            return hashlib.blake2b(value, digest_size=16).digest()
    return None


def max_inflight_from_environment() -> int:
    """``CERTPULSE_MAX_INFLIGHT`` (set by ``ca serve --max-inflight``), else the default; 0 = off."""
    return whole_number_setting(MAX_INFLIGHT_ENV, DEFAULT_MAX_INFLIGHT, low=0, high=None,
                                requirement="a whole number (0 = no limit)")


def shed_load(app: ASGIApp, max_inflight: int | None = None, *, threads: int = 1,
              refusals: RefusalAnswers | None = None) -> ASGIApp:
    """``app`` behind a :class:`LoadShedding` limit (from the environment when not given); ``app``
    itself when the limit is 0. ``threads``: the worker's handler threads, the requests in
    progress at which it is saturated (see :class:`RetrySchedule`)."""
    limit = max_inflight_from_environment() if max_inflight is None else max_inflight
    if limit == 0:
        return app
    return LoadShedding(app, limit, schedule=RetrySchedule(saturated_at=min(limit, threads)), threads=threads,
                        refusals=refusals)


__all__ = ["DEFAULT_MAX_INFLIGHT", "MAX_INFLIGHT_ENV", "LoadShedding", "client_digest",
           "max_inflight_from_environment", "shed_load"]
