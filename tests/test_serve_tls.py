"""``ca serve`` speaks TLS by default, with a certificate from its own issuing CA that the
running server renews by itself; plain HTTP only with ``--insecure-http`` (and a warning);
the CA fingerprint agents pin is printed by ``ca init``, ``principal add/token`` and
``ca status``. Real processes over loopback: a real ``certpulse ca serve``, real TLS handshakes
verified against ``certs/root.pem``, the real CLI."""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import ipaddress
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID

from certpulse.ca.server_tls import server_names
from certpulse.errors import Refusal
from certpulse.pki.fingerprint import ca_fingerprint, parse_fingerprint
from certpulse.sql.db import sqlite_url
from pki_factory import self_signed
from support import CA, CERTPULSE, free_port, init_ca, run_cli, serve

WAIT = 120  # seconds: generous, for a busy machine


@pytest.fixture(scope="module")
def tls_ca(tmp_path_factory: pytest.TempPathFactory) -> CA:
    directory = tmp_path_factory.mktemp("tls") / "ca"
    return init_ca(directory, sqlite_url(directory.parent / "ca.db"))


def root_pem(ca: CA) -> Path:
    return ca.dir / "certs" / "root.pem"


def trust(ca: CA) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(root_pem(ca)))


def port_of(base: str) -> int:
    return int(base.rsplit(":", 1)[1])


def handshake(port: int, context: ssl.SSLContext, server_name: str = "127.0.0.1") -> x509.Certificate:
    """The certificate a real TLS handshake with the server presents (verified by ``context``)."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as raw, \
            context.wrap_socket(raw, server_hostname=server_name) as tls:
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der)


def unverified() -> ssl.SSLContext:
    """Sees whatever is served, also a certificate not valid by the test's clock: the checks
    are made on the certificate afterwards."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def sans(cert: x509.Certificate) -> list[x509.GeneralName]:
    return list(cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value)


def issuer_of(ca: CA) -> x509.Certificate:
    return x509.load_pem_x509_certificate((ca.dir / "certs" / "issuer-issuing-1.pem").read_bytes())


def root_sha256(ca: CA) -> str:
    root = x509.load_pem_x509_certificate(root_pem(ca).read_bytes())
    return hashlib.sha256(root.public_bytes(serialization.Encoding.DER)).hexdigest()


def assert_one_line_refusal(result: subprocess.CompletedProcess[str], *words: str) -> None:
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert "invalid-argument" in lines[0], lines[0]
    for word in words:
        assert word in lines[0], lines[0]


# -- TLS is the default --------------------------------------------------------------------------

def test_default_serve_is_https_from_the_own_issuer_with_the_names_agents_use(tls_ca: CA) -> None:
    with serve(tls_ca, "--tls-name", "ca.example.test", "--tls-name", "10.9.8.7", tls=True) as base:
        assert base.startswith("https://")
        port = port_of(base)
        served = handshake(port, trust(tls_ca))  # verified against certs/root.pem, hostname 127.0.0.1
        assert handshake(port, trust(tls_ca), "localhost") == served
        assert handshake(port, trust(tls_ca), "ca.example.test") == served
        with pytest.raises(ssl.SSLCertVerificationError):
            handshake(port, trust(tls_ca), "elsewhere.example.test")
        with pytest.raises(ssl.SSLCertVerificationError):  # the system's roots do not vouch for it
            handshake(port, ssl.create_default_context())
        response = httpx.get(f"{base}/healthz", verify=trust(tls_ca), timeout=30)
        assert response.status_code == 200, response.text
        status = json.loads(tls_ca.cli("ca", "status", "--json").stdout)
        audit = json.loads(tls_ca.cli("audit", "--json", "--limit", "200").stdout)

    served.verify_directly_issued_by(issuer_of(tls_ca))
    names = sans(served)
    for name in (x509.DNSName("localhost"), x509.DNSName("ca.example.test"),
                 x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.IPAddress(ipaddress.ip_address("10.9.8.7"))):
        assert name in names, names
    assert len(names) == 4, names
    eku = served.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
    serial = format(served.serial_number, "x")
    assert status["tls"]["serial"] == serial and status["tls"]["not_after"] == served.not_valid_after_utc.isoformat()
    assert any(e["action"] == "issued" and e["serial"] == serial and e["template"] == "_api-server" for e in audit)


def test_an_http_client_at_the_tls_port_gets_no_service(tls_ca: CA) -> None:
    """Plain HTTP to the TLS port is a failed handshake: no answer at all, never a 500."""
    with serve(tls_ca, tls=True) as base:
        port = port_of(base)
        with pytest.raises(httpx.TransportError):
            httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=30)
        with socket.create_connection(("127.0.0.1", port), timeout=30) as raw:
            raw.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            answer = b""
            with contextlib.suppress(ConnectionResetError, TimeoutError):
                while chunk := raw.recv(4096):
                    answer += chunk
        assert not answer.startswith(b"HTTP/"), answer[:200]
        assert httpx.get(f"{base}/healthz", verify=trust(tls_ca), timeout=30).status_code == 200  # still serving


