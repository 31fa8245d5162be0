"""The agent as real processes against a real CA over loopback.

Enrollment from nothing, renewal at the threshold (real waiting for a 20-second template, and
``faketime`` for a 365-day one), approval of pending requests, forced re-enrollment, a CA that
goes away, SIGKILL in the middle of a renewal, the daemon and its signals, a server that lies,
manually enrolled certificates, PKCS#12 round trips, and the agent/CA import boundary.

The CA always runs on SQLite here (its database backends are covered elsewhere). Its
``approval-required`` and ``encryption`` templates are changed to autoenroll only for the groups
``approvers`` and ``encrypters``, so that each agent sees exactly the templates its test is
about: every machine principal would otherwise enroll for all of them at every pulse.

``faketime`` moves the *agent's* clock only; the CA keeps real time, so a certificate it issues
is always fresh by the CA's clock. After a renewal under ``faketime +330d`` the new certificate
has 35 days left by the agent's clock, so whether a pulse "right after" plans nothing is asked
at real time, the clock the two sides share in production.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import signal
import stat
import subprocess
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import pkcs12

from agent_support import (
    SHORT_TEMPLATE,
    Agent,
    CAProcess,
    action_for,
    assert_renewed,
    ca_requests,
    check_version_folder,
    issued,
    long_lived_tls,
    new_agent,
    one,
    one_line_error,
    public_der,
    root_context,
    sha1_thumbprint,
    wait_for,
)
from hostile_proxy import HostileProxy
from support import (
    CA,
    TEMPLATES,
    Client,
    free_port,
    load_cert,
    run_cli,
    serve,
)

# -- fixtures -----------------------------------------------------------------------------------

@pytest.fixture
def agent(pki: CA, ca_url: str, tmp_path: Path) -> Agent:
    """A fresh machine principal in no extra group: only the ``machine`` template applies."""
    return new_agent(pki, ca_url, tmp_path / "agent")


@pytest.fixture
def enrolled(agent: Agent) -> tuple[Agent, str]:
    """An agent that has pulsed once: it holds a ``machine`` certificate (thumbprint returned)."""
    result = agent.pulse()
    action = action_for(result, "machine")
    assert action["outcome"] == "done" and action["rule"] == "6b:missing", action
    return agent, str(action["new_thumbprint"])


# -- 1. enrollment from nothing -----------------------------------------------------------------

def test_first_pulse_enrolls_machine_and_encryption_and_leaves_approval_pending(
        pki: CA, ca_url: str, tmp_path: Path) -> None:
    agent = new_agent(pki, ca_url, tmp_path / "agent", "approvers", "encrypters")
    status = agent.status()
    assert status["last_pulse"] is None and status["certificates"] == [] and status["pending"] == []

    result = agent.pulse()
    assert sorted(a["template"] for a in result["actions"]) == ["approval-required", "encryption", "machine"]
    assert all(a["kind"] == "enroll" and a["rule"] == "6b:missing" for a in result["actions"]), result
    machine, encryption = action_for(result, "machine"), action_for(result, "encryption")
    pending = action_for(result, "approval-required")
    assert machine["outcome"] == "done" and encryption["outcome"] == "done"
    assert pending["outcome"] == "pending" and "new_thumbprint" not in pending, pending

    records = agent.certs(all_=True)
    by_template = {r["template_name"]: r for r in records}
    assert {t: r["thumbprint"] for t, r in by_template.items()} == {
        "machine": machine["new_thumbprint"], "encryption": encryption["new_thumbprint"]}
    for record in records:
        assert record["source"] == "auto" and record["archived"] is False and record["has_key"] is True
        assert record["subject"] == f"CN={agent.principal}", record
        assert record["names"] == [agent.principal]
        assert record["major_version"] == 1

    store = agent.dir / "store"
    folders = sorted(p for p in (store / "certs").iterdir() if not p.name.startswith("."))
    assert [p.name for p in folders] == sorted(r["thumbprint"] for r in records)
    for folder in folders:
        check_version_folder(pki, folder)  # every key 0600 and with its certificate
    for template in ("machine", "encryption"):
        folder = agent.live(template)
        assert folder.name == by_template[template]["thumbprint"]
        cert = check_version_folder(pki, folder)
        assert cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value == agent.principal
    encryption_key = serialization.load_pem_private_key((agent.live("encryption") / "key.pem").read_bytes(), None)
    assert isinstance(encryption_key, rsa.RSAPrivateKey)  # the template's default key type
    assert not (store / "live" / "approval-required").exists()

    status = agent.status()
    assert status["last_pulse"]["outcome"] == "ok"
    waiting = one(status["pending"], "pending request")
    assert waiting["template"] == "approval-required" and waiting["status"] == "pending"
    at_ca = one([r for r in ca_requests(pki) if r["id"] == waiting["request_id"]], "CA request")
    assert at_ca["status"] == "pending" and at_ca["requester"] == f"principal:{agent.principal}"

    # Nothing else to do: the only step left is asking about the pending request.
    plan = agent.plan()
    assert [(a["kind"], a["rule"], a["template"]) for a in plan["actions"]] == [
        ("poll-pending", "5:poll", "approval-required")]


# -- 2. renewal at the threshold ----------------------------------------------------------------

def test_short_lived_certificate_is_renewed_after_eighty_percent_of_its_life(
        pki: CA, ca_url: str, tmp_path: Path) -> None:
    """A one-hour certificate whose renewal period (2 h) is longer than 20 % of its life is renewed
    at the 80 % mark (48 min), not before. The agent's clock is moved with faketime: each side of
    the threshold has minutes of room, so a slow machine cannot push a pulse across it."""
    agent = new_agent(pki, ca_url, tmp_path / "agent", "shortlived")
    first = agent.pulse()
    short = action_for(first, "short")
    assert short["outcome"] == "done"
    old = load_cert((agent.dir / "store" / "certs" / short["new_thumbprint"] / "cert.pem").read_text())
    assert old.not_valid_after_utc - old.not_valid_before_utc == dt.timedelta(minutes=60, seconds=-1)

    assert agent.plan(faketime="+44m")["actions"] == [], "planned before the threshold"
    result = agent.pulse(faketime="+52m")  # past 80 % (48 min), well before the end (60 min)
    assert [a["template"] for a in result["actions"]] == ["short"], result
    new, records = assert_renewed(agent, result, "short", short["new_thumbprint"], "6a:threshold")
    machine = one([r for r in records.values() if r["template_name"] == "machine"], "machine certificate")
    assert machine["thumbprint"] == action_for(first, "machine")["new_thumbprint"] and not machine["archived"]
    assert agent.plan()["actions"] == [], f"renewed {new}, yet more is planned"


def test_machine_certificate_is_renewed_under_faketime_past_its_threshold(enrolled: tuple[Agent, str]) -> None:
    agent, old = enrolled
    # 365 days, renewal period 6 weeks (shorter than 20 %): due with 42 days left, i.e. after day 323.
    assert agent.plan(faketime="+320d")["actions"] == []
    result = agent.pulse(faketime="+330d")
    assert [a["template"] for a in result["actions"]] == ["machine"], result
    assert action_for(result, "machine")["kind"] == "renew"
    assert_renewed(agent, result, "machine", old, "6a:threshold")
    assert agent.plan()["actions"] == []


# -- 3. pending request approved -----------------------------------------------------------------

def test_pending_request_is_installed_after_the_ca_manager_approves_it(
        pki: CA, ca_url: str, tmp_path: Path) -> None:
    agent = new_agent(pki, ca_url, tmp_path / "agent", "approvers")
    first = agent.pulse()
    assert action_for(first, "approval-required")["outcome"] == "pending"
    request_id = one(agent.status()["pending"], "pending request")["request_id"]

    again = agent.pulse()  # still pending: kept and asked about, no second request, nothing installed
    poll = action_for(again, "approval-required")
    assert (poll["kind"], poll["rule"], poll["outcome"], poll["request_id"]) == (
        "poll-pending", "5:poll", "pending", request_id), poll
    assert not (agent.dir / "store" / "live" / "approval-required").exists()

    pki.cli("request", "approve", str(request_id))
    result = agent.pulse()
    poll = action_for(result, "approval-required")
    assert (poll["kind"], poll["rule"], poll["outcome"], poll["request_id"]) == (
        "poll-pending", "5:poll", "done", request_id), poll
    installed = one([c for c in agent.certs() if c["template_name"] == "approval-required"], "approved cert")
    assert installed["thumbprint"] == poll["new_thumbprint"] and installed["source"] == "auto"
    assert agent.live("approval-required").name == installed["thumbprint"]
    check_version_folder(pki, agent.live("approval-required"))
    assert not any((agent.dir / "store" / "flights").iterdir())
    assert agent.plan()["actions"] == []  # no request left to ask about


# -- 4. re-enroll all holders ---------------------------------------------------------------------

def test_reenroll_all_makes_the_next_pulse_renew_early(tmp_path: Path) -> None:
    # A CA of its own (the machine template's version changes), with just that template.
    directory = tmp_path / "ca"
    out = run_cli("ca", "init", "--dir", str(directory), "--database", f"sqlite:///{directory}/ca.db")
    ca = CA(directory, next(w for w in out.stdout.split() if w.startswith("cpa_")), f"sqlite:///{directory}/ca.db")
    ca.cli("template", "add", str(TEMPLATES / "machine.toml"))
    long_lived_tls(ca)
    with serve(ca, tls=True) as url:
        agent = new_agent(ca, url, tmp_path / "agent")
        first = agent.pulse()
        old = str(action_for(first, "machine")["new_thumbprint"])
        assert agent.plan()["actions"] == []

        ca.cli("template", "reenroll-all", "machine")
        result = agent.pulse()
        assert action_for(result, "machine")["kind"] == "renew"
        new, records = assert_renewed(agent, result, "machine", old, "6a:major-version")
        assert (records[old]["major_version"], records[old]["minor_version"]) == (1, 0)
        assert (records[new]["major_version"], records[new]["minor_version"]) == (2, 0)
        assert agent.plan()["actions"] == []


def test_a_policy_cached_by_a_clock_that_later_stepped_back_is_refreshed(
        pki: CA, ca_url: str, tmp_path: Path) -> None:
    """The policy cache is keyed on the agent's clock; a clock that was ahead (then corrected, as
    NTP does) must not make a cached policy look fresh for as long as the clock was wrong."""
    group = f"late-{uuid.uuid4().hex[:8]}"
    agent = new_agent(pki, ca_url, tmp_path / "agent", group)
    agent.pulse(faketime="+2d")  # enrolls machine; caches the policy as fetched two days from now
    template = tmp_path / "late.toml"
    name = f"late-{uuid.uuid4().hex[:8]}"
    template.write_text(SHORT_TEMPLATE.replace('name = "short"', f'name = "{name}"')
                        .replace('validity = "1h"', 'validity = "30d"').replace("shortlived", group))
    pki.cli("template", "add", str(template))
    result = agent.pulse()  # real time again: the policy is re-read and the new template enrolled
    enrolled = action_for(result, name)
    assert (enrolled["rule"], enrolled["outcome"]) == ("6b:missing", "done"), enrolled


# -- 5. the CA goes away ------------------------------------------------------------------------------

def test_pulse_fails_while_the_ca_is_down_and_recovers_when_it_is_back(
        pki: CA, tmp_path: Path) -> None:
    server = CAProcess(pki, free_port())
    server.start()
    try:
        agent = new_agent(pki, server.url, tmp_path / "agent")
        server.stop()

        # Before the first pulse: no policy, nothing to enroll with.
        down = agent.pulse(ok=False)
        assert "no policy server answered" in down["error"], down
        status = agent.status()
        assert status["last_pulse"]["outcome"] == "failed" and status["certificates"] == []

        server.start()  # the same port
        up = agent.pulse()
        old = action_for(up, "machine")["new_thumbprint"]
        counts = issued(pki, agent.principal, "machine")

        # A renewal is due and the CA is down: the request is kept (key and idempotency key) to
        # be resent, and the certificate in place stays.
        server.stop()
        before = agent.certs(all_=True)
        down = agent.pulse(faketime="+330d", ok=False)
        renew = action_for(down, "machine")
        assert (renew["kind"], renew["outcome"]) == ("renew", "unavailable"), renew
        assert down["error"] and down["retry_after"] is None
        # Still down at the next pulse: the kept request is retried; no second request is made.
        down = agent.pulse(faketime="+330d", ok=False)
        assert [(a["rule"], a["outcome"]) for a in down["actions"] if a["outcome"] != "skipped"] == [
            ("resume", "unavailable")], down
        assert agent.certs(all_=True) == before
        assert agent.live("machine").name == old
        check_version_folder(pki, agent.live("machine"))
        status = agent.status()
        assert status["last_pulse"]["outcome"] == "failed"
        kept = one(status["pending"], "kept request")
        assert (kept["template"], kept["status"]) == ("machine", "created")

        server.start()
        up = agent.pulse()
        _, records = assert_renewed(agent, up, "machine", old, "resume")
        assert len(records) == 2
        assert agent.status()["last_pulse"]["outcome"] == "ok"
        assert issued(pki, agent.principal, "machine") == {**counts, "renewal": counts["renewal"] + 1}
        assert agent.plan()["actions"] == []
    finally:
        server.stop()


# -- 6. SIGKILL in the middle of a renewal ---------------------------------------------------------------

@pytest.mark.parametrize("point", ["before-install", "before-link"])
def test_sigkill_during_a_renewal_leaves_a_consistent_store_and_one_certificate(
        enrolled: tuple[Agent, str], point: str) -> None:
    agent, old = enrolled
    before = issued(agent.ca, agent.principal, "machine")
    once_more = {**before, "renewal": before["renewal"] + 1}
    marker = agent.dir / "store" / f"fault-{point}"
    with (agent.dir.parent / f"killed-{point}.log").open("w") as log:
        proc = subprocess.Popen(agent.cmd("agent", "pulse", "--json", faketime="+330d"), stdout=log,
                                stderr=subprocess.STDOUT,
                                env={**os.environ, "CERTPULSE_FAULT_PAUSE": f"{point}:60"})
    try:
        def paused() -> bool:
            assert proc.poll() is None, f"the agent exited ({proc.returncode}) before reaching {point}"
            return marker.exists() and marker.read_text().strip().isdigit()

        wait_for(paused, 30, f"the agent to pause at {point}")
        os.kill(int(marker.read_text()), signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
    assert proc.returncode != 0
    marker.unlink()
    assert issued(agent.ca, agent.principal, "machine") == once_more  # the CA answered before the kill
    answered_at = max(dt.datetime.fromisoformat(r["decided_at"]) for r in ca_requests(agent.ca)
                      if r["requester"] == f"principal:{agent.principal}" and r["status"] == "issued")

    # Consistent right after the kill: the store lists, and the live link names a whole pair.
    records = {c["thumbprint"]: c for c in agent.certs(all_=True)}
    live = agent.live("machine")
    check_version_folder(agent.ca, live)
    status = agent.status()
    if point == "before-install":
        assert list(records) == [old] and records[old]["archived"] is False
        assert live.name == old
        flight = one(status["pending"], "request in flight")
        assert (flight["template"], flight["status"]) == ("machine", "created")
    else:
        new = one([c for c in records.values() if c["thumbprint"] != old], "new certificate")["thumbprint"]
        assert records[old]["archived"] is True and records[old]["replaced_by"] == new
        assert live.name in (old, new)  # the link is repaired at the next pulse
        assert status["pending"] == []

    # before-install: the resent request is answered with the certificate issued before the kill. The
    # agent's clock is set back to before that, so that the resumed certificate starts after this
    # pulse's "now" (as it does whenever the CA issues it in a later second than the pulse started).
    behind = int((dt.datetime.now(dt.UTC) - answered_at).total_seconds()) + 2
    result = agent.pulse(faketime=f"-{behind}s" if point == "before-install" else None)
    if point == "before-install":
        assert all(a["outcome"] == "skipped" for a in result["actions"] if a["rule"] != "resume"), result
    if point == "before-install":
        new, records = assert_renewed(agent, result, "machine", old, "resume")
    else:
        assert result["actions"] == [], result
        records = {c["thumbprint"]: c for c in agent.certs(all_=True)}
        assert set(records) == {old, new}
        assert records[old]["archived"] is True and records[old]["replaced_by"] == new
        assert records[new]["archived"] is False
        assert agent.live("machine").name == new
        check_version_folder(agent.ca, agent.live("machine"))
    assert set(records) == {old, new}
    # Exactly one certificate for this renewal: the resent request reused its idempotency key, and
    # nothing new was requested beside it.
    assert issued(agent.ca, agent.principal, "machine") == once_more
    plan = agent.plan()
    assert plan["actions"] == []


# -- 7. the daemon ----------------------------------------------------------------------------------------

def test_daemon_pulses_at_start_on_sighup_and_on_agent_pulse_and_stops_on_sigterm(
        agent: Agent, tmp_path: Path) -> None:
    log_path = tmp_path / "daemon.log"
    with log_path.open("w") as log:
        daemon = subprocess.Popen(agent.cmd("agent", "run"), stdout=log, stderr=subprocess.STDOUT)

    def pulses_logged(count: int) -> Callable[[], bool]:
        def check() -> bool:
            assert daemon.poll() is None, f"the daemon exited ({daemon.returncode}): {log_path.read_text()}"
            return sum(1 for line in log_path.read_text().splitlines() if " pulse " in line) >= count
        return check

    try:
        wait_for(pulses_logged(1), 30, "the pulse at start")
        status = agent.status()
        first = status["last_pulse"]
        assert first["outcome"] == "ok" and action_for(first, "machine")["outcome"] == "done"
        assert status["daemon_pid"] == daemon.pid and status["next_pulse"] is not None
        assert [c["template_name"] for c in status["certificates"]] == ["machine"]

        second = agent.run("agent", "run", check=False, timeout=30)
        assert str(daemon.pid) in one_line_error(second, "conflict")
        assert daemon.poll() is None

        time.sleep(1.1)  # pulse times have whole seconds
        os.kill(daemon.pid, signal.SIGHUP)
        wait_for(pulses_logged(2), 30, "a pulse after SIGHUP")
        after_hup = agent.status()["last_pulse"]
        assert after_hup["started_at"] > first["started_at"], (first, after_hup)
        assert after_hup["outcome"] == "ok" and after_hup["actions"] == []

        time.sleep(1.1)
        asked = agent.run("agent", "pulse")
        assert f"asked the running agent (pid {daemon.pid}) to pulse now" in asked.stdout
        wait_for(pulses_logged(3), 30, "a pulse after 'agent pulse'")
        assert agent.status()["last_pulse"]["started_at"] > after_hup["started_at"]
        assert daemon.poll() is None
    finally:
        if daemon.poll() is None:
            daemon.send_signal(signal.SIGTERM)
        try:
            code = daemon.wait(timeout=15)
        except subprocess.TimeoutExpired:
            daemon.kill()
            daemon.wait(timeout=10)
            raise
    assert code == 0, log_path.read_text()
    assert "Traceback" not in log_path.read_text()
    assert agent.status()["daemon_pid"] is None


# -- 8. a server that lies --------------------------------------------------------------------------------

def _certificate(subject_cn: str, public_key: Any, signing_key: Any, issuer: x509.Name, *,
                 template_from: x509.Certificate | None = None, sans: list[str] | None = None) -> str:
    """A certificate built by hand; extensions (the template's included) and validity copied from
    ``template_from`` (a start before the issuing CA's own would fail validation for that reason)."""
    now = dt.datetime.now(dt.UTC)
    start = template_from.not_valid_before_utc if template_from else now - dt.timedelta(minutes=1)
    builder = (x509.CertificateBuilder()
               .subject_name(x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, subject_cn)]))
               .issuer_name(issuer).public_key(public_key).serial_number(x509.random_serial_number())
               .not_valid_before(start).not_valid_after(now + dt.timedelta(days=365)))
    if template_from is not None:
        for extension in template_from.extensions:
            if not isinstance(extension.value, x509.SubjectAlternativeName):
                builder = builder.add_extension(extension.value, extension.critical)
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in sans]), critical=False)
    return builder.sign(signing_key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM).decode()


