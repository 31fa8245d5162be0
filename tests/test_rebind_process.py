"""Rebind with real services: a real CA, an agent driven through the CLI, and a real nginx on a
loopback port. A renewal reaches nginx and the TLS endpoint serves the new certificate; a broken
nginx configuration is rolled back (the old certificate still served) with a "renewed but not
deployed" event; a listener left on a replaced certificate is found by ``binding check``."""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import shutil
import signal
import ssl
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from agent_support import Agent, action_for, new_agent, one, prepare_ca, sha1_thumbprint, wait_for
from support import CA, free_port, serve

NGINX = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)
HINT = "nginx is not installed: run scripts/system-packages (make test does)"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> CA:
    return prepare_ca(tmp_path_factory.mktemp("rebind-ca") / "ca")


@pytest.fixture(scope="module")
def ca_url(pki: CA) -> Iterator[str]:
    with serve(pki) as base:
        yield base


def served(port: int) -> str:
    """The SHA-1 thumbprint of the certificate served on 127.0.0.1:port (no verification)."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    import socket

    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, \
            context.wrap_socket(raw, server_hostname="localhost") as tls:
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return sha1_thumbprint(x509.load_der_x509_certificate(der))


class Nginx:
    """A real nginx with its own configuration, pid file and logs, on a loopback port."""

    def __init__(self, folder: Path) -> None:
        if NGINX is None:
            pytest.fail(HINT)
        self.folder = folder
        self.port = free_port()
        self.tls = folder / "tls"
        self.tls.mkdir(parents=True)
        self.conf = folder / "nginx.conf"
        self.extra = folder / "extra.conf"  # included: a test breaks the configuration here
        self.extra.write_text("# nothing yet\n")
        self.fullchain = self.tls / "fullchain.pem"
        self.key = self.tls / "key.pem"
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "placeholder")])
        now = dt.datetime.now(dt.UTC)
        placeholder = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
                       .serial_number(x509.random_serial_number()).not_valid_before(now)
                       .not_valid_after(now + dt.timedelta(days=1)).sign(key, hashes.SHA256()))
        self.placeholder = sha1_thumbprint(placeholder)
        self.fullchain.write_bytes(placeholder.public_bytes(serialization.Encoding.PEM))
        self.key.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
        self.key.chmod(0o600)
        self.conf.write_text(f"""
