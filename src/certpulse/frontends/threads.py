"""How many blocking handlers one worker process runs at once.

The enrollment API's handlers block (a database transaction, a signature), so they run on the
worker's thread pool: anyio's default limiter, 40 threads unless told otherwise. Forty threads
are far more than two cores can use. Under load they all hold a database connection (a
PostgreSQL backend each, or a place in the SQLite writer's queue) and take turns at the GIL, so
each issuance takes longer and the server as a whole issues fewer: measured with
``benchmarks/issuance.py`` at 32 clients on two cores and two workers, 40 threads issued about
650 certificates/s on PostgreSQL and 870/s on SQLite; 4 threads about 850/s and 1,040/s, with
p99 latency halved (benchmarks/RESULTS.md, section 1).

``ca serve --threads N`` (default 4) sets the limit, passed to the workers as
``CERTPULSE_THREADS``. Requests beyond it wait on the event loop, where waiting costs nothing,
and the load-shedding limit (``--max-inflight``) still bounds that queue.
"""

from __future__ import annotations

import anyio.to_thread
from starlette.types import ASGIApp, Receive, Scope, Send

from certpulse.frontends.environment import whole_number_setting
from certpulse.frontends.metrics import set_worker_threads

THREADS_ENV = "CERTPULSE_THREADS"
DEFAULT_THREADS = 4
MAX_THREADS = 256


class ThreadLimit:
    """Set the worker's thread-pool size before its first request (or at its lifespan startup).

    anyio keeps the default limiter per event loop, so it is set from inside the loop, the first
    time the server calls the application."""

    def __init__(self, app: ASGIApp, threads: int) -> None:
        if not 1 <= threads <= MAX_THREADS:
            raise ValueError(f"threads must be between 1 and {MAX_THREADS}")
        self.app = app
        self.threads = threads
        self._set = False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if not self._set:
            anyio.to_thread.current_default_thread_limiter().total_tokens = self.threads
            set_worker_threads(self.threads)
            self._set = True
        await self.app(scope, receive, send)


def threads_from_environment() -> int:
    """``CERTPULSE_THREADS`` (set by ``ca serve --threads``), else the default."""
    return whole_number_setting(THREADS_ENV, DEFAULT_THREADS, low=1, high=MAX_THREADS,
                                requirement=f"a whole number from 1 to {MAX_THREADS}")


def limit_threads(app: ASGIApp, threads: int | None = None) -> ThreadLimit:
    """``app`` run with ``threads`` handler threads per worker (from the environment when not given)."""
    return ThreadLimit(app, threads_from_environment() if threads is None else threads)


__all__ = ["DEFAULT_THREADS", "MAX_THREADS", "THREADS_ENV", "ThreadLimit", "limit_threads",
           "threads_from_environment"]
