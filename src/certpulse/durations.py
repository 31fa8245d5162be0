"""Human durations (``365d``, ``6w``, ``8h``, ``90s``) used in templates and configuration, and the
exponential backoff every retry uses."""

from __future__ import annotations

import datetime as dt
import re

from certpulse.errors import Reason, Refusal

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400, "y": 365 * 86400}
_PART = re.compile(r"(\d+)([smhdwy])")


def parse_duration(text: str | int) -> dt.timedelta:
    """``"1y"`` is 365 days; parts add up (``"1d12h"``); a bare integer is seconds."""
    if isinstance(text, int) and not isinstance(text, bool):
        seconds = text
    elif isinstance(text, str):
        compact = text.replace(" ", "").lower()
        parts = _PART.findall(compact)
        if not compact or "".join(n + u for n, u in parts) != compact:
            raise Refusal(Reason.INVALID_ARGUMENT, f"{text!r} is not a duration such as 365d or 8h")
        seconds = sum(int(n) * _UNITS[u] for n, u in parts)
    else:
        raise Refusal(Reason.INVALID_ARGUMENT, f"{text!r} is not a duration such as 365d or 8h")
    if seconds <= 0:
        raise Refusal(Reason.INVALID_ARGUMENT, f"a duration must be positive (got {text!r})")
    return dt.timedelta(seconds=seconds)


def format_duration(delta: dt.timedelta) -> str:
    """The shortest exact spelling: 31536000 s -> ``365d``, 90 s -> ``90s``."""
    seconds = int(delta.total_seconds())
    for unit, size in (("w", 604800), ("d", 86400), ("h", 3600), ("m", 60)):
        if seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def backoff(attempt: int, base: dt.timedelta, cap: dt.timedelta) -> dt.timedelta:
    """The wait before retry number ``attempt`` (1 for the first retry): ``base``, doubled for
    each retry after the first, never more than ``cap``. The one exponential backoff of the agent,
    its notification tasks and rebind (callers add their own jitter where a fleet retries together)."""
    if attempt < 1:
        raise ValueError("attempt counts from 1")
    seconds = base.total_seconds() * 2.0 ** min(attempt - 1, 1000)  # a float: no overflow however long it failed
    return dt.timedelta(seconds=min(seconds, cap.total_seconds()))
