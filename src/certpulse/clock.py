"""The one place that reads the wall clock.

Everything else (policy checks, issuance, the planner, expiry logic) takes ``now`` as an
argument so that it can be tested at any instant; only the edges (CLI commands, HTTP
handlers, the daemon loop) call :func:`now` and pass the result inward.
"""

from __future__ import annotations

import datetime as dt


def now() -> dt.datetime:
    """The current time in UTC, truncated to whole seconds (X.509 has no finer grain)."""
    return dt.datetime.now(dt.UTC).replace(microsecond=0)
