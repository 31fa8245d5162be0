"""How long a shed client is told to wait: ``Retry-After`` sized from what the worker can do.

A fixed or random ``Retry-After`` (say 1-5 s) tells 10,000 clients shed in one storm to come
back within the same few seconds, where they are shed again; a long one leaves the CA idle while
they wait. Neither uses the CA's real rate. This schedule gives every shed client a turn instead:

* **Capacity** is measured, not configured: the requests the worker completes per second of
  saturated time, time in which it has at least ``saturated_at`` requests in progress (its
  handler threads: fewer leave some idle). A quiet worker serving one request at a time would
  otherwise measure its latency, not what it can do with every thread busy, and a storm would
  be handed turns several times too long, committed before the worker could learn better; so
  quiet time is not a measure at all. Measured over every :data:`MEASURE_WINDOW` of saturated
  time in which at least :data:`MEASURE_COMPLETIONS` requests completed (at the first instant of
  a storm a worker can spend half a second accepting and shedding thousands of connections and
  complete one request: that is not its rate); the capacity is the highest of the last
  :data:`MEASURES_KEPT` measures (half a minute of saturated time). Measures taken while the
  worker spends much of its time shedding a burst of thousands are low, and turns sized from
  them leave the CA idle while its clients wait (a renewal storm sized from the tail of an
  enrollment storm waited most of a minute on an idle CA); a turn sized from a measure that is
  too high only brings a client back a little early, to be shed again for a cheap answer and
  given a later turn.
* **Turns.** The clients already told to come back form a virtual queue that drains at a share
  of that capacity (the rest is left for clients arriving for the first time). A newly shed
  client joins its end: ``Retry-After = ceil(queue / (share x capacity))`` whole seconds, at least
  1 and at most :data:`LONGEST_RETRY_AFTER`: a client given the longest comes back and is given
  a new turn from what the worker knows then.
* **One turn per client.** A client that is shed again before its turn (an agent's pulse goes on
  past a shed policy fetch or revocation check and is shed once more at its submission) is told
  the time left on the turn it holds, and does not join the queue a second time: counted once
  per request, a renewal storm's queue was three times its clients and every turn three times
  too long. A client is known by a digest of its credential (the ``Authorization`` header; the
  credential itself is never kept); one without a credential is counted on each request.
  At most :data:`CLIENTS_KEPT` turns are remembered; past that, clients are counted per request.
* **Before any measure** (a worker that has not yet been saturated for a window) the answer is 1 s:
  the clients come back once the worker knows its rate, and are then given their turns.

The certpulse agent follows such an answer as given (plus a little jitter) for its first few
shed pulses, so a storm drains at about the CA's own rate while each answer stays quick
(:func:`certpulse.agent.daemon.next_delay`).

Pure: the caller passes the time (any monotonic clock, in seconds). One instance per worker
process, used from its event loop only, so it needs no lock.
"""

from __future__ import annotations

import math
from collections import deque

# The part of the measured capacity handed out as turns; the rest absorbs new arrivals, clients'
# jitter and the error of the measure.
TURN_SHARE = 0.8
# A turn longer than the agent's one-minute backoff floor would be worse than no turn; past it a
# client is better off asking again (a shed answer costs the worker a fraction of a millisecond).
LONGEST_RETRY_AFTER = 60
# Saturated seconds per measure: long enough to average over many requests of a storm's mix, short
# enough that a storm is measured within its first second.
MEASURE_WINDOW = 0.5
MEASURE_COMPLETIONS = 32
MEASURES_KEPT = 60
# Turns remembered per worker (a digest and a time each, ~100 bytes): a storm of this many clients
# on one worker is past what the turns are for.
CLIENTS_KEPT = 100_000


class RetrySchedule:
    """Turns for shed clients, from the worker's measured capacity. Times are seconds."""

    def __init__(self, *, saturated_at: int = 1, share: float = TURN_SHARE,
                 longest: int = LONGEST_RETRY_AFTER) -> None:
        if saturated_at < 1:
            raise ValueError("saturated_at must be at least one request")
        if not 0 < share <= 1:
            raise ValueError("share must be in (0, 1]")
        if longest < 1:
            raise ValueError("longest must be at least one second")
        self.saturated_at = saturated_at
        self.share = share
        self.longest = longest
        self._measures: deque[float] = deque(maxlen=MEASURES_KEPT)  # requests per saturated second
        self._capacity: float | None = None  # the highest of them, kept for the hot path
        self._inflight = 0
        self._since = 0.0  # the last event's time
        self._saturated = 0.0  # saturated time in the current window
        self._completed = 0  # requests completed in it
        self._queue = 0.0  # clients given a turn and not yet due
        self._queue_at = 0.0
        self._turns: dict[bytes, float] = {}  # client digest -> when its turn is due
        self._prune_at = 1024  # prune the turns that are due once there are this many
        self._pruned = -math.inf

    def started(self, now: float) -> None:
        """The worker took a request."""
        self._advance(now)
        self._inflight += 1

    def completed(self, now: float) -> None:
        """A request the worker took has ended."""
        self._advance(now)
        if self._inflight >= self.saturated_at:
            self._completed += 1
        self._inflight = max(0, self._inflight - 1)
        if self._saturated >= MEASURE_WINDOW and self._completed >= MEASURE_COMPLETIONS:
            self._measures.append(self._completed / self._saturated)
            self._capacity = max(self._measures)
            self._saturated, self._completed = 0.0, 0

    @property
    def capacity(self) -> float | None:
        """Requests the worker completes per second when saturated; None until measured."""
        return self._capacity

    @property
    def inflight(self) -> int:
        """Requests the worker has taken and not yet completed."""
        return self._inflight

    def shed(self, now: float, client: bytes | None = None) -> int:
        """A request is being shed: the whole seconds it should wait before it comes back.
        ``client``: a digest naming its client, or None when it cannot be told apart."""
        self._advance(now)
        capacity = self.capacity
        if capacity is None:
            return 1
        due = self._turns.get(client) if client is not None else None
        if due is not None and due > now:
            return max(1, math.ceil(due - now))
        rate = capacity * self.share
        self._queue = max(0.0, self._queue - (now - self._queue_at) * rate) + 1
        self._queue_at = now
        turn = min(self.longest, max(1, math.ceil(self._queue / rate)))
        if client is not None:
            self._remember(client, now + turn, now)
        return turn

    def _remember(self, client: bytes, due: float, now: float) -> None:
        # Dropping the due turns costs a pass over all of them: done each time the number has
        # doubled, and at the bound at most once a second.
        full = len(self._turns) >= CLIENTS_KEPT and now - self._pruned >= 1.0
        if len(self._turns) >= self._prune_at or full:
            self._turns = {key: when for key, when in self._turns.items() if when > now}
            self._prune_at = max(1024, 2 * len(self._turns))
            self._pruned = now
        if len(self._turns) < CLIENTS_KEPT:
            self._turns[client] = due

    def _advance(self, now: float) -> None:
        if self._inflight >= self.saturated_at:
            self._saturated += max(0.0, now - self._since)
        self._since = now


__all__ = ["CLIENTS_KEPT", "LONGEST_RETRY_AFTER", "MEASURES_KEPT", "MEASURE_COMPLETIONS", "MEASURE_WINDOW",
           "TURN_SHARE", "RetrySchedule"]
