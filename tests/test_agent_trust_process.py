"""The agent's trust in its CA, through real processes: ``agent init`` pins the root (by
fingerprint or file), every connection is verified against the pins alone, a policy with a root
not under the pins is trusted for nothing, a root rollover is followed only through a
cross-certificate, and every HTTP call ends by its total deadline."""

from __future__ import annotations

import contextlib
import json
import ssl
import stat
import subprocess
import sys
import threading
import time
import tomllib
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import tomli_w
from cryptography import x509

from agent_support import (
    Agent,
    action_for,
    long_lived_tls,
    new_agent,
    one_line_error,
    prepare_ca,
    root_context,
    root_fingerprint,
    wait_for,
)
from certpulse.agent.client import CAClient, ServerUnavailable
from certpulse.machine.locks import AgentLock
from hostile_proxy import HostileProxy
from pki_factory import Authority, pem
from support import CA, init_ca, load_cert, run_cli, serve

TRICKLE = Path(__file__).parent / "trickle_server.py"


@pytest.fixture(scope="module")
def stranger(tmp_path_factory: pytest.TempPathFactory) -> CA:
    """Another CA (same software, same names), standing in for a man in the middle."""
    directory = tmp_path_factory.mktemp("stranger") / "ca"
    ca = init_ca(directory, f"sqlite:///{directory.parent / 'ca.db'}")
    long_lived_tls(ca)
    return ca


def _init(ca: CA, url: str, directory: Path, *extra: str, token: str | None = None) -> subprocess.CompletedProcess[str]:
    token = token or ca.add_principal(f"host-{uuid.uuid4().hex[:10]}.example.internal")
    return run_cli("agent", "init", "--dir", str(directory), "--server", url, "--token", token, *extra, check=False)


def _nothing_written(directory: Path) -> None:
    assert not (directory / "agent.toml").exists() and not (directory / "credential").exists()
    assert not (directory / "trust").exists()


# -- agent init pins the root -------------------------------------------------------------------------

def test_init_pins_the_root_whose_fingerprint_is_given(pki: CA, ca_url: str, tmp_path: Path) -> None:
    plain = root_fingerprint(pki)
    spelled = ":".join(plain[i:i + 2] for i in range(0, 64, 2)).upper()  # as other tools print it
    directory = tmp_path / "agent"
    result = _init(pki, ca_url, directory, "--ca-fingerprint", spelled)
    assert result.returncode == 0, result.stderr
    assert plain in result.stdout
    config = tomllib.loads((directory / "agent.toml").read_text())
    [server] = config["policy_servers"]
    assert (server["url"], server["trust_roots"], server["insecure_http"]) == (ca_url, "trust/roots.pem", False)
    pins = x509.load_pem_x509_certificates((directory / "trust" / "roots.pem").read_bytes())
    assert pins == [load_cert((pki.dir / "certs" / "root.pem").read_text())]
    assert stat.S_IMODE((directory / "trust").stat().st_mode) == 0o700
    assert stat.S_IMODE((directory / "trust" / "roots.pem").stat().st_mode) == 0o644
    agent = Agent(directory, "", pki)
    assert action_for(agent.pulse(), "machine")["outcome"] == "done"


def test_init_with_a_ca_file_pins_that_root(pki: CA, ca_url: str, tmp_path: Path) -> None:
    root = pki.dir / "certs" / "root.pem"
    result = _init(pki, ca_url, tmp_path / "agent", "--ca-file", str(root))
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "agent" / "trust" / "roots.pem").read_text() == root.read_text()


def test_a_wrong_fingerprint_is_refused_and_nothing_is_written(
        pki: CA, ca_url: str, stranger: CA, tmp_path: Path) -> None:
    directory = tmp_path / "agent"
    token = pki.add_principal(f"host-{uuid.uuid4().hex[:10]}.example.internal")
    refused = _init(pki, ca_url, directory, "--ca-fingerprint", root_fingerprint(stranger), token=token)
    line = one_line_error(refused, "forbidden")
    assert root_fingerprint(stranger) in line and "Nothing was written" in line
    _nothing_written(directory)
    # The token never left: the right fingerprint enrolls with it.
    accepted = _init(pki, ca_url, directory, "--ca-fingerprint", root_fingerprint(pki), token=token)
    assert accepted.returncode == 0, accepted.stderr


