"""certpulse demo: a CA, an enrollment over HTTPS, an approval, a revocation, then an agent
that enrolls from nothing, renews early when a template's major version is raised (a notification
task records the old and new thumbprints), and installs a request once a CA manager approves it —
end to end, with the lifecycle event timeline at the end.

Runs the real ``certpulse`` command line and a real ``certpulse ca serve`` on a loopback
port, in a temporary folder that is removed afterwards (SQLite, the embedded default).
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from rich.console import Console
from rich.table import Table

REPO = Path(__file__).resolve().parents[1]
console = Console(highlight=False)


def certpulse(*args: str, ca_dir: Path) -> str:
    result = subprocess.run([sys.executable, "-m", "certpulse", *args, "--dir", str(ca_dir)],
                            capture_output=True, text=True, check=False, env={**os.environ, "COLUMNS": "120"})
    if result.returncode != 0:
        raise SystemExit(f"demo: certpulse {' '.join(args)} failed: {result.stderr.strip()}")
    return result.stdout


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def server(ca_dir: Path) -> Iterator[str]:
    """``ca serve`` over TLS (its default), with a certificate its own issuing CA signed: the
    demo's clients trust the CA's root (``certs/root.pem``) and nothing else."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "certpulse", "ca", "serve", "--dir", str(ca_dir), "--listen", f"127.0.0.1:{port}",
         "--tls"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    base = f"https://127.0.0.1:{port}"
    try:
        for _ in range(300):
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{base}/healthz", timeout=1, verify=trust(ca_dir)).status_code == 200:
                    break
            if proc.poll() is not None:
                raise SystemExit("demo: ca serve exited early")
            time.sleep(0.1)
        else:
            raise SystemExit("demo: ca serve did not start")
        yield base
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def trust(ca_dir: Path) -> ssl.SSLContext:
    """Verification against the CA's own root only."""
    return ssl.create_default_context(cafile=str(ca_dir / "certs" / "root.pem"))


def new_csr() -> str:
    key = ec.generate_private_key(ec.SECP256R1())
    csr = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([])).sign(key, hashes.SHA256())
    return csr.public_bytes(serialization.Encoding.PEM).decode()


