"""The agent's Prometheus metrics, through the real CLI against a real CA over loopback.

``certpulse agent metrics`` is read after real pulses and checked against what the agent's other
commands say (``cert list``, ``agent status``) and against the certificate files themselves;
``agent run --metrics-listen`` is scraped over HTTP while the daemon runs. Notification-task rows
are written straight into the ``tasks`` table (its schema is fixed; the task runner is not needed
to show that the collector reports what the table holds).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import signal
import socket
import subprocess
import tomllib
from pathlib import Path

import httpx
import pytest
import tomli_w
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import create_engine

from agent_support import Agent, action_for, new_agent, one, one_line_error, sha1_thumbprint, wait_for
from certpulse.machine import schema as machine_tables
from pki_factory import self_signed, utc_now
from support import CA, free_port

Series = dict[tuple[str, frozenset[tuple[str, str]]], float]
FAMILIES = {
    "certpulse_certificate_expiry_timestamp_seconds", "certpulse_certificate_renewal_timestamp_seconds",
    "certpulse_pulses", "certpulse_last_pulse_timestamp_seconds", "certpulse_last_pulse_success",
    "certpulse_next_pulse_timestamp_seconds", "certpulse_pending_requests", "certpulse_pending_request_age_seconds",
    "certpulse_renewal_failing", "certpulse_task_runs", "certpulse_task_failures", "certpulse_task_state",
    "certpulse_task_last_run_timestamp_seconds", "certpulse_events_last_seq", "certpulse_events_retained",
}


# -- helpers ------------------------------------------------------------------------------------

def parse(text: str) -> tuple[set[str], Series]:
    """Family names, and every sample by (sample name, labels)."""
    names: set[str] = set()
    series: Series = {}
    for family in text_string_to_metric_families(text):
        names.add(family.name)
        for sample in family.samples:
            key = (sample.name, frozenset(sample.labels.items()))
            assert key not in series, f"duplicate series {key}"
            series[key] = sample.value
    return names, series


def value(series: Series, name: str, /, **labels: str) -> float:
    return series[(name, frozenset(labels.items()))]


def matching(series: Series, name: str, /, **labels: str) -> dict[frozenset[tuple[str, str]], float]:
    """Samples of ``name`` whose labels include ``labels``."""
    wanted = set(labels.items())
    return {key: v for (sample, key), v in series.items() if sample == name and wanted <= key}


def metrics(agent: Agent) -> tuple[set[str], Series]:
    result = agent.run("agent", "metrics")
    assert result.stderr == "", result.stderr
    return parse(result.stdout)


def timestamp(iso: str) -> float:
    return dt.datetime.fromisoformat(iso).timestamp()


def monitor(agent: Agent, folder: Path) -> None:
    path = agent.dir / "agent.toml"
    data = tomllib.loads(path.read_text())
    data["additional_stores"] = [str(folder)]
    path.write_text(tomli_w.dumps(data))


# -- agent metrics --------------------------------------------------------------------------------

def test_metrics_command_reports_certificates_renewal_pulses_and_additional_stores(
        pki: CA, ca_url: str, tmp_path: Path) -> None:
    agent = new_agent(pki, ca_url, tmp_path / "agent")
    extra = tmp_path / "monitored"
    extra.mkdir()
    watched = self_signed("legacy.example.internal", days=30, start=utc_now() - dt.timedelta(days=1)).certificate
    pem = watched.public_bytes(serialization.Encoding.PEM)
    (extra / "legacy.pem").write_bytes(pem)
    (extra / "legacy-copy.crt").write_bytes(pem)  # one certificate in two files: still one series
    (extra / "notes.txt").write_text("not a certificate")
    monitor(agent, extra)

    names, series = metrics(agent)  # before any pulse: every family, counters at zero
    assert names >= FAMILIES, FAMILIES - names
    assert value(series, "certpulse_pulses_total", outcome="ok") == 0
    assert value(series, "certpulse_pulses_total", outcome="failed") == 0
    assert not matching(series, "certpulse_last_pulse_timestamp_seconds")
    assert value(series, "certpulse_pending_requests") == 0

    first = agent.pulse()
    thumb = str(action_for(first, "machine")["new_thumbprint"])
    names, series = metrics(agent)
    assert names >= FAMILIES
    record = agent.current("machine")
    assert record["thumbprint"] == thumb
    cert = x509.load_pem_x509_certificate((agent.live("machine") / "cert.pem").read_bytes())
    expiry = value(series, "certpulse_certificate_expiry_timestamp_seconds", thumbprint=thumb, template="machine",
                   store="personal", subject=record["subject"])
    assert expiry == cert.not_valid_after_utc.timestamp() == timestamp(record["not_after"])

    status = agent.status()
    status_row = one([c for c in status["certificates"] if c["thumbprint"] == thumb], "status row")
    renewal = value(series, "certpulse_certificate_renewal_timestamp_seconds", thumbprint=thumb, template="machine")
    assert status_row["renewal_time"] is not None and renewal == timestamp(status_row["renewal_time"])
    assert cert.not_valid_before_utc.timestamp() < renewal < expiry

    assert value(series, "certpulse_certificate_expiry_timestamp_seconds", thumbprint=sha1_thumbprint(watched),
                 template="", store=str(extra), subject="CN=legacy.example.internal") == \
        watched.not_valid_after_utc.timestamp()
    assert len(matching(series, "certpulse_certificate_expiry_timestamp_seconds", store=str(extra))) == 1
    assert not matching(series, "certpulse_certificate_renewal_timestamp_seconds", thumbprint=sha1_thumbprint(watched))

    assert value(series, "certpulse_pulses_total", outcome="ok") == 1
    assert value(series, "certpulse_last_pulse_success") == 1
    assert value(series, "certpulse_last_pulse_timestamp_seconds") == timestamp(status["last_pulse"]["started_at"])
    assert not matching(series, "certpulse_next_pulse_timestamp_seconds")  # only the daemon plans one
    assert value(series, "certpulse_pending_requests") == 0
    assert not matching(series, "certpulse_pending_request_age_seconds")
    assert not matching(series, "certpulse_renewal_failing")
    assert value(series, "certpulse_events_retained", id="1006", name="new") == 1
    assert value(series, "certpulse_events_last_seq") >= 1

    agent.pulse()
    _, series = metrics(agent)
    assert value(series, "certpulse_pulses_total", outcome="ok") == 2
    assert value(series, "certpulse_pulses_total", outcome="failed") == 0
    assert value(series, "certpulse_events_retained", id="1006", name="new") == 1  # nothing new to enroll



def test_pending_request_has_its_age_and_id(pki: CA, ca_url: str, tmp_path: Path) -> None:
    agent = new_agent(pki, ca_url, tmp_path / "agent", "approvers")
    agent.pulse()
    waiting = one(agent.status()["pending"], "pending request")
    _, series = metrics(agent)
    assert value(series, "certpulse_pending_requests") == 1
    ages = matching(series, "certpulse_pending_request_age_seconds")
    assert list(ages) == [frozenset({("request_id", str(waiting["request_id"])), ("template", "approval-required"),
                                     ("status", "pending")})]
    assert 0 <= next(iter(ages.values())) < 120


def test_failed_pulses_failing_renewals_and_tasks(pki: CA, ca_url: str, tmp_path: Path) -> None:
    agent = new_agent(pki, ca_url, tmp_path / "agent")
    agent.pulse()
    path = agent.dir / "agent.toml"
    config = tomllib.loads(path.read_text())
    config["policy_servers"][0]["url"] = f"https://127.0.0.1:{free_port()}"  # nobody listens there
    path.write_text(tomli_w.dumps(config))
    agent.pulse(ok=False)

    now = dt.datetime.now(dt.UTC).replace(microsecond=0)
    engine = create_engine(f"sqlite:///{agent.dir / 'store' / 'meta.db'}")
    try:
        with engine.begin() as conn:
            conn.execute(machine_tables.state.insert().values(
                name="failing", value=json.dumps({"template:webserver": "unavailable", "ABCDEF": "name-not-allowed"})))
            for name, state, runs, failures, last in (("reload-nginx", "retrying", 3, 1, now),
                                                      ("never-ran", "ok", 0, 0, None)):
                conn.execute(machine_tables.tasks.insert().values(
                    name=name, task_type="replace", command="/usr/local/bin/reload", args="[]", channel="system",
                    timeout=30.0, sha256="0" * 64, created_at=now, state=state, attempts=1, runs=runs,
                    failures=failures, last_run_at=last))
                conn.execute(machine_tables.cursors.insert().values(consumer=f"task:{name}", seq=0))
    finally:
        engine.dispose()

    _, series = metrics(agent)
    assert value(series, "certpulse_pulses_total", outcome="ok") == 1
    assert value(series, "certpulse_pulses_total", outcome="failed") == 1
    assert value(series, "certpulse_last_pulse_success") == 0
    assert matching(series, "certpulse_renewal_failing") == {
        frozenset({("key", "template:webserver"), ("cause", "unavailable")}): 1,
        frozenset({("key", "ABCDEF"), ("cause", "name-not-allowed")}): 1}
    assert value(series, "certpulse_task_runs_total", task="reload-nginx") == 3
    assert value(series, "certpulse_task_failures_total", task="reload-nginx") == 1
    assert value(series, "certpulse_task_runs_total", task="never-ran") == 0
    states = {dict(k)["state"]: v for k, v in matching(series, "certpulse_task_state", task="reload-nginx").items()}
    assert states == {"ok": 0, "retrying": 1, "failed": 0, "refused": 0}
    assert value(series, "certpulse_task_last_run_timestamp_seconds", task="reload-nginx") == now.timestamp()
    assert not matching(series, "certpulse_task_last_run_timestamp_seconds", task="never-ran")
    # The certificate stays in place and is still reported while the CA cannot be reached.
    assert len(matching(series, "certpulse_certificate_expiry_timestamp_seconds", template="machine")) == 1


# -- agent run --metrics-listen -------------------------------------------------------------------

def test_daemon_serves_metrics_over_http_while_it_runs(pki: CA, ca_url: str, tmp_path: Path) -> None:
    agent = new_agent(pki, ca_url, tmp_path / "agent")
    port = free_port()
    url = f"http://127.0.0.1:{port}/metrics"
    log_path = tmp_path / "daemon.log"
    with log_path.open("w") as log:
        daemon = subprocess.Popen(agent.cmd("agent", "run", "--metrics-listen", f"127.0.0.1:{port}"),
                                  stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def scraped_after_a_pulse() -> Series | None:
        assert daemon.poll() is None, f"the daemon exited ({daemon.returncode}): {log_path.read_text()}"
        with contextlib.suppress(httpx.HTTPError):
            response = httpx.get(url, timeout=2)
            assert response.status_code == 200, response.text
            names, series = parse(response.text)
            assert names >= FAMILIES, FAMILIES - names
            if value(series, "certpulse_pulses_total", outcome="ok") >= 1 and matching(
                    series, "certpulse_next_pulse_timestamp_seconds"):
                return series
        return None

    try:
        series = wait_for(scraped_after_a_pulse, 30, "a scrape after the daemon's first pulse")
        thumb = agent.current("machine")["thumbprint"]
        assert len(matching(series, "certpulse_certificate_expiry_timestamp_seconds", thumbprint=thumb,
                            store="personal")) == 1
        assert len(matching(series, "certpulse_certificate_renewal_timestamp_seconds", thumbprint=thumb)) == 1
        next_pulse = value(series, "certpulse_next_pulse_timestamp_seconds")
        assert next_pulse == timestamp(agent.status()["next_pulse"])
        assert value(series, "certpulse_pending_requests") == 0
        # A second daemon is told that one runs, not that the port is taken.
        second = agent.run("agent", "run", "--metrics-listen", f"127.0.0.1:{port}", check=False, timeout=30)
        assert str(daemon.pid) in one_line_error(second, "conflict")
        # The command reads the same store while the daemon holds its lock, and agrees.
        _, printed = metrics(agent)
        assert value(printed, "certpulse_pulses_total", outcome="ok") == value(
            series, "certpulse_pulses_total", outcome="ok")
        assert daemon.poll() is None
    finally:
        if daemon.poll() is None:
            os.kill(daemon.pid, signal.SIGTERM)
        try:
            code = daemon.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.kill(daemon.pid, signal.SIGKILL)
            daemon.wait(timeout=10)
            raise
    output = log_path.read_text()
    assert code == 0, output
    assert "Traceback" not in output
    with pytest.raises(httpx.HTTPError):
        httpx.get(url, timeout=1)


@pytest.mark.parametrize("listen", ["127.0.0.1", "127.0.0.1:http", ":9470", "127.0.0.1:0", "127.0.0.1:70000",
                                    "[::1]"])
def test_a_malformed_metrics_address_is_refused_in_one_line(listen: str, tmp_path: Path) -> None:
    # The address is checked before the agent folder is even read.
    agent = Agent(tmp_path / "agent", "nobody", CA(tmp_path, "", ""))
    line = one_line_error(agent.run("agent", "run", "--metrics-listen", listen, check=False), "invalid-argument")
    assert "--metrics-listen" in line and repr(listen) in line


def test_a_metrics_port_in_use_is_refused_in_one_line_and_no_pulse_happens(
        pki: CA, ca_url: str, tmp_path: Path) -> None:
    agent = new_agent(pki, ca_url, tmp_path / "agent")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = agent.run("agent", "run", "--pulses", "1", "--metrics-listen", f"127.0.0.1:{port}", check=False)
    assert f"127.0.0.1:{port}" in one_line_error(result, "invalid-argument")
    assert agent.status()["last_pulse"] is None