def test_plain_http_only_with_insecure_http_which_warns_at_start(tls_ca: CA) -> None:
    with serve(tls_ca) as base:  # support.serve adds --insecure-http
        assert base.startswith("http://")
        assert httpx.get(f"{base}/healthz", timeout=30).status_code == 200
        log = (tls_ca.dir / f"serve-{port_of(base)}.log").read_text()
        with pytest.raises(ssl.SSLError):
            handshake(port_of(base), unverified())
    warning = next((line for line in log.splitlines() if "--insecure-http" in line), "")
    assert "WARNING" in warning and "bearer credentials" in warning and "in clear" in warning, log


@pytest.mark.parametrize(("args", "words"), [
    (["--tls", "--insecure-http"], ["--tls", "--insecure-http"]),
    (["--no-tls"], ["--insecure-http"]),
    (["--insecure-http", "--tls-name", "ca.example.test"], ["--tls-name"]),
    (["--tls-name", "not a name!"], ["not a name!"]),
    (["--tls-name", "-bad-.example"], ["-bad-.example"]),
    (["--tls-lifetime", "5s"], ["--tls-lifetime"]),
])
def test_contradicting_or_bad_transport_options_are_refused_in_one_line(tls_ca: CA, args: list[str],
                                                                       words: list[str]) -> None:
    result = run_cli("ca", "serve", "--dir", str(tls_ca.dir), "--listen", f"127.0.0.1:{free_port()}", *args,
                     check=False)
    assert_one_line_refusal(result, *words)


# -- renewal by the running server ---------------------------------------------------------------

@contextlib.contextmanager
def serving_process(ca: CA, *extra: str) -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    """``ca serve`` (TLS) whose process the test holds, to tell that it never restarted."""
    port = free_port()
    log = (ca.dir / f"serve-{port}.log").open("w")
    proc = subprocess.Popen([*CERTPULSE, "ca", "serve", "--dir", str(ca.dir), "--listen", f"127.0.0.1:{port}",
                             *extra], stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_until(lambda: _healthy(proc, port, ca), "ca serve answers over TLS")
        yield proc, port
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=20)
        log.close()


def _healthy(proc: subprocess.Popen[bytes], port: int, ca: CA) -> bool:
    assert proc.poll() is None, f"ca serve exited {proc.returncode}"
    with contextlib.suppress(httpx.HTTPError):
        return httpx.get(f"https://127.0.0.1:{port}/healthz", verify=trust(ca), timeout=5).status_code == 200
    return False


def wait_until(condition: object, what: str, timeout: float = WAIT) -> None:
    assert callable(condition)
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"not within {timeout} s: {what}"
        time.sleep(0.3)


def children(pid: int) -> set[int]:
    return {int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()}


def test_the_running_server_renews_its_certificate_and_every_worker_serves_the_new_one(tls_ca: CA) -> None:
    """A 45 s certificate: due after 30 s (a third left). The server re-issues it by itself, and
    both workers present the new one on new handshakes; no process was restarted."""
    # An earlier test's certificate (90 days, still fresh) would be kept: a lifetime applies from
    # the next issuance. Start from none, so that the first one is issued for 45 s.
    shutil.rmtree(tls_ca.dir / "tls", ignore_errors=True)
    with serving_process(tls_ca, "--workers", "2", "--tls-lifetime", "45s") as (proc, port):
        workers = children(proc.pid)  # the two workers (and multiprocessing's resource tracker)
        assert len(workers) >= 2, workers
        first = handshake(port, unverified())
        wait_until(lambda: handshake(port, unverified()).serial_number != first.serial_number,
                   "a new certificate served")
        renewed = handshake(port, unverified())
        # every new handshake (whichever worker takes it) presents a certificate issued after the first
        wait_until(lambda: all(handshake(port, unverified()).not_valid_before_utc > first.not_valid_before_utc
                               for _ in range(12)), "both workers serve the renewed certificate")
        current = handshake(port, trust(tls_ca))  # verifies against the root, valid now
        assert proc.poll() is None and children(proc.pid) == workers, "a process was restarted"
        audit = json.loads(tls_ca.cli("audit", "--json", "--limit", "500").stdout)
    for cert in (first, renewed, current):
        cert.verify_directly_issued_by(issuer_of(tls_ca))
        assert x509.IPAddress(ipaddress.ip_address("127.0.0.1")) in sans(cert)
        assert cert.not_valid_after_utc - cert.not_valid_before_utc <= dt.timedelta(seconds=45)
    issued = {e["serial"] for e in audit if e["action"] == "issued" and e["template"] == "_api-server"}
    assert {format(c.serial_number, "x") for c in (first, renewed, current)} <= issued


