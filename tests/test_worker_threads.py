"""A worker's thread pool: ``ca serve --threads N`` runs at most N blocking handlers at once.

Forty threads (anyio's default) cost throughput on two cores (benchmarks/RESULTS.md, section 1):
the limit is set inside the worker's event loop before its first request, and reported in
/metrics so that an operator can see what each worker runs with.
"""

from __future__ import annotations

import re
import threading
import time

import anyio
import anyio.to_thread
import httpx
import pytest
from starlette.concurrency import run_in_threadpool

from certpulse.frontends.threads import DEFAULT_THREADS, ThreadLimit, limit_threads, threads_from_environment
from support import CA, init_ca, run_cli, serve


@pytest.fixture(scope="module")
def threads_ca(tmp_path_factory: pytest.TempPathFactory) -> CA:
    directory = tmp_path_factory.mktemp("threads") / "ca"
    return init_ca(directory, f"sqlite:///{directory.parent / 'ca.db'}")


# How long anything here may take on a loaded machine before the test calls it a failure. It
# bounds waits for a condition, never a window that a slow thread must hit.
SETTLE_SECONDS = 60.0


def _most_at_once(threads: int, calls: int) -> int:
    """Start ``calls`` blocking calls at once through an app behind ThreadLimit(threads); how many
    of them were running together at most.

    Every call that gets a thread is held there until the worker has settled: each call is
    either running in a thread or queued for one on the event loop. Only then are they let go.
    So the count does not depend on how fast threads start: with a limit that works, exactly
    ``threads`` hold while the rest queue; with one that does not, every call gets a thread and
    the count shows it.
    """
    running = 0
    most = 0
    lock = threading.Lock()
    release = threading.Event()

    def blocking() -> None:
        nonlocal running, most
        with lock:
            running += 1
            most = max(most, running)
        try:
            assert release.wait(SETTLE_SECONDS), "the calls were never let go"
        finally:
            with lock:
                running -= 1

    async def app(scope: object, receive: object, send: object) -> None:
        await run_in_threadpool(blocking)

    limited = ThreadLimit(app, threads)  # type: ignore[arg-type]

    async def settle() -> None:
        """Let the calls go once each of them runs in a thread or waits for one."""
        limiter = anyio.to_thread.current_default_thread_limiter()
        deadline = time.monotonic() + SETTLE_SECONDS
        while True:
            with lock:
                held = running
            if held + limiter.statistics().tasks_waiting == calls:
                break
            assert time.monotonic() < deadline, f"{held} running, {limiter.statistics()}: never settled"
            await anyio.sleep(0.01)
        release.set()

    async def main() -> None:
        async with anyio.create_task_group() as tg:
            for _ in range(calls):
                tg.start_soon(limited, {"type": "http"}, None, None)
            tg.start_soon(settle)

    try:
        anyio.run(main)
    finally:
        release.set()  # never leave a pool thread waiting after a failure
    return most


def test_at_most_the_limit_of_blocking_handlers_run_at_once() -> None:
    assert _most_at_once(3, 12) == 3
    assert _most_at_once(1, 4) == 1
    assert _most_at_once(40, 12) == 12  # a larger limit really lets more run


def test_the_count_would_see_a_broken_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    """The measure above can fail: with the limit left at anyio's default (40 threads), twelve
    calls all run at once although three were asked for."""
    async def unlimited(self: ThreadLimit, scope: object, receive: object, send: object) -> None:
        await self.app(scope, receive, send)  # type: ignore[arg-type]

    monkeypatch.setattr(ThreadLimit, "__call__", unlimited)
    assert _most_at_once(3, 12) == 12


def test_the_limit_comes_from_the_command_line_or_the_environment(monkeypatch: pytest.MonkeyPatch,
                                                                    threads_ca: CA) -> None:
    monkeypatch.delenv("CERTPULSE_THREADS", raising=False)
    assert threads_from_environment() == DEFAULT_THREADS == 4

    async def app(scope: object, receive: object, send: object) -> None:
        return None

    monkeypatch.setenv("CERTPULSE_THREADS", "7")
    assert limit_threads(app).threads == 7  # type: ignore[arg-type]
    for bad in ("0", "many", "1000"):
        monkeypatch.setenv("CERTPULSE_THREADS", bad)
        with pytest.raises(Exception, match="CERTPULSE_THREADS must be a whole number from 1 to 256"):
            threads_from_environment()
    with pytest.raises(ValueError):
        ThreadLimit(app, 0)  # type: ignore[arg-type]
    refused = run_cli("ca", "serve", "--dir", str(threads_ca.dir), "--threads", "0", check=False)
    assert refused.returncode == 2 and "--threads" in refused.stderr, refused.stderr


@pytest.mark.parametrize("threads", ["3", None])
def test_ca_serve_runs_its_workers_with_the_threads_asked_for(threads_ca: CA, threads: str | None) -> None:
    extra = ("--threads", threads) if threads else ()
    with serve(threads_ca, "--workers", "2", *extra) as base:
        assert httpx.get(f"{base}/healthz", timeout=10).status_code == 200
        text = httpx.get(f"{base}/metrics", timeout=10).text
    found = re.search(r"^certpulse_ca_worker_threads ([0-9.e+-]+)$", text, re.MULTILINE)
    assert found, "certpulse_ca_worker_threads missing from /metrics"
    assert float(found.group(1)) == float(threads or DEFAULT_THREADS)
