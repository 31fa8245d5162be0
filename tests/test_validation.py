"""ACME challenge validation (certpulse.validation) against real servers on loopback.

Names resolve through a real ``pebble-challtestsrv`` (tests/challtestsrv.py) configured as the
validation resolver, as ``[acme] dns_resolver`` does in the ACME tests; http-01 answers come from
a stdlib HTTP server thread, tls-alpn-01 answers from a stdlib TLS server with certificates made
by cryptography. No CA is involved: the module is self-contained and takes a few seconds.
"""

from __future__ import annotations

import concurrent.futures
import datetime as dt
import gzip
import hashlib
import http.server
import ipaddress
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import dns.message
import dns.rcode
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from certpulse.ca.config import ACMEConfig
from certpulse.validation import Outcome, ValidationSettings, dns01_txt_value, validate
from challtestsrv import ChallTestSrv
from support import free_port

THUMBPRINT = "NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs"  # RFC 7638's example thumbprint
NAME = "web.example.internal"
GENEROUS = 30.0  # an upper bound on how long a failing validation may take on a busy machine


def key_authorization(token: str) -> str:
    return f"{token}.{THUMBPRINT}"


def token_for(label: str) -> str:
    """A distinct base64url token per test (the HTTP server picks its behaviour by token)."""
    return (label.replace(".", "-") + "-" + "A" * 22)[:64]


@pytest.fixture(scope="module")
def dns_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ChallTestSrv]:
    with ChallTestSrv(tmp_path_factory.mktemp("challtestsrv")) as server:
        yield server


# -- an HTTP server answering http-01 requests as each test tells it ------------------------------

Behaviour = Callable[[http.server.BaseHTTPRequestHandler], None]


