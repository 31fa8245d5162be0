"""The probes: ``/healthz`` and ``/readyz`` (can this worker take a request now?), ``/livez``
(is the process alive?).

``GET /livez`` answers ``200 {"status": "alive"}`` from the event loop, whatever the load or the
database: a liveness probe restarts a server that does not answer it, and only a wedged process
does not. ``GET /readyz`` is ``/healthz`` (below) and the database: ``503`` with ``Retry-After``
and ``"database": "unavailable"`` while the database does not answer a read
(:class:`DatabaseProbe`, at most one read in flight per worker and each result kept for
:data:`PROBE_FRESH_FOR`, so a probe costs a read per second at most and never waits for a handler
thread).

``GET /healthz``: whether this worker can take a request now, with the counts that say why.

``200 {"status": "ok", ...}`` while the worker has room. ``503 {"status": "degraded", ...}``
while every place under ``--max-inflight`` is taken (new requests are being shed), or while every
handler thread has been busy for :data:`BUSY_FOR` seconds or more (new requests wait). 503 because
that is what load balancers and readiness probes act on: any non-2xx takes this server out of
rotation until it answers 200 again, and the answer is never slowed by the load it reports (the
route runs on the event loop, is never shed and touches no database). Use it as a readiness
check; as a liveness check it would restart a server for being busy.

The document always has the counts: ``inflight`` (requests past their body, in progress in this
worker), ``inflight_limit`` and ``threads``, and ``busy_seconds`` / ``full_seconds`` (how long the
threads, or the places, have all been taken; 0 when they are not). Counts are per worker process:
with ``--workers N`` each probe reaches one of them.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from certpulse import __version__
from certpulse.frontends.problems import DATABASE_RETRY_AFTER
from certpulse.frontends.shedding import LoadShedding

# Seconds with every handler thread busy before a worker calls itself degraded: longer than the
# few hundred milliseconds a burst keeps them busy, short enough to steer a storm elsewhere.
BUSY_FOR = 5.0
# A database answer is kept this long: probes from several balancers cost one read a second.
PROBE_FRESH_FOR = 1.0
# A read that takes longer than this counts as no answer (the read goes on, and is shared).
PROBE_TIMEOUT = 5.0


class DatabaseProbe:
    """Whether the database answers, asked off the event loop (its default executor: never a
    handler thread), one question at a time, each answer kept :data:`PROBE_FRESH_FOR` seconds."""

    def __init__(self, answers: Callable[[], bool], *, fresh_for: float = PROBE_FRESH_FOR,
                 timeout: float = PROBE_TIMEOUT) -> None:
        self._answers = answers
        self.fresh_for = fresh_for
        self.timeout = timeout
        self._known: tuple[float, bool] | None = None  # (loop time, answer)
        self._asking: asyncio.Future[bool] | None = None

    async def answers(self) -> bool:
        loop = asyncio.get_running_loop()
        now = loop.time()
        if self._known is not None and now - self._known[0] < self.fresh_for:
            return self._known[1]
        if self._asking is None:
            asking = loop.run_in_executor(None, self._answers)
            self._asking = asking

            def done(future: asyncio.Future[bool]) -> None:
                self._asking = None
                if not future.cancelled():
                    self._known = (loop.time(), future.exception() is None and future.result())

            asking.add_done_callback(done)
        try:
            return await asyncio.wait_for(asyncio.shield(self._asking), self.timeout)
        except TimeoutError:
            return False


def liveness() -> dict[str, Any]:
    """The document of ``/livez``: the process answers."""
    return {"status": "alive", "version": __version__}


def readiness(healthy: bool, document: dict[str, Any], database: bool) -> tuple[int, dict[str, Any], int | None]:
    """(status code, document, Retry-After or None) of ``/readyz`` from ``/healthz``'s answer and
    whether the database answers."""
    ready = healthy and database
    status = "ok" if ready else ("unavailable" if not database else "degraded")
    retry = None if ready else (DATABASE_RETRY_AFTER if not database else 1)
    document = {**document, "status": status, "database": "ok" if database else "unavailable"}
    return (200 if ready else 503), document, retry


def worker_health(shedding: LoadShedding | None, now: float) -> tuple[bool, dict[str, Any]]:
    """(healthy, document) for a worker whose requests in progress ``shedding`` counts (None
    when shedding is off: then nothing is counted and the worker is always "ok")."""
    document: dict[str, Any] = {"version": __version__}
    if shedding is None:
        return True, {"status": "ok", **document}
    full = now - shedding.full_since if shedding.full_since is not None else 0.0
    busy = now - shedding.busy_since if shedding.busy_since is not None else 0.0
    healthy = shedding.full_since is None and busy < BUSY_FOR
    return healthy, {
        "status": "ok" if healthy else "degraded", **document,
        "inflight": shedding.inflight, "inflight_limit": shedding.max_inflight, "threads": shedding.threads,
        "full_seconds": round(full, 3), "busy_seconds": round(busy, 3),
    }


__all__ = ["BUSY_FOR", "DATABASE_RETRY_AFTER", "DatabaseProbe", "liveness", "readiness", "worker_health"]
