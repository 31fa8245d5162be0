"""Notification tasks end to end: a real CA, real agents (one-shot pulses and the daemon), real
scripts on disk. What a renewal raises reaches the task once, with the right thumbprints; a kill
between the event and the run loses nothing; a slow task never holds up a pulse; hostile
certificate data reaches a task as plain data."""

from __future__ import annotations

import datetime as dt
import json
import os
import signal
import stat
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import pkcs12

from agent_support import Agent, action_for, new_agent, one, wait_for
from support import CA

RECORDER = """#!/bin/sh
# Appends one line per run (arguments and environment), keeps standard input whole.
out="$1"
printf 'old=%s new=%s env_old=%s env_new=%s event=%s\\n' "$2" "$3" "$CERTPULSE_OLD_THUMBPRINT" \\
    "$CERTPULSE_NEW_THUMBPRINT" "$CERTPULSE_EVENT_ID" >> "$out"
cat > "$out.stdin.$(date +%s%N)"
"""


def script(folder: Path, name: str, text: str) -> Path:
    folder.mkdir(mode=0o700, exist_ok=True)
    os.chmod(folder, 0o700)
    path = folder / name
    path.write_text(text)
    path.chmod(0o700)
    return path


def add_recorder(agent: Agent, tmp_path: Path, task_type: str, name: str = "record") -> Path:
    out = tmp_path / f"{name}.log"
    command = script(tmp_path / "scripts", f"{name}.sh", RECORDER)
    agent.run("task", "add", "--name", name, "--type", task_type, "--command", str(command), "--arg", str(out),
              "--timeout", "20")
    return out


def runs(out: Path) -> list[str]:
    return out.read_text().splitlines() if out.exists() else []


def stdin_events(out: Path) -> list[dict[str, Any]]:
    return [json.loads(p.read_text()) for p in sorted(out.parent.glob(f"{out.name}.stdin.*"))]


def task_row(agent: Agent, name: str) -> dict[str, Any]:
    rows: list[dict[str, Any]] = json.loads(agent.run("task", "list", "--json").stdout)
    return one([r for r in rows if r["name"] == name], f"task {name}")


def test_a_renewal_runs_the_replace_task_once_with_old_and_new_thumbprints(
        pki: CA, ca_url: str, tmp_path: Path) -> None:
    agent = new_agent(pki, ca_url, tmp_path / "agent")
    out = add_recorder(agent, tmp_path, "replace")
    old = action_for(agent.pulse(), "machine")["new_thumbprint"]
    assert runs(out) == []  # an enrollment is no replacement
    new = action_for(agent.pulse(faketime="+330d"), "machine")["new_thumbprint"]
    assert runs(out) == [f"old={old} new={new} env_old={old} env_new={new} event=1001"]
    [event] = stdin_events(out)
    assert (event["id"], event["action"], event["old"]["thumbprint"], event["new"]["thumbprint"]) == (
        1001, "renew", old, new)
    assert task_row(agent, "record")["runs"] == 1 and task_row(agent, "record")["state"] == "ok"
    agent.run("task", "run-pending")
    agent.pulse()
    assert len(runs(out)) == 1  # delivered once: the cursor moved past it
    [run] = json.loads(agent.run("task", "history", "record", "--json").stdout)
    assert (run["outcome"], run["exit_status"], run["event_id"]) == ("ok", 0, 1001)


def test_a_kill_between_the_event_and_the_task_run_loses_nothing(pki: CA, ca_url: str, tmp_path: Path) -> None:
    agent = new_agent(pki, ca_url, tmp_path / "agent")
    out = add_recorder(agent, tmp_path, "new")
    marker = agent.dir / "store" / "fault-before-tasks"
    proc = subprocess.Popen(agent.cmd("agent", "pulse", "--json"), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env={**os.environ, "CERTPULSE_FAULT_PAUSE": "before-tasks:60"})
    try:
        wait_for(lambda: marker.exists() and marker.read_text().strip().isdigit(), 30, "the pause before tasks")
        os.kill(int(marker.read_text()), signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
    marker.unlink()
    installed = one(agent.certs(), "installed certificate")["thumbprint"]
    assert runs(out) == []  # the event is in the log; the task never ran
    agent.pulse()  # the next start delivers what was missed
    assert runs(out) == [f"old= new={installed} env_old= env_new={installed} event=1006"]


def test_the_daemon_pulses_on_while_a_task_is_still_running(pki: CA, ca_url: str, tmp_path: Path) -> None:
    agent = new_agent(pki, ca_url, tmp_path / "agent")
    started = tmp_path / "slow.started"
    slow = script(tmp_path / "scripts", "slow.sh", f"#!/bin/sh\ntouch {started}\nsleep 30\n")
    agent.run("task", "add", "--name", "slow", "--type", "new", "--command", str(slow), "--timeout", "60")
    log = (tmp_path / "daemon.log").open("w")
    daemon = subprocess.Popen(agent.cmd("agent", "run"), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for(started.exists, 30, "the slow task to start")
        first = agent.status()["last_pulse"]["started_at"]
        time.sleep(1.1)  # the next pulse starts in a later second
        daemon.send_signal(signal.SIGHUP)
        wait_for(lambda: agent.status()["last_pulse"]["started_at"] != first, 20, "a second pulse beside the task")
        assert task_row(agent, "slow")["runs"] == 0  # still running
    finally:
        os.killpg(daemon.pid, signal.SIGTERM)
        daemon.wait(timeout=30)
        log.close()


def test_hostile_certificate_text_reaches_the_task_as_plain_data(pki: CA, ca_url: str, tmp_path: Path) -> None:
    agent = new_agent(pki, ca_url, tmp_path / "agent")
    out = add_recorder(agent, tmp_path, "new")
    canary = Path(f"/tmp/cp-pwn-{uuid.uuid4().hex[:6]}")  # a name attribute holds at most 64 characters
    cn = f"$(touch {canary})\n`touch {canary}`"
    organisation = "x'\"; rm -rf / #\nline3 && echo $HOME | tee"
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, cn),
                      x509.NameAttribute(x509.NameOID.ORGANIZATION_NAME, organisation)])
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(dt.datetime.now(dt.UTC) - dt.timedelta(minutes=1))
            .not_valid_after(dt.datetime.now(dt.UTC) + dt.timedelta(days=300))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("a;b|c&d")]), critical=False)
            .sign(key, hashes.SHA256()))
    p12 = tmp_path / "hostile.p12"
    p12.write_bytes(pkcs12.serialize_key_and_certificates(b"x", key, cert, None,
                                                          serialization.BestAvailableEncryption(b"password1")))
    agent.run("cert", "import", str(p12), "--password", "password1")  # 1006 import; the task runs after it
    [event] = stdin_events(out)
    assert event["new"]["subject_names"][0] == cn and "a;b|c&d" in event["new"]["subject_names"]
    assert x509.Name.from_rfc4514_string(event["new"]["subject"]) == name
    assert not canary.exists()
    assert stat.S_IMODE(out.stat().st_mode) & 0o002 == 0

