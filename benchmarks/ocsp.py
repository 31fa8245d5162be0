#!/usr/bin/env python3
"""OCSP responses per second (issue 17): certpulse's responder and ``openssl ocsp -port`` side
by side, asked the same OCSP requests about the same certificates in the same run.

Setup: ``certpulse ca init`` (EC P-256 root and issuing CA, SQLite), the ``machine`` template,
one machine principal that enrolls ``--certs`` certificates over ``ca serve``; ``--revoked`` of
them are revoked through the API (``POST /v1/certificates/{serial}/revoke``; reasons keyCompromise, superseded,
cessationOfOperation, affiliationChanged in turn). Then the peers:

* ``certpulse``: ``certpulse ca serve --role status --workers N`` (the publishing routes alone,
  plain HTTP, as relying parties reach them); requests go to ``POST /ocsp``.
* ``openssl``: ``openssl ocsp -port`` as a responder (``-index index.txt -CA issuer.pem
  -rsigner signer.pem -rkey signer.key -ndays 1``), one process: the responder every operator
  has. ``index.txt`` is written from the certificates certpulse issued (V/R, expiry
  ``YYMMDDHHMMSSZ``, revocation time and reason, serial in upper-case hex, file name
  ``unknown``, subject), and it signs with certpulse's own delegated OCSP signer (same key type,
  same certificate) when certpulse has made one, else with the issuing CA's key.
* ``openssl-multi``: the same with ``-multi 2`` (OpenSSL 3's pre-forked responder processes).
* ``nginx-cache``: nginx (``proxy_cache``, one worker per certpulse worker) in front of
  certpulse's GET route, as a CDN or a site cache would be: it keeps each answer as long as its
  RFC 5019 ``Cache-Control`` allows. GET requests only; its CPU counts certpulse's too.

Three kinds of request, each a row of its own (``--modes``):

* ``cached``: POST without nonce (RFC 5019's kind): a responder may answer from a cache of
  pre-signed responses. certpulse does; openssl signs every answer.
* ``nonce``: POST with a fresh 16-byte nonce in every request (the wrk script writes it), so
  every answer must be signed for that request, by either peer.
* ``get``: RFC 5019 GET (``/ocsp/{URL-encoded base64}``), no nonce: what nginx's stapling and
  browsers send, and what HTTP caches keep.

openssl answers HTTP/1.0 and closes the connection after every answer; certpulse and nginx keep
it open (wrk then reuses it). Both are how these servers serve their clients, and both are
measured as they are.

Each request asks about one certificate; the requests cycle over all the enrolled certificates,
good and revoked (SHA-1 certificate ids, as ``openssl ocsp`` and RFC 5019 clients send them).

The load generator is ``wrk`` with ``benchmarks/wrk/ocsp.lua``, at each concurrency level
(``--levels``, default 1, 8, 32) for ``--duration`` seconds, the runs interleaved (level by
level, peer by peer) and repeated ``--repeat`` times. Meanwhile a checker thread in this process
sends a request every 0.2 s and checks the answer: it decodes, is signed by a certificate the
issuing CA issued (the signature verified), is about the serial asked, has the right status
(good, or revoked with the right reason), and echoes the nonce when one was sent. Every request
is also checked once per peer before measuring.

Per run: responses per second (2xx answers), p50 and p99 latency (wrk's), errors (non-2xx,
connect, read, write, timeouts), the server's CPU time (every process of its tree, from
``/proc/<pid>/stat``) as cores busy and as CPU microseconds per response, the load generator's
CPU time, and the checker's counts. Then the ratio certpulse / openssl per mode and level (per
repetition, the runs of a repetition back to back), and whether the issue's goal holds (cached:
at least 10x openssl's rate, p99 under 10 ms).

``--quick`` is a smoke run of a few seconds (concurrency 1, 1 s, one repetition, both modes,
certpulse and single-process openssl). ``wrk`` comes from ``scripts/system-packages`` (Debian
package ``wrk``); ``openssl`` is the system's.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import dataclasses
import datetime as dt
import http.client
import json
import os
import random
import re
import resource
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509 import ocsp
from issuance import (
    CERTPULSE,
    MACHINE_TEMPLATE,
    PRINCIPAL,
    BenchError,
    cpu_seconds,
    free_port,
    machine_busy,
    machine_description,
    make_csrs,
    mmm,
    post_json,
    process_tree,
    run,
    stop_process,
    wait_for,
)

REPO = Path(__file__).resolve().parents[1]
LUA = REPO / "benchmarks" / "wrk" / "ocsp.lua"
ALL_TARGETS = ("certpulse", "openssl", "openssl-multi", "nginx-cache")
ALL_MODES = ("cached", "nonce", "get")
OURS = ("certpulse", "nginx-cache")  # compared with the openssl peers
GET_ONLY = ("nginx-cache",)  # an HTTP cache keeps GET answers only
LEVELS = "1,8,32"
REASONS = ("keyCompromise", "superseded", "cessationOfOperation", "affiliationChanged")
NONCE_MARK = b"certpulse-nonce!"  # 16 bytes, replaced by the wrk script in every request
GOAL_RATIO, GOAL_P99_MS = 10.0, 10.0


# -- the CA and its certificates ----------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Issued:
    certificate: x509.Certificate
    revoked_at: dt.datetime | None = None
    reason: str | None = None  # the name openssl's index and `certpulse revoke` use

    @property
    def serial(self) -> int:
        return self.certificate.serial_number


@dataclasses.dataclass
class Setup:
    folder: Path
    issuer: x509.Certificate
    issuer_file: Path
    issuer_key_file: Path
    certificates: list[Issued]


def serve_args(folder: Path, port: int, workers: int, *, status_role: bool) -> list[str]:
    """``ca serve``: the enrollment API (plain HTTP), or the status role (plain HTTP by default)."""
    args = [*CERTPULSE, "ca", "serve", "--dir", str(folder), "--listen", f"127.0.0.1:{port}",
            "--workers", str(workers)]
    return [*args, "--role", "status"] if status_role else [*args, "--insecure-http"]


def make_ca(work: Path, count: int, revoked: int) -> Setup:
    """A certpulse CA, ``count`` certificates enrolled through its API, ``revoked`` of them revoked
    through it (the admin API key of ``ca init``)."""
    folder = work / "ca"
    created = run([*CERTPULSE, "ca", "init", "--dir", str(folder), "--database", f"sqlite:///{folder / 'ca.db'}",
                   "--name", "bench", "--key-type", "ec-p256"]).decode()
    admin_key = next(line.strip() for line in created.splitlines() if line.strip().startswith("cpa_"))
    run([*CERTPULSE, "template", "add", str(MACHINE_TEMPLATE), "--dir", str(folder)])
    token = json.loads(run([*CERTPULSE, "principal", "add", PRINCIPAL, "--kind", "machine", "--json",
                            "--dir", str(folder)]))["token"]
    port = free_port()
    log = work / "enroll.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(serve_args(folder, port, 1, status_role=False), stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
        try:
            base = f"http://127.0.0.1:{port}"
            wait_for(f"{base}/healthz", proc, log)
            status, answer = post_json(f"{base}/v1/tokens/exchange", {"token": token})
            if status != 200:
                raise BenchError(f"token exchange answered {status}: {answer}")
            headers = {"Authorization": f"Bearer {answer['credential']}"}
            certificates = []
            for csr in make_csrs(count):
                status, answer = post_json(f"{base}/v1/requests", {"template": "machine", "csr": csr}, headers)
                if status != 201:
                    raise BenchError(f"enrollment answered {status}: {answer}")
                certificates.append(x509.load_pem_x509_certificate(answer["certificate"].encode()))
            # evenly spread over the serials, so every stretch of the request cycle mixes good and revoked
            revoke_at = {round(i * count / revoked) for i in range(revoked)} if revoked else set()
            issued = []
            for index, certificate in enumerate(certificates):
                if index not in revoke_at:
                    issued.append(Issued(certificate))
                    continue
                reason = REASONS[len(issued) % len(REASONS)]
                status, answer = post_json(f"{base}/v1/certificates/{certificate.serial_number:x}/revoke",
                                           {"reason": reason}, {"Authorization": f"Bearer {admin_key}"})
                if status != 200:
                    raise BenchError(f"revocation answered {status}: {answer}")
                issued.append(Issued(certificate, dt.datetime.fromisoformat(answer["revoked_at"]), reason))
        finally:
            stop_process(proc)
    issuers = {c.issuer for c in certificates}
    [issuer_file] = [p for p in (folder / "certs").glob("issuer-*.pem")
                     if x509.load_pem_x509_certificate(p.read_bytes()).subject in issuers]
    issuer = x509.load_pem_x509_certificate(issuer_file.read_bytes())
    return Setup(folder, issuer, issuer_file, folder / "keys" / f"{issuer_file.stem}.key", issued)


def delegated_signer(setup: Setup, work: Path) -> tuple[Path, Path, str]:
    """certpulse's delegated OCSP signer (certificate PEM, key file) for the issuing CA, written
    for openssl; the issuing CA's own certificate and key when certpulse has none."""
    database = setup.folder / "ca.db"
    row = None
    # (no ocsp_signers table before issue 17)
    with contextlib.closing(sqlite3.connect(database)) as db, contextlib.suppress(sqlite3.OperationalError):
        row = db.execute("SELECT certificate_der, key_file FROM ocsp_signers ORDER BY not_after DESC "
                         "LIMIT 1").fetchone()
    if row is None:
        return setup.issuer_file, setup.issuer_key_file, "the issuing CA's own key"
    signer = x509.load_der_x509_certificate(bytes(row[0]))
    key_file = Path(row[1])
    if not key_file.is_absolute():
        key_file = next((p for p in (setup.folder / key_file, setup.folder / "keys" / key_file) if p.exists()),
                        key_file)
    pem = work / "ocsp-signer.pem"
    pem.write_bytes(signer.public_bytes(serialization.Encoding.PEM))
    return pem, key_file, f"certpulse's delegated signer (serial {signer.serial_number:x})"