def test_a_ca_file_of_another_ca_is_refused_at_the_tls_handshake(
        pki: CA, ca_url: str, stranger: CA, tmp_path: Path) -> None:
    directory = tmp_path / "agent"
    refused = _init(pki, ca_url, directory, "--ca-file", str(stranger.dir / "certs" / "root.pem"))
    assert "CERTIFICATE_VERIFY_FAILED" in one_line_error(refused, "unavailable")
    _nothing_written(directory)


@pytest.mark.parametrize(("args", "why"), [
    ([], "exactly one of --ca-fingerprint or --ca-file"),
    (["--ca-fingerprint", "ab" * 32, "--ca-file", "/dev/null"], "exactly one of --ca-fingerprint or --ca-file"),
    (["--ca-fingerprint", "not-hex"], "64 hex digits"),
    (["--ca-fingerprint", "ab" * 31], "64 hex digits"),
])
def test_init_needs_exactly_one_well_formed_pin(pki: CA, ca_url: str, tmp_path: Path, args: list[str],
                                                why: str) -> None:
    refused = _init(pki, ca_url, tmp_path / "agent", *args)
    assert why in one_line_error(refused, "invalid-argument")
    _nothing_written(tmp_path / "agent")


def test_an_http_url_is_refused_without_insecure_http_and_still_needs_a_pin(pki: CA, tmp_path: Path) -> None:
    with serve(pki) as http_url:
        refused = _init(pki, http_url, tmp_path / "agent", "--ca-fingerprint", root_fingerprint(pki))
        assert "plain http" in one_line_error(refused, "invalid-argument")
        _nothing_written(tmp_path / "agent")
        unpinned = _init(pki, http_url, tmp_path / "agent", "--insecure-http")
        assert "exactly one of" in one_line_error(unpinned, "invalid-argument")
        _nothing_written(tmp_path / "agent")
        accepted = _init(pki, http_url, tmp_path / "agent", "--insecure-http", "--ca-fingerprint",
                         root_fingerprint(pki))
        assert accepted.returncode == 0, accepted.stderr
    [server] = tomllib.loads((tmp_path / "agent" / "agent.toml").read_text())["policy_servers"]
    assert server["insecure_http"] is True and server["trust_roots"] == "trust/roots.pem"


# -- a man in the middle ------------------------------------------------------------------------------

class Impostor:
    """A TLS server with another CA's certificate that records every request it is sent, and
    serves the genuine root at /v1/roots (roots are public: a fingerprint must still not help it)."""

    def __init__(self, ca: CA, genuine_root: str) -> None:
        self.seen: list[tuple[str, str, str | None]] = []  # method, path, Authorization
        impostor = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                return

            def do_GET(self) -> None:
                impostor.seen.append(("GET", self.path, self.headers.get("Authorization")))
                body = json.dumps({"roots": [genuine_root]} if self.path == "/v1/roots" else {}).encode()
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_POST(self) -> None:
                impostor.seen.append(("POST", self.path, self.headers.get("Authorization")))
                self.send_response(500)
                self.end_headers()

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(ca.dir / "tls" / "server.pem", ca.dir / "tls" / "server.key")
        self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
        self.url = f"https://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)

    @classmethod
    @contextlib.contextmanager
    def running(cls, ca: CA, genuine_root: str) -> Iterator[Impostor]:
        impostor = cls(ca, genuine_root)
        impostor.thread.start()
        try:
            yield impostor
        finally:
            impostor.server.shutdown()
            impostor.server.server_close()
            impostor.thread.join(timeout=10)


