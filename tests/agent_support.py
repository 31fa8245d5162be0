"""Helpers for whole-process agent tests: a prepared CA, agent folders driven through the real
CLI (optionally under ``faketime``), and checks on what lands in the store."""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import hashlib
import ipaddress
import json
import os
import shutil
import signal
import ssl
import stat
import subprocess
import time
import tomllib
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
import tomli_w
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from support import (
    CA,
    CERTPULSE,
    TEMPLATES,
    assert_chains_to_root,
    init_ca,
    load_cert,
    run_cli,
)

T = TypeVar("T")
FAKETIME = shutil.which("faketime")
FAKETIME_HINT = "faketime is not installed (Debian package 'faketime'; see scripts/system-packages)"
SHORT_TEMPLATE = """\
name = "short"
display_name = "Short-lived (tests)"
validity = "1h"
renewal_period = "2h"

[key]
types = ["ec-p256"]
usage = ["digital_signature"]
ekus = ["client_auth"]

[subject]
source = "principal"

[handling]
old_certificate = "archive"

[[permissions]]
group = "shortlived"
rights = ["read", "enroll", "autoenroll"]
"""
SPKI = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


# -- helpers ------------------------------------------------------------------------------------

def wait_for(predicate: Callable[[], T | None], timeout: float, what: str) -> T:
    """Poll until ``predicate`` returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.1)


def faketime_prefix(offset: str | None) -> list[str]:
    if offset is None:
        return []
    if FAKETIME is None:
        pytest.fail(FAKETIME_HINT)
    return [FAKETIME, "-f", offset]


def public_der(key_or_cert: Any) -> bytes:
    public = key_or_cert.public_key()
    return bytes(public.public_bytes(*SPKI))


def sha1_thumbprint(cert: x509.Certificate) -> str:
    return hashlib.sha1(cert.public_bytes(serialization.Encoding.DER), usedforsecurity=False).hexdigest().upper()


def check_version_folder(ca: CA, folder: Path) -> x509.Certificate:
    """A version folder holds a 0600 key that belongs to its certificate, which chains to the root."""
    key_file = folder / "key.pem"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600, key_file
    key = serialization.load_pem_private_key(key_file.read_bytes(), None)
    cert = load_cert((folder / "cert.pem").read_text())
    assert public_der(key) == public_der(cert), f"{folder}: key.pem does not belong to cert.pem"
    assert folder.name == sha1_thumbprint(cert)
    chain = [c.public_bytes(serialization.Encoding.PEM).decode()
             for c in x509.load_pem_x509_certificates((folder / "chain.pem").read_bytes())]
    assert_chains_to_root(ca, (folder / "cert.pem").read_text(), chain)
    return cert


def one(items: list[dict[str, Any]], what: str) -> dict[str, Any]:
    assert len(items) == 1, f"expected exactly one {what}, got {json.dumps(items, indent=1)}"
    return items[0]


def action_for(result: dict[str, Any], template: str) -> dict[str, Any]:
    return one([a for a in result["actions"] if a.get("template") == template], f"action for {template}")


def one_line_error(result: subprocess.CompletedProcess[str], reason: str) -> str:
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"certpulse: error: {reason}:"), lines[0]
    assert "Traceback" not in result.stdout + result.stderr
    return lines[0]


def long_lived_tls(ca: CA, years: int = 5) -> None:
    """A TLS server certificate for ``ca serve --tls`` on 127.0.0.1 that outlives the tests'
    ``faketime`` jumps (the one ``ca serve`` makes lasts 90 days: an agent run a year ahead would
    rightly refuse it as expired). Issued by the CA's own issuing CA, with the names ``ca serve``
    gives a server on 127.0.0.1: it keeps a certificate that has them and is far from its end."""
    issuer_cert = load_cert((ca.dir / "certs" / "issuer-issuing-1.pem").read_text())
    issuer_key = serialization.load_pem_private_key((ca.dir / "keys" / "issuer-issuing-1.key").read_bytes(), None)
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5)
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "127.0.0.1")]))
            .issuer_name(issuer_cert.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now).not_valid_after(min(now + dt.timedelta(days=365 * years),
                                                       issuer_cert.not_valid_after_utc))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),  # the names ca serve
                                                        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .sign(issuer_key, hashes.SHA256()))  # type: ignore[arg-type]
    folder = ca.dir / "tls"
    folder.mkdir(mode=0o700, exist_ok=True)
    (folder / "server.key").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    (folder / "server.key").chmod(0o600)
    (folder / "server.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM)
                                        + issuer_cert.public_bytes(serialization.Encoding.PEM))


def prepare_ca(directory: Path) -> CA:
    """A SQLite CA with the example templates, the optional ones behind opt-in groups, and a
    one-hour template for the group ``shortlived`` (its renewal period, 2 h, is longer than
    20 % of its life: it is renewed at 80 %, after 48 minutes)."""
    ca = init_ca(directory, f"sqlite:///{directory}/ca.db")
    for name, group in (("approval-required", "approvers"), ("encryption", "encrypters")):
        text = (TEMPLATES / f"{name}.toml").read_text()
        assert 'group = "machines"' in text
        edited = directory.parent / f"{name}-{group}.toml"
        edited.write_text(text.replace('group = "machines"', f'group = "{group}"'))
        ca.cli("template", "edit", name, str(edited))
    short = directory.parent / "short.toml"
    short.write_text(SHORT_TEMPLATE)
    ca.cli("template", "add", str(short))
    long_lived_tls(ca)
    return ca


def ca_requests(ca: CA) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = json.loads(ca.cli("request", "list", "--json").stdout)
    return rows


def issued(ca: CA, principal: str, template: str) -> dict[str, int]:
    """How many certificates of ``template`` the CA issued to ``principal``, by request kind."""
    counts = {"new": 0, "renewal": 0}
    for row in ca_requests(ca):
        if row["requester"] == f"principal:{principal}" and row["template"] == template and row["status"] == "issued":
            counts[row["kind"]] += 1
    return counts


@dataclasses.dataclass
class Agent:
    """An agent folder made by ``certpulse agent init``, driven through the real CLI."""

    dir: Path
    principal: str
    ca: CA

    def cmd(self, *args: str, faketime: str | None = None) -> list[str]:
        return [*faketime_prefix(faketime), *CERTPULSE, *args, "--dir", str(self.dir)]

    def run(self, *args: str, faketime: str | None = None, check: bool = True, timeout: float = 60,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(self.cmd(*args, faketime=faketime), capture_output=True, text=True,
                                env={**os.environ, "COLUMNS": "200", **(env or {})}, timeout=timeout, check=False)
        if check and result.returncode != 0:
            raise AssertionError(f"certpulse {' '.join(args)} failed ({result.returncode}):\n"
                                 f"{result.stdout}\n{result.stderr}")
        return result

    def pulse(self, *, faketime: str | None = None, ok: bool | None = True) -> dict[str, Any]:
        """``agent pulse --json``; ``ok`` True: exit 0 and outcome ok; False: exit 1 and failed."""
        result = self.run("agent", "pulse", "--json", faketime=faketime, check=False)
        assert "Traceback" not in result.stderr, result.stderr
        data: dict[str, Any] = json.loads(result.stdout)
        if ok is True:
            assert result.returncode == 0 and data["outcome"] == "ok", (result.returncode, data, result.stderr)
        elif ok is False:
            assert result.returncode == 1 and data["outcome"] == "failed", (result.returncode, data, result.stderr)
        return data

    def plan(self, *, faketime: str | None = None) -> dict[str, Any]:
        data: dict[str, Any] = json.loads(self.run("agent", "pulse", "--plan", "--json", faketime=faketime).stdout)
        return data

    def status(self) -> dict[str, Any]:
        data: dict[str, Any] = json.loads(self.run("agent", "status", "--json").stdout)
        return data

    def certs(self, *, all_: bool = False) -> list[dict[str, Any]]:
        args = ["cert", "list", "--json", *(["--all"] if all_ else [])]
        data: list[dict[str, Any]] = json.loads(self.run(*args).stdout)
        return data

    def current(self, template: str) -> dict[str, Any]:
        return one([c for c in self.certs() if c["template_name"] == template], f"current {template} certificate")

    def live(self, template: str) -> Path:
        """The folder ``live/<template>`` points to (it must be a relative symlink into certs/)."""
        link = self.dir / "store" / "live" / template
        assert link.is_symlink(), f"{link} is not a symlink"
        target = Path(os.readlink(link))
        assert not target.is_absolute() and target.parent == Path("..") / "certs", target
        return (link.parent / target).resolve()

    def set_config(self, **values: Any) -> None:
        path = self.dir / "agent.toml"
        data = tomllib.loads(path.read_text())
        data.update(values)
        path.write_text(tomli_w.dumps(data))


def root_fingerprint(ca: CA) -> str:
    """The CA's root fingerprint as ``ca init`` prints it: SHA-256 of the root's DER, lowercase hex."""
    return hashlib.sha256(load_cert((ca.dir / "certs" / "root.pem").read_text())
                          .public_bytes(serialization.Encoding.DER)).hexdigest()


def root_context(ca: CA) -> ssl.SSLContext:
    """A client context trusting exactly the CA's root (for tests talking to its https URL)."""
    return ssl.create_default_context(cafile=str(ca.dir / "certs" / "root.pem"))


