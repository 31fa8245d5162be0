"""The shedding worker's Retry-After turns (frontends/retry_schedule.py): pure, time passed in.

Each case replays what a worker saw, request by request at given instants, and checks the
capacity it measured and the turns it handed out.
"""

from __future__ import annotations

import math

import pytest

from certpulse.frontends import retry_schedule
from certpulse.frontends.retry_schedule import (
    LONGEST_RETRY_AFTER,
    MEASURE_COMPLETIONS,
    MEASURE_WINDOW,
    MEASURES_KEPT,
    TURN_SHARE,
    RetrySchedule,
)


def serve_one_at_a_time(schedule: RetrySchedule, start: float, *, count: int, each: float, gap: float = 0.0) -> float:
    """``count`` requests one after another, each ``each`` seconds long, ``gap`` idle seconds
    apart; the time after the last."""
    now = start
    for _ in range(count):
        schedule.started(now)
        now += each
        schedule.completed(now)
        now += gap
    return now


def serve_full(schedule: RetrySchedule, start: float, *, slots: int, count: int, each: float) -> float:
    """``slots`` requests always in progress: one ends and the next starts every ``each / slots``
    seconds, ``count`` times; the time after the last."""
    step = each / slots
    for _ in range(slots):
        schedule.started(start)
    now = start
    for _ in range(count):
        now += step
        schedule.completed(now)
        schedule.started(now)
    return now


def test_before_any_measure_every_turn_is_one_second() -> None:
    schedule = RetrySchedule()
    assert [schedule.shed(0.001 * i) for i in range(500)] == [1] * 500
    assert schedule.capacity is None


def test_one_request_at_a_time_is_a_measure_only_for_a_worker_of_one_thread() -> None:
    """Requests of 5 ms, a second apart. With one handler thread the worker is saturated while
    each runs: 200 a second, although it was only asked for one a second. With four threads it
    never was, and measures nothing: its latency says little of what four threads can do."""
    one = RetrySchedule()
    serve_one_at_a_time(one, 0.0, count=int(MEASURE_WINDOW / 0.005) + 1, each=0.005, gap=1.0)
    assert one.capacity == pytest.approx(200, rel=0.01)
    four = RetrySchedule(saturated_at=4)
    now = serve_one_at_a_time(four, 0.0, count=1000, each=0.005, gap=1.0)
    assert four.capacity is None and four.shed(now) == 1


def test_a_full_worker_measures_what_it_completes() -> None:
    """64 in progress, each taking 160 ms: 400 a second, with one handler thread or four."""
    for threads in (1, 4):
        schedule = RetrySchedule(saturated_at=threads)
        serve_full(schedule, 0.0, slots=64, count=400, each=0.16)
        assert schedule.capacity == pytest.approx(400, rel=0.02)


def test_clients_shed_together_get_turns_in_order_at_the_measured_rate() -> None:
    schedule = RetrySchedule()
    now = serve_full(schedule, 0.0, slots=64, count=400, each=0.16)
    assert schedule.capacity is not None
    rate = schedule.capacity * TURN_SHARE
    turns = [schedule.shed(now) for _ in range(1000)]  # 1,000 clients shed in the same instant
    assert turns == sorted(turns)
    assert turns[0] == 1 and turns[-1] == math.ceil(1000 / rate)
    for second in range(1, turns[-1] + 1):
        assert turns.count(second) <= math.ceil(rate) + 1  # no second is given more than the rate


def test_a_client_shed_again_before_its_turn_keeps_it() -> None:
    """A renewal pulse is shed at its policy fetch, its revocation check and its submission: one
    client, one turn. Clients without a credential are counted on each request."""
    schedule = RetrySchedule()
    now = serve_one_at_a_time(schedule, 0.0, count=int(MEASURE_WINDOW / 0.01) + 1, each=0.01)  # 100/s
    assert schedule.capacity is not None
    rate = schedule.capacity * TURN_SHARE
    clients = [b"client-%d" % index for index in range(800)]
    first = [schedule.shed(now, client) for client in clients]
    again = [schedule.shed(now + 0.2, client) for client in clients]  # the same pulse, 200 ms on
    assert first[-1] == math.ceil(800 / rate)
    assert again == [max(1, math.ceil(turn - 0.2)) for turn in first]
    assert schedule.shed(now + 0.2, b"newcomer") == math.ceil((800 - 0.2 * rate + 1) / rate)
    # due: a client back at its turn and shed again gets a new one at the end of the queue
    later = now + first[0] + 0.1
    assert schedule.shed(later, clients[0]) == math.ceil((801 - (later - now) * rate + 1) / rate)
    queued = schedule._queue
    for _ in range(3):
        schedule.shed(later, None)
    assert schedule._queue == pytest.approx(queued + 3)  # no credential: each request joins the queue