def openssl_time(when: dt.datetime) -> str:
    return when.astimezone(dt.UTC).strftime("%y%m%d%H%M%SZ")


def openssl_index(certificates: Sequence[Issued]) -> str:
    """``openssl ca``'s index.txt for these certificates: tab-separated status, expiry,
    revocation (time[,reason]), serial (upper-case hex, whole bytes), file name, subject."""
    lines = []
    for item in certificates:
        cert = item.certificate
        serial = f"{cert.serial_number:X}"
        serial = "0" * (len(serial) % 2) + serial
        subject = "".join(f"/{a.rfc4514_attribute_name}={a.value}" for a in cert.subject)
        revocation = f"{openssl_time(item.revoked_at)},{item.reason}" if item.revoked_at else ""
        lines.append("\t".join(("R" if item.revoked_at else "V", openssl_time(cert.not_valid_after_utc),
                                revocation, serial, "unknown", subject)))
    return "\n".join(lines) + "\n"


# -- requests and their checks ------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Request:
    der: bytes
    nonce_at: int | None  # where the 16-byte nonce sits in der, when it has one
    expected: Issued
    get: bool = False  # sent as RFC 5019 GET (URL-encoded base64 after the responder's path)

    def path(self, url: str) -> str:
        """The GET request's path at a responder reached at ``url``."""
        base = urlsplit(url).path.rstrip("/")
        return f"{base}/{quote(base64.b64encode(self.der).decode(), safe='')}"


