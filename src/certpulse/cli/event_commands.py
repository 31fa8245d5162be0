"""``certpulse events``: read the lifecycle event log (the seed's Event Viewer), or follow it."""

from __future__ import annotations

import datetime as dt
import json
import sys
import time
from typing import Annotated

import typer
from rich.text import Text

from certpulse import clock
from certpulse.cli.agent_commands import AgentDir, JsonOption, agent_store
from certpulse.cli.output import console, emit_json, table
from certpulse.display import printable
from certpulse.durations import parse_duration
from certpulse.errors import Reason, Refusal
from certpulse.machine.certstore import LocalStore
from certpulse.machine.events import CHANNELS, Event
from certpulse.machine.log import read_events

FOLLOW_POLL_SECONDS = 0.5


def parse_since(text: str, now: dt.datetime) -> dt.datetime:
    """An ISO 8601 time (UTC when no zone is given), or a duration back from now (``1h``, ``7d``)."""
    try:
        when = dt.datetime.fromisoformat(text)
    except ValueError:
        try:
            return now - parse_duration(text)
        except Refusal:
            raise Refusal(Reason.INVALID_ARGUMENT,
                          f"--since {text!r} is neither an ISO time nor a duration such as 1h or 7d") from None
    return when if when.tzinfo else when.replace(tzinfo=dt.UTC)


def _row(event: Event) -> tuple[str, ...]:
    prints = " -> ".join(p[:12] for p in (event.old_thumbprint, event.new_thumbprint) if p)
    return tuple(printable(v) for v in (
        str(event.seq), event.time.isoformat(), str(event.event_id), event.name, event.level, event.channel,
        event.action or "", event.template or "", prints, " ".join(event.detail.split())))


def events(
    dir_: AgentDir = None,
    event_id: Annotated[list[int] | None, typer.Option("--id", help="Only this event id (repeat)")] = None,
    channel: Annotated[str | None, typer.Option("--channel", help="system or user")] = None,
    since: Annotated[str | None, typer.Option("--since", help="ISO time, or a duration back from now (1h, 7d)")] = None,
    limit: Annotated[int, typer.Option("--limit", min=1, help="At most this many (the newest)")] = 1000,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Keep printing new events until interrupted")] = False,
    json_: JsonOption = False,
) -> None:
    """Show lifecycle events, oldest first: 1001-1007 (the seed's) and the failures from 1100."""
    if channel is not None and channel not in CHANNELS:
        raise Refusal(Reason.INVALID_ARGUMENT, f"--channel must be one of {', '.join(CHANNELS)}")
    with agent_store(dir_) as (_, _, store):
        start = parse_since(since, clock.now()) if since else None
        found = read_events(store.engine, event_ids=event_id or (), channel=channel, since=start, limit=limit,
                            newest=True)
        if not follow:
            if json_:
                emit_json([e.to_dict() for e in found])
            else:
                table("Events", ["seq", "time", "id", "name", "level", "channel", "action", "template",
                                 "thumbprint", "detail"], [_row(e) for e in found])
            return
        last = found[-1].seq if found else _newest(store)
        for event in found:
            _print_one(event, json_)
        try:
            while True:
                time.sleep(FOLLOW_POLL_SECONDS)
                for event in read_events(store.engine, after=last, event_ids=event_id or (), channel=channel):
                    _print_one(event, json_)
                    last = event.seq
        except KeyboardInterrupt:
            return


def _newest(store: LocalStore) -> int:
    newest = read_events(store.engine, limit=1, newest=True)
    return newest[0].seq if newest else 0


def _print_one(event: Event, json_: bool) -> None:
    """One line per event: JSON lines with ``--json``, so a pipe reads them as they come."""
    if json_:
        sys.stdout.write(json.dumps(event.to_dict(), sort_keys=True, default=str) + "\n")
    else:
        console.print(Text("  ".join(v for v in _row(event) if v)), soft_wrap=True)
    sys.stdout.flush()


__all__ = ["events", "parse_since"]
