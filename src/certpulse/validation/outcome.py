"""What one validation found, and the time budget it runs under."""

from __future__ import annotations

import dataclasses
import time

from certpulse.display import printable

# The ACME error names (RFC 8555 section 6.7) a failed validation may carry.
CONNECTION = "connection"
DNS = "dns"
INCORRECT_RESPONSE = "incorrectResponse"
TLS = "tls"
UNAUTHORIZED = "unauthorized"
MALFORMED = "malformed"

# A detail is one sentence an operator reads and a client shows: long enough for a host name
# and a short excerpt of what the server sent, short enough that a hostile server cannot fill
# a log or a problem document.
DETAIL_LIMIT = 400


@dataclasses.dataclass(frozen=True)
class Outcome:
    """``valid``, or why not: ``error`` is the ACME error name (connection, dns,
    incorrectResponse, tls, unauthorized, malformed) and ``detail`` one printable sentence.
    ``record`` says what was reached (URL, host name, port, addresses, resolver), so the CA
    can keep it with the challenge (RFC 8555's ``validationRecord``)."""

    valid: bool
    error: str | None
    detail: str
    record: dict[str, object]


def sentence(text: str) -> str:
    """``text`` as a detail: one printable line (data from the network may hold controls),
    cut at :data:`DETAIL_LIMIT` characters."""
    shown = printable(text)
    return shown if len(shown) <= DETAIL_LIMIT else shown[:DETAIL_LIMIT - 3] + "..."


def excerpt(data: bytes | str, limit: int = 40) -> str:
    """A short quoted excerpt of something a server sent, safe to put in a detail."""
    text = data.decode("utf-8", "replace") if isinstance(data, bytes) else data
    cut = text[:limit]
    return repr(printable(cut) + ("..." if len(text) > limit else ""))


def passed(detail: str, record: dict[str, object]) -> Outcome:
    return Outcome(valid=True, error=None, detail=sentence(detail), record=record)


def failed(error: str, detail: str, record: dict[str, object]) -> Outcome:
    return Outcome(valid=False, error=error, detail=sentence(detail), record=record)


class BudgetSpent(Exception):
    """The validation's time budget ran out between two steps."""


class Budget:
    """One validation's time: every look-up, connect and read takes at most what is left.
    (A library read that started in time may end up to one read timeout later; the budget is
    checked again after it, so a validation takes at most about twice ``seconds``.)"""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self._end = time.monotonic() + seconds

    def remaining(self) -> float:
        """Seconds left; :class:`BudgetSpent` when none are."""
        left = self._end - time.monotonic()
        if left <= 0:
            raise BudgetSpent(f"gave up after {self.seconds:g} s (the validation timeout)")
        return left