class ChallengeHTTPServer:
    """Answers ``/.well-known/acme-challenge/<token>`` with the behaviour registered for the
    token (404 otherwise); records every request's path and Host header."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        self.behaviours: dict[str, Behaviour] = {}
        self.requests: list[tuple[str, str | None]] = []
        self.release = threading.Event()  # set at teardown: stalled answers end
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                outer.requests.append((self.path, self.headers.get("Host")))
                token = self.path.rsplit("/", 1)[-1]
                behaviour = outer.behaviours.get(token) if self.path.startswith("/.well-known/acme-challenge/") \
                    else None
                if behaviour is None:
                    send(self, 404, b"not here")
                else:
                    behaviour(self)

            def log_message(self, format: str, *args: object) -> None:
                pass

        class Server(http.server.ThreadingHTTPServer):
            address_family = socket.AF_INET6 if ":" in host else socket.AF_INET

            def handle_error(self, request: object, client_address: object) -> None:
                pass  # a behaviour that hangs up on purpose is not an error to print

        self.server = Server((host, 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def hosts_for(self, token: str) -> list[str | None]:
        return [host for path, host in self.requests if path.endswith("/" + token)]

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


def send(handler: http.server.BaseHTTPRequestHandler, status: int, body: bytes,
         headers: dict[str, str] | None = None) -> None:
    handler.send_response(status)
    for name, value in (headers or {}).items():
        handler.send_header(name, value)
    handler.send_header("Content-Length", str(len(body)))
    handler.end_headers()
    handler.wfile.write(body)


@pytest.fixture(scope="module")
def web() -> Iterator[ChallengeHTTPServer]:
    server = ChallengeHTTPServer()
    yield server
    server.close()


@pytest.fixture
def settings(dns_server: ChallTestSrv, web: ChallengeHTTPServer) -> ValidationSettings:
    return ValidationSettings(http01_port=web.port, tlsalpn01_port=free_port(), dns_resolver=dns_server.resolver,
                              timeout=10.0)


def http01(token: str, settings: ValidationSettings, name: str = NAME, identifier_type: str = "dns") -> Outcome:
    return validate("http-01", identifier_type, name, token, key_authorization(token), settings)


def assert_printable(outcome: Outcome) -> None:
    assert outcome.detail.isprintable() and len(outcome.detail) <= 400, outcome.detail


# -- http-01 --------------------------------------------------------------------------------------


def test_http01_valid_through_the_configured_resolver(web: ChallengeHTTPServer,
                                                      settings: ValidationSettings) -> None:
    token = token_for("valid")
    web.behaviours[token] = lambda h: send(h, 200, key_authorization(token).encode() + b"\r\n \n")
    outcome = http01(token, settings)
    assert outcome.valid and outcome.error is None, outcome
    assert web.hosts_for(token) == [NAME]  # Host: the name, the address from the resolver
    assert outcome.record["address_used"] == "127.0.0.1"
    assert outcome.record["addresses_resolved"] == ["127.0.0.1"]
    assert outcome.record["resolver"] == f"127.0.0.1:{settings.dns_resolver[1]}"  # type: ignore[index]
    assert outcome.record["url"] == f"http://{NAME}:{web.port}/.well-known/acme-challenge/{token}"


def test_http01_for_an_ip_identifier_asks_the_address_itself(web: ChallengeHTTPServer,
                                                             settings: ValidationSettings) -> None:
    token = token_for("ip")
    web.behaviours[token] = lambda h: send(h, 200, key_authorization(token).encode())
    outcome = http01(token, settings, name="127.0.0.1", identifier_type="ip")
    assert outcome.valid, outcome
    assert web.hosts_for(token) == ["127.0.0.1"]
    assert outcome.record["address_used"] == "127.0.0.1"


@pytest.fixture(scope="module")
def web6() -> Iterator[ChallengeHTTPServer]:
    server = ChallengeHTTPServer("::1")
    yield server
    server.close()


def test_http01_falls_back_from_a_to_aaaa(dns_server: ChallTestSrv, web6: ChallengeHTTPServer,
                                          settings: ValidationSettings) -> None:
    """A first (127.0.0.2: nothing listens there), then AAAA (::1, where the server is)."""
    token = token_for("dual")
    web6.behaviours[token] = lambda h: send(h, 200, key_authorization(token).encode())
    dns_server.add_a("dual.example.internal", "127.0.0.2")
    dns_server.add_aaaa("dual.example.internal", "::1")
    at_port = ValidationSettings(http01_port=web6.port, dns_resolver=settings.dns_resolver)
    outcome = http01(token, at_port, name="dual.example.internal")
    assert outcome.valid, outcome
    assert outcome.record["addresses_resolved"] == ["127.0.0.2", "::1"]
    assert outcome.record["address_used"] == "::1"
    assert web6.hosts_for(token) == ["dual.example.internal"]


def test_http01_for_an_ipv6_identifier(web6: ChallengeHTTPServer, settings: ValidationSettings) -> None:
    token = token_for("ip6")
    web6.behaviours[token] = lambda h: send(h, 200, key_authorization(token).encode())
    outcome = http01(token, ValidationSettings(http01_port=web6.port), name="::1", identifier_type="ip")
    assert outcome.valid, outcome
    assert web6.hosts_for(token) == ["[::1]"]
    assert outcome.record["url"] == f"http://[::1]:{web6.port}/.well-known/acme-challenge/{token}"


def test_http01_uses_the_address_the_resolver_gives(dns_server: ChallTestSrv, web: ChallengeHTTPServer,
                                                    settings: ValidationSettings) -> None:
    """The A record points at 127.0.0.2, where nothing listens on the port: a connection
    failure there, though the same port on 127.0.0.1 would have answered."""
    token = token_for("elsewhere")
    web.behaviours[token] = lambda h: send(h, 200, key_authorization(token).encode())
    dns_server.add_a("elsewhere.example.internal", "127.0.0.2")
    outcome = http01(token, settings, name="elsewhere.example.internal")
    assert not outcome.valid and outcome.error == "connection", outcome
    assert outcome.record["address_used"] == "127.0.0.2"
    assert web.hosts_for(token) == []


def test_http01_wrong_answer_is_an_incorrect_response(web: ChallengeHTTPServer,
                                                      settings: ValidationSettings) -> None:
    token = token_for("wrong")
    web.behaviours[token] = lambda h: send(h, 200, key_authorization(token).encode() + b"x")
    outcome = http01(token, settings)
    assert (outcome.valid, outcome.error) == (False, "incorrectResponse"), outcome
    assert_printable(outcome)


def test_http01_leading_whitespace_is_not_ignored(web: ChallengeHTTPServer, settings: ValidationSettings) -> None:
    token = token_for("leading")
    web.behaviours[token] = lambda h: send(h, 200, b" " + key_authorization(token).encode())
    assert http01(token, settings).error == "incorrectResponse"


def test_http01_hostile_answer_is_shown_printable(web: ChallengeHTTPServer, settings: ValidationSettings) -> None:
    token = token_for("hostile")
    web.behaviours[token] = lambda h: send(h, 200, b"\x1b]0;owned\x07\x1b[2J\r" + "\u202e".encode())
    outcome = http01(token, settings)
    assert outcome.error == "incorrectResponse"
    assert "\x1b" not in outcome.detail and "\r" not in outcome.detail
    assert_printable(outcome)


def test_http01_not_found_is_unauthorized_with_the_status(web: ChallengeHTTPServer,
                                                          settings: ValidationSettings) -> None:
    outcome = http01(token_for("missing"), settings)
    assert (outcome.valid, outcome.error) == (False, "unauthorized"), outcome
    assert "404" in outcome.detail
    assert outcome.record["status"] == 404


def test_http01_redirects_are_not_followed(web: ChallengeHTTPServer, settings: ValidationSettings) -> None:
    token, target = token_for("redirect"), token_for("target")
    location = f"http://{NAME}:{web.port}/.well-known/acme-challenge/{target}"
    web.behaviours[token] = lambda h: send(h, 302, b"", {"Location": location})
    web.behaviours[target] = lambda h: send(h, 200, key_authorization(token).encode())
    outcome = http01(token, settings)
    assert (outcome.valid, outcome.error) == (False, "unauthorized"), outcome
    assert "302" in outcome.detail and "not followed" in outcome.detail
    assert web.hosts_for(target) == []


def test_http01_huge_body_is_an_incorrect_response(web: ChallengeHTTPServer, settings: ValidationSettings) -> None:
    token = token_for("huge")
    web.behaviours[token] = lambda h: send(h, 200, key_authorization(token).encode() + b" " * 2_000_000)
    outcome = http01(token, settings)
    assert (outcome.valid, outcome.error) == (False, "incorrectResponse"), outcome
    assert "8192" in outcome.detail


def test_http01_stalled_answer_times_out_as_connection(web: ChallengeHTTPServer,
                                                       settings: ValidationSettings) -> None:
    """Headers, then nothing until the test ends: the validation gives up after its budget."""
    token = token_for("stall")

    def stall(handler: http.server.BaseHTTPRequestHandler) -> None:
        handler.send_response(200)
        handler.send_header("Content-Length", "1000")
        handler.end_headers()
        handler.wfile.write(b"partial")
        handler.wfile.flush()
        web.release.wait(GENEROUS * 2)

    web.behaviours[token] = stall
    started = time.monotonic()
    outcome = http01(token, ValidationSettings(http01_port=settings.http01_port, dns_resolver=settings.dns_resolver,
                                               timeout=0.5))
    assert (outcome.valid, outcome.error) == (False, "connection"), outcome
    assert "timed out" in outcome.detail or "gave up" in outcome.detail
    assert time.monotonic() - started < GENEROUS


def test_http01_trickled_answer_is_cut_at_the_budget(web: ChallengeHTTPServer,
                                                     settings: ValidationSettings) -> None:
    """A byte now and then, each well within a read timeout: the whole budget still bounds it."""
    token = token_for("trickle")

    def trickle(handler: http.server.BaseHTTPRequestHandler) -> None:
        handler.send_response(200)
        handler.send_header("Content-Length", "5000")
        handler.end_headers()
        for _ in range(5000):
            handler.wfile.write(b" ")
            handler.wfile.flush()
            if web.release.wait(0.1):
                return

    web.behaviours[token] = trickle
    started = time.monotonic()
    outcome = http01(token, ValidationSettings(http01_port=settings.http01_port, dns_resolver=settings.dns_resolver,
                                               timeout=1.0))
    assert (outcome.valid, outcome.error) == (False, "connection"), outcome
    assert "gave up after 1 s" in outcome.detail
    assert time.monotonic() - started < GENEROUS


def test_http01_compressed_answer_is_not_inflated(web: ChallengeHTTPServer, settings: ValidationSettings) -> None:
    token = token_for("gzip")
    web.behaviours[token] = lambda h: send(h, 200, gzip.compress(key_authorization(token).encode()),
                                           {"Content-Encoding": "gzip"})
    assert http01(token, settings).error == "incorrectResponse"


def answering(body: bytes) -> Behaviour:
    return lambda handler: send(handler, 200, body)


def test_validations_run_side_by_side_in_threads(web: ChallengeHTTPServer, settings: ValidationSettings) -> None:
    """As the front end runs them: from a thread pool, each with its own answer."""
    tokens = [token_for(f"pool{n}") for n in range(16)]
    for token in tokens:
        web.behaviours[token] = answering(key_authorization(token).encode())
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        outcomes = list(pool.map(lambda token: http01(token, settings), tokens))
    assert all(outcome.valid for outcome in outcomes), outcomes


def test_http01_closed_connection_is_a_connection_error(web: ChallengeHTTPServer,
                                                        settings: ValidationSettings) -> None:
    token = token_for("closed")

    def hang_up(handler: http.server.BaseHTTPRequestHandler) -> None:
        handler.close_connection = True
        handler.connection.shutdown(socket.SHUT_RDWR)

    web.behaviours[token] = hang_up
    outcome = http01(token, settings)
    assert (outcome.valid, outcome.error) == (False, "connection"), outcome
    assert_printable(outcome)


def test_http01_answer_that_is_not_http(settings: ValidationSettings) -> None:
    """A server that answers with bytes that are not HTTP (and would recolour a terminal)."""
    with socket.create_server(("127.0.0.1", 0)) as listener:

        def answer() -> None:
            conn, _ = listener.accept()
            with conn:
                conn.settimeout(GENEROUS)
                conn.recv(4096)
                conn.sendall(b"\x1b[31mSSH-2.0-nothing\x1b]0;title\x07\r\n\r\n")

        thread = threading.Thread(target=answer, daemon=True)
        thread.start()
        odd = ValidationSettings(http01_port=listener.getsockname()[1], dns_resolver=settings.dns_resolver)
        outcome = http01(token_for("garbage"), odd)
        thread.join(GENEROUS)
    assert (outcome.valid, outcome.error) == (False, "connection"), outcome
    assert_printable(outcome)


def test_http01_refused_connection(settings: ValidationSettings) -> None:
    closed = ValidationSettings(http01_port=free_port(), dns_resolver=settings.dns_resolver, timeout=10.0)
    outcome = http01(token_for("refused"), closed)
    assert (outcome.valid, outcome.error) == (False, "connection"), outcome
    assert outcome.record["port"] == closed.http01_port


def test_http01_name_without_address_is_a_dns_error(tmp_path: Path, web: ChallengeHTTPServer) -> None:
    with ChallTestSrv(tmp_path, default_ipv4="") as empty:
        outcome = http01(token_for("noaddr"), ValidationSettings(http01_port=web.port, dns_resolver=empty.resolver))
    assert (outcome.valid, outcome.error) == (False, "dns"), outcome
    assert "no A or AAAA" in outcome.detail


def test_http01_servfail_is_a_dns_error(dns_server: ChallTestSrv, settings: ValidationSettings) -> None:
    dns_server.set_servfail("broken.example.internal")
    outcome = http01(token_for("servfail"), settings, name="broken.example.internal")
    assert (outcome.valid, outcome.error) == (False, "dns"), outcome


class NxdomainResolver:
    """A DNS server on loopback UDP that says every name does not exist (pebble-challtestsrv
    answers every name, so the NXDOMAIN case needs its own server)."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.port: int = self.sock.getsockname()[1]
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                wire, peer = self.sock.recvfrom(4096)
            except OSError:
                return
            response = dns.message.make_response(dns.message.from_wire(wire))
            response.set_rcode(dns.rcode.NXDOMAIN)
            self.sock.sendto(response.to_wire(), peer)

    def close(self) -> None:
        self.sock.close()


