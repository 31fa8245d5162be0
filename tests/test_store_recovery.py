"""A lost ``meta.db`` is not a fresh start, and no request key outlives its record: real agents
against a real CA over loopback.

* The store's database deleted, emptied or stripped of its records (or damaged) while
  ``store/certs/`` still holds the certificate: every command refuses in one line naming the
  count and ``certpulse agent repair`` (the daemon too), nothing is enrolled again and no new
  database is made; ``agent repair`` re-imports the folder with its key and its template, points
  the live link, raises 1006 (action ``repair``), is idempotent, reports what it cannot import
  and deletes nothing; a damaged database is moved aside, never overwritten.
* A request key left in ``flights/`` with no row is removed at the next pulse, whatever its age;
  a kill between the commit of a request's row and the write of its key (the pause point
  ``flight-recorded``) leaves a row without a key, which the next pulse drops before it enrolls.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import signal
import sqlite3
import subprocess
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from agent_support import (
    Agent,
    action_for,
    check_version_folder,
    issued,
    new_agent,
    one_line_error,
    sha1_thumbprint,
    wait_for,
)
from support import CA


@pytest.fixture
def enrolled(pki: CA, ca_url: str, tmp_path: Path) -> tuple[Agent, str]:
    """An agent that holds its ``machine`` certificate (thumbprint returned)."""
    agent = new_agent(pki, ca_url, tmp_path / "agent")
    action = action_for(agent.pulse(), "machine")
    assert action["outcome"] == "done", action
    return agent, str(action["new_thumbprint"])


def database(agent: Agent) -> Path:
    return agent.dir / "store" / "meta.db"


def lose_database(agent: Agent, how: str) -> None:
    db = database(agent)
    if how == "deleted":
        for suffix in ("", "-wal", "-shm"):
            Path(f"{db}{suffix}").unlink(missing_ok=True)
    elif how == "emptied":
        for suffix in ("-wal", "-shm"):
            Path(f"{db}{suffix}").unlink(missing_ok=True)
        db.write_bytes(b"")
    else:  # the tables are there, the records gone
        with sqlite3.connect(db) as conn:
            conn.execute("DELETE FROM certificates")
            conn.execute("DELETE FROM flights")
            conn.execute("DELETE FROM events")
        conn.close()


def pulse_cannot_run(result: subprocess.CompletedProcess[str]) -> str:
    """``agent pulse`` on a store that cannot be opened: one line, exit 74 (README, a local fault)."""
    assert result.returncode == 74, (result.returncode, result.stdout, result.stderr)
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("certpulse: error: store: the pulse cannot run: "), line
    assert "Traceback" not in result.stdout + result.stderr
    return line


def repair(agent: Agent, *, code: int = 0) -> dict[str, Any]:
    result = agent.run("agent", "repair", "--json", check=False)
    assert result.returncode == code and "Traceback" not in result.stderr, (result.returncode, result.stdout,
                                                                             result.stderr)
    data: dict[str, Any] = json.loads(result.stdout)
    return data


def keys_on_disk(agent: Agent) -> dict[str, bytes]:
    return {p.parent.name: p.read_bytes() for p in (agent.dir / "store" / "certs").glob("*/key.pem")}


@pytest.mark.parametrize("how", ["deleted", "emptied", "records-gone"])
def test_a_lost_database_is_refused_then_repaired_without_enrolling_again(
        enrolled: tuple[Agent, str], how: str) -> None:
    agent, thumb = enrolled
    before = issued(agent.ca, agent.principal, "machine")
    keys = keys_on_disk(agent)
    lose_database(agent, how)

    line = one_line_error(agent.run("cert", "list", check=False), "store")
    assert "1 certificate folder " in line and "certpulse agent repair" in line, line
    assert str(agent.dir / "store" / "certs") in line
    refusal = line.removeprefix("certpulse: error: store: ")
    pulse = agent.run("agent", "pulse", "--json", check=False)  # a store that cannot be opened: 74
    assert pulse.returncode == 74 and "Traceback" not in pulse.stdout + pulse.stderr, (pulse.returncode, pulse.stderr)
    assert pulse.stderr.strip().splitlines() == [f"certpulse: error: store: the pulse cannot run: {refusal}"]
    daemon = agent.run("agent", "run", "--pulses", "1", check=False, timeout=120)  # says so, backs off, no enrollment
    assert daemon.returncode == 0 and "Traceback" not in daemon.stderr, daemon.stderr
    assert f"the pulse cannot run: {refusal}" in daemon.stderr, daemon.stderr
    assert database(agent).exists() == (how != "deleted"), "a missing database was made anew"
    assert issued(agent.ca, agent.principal, "machine") == before, "the agent enrolled again"

    report = repair(agent)
    assert [(r["thumbprint"], r["template"], r["has_key"]) for r in report["imported"]] == [(thumb, "machine", True)]
    assert report["not_imported"] == [] and report["moved_aside"] is None
    record = agent.current("machine")
    assert (record["thumbprint"], record["has_key"], record["archived"]) == (thumb, True, False)
    assert record["policy_url"] is not None
    assert agent.live("machine").name == thumb
    check_version_folder(agent.ca, agent.live("machine"))
    events = json.loads(agent.run("events", "--id", "1006", "--json").stdout)
    last = events[-1]
    assert (last["action"], last["new"]["thumbprint"], last["template"]) == ("repair", thumb, "machine"), events

    assert repair(agent)["imported"] == []  # idempotent
    result = agent.pulse()
    assert all(a["outcome"] != "done" for a in result["actions"]), result
    assert issued(agent.ca, agent.principal, "machine") == before, "the agent enrolled again after the repair"
    assert keys_on_disk(agent) == keys


def test_a_damaged_database_is_refused_left_alone_then_moved_aside(enrolled: tuple[Agent, str]) -> None:
    agent, thumb = enrolled
    db = database(agent)
    for suffix in ("-wal", "-shm"):
        Path(f"{db}{suffix}").unlink(missing_ok=True)
    garbage = b"this is not a SQLite database " * 200
    db.write_bytes(garbage)

    line = pulse_cannot_run(agent.run("agent", "pulse", "--json", check=False))
    assert "is damaged" in line and "certpulse agent repair" in line, line
    one_line_error(agent.run("agent", "status", "--json", check=False), "store")
    assert db.read_bytes() == garbage, "the damaged database was written to"

    report = repair(agent)
    assert report["moved_aside"] and Path(report["moved_aside"]).read_bytes() == garbage
    assert Path(report["moved_aside"]).name.startswith("meta.db.damaged-")
    assert [r["thumbprint"] for r in report["imported"]] == [thumb]
    assert agent.current("machine")["thumbprint"] == thumb
    agent.pulse()


def self_signed(key: ec.EllipticCurvePrivateKey) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "stranger")])
    now = dt.datetime.now(dt.UTC)
    return (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now)
            .not_valid_after(now + dt.timedelta(days=30)).sign(key, hashes.SHA256()))


def pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def test_repair_names_what_it_cannot_import_and_deletes_nothing(enrolled: tuple[Agent, str]) -> None:
    agent, thumb = enrolled
    certs = agent.dir / "store" / "certs"
    misnamed = certs / ("0" * 40)  # another certificate's files
    misnamed.mkdir()
    (misnamed / "cert.pem").write_bytes((certs / thumb / "cert.pem").read_bytes())
    garbled = certs / ("1" * 40)
    garbled.mkdir()
    (garbled / "cert.pem").write_text("garbage")
    cert = self_signed(ec.generate_private_key(ec.SECP256R1()))
    stranger = pem_key(ec.generate_private_key(ec.SECP256R1()))
    mismatched = certs / sha1_thumbprint(cert)
    mismatched.mkdir()
    (mismatched / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (mismatched / "key.pem").write_bytes(stranger)
    lose_database(agent, "deleted")
    line = pulse_cannot_run(agent.run("agent", "pulse", "--json", check=False))
    assert "4 certificate folders " in line, line

    report = repair(agent, code=1)
    assert [r["thumbprint"] for r in report["imported"]] == [thumb]
    reasons = {Path(r["folder"]).name: r["reason"] for r in report["not_imported"]}
    assert "not the one the folder is named for" in reasons[misnamed.name], reasons
    assert "not a PEM certificate" in reasons[garbled.name], reasons
    assert "key.pem does not belong to cert.pem" in reasons[mismatched.name], reasons
    assert len(reasons) == 3
    assert (mismatched / "key.pem").read_bytes() == stranger, "repair deleted a key"
    assert repair(agent, code=1)["not_imported"] == report["not_imported"]  # idempotent
    text = agent.run("agent", "repair", check=False)
    assert text.returncode == 1 and "Not imported" in text.stdout and "Traceback" not in text.stderr
    agent.pulse()  # the store has its record again: it works (and warns about the rest)
    assert (mismatched / "key.pem").read_bytes() == stranger


def test_a_request_key_without_its_row_is_removed_at_the_next_pulse(enrolled: tuple[Agent, str]) -> None:
    agent, _ = enrolled
    leftover = agent.dir / "store" / "flights" / ("ab" * 16)
    leftover.mkdir(mode=0o700)
    (leftover / "key.pem").write_bytes(pem_key(ec.generate_private_key(ec.SECP256R1())))
    (leftover / "key.pem").chmod(0o600)
    agent.pulse()  # straight away: no age rule keeps it
    assert not leftover.exists(), "a request key without a record outlived the pulse"


def test_a_kill_between_the_request_row_and_its_key_is_settled_at_the_next_pulse(
        pki: CA, ca_url: str, tmp_path: Path) -> None:
    agent = new_agent(pki, ca_url, tmp_path / "agent")
    marker = agent.dir / "store" / "fault-flight-recorded"
    with (tmp_path / "killed.log").open("w") as log:
        proc = subprocess.Popen(agent.cmd("agent", "pulse", "--json"), stdout=log, stderr=subprocess.STDOUT,
                                env={**os.environ, "CERTPULSE_FAULT_PAUSE": "flight-recorded:120"})
    try:
        def paused() -> bool:
            assert proc.poll() is None, f"the agent exited ({proc.returncode}) before the pause point"
            return marker.exists() and marker.read_text().strip().isdigit()

        wait_for(paused, 90, "the agent to pause after recording its request")
        os.kill(int(marker.read_text()), signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
    marker.unlink()
    flights = agent.dir / "store" / "flights"
    assert not [p for p in flights.iterdir() if not p.name.startswith(".")], "the key was written before its row"
    assert [p["template"] for p in agent.status()["pending"]] == ["machine"]  # the row, without its key
    assert issued(agent.ca, agent.principal, "machine") == {"new": 0, "renewal": 0}

    result = agent.pulse()
    action = action_for(result, "machine")
    assert action["outcome"] == "done" and action["rule"] == "6b:missing", result
    assert agent.status()["pending"] == []
    assert list(flights.iterdir()) == []
    check_version_folder(agent.ca, agent.live("machine"))