def test_an_initialised_agent_refuses_a_server_with_another_cas_certificate(
        pki: CA, ca_url: str, stranger: CA, tmp_path: Path) -> None:
    agent = new_agent(pki, ca_url, tmp_path / "agent")
    with Impostor.running(stranger, (pki.dir / "certs" / "root.pem").read_text()) as impostor:
        path = agent.dir / "agent.toml"
        config = tomllib.loads(path.read_text())
        config["policy_servers"][0]["url"] = impostor.url  # the network now leads to the impostor
        path.write_text(tomli_w.dumps(config))
        result = agent.pulse(ok=False)
        assert "CERTIFICATE_VERIFY_FAILED" in result["error"], result
        assert impostor.seen == []  # no request, so no credential, ever reached it
    assert agent.certs() == []


def test_init_against_an_impostor_serving_the_genuine_root_sends_no_token(
        pki: CA, stranger: CA, tmp_path: Path) -> None:
    with Impostor.running(stranger, (pki.dir / "certs" / "root.pem").read_text()) as impostor:
        refused = _init(pki, impostor.url, tmp_path / "agent", "--ca-fingerprint", root_fingerprint(pki))
        assert "CERTIFICATE_VERIFY_FAILED" in one_line_error(refused, "unavailable")
        assert impostor.seen == [("GET", "/v1/roots", None)]  # the token was never sent
    _nothing_written(tmp_path / "agent")


def test_a_policy_carrying_a_root_without_a_cross_signature_is_trusted_for_nothing(
        pki: CA, ca_url: str, tmp_path: Path) -> None:
    rogue_root = Authority.root("certpulse Root CA")
    rogue_issuer = rogue_root.subordinate("certpulse Issuing CA issuing-1")

    def swap(doc: dict[str, Any]) -> dict[str, Any]:
        issuers = [{**i, "certificate": pem(rogue_issuer.certificate)} for i in doc["issuers"]]
        return {**doc, "roots": [*doc["roots"], pem(rogue_root.certificate)], "issuers": issuers}

    with HostileProxy.running(ca_url, root_context(pki)) as proxy:
        # Plain http to the proxy (--insecure-http): the pin still decides what is trusted.
        agent = new_agent(pki, proxy.url, tmp_path / "agent")
        pins = (agent.dir / "trust" / "roots.pem").read_text()
        proxy.rewrite_policy = swap
        result = agent.pulse(ok=False)
        assert "neither pinned nor cross-signed by a pinned root" in result["error"], result
        assert [n["rule"] for n in result["notes"]] == ["untrusted-root"]
        assert result["actions"] == [] and proxy.requests_to("POST", "/v1/requests") == 0
        assert agent.certs() == [] and (agent.dir / "trust" / "roots.pem").read_text() == pins
        proxy.rewrite_policy = None  # the honest policy works again
        assert action_for(agent.pulse(), "machine")["outcome"] == "done"


# -- root rollover ------------------------------------------------------------------------------------

def test_root_rollover_is_followed_through_the_cross_certificate(tmp_path: Path) -> None:
    ca = prepare_ca(tmp_path / "ca")
    old_root = load_cert((ca.dir / "certs" / "root.pem").read_text())
    with serve(ca, tls=True) as url:
        agent = new_agent(ca, url, tmp_path / "agent")
        first = action_for(agent.pulse(), "machine")
        assert first["outcome"] == "done"
        old_cert = load_cert((agent.live("machine") / "cert.pem").read_text())

        out = ca.cli("ca", "rollover-root").stdout
        new_root = load_cert((ca.dir / "certs" / "root-r2.pem").read_text())
        assert new_root.subject != old_root.subject and new_root.subject == new_root.issuer
        fingerprint = out.split("SHA-256): ")[1].split()[0]

        pulsed = json.loads(agent.run("agent", "pulse", "--json", "--refresh-policy").stdout)
        assert pulsed["outcome"] == "ok", pulsed
        [note] = [n for n in pulsed["notes"] if n["rule"] == "root-pinned"]
        assert fingerprint in note["detail"]
        pins = x509.load_pem_x509_certificates((agent.dir / "trust" / "roots.pem").read_bytes())
        assert pins == [old_root, new_root]

        # A year on, the renewal comes from the new issuer and chains to the new root.
        renewed = action_for(agent.pulse(faketime="+330d"), "machine")
        assert (renewed["kind"], renewed["outcome"]) == ("renew", "done"), renewed
        folder = agent.live("machine")
        cert = load_cert((folder / "cert.pem").read_text())
        [issuer] = x509.load_pem_x509_certificates((folder / "chain.pem").read_bytes())[:1]
        assert cert.issuer != old_cert.issuer and cert.issuer == issuer.subject
        cert.verify_directly_issued_by(issuer)
        issuer.verify_directly_issued_by(new_root)
        assert "issuing-r2" in issuer.subject.rfc4514_string()