@pytest.mark.parametrize("challenge", ["http-01", "dns-01", "tls-alpn-01"])
def test_nxdomain_is_a_dns_error(web: ChallengeHTTPServer, challenge: str) -> None:
    resolver = NxdomainResolver()
    try:
        token = token_for("nx")
        outcome = validate(challenge, "dns", "gone.example.internal", token, key_authorization(token),
                           ValidationSettings(http01_port=web.port, dns_resolver=("127.0.0.1", resolver.port)))
    finally:
        resolver.close()
    assert (outcome.valid, outcome.error) == (False, "dns"), outcome
    assert "does not exist" in outcome.detail


def test_unanswering_resolver_is_a_dns_error(web: ChallengeHTTPServer) -> None:
    silent = ValidationSettings(http01_port=web.port, dns_resolver=("127.0.0.1", free_port()), timeout=1.0)
    started = time.monotonic()
    outcome = http01(token_for("silent"), silent)
    assert (outcome.valid, outcome.error) == (False, "dns"), outcome
    assert time.monotonic() - started < GENEROUS


# -- refusals before any connection ----------------------------------------------------------------


@pytest.mark.parametrize(("challenge", "identifier_type", "value", "token"), [
    ("http-01", "dns", "*.web.example.internal", token_for("t")),
    ("tls-alpn-01", "dns", "*.web.example.internal", token_for("t")),
    ("dns-01", "ip", "127.0.0.1", token_for("t")),
    ("http-02", "dns", NAME, token_for("t")),
    ("http-01", "email", "a@example.internal", token_for("t")),
    ("http-01", "dns", "bad name\r\n.example.internal", token_for("t")),
    ("http-01", "ip", "127.0.0.300", token_for("t")),
    ("http-01", "dns", NAME, "../../etc/passwd-AAAAAAAAAAAA"),
    ("http-01", "dns", NAME, "short"),
])
def test_malformed_requests_are_refused_without_connecting(web: ChallengeHTTPServer, settings: ValidationSettings,
                                                           challenge: str, identifier_type: str, value: str,
                                                           token: str) -> None:
    before = len(web.requests)
    outcome = validate(challenge, identifier_type, value, token, key_authorization(token), settings)
    assert (outcome.valid, outcome.error) == (False, "malformed"), outcome
    assert_printable(outcome)
    assert all(str(value).isprintable() for value in outcome.record.values())
    assert len(web.requests) == before


