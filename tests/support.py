"""Helpers for tests that drive real ``certpulse`` processes over loopback."""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import itertools
import os
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from certpulse.pki.keys import PrivateKey
from certpulse.pki.signing import sign_bytes

REPO = Path(__file__).resolve().parents[1]
TEMPLATES = REPO / "examples" / "templates"
CERTPULSE = [sys.executable, "-m", "certpulse"]


def run_cli(*args: str, check: bool = True, env: dict[str, str] | None = None,
            timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run the real ``certpulse`` command line in a child process."""
    full_env = {**os.environ, "COLUMNS": "200", **(env or {})}
    result = subprocess.run([*CERTPULSE, *args], capture_output=True, text=True, env=full_env,
                            timeout=timeout, check=False)
    if check and result.returncode != 0:
        raise AssertionError(f"certpulse {' '.join(args)} failed ({result.returncode}):\n"
                             f"{result.stdout}\n{result.stderr}")
    return result


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclasses.dataclass
class CA:
    """A CA initialised by the real CLI in a temporary folder."""

    dir: Path
    admin_key: str
    database_url: str

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return run_cli(*args, "--dir", str(self.dir), check=check)

    def add_principal(self, name: str, *extra: str) -> str:
        import json

        out = self.cli("principal", "add", name, "--json", *extra)
        return str(json.loads(out.stdout)["token"])


def init_ca(directory: Path, database_url: str, *extra: str) -> CA:
    out = run_cli("ca", "init", "--dir", str(directory), "--database", database_url, *extra)
    key = next(line.strip() for line in out.stdout.splitlines() if line.strip().startswith("cpa_"))
    ca = CA(directory, key, database_url)
    for name in ("machine", "webserver", "approval-required", "encryption"):
        ca.cli("template", "add", str(TEMPLATES / f"{name}.toml"))
    return ca


@contextlib.contextmanager
def serve(ca: CA, *extra: str, tls: bool = False, prefix: tuple[str, ...] = (),
          port: int | None = None) -> Iterator[str]:
    """A real ``certpulse ca serve`` on a free loopback port (or ``port``, e.g. the one the CA's
    ``public_url`` names); yields its base URL. Plain HTTP (``--insecure-http``) unless ``tls``:
    then the server's default, HTTPS. ``prefix`` runs it under another command (e.g.
    ``faketime -f +2d``)."""
    port = port or free_port()
    args = [*prefix, *CERTPULSE, "ca", "serve", "--dir", str(ca.dir), "--listen", f"127.0.0.1:{port}",
            *extra]
    if not tls:
        args.append("--insecure-http")
    log = (ca.dir / f"serve-{port}.log").open("w")
    proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    scheme = "https" if tls else "http"
    base = f"{scheme}://127.0.0.1:{port}"
    verify: Any = ssl.create_default_context(cafile=str(ca.dir / "certs" / "root.pem")) if tls else True
    try:
        deadline = time.monotonic() + 30
        while True:
            if proc.poll() is not None:
                output = (ca.dir / f"serve-{port}.log").read_text()
                raise AssertionError(f"ca serve exited {proc.returncode}: {output}")
            try:
                if httpx.get(f"{base}/healthz", timeout=1, verify=verify).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError("ca serve did not answer /healthz within 30 s")
            time.sleep(0.1)
        yield base
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, 15)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait(timeout=10)
        log.close()


def new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def make_csr(key: PrivateKey | None = None, *, cn: str | None = None, dns: list[str] | None = None,
             ips: list[str] | None = None) -> tuple[PrivateKey, str]:
    import ipaddress

    key = key or new_key()
    attrs = [x509.NameAttribute(x509.NameOID.COMMON_NAME, cn)] if cn else []
    builder = x509.CertificateSigningRequestBuilder().subject_name(x509.Name(attrs))
    names: list[x509.GeneralName] = [x509.DNSName(d) for d in dns or []]
    names += [x509.IPAddress(ipaddress.ip_address(i)) for i in ips or []]
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    csr = builder.sign(key, hashes.SHA256())
    return key, csr.public_bytes(serialization.Encoding.PEM).decode()


def csr_der(csr_pem: str) -> bytes:
    return x509.load_pem_x509_csr(csr_pem.encode()).public_bytes(serialization.Encoding.DER)


def renewal_evidence(old_key: PrivateKey, old_cert_pem: str, new_csr_pem: str) -> dict[str, str]:
    """What a renewal carries: the old certificate and its key's signature over the new CSR."""
    signature = sign_bytes(old_key, csr_der(new_csr_pem))
    return {"certificate": old_cert_pem, "signature": base64.b64encode(signature).decode()}