# -- the total deadline -------------------------------------------------------------------------------

@contextlib.contextmanager
def trickling(mode: str, tmp_path: Path) -> Iterator[int]:
    """The trickling server as a process of its own; yields its port."""
    port_file = tmp_path / f"trickle-{mode}.port"
    proc = subprocess.Popen([sys.executable, str(TRICKLE), mode, str(port_file)])
    try:
        yield int(wait_for(lambda: port_file.exists() and port_file.read_text(), 30, "the trickling server"))
    finally:
        proc.kill()
        proc.wait(timeout=10)


@pytest.mark.parametrize("mode", ["headers", "body", "silent"])
def test_a_trickling_server_cannot_hold_a_call_past_its_deadline(mode: str, tmp_path: Path) -> None:
    with trickling(mode, tmp_path) as port:
        scheme = "https" if mode == "silent" else "http"  # silent: the TLS handshake never ends
        context = ssl.create_default_context()
        client = CAClient(f"{scheme}://127.0.0.1:{port}", "cpc_x", verify=context, deadline=2)
        started = time.monotonic()
        with pytest.raises(ServerUnavailable) as failed:
            client.policy()
        elapsed = time.monotonic() - started
        client.close()
    assert 1.5 <= elapsed < 20, elapsed  # per-read timeouts alone (30 s each) would never end
    assert "within 2 s" in failed.value.detail


@pytest.mark.parametrize("mode", ["headers", "silent"])
def test_a_pulse_against_a_trickling_server_ends_by_the_configured_deadline_and_frees_the_store(
        pki: CA, ca_url: str, tmp_path: Path, mode: str) -> None:
    agent = new_agent(pki, ca_url, tmp_path / "agent")
    with trickling(mode, tmp_path) as port:
        path = agent.dir / "agent.toml"
        config = tomllib.loads(path.read_text())
        scheme = "https" if mode == "silent" else "http"
        config["policy_servers"][0].update(url=f"{scheme}://127.0.0.1:{port}", insecure_http=scheme == "http")
        config["http_deadline"] = 3
        path.write_text(tomli_w.dumps(config))
        started = time.monotonic()
        result = agent.pulse(ok=False)
        elapsed = time.monotonic() - started
        assert "within 3 s" in result["error"], result
        assert elapsed < 40, elapsed  # 3 s, plus the start of a Python process on a busy machine
        assert AgentLock(agent.dir).holder() is None
        again = agent.pulse(ok=False)  # the store lock is free: the next pulse takes it
        assert "within 3 s" in again["error"]


def test_http_deadline_is_checked_in_agent_toml(pki: CA, ca_url: str, tmp_path: Path) -> None:
    agent = new_agent(pki, ca_url, tmp_path / "agent")
    agent.set_config(http_deadline=0)
    assert "http_deadline" in one_line_error(agent.run("agent", "pulse", check=False), "invalid-argument")


def test_a_policy_server_without_pins_is_refused_at_load(pki: CA, ca_url: str, tmp_path: Path) -> None:
    agent = new_agent(pki, ca_url, tmp_path / "agent")
    path = agent.dir / "agent.toml"
    config = tomllib.loads(path.read_text())
    del config["policy_servers"][0]["trust_roots"]
    path.write_text(tomli_w.dumps(config))
    assert "no trust_roots" in one_line_error(agent.run("agent", "pulse", check=False), "invalid-argument")

