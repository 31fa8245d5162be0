"""Settings that ``ca serve`` hands to its worker processes through the environment.

uvicorn starts each worker from an import string, so a command-line option reaches the workers
as an environment variable that the worker reads back when it builds its application. One reader
for them, so that every such setting refuses a bad value the same way: by name, with what it
must be.
"""

from __future__ import annotations

import os

from certpulse.errors import Reason, Refusal


def whole_number_setting(name: str, default: int, *, low: int, high: int | None, requirement: str) -> int:
    """The whole number in ``$name`` (``default`` when unset or blank), within ``low``..``high``
    (``high`` None: no upper bound); a Refusal saying it ``must be <requirement>`` otherwise."""
    text = os.environ.get(name, "").strip()
    if not text:
        return default
    if not text.isdigit() or int(text) < low or (high is not None and int(text) > high):
        raise Refusal(Reason.INVALID_ARGUMENT, f"{name} must be {requirement}, not {text!r}")
    return int(text)


__all__ = ["whole_number_setting"]