def test_the_agent_refuses_certificates_it_did_not_ask_for(pki: CA, ca_url: str, tmp_path: Path) -> None:
    with HostileProxy.running(ca_url, root_context(pki)) as proxy:
        agent = new_agent(pki, proxy.url, tmp_path / "agent")
        _refuses_lies(pki, ca_url, agent, proxy)


def _refuses_lies(pki: CA, ca_url: str, agent: Agent, proxy: HostileProxy) -> None:
    principal = agent.principal
    other_name = f"other-{uuid.uuid4().hex[:8]}.example.internal"
    verify = root_context(pki)  # the CA serves TLS: this test's own client pins its root too
    credential = httpx.post(f"{ca_url}/v1/tokens/exchange", json={"token": pki.add_principal(other_name)},
                            timeout=30, verify=verify).json()["credential"]
    _, other = Client(ca_url, credential, verify=verify).enroll("machine")
    issuer_key = serialization.load_pem_private_key((pki.dir / "keys" / "issuer-issuing-1.key").read_bytes(), None)
    rogue_key = ec.generate_private_key(ec.SECP256R1())

    def another_principals_certificate(sent: dict[str, Any], answer: dict[str, Any]) -> dict[str, Any]:
        return {**answer, "certificate": other["certificate"], "chain": other["chain"]}

    def self_signed(sent: dict[str, Any], answer: dict[str, Any]) -> dict[str, Any]:
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, principal)])
        return {**answer, "certificate": _certificate(principal, key.public_key(), key, name,
                                                      template_from=load_cert(answer["certificate"]),
                                                      sans=[principal]), "chain": []}

    def rogue_issuer(sent: dict[str, Any], answer: dict[str, Any]) -> dict[str, Any]:
        # The right key, the right names, the issuing CA's name, but not its signature.
        real = load_cert(answer["certificate"])
        return {**answer, "certificate": _certificate(principal, real.public_key(), rogue_key, real.issuer,
                                                      template_from=real, sans=[principal])}

    def another_principals_name(sent: dict[str, Any], answer: dict[str, Any]) -> dict[str, Any]:
        # Signed by the real issuing key, for the key the agent generated, naming someone else.
        real = load_cert(answer["certificate"])
        csr = x509.load_pem_x509_csr(sent["csr"].encode())
        assert public_der(csr) == public_der(real)
        return {**answer, "certificate": _certificate(other_name, csr.public_key(), issuer_key, real.issuer,
                                                      template_from=real, sans=[other_name])}

    cases: list[tuple[Callable[[dict[str, Any], dict[str, Any]], dict[str, Any]], str]] = [
        (another_principals_certificate, "it does not hold the key this agent generated"),
        (self_signed, "it does not hold the key this agent generated"),
        (rogue_issuer, "it does not chain to a pinned root"),
        (another_principals_name, "not this principal"),
    ]
    old = str(action_for(agent.pulse(), "machine")["new_thumbprint"])
    before = agent.certs(all_=True)
    for rewrite, why in cases:
        proxy.rewrite_issued = rewrite
        rewritten = proxy.rewritten
        result = agent.pulse(faketime="+330d", ok=None)
        assert proxy.rewritten == rewritten + 1, rewrite.__name__
        refused = action_for(result, "machine")
        assert (refused["kind"], refused["outcome"]) == ("renew", "refused"), (rewrite.__name__, refused)
        assert refused["outcome_detail"].startswith("certificate refused:"), refused
        assert why in refused["outcome_detail"], (rewrite.__name__, refused)
        assert "new_thumbprint" not in refused
        assert agent.certs(all_=True) == before, rewrite.__name__
        assert agent.live("machine").name == old
        check_version_folder(pki, agent.live("machine"))
        assert not any((agent.dir / "store" / "flights").iterdir()), "the refused request's key was kept"

    # The same path with an honest answer: the renewal goes through.
    proxy.rewrite_issued = None
    assert_renewed(agent, agent.pulse(faketime="+330d"), "machine", old, "6a:threshold")