daemon on;
master_process on;
worker_processes 1;
pid {folder}/nginx.pid;
error_log {folder}/error.log;
events {{ worker_connections 64; }}
http {{
    access_log off;
    client_body_temp_path {folder}/body;
    proxy_temp_path {folder}/proxy;
    fastcgi_temp_path {folder}/fastcgi;
    uwsgi_temp_path {folder}/uwsgi;
    scgi_temp_path {folder}/scgi;
    include {self.extra};
    server {{
        listen 127.0.0.1:{self.port} ssl;
        ssl_certificate {self.fullchain};
        ssl_certificate_key {self.key};
        location / {{ return 200 "ok"; }}
    }}
}}
""")

    def start(self) -> None:
        subprocess.run([NGINX, "-c", str(self.conf)], check=True, capture_output=True, timeout=30)
        wait_for(lambda: self._answers(), 10, "nginx to listen")

    def _answers(self) -> bool:
        with contextlib.suppress(OSError):
            served(self.port)
            return True
        return False

    def stop(self) -> None:
        pid_file = self.folder / "nginx.pid"
        if pid_file.exists():
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pid_file.read_text().strip()), signal.SIGQUIT)
            with contextlib.suppress(AssertionError):
                wait_for(lambda: not pid_file.exists(), 10, "nginx to stop")


@pytest.fixture
def nginx(tmp_path: Path) -> Iterator[Nginx]:
    server = Nginx(tmp_path / "nginx")
    server.start()
    try:
        yield server
    finally:
        server.stop()


def bind(agent: Agent, nginx: Nginx, *extra: str) -> None:
    agent.run("binding", "add", "web", "--template", "machine", "--kind", "nginx",
              "--opt", f"fullchain={nginx.fullchain}", "--opt", f"key={nginx.key}", "--opt", f"conf={nginx.conf}",
              "--probe", f"127.0.0.1:{nginx.port},sni=localhost", *extra)


def binding(agent: Agent) -> dict[str, Any]:
    return one(json.loads(agent.run("binding", "list", "--json").stdout), "binding")


def events(agent: Agent, *args: str) -> list[dict[str, Any]]:
    data: list[dict[str, Any]] = json.loads(agent.run("events", "--json", *args).stdout)
    return data


def test_a_renewal_reaches_nginx_and_the_endpoint_serves_the_new_certificate(
        pki: CA, ca_url: str, tmp_path: Path, nginx: Nginx) -> None:
    agent = new_agent(pki, ca_url, tmp_path / "agent")
    old = action_for(agent.pulse(), "machine")["new_thumbprint"]
    bind(agent, nginx)
    assert served(nginx.port) == old
    assert (binding(agent)["thumbprint"], binding(agent)["state"]) == (old, "ok")
    assert os.stat(nginx.key).st_mode & 0o777 == 0o600

    new = action_for(agent.pulse(faketime="+330d"), "machine")["new_thumbprint"]
    assert served(nginx.port) == new  # rebound during the one-shot pulse, nginx reloaded, probed
    record = binding(agent)
    assert (record["thumbprint"], record["target"], record["state"]) == (new, None, "ok")
    assert os.stat(nginx.key).st_mode & 0o777 == 0o600
    # The old certificate was archived only once nginx no longer served it.
    ids = [(e["id"], (e["old"] or {}).get("thumbprint")) for e in events(agent)]
    assert ids.index((1001, old)) < ids.index((1005, old))
    checked = json.loads(agent.run("binding", "check", "--json").stdout)
    assert [(c["verdict"], c["served"], c["newest"]) for c in checked] == [("ok", new, new)]


def test_a_broken_nginx_configuration_is_rolled_back_and_reported(
        pki: CA, ca_url: str, tmp_path: Path, nginx: Nginx) -> None:
    agent = new_agent(pki, ca_url, tmp_path / "agent")
    old = action_for(agent.pulse(), "machine")["new_thumbprint"]
    bind(agent, nginx)
    before = (nginx.fullchain.read_bytes(), nginx.key.read_bytes())
    nginx.extra.write_text("this_is_not_a_directive on;\n")

    new = action_for(agent.pulse(faketime="+330d"), "machine")["new_thumbprint"]
    assert served(nginx.port) == old  # the old certificate is still served
    assert (nginx.fullchain.read_bytes(), nginx.key.read_bytes()) == before  # the files were put back
    record = binding(agent)
    assert (record["thumbprint"], record["target"], record["state"]) == (old, new, "failed")
    [failure] = events(agent, "--id", "1105")
    assert failure["name"] == "not-deployed" and failure["data"]["binding"] == "web"
    assert "this_is_not_a_directive" in failure["data"]["output"] + failure["detail"]
    status = json.loads(agent.run("agent", "status", "--json").stdout)
    assert one(status["bindings"], "binding")["state"] == "failed"
    assert "renewed but not deployed" in agent.run("binding", "list").stdout
    # The old certificate is kept unarchived while nginx serves it.
    certs = {c["thumbprint"]: c for c in json.loads(agent.run("cert", "list", "--all", "--json").stdout)}
    assert certs[old]["archived"] is False and certs[old]["replaced_by"] == new

    nginx.extra.write_text("# fixed\n")
    agent.run("binding", "deploy", "web")
    assert served(nginx.port) == new
    certs = {c["thumbprint"]: c for c in json.loads(agent.run("cert", "list", "--all", "--json").stdout)}
    assert certs[old]["archived"] is True


def test_binding_check_finds_a_stale_listener_a_mismatch_and_an_unreachable_one(
        pki: CA, ca_url: str, tmp_path: Path, nginx: Nginx) -> None:
    agent = new_agent(pki, ca_url, tmp_path / "agent")
    old = action_for(agent.pulse(), "machine")["new_thumbprint"]
    bind(agent, nginx, "--no-auto")
    new = action_for(agent.pulse(faketime="+330d"), "machine")["new_thumbprint"]
    # Not automatic: the files and nginx still hold the old certificate (the WinRM case).
    assert served(nginx.port) == old
    result = agent.run("binding", "check", "--json", check=False)
    assert result.returncode == 1
    [row] = json.loads(result.stdout)
    assert (row["verdict"], row["configured"], row["served"], row["newest"]) == ("stale", old, old, new)
    [drift] = events(agent, "--id", "1106")
    assert drift["data"]["verdict"] == "stale"

    # Files changed behind nginx's back, no reload: still stale until it reloads.
    shutil.copyfile(agent.dir / "store" / "certs" / new / "fullchain.pem", nginx.fullchain)
    shutil.copyfile(agent.dir / "store" / "certs" / new / "key.pem", nginx.key)
    assert json.loads(agent.run("binding", "check", "--json", check=False).stdout)[0]["verdict"] == "stale"

    agent.run("binding", "renew", "--old", old, "--new", new)
    assert served(nginx.port) == new
    assert json.loads(agent.run("binding", "check", "--json").stdout)[0]["verdict"] == "ok"

    other = Nginx(tmp_path / "other")  # serves its own placeholder: nothing this store holds
    other.start()
    try:
        agent.run("binding", "add", "foreign", "--cert", new, "--kind", "files",
                  "--opt", f"fullchain={tmp_path / 'foreign.pem'}", "--probe", f"127.0.0.1:{other.port}",
                  check=False)
        verdicts = {r["binding"]: r["verdict"]
                    for r in json.loads(agent.run("binding", "check", "--json", check=False).stdout)}
        assert verdicts == {"web": "ok", "foreign": "mismatch"}
    finally:
        other.stop()
    nginx.stop()
    verdicts = {r["binding"]: r["verdict"]
                for r in json.loads(agent.run("binding", "check", "--json", check=False).stdout)}
    assert verdicts == {"web": "unreachable", "foreign": "unreachable"}



def test_the_daemon_rebinds_after_its_pulse_and_runs_the_drift_check(
        pki: CA, ca_url: str, tmp_path: Path, nginx: Nginx) -> None:
    agent = new_agent(pki, ca_url, tmp_path / "agent")
    old = action_for(agent.pulse(), "machine")["new_thumbprint"]
    bind(agent, nginx)
    assert binding(agent)["verdict"] is None  # never checked yet
    agent.run("agent", "run", "--pulses", "1", faketime="+330d", timeout=120)
    record = binding(agent)
    new = record["thumbprint"]
    assert new != old and served(nginx.port) == new
    assert (record["state"], record["verdict"], record["served"]) == ("ok", "ok", new)
    assert record["checked_at"] is not None
