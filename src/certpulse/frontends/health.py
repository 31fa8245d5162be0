"""``GET /healthz``: whether this worker can take a request now, with the counts that say why.

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

from typing import Any

from certpulse import __version__
from certpulse.frontends.shedding import LoadShedding

# Seconds with every handler thread busy before a worker calls itself degraded: longer than the
# few hundred milliseconds a burst keeps them busy, short enough to steer a storm elsewhere.
BUSY_FOR = 5.0


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


__all__ = ["BUSY_FOR", "worker_health"]
