"""No unauthenticated lock-out: clients that trickle their requests, or flood the server with bad
credentials, cannot keep a well-formed authenticated client from its certificate, are cut off
within the read deadline, show in /healthz and the metrics, and grow the audit log only by a
bounded sample.

Every test drives a real ``certpulse ca serve`` over loopback with raw sockets. Waits are
generous (the machine is busy); no test asserts a tight upper bound on time.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import json
import os
import re
import socket
import ssl
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest

from agent_support import wait_for
from certpulse import clock
from certpulse.ca.audit import AnonymousSample
from certpulse.ca.config import CADir
from certpulse.ca.model import ANONYMOUS, Caller
from certpulse.ca.setup import open_service
from certpulse.frontends.health import BUSY_FOR
from certpulse.frontends.read_deadline import MAX_HEAD_BYTES
from support import CA, Client, assert_problem, init_ca, load_cert, serve

READ_TIMEOUT = 3  # the servers' --read-timeout here; assertions allow far more
SLACK = 60  # what a busy machine may add to a deadline before we call it missed
TRICKLERS = 32


@pytest.fixture(scope="module")
def limits_ca(tmp_path_factory: pytest.TempPathFactory) -> CA:
    directory = tmp_path_factory.mktemp("limits") / "ca"
    return init_ca(directory, f"sqlite:///{directory.parent / 'ca.db'}")


def _address(base: str) -> tuple[str, int]:
    url = urlsplit(base)
    return url.hostname or "127.0.0.1", url.port or 80


def metric(base: str, name: str, labels: str = "") -> float:
    """A sample of ``/metrics`` (0 when the labelled series does not exist yet)."""
    response = httpx.get(f"{base}/metrics", timeout=30)
    assert response.status_code == 200, response.text
    found = re.search(rf"^{re.escape(name + labels)} ([0-9.e+-]+)$", response.text, re.MULTILINE)
    return float(found.group(1)) if found else 0.0


def status_of(answer: bytes) -> int | None:
    found = re.match(rb"HTTP/1\.1 (\d{3}) ", answer)
    return int(found.group(1)) if found else None


def read_response(sock: socket.socket) -> bytes:
    """One whole HTTP/1.1 response (head and a Content-Length body): a single ``recv`` may hold
    only part of it, and the rest would then be taken for the next answer."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            return data
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = re.search(rb"(?im)^content-length:\s*(\d+)", head)
    while length is not None and len(body) < int(length.group(1)):
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return head + b"\r\n\r\n" + body


def problem_of(answer: bytes) -> dict[str, object]:
    head, _, body = answer.partition(b"\r\n\r\n")
    assert b"application/problem+json" in head.lower(), answer
    assert b"connection: close" in head.lower(), answer
    document: dict[str, object] = json.loads(body)
    return document


class Trickler:
    """Raw connections that each send ``head`` and then ``tail`` one byte per ``pause`` seconds,
    until the server answers or closes, or ``give_up`` seconds pass. Runs on one thread."""

    def __init__(self, base: str, count: int, head: bytes, tail: bytes, *, pause: float = 0.25,
                 give_up: float = 180) -> None:
        self.started = time.monotonic()
        self.sockets = [socket.create_connection(_address(base), timeout=30) for _ in range(count)]
        self.answers: list[bytes] = [b""] * count
        self.ended: list[float | None] = [None] * count  # seconds after start when answered or closed
        self.tail, self.pause, self.give_up = tail, pause, give_up
        for sock in self.sockets:
            if head:
                sock.sendall(head)
            sock.setblocking(False)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        position = 0
        while time.monotonic() - self.started < self.give_up and None in self.ended:
            for index, sock in enumerate(self.sockets):
                if self.ended[index] is not None:
                    continue
                if self._read(index, sock):
                    continue
                if position < len(self.tail):
                    with contextlib.suppress(BlockingIOError, OSError):
                        sock.send(self.tail[position:position + 1])
            position += 1
            time.sleep(self.pause)

    def _read(self, index: int, sock: socket.socket) -> bool:
        """Collect what the server sent; True once it has answered or closed."""
        while True:
            try:
                chunk = sock.recv(65536)
            except BlockingIOError:
                return False
            except OSError:  # reset after the server closed
                chunk = b""
            if not chunk:
                self.ended[index] = time.monotonic() - self.started
                return True
            self.answers[index] += chunk

    def wait(self) -> None:
        self._thread.join(self.give_up + 30)
        for sock in self.sockets:
            sock.close()


def slow_body(base: str, count: int = TRICKLERS) -> Trickler:
    """Token exchanges that declare a 4 KiB body and send it a byte at a time."""
    head = (b"POST /v1/tokens/exchange HTTP/1.1\r\nHost: ca\r\nContent-Type: application/json\r\n"
            b"Content-Length: 4096\r\n\r\n")
    return Trickler(base, count, head, b'{"token": "' + b"x" * 4000)


