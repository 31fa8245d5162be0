"""Human durations (``365d``, ``6w``, ``8h``, ``90s``) used in templates and configuration."""

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