def test_503_with_retry_after_fails_the_pulse_and_reports_the_delay(
        pki: CA, ca_url: str, tmp_path: Path) -> None:
    with HostileProxy.running(ca_url, root_context(pki)) as proxy:
        agent = new_agent(pki, proxy.url, tmp_path / "agent")
        proxy.busy_retry_after = 120
        first = agent.pulse(ok=False)  # no policy yet
        assert first["retry_after"] == 120, first
        assert agent.certs(all_=True) == []
        assert agent.status()["last_pulse"]["retry_after"] == 120

        proxy.busy_retry_after = None
        old = str(action_for(agent.pulse(), "machine")["new_thumbprint"])
        before = agent.certs(all_=True)

        proxy.busy_retry_after = 120  # a renewal is due; the cached policy is used, the request is not taken
        seen = proxy.requests_to("POST", "/v1/requests")
        busy = agent.pulse(faketime="+330d", ok=False)
        assert busy["retry_after"] == 120, busy
        renew = action_for(busy, "machine")
        assert (renew["kind"], renew["outcome"]) == ("renew", "unavailable"), renew
        assert proxy.requests_to("POST", "/v1/requests") == seen + 1
        assert agent.certs(all_=True) == before
        assert agent.live("machine").name == old
        assert agent.status()["last_pulse"]["retry_after"] == 120


