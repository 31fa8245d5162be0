"""Load shedding: a worker at its limit of requests in progress answers 503 + Retry-After (an RFC
7807 problem) before doing any work; /healthz and /metrics still answer; the agent backs off.

A request is held in progress by real work that cannot finish: the test holds the SQLite CA's
writer lock (sql/db.py), and a token exchange, whose body is whole (only whole requests count
against the limit: frontends/limits.py), waits for it in its handler thread.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import json
import os
import random
import re
import socket
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest

from agent_support import new_agent, wait_for
from certpulse import clock
from certpulse.agent.daemon import BACKOFF_FLOOR, SCHEDULED_RETRIES, follows_retry_after, next_delay
from certpulse.ca.admin import CAAdmin
from certpulse.ca.config import CADir
from certpulse.ca.model import Caller
from certpulse.ca.setup import open_service
from certpulse.frontends.retry_schedule import LONGEST_RETRY_AFTER
from certpulse.frontends.shedding import LoadShedding, max_inflight_from_environment, shed_load
from support import CA, Client, init_ca, make_csr, run_cli, serve

HOUR_S = 3600


@pytest.fixture(scope="module")
def shed_ca(tmp_path_factory: pytest.TempPathFactory) -> CA:
    directory = tmp_path_factory.mktemp("shed") / "ca"
    return init_ca(directory, f"sqlite:///{directory.parent / 'ca.db'}")


# The SQLite database of each server's CA, for hold()
SHED_DATABASE: dict[str, Path] = {}


@pytest.fixture(scope="module")
def one_slot(shed_ca: CA) -> Iterator[str]:
    """A server whose single worker takes one request at a time."""
    with serve(shed_ca, "--max-inflight", "1") as base:
        SHED_DATABASE[base] = Path(shed_ca.database_url.removeprefix("sqlite:///"))
        yield base


def metric(base: str, name: str) -> float:
    response = httpx.get(f"{base}/metrics", timeout=10)
    assert response.status_code == 200, response.text
    found = re.search(rf"^{name} ([0-9.e+-]+)$", response.text, re.MULTILINE)
    assert found, f"{name} missing from /metrics"
    return float(found.group(1))


class HeldRequest:
    """A token exchange in progress on the server, waiting for the writer lock, until :meth:`finish`."""

    BODY = b'{"token": "cpe_not-a-real-token"}'

    def __init__(self, base: str, lock: WriterLockHold) -> None:
        url = urlsplit(base)
        self.lock = lock
        self.sock = socket.create_connection((url.hostname or "127.0.0.1", url.port or 80), timeout=60)
        head = (b"POST /v1/tokens/exchange HTTP/1.1\r\nHost: ca\r\nContent-Type: application/json\r\n"
                b"Content-Length: %d\r\n\r\n" % len(self.BODY))
        self.sock.sendall(head + self.BODY)

    def finish(self) -> bytes:
        """Let the writes go on; the server's answer (status line first)."""
        self.lock.release()
        answer = b""
        with contextlib.suppress(TimeoutError):
            while b"\r\n\r\n" not in answer or not answer.rstrip().endswith(b"}"):
                chunk = self.sock.recv(65536)
                if not chunk:
                    break
                answer += chunk
        self.sock.close()
        return answer


