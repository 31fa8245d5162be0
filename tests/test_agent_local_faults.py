"""Issue 16, item 1: a local fault never ends the agent or passes silently.

Real processes only: one ``ca serve`` for the module, agent folders driven through the real
command line (``agent pulse``, ``agent run``, ``agent metrics``, ``events``), their files damaged
the way a disk or an operator damages them: a garbled or missing ``cert.pem``, an unreadable
``key.pem``, a live link that names nothing, a request whose key is gone, a damaged ``meta.db``.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent_support import Agent, action_for, check_version_folder, new_agent, one, wait_for
from support import CA

LIVE_FAULT_TIMEOUT = 120.0


def _events(agent: Agent, event_id: int) -> list[dict[str, Any]]:
    data: list[dict[str, Any]] = json.loads(agent.run("events", "--json", "--id", str(event_id)).stdout)
    return data


def _metrics(agent: Agent) -> list[str]:
    return agent.run("agent", "metrics").stdout.splitlines()


def _repairs(result: dict[str, Any]) -> list[dict[str, Any]]:
    return [n for n in result["notes"] if n["rule"] == "repair"]


def test_a_garbled_or_missing_live_certificate_is_rewritten_from_its_copy_and_said(
        pki: CA, ca_url: str, tmp_path: Path) -> None:
    agent = new_agent(pki, ca_url, tmp_path / "agent")
    agent.pulse()
    live = agent.live("machine")
    original = (live / "cert.pem").read_bytes()

    (live / "cert.pem").write_bytes(b"-----BEGIN CERTIFICATE-----\ngarbage\n-----END CERTIFICATE-----\n")
    result = agent.pulse()  # repaired: the pulse is ok, and says what it did
    repair = one(_repairs(result), "repair note")
    assert repair["thumbprint"] == live.name and "cert.pem" in repair["detail"], repair
    assert (live / "cert.pem").read_bytes() == original
    check_version_folder(pki, live)
    assert not _events(agent, 1100)

    (live / "cert.pem").unlink()
    result = agent.pulse()
    assert "No such file" in one(_repairs(result), "repair note")["detail"]
    assert (live / "cert.pem").read_bytes() == original
    assert not _repairs(agent.pulse())  # nothing left to repair


def test_a_dangling_live_link_is_pointed_at_the_current_version_or_removed(
        pki: CA, ca_url: str, tmp_path: Path) -> None:
    agent = new_agent(pki, ca_url, tmp_path / "agent")
    agent.pulse()
    current = agent.live("machine").name
    live_dir = agent.dir / "store" / "live"
    (live_dir / "machine").unlink()
    (live_dir / "machine").symlink_to(Path("..") / "certs" / ("AB" * 20))
    (live_dir / "ghost").symlink_to(Path("..") / "certs" / ("CD" * 20))

    result = agent.pulse()
    repairs = {n["template"]: n["detail"] for n in _repairs(result)}
    assert set(repairs) == {"machine", "ghost"}, result["notes"]
    assert current in repairs["machine"] and "removed" in repairs["ghost"], repairs
    assert agent.live("machine").name == current
    assert not (live_dir / "ghost").is_symlink()


def test_an_unreadable_key_fails_the_pulse_once_while_other_templates_renew(
        pki: CA, ca_url: str, tmp_path: Path) -> None:
    agent = new_agent(pki, ca_url, tmp_path / "agent", "shortlived")
    agent.pulse()
    machine = agent.live("machine")
    short = agent.live("short").name
    key = machine / "key.pem"
    good_key = key.read_bytes()
    key.write_bytes(b"not a key at all")

    # The short template is due (80 % of its hour): it renews although the machine key is broken.
    result = agent.pulse(faketime="+50m", ok=False)
    renewed = action_for(result, "short")
    assert (renewed["outcome"], renewed["thumbprint"]) == ("done", short), renewed
    # The broken one is not enrolled anew behind the operator's back: its template is still held.
    assert not [a for a in result["actions"] if a["template"] == "machine"], result["actions"]
    error = result["error"]
    assert f"the key of the machine certificate {machine.name} (template machine) cannot be read" in error, error
    assert f"certpulse cert show {machine.name}" in error, error
    [event] = _events(agent, 1100)
    assert event["data"]["cause"] == "key-unreadable" and event["old"]["thumbprint"] == machine.name, event
    metrics = _metrics(agent)
    assert "certpulse_last_pulse_success 0.0" in metrics, metrics
    assert f'certpulse_renewal_failing{{cause="key-unreadable",key="{machine.name}"}} 1.0' in metrics, metrics

    # The cause persists: the pulse fails again, and says so, but 1100 is not raised again.
    again = agent.pulse(faketime="+55m", ok=False)
    assert "cannot be read" in again["error"]
    assert len(_events(agent, 1100)) == 1

    # Fixed: the pulse is ok and the metrics say so; broken again later, 1100 is raised again.
    key.write_bytes(good_key)
    agent.pulse(faketime="+56m")
    metrics = _metrics(agent)
    assert "certpulse_last_pulse_success 1.0" in metrics
    assert not [m for m in metrics if m.startswith("certpulse_renewal_failing{")], metrics
    key.unlink()
    missing = agent.pulse(faketime="+57m", ok=False)
    assert "No such file or directory" in missing["error"], missing
    assert len(_events(agent, 1100)) == 2


def test_a_request_whose_key_is_gone_is_dropped_and_requested_anew(pki: CA, ca_url: str, tmp_path: Path) -> None:
    agent = new_agent(pki, ca_url, tmp_path / "agent", "approvers")
    first = action_for(agent.pulse(), "approval-required")
    assert first["outcome"] == "pending", first
    [flight] = list((agent.dir / "store" / "flights").iterdir())
    (flight / "key.pem").unlink()

    result = agent.pulse()
    repair = one(_repairs(result), "repair note")
    assert repair["template"] == "approval-required" and "cannot be read" in repair["detail"], repair
    again = action_for(result, "approval-required")
    assert (again["rule"], again["outcome"]) == ("6b:missing", "pending"), again
    assert [f.name for f in (agent.dir / "store" / "flights").iterdir()] != [flight.name]


def _damage(database: Path) -> dict[Path, bytes]:
    """Garble ``meta.db`` (and its WAL) the way a bad disk does; the bytes to put back."""
    saved = {p: p.read_bytes() for p in database.parent.glob(database.name + "*")}
    with database.open("r+b") as handle:
        handle.write(b"\xde\xad\xbe\xef" * 256)
    for extra in saved:
        if extra != database:
            extra.unlink()
    return saved


def test_a_damaged_store_database_is_said_with_its_own_status_and_the_daemon_keeps_running(
        pki: CA, ca_url: str, tmp_path: Path) -> None:
    agent = new_agent(pki, ca_url, tmp_path / "agent")
    agent.pulse()
    database = agent.dir / "store" / "meta.db"
    saved = _damage(database)

    pulse = agent.run("agent", "pulse", check=False)
    assert pulse.returncode == 74, (pulse.returncode, pulse.stdout, pulse.stderr)
    [line] = pulse.stderr.strip().splitlines()
    assert line.startswith("certpulse: error: store: the pulse cannot run: the store's database"), line
    assert "meta.db" in line and "Traceback" not in pulse.stdout + pulse.stderr

    log_path = tmp_path / "run.log"
    with log_path.open("w") as log:
        daemon = subprocess.Popen(agent.cmd("agent", "run"), stdout=log, stderr=subprocess.STDOUT,
                                  start_new_session=True)
    try:
        wait_for(lambda: "the pulse cannot run: the store's database" in log_path.read_text(),
                 LIVE_FAULT_TIMEOUT, "the daemon to say that the store cannot be opened")
        wait_for(lambda: "backing off" in log_path.read_text(), LIVE_FAULT_TIMEOUT, "the daemon to back off")
        assert daemon.poll() is None, log_path.read_text()
        for path, data in saved.items():  # the operator restores the database; a pulse now works
            path.write_bytes(data)
        daemon.send_signal(signal.SIGHUP)
        wait_for(lambda: "pulse ok" in log_path.read_text(), LIVE_FAULT_TIMEOUT, "a pulse after the repair")
        assert daemon.poll() is None
    finally:
        os.killpg(daemon.pid, signal.SIGTERM)
        daemon.wait(timeout=60)
    assert daemon.returncode == 0, log_path.read_text()
    assert "Traceback" not in log_path.read_text()
    assert agent.status()["last_pulse"]["outcome"] == "ok"


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 4 MiB tmpfs of the test's own (mounting needs root: skipped, saying so, without it)."""
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m,mode=0700", "tmpfs", str(mount_point)],
                             capture_output=True, text=True, check=False)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (needs root): {mounted.stderr.strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


def test_a_full_disk_fails_the_pulse_in_plain_words_and_the_next_one_renews(
        pki: CA, ca_url: str, small_disk: Path) -> None:
    agent = new_agent(pki, ca_url, small_disk / "agent")
    agent.pulse()
    old = agent.live("machine").name
    filler = small_disk / "filler"
    with filler.open("wb") as handle, contextlib.suppress(OSError):
        while True:
            handle.write(b"\0" * 65536)
            handle.flush()

    result = agent.run("agent", "pulse", "--json", faketime="+330d", check=False)
    output = result.stdout + result.stderr
    assert "Traceback" not in output and "internal error" not in output, output
    if result.returncode == 1:  # the renewal failed, and the failed pulse is recorded
        assert "the disk is full" in output and "free space" in output, output
    else:  # SQLite could not even open meta.db: one line names it and the disk, with its own status
        assert result.returncode == 74, (result.returncode, output)
        [line] = result.stderr.strip().splitlines()
        assert line.startswith("certpulse: error: store: the pulse "), line
        assert "meta.db" in line and "disk" in line, line
    assert agent.live("machine").name == old  # nothing half-installed: the old pair still serves
    check_version_folder(pki, agent.live("machine"))

    filler.unlink()
    renewed = action_for(agent.pulse(faketime="+330d"), "machine")
    assert (renewed["rule"], renewed["outcome"]) == ("6a:threshold", "done"), renewed
    assert agent.live("machine").name == renewed["new_thumbprint"]