def test_no_time_budget_is_refused(settings: ValidationSettings) -> None:
    token = token_for("t")
    none = ValidationSettings(http01_port=settings.http01_port, dns_resolver=settings.dns_resolver, timeout=0)
    assert validate("http-01", "dns", NAME, token, key_authorization(token), none).error == "malformed"


def test_key_authorization_must_belong_to_the_token(settings: ValidationSettings) -> None:
    outcome = validate("http-01", "dns", NAME, token_for("a"), key_authorization(token_for("b")), settings)
    assert outcome.error == "malformed"


# -- dns-01 ---------------------------------------------------------------------------------------


def test_dns01_txt_value_is_unpadded_base64url_of_sha256() -> None:
    # printf 'tok.thumb' | openssl dgst -sha256 -binary | basenc --base64url  (then without "=")
    assert dns01_txt_value("tok.thumb") == "sYAwVrqDtVOuJZvAHurSAYPoEt5fFV_C4bdSOOW-o5Y"


def test_dns01_valid_among_other_records(dns_server: ChallTestSrv, settings: ValidationSettings) -> None:
    token = token_for("dns-ok")
    dns_server.set_txt("_acme-challenge.dnsok.example.internal", "some other record")
    dns_server.set_txt("_acme-challenge.dnsok.example.internal", dns01_txt_value(key_authorization(token)))
    outcome = validate("dns-01", "dns", "dnsok.example.internal", token, key_authorization(token), settings)
    assert outcome.valid, outcome
    assert outcome.record["txt_records_seen"] == 2


