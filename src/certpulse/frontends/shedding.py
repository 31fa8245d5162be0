"""Load shedding: a cap on the requests one worker process has in progress.

A CA that takes every request during a storm (a thousand machines logging on at once, or every
certificate crossing its renewal threshold together) queues them inside the worker, answers
each later than the one before, and ends up doing work for clients that have already given up.
This ASGI middleware sits in front of everything else: when a worker already has
``max_inflight`` requests in progress, the next one is answered at once with ``503`` and a
``Retry-After`` as an RFC 7807 problem, before its body is read, a credential is checked or the
database is touched. Clients come back later; the certpulse agent counts the answer as a failed
pulse and backs off (at least its one-minute floor, never sooner than ``Retry-After``, with
jitter), keeping its current certificates meanwhile.

503 rather than 429: the limit is the server's capacity, not one client's rate, and a load
balancer in front of several CA servers treats 503 as "try another one". ``Retry-After`` is a
whole number of seconds chosen at random in a small range per answer, so clients shed together
do not all come back together.

``/healthz`` and ``/metrics`` are never shed (nor counted): a liveness probe or a scrape must
answer precisely when the server is busiest. The limit is per worker process (``ca serve
--max-inflight N``, passed to the workers as ``CERTPULSE_MAX_INFLIGHT``; 0 turns shedding off).
The event loop of a worker is single-threaded, so the count needs no lock.
"""

from __future__ import annotations

import random
from collections.abc import Iterable

from starlette.types import ASGIApp, Receive, Scope, Send

from certpulse.errors import Reason
from certpulse.frontends.environment import whole_number_setting
from certpulse.frontends.metrics import (
    observe_inflight,
    observe_inflight_peak,
    observe_shed,
    set_inflight_limit,
)
from certpulse.frontends.problems import problem

MAX_INFLIGHT_ENV = "CERTPULSE_MAX_INFLIGHT"
# A worker runs its blocking handlers on a few threads (frontends/threads.py, default 4): 64 lets a
# queue form on the event loop behind them, enough to keep every thread busy, and no longer than
# about a tenth of a second of issuances.
DEFAULT_MAX_INFLIGHT = 64
RETRY_AFTER = (1, 5)  # seconds, inclusive: each shed answer draws one
EXEMPT_PATHS = frozenset({"/healthz", "/metrics"})


class LoadShedding:
    """Answer ``503`` + ``Retry-After`` when ``max_inflight`` requests are already in progress."""

    def __init__(self, app: ASGIApp, max_inflight: int, *, retry_after: tuple[int, int] = RETRY_AFTER,
                 exempt: Iterable[str] = EXEMPT_PATHS, rng: random.Random | None = None) -> None:
        if max_inflight < 1:
            raise ValueError("max_inflight must be at least 1")
        if not 0 < retry_after[0] <= retry_after[1]:
            raise ValueError("retry_after must be a range of positive seconds")
        self.app = app
        self.max_inflight = max_inflight
        self.retry_after = retry_after
        self.exempt = frozenset(exempt)
        self.rng = rng or random.Random()
        self.inflight = 0
        self.peak = 0
        set_inflight_limit(max_inflight)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("path") in self.exempt:
            await self.app(scope, receive, send)
            return
        if self.inflight >= self.max_inflight:
            await self._shed(scope, receive, send)
            return
        self.inflight += 1
        observe_inflight(+1)
        if self.inflight > self.peak:
            self.peak = self.inflight
            observe_inflight_peak(self.peak)
        try:
            await self.app(scope, receive, send)
        finally:
            self.inflight -= 1
            observe_inflight(-1)

    async def _shed(self, scope: Scope, receive: Receive, send: Send) -> None:
        observe_shed()
        seconds = self.rng.randint(*self.retry_after)
        response = problem(Reason.UNAVAILABLE,
                           f"the server is at its limit of {self.max_inflight} requests in progress; "
                           f"retry after {seconds} s", status=503, retry_after=seconds)
        response.headers["Retry-After"] = str(seconds)
        await response(scope, receive, send)


def max_inflight_from_environment() -> int:
    """``CERTPULSE_MAX_INFLIGHT`` (set by ``ca serve --max-inflight``), else the default; 0 = off."""
    return whole_number_setting(MAX_INFLIGHT_ENV, DEFAULT_MAX_INFLIGHT, low=0, high=None,
                                requirement="a whole number (0 = no limit)")


def shed_load(app: ASGIApp, max_inflight: int | None = None) -> ASGIApp:
    """``app`` behind a :class:`LoadShedding` limit (from the environment when not given); ``app``
    itself when the limit is 0."""
    limit = max_inflight_from_environment() if max_inflight is None else max_inflight
    return LoadShedding(app, limit) if limit > 0 else app


__all__ = ["DEFAULT_MAX_INFLIGHT", "MAX_INFLIGHT_ENV", "LoadShedding", "max_inflight_from_environment",
           "shed_load"]
