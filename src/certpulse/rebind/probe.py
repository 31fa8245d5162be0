"""Which certificate does an endpoint really serve? (The WinRM case of the seeds: the listener
kept serving a replaced certificate while everything else said it was renewed.)

:func:`probe` opens a TLS connection and reads the leaf certificate the server sends, **without
verifying it**: an expired, self-signed or mismatched certificate is exactly what a drift check
must be able to see, and the verdict comes from comparing thumbprints, not from trust. No data is
sent after the handshake. Every step — name resolution, connection, handshake — shares one
deadline, so a probe of a black hole, a silent port or a slow resolver ends in ``timeout``
seconds (plus a few milliseconds).

One answer is not a verdict while a service reloads: a graceful reload runs old and new server
processes side by side for a moment (nginx starts its new workers and only about 100 ms later
tells the old ones to stop accepting), so one connection can be served the new certificate and
the next the old one. :func:`settled_probe` asks again until several connections in a row agree.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import ipaddress
import re
import socket
import ssl
import threading
import time
from typing import Any

from cryptography import x509

from certpulse.errors import Reason, Refusal
from certpulse.pki.certs import thumbprint
from certpulse.pki.names import is_hostname

DEFAULT_TIMEOUT = 5.0
UNREACHABLE = "unreachable"  # no TCP connection: refused, no route, no such name, timed out
HANDSHAKE = "handshake"  # connected, but no certificate came back over TLS
SETTLE_AGREEING = 3  # connections in a row that must be served the same certificate
SETTLE_INTERVAL = 0.2  # seconds between them: three span more than nginx's 100 ms hand-over


@dataclasses.dataclass(frozen=True)
class ProbeTarget:
    """An endpoint to probe. ``sni`` None: the host's name is sent when it is a name, nothing
    for an IP address (what a browser does)."""

    host: str
    port: int
    sni: str | None = None

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}" + (f",sni={self.sni}" if self.sni else "")


@dataclasses.dataclass(frozen=True)
class ProbeResult:
    """What one probe saw: the served leaf's SHA-1 thumbprint (upper-case hex), or why there is
    none — ``failure`` is ``unreachable`` or ``handshake`` and ``error`` says the rest."""

    target: ProbeTarget
    thumbprint: str | None
    failure: str | None = None
    error: str | None = None
    elapsed: float = 0.0

    @property
    def ok(self) -> bool:
        return self.thumbprint is not None


def _bad(text: str, why: str) -> Refusal:
    return Refusal(Reason.INVALID_ARGUMENT, f"probe {text!r}: {why}; expected HOST:PORT[,sni=NAME] "
                                            "(IPv6 as [::1]:443)")


def _valid_host(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return is_hostname(host.rstrip(".") if host != "." else "", allow_wildcard=False)


_ENDPOINT = re.compile(r"^(?:\[(?P<v6>[0-9A-Fa-f:.]+)\]|(?P<host>[^\[\]:,\s]+)):(?P<port>[0-9]{1,5})\Z")


def parse_probe(text: str) -> ProbeTarget:
    """``HOST:PORT[,sni=NAME]`` -> :class:`ProbeTarget`, or a refusal naming what is wrong."""
    endpoint, *extras = text.strip().split(",")
    match = _ENDPOINT.match(endpoint)
    if match is None:
        raise _bad(text, "not HOST:PORT")
    host = match["v6"] or match["host"]
    if match["v6"] is not None:
        try:
            if ipaddress.ip_address(host).version != 6:
                raise ValueError(host)
        except ValueError:
            raise _bad(text, f"{host} in brackets is not an IPv6 address") from None
    elif not _valid_host(host):
        raise _bad(text, f"{host!r} is neither a host name nor an IP address")
    port = int(match["port"])
    if not 0 < port < 65536:
        raise _bad(text, f"port {port} is not from 1 to 65535")
    sni: str | None = None
    for extra in extras:
        key, sep, value = extra.partition("=")
        if key.strip() != "sni" or not sep:
            raise _bad(text, f"unknown part {extra!r} (only sni=NAME may follow)")
        if sni is not None:
            raise _bad(text, "sni given twice")
        sni = value.strip()
        if not is_hostname(sni, allow_wildcard=False):
            raise _bad(text, f"sni {sni!r} is not a host name")
    return ProbeTarget(host, port, sni)


def _context() -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # we compare thumbprints; trust is not the question here
    return context


def _server_name(host: str, sni: str | None) -> str | None:
    if sni:
        return sni
    try:
        ipaddress.ip_address(host)
        return None
    except ValueError:
        return host.rstrip(".")


def _resolve(host: str, port: int, deadline: float) -> list[tuple[socket.AddressFamily, Any]]:
    """Addresses for ``host``. A name is resolved in a daemon thread, so that a stuck resolver
    can outlast neither the deadline nor the process (the thread ends on its own later)."""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        future: concurrent.futures.Future[list[Any]] = concurrent.futures.Future()

        def resolve() -> None:
            try:
                future.set_result(socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM, socket.IPPROTO_TCP))
            except BaseException as exc:
                future.set_exception(exc)

        threading.Thread(target=resolve, name="certpulse-probe-dns", daemon=True).start()
        infos = future.result(timeout=max(deadline - time.monotonic(), 0.001))
    else:
        infos = socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM, socket.IPPROTO_TCP, socket.AI_NUMERICHOST)
    return [(family, addr) for family, _, _, _, addr in infos]


def _connect(host: str, port: int, deadline: float) -> socket.socket:
    errors: list[str] = []
    for family, addr in _resolve(host, port, deadline):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("timed out")
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.settimeout(remaining)
        try:
            sock.connect(addr)
            return sock
        except OSError as exc:
            sock.close()
            errors.append(f"{addr[0]}: {exc.strerror or exc}")
    raise ConnectionError("; ".join(errors) or "no address")


def probe(host: str, port: int, *, sni: str | None = None, timeout: float = DEFAULT_TIMEOUT) -> ProbeResult:
    """Connect to ``host``:``port`` over TLS and return the served leaf's thumbprint, or the
    failure (never raises for the endpoint's behaviour; never takes longer than ``timeout``)."""
    target = ProbeTarget(host, port, sni)
    started = time.monotonic()
    deadline = started + timeout

    def failed(failure: str, error: str) -> ProbeResult:
        return ProbeResult(target, None, failure, error, time.monotonic() - started)

    try:
        sock = _connect(host, port, deadline)
    except TimeoutError:  # concurrent.futures.TimeoutError is the same class
        return failed(UNREACHABLE, f"no connection to {target} within {timeout:g} s")
    except socket.gaierror as exc:
        return failed(UNREACHABLE, f"cannot resolve {host}: {exc.strerror or exc}")
    except OSError as exc:
        return failed(UNREACHABLE, f"cannot connect to {target}: {exc.strerror or exc}")
    try:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return failed(HANDSHAKE, f"connected to {target}, but no time was left for the TLS handshake")
        sock.settimeout(remaining)
        with _context().wrap_socket(sock, server_hostname=_server_name(host, sni)) as tls:
            der = tls.getpeercert(binary_form=True)
    except TimeoutError:
        return failed(HANDSHAKE, f"{target} did not complete a TLS handshake within {timeout:g} s")
    except ssl.SSLError as exc:
        return failed(HANDSHAKE, f"TLS handshake with {target} failed: {exc.reason or exc}")
    except OSError as exc:
        return failed(HANDSHAKE, f"TLS handshake with {target} failed: {exc.strerror or exc}")
    finally:
        sock.close()
    if not der:
        return failed(HANDSHAKE, f"{target} sent no certificate")
    try:
        served = thumbprint(x509.load_der_x509_certificate(der))
    except ValueError as exc:
        return failed(HANDSHAKE, f"{target} sent a certificate that cannot be parsed: {exc}")
    return ProbeResult(target, served, elapsed=time.monotonic() - started)


def probe_target(target: ProbeTarget, *, timeout: float = DEFAULT_TIMEOUT) -> ProbeResult:
    return probe(target.host, target.port, sni=target.sni, timeout=timeout)


def settled_probe(target: ProbeTarget, *, window: float, wanted: str | None = None,
                  timeout: float = DEFAULT_TIMEOUT) -> ProbeResult:
    """Probe again and again until :data:`SETTLE_AGREEING` connections in a row are served the
    same certificate (``wanted``, when given), or ``window`` seconds have passed; the last answer.

    Bounded: at most ``window`` plus one probe's ``timeout``. An endpoint that keeps answering
    differently (a reload that never finishes, two backends behind one address) is reported as
    its last answer, which the caller compares like any other.
    """
    deadline = time.monotonic() + window
    recent: list[str | None] = []
    while True:
        result = probe_target(target, timeout=timeout)
        recent = [*recent[-(SETTLE_AGREEING - 1):], result.thumbprint]
        agreed = len(recent) == SETTLE_AGREEING and len(set(recent)) == 1
        if (agreed and (wanted is None or result.thumbprint == wanted)) or time.monotonic() >= deadline:
            return result
        time.sleep(SETTLE_INTERVAL)


__all__ = ["HANDSHAKE", "UNREACHABLE", "ProbeResult", "ProbeTarget", "parse_probe", "probe", "probe_target",
           "settled_probe"]
