"""Lifecycle events with real processes: a real ``ca serve`` over loopback, agents driven through
the CLI, ``faketime`` to move the agent's clock, ``certpulse events`` to read what was raised.

Every test reads the log through the command a person or a monitoring system would use."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import signal
import socket
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import pkcs12

import pki_factory
from agent_support import Agent, CAProcess, action_for, new_agent, one, sha1_thumbprint, wait_for
from certpulse.pki.keys import PrivateKey
from support import CA, free_port, load_cert


def events(agent: Agent, *args: str) -> list[dict[str, Any]]:
    data: list[dict[str, Any]] = json.loads(agent.run("events", "--json", *args).stdout)
    return data


def ids(found: list[dict[str, Any]]) -> list[tuple[int, str | None]]:
    return [(e["id"], e["action"]) for e in found]


def after(agent: Agent, seq: int) -> list[dict[str, Any]]:
    return [e for e in events(agent) if e["seq"] > seq]


def last_seq(agent: Agent) -> int:
    found = events(agent)
    return int(found[-1]["seq"]) if found else 0


def cert_file(agent: Agent, thumbprint: str) -> x509.Certificate:
    return load_cert((agent.dir / "store" / "certs" / thumbprint / "cert.pem").read_text())


def self_signed(cn: str, days: int, *, start: dt.datetime | None = None) -> tuple[PrivateKey, x509.Certificate]:
    """A certificate of no CA the agent knows: the agent can never renew it, only watch it."""
    issued = pki_factory.self_signed(cn, days=days, start=start)
    assert issued.key is not None
    return issued.key, issued.certificate


def import_p12(agent: Agent, key: ec.EllipticCurvePrivateKey, cert: x509.Certificate, path: Path) -> str:
    path.write_bytes(pkcs12.serialize_key_and_certificates(b"x", key, cert, None,
                                                          serialization.BestAvailableEncryption(b"password1")))
    agent.run("cert", "import", str(path), "--password", "password1")
    return sha1_thumbprint(cert)


# -- enrollment and renewal -------------------------------------------------------------------------


def test_enrollment_raises_1006_and_a_renewal_exactly_one_1001_with_both_certificates(
        pki: CA, ca_url: str, tmp_path: Path) -> None:
    agent = new_agent(pki, ca_url, tmp_path / "agent")
    first = action_for(agent.pulse(), "machine")["new_thumbprint"]
    [new] = events(agent)
    assert (new["id"], new["name"], new["level"], new["action"], new["channel"]) == (
        1006, "new", "info", "enroll", "system")
    assert new["old"] is None and new["new"]["thumbprint"] == first
    cert = cert_file(agent, first)
    facts = new["new"]
    assert facts["sha256"] == hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest().upper()
    assert facts["template"] == "machine" and facts["store"] == "personal"
    assert agent.principal in facts["subject_names"]
    assert any("clientAuth" in eku for eku in facts["ekus"])
    assert dt.datetime.fromisoformat(facts["expiration"]) == cert.not_valid_after_utc
    assert new["uid"] == os.geteuid()

    renewal = agent.pulse(faketime="+330d")
    second = action_for(renewal, "machine")["new_thumbprint"]
    raised = after(agent, new["seq"])
    assert ids(raised) == [(1006, "enroll"), (1001, "renew"), (1005, "cleanup")]
    replace = raised[1]
    assert (replace["old"]["thumbprint"], replace["new"]["thumbprint"]) == (first, second)
    assert replace["old"]["template"] == replace["new"]["template"] == "machine"
    assert raised[2]["old"]["thumbprint"] == first
    assert [e["seq"] for e in raised] == sorted(e["seq"] for e in raised)

    # Nothing left to do (asked at real time: the CA issued by its own clock), nothing raised.
    assert agent.pulse()["actions"] == []
    assert [e["id"] for e in events(agent, "--id", "1001")] == [1001]
    assert events(agent, "--channel", "user") == []
    since = (dt.datetime.fromisoformat(new["time"]) + dt.timedelta(seconds=1)).isoformat()
    assert ids(events(agent, "--since", since)) == ids(raised)
    assert [e["seq"] for e in events(agent, "--limit", "2")] == [e["seq"] for e in raised[1:]]


def test_a_kill_before_the_install_leaves_no_event_and_the_resumed_install_raises_them_once(
        pki: CA, ca_url: str, tmp_path: Path) -> None:
    agent = new_agent(pki, ca_url, tmp_path / "agent")
    first = action_for(agent.pulse(), "machine")["new_thumbprint"]
    marker = agent.dir / "store" / "fault-before-install"
    proc = subprocess.Popen(agent.cmd("agent", "pulse", "--json", faketime="+330d"), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env={**os.environ, "CERTPULSE_FAULT_PAUSE": "before-install:60"})
    try:
        wait_for(lambda: marker.exists() and marker.read_text().strip().isdigit(), 30, "the pause before install")
        os.kill(int(marker.read_text()), signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
    assert ids(events(agent)) == [(1006, "enroll")]  # the CA answered; nothing installed, nothing raised
    agent.pulse()  # resumed: the CA replays its answer (at real time, so nothing else falls due)
    raised = events(agent)[1:]
    assert ids(raised) == [(1006, "enroll"), (1001, "renew"), (1005, "cleanup")]
    assert raised[1]["old"]["thumbprint"] == first


# -- the expiry monitor ----------------------------------------------------------------------------------


def test_expiry_events_once_per_threshold_for_what_the_agent_will_not_renew(
        pki: CA, ca_url: str, tmp_path: Path) -> None:
    agent = new_agent(pki, ca_url, tmp_path / "agent")
    machine = action_for(agent.pulse(), "machine")["new_thumbprint"]
    foreign = import_p12(agent, *self_signed("foreign.example", 100), tmp_path / "foreign.p12")
    extra = tmp_path / "extra"
    extra.mkdir()
    _, watched = self_signed("watched.example", 100)
    (extra / "watched.pem").write_bytes(watched.public_bytes(serialization.Encoding.PEM))
    agent.set_config(additional_stores=[str(extra)])
    start = last_seq(agent)

    agent.pulse(faketime="+85d")  # 15 % of 100 days left
    assert after(agent, start) == []
    agent.pulse(faketime="+91d")
    close = after(agent, start)
    assert {(e["id"], e["old"]["thumbprint"], e["old"]["store"]) for e in close} == {
        (1003, foreign, "personal"), (1003, sha1_thumbprint(watched), str(extra))}
    assert all(e["level"] == "warning" and e["new"] is None for e in close)
    for offset in ("+92d", "+50d", "+91d"):  # again, with the clock set back, and forward again
        agent.pulse(faketime=offset)
    assert after(agent, start) == close

    agent.pulse(faketime="+101d")
    expired = after(agent, close[-1]["seq"])
    assert sorted((e["id"], e["old"]["thumbprint"]) for e in expired) == sorted(
        [(1002, foreign), (1002, sha1_thumbprint(watched))])
    assert all(e["level"] == "error" for e in expired)
    agent.pulse(faketime="+102d")
    agent.pulse(faketime="+95d")
    assert after(agent, start) == close + expired
    # The machine certificate is renewed by the agent itself: never a 1003 or 1002 for it.
    assert not [e for e in events(agent, "--id", "1003", "--id", "1002") if e["old"]["thumbprint"] == machine]


def test_with_autoenrollment_off_the_machine_certificate_gets_its_warning(
        pki: CA, ca_url: str, tmp_path: Path) -> None:
    agent = new_agent(pki, ca_url, tmp_path / "agent")
    machine = action_for(agent.pulse(), "machine")["new_thumbprint"]
    agent.set_config(enroll=False, manage=False)
    start = last_seq(agent)
    result = agent.pulse(faketime="+330d")  # 35 of 365 days left: under 10 %
    assert result["actions"] == []
    [warning] = after(agent, start)
    assert (warning["id"], warning["old"]["thumbprint"], warning["old"]["template"]) == (1003, machine, "machine")


# -- what a person does -----------------------------------------------------------------------------------


def test_import_export_replace_move_and_delete_raise_their_events(pki: CA, ca_url: str, tmp_path: Path) -> None:
    agent = new_agent(pki, ca_url, tmp_path / "agent")
    machine = action_for(agent.pulse(), "machine")["new_thumbprint"]
    start = last_seq(agent)
    imported = import_p12(agent, *self_signed("imported.example", 300), tmp_path / "in.p12")
    assert ids(after(agent, start)) == [(1006, "import")]

    agent.run("cert", "export", machine, "--pem", str(tmp_path / "public.pem"))
    assert ids(after(agent, start)) == [(1006, "import")]  # no key, no event
    agent.run("cert", "export", machine, "--p12", str(tmp_path / "out.p12"), "--password", "password1")
    exported = after(agent, start)[-1]
    assert (exported["id"], exported["old"]["thumbprint"]) == (1007, machine)

    agent.run("cert", "replace", machine, imported)
    replaced = after(agent, exported["seq"])
    assert ids(replaced) == [(1001, "replace"), (1005, "replace")]
    assert (replaced[0]["old"]["thumbprint"], replaced[0]["new"]["thumbprint"]) == (machine, imported)

    other = new_agent(pki, ca_url, tmp_path / "other")
    agent.run("cert", "move", imported, "--to", str(other.dir))
    moved_here = after(agent, replaced[-1]["seq"])
    assert ids(moved_here) == [(1004, "move")]
    arrived = one([e for e in events(other) if e["id"] == 1006], "1006 in the target")
    assert (arrived["action"], arrived["new"]["thumbprint"]) == ("move_or_copy", imported)

    agent.run("cert", "delete", machine)
    deleted = after(agent, moved_here[-1]["seq"])
    assert ids(deleted) == [(1004, "manual")] and deleted[0]["old"]["thumbprint"] == machine


# -- failures --------------------------------------------------------------------------------------------


def test_a_denied_request_raises_1102_and_a_stale_one_1101(pki: CA, ca_url: str, tmp_path: Path) -> None:
    agent = new_agent(pki, ca_url, tmp_path / "agent", "approvers")
    pending = action_for(agent.pulse(), "approval-required")
    assert pending["outcome"] == "pending"
    request_id = one(agent.status()["pending"], "pending request")["request_id"]
    pki.cli("request", "deny", str(request_id), "--reason", "not this one")
    start = last_seq(agent)
    agent.pulse()
    [denied] = [e for e in after(agent, start) if e["id"] == 1102]
    assert (denied["name"], denied["template"], denied["data"]["request_id"]) == (
        "request-denied", "approval-required", request_id)
    assert "denied" in denied["detail"]
    assert not [e for e in after(agent, start) if e["id"] == 1100]  # the denial is its own event

    # The next pulse makes a new request; 61 days later it is dropped, with its event.
    assert action_for(agent.pulse(), "approval-required")["outcome"] == "pending"
    agent.pulse(faketime="+61d")
    [dropped] = [e for e in after(agent, denied["seq"]) if e["id"] == 1101]
    assert (dropped["name"], dropped["template"]) == ("pending-dropped", "approval-required")


def test_a_renewal_that_fails_raises_1100_once_until_it_succeeds(pki: CA, tmp_path: Path) -> None:
    server = CAProcess(pki, free_port())
    server.start()
    try:
        agent = new_agent(pki, server.url, tmp_path / "agent")
        old = action_for(agent.pulse(), "machine")["new_thumbprint"]
        server.stop()
        start = last_seq(agent)
        agent.pulse(faketime="+330d", ok=False)
        agent.pulse(faketime="+331d", ok=False)
        [failed] = after(agent, start)
        assert (failed["id"], failed["name"], failed["action"], failed["old"]["thumbprint"]) == (
            1100, "renewal-failed", "renew", old)
        assert failed["detail"].startswith("unavailable:") and failed["data"]["cause"] == "unavailable"
        server.start()
        agent.pulse()  # the kept request is resent and answered
        assert [e["id"] for e in after(agent, failed["seq"])] == [1006, 1001, 1005]
    finally:
        server.stop()


# -- reading the log -----------------------------------------------------------------------------------------


def test_events_follow_prints_each_new_event_as_a_json_line(pki: CA, ca_url: str, tmp_path: Path) -> None:
    agent = new_agent(pki, ca_url, tmp_path / "agent")
    follower = subprocess.Popen(agent.cmd("events", "--follow", "--json"), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        wait_for(lambda: (agent.dir / "store" / "meta.db").exists(), 10, "the store")
        agent.pulse()
        line = follower.stdout.readline() if follower.stdout else ""
        event = json.loads(line)
        assert (event["id"], event["action"]) == (1006, "enroll")
    finally:
        # SIGTERM ends it at once whatever it is doing (a SIGINT is ignored by a child that inherits
        # an ignored SIGINT, and waits for the interpreter to reach a check); a loaded machine may
        # still take a while to schedule it.
        os.killpg(follower.pid, signal.SIGTERM)
        follower.wait(timeout=60)
    assert "Traceback" not in (follower.stderr.read() if follower.stderr else "")


def test_events_refuses_bad_arguments_in_one_line(pki: CA, ca_url: str, tmp_path: Path) -> None:
    agent = new_agent(pki, ca_url, tmp_path / "agent")
    for args, reason in ((("--channel", "kernel"), "invalid-argument"), (("--since", "yesterday"), "invalid-argument")):
        result = agent.run("events", *args, check=False)
        assert result.returncode == 2 and result.stderr.startswith(f"certpulse: error: {reason}:"), result.stderr
        assert len(result.stderr.strip().splitlines()) == 1


def test_events_go_to_syslog_when_asked(pki: CA, ca_url: str, tmp_path: Path) -> None:
    folder = Path(tempfile.mkdtemp(prefix="cp-syslog-", dir="/tmp"))  # a socket path must be short
    address = folder / "log"
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    receiver.bind(str(address))
    receiver.settimeout(10)
    try:
        agent = new_agent(pki, ca_url, tmp_path / "agent")
        agent.set_config(syslog=True, syslog_address=str(address), syslog_facility="local3")
        thumb = action_for(agent.pulse(), "machine")["new_thumbprint"]
        message = receiver.recv(65536).decode()
        assert message.startswith(f"<{19 * 8 + 6}>")  # local3.info
        assert "1006 new" in message and f"new={thumb}" in message and "action=enroll" in message
    finally:
        receiver.close()
        address.unlink(missing_ok=True)
        folder.rmdir()