def test_a_restart_keeps_a_fresh_certificate_and_reissues_when_the_names_change(tls_ca: CA) -> None:
    with serve(tls_ca, "--tls-name", "old-name.example.test", tls=True) as base:
        before = handshake(port_of(base), trust(tls_ca), "old-name.example.test")
    with serve(tls_ca, "--tls-name", "old-name.example.test", tls=True) as base:
        assert handshake(port_of(base), trust(tls_ca)) == before  # fresh, same names: kept
    with serve(tls_ca, "--tls-name", "new-name.example.test", tls=True) as base:
        after = handshake(port_of(base), trust(tls_ca), "new-name.example.test")
    assert after.serial_number != before.serial_number
    assert (tls_ca.dir / "tls" / "server.key").stat().st_mode & 0o777 == 0o600
    assert (tls_ca.dir / "tls").stat().st_mode & 0o777 == 0o700


# -- the fingerprint agents pin ------------------------------------------------------------------

def test_the_fingerprint_is_printed_by_init_principal_and_status(tmp_path: Path) -> None:
    directory = tmp_path / "ca"
    out = run_cli("ca", "init", "--dir", str(directory), "--database", sqlite_url(tmp_path / "ca.db")).stdout
    ca = CA(directory, "", sqlite_url(tmp_path / "ca.db"))
    expected = root_sha256(ca)
    line = next(line for line in out.splitlines() if line.startswith("Root fingerprint"))
    assert "certpulse agent init --ca-fingerprint" in line and line.endswith(f": {expected}"), line

    added = run_cli("principal", "add", "fp-1.example.test", "--dir", str(directory)).stdout
    assert f"--ca-fingerprint ...`): {expected}" in added, added
    token_text = run_cli("principal", "token", "fp-1.example.test", "--dir", str(directory)).stdout
    assert f": {expected}" in token_text, token_text
    for args in (["principal", "add", "fp-2.example.test"], ["principal", "token", "fp-2.example.test"]):
        document = json.loads(run_cli(*args, "--json", "--dir", str(directory)).stdout)
        assert document["ca_fingerprint"] == expected and document["token"].startswith("cpe_"), document

    status = json.loads(run_cli("ca", "status", "--json", "--dir", str(directory)).stdout)
    assert status["ca_fingerprint"] == expected
    assert status["database"] == "sqlite" and status["tls"] is None
    assert [i["name"] for i in status["issuers"]] == ["issuing-1"] and status["issuers"][0]["not_after"]
    text = run_cli("ca", "status", "--dir", str(directory)).stdout
    assert f"root fingerprint: {expected}" in text and "issuing-1" in text, text


def test_fingerprints_are_read_however_they_were_typed() -> None:
    root = self_signed().certificate
    value = ca_fingerprint(root)
    assert value == hashlib.sha256(root.public_bytes(serialization.Encoding.DER)).hexdigest()
    colons = ":".join(value[i:i + 2] for i in range(0, 64, 2)).upper()
    assert parse_fingerprint(colons) == value
    assert parse_fingerprint(f"  sha256:{value.upper()} ") == value
    for bad in (value[:-1], value + "0", "g" * 64, "", f"{value[:62]}zz"):
        with pytest.raises(Refusal):
            parse_fingerprint(bad)


def test_server_names_drop_the_any_address_and_refuse_what_is_no_name() -> None:
    names = server_names("0.0.0.0", ["CA.Example.Test.", "::1"])  # noqa: S104 - a name list, nothing binds
    assert names.dns == ("localhost", "ca.example.test") and names.ip == ("127.0.0.1", "::1")
    assert server_names("[::1]").ip == ("::1", "127.0.0.1")
    for bad in ("a b", "under_score.example", "", "x" * 64 + ".example"):
        with pytest.raises(Refusal):
            server_names("127.0.0.1", [bad])



def test_a_stop_does_not_wait_for_idle_tls_clients(tls_ca: CA) -> None:
    """SIGTERM stops the server at once although a client keeps an idle TLS connection in its pool.
    A plain close would wait for that client's close_notify, which it never sends: asyncio then
    gives up after 30 s, and every stop (systemd, a test fixture, the demo) took that long."""
    with serving_process(tls_ca) as (proc, port), httpx.Client(
            base_url=f"https://127.0.0.1:{port}", verify=trust(tls_ca), timeout=30) as client:
        assert client.get("/healthz").status_code == 200  # the connection stays in the pool
        started = time.monotonic()
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=WAIT)
        # well under the 30 s a close would wait; generous for a busy machine
        assert time.monotonic() - started < 20, "the stop waited for an idle client"
