"""The clock-skew measurement: the hostile ``Date`` header, the words an operator reads, and the
warning raised once per episode (on a real store)."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from pathlib import Path

import pytest

from certpulse.agent.skew import STATE, Measurement, describe, observe, parse_http_date
from certpulse.machine.certstore import LocalStore
from certpulse.machine.events import DESCRIPTIONS, EventId
from certpulse.machine.log import read_events

NOW = dt.datetime(2030, 6, 1, 12, 0, tzinfo=dt.UTC)
MINUTE = dt.timedelta(minutes=1)
URL = "https://ca.example"


def test_a_well_formed_date_is_read_in_utc() -> None:
    assert parse_http_date("Sat, 01 Jun 2030 12:08:00 GMT") == NOW + 8 * MINUTE
    assert parse_http_date("Sat, 01 Jun 2030 14:08:00 +0200") == NOW + 8 * MINUTE


@pytest.mark.parametrize("value", [None, "", "yesterday", "Sat, 01 Jun 2030 12:08:00 -0000", "Sat, 99 Jun 2030",
                                   "Sat, 01 Jun 2030 12:08:00 GMT" + " " * 64, "\x1b[31m", "Sat, 01 Foo 2030 1:2:3 GMT",
                                   "Sat, 01 Jun 99999999999999999999 12:08:00 GMT"])
def test_a_missing_or_malformed_date_is_ignored(value: str | None) -> None:
    assert parse_http_date(value) is None


def test_the_words_say_how_far_and_which_way() -> None:
    assert describe(8 * MINUTE) == "this machine's clock is 8 minutes behind the CA's"
    assert describe(-8 * MINUTE) == "this machine's clock is 8 minutes ahead of the CA's"
    assert describe(dt.timedelta(seconds=1)) == "this machine's clock is 1 second behind the CA's"
    assert describe(dt.timedelta(hours=2, minutes=5)) == "this machine's clock is 2 hours 5 minutes behind the CA's"
    assert describe(dt.timedelta(minutes=7, seconds=59)) == "this machine's clock is 8 minutes behind the CA's"


def test_1107_is_a_warning_named_clock_skew() -> None:
    assert int(EventId.CLOCK_SKEW) == 1107
    assert DESCRIPTIONS[EventId.CLOCK_SKEW] == ("clock-skew", "warning")


@pytest.fixture
def store(tmp_path: Path) -> Iterator[LocalStore]:
    opened = LocalStore(tmp_path / "store", channel="system")
    yield opened
    opened.close()


def skew_events(store: LocalStore) -> list[str]:
    return [e.detail for e in read_events(store.engine, event_ids=[1107])]


def test_the_warning_is_raised_once_per_episode(store: LocalStore) -> None:
    def pulse(offset: dt.timedelta, minute: int) -> list[str]:
        return [n.detail for n in observe(store, [Measurement(URL, offset)], NOW + minute * MINUTE, 5 * MINUTE)]

    assert pulse(4 * MINUTE, 0) == [] and skew_events(store) == []
    assert store.get_state(STATE)["offset_seconds"] == 240 and store.get_state(STATE)["exceeded"] is False
    notes = pulse(8 * MINUTE, 1)
    assert notes == ["this machine's clock is 8 minutes behind the CA's (by the Date header of "
                     "https://ca.example); check the clock (NTP)"]
    assert pulse(9 * MINUTE, 2) == [notes[0].replace("8 minutes", "9 minutes")]  # noted at every pulse ...
    assert skew_events(store) == notes  # ... raised once
    assert pulse(dt.timedelta(seconds=3), 3) == []  # back within the bound: the episode ends
    assert pulse(-7 * MINUTE, 4) == [notes[0].replace("8 minutes behind", "7 minutes ahead of")]
    assert len(skew_events(store)) == 2
    [_, second] = read_events(store.engine, event_ids=[1107])
    assert second.data == {"offset_seconds": -420.0, "server": URL, "bound_seconds": 300.0}


def test_the_largest_offset_counts_and_no_answer_keeps_the_last(store: LocalStore) -> None:
    observe(store, [Measurement("https://a", MINUTE), Measurement("https://b", -6 * MINUTE)], NOW)
    kept = store.get_state(STATE)
    assert (kept["server"], kept["offset_seconds"], kept["exceeded"]) == ("https://b", -360.0, True)
    assert observe(store, [], NOW + MINUTE) == []
    assert store.get_state(STATE) == kept