def main() -> None:
    started = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="certpulse-demo-"))
    ca_dir = work / "ca"
    steps: list[tuple[str, str, str]] = []
    try:
        console.rule("[bold]certpulse demo: enrollment service and agent")
        init_out = certpulse("ca", "init", "--name", "Demo", ca_dir=ca_dir)
        admin_key = next(line.strip() for line in init_out.splitlines() if line.strip().startswith("cpa_"))
        fingerprint = next(line.rsplit(": ", 1)[1] for line in init_out.splitlines()
                           if line.startswith("Root fingerprint"))
        steps.append(("ca init", "ok", f"root, issuing CA and KRA in {ca_dir} (keys 0600); "
                                       f"root fingerprint {fingerprint[:16]}…"))
        for name in ("machine", "webserver", "approval-required", "encryption"):
            certpulse("template", "add", str(REPO / "examples" / "templates" / f"{name}.toml"), ca_dir=ca_dir)
        steps.append(("template add", "ok", "machine, webserver, approval-required, encryption"))
        token = json.loads(certpulse("principal", "add", "web01.example.internal", "--json", ca_dir=ca_dir))["token"]
        steps.append(("principal add", "ok", "machine web01.example.internal, one-time token printed once"))

        with server(ca_dir) as base:
            verify = trust(ca_dir)
            credential = httpx.post(f"{base}/v1/tokens/exchange", json={"token": token},
                                    verify=verify).json()["credential"]
            http = httpx.Client(base_url=base, headers={"Authorization": f"Bearer {credential}"}, timeout=30,
                                verify=verify)
            steps.append(("token exchange", "ok", "credential received over HTTPS (verified against the CA root)"))
            reuse = httpx.post(f"{base}/v1/tokens/exchange", json={"token": token}, verify=verify)
            steps.append(("token reused", str(reuse.status_code), reuse.json()["reason"]))

            issued: dict[str, Any] = http.post("/v1/requests", json={"template": "machine", "csr": new_csr()}).json()
            cert = x509.load_pem_x509_certificate(issued["certificate"].encode())
            issuer = x509.load_pem_x509_certificate(issued["chain"][0].encode())
            cert.verify_directly_issued_by(issuer)
            steps.append(("enroll machine", issued["status"],
                          f"{cert.subject.rfc4514_string()} serial {issued['serial'][:16]}… "
                          f"until {cert.not_valid_after_utc:%Y-%m-%d}"))

            pending = http.post("/v1/requests", json={"template": "approval-required", "csr": new_csr()})
            request_id = pending.json()["id"]
            steps.append(("enroll approval-required", pending.json()["status"],
                          f"request {request_id} awaits a CA manager"))
            certpulse("request", "approve", str(request_id), ca_dir=ca_dir)
            fetched = http.get(f"/v1/requests/{request_id}").json()
            steps.append(("request approve", fetched["status"],
                          f"fetched by request id; serial {fetched['serial'][:16]}…"))

            bad = http.post("/v1/requests", json={"template": "machine", "csr": "not a CSR"})
            steps.append(("bad CSR", str(bad.status_code), bad.json()["reason"]))

            certpulse("revoke", issued["serial"], "--reason", "superseded", ca_dir=ca_dir)
            status = http.get(f"/v1/certificates/{issued['serial']}").json()
            steps.append(("revoke", status["status"], f"reason {status['revocation_reason']}"))

            audit = httpx.get(f"{base}/v1/audit", params={"limit": 8}, headers={"Authorization": f"Bearer {admin_key}"},
                              verify=verify)

            agent_steps = agent_story(base, ca_dir, work / "agent")
            timeline = json.loads(_run(["events", "--json", "--dir", str(work / "agent")]))

        table = Table(title="What happened", header_style="bold cyan", title_justify="left")
        for column in ("step", "outcome", "detail"):
            table.add_column(column)
        for step, outcome, detail in steps:
            colour = "green" if outcome in ("ok", "issued", "revoked", "pending") else "yellow"
            table.add_row(step, f"[{colour}]{outcome}[/{colour}]", detail)
        console.print(table)
        agent_table = Table(title="The agent: autoenrollment pulses", header_style="bold cyan", title_justify="left")
        for column in ("step", "what the agent did"):
            agent_table.add_column(column)
        for step, detail in agent_steps:
            agent_table.add_row(step, detail)
        console.print(agent_table)
        events_table = Table(title="The agent's lifecycle events", header_style="bold cyan", title_justify="left")
        for column in ("seq", "id", "event", "action", "template", "old", "new"):
            events_table.add_column(column)
        for event in timeline:
            events_table.add_row(str(event["seq"]), str(event["id"]), event["name"], event["action"] or "",
                                 event["template"] or "", (event["old"] or {}).get("thumbprint", "")[:16],
                                 (event["new"] or {}).get("thumbprint", "")[:16])
        console.print(events_table)
        if audit.status_code == 200:
            trail = Table(title="Audit trail (newest first)", header_style="bold cyan", title_justify="left")
            for column in ("action", "actor", "template", "reason"):
                trail.add_column(column)
            for row in audit.json():
                trail.add_row(row["action"], row["actor"], row["template"] or "", row["reason"] or "")
            console.print(trail)
        elapsed = time.monotonic() - started
        console.print(f"[bold green]demo finished[/bold green] in {elapsed:.1f} s; cleaned up {work}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _run(args: list[str]) -> str:
    result = subprocess.run([sys.executable, "-m", "certpulse", *args], capture_output=True, text=True,
                            check=False, env={**os.environ, "COLUMNS": "120"})
    if result.returncode != 0:
        raise SystemExit(f"demo: certpulse {' '.join(args)} failed: {result.stderr.strip()}")
    return result.stdout


def summarize(pulse: dict[str, Any]) -> str:
    done = [f"{a['kind']} {a.get('template')} ({a['rule']}): {a['outcome']}" for a in pulse["actions"]]
    return "; ".join(done) or "nothing to do"


ON_REPLACE = """#!/bin/sh
# A notification task: certpulse runs it with the old and new thumbprints on every 1001 (replace).
printf '%s -> %s\\n' "$2" "$3" >> "$1"
"""


def register_task(work: Path, agent_dir: Path) -> Path:
    """A script in a folder only root can write (the agent refuses anything others could change)."""
    scripts = work / "scripts"
    scripts.mkdir(mode=0o700)
    command = scripts / "on-replace.sh"
    command.write_text(ON_REPLACE)
    command.chmod(0o700)
    record = work / "renewals.txt"
    _run(["task", "add", "--name", "record-renewal", "--type", "replace", "--command", str(command),
          "--arg", str(record), "--dir", str(agent_dir)])
    return record


NGINX_CONF = """daemon on;
master_process on;
worker_processes 1;
pid {folder}/nginx.pid;
error_log {folder}/error.log;
events {{ worker_connections 16; }}
http {{
    access_log off;
    client_body_temp_path {folder}/body;
    proxy_temp_path {folder}/proxy;
    fastcgi_temp_path {folder}/fastcgi;
    uwsgi_temp_path {folder}/uwsgi;
    scgi_temp_path {folder}/scgi;
    server {{
        listen 127.0.0.1:{port} ssl;
        ssl_certificate {folder}/fullchain.pem;
        ssl_certificate_key {folder}/key.pem;
        location / {{ return 200 "certpulse demo"; }}
    }}
}}
"""


@contextlib.contextmanager
def nginx(folder: Path) -> Iterator[tuple[Path, int] | None]:
    """A throwaway nginx on a loopback port serving a placeholder certificate, when nginx is
    installed (Debian's nginx package); None otherwise."""
    binary = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)
    if binary is None:
        yield None
        return
    folder.mkdir(mode=0o700)
    port = free_port()
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "placeholder")])
    now = datetime.datetime.now(datetime.UTC)
    placeholder = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
                   .serial_number(x509.random_serial_number()).not_valid_before(now)
                   .not_valid_after(now + datetime.timedelta(days=1)).sign(key, hashes.SHA256()))
    (folder / "fullchain.pem").write_bytes(placeholder.public_bytes(serialization.Encoding.PEM))
    (folder / "key.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                       serialization.NoEncryption()))
    conf = folder / "nginx.conf"
    conf.write_text(NGINX_CONF.format(folder=folder, port=port))
    subprocess.run([binary, "-c", str(conf)], check=True, capture_output=True, timeout=30)
    try:
        yield conf, port
    finally:
        subprocess.run([binary, "-c", str(conf), "-s", "stop"], check=False, capture_output=True, timeout=30)


def bind(agent_dir: Path, work: Path, server: tuple[Path, int] | None) -> list[tuple[str, str]]:
    """A files binding (with a reload command) and, where nginx is installed, an nginx binding
    with a probe: both follow the machine template."""
    deploy = work / "deploy"
    deploy.mkdir(mode=0o700)
    _run(["binding", "add", "app-files", "--template", "machine", "--kind", "files",
          "--opt", f"fullchain={deploy / 'fullchain.pem'}", "--opt", f"key={deploy / 'key.pem'}",
          "--opt", f"reload=touch {deploy / 'reloaded'}", "--dir", str(agent_dir)])
    steps = [("binding add app-files", f"fullchain and key written to {deploy.name}/, then the reload command")]
    if server is not None:
        conf, port = server
        _run(["binding", "add", "app-nginx", "--template", "machine", "--kind", "nginx",
              "--opt", f"fullchain={conf.parent / 'fullchain.pem'}", "--opt", f"key={conf.parent / 'key.pem'}",
              "--opt", f"conf={conf}", "--probe", f"127.0.0.1:{port}", "--dir", str(agent_dir)])
        steps.append(("binding add app-nginx", f"nginx on 127.0.0.1:{port}: nginx -t, reload, probed"))
    else:
        steps.append(("binding add app-nginx", "skipped: nginx is not installed (Debian package nginx)"))
    return steps


def check_bindings(agent_dir: Path) -> list[tuple[str, str]]:
    listed = json.loads(_run(["binding", "list", "--json", "--dir", str(agent_dir)]))
    steps = [(f"binding {b['name']}", f"{b['state']}: serves {(b['thumbprint'] or '-')[:16]}…") for b in listed]
    for row in json.loads(_run(["binding", "check", "--json", "--dir", str(agent_dir)])):
        served, newest = (row["served"] or "-")[:16], (row["newest"] or "-")[:16]
        steps.append((f"binding check {row['binding']}", f"{row['verdict']}: served {served}…, newest {newest}…"))
    return steps


def agent_story(base: str, ca_dir: Path, agent_dir: Path) -> list[tuple[str, str]]:
    """An agent enrolls from nothing, renews early on a major version, installs an approved request."""
    steps: list[tuple[str, str]] = []
    added = json.loads(certpulse("principal", "add", "app01.example.internal", "--json", ca_dir=ca_dir))
    token, fingerprint = added["token"], added["ca_fingerprint"]  # what the operator hands the machine
    _run(["agent", "init", "--server", base, "--token", token, "--ca-fingerprint", fingerprint,
          "--dir", str(agent_dir)])
    steps.append(("agent init", f"root pinned by fingerprint {fingerprint[:16]}…; one-time token exchanged "
                                "for the machine's credential over the verified connection"))
    record = register_task(agent_dir.parent, agent_dir)
    steps.append(("task add record-renewal", "runs scripts/on-replace.sh OLD NEW on every replacement (1001)"))
    first = json.loads(_run(["agent", "pulse", "--json", "--dir", str(agent_dir)]))
    steps.append(("pulse 1 (from nothing)", summarize(first)))
    with nginx(agent_dir.parent / "nginx") as web:
        steps += bind(agent_dir, agent_dir.parent, web)
        certpulse("template", "reenroll-all", "machine", ca_dir=ca_dir)
        second = json.loads(_run(["agent", "pulse", "--json", "--refresh-policy", "--dir", str(agent_dir)]))
        steps.append(("reenroll-all machine, pulse 2", summarize(second)))
        for line in record.read_text().splitlines() if record.exists() else ["(the task did not run)"]:
            steps.append(("task record-renewal wrote", line))
        steps += check_bindings(agent_dir)
    pending = json.loads(certpulse("request", "list", "--status", "pending", "--json", ca_dir=ca_dir))
    for request in pending:
        if request["requester"] == "principal:app01.example.internal":
            certpulse("request", "approve", str(request["id"]), ca_dir=ca_dir)
            steps.append(("CA manager", f"approved request {request['id']} ({request['template']})"))
    third = json.loads(_run(["agent", "pulse", "--json", "--dir", str(agent_dir)]))
    steps.append(("pulse 3", summarize(third)))
    fourth = json.loads(_run(["agent", "pulse", "--json", "--dir", str(agent_dir)]))
    steps.append(("pulse 4 (same state)", summarize(fourth)))
    status = json.loads(_run(["agent", "status", "--json", "--dir", str(agent_dir)]))
    for cert in status["certificates"]:
        steps.append((f"holds {cert['template_name']} v{cert['major_version']}.{cert['minor_version']}",
                      f"{cert['thumbprint'][:16]}… renews at {(cert['renewal_time'] or '-')[:19]}"))
    archived = json.loads(_run(["cert", "list", "--all", "--json", "--dir", str(agent_dir)]))
    for cert in archived:
        if cert["archived"]:
            steps.append(("archived", f"{cert['thumbprint'][:16]}… {cert['template_name']} "
                                      f"v{cert['major_version']}, replaced by {cert['replaced_by'][:16]}…"))
    return steps


if __name__ == "__main__":
    main()
