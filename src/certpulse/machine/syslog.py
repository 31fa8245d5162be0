"""Forwarding the event log to syslog (the system journal reads ``/dev/log`` too): a listener of
the store, told of each event once it is committed."""

from __future__ import annotations

import logging
import logging.handlers
from collections.abc import Sequence

from certpulse.display import PrintableFormatter
from certpulse.machine.events import Event


class SyslogForwarder:
    """Sends each event, once written, to syslog (the system journal reads ``/dev/log`` too).

    Best effort: the log in ``meta.db`` is the record; a syslog that is down loses nothing there."""

    def __init__(self, address: str = "/dev/log", facility: str = "daemon") -> None:
        self.address = address
        self.facility = logging.handlers.SysLogHandler.facility_names.get(facility, 3)
        self.logger = logging.getLogger(f"certpulse.events.syslog.{address}")
        self.logger.propagate = False
        self.logger.setLevel(logging.INFO)

    def _connect(self) -> bool:
        """Connect on first use, and again after syslog was away: it may start after the agent."""
        if self.logger.handlers:
            return True
        try:
            handler = logging.handlers.SysLogHandler(address=self.address, facility=self.facility)
        except OSError as exc:
            logging.getLogger("certpulse.events").warning("syslog at %s is unreachable: %s", self.address, exc)
            return False
        # An event's summary holds names from certificates: one line, no control codes.
        handler.setFormatter(PrintableFormatter("certpulse[%(process)d]: %(message)s"))
        self.logger.addHandler(handler)
        return True

    def __call__(self, events: Sequence[Event]) -> None:
        if not self._connect():
            return
        for event in events:
            level = {"error": logging.ERROR, "warning": logging.WARNING}.get(event.level, logging.INFO)
            self.logger.log(level, "event seq=%d channel=%s %s", event.seq, event.channel, event.summary())