class Client:
    """An HTTP client holding one principal's credential."""

    def __init__(self, base: str, credential: str | None = None, verify: Any = True) -> None:
        headers = {"Authorization": f"Bearer {credential}"} if credential else {}
        self.http = httpx.Client(base_url=base, headers=headers, timeout=30, verify=verify)

    @classmethod
    def enrolled(cls, base: str, token: str, verify: Any = True) -> Client:
        response = httpx.post(f"{base}/v1/tokens/exchange", json={"token": token}, timeout=30, verify=verify)
        assert response.status_code == 200, response.text
        return cls(base, response.json()["credential"], verify=verify)

    def submit(self, template: str, csr: str, **extra: Any) -> httpx.Response:
        return self.http.post("/v1/requests", json={"template": template, "csr": csr, **extra})

    def enroll(self, template: str = "machine", **csr_args: Any) -> tuple[PrivateKey, dict[str, Any]]:
        key, csr = make_csr(**csr_args)
        response = self.submit(template, csr)
        assert response.status_code == 201, response.text
        return key, response.json()


def assert_problem(response: httpx.Response, status: int, reason: str) -> dict[str, Any]:
    """The response is an RFC 7807 problem with this status and machine-readable reason."""
    assert response.status_code == status, f"{response.status_code} {response.text}"
    assert response.headers["content-type"].startswith("application/problem+json"), response.headers
    body: dict[str, Any] = response.json()
    assert body["reason"] == reason, body
    assert body["type"].endswith(reason) and body["status"] == status and body["detail"], body
    return body


def root_trust(ca: CA) -> ssl.SSLContext:
    """TLS verification against exactly this CA's root (how clients verify ``serve(ca, tls=True)``)."""
    return ssl.create_default_context(cafile=str(ca.dir / "certs" / "root.pem"))


def load_cert(pem_text: str) -> x509.Certificate:
    return x509.load_pem_x509_certificate(pem_text.encode())


def assert_chains_to_root(ca: CA, certificate: str, chain: list[str]) -> x509.Certificate:
    """The leaf verifies with the first chain certificate, each link with the next, the last
    link with the CA's root from ``certs/root.pem``; returns the leaf's issuer."""
    root = x509.load_pem_x509_certificate((ca.dir / "certs" / "root.pem").read_bytes())
    links = [load_cert(certificate), *(load_cert(p) for p in chain)]
    if links[-1] != root:
        links.append(root)
    for child, parent in itertools.pairwise(links):
        child.verify_directly_issued_by(parent)
    return links[1]


def cli_json(ca: CA, *args: str) -> Any:
    """Run a ``--json`` CLI command against ``ca`` and parse its output."""
    import json

    return json.loads(ca.cli(*args, "--json").stdout)


def audit_since(admin: Client, after_id: int) -> list[dict[str, Any]]:
    """Audit rows newer than ``after_id``, oldest first, read through the admin API."""
    response = admin.http.get("/v1/audit", params={"limit": 10_000})
    assert response.status_code == 200, response.text
    rows: list[dict[str, Any]] = response.json()
    return sorted((row for row in rows if row["id"] > after_id), key=lambda row: row["id"])


def newest_audit_id(admin: Client) -> int:
    response = admin.http.get("/v1/audit", params={"limit": 1})
    assert response.status_code == 200, response.text
    rows: list[dict[str, Any]] = response.json()
    return int(rows[0]["id"]) if rows else 0


def request_count(admin: Client) -> int:
    """How many certificate requests (any status) the CA has recorded."""
    response = admin.http.get("/v1/requests", params={"limit": 10_000})
    assert response.status_code == 200, response.text
    return len(response.json())