def ocsp_request(item: Issued, issuer: x509.Certificate, *, nonce: bytes | None) -> bytes:
    builder = ocsp.OCSPRequestBuilder().add_certificate(item.certificate, issuer, hashes.SHA1())  # noqa: S303
    if nonce is not None:
        builder = builder.add_extension(x509.OCSPNonce(nonce), critical=False)
    return builder.build().public_bytes(serialization.Encoding.DER)


def make_requests(setup: Setup, mode: str) -> list[Request]:
    requests = []
    for item in setup.certificates:
        if mode == "nonce":
            der = ocsp_request(item, setup.issuer, nonce=NONCE_MARK)
            requests.append(Request(der, der.index(NONCE_MARK), item))
        else:
            requests.append(Request(ocsp_request(item, setup.issuer, nonce=None), None, item, get=mode == "get"))
    return requests


def write_requests(path: Path, requests: Sequence[Request], url: str) -> Path:
    """The wrk script's input: a GET request as its path, a POST one as hex DER [nonce offset]."""
    path.write_text("".join((r.path(url) if r.get else r.der.hex() + ("" if r.nonce_at is None else f" {r.nonce_at}"))
                            + "\n" for r in requests))
    return path


REASON_FLAGS = {"keyCompromise": x509.ReasonFlags.key_compromise, "superseded": x509.ReasonFlags.superseded,
                "cessationOfOperation": x509.ReasonFlags.cessation_of_operation,
                "affiliationChanged": x509.ReasonFlags.affiliation_changed}


def check_answer(body: bytes, http_status: int, request: Request, nonce: bytes | None,
                 issuer: x509.Certificate) -> str | None:
    """What is wrong with this answer to ``request`` (sent with ``nonce``), or None."""
    if http_status != 200:
        return f"HTTP {http_status}"
    try:
        answer = ocsp.load_der_ocsp_response(body)
    except ValueError as exc:
        return f"does not decode: {exc}"
    if answer.response_status != ocsp.OCSPResponseStatus.SUCCESSFUL:
        return f"response status {answer.response_status.name}"
    if answer.serial_number != request.expected.serial:
        return f"about serial {answer.serial_number:x}, asked {request.expected.serial:x}"
    expected = request.expected
    if expected.revoked_at is None:
        if answer.certificate_status != ocsp.OCSPCertStatus.GOOD:
            return f"{answer.certificate_status.name}, expected GOOD"
    elif answer.certificate_status != ocsp.OCSPCertStatus.REVOKED:
        return f"{answer.certificate_status.name}, expected REVOKED"
    elif answer.revocation_reason != REASON_FLAGS[expected.reason or ""]:
        return f"revoked for {answer.revocation_reason}, expected {expected.reason}"
    echoed = next((e.value.nonce for e in answer.extensions if isinstance(e.value, x509.OCSPNonce)), None)
    if nonce is not None and echoed != nonce:
        return f"nonce {echoed!r} is not the one sent"
    signers = [c for c in answer.certificates if c.public_key() != issuer.public_key()]
    signer = signers[0] if signers else issuer
    try:
        if signer is not issuer:
            signer.verify_directly_issued_by(issuer)
        key = signer.public_key()
        if isinstance(key, ec.EllipticCurvePublicKey):
            key.verify(answer.signature, answer.tbs_response_bytes, ec.ECDSA(answer.signature_hash_algorithm))
        elif isinstance(key, rsa.RSAPublicKey):
            from cryptography.hazmat.primitives.asymmetric import padding

            key.verify(answer.signature, answer.tbs_response_bytes, padding.PKCS1v15(),
                       answer.signature_hash_algorithm)  # type: ignore[arg-type]
        else:
            return f"signer key {type(key).__name__} is not checked here"
    except (InvalidSignature, ValueError, TypeError) as exc:
        return f"signature does not verify: {type(exc).__name__} {exc}"
    return None