# -- 9. manually enrolled certificates ----------------------------------------------------------------------

def _manual_webserver(pki: CA, ca_url: str, directory: Path) -> tuple[Agent, dict[str, Any]]:
    agent = new_agent(pki, ca_url, directory, "webservers")
    first = agent.pulse()
    assert [a["template"] for a in first["actions"]] == ["machine"]
    assert any(n["rule"] == "6b:subject-required" and n["template"] == "webserver" for n in first["notes"]), first
    out = agent.run("cert", "request", "--template", "webserver", "--san", "dns:www.example.internal", "--json")
    outcome = json.loads(out.stdout)
    assert outcome["outcome"] == "done", outcome
    record = agent.current("webserver")
    assert record["thumbprint"] == outcome["new_thumbprint"]
    assert record["source"] == "manual" and record["names"] == ["www.example.internal"], record
    assert agent.live("webserver").name == record["thumbprint"]
    check_version_folder(pki, agent.live("webserver"))
    assert agent.plan()["actions"] == []
    return agent, record


def _newest_request(pki: CA, agent: Agent, template: str) -> dict[str, Any]:
    rows = [r for r in ca_requests(pki) if r["requester"] == f"principal:{agent.principal}"
            and r["template"] == template]
    return max(rows, key=lambda r: int(r["id"]))