def test_dns01_wildcard_looks_at_the_base_name(dns_server: ChallTestSrv, settings: ValidationSettings) -> None:
    token = token_for("dns-wild")
    dns_server.set_txt("_acme-challenge.wild.example.internal", dns01_txt_value(key_authorization(token)))
    outcome = validate("dns-01", "dns", "*.wild.example.internal", token, key_authorization(token), settings)
    assert outcome.valid, outcome
    assert outcome.record["txt_name"] == "_acme-challenge.wild.example.internal"


def test_dns01_wrong_value_is_an_incorrect_response(dns_server: ChallTestSrv, settings: ValidationSettings) -> None:
    token = token_for("dns-wrong")
    dns_server.set_txt("_acme-challenge.dnswrong.example.internal", dns01_txt_value(key_authorization("x" * 20)))
    outcome = validate("dns-01", "dns", "dnswrong.example.internal", token, key_authorization(token), settings)
    assert (outcome.valid, outcome.error) == (False, "incorrectResponse"), outcome
    assert "found 1 TXT record " in outcome.detail


def test_dns01_cleared_record_no_longer_validates(dns_server: ChallTestSrv, settings: ValidationSettings) -> None:
    token = token_for("dns-clear")
    dns_server.set_txt("_acme-challenge.dnsclear.example.internal", dns01_txt_value(key_authorization(token)))
    dns_server.clear_txt("_acme-challenge.dnsclear.example.internal")
    outcome = validate("dns-01", "dns", "dnsclear.example.internal", token, key_authorization(token), settings)
    assert (outcome.valid, outcome.error) == (False, "incorrectResponse"), outcome
    assert "no TXT record" in outcome.detail


