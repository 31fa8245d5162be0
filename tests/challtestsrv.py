"""A real ``pebble-challtestsrv`` (Debian's pebble package, installed by scripts/system-packages)
as the DNS server of ACME tests: a child process on free loopback ports, driven through its
management HTTP API, stopped by its own PID.

Only its DNS server and management API run (its http-01, https-01 and tls-alpn-01 servers are
turned off: the tests bring their own). Every name answers A queries with 127.0.0.1 unless told
otherwise, and AAAA queries with nothing, so a name under ``.example.internal`` reaches a test
server on loopback. Use as a context manager::

    with ChallTestSrv(tmp_path) as dns:
        dns.set_txt("_acme-challenge.web.example.internal", value)
        settings = ValidationSettings(dns_resolver=dns.resolver, ...)   # or "[acme] dns_resolver = dns.address"
"""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path
from types import TracebackType

import dns.exception
import dns.message
import dns.query
import httpx

from support import free_port

BINARY = shutil.which("pebble-challtestsrv") or "/usr/bin/pebble-challtestsrv"
HINT = "run scripts/system-packages (make test does) to install pebble (pebble-challtestsrv)"
READY_WITHIN = 60.0  # seconds; generous, the machine may be busy


def _fqdn(name: str) -> str:
    return name if name.endswith(".") else name + "."


class ChallTestSrv:
    """One ``pebble-challtestsrv``: DNS on 127.0.0.1:``dns_port`` (UDP and TCP), management
    API on 127.0.0.1:``management_port``. Its output goes to ``folder/challtestsrv.log``."""

    def __init__(self, folder: Path, default_ipv4: str = "127.0.0.1") -> None:
        self.folder = folder
        self.default_ipv4 = default_ipv4
        self.dns_port = free_port()
        self.management_port = free_port()
        self.process: subprocess.Popen[bytes] | None = None
        self._http = httpx.Client(base_url=f"http://127.0.0.1:{self.management_port}", trust_env=False, timeout=10)

    @property
    def address(self) -> str:
        """``host:port`` of its DNS server, as ``[acme] dns_resolver`` takes it."""
        return f"127.0.0.1:{self.dns_port}"

    @property
    def resolver(self) -> tuple[str, int]:
        return ("127.0.0.1", self.dns_port)

    def start(self) -> ChallTestSrv:
        if not Path(BINARY).exists():
            raise AssertionError(f"pebble-challtestsrv is not installed: {HINT}")
        log = (self.folder / "challtestsrv.log").open("ab")
        self.process = subprocess.Popen(
            [BINARY, "-dns01", self.address, "-management", f"127.0.0.1:{self.management_port}",
             "-defaultIPv4", self.default_ipv4, "-defaultIPv6", "",
             "-http01", "", "-https01", "", "-tlsalpn01", ""],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        log.close()
        self._wait_ready()
        return self

    def _wait_ready(self) -> None:
        """Until both the management API and the DNS server answer (or the bound passes)."""
        deadline = time.monotonic() + READY_WITHIN
        while True:
            assert self.process is not None
            if self.process.poll() is not None:
                raise AssertionError(f"pebble-challtestsrv exited with {self.process.returncode}: "
                                     f"{(self.folder / 'challtestsrv.log').read_text(errors='replace')[-2000:]}")
            if self._answers():
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"pebble-challtestsrv did not answer within {READY_WITHIN:g} s")
            time.sleep(0.05)

    def _answers(self) -> bool:
        try:
            self._http.post("/clear-request-history", json={"host": "ready.example.internal", "type": "DNS"})
            query = dns.message.make_query("ready.example.internal.", "TXT")
            dns.query.udp(query, "127.0.0.1", port=self.dns_port, timeout=1.0)
        except (httpx.HTTPError, dns.exception.DNSException, OSError):
            return False
        return True

    def stop(self) -> None:
        self._http.close()
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)

    def __enter__(self) -> ChallTestSrv:
        return self.start()

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        self.stop()

    # -- the management API ----------------------------------------------------------------

    def _post(self, path: str, body: dict[str, object]) -> None:
        response = self._http.post(path, json=body)
        if response.status_code != 200:
            raise AssertionError(f"pebble-challtestsrv {path} answered {response.status_code}: {response.text}")

    def set_txt(self, name: str, value: str) -> None:
        """Add a TXT record ``value`` at ``name`` (several calls add several records)."""
        self._post("/set-txt", {"host": _fqdn(name), "value": value})

    def clear_txt(self, name: str) -> None:
        """Remove every TXT record at ``name``."""
        self._post("/clear-txt", {"host": _fqdn(name)})

    def add_a(self, name: str, *addresses: str) -> None:
        """Answer A queries for ``name`` with ``addresses`` instead of the default."""
        self._post("/add-a", {"host": _fqdn(name), "addresses": list(addresses)})

    def clear_a(self, name: str) -> None:
        self._post("/clear-a", {"host": _fqdn(name)})

    def add_aaaa(self, name: str, *addresses: str) -> None:
        self._post("/add-aaaa", {"host": _fqdn(name), "addresses": list(addresses)})

    def clear_aaaa(self, name: str) -> None:
        self._post("/clear-aaaa", {"host": _fqdn(name)})

    def set_servfail(self, name: str) -> None:
        """Answer every query for ``name`` with SERVFAIL."""
        self._post("/set-servfail", {"host": _fqdn(name)})

    def clear_servfail(self, name: str) -> None:
        self._post("/clear-servfail", {"host": _fqdn(name)})

    def set_default_ipv4(self, address: str) -> None:
        """The A answer of names without their own ("" answers none)."""
        self._post("/set-default-ipv4", {"ip": address})