class WriterLockHold:
    """The SQLite CA database's writer lock (``ca.db-writer``), held by this test process."""

    def __init__(self, database: Path) -> None:
        self.fd: int | None = os.open(f"{database}-writer", os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(self.fd, fcntl.LOCK_EX)

    def release(self) -> None:
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None


@contextlib.contextmanager
def hold(base: str, count: int = 1) -> Iterator[list[HeldRequest]]:
    before = metric(base, "certpulse_ca_requests_inflight")
    lock = WriterLockHold(SHED_DATABASE[base])
    held = [HeldRequest(base, lock) for _ in range(count)]
    try:
        wait_for(lambda: metric(base, "certpulse_ca_requests_inflight") >= before + count, 60,
                 "the held requests to be in progress")
        yield held
    finally:
        lock.release()
        for request in held:
            with contextlib.suppress(OSError):
                request.sock.close()


def assert_shed(response: httpx.Response) -> int:
    """A shed answer: 503, a Retry-After turn of whole seconds, the same in the problem document."""
    assert response.status_code == 503, (response.status_code, response.text)
    assert response.headers["content-type"].startswith("application/problem+json")
    seconds = int(response.headers["retry-after"])
    assert 1 <= seconds <= LONGEST_RETRY_AFTER
    body = response.json()
    assert body["reason"] == "unavailable" and body["status"] == 503 and body["retry_after"] == seconds, body
    assert f"retry after {seconds} s" in body["detail"], body
    assert "limit of 1 requests in progress" in body["detail"], body
    return seconds


def test_a_worker_at_its_limit_sheds_before_reading_and_stays_observable(one_slot: str) -> None:
    shed_before = metric(one_slot, "certpulse_ca_requests_shed_total")
    _, csr = make_csr()
    with hold(one_slot) as (held,):
        with httpx.Client(base_url=one_slot, timeout=10) as http:
            answers = [http.post("/v1/requests", json={"template": "machine", "csr": csr},
                                 headers={"Authorization": "Bearer cpc_whatever"}) for _ in range(6)]
            answers += [http.get("/v1/policy"), http.post("/v1/tokens/exchange", content=b"not json")]
            assert len({assert_shed(a) for a in answers}) >= 1
            # /healthz and metrics are never shed, even now: /healthz answers that the worker is saturated
            health = http.get("/healthz")
            assert health.status_code == 503 and health.json()["status"] == "degraded", health.text
            assert health.json()["inflight"] == 1 and health.json()["inflight_limit"] == 1, health.text
            assert metric(one_slot, "certpulse_ca_requests_shed_total") >= shed_before + len(answers)
            assert metric(one_slot, "certpulse_ca_requests_inflight_limit") == 1
            assert metric(one_slot, "certpulse_ca_requests_inflight_peak") == 1
        # The held request itself was never shed: it completes normally once its body arrives.
        status_line = held.finish().split(b"\r\n", 1)[0]
        assert status_line.startswith(b"HTTP/1.1 401"), status_line
    wait_for(lambda: metric(one_slot, "certpulse_ca_requests_inflight") == 0, 60, "the held request to end")
    assert httpx.get(f"{one_slot}/v1/policy", timeout=10).status_code == 401  # served again, not shed


# A client process for the test below: asks until told to stop (or for at most DEADLINE seconds),
# and records every shed answer as one JSON line: its Retry-After and its problem document.
HAMMER = """
import json, pathlib, sys, time
import httpx
base, out, stop = sys.argv[1], pathlib.Path(sys.argv[2]), pathlib.Path(sys.argv[3])
deadline = time.monotonic() + float(sys.argv[4])
with httpx.Client(base_url=base, timeout=60) as http, out.open("w") as log:
    while not stop.exists() and time.monotonic() < deadline:
        # A token that opens nothing: when taken, the worker looks it up and audits the refusal
        # (a write transaction), so the requests it completes cost far more than those it sheds.
        response = http.post("/v1/tokens/exchange", json={"token": "cpe_not-a-token"})
        if response.status_code == 503:
            log.write(json.dumps({"retry_after": response.headers.get("retry-after"),
                                  "type": response.headers.get("content-type"), "body": response.json()}) + "\\n")
            log.flush()
        elif response.status_code != 401:  # token-invalid
            log.write(json.dumps({"unexpected": response.status_code, "text": response.text}) + "\\n")
            log.flush()
"""


def _shed_answers(outputs: list[Path]) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = []
    for path in outputs:
        if path.exists():
            found += [json.loads(line) for line in path.read_text().splitlines() if line.endswith("}")]
    return found


def test_a_full_worker_measures_its_capacity_and_hands_out_turns(shed_ca: CA, tmp_path: Path) -> None:
    """Under more load than one slot takes, the worker measures what it completes while full and
    answers later arrivals with longer turns: Retry-After grows past the first second instead of
    sending everyone back at once.

    Turns grow when clients are shed faster than the worker drains its turns, i.e. faster than
    it completes requests: so the requests are ones that cost the worker a write transaction
    when it takes them (a refused token exchange is audited: every one, as the server is told to
    keep every anonymous refusal) and next to nothing when it sheds them, and they come from six
    client processes (on a busy machine one process of threads,
    one interpreter lock, gets one CPU share; six get six)."""
    script = tmp_path / "hammer.py"
    script.write_text(HAMMER)
    stop = tmp_path / "stop"
    outputs = [tmp_path / f"shed-{i}.jsonl" for i in range(6)]
    with serve(shed_ca, "--max-inflight", "1", "--audit-anonymous-rows", "1000000") as base:
        assert metric(base, "certpulse_ca_measured_capacity") == 0  # nothing measured yet
        clients = [subprocess.Popen([sys.executable, str(script), base, str(out), str(stop), "300"])
                   for out in outputs]
        try:
            wait_for(lambda: max((int(a["retry_after"]) for a in _shed_answers(outputs) if "retry_after" in a),
                                 default=0) >= 3, 240, "a shed answer with a turn of 3 s or more")
        finally:
            stop.touch()
            for client in clients:
                client.wait(timeout=120)
        answers = _shed_answers(outputs)
        assert [a for a in answers if "unexpected" in a] == []
        turns = [int(a["retry_after"]) for a in answers]
        for answer, seconds in zip(answers, turns, strict=True):  # every one a proper shed answer
            body = answer["body"]
            assert answer["type"].startswith("application/problem+json")
            assert 1 <= seconds <= LONGEST_RETRY_AFTER
            assert body["reason"] == "unavailable" and body["status"] == 503 and body["retry_after"] == seconds
            assert f"retry after {seconds} s" in body["detail"] and "limit of 1 requests in progress" in body["detail"]
        assert 1 in turns  # before any measure: come back in a second
        assert metric(base, "certpulse_ca_measured_capacity") > 0
        assert len(set(turns)) >= 3, sorted(set(turns))  # 1, then turns growing with the queue


def test_concurrent_enrollments_past_the_limit_are_shed_never_failed(shed_ca: CA) -> None:
    """Twenty clients enrol at once against two workers of two slots each: some are shed with
    503, none fails, and after retrying every one holds its own certificate."""
    with serve(shed_ca, "--max-inflight", "2", "--workers", "2") as base:
        clients = [Client(base, credential) for credential in principals(shed_ca, 20)]
        csrs = [make_csr()[1] for _ in clients]
        for client in clients:  # connections open before the start, so that all arrive together
            assert client.http.get("/healthz").status_code == 200
        start = threading.Barrier(len(clients))
        statuses: list[list[int]] = [[] for _ in clients]

        def enrol(index: int) -> dict[str, str]:
            start.wait()
            while True:
                response = clients[index].submit("machine", csrs[index])
                statuses[index].append(response.status_code)
                if response.status_code != 503:
                    assert response.status_code == 201, response.text
                    return dict(response.json())
                assert_shed_any(response)
                threading.Event().wait(random.uniform(0.01, 0.05))

        with ThreadPoolExecutor(max_workers=len(clients)) as pool:
            results = list(pool.map(enrol, range(len(clients))))
        seen = [s for per in statuses for s in per]
        assert set(seen) <= {201, 503}, seen
        assert 503 in seen, "twenty simultaneous enrollments against 2 x 2 slots were never shed"
        assert len({r["serial"] for r in results}) == len(clients)
        assert metric(base, "certpulse_ca_requests_shed_total") == seen.count(503)
        assert metric(base, "certpulse_ca_requests_inflight_peak") == 2


def principals(ca: CA, count: int) -> list[str]:
    """``count`` new machine principals' credentials, made through the CA's Python API (the CLI
    would take a process per principal)."""
    service = open_service(CADir(ca.dir))
    admin = CAAdmin(service, Caller(kind="operator", name="test"))
    now = clock.now()
    try:
        return [service.auth.exchange_token(admin.add_principal(f"storm-{uuid.uuid4().hex[:8]}.example.internal",
                                                           "machine", now)["token"], now).credential
                for _ in range(count)]
    finally:
        service.engine.dispose()


def assert_shed_any(response: httpx.Response) -> None:
    assert response.headers["content-type"].startswith("application/problem+json")
    assert 1 <= int(response.headers["retry-after"]) <= LONGEST_RETRY_AFTER
    assert response.json()["reason"] == "unavailable"


def test_the_agent_backs_off_when_shed_and_enrols_afterwards(shed_ca: CA, one_slot: str, tmp_path: Path) -> None:
    agent = new_agent(shed_ca, one_slot, tmp_path / "agent")
    with hold(one_slot):
        result = agent.pulse(ok=False)
        assert "503" in result["error"], result
        assert 1 <= result["retry_after"] <= LONGEST_RETRY_AFTER, result
        assert agent.certs() == []
    result = agent.pulse()
    assert [a["outcome"] for a in result["actions"] if a["template"] == "machine"] == ["done"], result
    assert [c["template_name"] for c in agent.certs()].count("machine") == 1


def test_next_delay_follows_the_servers_turn_then_backs_off() -> None:
    """A shed agent comes back at the turn the server gave (plus a little spread), for the first
    few shed pulses in a row; after those, the exponential backoff from one minute applies again,
    never sooner than the Retry-After."""
    rng = random.Random(1)
    refresh, cap = dt.timedelta(hours=8), dt.timedelta(hours=1)
    for failures in range(1, SCHEDULED_RETRIES + 1):
        turns = [next_delay(refresh=refresh, failures=failures, retry_after=7, cap=cap, rng=rng) for _ in range(300)]
        assert min(turns) >= 7 and max(turns) <= 8  # 7 s plus up to a second of spread
        assert max(turns) - min(turns) > 0.8  # agents given one turn spread over its second
    # a hostile or broken 0 still waits a second
    assert all(1 <= next_delay(refresh=refresh, failures=1, retry_after=0, cap=cap, rng=rng) <= 2
               for _ in range(100))
    # a long turn gets a tenth of spread
    long = [next_delay(refresh=refresh, failures=1, retry_after=600, cap=cap, rng=rng) for _ in range(200)]
    assert min(long) >= 600 and max(long) <= 660 and max(long) - min(long) > 40
    # past the scheduled retries: the one-minute floor, spread over half as long again
    after = [next_delay(refresh=refresh, failures=SCHEDULED_RETRIES + 1, retry_after=3, cap=cap, rng=rng)
             for _ in range(300)]
    assert min(after) >= BACKOFF_FLOOR and max(after) <= 1.5 * BACKOFF_FLOOR
    assert max(after) - min(after) > 0.8 * 0.5 * BACKOFF_FLOOR
    # and it grows from there as any backoff does
    later = [next_delay(refresh=refresh, failures=SCHEDULED_RETRIES + 3, retry_after=3, cap=cap, rng=rng)
             for _ in range(300)]
    assert min(later) >= 2 * BACKOFF_FLOOR and max(later) <= 6 * BACKOFF_FLOOR
    # without a Retry-After, as before: exactly the floor after the first failure
    assert next_delay(refresh=refresh, failures=1, retry_after=None, cap=cap, rng=rng) == BACKOFF_FLOOR
    assert not follows_retry_after(1, None) and not follows_retry_after(0, 5)
    assert follows_retry_after(SCHEDULED_RETRIES, 5) and not follows_retry_after(SCHEDULED_RETRIES + 1, 5)
    # never past the cap unless the server asked for longer
    capped = dt.timedelta(seconds=70)
    assert all(next_delay(refresh=refresh, failures=SCHEDULED_RETRIES + 5, retry_after=65, cap=capped, rng=rng) <= 70
               for _ in range(200))
    assert next_delay(refresh=refresh, failures=SCHEDULED_RETRIES + 5, retry_after=HOUR_S, cap=capped,
                      rng=rng) == HOUR_S
    assert next_delay(refresh=refresh, failures=1, retry_after=HOUR_S, cap=capped, rng=rng) == HOUR_S


def test_the_limit_comes_from_the_command_line_or_the_environment(monkeypatch: pytest.MonkeyPatch,
                                                                    shed_ca: CA) -> None:
    monkeypatch.delenv("CERTPULSE_MAX_INFLIGHT", raising=False)
    assert max_inflight_from_environment() == 64
    monkeypatch.setenv("CERTPULSE_MAX_INFLIGHT", "0")

    async def app(scope: object, receive: object, send: object) -> None:
        return None

    assert shed_load(app) is app  # 0: no limit, no middleware
    monkeypatch.setenv("CERTPULSE_MAX_INFLIGHT", "12")
    wrapped = shed_load(app)
    assert isinstance(wrapped, LoadShedding) and wrapped.max_inflight == 12
    # saturated (for measuring capacity) when every handler thread is busy, or at the limit if lower
    assert wrapped.schedule.saturated_at == 1
    threaded = shed_load(app, threads=4)
    assert isinstance(threaded, LoadShedding) and threaded.schedule.saturated_at == 4
    below = shed_load(app, 2, threads=4)
    assert isinstance(below, LoadShedding) and below.schedule.saturated_at == 2
    monkeypatch.setenv("CERTPULSE_MAX_INFLIGHT", "many")
    with pytest.raises(Exception, match="CERTPULSE_MAX_INFLIGHT must be a whole number"):
        max_inflight_from_environment()
    refused = run_cli("ca", "serve", "--dir", str(shed_ca.dir), "--max-inflight", "-1", check=False)
    assert refused.returncode == 2 and "--max-inflight" in refused.stderr, refused.stderr