def new_agent(ca: CA, url: str, directory: Path, *groups: str) -> Agent:
    """A new machine principal (in ``groups``) and an agent folder for it, pinned to the CA's root
    by fingerprint (an http:// URL also gets --insecure-http); policy refresh 1 s; no clock-skew
    warning below ten years."""
    name = f"host-{uuid.uuid4().hex[:10]}.example.internal"
    token = ca.add_principal(name, *[arg for group in groups for arg in ("--group", group)])
    insecure = ["--insecure-http"] if url.startswith("http://") else []
    run_cli("agent", "init", "--dir", str(directory), "--server", url, "--token", token,
            "--ca-fingerprint", root_fingerprint(ca), *insecure)
    agent = Agent(directory, name, ca)
    # Tests move the agent's clock by days with faketime to stand for time passing while the CA
    # keeps real time: no clock-skew warning (1107, a pulse note) for that unless a test asks.
    agent.set_config(policy_refresh="1s", clock_skew_warning="3650d")
    return agent


def assert_renewed(agent: Agent, result: dict[str, Any], template: str, old: str,
                   rule: str) -> tuple[str, dict[str, dict[str, Any]]]:
    """The pulse renewed ``old`` by ``rule``: a new key, the old one archived and replaced, the live
    link on the new version. Returns the new thumbprint and ``cert list --all`` by thumbprint."""
    action = one([a for a in result["actions"] if a.get("template") == template and a["outcome"] != "skipped"],
                 f"action carried out for {template}")
    assert action["rule"] == rule and action["outcome"] == "done", action
    assert action["replaces"] == [old], action
    if rule != "resume":  # a resumed request knows what it replaces, not what it was planned for
        assert action["thumbprint"] == old, action
    new = str(action["new_thumbprint"])
    assert new != old
    records = {c["thumbprint"]: c for c in agent.certs(all_=True)}
    assert records[old]["archived"] is True and records[old]["replaced_by"] == new, records[old]
    assert records[new]["archived"] is False and records[new]["replaced_by"] is None, records[new]
    assert [p for p, c in records.items() if c["template_name"] == template and not c["archived"]] == [new]
    assert agent.live(template).name == new
    store = agent.dir / "store" / "certs"
    new_cert = check_version_folder(agent.ca, store / new)
    old_cert = check_version_folder(agent.ca, store / old)  # archived, kept with its key
    assert public_der(new_cert) != public_der(old_cert), "the renewal reused the old key"
    assert new_cert.subject == old_cert.subject
    return new, records


class CAProcess:
    """``certpulse ca serve`` on a fixed port that a test stops and starts again."""

    def __init__(self, ca: CA, port: int) -> None:
        self.ca = ca
        self.port = port
        self.url = f"https://127.0.0.1:{port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        assert self.proc is None
        log = (self.ca.dir / f"serve-{self.port}-{time.monotonic_ns()}.log").open("w")
        self.proc = subprocess.Popen(
            [*CERTPULSE, "ca", "serve", "--dir", str(self.ca.dir), "--listen", f"127.0.0.1:{self.port}", "--tls"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        proc = self.proc

        def healthy() -> bool:
            assert proc.poll() is None, f"ca serve exited with {proc.returncode}"
            with contextlib.suppress(httpx.HTTPError):
                return httpx.get(f"{self.url}/healthz", timeout=1, verify=root_context(self.ca)).status_code == 200
            return False

        wait_for(healthy, 30, f"ca serve on port {self.port}")

    def stop(self) -> None:
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)
        self.proc = None
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"{self.url}/healthz", timeout=1, verify=root_context(self.ca))