def slow_head(base: str, count: int = TRICKLERS) -> Trickler:
    """Requests whose request line and headers come a byte at a time and never end."""
    return Trickler(base, count, b"", b"POST /v1/tokens/exchange HTTP/1.1\r\nHost: ca\r\nX-Slow: " + b"s" * 4000)


def enroll(ca: CA, base: str) -> None:
    """A principal made now gets its credential and a certificate, promptly and first time."""
    client = Client.enrolled(base, ca.add_principal(f"m-{uuid.uuid4().hex[:8]}.example.internal"))
    _, issued = client.enroll("machine")
    assert load_cert(issued["certificate"]).serial_number > 0


def assert_cut_off(trickler: Trickler, status: int | None, reason: str | None) -> None:
    """Every connection was answered ``status`` (None: closed without an answer) within the
    read deadline plus slack, and no sooner than the deadline."""
    assert None not in trickler.ended, f"connections still open after {trickler.give_up} s: {trickler.ended}"
    for answer, ended in zip(trickler.answers, trickler.ended, strict=True):
        assert ended is not None and READ_TIMEOUT - 0.5 <= ended <= READ_TIMEOUT + SLACK, ended
        assert status_of(answer) == status, answer[:200]
        if status is not None:
            document = problem_of(answer)
            assert document["reason"] == reason and document["status"] == status, document


def test_slow_bodies_do_not_lock_out_an_authenticated_client(limits_ca: CA) -> None:
    with serve(limits_ca, "--max-inflight", "4", "--read-timeout", str(READ_TIMEOUT)) as base:
        before = metric(base, "certpulse_ca_anonymous_refusals_total",
                        '{action="refused",reason="request-timeout"}')
        trickler = slow_body(base)
        try:
            # while the slow senders hold their connections, a new machine enrols at once
            enroll(limits_ca, base)
            assert metric(base, "certpulse_ca_requests_inflight") == 0  # slow bodies hold no places
        finally:
            trickler.wait()
        assert_cut_off(trickler, 408, "request-timeout")
        wait_for(lambda: metric(base, "certpulse_ca_anonymous_refusals_total",
                                '{action="refused",reason="request-timeout"}') >= before + TRICKLERS,
                 60, "the 408s to be counted")
        enroll(limits_ca, base)


def test_slow_and_silent_headers_are_cut_off(limits_ca: CA) -> None:
    with serve(limits_ca, "--max-inflight", "4", "--read-timeout", str(READ_TIMEOUT)) as base:
        trickler = slow_head(base)
        silent = Trickler(base, 8, b"", b"")  # connect and send nothing at all
        try:
            enroll(limits_ca, base)
        finally:
            trickler.wait()
            silent.wait()
        assert_cut_off(trickler, 408, "request-timeout")
        assert_cut_off(silent, None, None)  # closed quietly, like an idle kept-alive connection
        # a kept-alive connection's next request is timed from its first byte, not from the first request
        with socket.create_connection(_address(base), timeout=60) as sock:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: ca\r\n\r\n")
            assert status_of(read_response(sock)) == 200
            time.sleep(1)  # idle, within the keep-alive timeout
            started = time.monotonic()
            sock.sendall(b"GET /healthz HTTP/1.1\r\n")
            answer = read_response(sock)
            assert status_of(answer) == 408 and problem_of(answer)["reason"] == "request-timeout", answer
            assert time.monotonic() - started >= READ_TIMEOUT - 0.5
        enroll(limits_ca, base)


def test_the_deadline_holds_over_tls(limits_ca: CA) -> None:
    """Over TLS the same protocol reads the request: slow headers after the handshake get 408."""
    context = ssl.create_default_context(cafile=str(limits_ca.dir / "certs" / "root.pem"))
    with serve(limits_ca, "--read-timeout", str(READ_TIMEOUT), tls=True) as base:
        with socket.create_connection(_address(base), timeout=60) as raw, \
                context.wrap_socket(raw, server_hostname="127.0.0.1") as sock:
            started = time.monotonic()
            sock.sendall(b"POST /v1/tokens/exchange HTTP/1.1\r\nHost: ca\r\n")
            answer = b""
            with contextlib.suppress(OSError):
                while chunk := sock.recv(65536):
                    answer += chunk
            assert status_of(answer) == 408 and problem_of(answer)["reason"] == "request-timeout", answer
            assert READ_TIMEOUT - 0.5 <= time.monotonic() - started <= READ_TIMEOUT + SLACK
        assert httpx.get(f"{base}/healthz", timeout=30, verify=context).json()["status"] == "ok"