def test_manual_certificate_is_renewed_past_its_threshold(pki: CA, ca_url: str, tmp_path: Path) -> None:
    agent, old = _manual_webserver(pki, ca_url, tmp_path / "agent")
    # 90 days, renewal period 30 days: 20 % of the life (18 days) is shorter, so due after day 72.
    assert agent.plan(faketime="+70d")["actions"] == []
    result = agent.pulse(faketime="+75d")
    assert [a["template"] for a in result["actions"]] == ["webserver"], result
    renewal = action_for(result, "webserver")
    assert renewal["kind"] == "renew-manual" and "new_request" not in renewal, renewal
    new, records = assert_renewed(agent, result, "webserver", old["thumbprint"], "6c:threshold")
    record = records[new]
    assert record["source"] == "manual" and record["names"] == old["names"]
    at_ca = _newest_request(pki, agent, "webserver")
    assert (at_ca["kind"], at_ca["status"]) == ("renewal", "issued"), at_ca


def test_expired_manual_certificate_gets_a_new_request_from_its_subject(
        pki: CA, ca_url: str, tmp_path: Path) -> None:
    agent, old = _manual_webserver(pki, ca_url, tmp_path / "agent")
    result = agent.pulse(faketime="+100d")
    assert [a["template"] for a in result["actions"]] == ["webserver"], result
    fresh = action_for(result, "webserver")
    assert fresh["kind"] == "renew-manual" and fresh["new_request"] is True, fresh
    assert fresh["subject_from"] == old["thumbprint"]
    new, records = assert_renewed(agent, result, "webserver", old["thumbprint"], "6c:expired")
    record = records[new]
    assert record["source"] == "manual" and record["names"] == old["names"]
    at_ca = _newest_request(pki, agent, "webserver")
    assert (at_ca["kind"], at_ca["status"], at_ca["names"]) == ("new", "issued", old["names"]), at_ca


