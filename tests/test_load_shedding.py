"""Load shedding: a worker at its limit of requests in progress answers 503 + Retry-After (an RFC
7807 problem) before doing any work; /healthz and /metrics still answer; the agent backs off.

A request is held in progress by a raw connection that sends its headers and only part of its
body: the server has started it (it counts against the limit) and waits for the rest.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import random
import re
import socket
import threading
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest

from agent_support import new_agent, wait_for
from certpulse import clock
from certpulse.agent.daemon import BACKOFF_FLOOR, next_delay
from certpulse.ca.admin import CAAdmin
from certpulse.ca.config import CADir
from certpulse.ca.model import Caller
from certpulse.ca.setup import open_service
from certpulse.frontends.shedding import LoadShedding, max_inflight_from_environment, shed_load
from support import CA, Client, init_ca, make_csr, run_cli, serve

HOUR_S = 3600


@pytest.fixture(scope="module")
def shed_ca(tmp_path_factory: pytest.TempPathFactory) -> CA:
    directory = tmp_path_factory.mktemp("shed") / "ca"
    return init_ca(directory, f"sqlite:///{directory.parent / 'ca.db'}")


@pytest.fixture(scope="module")
def one_slot(shed_ca: CA) -> Iterator[str]:
    """A server whose single worker takes one request at a time."""
    with serve(shed_ca, "--max-inflight", "1") as base:
        yield base


def metric(base: str, name: str) -> float:
    response = httpx.get(f"{base}/metrics", timeout=10)
    assert response.status_code == 200, response.text
    found = re.search(rf"^{name} ([0-9.e+-]+)$", response.text, re.MULTILINE)
    assert found, f"{name} missing from /metrics"
    return float(found.group(1))


class HeldRequest:
    """A token exchange whose body is half sent: in progress on the server until :meth:`finish`."""

    BODY = b'{"token": "cpe_not-a-real-token"}'

    def __init__(self, base: str) -> None:
        url = urlsplit(base)
        self.sock = socket.create_connection((url.hostname or "127.0.0.1", url.port or 80), timeout=10)
        head = (b"POST /v1/tokens/exchange HTTP/1.1\r\nHost: ca\r\nContent-Type: application/json\r\n"
                b"Content-Length: %d\r\n\r\n" % len(self.BODY))
        self.sock.sendall(head + self.BODY[:7])

    def finish(self) -> bytes:
        """Send the rest of the body; the server's answer (status line first)."""
        self.sock.sendall(self.BODY[7:])
        answer = b""
        with contextlib.suppress(TimeoutError):
            while b"\r\n\r\n" not in answer or not answer.rstrip().endswith(b"}"):
                chunk = self.sock.recv(65536)
                if not chunk:
                    break
                answer += chunk
        self.sock.close()
        return answer


@contextlib.contextmanager
def hold(base: str, count: int = 1) -> Iterator[list[HeldRequest]]:
    before = metric(base, "certpulse_ca_requests_inflight")
    held = [HeldRequest(base) for _ in range(count)]
    try:
        wait_for(lambda: metric(base, "certpulse_ca_requests_inflight") >= before + count, 10,
                 "the held requests to be in progress")
        yield held
    finally:
        for request in held:
            with contextlib.suppress(OSError):
                request.sock.close()


def assert_shed(response: httpx.Response) -> int:
    """A shed answer: 503, Retry-After of 1-5 whole seconds, the same in the problem document."""
    assert response.status_code == 503, (response.status_code, response.text)
    assert response.headers["content-type"].startswith("application/problem+json")
    seconds = int(response.headers["retry-after"])
    assert 1 <= seconds <= 5
    body = response.json()
    assert body["reason"] == "unavailable" and body["status"] == 503 and body["retry_after"] == seconds, body
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
            # liveness and metrics are never shed, even now
            assert http.get("/healthz").status_code == 200
            assert metric(one_slot, "certpulse_ca_requests_shed_total") >= shed_before + len(answers)
            assert metric(one_slot, "certpulse_ca_requests_inflight_limit") == 1
            assert metric(one_slot, "certpulse_ca_requests_inflight_peak") == 1
        # The held request itself was never shed: it completes normally once its body arrives.
        status_line = held.finish().split(b"\r\n", 1)[0]
        assert status_line.startswith(b"HTTP/1.1 401"), status_line
    wait_for(lambda: metric(one_slot, "certpulse_ca_requests_inflight") == 0, 10, "the held request to end")
    assert httpx.get(f"{one_slot}/v1/policy", timeout=10).status_code == 401  # served again, not shed