def test_headers_over_the_limit_are_refused(limits_ca: CA) -> None:
    with serve(limits_ca, "--read-timeout", "60") as base, \
            socket.create_connection(_address(base), timeout=60) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: ca\r\n")
        with contextlib.suppress(OSError):  # the server may close while we still send
            for _ in range(MAX_HEAD_BYTES // 1000 + 4):
                sock.sendall(b"X-Filler: " + b"f" * 1000 + b"\r\n")
        answer = b""
        with contextlib.suppress(OSError):
            while chunk := sock.recv(65536):
                answer += chunk
        assert status_of(answer) == 431, answer[:200]
        assert problem_of(answer)["reason"] == "headers-too-large"
        # a request with ordinary headers is still served
        assert httpx.get(f"{base}/healthz", timeout=30).status_code == 200


@contextlib.contextmanager
def writer_lock(ca: CA) -> Iterator[None]:
    """Hold the SQLite CA's writer lock (sql/db.py): every write on the server waits for it."""
    fd = os.open(ca.database_url.removeprefix("sqlite:///") + "-writer", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def test_healthz_is_degraded_while_the_worker_is_saturated(limits_ca: CA) -> None:
    """Degraded (503) while every handler thread has been busy for a while, and while every place
    is taken; ok again once the work is done. The work is real: token exchanges whose writes wait
    for the database's writer lock, which the test holds."""
    def health() -> httpx.Response:
        return httpx.get(f"{base}/healthz", timeout=30)

    def health_when(check: Callable[[httpx.Response], bool], what: str) -> httpx.Response:
        seen: list[httpx.Response] = []

        def probe() -> bool:
            seen.append(health())
            return check(seen[-1])

        wait_for(probe, 90, what)
        return seen[-1]

    def exchange() -> httpx.Response:
        return httpx.post(f"{base}/v1/tokens/exchange", json={"token": "cpe_none"}, timeout=180)

    with serve(limits_ca, "--max-inflight", "3", "--threads", "2") as base:
        ok = health()
        assert ok.status_code == 200 and ok.json()["status"] == "ok", ok.text
        assert (ok.json()["inflight"], ok.json()["inflight_limit"], ok.json()["threads"]) == (0, 3, 2), ok.text
        with ThreadPoolExecutor(3) as pool:
            with writer_lock(limits_ca):
                held = [pool.submit(exchange) for _ in range(2)]  # both threads busy, one place left
                busy = health_when(lambda r: r.status_code == 503, "/healthz to say degraded with every thread busy")
                document = busy.json()
                assert document["status"] == "degraded" and document["inflight"] == 2, document
                assert document["busy_seconds"] >= BUSY_FOR and document["full_seconds"] == 0, document
                held.append(pool.submit(exchange))  # the last place
                full = health_when(lambda r: r.json()["full_seconds"] > 0, "/healthz to say every place is taken")
                assert full.status_code == 503 and full.json()["inflight"] == 3, full.text
                assert_problem(httpx.get(f"{base}/v1/policy", timeout=30), 503, "unavailable")  # shed
            for answer in held:
                assert_problem(answer.result(timeout=180), 401, "token-invalid")
        healthy = health_when(lambda r: r.status_code == 200, "/healthz to say ok again")
        assert healthy.json()["status"] == "ok" and healthy.json()["inflight"] == 0, healthy.text


def anonymous_rows(ca: CA, since: int) -> list[tuple[str, str | None, str | None]]:
    """(action, reason, detail) of the anonymous audit rows after row ``since``."""
    service = open_service(CADir(ca.dir))
    try:
        entries = service.audit.read(Caller(kind="operator", name="test"), clock.now(), limit=10_000).entries
    finally:
        service.engine.dispose()
    return [(e.action, e.reason, e.detail) for e in entries if e.entry_id > since and e.actor == ANONYMOUS.actor]


def newest_row(ca: CA) -> int:
    service = open_service(CADir(ca.dir))
    try:
        entries = service.audit.read(Caller(kind="operator", name="test"), clock.now(), limit=1).entries
    finally:
        service.engine.dispose()
    return entries[0].entry_id if entries else 0


FLOOD = 2000
SAMPLED = 5


def test_a_flood_of_bad_credentials_is_counted_and_audited_within_bounds(limits_ca: CA) -> None:
    since = newest_row(limits_ca)
    series = '{action="unauthenticated",reason="unauthenticated"}'
    started = time.monotonic()
    with serve(limits_ca, "--audit-anonymous-rows", str(SAMPLED)) as base:
        before = metric(base, "certpulse_ca_anonymous_refusals_total", series)

        def knock(count: int) -> list[int]:
            with httpx.Client(base_url=base, timeout=60,
                              headers={"Authorization": "Bearer cpc_not-a-credential"}) as http:
                return [http.get("/v1/policy").status_code for _ in range(count)]

        with ThreadPoolExecutor(4) as pool:
            statuses = [s for batch in pool.map(knock, [FLOOD // 4] * 4) for s in batch]
        assert statuses == [401] * FLOOD
        assert metric(base, "certpulse_ca_anonymous_refusals_total", series) == before + FLOOD
        minutes = (time.monotonic() - started) / 60
        while_serving = [r for r in anonymous_rows(limits_ca, since) if r[0] == "unauthenticated"]
        # the first few of each minute one by one, and one summary row per minute that is over
        assert len(while_serving) <= (int(minutes) + 2) * (SAMPLED + 1), while_serving
    # at shutdown the worker writes the summary of the minute not yet over: every refusal is accounted for
    rows = [r for r in anonymous_rows(limits_ca, since) if r[0] == "unauthenticated"]
    assert len(rows) <= (int(minutes) + 2) * (SAMPLED + 1), rows
    summaries = [int(str(detail).split(" ", 1)[0]) for _, _, detail in rows if "more refused" in str(detail)]
    assert summaries and all(reason == "unauthenticated" for _, reason, _ in rows), rows
    assert len(rows) - len(summaries) + sum(summaries) == FLOOD, rows


def test_every_kind_of_anonymous_refusal_is_counted(limits_ca: CA) -> None:
    """No credential, a bad one, a bad token, a malformed body, a body over the limit: each is
    counted under its action and reason; an authenticated caller's refusal is not anonymous."""
    sends: dict[tuple[str, str], Callable[[httpx.Client], httpx.Response]] = {
        ("unauthenticated", "unauthenticated"): lambda http: http.get("/v1/policy"),
        ("token-refused", "token-invalid"): lambda http: http.post("/v1/tokens/exchange", json={"token": "cpe_x"}),
        ("malformed", "malformed-request"): lambda http: http.post("/v1/tokens/exchange", content=b"{not json",
                                                                   headers={"content-type": "application/json"}),
        ("refused", "body-too-large"): lambda http: http.post("/v1/tokens/exchange", content=b"x" * 70_000),
    }
    with serve(limits_ca) as base, httpx.Client(base_url=base, timeout=60) as http:
        for (action, reason), send in sends.items():
            series = f'{{action="{action}",reason="{reason}"}}'
            before = metric(base, "certpulse_ca_anonymous_refusals_total", series)
            for _ in range(3):
                answer = send(http)
                assert 400 <= answer.status_code < 500 and answer.json()["reason"] == reason, answer.text
            assert metric(base, "certpulse_ca_anonymous_refusals_total", series) == before + 3, (action, reason)
        client = Client.enrolled(base, limits_ca.add_principal(f"m-{uuid.uuid4().hex[:8]}.example.internal"))
        assert_problem(client.http.get("/v1/requests"), 403, "forbidden")
        anonymous = [line for line in httpx.get(f"{base}/metrics", timeout=30).text.splitlines()
                     if line.startswith("certpulse_ca_anonymous_refusals_total{")]
        assert anonymous and not [line for line in anonymous if 'reason="forbidden"' in line], anonymous


def test_the_sample_keeps_the_first_rows_of_each_minute_and_sums_the_rest() -> None:
    sample = AnonymousSample(rows=2, window=dt.timedelta(minutes=1))
    t0 = dt.datetime(2030, 1, 1, tzinfo=dt.UTC)
    admitted = [sample.admit("unauthenticated", "unauthenticated", t0 + dt.timedelta(seconds=i))[0]
                for i in range(5)]
    assert admitted == [True, True, False, False, False]
    assert sample.admit("token-refused", "token-invalid", t0)[0]  # another reason has its own rows
    assert sample.close(t0 + dt.timedelta(seconds=59)) == []  # the minute is not over
    own, over = sample.admit("unauthenticated", "unauthenticated", t0 + dt.timedelta(seconds=61))
    assert own  # a new minute: rows again
    assert [(u.action, u.reason, u.count) for u in over] == [("unauthenticated", "unauthenticated", 3)]
    assert "3 more refused unauthenticated" in over[0].detail()
    everything = sample.close(t0 + dt.timedelta(seconds=62), everything=True)
    assert everything == []  # no window with more than its rows remains
    for i in range(4):
        sample.admit("malformed", "malformed-request", t0 + dt.timedelta(seconds=100 + i))
    assert [u.count for u in sample.close(t0 + dt.timedelta(seconds=104), everything=True)] == [2]


def test_read_timeout_is_checked(limits_ca: CA, tmp_path: Path) -> None:
    from support import run_cli

    out = run_cli("ca", "serve", "--dir", str(limits_ca.dir), "--read-timeout", "0", check=False)
    assert out.returncode != 0 and "Traceback" not in out.stdout + out.stderr