def test_remembered_turns_are_pruned_once_due_and_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(retry_schedule, "CLIENTS_KEPT", 3000)
    schedule = RetrySchedule()
    now = serve_one_at_a_time(schedule, 0.0, count=int(MEASURE_WINDOW / 0.001) + 1, each=0.001)  # 1,000/s
    for index in range(5000):
        schedule.shed(now, b"storm-%d" % index)
    assert len(schedule._turns) == 3000  # the bound: the rest are counted per request
    later = now + LONGEST_RETRY_AFTER + 1  # every turn is due
    for index in range(1100):
        schedule.shed(later, b"next-%d" % index)
    assert len(schedule._turns) < 1200  # the due ones were dropped


def test_the_queue_drains_with_time() -> None:
    schedule = RetrySchedule()
    now = serve_one_at_a_time(schedule, 0.0, count=int(MEASURE_WINDOW / 0.01) + 1, each=0.01)
    assert schedule.capacity == pytest.approx(100, rel=0.01)
    rate = schedule.capacity * TURN_SHARE  # 80 a second
    assert [schedule.shed(now) for _ in range(800)][-1] == math.ceil(800 / rate)  # ten seconds
    # five seconds later half of them are due: the next joins the 400 still waiting
    assert schedule.shed(now + 5) == math.ceil((800 - 5 * rate + 1) / rate)
    assert schedule.shed(now + 60) == 1  # all due long ago


def test_a_window_of_a_few_completions_is_not_a_measure() -> None:
    """The first instant of a storm: 64 requests taken, and the worker busy accepting and shedding
    thousands for half a second completes one. Only once enough have completed is the window
    a measure, over all of its time."""
    schedule = RetrySchedule(saturated_at=4)
    for _ in range(64):
        schedule.started(0.0)
    schedule.completed(0.6)
    assert schedule.capacity is None and schedule.shed(0.6) == 1
    for index in range(1, MEASURE_COMPLETIONS):
        schedule.completed(0.6 + index * 0.01)
        schedule.started(0.6 + index * 0.01)
    assert schedule.capacity == pytest.approx(MEASURE_COMPLETIONS / (0.6 + (MEASURE_COMPLETIONS - 1) * 0.01))


def test_the_highest_recent_measure_counts_and_old_ones_age_out() -> None:
    """A dip (the worker busy shedding a burst) does not lengthen the turns; a lasting change
    does, once the higher measures are older than the last few windows."""
    schedule = RetrySchedule()
    window = int(MEASURE_WINDOW / 0.0025) + 1
    now = serve_one_at_a_time(schedule, 0.0, count=window, each=0.0025)  # 400/s
    assert schedule.capacity == pytest.approx(400, rel=0.01)
    now = serve_one_at_a_time(schedule, now, count=window // 2, each=0.005)  # 200/s for one window
    assert schedule.capacity == pytest.approx(400, rel=0.01)
    for _ in range(MEASURES_KEPT):
        now = serve_one_at_a_time(schedule, now, count=window // 2, each=0.005)
    assert schedule.capacity == pytest.approx(200, rel=0.02)


def test_turns_stop_at_the_longest() -> None:
    schedule = RetrySchedule(longest=20)
    now = serve_one_at_a_time(schedule, 0.0, count=MEASURE_COMPLETIONS, each=0.1)  # 10 a second
    turns = [schedule.shed(now) for _ in range(1000)]
    assert max(turns) == 20 and turns.count(20) > 500
    default = RetrySchedule()
    now = serve_one_at_a_time(default, 0.0, count=MEASURE_COMPLETIONS, each=0.1)
    assert max(default.shed(now) for _ in range(10_000)) == LONGEST_RETRY_AFTER == 60


@pytest.mark.parametrize("kwargs", [{"share": 0}, {"share": 1.5}, {"longest": 0}, {"saturated_at": 0}])
def test_nonsense_settings_are_refused(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        RetrySchedule(**kwargs)  # type: ignore[arg-type]