def test_retry_after_values_are_spread(one_slot: str) -> None:
    with hold(one_slot), httpx.Client(base_url=one_slot, timeout=10) as http:
        seconds = [assert_shed(http.get("/v1/policy")) for _ in range(40)]
    assert len(set(seconds)) >= 3, seconds


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
        return [service.exchange_token(admin.add_principal(f"storm-{uuid.uuid4().hex[:8]}.example.internal",
                                                           "machine", now)["token"], now)["credential"]
                for _ in range(count)]
    finally:
        service.engine.dispose()


def assert_shed_any(response: httpx.Response) -> None:
    assert response.headers["content-type"].startswith("application/problem+json")
    assert 1 <= int(response.headers["retry-after"]) <= 5
    assert response.json()["reason"] == "unavailable"


def test_the_agent_backs_off_when_shed_and_enrols_afterwards(shed_ca: CA, one_slot: str, tmp_path: Path) -> None:
    agent = new_agent(shed_ca, one_slot, tmp_path / "agent")
    with hold(one_slot):
        result = agent.pulse(ok=False)
        assert "503" in result["error"], result
        assert 1 <= result["retry_after"] <= 5, result
        assert agent.certs() == []
    result = agent.pulse()
    assert [a["outcome"] for a in result["actions"] if a["template"] == "machine"] == ["done"], result
    assert [c["template_name"] for c in agent.certs()].count("machine") == 1


def test_next_delay_spreads_agents_shed_together() -> None:
    """Agents shed in one storm all get about the same Retry-After; the one-minute floor alone
    would bring them back in the same second. The wait is spread over half as long again."""
    rng = random.Random(1)
    refresh, cap = dt.timedelta(hours=8), dt.timedelta(hours=1)
    first = [next_delay(refresh=refresh, failures=1, retry_after=3, cap=cap, rng=rng) for _ in range(500)]
    assert min(first) >= BACKOFF_FLOOR and max(first) <= 1.5 * BACKOFF_FLOOR
    assert max(first) - min(first) > 0.8 * 0.5 * BACKOFF_FLOOR  # spread over most of the half minute
    assert len({round(d, 1) for d in first}) > 200
    long = [next_delay(refresh=refresh, failures=1, retry_after=600, cap=cap, rng=rng) for _ in range(200)]
    assert min(long) >= 600 and max(long) <= 900 and max(long) - min(long) > 200
    # without a Retry-After, as before: exactly the floor after the first failure
    assert next_delay(refresh=refresh, failures=1, retry_after=None, cap=cap, rng=rng) == BACKOFF_FLOOR
    # never past the cap unless the server asked for longer
    capped = dt.timedelta(seconds=70)
    assert all(next_delay(refresh=refresh, failures=5, retry_after=65, cap=capped, rng=rng) <= 70
               for _ in range(200))
    assert next_delay(refresh=refresh, failures=5, retry_after=HOUR_S, cap=capped, rng=rng) == HOUR_S


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
    monkeypatch.setenv("CERTPULSE_MAX_INFLIGHT", "many")
    with pytest.raises(Exception, match="CERTPULSE_MAX_INFLIGHT must be a whole number"):
        max_inflight_from_environment()
    refused = run_cli("ca", "serve", "--dir", str(shed_ca.dir), "--max-inflight", "-1", check=False)
    assert refused.returncode == 2 and "--max-inflight" in refused.stderr, refused.stderr
