"""The expiry monitor: which certificates get a 1003 (close to expiration) or a 1002 (expired). Pure.

Each certificate gets each event once: the caller passes what was already raised (durably
recorded with the event), so neither a second pulse nor a clock set back repeats one. A clock
set back does not take an event back either: it was raised, and tasks may have acted on it.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from typing import Literal

from certpulse.agent.model import Options, StoreSnapshot

Threshold = Literal["close", "expired"]


@dataclasses.dataclass(frozen=True)
class ExpiryNotice:
    thumbprint: str
    threshold: Threshold
    store: str  # "personal" or the monitored folder
    not_after: dt.datetime


def expiry_notices(options: Options, store: StoreSnapshot, now: dt.datetime, *, handled: frozenset[str],
                   warning_percent: int, raised: frozenset[tuple[str, str]]) -> tuple[ExpiryNotice, ...]:
    """Notices due now: for personal certificates the agent will not renew itself and every
    certificate of the additional stores, ``close`` once ``warning_percent`` of the lifetime is
    left and ``expired`` after ``not_after``. A certificate found already expired gets only
    ``expired``. Archived certificates are not watched; one whose chain this agent cannot validate
    (a certificate of another CA, imported by hand) is watched like any other.

    ``handled`` is what the agent takes care of itself: the plan's :attr:`Plan.handled`, the
    planner's answer from the same pass that planned the renewals, not a second opinion."""
    if not options.enabled:
        return ()  # SPEC 1: a disabled agent does nothing but say so
    notices: list[ExpiryNotice] = []
    seen: set[tuple[str, str]] = set()
    for cert in sorted(store.certificates, key=lambda c: (c.store, c.thumbprint)):
        if cert.thumbprint in handled or cert.archived:
            continue
        if cert.expired(now):
            threshold: Threshold = "expired"
        elif cert.not_after - now <= cert.lifetime * warning_percent / 100:
            threshold = "close"
        else:
            continue
        key = (cert.thumbprint, threshold)
        if key in raised or key in seen or (threshold == "close" and (cert.thumbprint, "expired") in raised):
            continue
        seen.add(key)
        notices.append(ExpiryNotice(cert.thumbprint, threshold, cert.store, cert.not_after))
    return tuple(notices)