# -- 10. PKCS#12 round trip and thumbprint prefixes -----------------------------------------------------------

def _cert_with_prefix(prefix: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A self-signed certificate whose SHA-1 thumbprint starts with ``prefix`` (found by trying)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "prefix-twin")])
    now = dt.datetime.now(dt.UTC)
    for _ in range(20_000):
        cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
                .serial_number(x509.random_serial_number()).not_valid_before(now)
                .not_valid_after(now + dt.timedelta(days=30)).sign(key, hashes.SHA256()))
        if sha1_thumbprint(cert).startswith(prefix):
            return key, cert
    raise AssertionError(f"no certificate with thumbprint prefix {prefix} in 20000 tries")


def test_export_delete_import_round_trip_and_thumbprint_prefixes(
        enrolled: tuple[Agent, str], tmp_path: Path) -> None:
    agent, thumbprint = enrolled
    original = agent.current("machine")
    p12 = tmp_path / "machine.p12"
    password = "correct horse battery"
    agent.run("cert", "export", thumbprint[:8].lower(), "--p12", str(p12), "--password", password)
    assert stat.S_IMODE(p12.stat().st_mode) == 0o600
    key, cert, _ = pkcs12.load_key_and_certificates(p12.read_bytes(), password.encode())
    assert cert is not None and key is not None and sha1_thumbprint(cert) == thumbprint
    assert public_der(key) == public_der(cert)

    agent.run("cert", "delete", thumbprint[:10])
    assert agent.certs(all_=True) == []
    assert not (agent.dir / "store" / "live" / "machine").exists()
    assert not (agent.dir / "store" / "certs" / thumbprint).exists()

    imported = agent.run("cert", "import", str(p12), "--password", password)
    assert thumbprint in imported.stdout
    record = one(agent.certs(all_=True), "imported certificate")
    assert record["thumbprint"] == thumbprint and record["source"] == "manual"
    for field in ("not_before", "not_after", "subject", "serial", "sha256", "template_oid", "major_version"):
        assert record[field] == original[field], field
    assert agent.live("machine").name == thumbprint
    check_version_folder(agent.ca, agent.live("machine"))

    # Prefixes: any case, colons allowed.
    colons = ":".join(thumbprint[i:i + 2] for i in range(0, 12, 2)).lower()
    for prefix in (thumbprint[:6], colons):
        shown = json.loads(agent.run("cert", "show", prefix, "--json").stdout)
        assert shown["thumbprint"] == thumbprint, prefix
    unknown = next(p for p in (f"{i:04X}" for i in range(65536)) if not thumbprint.startswith(p))
    line = one_line_error(agent.run("cert", "show", unknown, check=False), "not-found")
    assert unknown in line

    twin_key, twin = _cert_with_prefix(thumbprint[:2])
    twin_p12 = tmp_path / "twin.p12"
    twin_p12.write_bytes(pkcs12.serialize_key_and_certificates(
        b"twin", twin_key, twin, None, serialization.BestAvailableEncryption(password.encode())))
    agent.run("cert", "import", str(twin_p12), "--password", password)
    line = one_line_error(agent.run("cert", "show", thumbprint[:2], check=False), "invalid-argument")
    assert "matches 2" in line
    one_line_error(agent.run("cert", "delete", thumbprint[:2], check=False), "invalid-argument")
    assert len(agent.certs(all_=True)) == 2  # an ambiguous prefix deletes nothing
