"""Row ids as callers name them: whole numbers from 0 to 2^31-1, what every id column holds.

The id columns are SQL ``INTEGER``: 32 bits on PostgreSQL (64 on SQLite), so 2^31-1 is the
largest id either database can hold and compare (PostgreSQL refuses a larger parameter with an
error, and SQLite's driver overflows past 2^63-1). An id outside that range names nothing that
can exist, so it is answered like an id that names nothing: ``not-found`` (HTTP 404), and it is
never handed to the database.
"""

from __future__ import annotations

from certpulse.errors import Reason, Refusal

MAX_ROW_ID = 2**31 - 1


def is_row_id(value: int) -> bool:
    return 0 <= value <= MAX_ROW_ID


def require_row_id(value: int, what: str) -> int:
    """``value`` when it can name a row; else a ``not-found`` refusal naming ``what``."""
    if not is_row_id(value):
        shown = str(value) if len(str(value)) <= 40 else f"{str(value)[:40]}..."
        raise Refusal(Reason.NOT_FOUND, f"no {what} {shown} ({what} ids run from 0 to {MAX_ROW_ID})")
    return value
