"""The ARI renewal window (RFC 9773) of one certificate, from its template's renewal rule. Pure.

The seeds renew a certificate ``renewal_period`` before it expires, and never later than when a
fifth of its lifetime is left: the lead ``L = min(renewal_period, 20% of lifetime)``. A fleet
issued in one hour would then renew in one hour too, so each certificate's window is shifted
earlier by an offset ``d`` in ``[0, L/4)`` taken from the SHA-256 of its serial (stable: every
answer for one certificate is the same, with no state), and lasts ``L/4``:

    start = not_after - L - d        end = start + L/4

so every window ends at or before ``not_after - L + L/4`` and certificates issued together
spread their renewals over ``L/4``. A revoked certificate, or one whose template's major version
was raised since it was issued (``template reenroll-all``), gets a window already over (from its
notBefore to a minute ago): a client that speaks ARI renews it at once.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib

LIFETIME_SHARE = 5  # the lead is at most 1/5 (20 %) of the lifetime
SPREAD_SHARE = 4  # windows are L/4 long and shifted by up to L/4
PAST_END = dt.timedelta(minutes=1)  # a window in the past ends this long before now


@dataclasses.dataclass(frozen=True, slots=True)
class Window:
    start: dt.datetime
    end: dt.datetime
    explanation: str | None


def _offset(serial: int, spread: dt.timedelta) -> dt.timedelta:
    """A stable share of ``spread`` for this serial, from the first 8 octets of its SHA-256."""
    digest = hashlib.sha256(serial.to_bytes(max(1, (serial.bit_length() + 7) // 8), "big")).digest()
    fraction = int.from_bytes(digest[:8], "big")
    microseconds = spread // dt.timedelta(microseconds=1)
    return dt.timedelta(microseconds=microseconds * fraction // 2**64)


def renewal_window(*, not_before: dt.datetime, not_after: dt.datetime, serial: int,
                   renewal_period: dt.timedelta, revoked: bool, superseded_major: bool,
                   now: dt.datetime) -> Window:
    """The suggested renewal window (see the module's description)."""
    if revoked or superseded_major:
        why = ("the certificate was revoked" if revoked
               else "its template's major version was raised: every holder renews now")
        end = now - PAST_END
        start = min(not_before, end - PAST_END)
        return Window(start, end, why)
    lifetime = not_after - not_before
    lead = min(renewal_period, lifetime / LIFETIME_SHARE)
    spread = lead / SPREAD_SHARE
    start = not_after - lead - _offset(serial, spread)
    return Window(start, start + max(spread, dt.timedelta(seconds=1)), None)
