"""Named pause points for crash tests: ``CERTPULSE_FAULT_PAUSE=NAME:SECONDS``.

A whole-process test sets the variable, waits for the agent to reach the point (it writes
``<store>/fault-NAME`` when it gets there), and kills it with SIGKILL, so recovery from a kill
at exactly that moment is tested with real processes. Unset, a point costs one dict lookup.

Points: ``flight-recorded`` (a request's row is committed; its key is not written yet),
``before-install`` (the CA answered; nothing installed yet) and ``before-link`` (the new version
is in the database; the live link still names the old one).
"""

from __future__ import annotations

import os
import time
from pathlib import Path


def fault_point(name: str, store_root: Path) -> None:
    spec = os.environ.get("CERTPULSE_FAULT_PAUSE")
    if not spec:
        return
    point, _, seconds = spec.partition(":")
    if point != name:
        return
    (store_root / f"fault-{name}").write_text(str(os.getpid()))
    time.sleep(min(float(seconds or "30"), 600.0))