def ask(url: str, request: Request, issuer: x509.Certificate, timeout: float = 10) -> str | None:
    """Send ``request`` once (a fresh nonce when it has one) and check the answer."""
    der, nonce = request.der, None
    if request.nonce_at is not None:
        nonce = os.urandom(16)
        der = der[:request.nonce_at] + nonce + der[request.nonce_at + 16:]
    host, _, rest = url.removeprefix("http://").partition("/")
    name, _, port = host.partition(":")
    conn = http.client.HTTPConnection(name, int(port), timeout=timeout)
    try:
        if request.get:
            conn.request("GET", request.path(url))
        else:
            conn.request("POST", "/" + rest, body=der, headers={"Content-Type": "application/ocsp-request"})
        response = conn.getresponse()
        return check_answer(response.read(), response.status, request, nonce, issuer)
    except (OSError, http.client.HTTPException) as exc:
        return f"{type(exc).__name__}: {exc}"
    finally:
        conn.close()


class Checker(threading.Thread):
    """Checks one answer every ``every`` seconds for ``seconds`` (the first 80 % of a run: as a
    run ends, wrk closes connections it had not sent on yet, which wedges ``openssl ocsp``)."""

    def __init__(self, url: str, requests: Sequence[Request], issuer: x509.Certificate, seconds: float,
                 every: float = 0.2) -> None:
        super().__init__(daemon=True)
        self.url, self.requests, self.issuer, self.every = url, requests, issuer, every
        self.until = time.monotonic() + seconds
        self.checked = 0
        self.wrong: list[str] = []
        self.stopped = threading.Event()

    def run(self) -> None:
        rng = random.Random(len(self.requests))
        while not self.stopped.wait(self.every) and time.monotonic() < self.until:
            request = rng.choice(self.requests)
            problem = ask(self.url, request, self.issuer)
            self.checked += 1
            if problem is not None:
                self.wrong.append(f"serial {request.expected.serial:x}: {problem}")

    def stop(self) -> None:
        self.stopped.set()
        self.join()


# -- peers --------------------------------------------------------------------------------


@dataclasses.dataclass
class Peer:
    name: str
    url: str
    proc: subprocess.Popen[bytes]
    how: str  # the command line, for the report
    also: tuple[int, ...] = ()  # other processes whose CPU counts (nginx-cache: certpulse's)


