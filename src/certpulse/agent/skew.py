"""How far this machine's clock is from its CA's, measured from the ``Date`` header of the CA's
answers, and the warning when it is too far.

Certificates are dated by the CA's clock and judged by this machine's, so a machine whose clock
runs behind holds certificates that "have not started yet" and one that runs ahead sees them
expire early. The planner copes with either (a certificate of this machine's own counts as held
however late it starts, and the CA backdates what it issues), but a wrong clock breaks more than
autoenrollment (TLS, Kerberos, logs), so the operator is told: each pulse records the offset
(state ``clock_skew``, shown by ``agent status`` and the metric
``certpulse_clock_skew_seconds``), and when it exceeds ``clock_skew_warning`` (agent.toml, 5
minutes) the pulse notes it and event 1107 (``clock-skew``) is raised once per episode: again
only after the clock was back within the bound.

The header is hostile input: a missing or malformed one is ignored (no measurement), never an
error. Its grain is one second and the answer's travel time adds to it, which is far below the
bound.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import email.utils
import logging
from collections.abc import Iterable
from typing import Any

from certpulse.agent.model import Note
from certpulse.machine.certstore import LocalStore
from certpulse.machine.events import EventDraft, EventId

log = logging.getLogger("certpulse.agent")
STATE = "clock_skew"
DEFAULT_WARNING = dt.timedelta(minutes=5)
MAX_DATE_LENGTH = 64  # an RFC 9110 IMF-fixdate is 29 characters


def parse_http_date(value: str | None) -> dt.datetime | None:
    """An HTTP ``Date`` header as an aware UTC time; None when missing or malformed."""
    if not value or len(value) > MAX_DATE_LENGTH:
        return None
    try:
        parsed = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if parsed.tzinfo is None:  # "-0000": no zone given; RFC 9110 dates are always GMT
        return None
    return parsed.astimezone(dt.UTC)


@dataclasses.dataclass(frozen=True)
class Measurement:
    """One policy server's clock against this machine's."""

    url: str
    offset: dt.timedelta  # the CA's clock minus this machine's: positive when this machine is behind


def describe(offset: dt.timedelta) -> str:
    """``this machine's clock is 8 minutes behind the CA's``: seconds below two minutes, else to
    the nearest minute (the measurement's grain is a second or two: 479 s is 8 minutes)."""
    seconds = abs(round(offset.total_seconds()))
    minutes = (seconds + 30) // 60
    if seconds < 120:
        amount = f"{seconds} second{'s' if seconds != 1 else ''}"
    elif minutes < 120:
        amount = f"{minutes} minutes"
    else:
        amount = f"{minutes // 60} hours {minutes % 60} minutes"
    return f"this machine's clock is {amount} {'behind' if offset.total_seconds() > 0 else 'ahead of'} the CA's"


def observe(store: LocalStore, measured: Iterable[Measurement], now: dt.datetime,
            bound: dt.timedelta = DEFAULT_WARNING) -> list[Note]:
    """Record the largest offset measured in this pulse; past ``bound``, a note for the pulse and,
    at the start of an episode, event 1107. With no measurement (no server answered) the last
    one stays as it was."""
    found = list(measured)
    if not found:
        return []
    worst = max(found, key=lambda m: abs(m.offset))
    previous: Any = store.get_state(STATE)
    was_over = isinstance(previous, dict) and previous.get("exceeded") is True
    over = abs(worst.offset) > bound
    store.set_state(STATE, {"offset_seconds": worst.offset.total_seconds(), "server": worst.url,
                            "measured_at": now.isoformat(), "bound_seconds": bound.total_seconds(),
                            "exceeded": over})
    if not over:
        if was_over:
            log.info("clock skew back within %s: %s", bound, describe(worst.offset))
        return []
    detail = f"{describe(worst.offset)} (by the Date header of {worst.url}); check the clock (NTP)"
    if not was_over:
        log.warning("%s", detail)
        store.record([EventDraft(EventId.CLOCK_SKEW, detail=detail,
                                 data={"offset_seconds": worst.offset.total_seconds(), "server": worst.url,
                                       "bound_seconds": bound.total_seconds()})], now)
    return [Note("clock-skew", detail=detail)]