def test_dns01_servfail_is_a_dns_error(dns_server: ChallTestSrv, settings: ValidationSettings) -> None:
    token = token_for("dns-fail")
    dns_server.set_servfail("_acme-challenge.dnsfail.example.internal")
    outcome = validate("dns-01", "dns", "dnsfail.example.internal", token, key_authorization(token), settings)
    assert (outcome.valid, outcome.error) == (False, "dns"), outcome


# -- tls-alpn-01 ----------------------------------------------------------------------------------

ACME_IDENTIFIER = x509.ObjectIdentifier("1.3.6.1.5.5.7.1.31")


def validation_certificate(folder: Path, sans: list[x509.GeneralName], digest_of: str | None,
                           critical: bool = True) -> tuple[Path, Path]:
    """A self-signed certificate as an ACME client makes for tls-alpn-01 (RFC 8737 section 3):
    ``sans`` and, unless ``digest_of`` is None, an acmeIdentifier extension holding the DER
    OCTET STRING of SHA-256(``digest_of``)."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    builder = (x509.CertificateBuilder()
               .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "acme-tls-alpn-01")]))
               .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "acme-tls-alpn-01")]))
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - dt.timedelta(hours=1)).not_valid_after(now + dt.timedelta(days=7))
               .add_extension(x509.SubjectAlternativeName(sans), critical=False))
    if digest_of is not None:
        value = b"\x04\x20" + hashlib.sha256(digest_of.encode()).digest()  # OCTET STRING, 32 bytes
        builder = builder.add_extension(x509.UnrecognizedExtension(ACME_IDENTIFIER, value), critical=critical)
    certificate = builder.sign(key, hashes.SHA256())
    cert_path, key_path = folder / "alpn.pem", folder / "alpn.key"
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


class AlpnServer:
    """A TLS server on 127.0.0.1 serving one certificate, offering ``alpn`` (None: no ALPN);
    records the SNI names it was asked for."""

    def __init__(self, cert: Path, key: Path, alpn: list[str] | None = None) -> None:
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.load_cert_chain(cert, key)
        if alpn is not None:
            self.context.set_alpn_protocols(alpn)
        self.names: list[str | None] = []
        self.context.sni_callback = lambda _sock, name, _ctx: self.names.append(name)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self.listener.getsockname()[1]
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            conn.settimeout(GENEROUS)
            try:
                with self.context.wrap_socket(conn, server_side=True) as tls:
                    tls.recv(1)
            except OSError:
                pass

    def close(self) -> None:
        self.listener.close()


def tls_alpn(tmp_path: Path, settings: ValidationSettings, sans: list[x509.GeneralName], digest_of: str | None,
             critical: bool = True, alpn: list[str] | None = None, identifier: tuple[str, str] = ("dns", NAME),
             token: str = token_for("alpn")) -> tuple[Outcome, AlpnServer]:
    cert, key = validation_certificate(tmp_path, sans, digest_of, critical)
    server = AlpnServer(cert, key, ["acme-tls/1"] if alpn is None else alpn)
    try:
        at_port = ValidationSettings(tlsalpn01_port=server.port, dns_resolver=settings.dns_resolver, timeout=10.0)
        return validate("tls-alpn-01", identifier[0], identifier[1], token, key_authorization(token), at_port), server
    finally:
        server.close()


def test_tlsalpn01_valid(tmp_path: Path, settings: ValidationSettings) -> None:
    token = token_for("alpn")
    outcome, server = tls_alpn(tmp_path, settings, [x509.DNSName(NAME)], key_authorization(token))
    assert outcome.valid, outcome
    assert server.names == [NAME]
    assert outcome.record["sni"] == NAME and outcome.record["address_used"] == "127.0.0.1"


def test_tlsalpn01_ip_identifier_uses_the_reverse_name_as_sni(tmp_path: Path, settings: ValidationSettings) -> None:
    token = token_for("alpn")
    outcome, server = tls_alpn(tmp_path, settings, [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))],
                               key_authorization(token), identifier=("ip", "127.0.0.1"))
    assert outcome.valid, outcome
    assert server.names == ["1.0.0.127.in-addr.arpa"]


def test_tlsalpn01_wrong_digest(tmp_path: Path, settings: ValidationSettings) -> None:
    outcome, _ = tls_alpn(tmp_path, settings, [x509.DNSName(NAME)], key_authorization(token_for("other")))
    assert (outcome.valid, outcome.error) == (False, "unauthorized"), outcome
    assert "digest" in outcome.detail


def test_tlsalpn01_non_critical_extension(tmp_path: Path, settings: ValidationSettings) -> None:
    token = token_for("alpn")
    outcome, _ = tls_alpn(tmp_path, settings, [x509.DNSName(NAME)], key_authorization(token), critical=False)
    assert (outcome.valid, outcome.error) == (False, "unauthorized"), outcome
    assert "not critical" in outcome.detail


def test_tlsalpn01_missing_extension(tmp_path: Path, settings: ValidationSettings) -> None:
    outcome, _ = tls_alpn(tmp_path, settings, [x509.DNSName(NAME)], None)
    assert (outcome.valid, outcome.error) == (False, "unauthorized"), outcome
    assert "no acmeIdentifier" in outcome.detail


def test_tlsalpn01_two_sans(tmp_path: Path, settings: ValidationSettings) -> None:
    token = token_for("alpn")
    outcome, _ = tls_alpn(tmp_path, settings, [x509.DNSName(NAME), x509.DNSName("other.example.internal")],
                          key_authorization(token))
    assert (outcome.valid, outcome.error) == (False, "unauthorized"), outcome
    assert "2 subjectAltName" in outcome.detail


def test_tlsalpn01_other_name(tmp_path: Path, settings: ValidationSettings) -> None:
    token = token_for("alpn")
    outcome, _ = tls_alpn(tmp_path, settings, [x509.DNSName("other.example.internal")], key_authorization(token))
    assert (outcome.valid, outcome.error) == (False, "unauthorized"), outcome


@pytest.mark.parametrize("alpn", [[], ["http/1.1"]])
def test_tlsalpn01_without_the_alpn_protocol(tmp_path: Path, settings: ValidationSettings,
                                             alpn: list[str]) -> None:
    token = token_for("alpn")
    outcome, _ = tls_alpn(tmp_path, settings, [x509.DNSName(NAME)], key_authorization(token), alpn=alpn)
    assert (outcome.valid, outcome.error) == (False, "tls"), outcome


def test_tlsalpn01_refused(settings: ValidationSettings) -> None:
    token = token_for("alpn")
    outcome = validate("tls-alpn-01", "dns", NAME, token, key_authorization(token), settings)  # nothing listens
    assert (outcome.valid, outcome.error) == (False, "connection"), outcome


def test_tlsalpn01_silent_server_times_out(settings: ValidationSettings) -> None:
    """TCP accepted, no handshake ever answered: a connection failure within the budget."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        token = token_for("alpn")
        silent = ValidationSettings(tlsalpn01_port=listener.getsockname()[1], dns_resolver=settings.dns_resolver,
                                    timeout=0.5)
        started = time.monotonic()
        outcome = validate("tls-alpn-01", "dns", NAME, token, key_authorization(token), silent)
    assert (outcome.valid, outcome.error) == (False, "connection"), outcome
    assert "timed out" in outcome.detail
    assert time.monotonic() - started < GENEROUS