class Peers(contextlib.ExitStack):
    def __init__(self, work: Path, setup: Setup, workers: int) -> None:
        super().__init__()
        self.work, self.setup, self.workers = work, setup, workers
        self.signer: tuple[Path, Path, str] | None = None

    def _spawn(self, name: str, args: list[str], cwd: Path | None = None) -> tuple[subprocess.Popen[bytes], Path]:
        log = self.work / f"{name}.log"
        out = self.enter_context(log.open("wb"))
        # A process group of its own (stopped as one), not a session: `openssl ocsp -multi` makes
        # itself a process group leader, which a session leader may not, and exits at once.
        proc = subprocess.Popen(args, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, process_group=0)
        self.callback(self.stop_proc, proc)
        return proc, log

    @staticmethod
    def stop_proc(proc: subprocess.Popen[bytes]) -> None:
        """certpulse gets SIGTERM (stop_process); openssl holds nothing worth a graceful stop, and
        `openssl ocsp -multi` takes a second or more to pass SIGTERM on to its children."""
        if proc.args[0] == "openssl" and proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        stop_process(proc)

    def start(self, name: str, upstream: Peer | None = None) -> Peer:
        if name == "nginx-cache":
            if upstream is None:
                raise BenchError("nginx-cache needs certpulse among the targets: it caches certpulse's answers")
            return self._nginx_cache(upstream)
        if name == "certpulse":
            port = free_port()
            args = serve_args(self.setup.folder, port, self.workers, status_role=True)
            proc, log = self._spawn(name, args)
            base = f"http://127.0.0.1:{port}"
            wait_for(f"{base}/healthz", proc, log)
            return Peer(name, f"{base}/ocsp", proc, " ".join(["certpulse", *args[len(CERTPULSE):]]))
        if name in ("openssl", "openssl-multi"):
            if self.signer is None:
                raise BenchError("start certpulse first: openssl signs with its delegated signer")
            folder = self.work / "openssl"
            folder.mkdir(exist_ok=True)
            (folder / "index.txt").write_text(openssl_index(self.setup.certificates))
            (folder / "index.txt.attr").write_text("unique_subject = no\n")
            (folder / "issuer.pem").write_bytes(self.setup.issuer.public_bytes(serialization.Encoding.PEM))
            signer_pem, signer_key, _ = self.signer
            args = ["openssl", "ocsp", "-port", "0", "-index", "index.txt", "-CA", "issuer.pem",
                    "-rsigner", str(signer_pem), "-rkey", str(signer_key), "-ndays", "1"]
            if name == "openssl-multi":
                args += ["-multi", "2"]
            proc, log = self._spawn(name, args, cwd=folder)
            port = self._accept_port(proc, log)
            url = f"http://127.0.0.1:{port}/"
            return Peer(name, url, proc, " ".join(args))
        raise BenchError(f"unknown target {name!r}; choose from {', '.join(ALL_TARGETS)}")

    def _nginx_cache(self, upstream: Peer) -> Peer:
        """nginx (``--workers`` processes) with proxy_cache in front of certpulse's GET route:
        the answers are kept as long as their Cache-Control allows (RFC 5019), as a CDN would."""
        nginx = shutil.which("nginx") or "/usr/sbin/nginx"
        if not os.access(nginx, os.X_OK):
            raise BenchError("nginx is not installed (scripts/system-packages installs it)")
        folder = self.work / "nginx"
        folder.mkdir(exist_ok=True)
        # Run as root, nginx's workers are an unprivileged user (nginx makes its cache and temp
        # folders theirs), who must be able to pass through the working folder (mkdtemp's 0700):
        # search only, no listing; the CA's keys stay in their own 0700 folder.
        self.work.chmod(0o711)
        port = free_port()
        temp = "\n".join(f"    {kind}_temp_path {folder}/{kind};" for kind in
                         ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
        (folder / "nginx.conf").write_text(f"""
pid {folder}/nginx.pid;
error_log {folder}/error.log;
daemon off;
master_process on;
worker_processes {self.workers};
events {{ worker_connections 1024; }}
http {{
    access_log off;
{temp}
    proxy_cache_path {folder}/cache levels=1:2 keys_zone=ocsp:10m max_size=64m inactive=10m use_temp_path=off;
    upstream certpulse {{ server {urlsplit(upstream.url).netloc}; keepalive 16; }}
    server {{
        listen 127.0.0.1:{port};
        location /ocsp/ {{
            proxy_pass http://certpulse;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_cache ocsp;
            proxy_cache_lock on;
        }}
    }}
}}
""")
        args = [nginx, "-c", str(folder / "nginx.conf"), "-e", str(folder / "error.log")]
        proc, log = self._spawn("nginx-cache", args)
        url = f"http://127.0.0.1:{port}/ocsp"
        wait_for(f"{url}/", proc, log)
        return Peer("nginx-cache", url, proc, f"nginx -c nginx.conf (proxy_cache, {self.workers} workers) "
                    f"in front of certpulse", also=(upstream.proc.pid,))

    def stop(self, peer: Peer) -> None:
        self.stop_proc(peer.proc)

    @staticmethod
    def _accept_port(proc: subprocess.Popen[bytes], log: Path, timeout: float = 30) -> int:
        """openssl ocsp -port 0 prints ``ACCEPT [::]:PORT`` once it listens."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = re.search(r"ACCEPT .*:(\d+)", log.read_text(errors="replace"))
            if found:
                return int(found.group(1))
            if proc.poll() is not None:
                raise BenchError(f"openssl ocsp exited {proc.returncode}: {log.read_text(errors='replace')[-2000:]}")
            time.sleep(0.05)
        raise BenchError(f"openssl ocsp did not listen within {timeout:.0f} s; log: {log}")


# -- running ------------------------------------------------------------------------------


@dataclasses.dataclass
class Run:
    target: str
    mode: str
    concurrency: int
    repeat: int
    responses_per_s: float
    ok: int
    errors: int
    error_kinds: dict[str, int]
    p50_ms: float
    p99_ms: float
    seconds: float
    server_cpu_s: float
    client_cpu_s: float
    machine_busy: float
    checked: int
    wrong: list[str]

    @property
    def cpu_us_per_response(self) -> float:
        return 1e6 * self.server_cpu_s / max(1, self.ok)


def supports(target: str, mode: str) -> bool:
    return mode == "get" or target not in GET_ONLY


def run_wrk(url: str, requests_file: Path, concurrency: int, duration: float) -> dict[str, Any]:
    threads = 1 if concurrency < 8 else 2
    args = ["wrk", "-t", str(threads), "-c", str(concurrency), "-d", f"{max(1, round(duration))}s",
            "--timeout", "10s", "-s", str(LUA), "-H", "Content-Type: application/ocsp-request",
            url, "--", str(requests_file)]
    try:
        done = subprocess.run(args, capture_output=True, timeout=duration + 60, check=False)
    except subprocess.TimeoutExpired:
        raise BenchError("wrk did not finish") from None
    if done.returncode != 0:
        raise BenchError(f"wrk failed ({done.returncode}): {done.stderr.decode(errors='replace')}")
    line = next((x for x in reversed(done.stdout.decode().splitlines()) if x.startswith("{")), None)
    if line is None:
        raise BenchError(f"wrk printed no summary:\n{done.stdout.decode(errors='replace')}")
    summary: dict[str, Any] = json.loads(line)
    return summary


def measure(peer: Peer, mode: str, requests: Sequence[Request], requests_file: Path, issuer: x509.Certificate,
            concurrency: int, duration: float, repeat: int) -> Run:
    checker = Checker(peer.url, requests, issuer, 0.8 * duration)
    trees = (peer.proc.pid, *peer.also)
    cpu_before = cpu_seconds([pid for root in trees for pid in process_tree(root)])
    busy_before, total_before = machine_busy()
    children_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    checker.start()
    try:
        summary = run_wrk(peer.url, requests_file, concurrency, duration)
        # at once: a wedged openssl (see Checker) spins from here on
        cpu_after = cpu_seconds([pid for root in trees for pid in process_tree(root)])
        children_after = resource.getrusage(resource.RUSAGE_CHILDREN)
        busy_after, total_after = machine_busy()
    finally:
        checker.stop()
    errors = summary["errors"]
    ok = summary["requests"] - errors["status"]
    seconds = summary["duration_us"] / 1e6
    return Run(
        target=peer.name, mode=mode, concurrency=concurrency, repeat=repeat,
        responses_per_s=ok / seconds if seconds else 0.0, ok=ok, errors=sum(errors.values()),
        error_kinds={k: v for k, v in errors.items() if v},
        p50_ms=summary["latency_us"]["p50"] / 1000, p99_ms=summary["latency_us"]["p99"] / 1000, seconds=seconds,
        server_cpu_s=sum(cpu_after[p] - cpu_before.get(p, 0.0) for p in cpu_after),
        client_cpu_s=(children_after.ru_utime + children_after.ru_stime)
        - (children_before.ru_utime + children_before.ru_stime),
        machine_busy=(busy_after - busy_before) / max(1e-9, total_after - total_before),
        checked=checker.checked, wrong=checker.wrong)


# -- report -------------------------------------------------------------------------------


def describe(r: Run) -> str:
    return (f"  #{r.repeat + 1} c={r.concurrency:<3} {r.target:<14} {r.mode:<7} {r.responses_per_s:9.1f}/s "
            f"p50 {r.p50_ms:6.2f} ms  p99 {r.p99_ms:6.2f} ms  errors {r.errors:<4} "
            f"server CPU {r.server_cpu_s / r.seconds:4.2f}  {r.cpu_us_per_response:7.1f} us/resp  "
            f"client CPU {r.client_cpu_s / r.seconds:4.2f}  machine busy {r.machine_busy:4.0%}  "
            f"checked {r.checked - len(r.wrong)}/{r.checked}")


def report(runs: list[Run], targets: list[str], modes: list[str], levels: list[int], repeats: int) -> str:
    label = "min / median / max" if repeats > 1 else "one run"
    lines = [f"Per peer, mode and concurrency ({label} over {repeats} run(s)); CPU in cores busy (CPU seconds / "
             "wall seconds); CPU us/resp: the server's CPU microseconds per response; client: wrk's CPU:", "",
             "| peer | mode | conc. | responses/s | p50 ms | p99 ms | errors | server CPU | CPU us/resp "
             "| client CPU | checked ok |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for mode in modes:
        for level in levels:
            for name in targets:
                rs = [r for r in runs if (r.target, r.mode, r.concurrency) == (name, mode, level)]
                if not rs:
                    continue
                lines.append(
                    f"| {name} | {mode} | {level} | {mmm([r.responses_per_s for r in rs])} "
                    f"| {mmm([r.p50_ms for r in rs], '{:.2f}')} | {mmm([r.p99_ms for r in rs], '{:.2f}')} "
                    f"| {mmm([float(r.errors) for r in rs])} "
                    f"| {mmm([r.server_cpu_s / r.seconds for r in rs], '{:.2f}')} "
                    f"| {mmm([r.cpu_us_per_response for r in rs], '{:.0f}')} "
                    f"| {mmm([r.client_cpu_s / r.seconds for r in rs], '{:.2f}')} "
                    f"| {sum(r.checked - len(r.wrong) for r in rs)}/{sum(r.checked for r in rs)} |")
    pairs = [(ours, theirs) for ours in OURS if ours in targets for theirs in targets if theirs.startswith("openssl")]
    if pairs:
        lines += ["", f"Ratio in responses/s (per repetition, runs back to back; {label}):", "",
                  "| mode | conc. | " + " | ".join(f"{a} / {b}" for a, b in pairs) + " |",
                  "|---|---:|" + "---:|" * len(pairs)]
        for mode in modes:
            for level in levels:
                cells = [mmm(ratios(runs, mode, level, a, b, repeats), "{:.1f}") for a, b in pairs]
                if any(c != "-" for c in cells):
                    lines.append(f"| {mode} | {level} | " + " | ".join(cells) + " |")
    errors = [r for r in runs if r.error_kinds]
    if errors:
        lines += ["", "Errors: " + "; ".join(f"{r.target} {r.mode} c={r.concurrency} #{r.repeat + 1}: "
                                            f"{r.error_kinds}" for r in errors)]
    return "\n".join(lines)


def ratios(runs: list[Run], mode: str, level: int, ours: str, peer: str, repeats: int) -> list[float]:
    found = []
    for rep in range(repeats):
        a = [r.responses_per_s for r in runs if (r.target, r.mode, r.concurrency, r.repeat) == (ours, mode, level, rep)]
        b = [r.responses_per_s for r in runs if (r.target, r.mode, r.concurrency, r.repeat) == (peer, mode, level, rep)]
        if a and b and b[0] > 0:
            found.append(a[0] / b[0])
    return found


def goal(runs: list[Run], levels: list[int], repeats: int) -> list[str]:
    """The issue's goal, answers without nonce (cached): at least 10x openssl (one process), p99
    under 10 ms; for certpulse itself (POST and GET) and behind an HTTP cache (GET)."""
    lines = []
    for ours, mode in (("certpulse", "cached"), ("certpulse", "get"), ("nginx-cache", "get")):
        for level in levels:
            rs = ratios(runs, mode, level, ours, "openssl", repeats)
            p99 = [r.p99_ms for r in runs if (r.target, r.mode, r.concurrency) == (ours, mode, level)]
            if not rs or not p99:
                continue
            ratio, worst = statistics.median(rs), max(p99)
            met = ratio >= GOAL_RATIO and worst < GOAL_P99_MS
            lines.append(f"goal {ours} {mode} c={level}: {ours}/openssl {ratio:.1f}x (median; goal >= "
                         f"{GOAL_RATIO:g}x), p99 {worst:.2f} ms (worst; goal < {GOAL_P99_MS:g} ms): "
                         f"{'met' if met else 'MISSED'}")
    return lines


# -- main ---------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0] if __doc__ else None)
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per run (default 10)")
    parser.add_argument("--levels", default=LEVELS, help=f"concurrency levels (default {LEVELS})")
    parser.add_argument("--repeat", type=int, default=3, help="repetitions of every run (default 3)")
    parser.add_argument("--certs", type=int, default=64, help="certificates enrolled (default 64)")
    parser.add_argument("--revoked", type=int, default=16, help="of which revoked (default 16)")
    parser.add_argument("--targets", default=",".join(ALL_TARGETS),
                        help=f"comma-separated, from {', '.join(ALL_TARGETS)} (default: all)")
    parser.add_argument("--modes", default=",".join(ALL_MODES),
                        help="cached (POST, no nonce), nonce (POST, a fresh nonce each), get (RFC 5019 GET, no nonce); "
                             "default: all three")
    parser.add_argument("--workers", type=int, default=2, help="certpulse worker processes (default 2)")
    parser.add_argument("--warmup", type=float, default=2.0, help="unmeasured seconds per peer first (default 2)")
    parser.add_argument("--json", type=Path, help="also write every run as JSON to this file")
    parser.add_argument("--keep", action="store_true", help="keep the working folder (logs, CA, index.txt)")
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run of a few seconds: certpulse and openssl (one process), concurrency 1, "
                             "1 s, one repetition, every mode (--targets and --levels still apply)")
    args = parser.parse_args(argv)
    if args.quick:
        args.duration, args.repeat, args.certs, args.revoked, args.warmup = 1.0, 1, 8, 2, 0.0
        if args.levels == LEVELS:
            args.levels = "1"
        if args.targets == ",".join(ALL_TARGETS):
            args.targets = "certpulse,openssl"
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    levels = [int(x) for x in args.levels.split(",") if x.strip()]
    if not targets or set(targets) - set(ALL_TARGETS) or not modes or set(modes) - set(ALL_MODES) \
            or not levels or min(levels) < 1 or not 0 <= args.revoked <= args.certs or args.certs < 1:
        print(f"ocsp: choose targets from {', '.join(ALL_TARGETS)}, modes from {', '.join(ALL_MODES)}, "
              "levels >= 1, 0 <= --revoked <= --certs", file=sys.stderr)
        return 2
    for tool in ("wrk", "openssl"):
        if shutil.which(tool) is None:
            print(f"ocsp: {tool} is not installed (scripts/system-packages installs wrk)", file=sys.stderr)
            return 2
    if "certpulse" in targets:  # certpulse makes the delegated signer that openssl signs with too
        targets = ["certpulse", *(t for t in targets if t != "certpulse")]
    if "nginx-cache" in targets and ("certpulse" not in targets or "get" not in modes):
        print("ocsp: nginx-cache needs the certpulse target (it caches its answers) and the get mode",
              file=sys.stderr)
        return 2

    print(f"ocsp benchmark: {dt.datetime.now(dt.UTC).isoformat(timespec='seconds')}")
    print(f"machine: {machine_description()}; load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"command: {' '.join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])])}")
    openssl_version = subprocess.run(["openssl", "version"], capture_output=True, text=True, check=False).stdout
    print(f"peers: {', '.join(targets)}; modes: {', '.join(modes)}; levels: {levels}; {args.duration:g} s per run; "
          f"{args.repeat} repetition(s); {args.certs} certificates ({args.revoked} revoked); "
          f"certpulse workers: {args.workers}; {openssl_version.strip()}")
    work = Path(tempfile.mkdtemp(prefix="certpulse-ocsp-"))
    runs: list[Run] = []
    try:
        started = time.perf_counter()
        setup = make_ca(work, args.certs, args.revoked)
        print(f"enrolled {len(setup.certificates)} certificates, revoked "
              f"{sum(1 for c in setup.certificates if c.revoked_at)}, in {time.perf_counter() - started:.1f} s")
        requests = {mode: make_requests(setup, mode) for mode in modes}
        files: dict[tuple[str, str], Path] = {}
        with Peers(work, setup, args.workers) as peers:
            lasting: dict[str, Peer] = {}  # certpulse and its cache run throughout; openssl is restarted
            for name in targets:
                if name != "certpulse" and peers.signer is None:  # certpulse's signer, if it has one
                    peers.signer = delegated_signer(setup, work)
                peer = peers.start(name, upstream=lasting.get("certpulse"))
                # every request, checked once before measuring (certpulse makes its signer then)
                for mode in (m for m in modes if supports(name, m)):
                    files[name, mode] = write_requests(work / f"requests-{name}-{mode}.txt", requests[mode], peer.url)
                    problems = [f"serial {r.expected.serial:x}: {p}" for r in requests[mode]
                                if (p := ask(peer.url, r, setup.issuer)) is not None]
                    if problems:
                        raise BenchError(f"{name} ({mode}) answers wrongly: " + "; ".join(problems[:5]))
                print(f"started {name} (pid {peer.proc.pid}): {peer.how}")
                if name in OURS:
                    lasting[name] = peer
                    if args.warmup > 0:
                        for mode in (m for m in modes if supports(name, m)):
                            run_wrk(peer.url, files[name, mode], 8, args.warmup)
                else:
                    peers.stop(peer)
            if peers.signer is not None and any(t.startswith("openssl") for t in targets):
                print(f"openssl signs with {peers.signer[2]}")
            for repeat in range(args.repeat):
                for level in levels:
                    for mode in modes:
                        for name in (t for t in targets if supports(t, mode)):
                            # openssl afresh for every run: the end of a run may wedge it (see Checker)
                            peer = lasting[name] if name in lasting else peers.start(name)
                            try:
                                result = measure(peer, mode, requests[mode], files[name, mode], setup.issuer,
                                                 level, args.duration, repeat)
                            finally:
                                if name not in lasting:
                                    peers.stop(peer)
                            runs.append(result)
                            print(describe(result), flush=True)
        print()
        print(report(runs, targets, modes, levels, args.repeat))
        print()
        for line in goal(runs, levels, args.repeat):
            print(line)
        wrong = [f"{r.target} {r.mode} c={r.concurrency}: {w}" for r in runs for w in r.wrong]
        print(f"checked during the runs: {sum(r.checked for r in runs)} answers, {len(wrong)} wrong"
              + ("".join(f"\n  {w}" for w in wrong[:20])))
        print(f"load average at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
        if args.json:
            args.json.write_text(json.dumps({
                "machine": machine_description(), "duration": args.duration,
                "runs": [{**dataclasses.asdict(r), "cpu_us_per_response": r.cpu_us_per_response} for r in runs]},
                indent=1))
        if wrong:
            return 1
    except BenchError as exc:
        print(f"ocsp: {exc}", file=sys.stderr)
        return 1
    finally:
        if args.keep:
            print(f"working folder kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
