"""A second ``agent pulse`` never kills the first: real agent processes on one store.

A one-shot pulse holds the store lock while it pulses; it is held there by a fault pause point
and then stopped (SIGSTOP), so the lock stays held however slow the machine is, and signals sent
meanwhile wait to be delivered at SIGCONT. Only a daemon is ever signalled; a pulse that finds a
one-shot pulse running waits for it (``--wait``) and then pulses, or says who holds the store and
exits 75. A lock file that names a process which is not its holder (its pid reused) is never
believed. The daemon side (SIGHUP from ``agent pulse``) is in test_agent_process.py.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent_support import Agent, action_for, issued, new_agent, one_line_error, wait_for
from support import CA

PULSE_RUNNING_EXIT = 75


@contextlib.contextmanager
def started(agent: Agent, log: Path, *args: str, env: dict[str, str] | None = None) -> Iterator[subprocess.Popen[str]]:
    """``certpulse ARGS --dir AGENT`` in the background, output to ``log``; killed if still running."""
    with log.open("w") as out:
        proc = subprocess.Popen(agent.cmd(*args), stdout=out, stderr=subprocess.STDOUT, text=True,
                                env={**os.environ, "COLUMNS": "200", **(env or {})})
    try:
        yield proc
    finally:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGCONT)
            proc.kill()
            proc.wait(timeout=10)


def finished(proc: subprocess.Popen[str], log: Path, timeout: float = 120) -> int:
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"still running after {timeout} s:\n{log.read_text()}") from None


def pulse_json(log: Path) -> dict[str, object]:
    """The JSON document of ``agent pulse --json`` in a log that may also hold warning lines."""
    text = log.read_text()
    data: dict[str, object] = json.loads(text[text.index("{\n"):text.rindex("\n}") + 2])
    return data


def test_a_second_pulse_waits_for_a_running_one_shot_pulse_and_never_kills_it(
        pki: CA, ca_url: str, tmp_path: Path) -> None:
    agent = new_agent(pki, ca_url, tmp_path / "agent")
    marker = agent.dir / "store" / "fault-before-install"
    first_log, waiting_log = tmp_path / "first.log", tmp_path / "waiting.log"
    with started(agent, first_log, "agent", "pulse", "--json",
                 env={"CERTPULSE_FAULT_PAUSE": "before-install:20"}) as first:
        def paused() -> bool:
            assert first.poll() is None, f"the first pulse exited ({first.returncode}): {first_log.read_text()}"
            return marker.exists() and marker.read_text().strip() == str(first.pid)

        wait_for(paused, 60, "the first pulse to reach before-install with the lock held")
        os.kill(first.pid, signal.SIGSTOP)  # holds the lock until SIGCONT, however slow the machine

        status = agent.status()
        assert status["daemon_pid"] is None, status
        assert status["pulse_running"]["pid"] == first.pid, status

        # Not waiting: one line naming the pulse that runs, exit 75, and no signal sent to it.
        busy = agent.run("agent", "pulse", "--wait", "0", check=False)
        assert busy.returncode == PULSE_RUNNING_EXIT, (busy.returncode, busy.stdout, busy.stderr)
        lines = busy.stderr.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in busy.stdout + busy.stderr, busy.stderr
        assert lines[0].startswith("certpulse: error: conflict: a pulse is already running on this store "
                                   f"(pid {first.pid}, since "), lines[0]
        assert "asked the running agent" not in busy.stdout

        # A daemon is refused as before, naming the pulse that holds the store.
        refused = one_line_error(agent.run("agent", "run", check=False), "conflict")
        assert f"a pulse is already running on this store (pid {first.pid}" in refused

        # An operator's (or an older version's) SIGHUP and SIGUSR1 reach the one-shot pulse at SIGCONT.
        os.kill(first.pid, signal.SIGHUP)
        os.kill(first.pid, signal.SIGUSR1)
        with started(agent, waiting_log, "agent", "pulse", "--json", "--wait", "300") as waiting:
            def waits() -> bool:
                assert waiting.poll() is None, f"the second pulse exited: {waiting_log.read_text()}"
                return (f"another pulse holds this store (pid {first.pid}, since " in waiting_log.read_text()
                        and "waiting up to 300 s for it to end" in waiting_log.read_text())

            wait_for(waits, 60, "the second pulse to wait for the first")
            os.kill(first.pid, signal.SIGCONT)
            assert finished(first, first_log) == 0, first_log.read_text()
            assert action_for(pulse_json(first_log), "machine")["outcome"] == "done"
            assert "SIGHUP ignored" in first_log.read_text()
            assert finished(waiting, waiting_log) == 0, waiting_log.read_text()

    # The waiting pulse ran its own pulse after the first one ended: nothing was left to do.
    second = pulse_json(waiting_log)
    assert second["outcome"] == "ok" and second["actions"] == [], second
    assert issued(pki, agent.principal, "machine") == {"new": 1, "renewal": 0}
    assert agent.status()["pulse_running"] is None


def test_a_waiting_pulse_takes_over_when_the_running_one_is_killed(pki: CA, ca_url: str, tmp_path: Path) -> None:
    """SIGKILL leaves the killed pulse's record in the lock file; the lock itself goes with the
    process, and the pulse waiting for it goes on with the request the killed one left."""
    agent = new_agent(pki, ca_url, tmp_path / "agent")
    marker = agent.dir / "store" / "fault-before-install"
    first_log, waiting_log = tmp_path / "first.log", tmp_path / "waiting.log"
    with started(agent, first_log, "agent", "pulse", "--json",
                 env={"CERTPULSE_FAULT_PAUSE": "before-install:600"}) as first:
        wait_for(lambda: marker.exists() and marker.read_text().strip() == str(first.pid), 60,
                 "the first pulse to reach before-install with the lock held")
        with started(agent, waiting_log, "agent", "pulse", "--json", "--wait", "300") as waiting:
            wait_for(lambda: f"another pulse holds this store (pid {first.pid}, since " in waiting_log.read_text(),
                     60, "the second pulse to wait for the first")
            os.kill(first.pid, signal.SIGKILL)
            assert first.wait(timeout=30) == -signal.SIGKILL
            assert finished(waiting, waiting_log) == 0, waiting_log.read_text()
    action = action_for(pulse_json(waiting_log), "machine")
    assert (action["rule"], action["outcome"]) == ("resume", "done"), action
    assert issued(pki, agent.principal, "machine") == {"new": 1, "renewal": 0}


@contextlib.contextmanager
def lock_held_naming(agent: Agent, content: str) -> Iterator[None]:
    """``agent.lock`` held by this test process, its file saying ``content``."""
    fd = os.open(agent.dir / "agent.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.ftruncate(fd, 0)
        os.write(fd, content.encode())
        yield
    finally:
        os.close(fd)


@pytest.mark.parametrize("written", ["reused-pid", "older-version"])
def test_a_lock_file_naming_a_process_that_is_not_its_holder_is_never_believed(
        pki: CA, ca_url: str, tmp_path: Path, written: str) -> None:
    """The pid in the file belongs to a process that does not hold the lock (started after the
    one that wrote it, or written bare by an older version that did not say what held the lock):
    it is not signalled, however the file describes it. ``--plan`` needs no lock at all."""
    agent = new_agent(pki, ca_url, tmp_path / "agent")
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        content = (str(bystander.pid) if written == "older-version" else
                   json.dumps({"pid": bystander.pid, "role": "daemon", "since": "2026-01-01T00:00:00+00:00",
                               "start": 1}))  # a process that started at tick 1 is long gone
        with lock_held_naming(agent, content):
            busy = agent.run("agent", "pulse", "--wait", "0", check=False)
            assert busy.returncode == PULSE_RUNNING_EXIT, (busy.returncode, busy.stdout, busy.stderr)
            who = f"pid {bystander.pid}" if written == "older-version" else "pid ?"
            assert busy.stderr.strip() == ("certpulse: error: conflict: another process holds this store's lock "
                                           f"({who}); try again when it lets go (waited 0 s)"), busy.stderr
            status = agent.status()
            assert status["daemon_pid"] is None and status["pulse_running"] is None, status
            plan = json.loads(agent.run("agent", "pulse", "--plan", "--json").stdout)
            assert action_for(plan, "machine")["kind"] == "enroll"
        result = agent.pulse()  # once let go, the store is this pulse's
        assert action_for(result, "machine")["outcome"] == "done"
        assert bystander.poll() is None, "a process that does not hold the lock was signalled"
        assert (agent.dir / "agent.lock").read_text() == ""  # a finished pulse leaves no pid behind
    finally:
        bystander.kill()
        bystander.wait(timeout=10)