def test_tlsalpn01_plain_http_is_a_tls_error(web: ChallengeHTTPServer, settings: ValidationSettings) -> None:
    token = token_for("alpn")
    at_http = ValidationSettings(tlsalpn01_port=web.port, dns_resolver=settings.dns_resolver, timeout=10.0)
    outcome = validate("tls-alpn-01", "dns", NAME, token, key_authorization(token), at_http)
    assert not outcome.valid and outcome.error in ("tls", "connection"), outcome
    assert_printable(outcome)


# -- settings -------------------------------------------------------------------------------------


def test_settings_from_the_acme_table() -> None:
    settings = ValidationSettings.from_config(ACMEConfig(http01_port=5002, tlsalpn01_port=5001,
                                                         dns_resolver="127.0.0.1:8053", validation_timeout="3s"))
    assert settings == ValidationSettings(http01_port=5002, tlsalpn01_port=5001, dns_resolver=("127.0.0.1", 8053),
                                          timeout=3.0)
    assert ValidationSettings.from_config(ACMEConfig()) == ValidationSettings()
    assert ValidationSettings.from_config(ACMEConfig(dns_resolver="[::1]:53")).dns_resolver == ("::1", 53)


def test_validate_takes_the_acme_table_itself(web: ChallengeHTTPServer, dns_server: ChallTestSrv) -> None:
    token = token_for("config")
    web.behaviours[token] = answering(key_authorization(token).encode())
    config = ACMEConfig(http01_port=web.port, dns_resolver=dns_server.address, validation_timeout="5s")
    outcome = validate("http-01", "dns", NAME, token, key_authorization(token), config)
    assert outcome.valid, outcome
    assert outcome.record["resolver"] == dns_server.address
