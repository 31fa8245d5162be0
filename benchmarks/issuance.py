#!/usr/bin/env python3
"""Issuance throughput (issue 6, part 1): certpulse ``ca serve`` and CloudFlare's ``cfssl serve``
side by side, driven by the same pre-made CSRs in the same run.

Targets (``--targets``, all four by default):

* ``certpulse-sqlite``: ``certpulse ca init`` (EC P-256 root and issuing CA) with its SQLite
  database, the ``machine`` template from ``examples/templates``, one machine principal whose
  credential enrolls; ``certpulse ca serve --workers 2 --insecure-http`` on loopback (plain
  HTTP, as ``cfssl serve`` is here: the comparison is of issuance, not of TLS).
* ``certpulse-postgres``: the same on PostgreSQL (a schema of its own in the local ``test``
  database, dropped afterwards; ``--postgres URL`` or ``CERTPULSE_BENCH_PG`` names the server).
* ``cfssl``: ``cfssl serve`` with an EC P-256 CA made by ``cfssl genkey -initca``, no database.
* ``cfssl-sqlite``: the same with cfssl's SQLite certificate database (``-db-config``; the table
  is cfssl's own migration, ``certdb/sqlite/migrations/001_CreateCertificates.sql``).

Each target is asked for new certificates (certpulse: ``POST /v1/requests`` with the principal's
bearer credential; cfssl: ``POST /api/v1/cfssl/sign``) at each concurrency level (``--levels``,
default 1, 8, 32, 64) for ``--duration`` seconds, the runs interleaved (level by level, target by
target) and repeated ``--repeat`` times. Every request body is made before measuring: ``--csrs``
distinct EC P-256 keys and CSRs, one JSON body a line, the same CSRs for every target.

The load generator is ``wrk`` with ``benchmarks/wrk/issuance.lua`` (it cycles over the bodies);
without ``wrk`` (or with ``--client async``) a small asyncio HTTP/1.1 client in this process
does it, and its own CPU time is reported either way. Per run: certificates issued per second
(2xx answers), p50 and p99 latency, errors (non-2xx, connect, read, timeouts), the server's
CPU time (every process of its tree, from ``/proc/<pid>/stat``; PostgreSQL's own processes
separately for the PostgreSQL target), the server tree's peak resident memory, and the load
generator's CPU time. Then the ratio certpulse / cfssl per level, and min / median / max over
the repetitions.

After the runs the certpulse databases are checked: every issued certificate has its ``issued``
audit row, serials are unique, and the database holds at least as many certificates as the
clients received (a few more when requests were in flight as a run ended).

``--quick`` is a smoke run of a few seconds (certpulse on SQLite, cfssl when installed).
The Debian packages ``wrk`` and ``golang-cfssl`` come from ``scripts/bench-packages``
(``make bench`` installs them).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import datetime as dt
import json
import os
import platform
import resource
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

REPO = Path(__file__).resolve().parents[1]
LUA = REPO / "benchmarks" / "wrk" / "issuance.lua"
MACHINE_TEMPLATE = REPO / "examples" / "templates" / "machine.toml"
CERTPULSE = [sys.executable, "-m", "certpulse"]
PG_URL = os.environ.get("CERTPULSE_BENCH_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
ALL_TARGETS = ("certpulse-sqlite", "certpulse-postgres", "cfssl", "cfssl-sqlite")
LEVELS = "1,8,32,64"
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")
PRINCIPAL = "bench-client.bench.test"

# cfssl's SQLite certificate table, as its source tree creates it with goose
# (certdb/sqlite/migrations/001_CreateCertificates.sql; the Debian package ships no migrations).
CFSSL_CERTDB_SCHEMA = """
CREATE TABLE certificates (
  serial_number            bytea NOT NULL,
  authority_key_identifier bytea NOT NULL,
  ca_label                 bytea,
  status                   bytea NOT NULL,
  reason                   int,
  expiry                   timestamp,
  revoked_at               timestamp,
  pem                      bytea NOT NULL,
  PRIMARY KEY(serial_number, authority_key_identifier)
);
CREATE TABLE ocsp_responses (
  serial_number            bytea NOT NULL,
  authority_key_identifier bytea NOT NULL,
  body                     bytea NOT NULL,
  expiry                   timestamp,
  PRIMARY KEY(serial_number, authority_key_identifier),
  FOREIGN KEY(serial_number, authority_key_identifier)
    REFERENCES certificates(serial_number, authority_key_identifier)
);
"""
# The machine template's profile, in cfssl's terms: one year, digital signature, client and server auth.
CFSSL_CONFIG = {"signing": {"default": {
    "expiry": "8760h", "usages": ["digital signature", "client auth", "server auth"]}}}


class BenchError(Exception):
    """A benchmark that cannot run as asked; the message says why and what to do."""


# -- processes and /proc ------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _stat_fields(pid: int) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rfind(")") + 2:].split()  # the command name may hold spaces and parentheses


def process_tree(root: int) -> list[int]:
    """``root`` and every process descended from it."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = _stat_fields(int(entry))
            if fields is not None:
                children.setdefault(int(fields[1]), []).append(int(entry))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, ()))
    return tree


def cpu_seconds(pids: Sequence[int]) -> dict[int, float]:
    """user + system CPU seconds of each live process in ``pids``."""
    result = {}
    for pid in pids:
        fields = _stat_fields(pid)
        if fields is not None:
            result[pid] = (int(fields[11]) + int(fields[12])) / CLK_TCK
    return result


def rss_bytes(pids: Sequence[int]) -> int:
    total = 0
    for pid in pids:
        fields = _stat_fields(pid)
        if fields is not None:
            total += int(fields[21]) * PAGE
    return total


def postgres_pids() -> list[int]:
    """The local PostgreSQL server's processes (read only: their CPU is the database's share)."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                if Path(f"/proc/{entry}/comm").read_text().strip() in ("postgres", "postmaster"):
                    pids.append(int(entry))
    return pids


def machine_busy() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine, from /proc/stat."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]
    return (sum(fields) - idle) / CLK_TCK, sum(fields) / CLK_TCK


def stop_process(proc: subprocess.Popen[bytes]) -> None:
    """Stop a server this script started in its own session: SIGTERM to its group, then SIGKILL."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


def run(args: Sequence[str], *, cwd: Path | None = None, input_: bytes | None = None,
        timeout: float = 120) -> bytes:
    result = subprocess.run(list(args), cwd=cwd, input=input_, capture_output=True, timeout=timeout, check=False)
    if result.returncode != 0:
        raise BenchError(f"{' '.join(map(str, args))} failed ({result.returncode}):\n"
                         f"{result.stdout.decode(errors='replace')}{result.stderr.decode(errors='replace')}")
    return result.stdout


def wait_for(url: str, proc: subprocess.Popen[bytes], log: Path, timeout: float = 60) -> None:
    """Until ``url`` answers (any HTTP status) or the process exits."""
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise BenchError(f"{proc.args!r} exited {proc.returncode}:\n{log.read_text(errors='replace')[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2):  # noqa: S310 - loopback URL we built
                return
        except urllib.error.HTTPError:
            return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise BenchError(f"{url} did not answer within {timeout:.0f} s; log: {log}")
        time.sleep(0.1)


def post_json(url: str, body: dict[str, Any], headers: dict[str, str] | None = None) -> tuple[int, dict[str, Any]]:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",  # noqa: S310
                                     headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:  # noqa: S310 - loopback URL
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


# -- request bodies -----------------------------------------------------------------------


def make_csrs(count: int) -> list[str]:
    """``count`` distinct EC P-256 keys, each in a CSR for its own host name (PEM)."""
    csrs = []
    for i in range(count):
        key = ec.generate_private_key(ec.SECP256R1())
        name = f"host-{i}.bench.test"
        csr = (x509.CertificateSigningRequestBuilder()
               .subject_name(x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, name)]))
               .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
               .sign(key, hashes.SHA256()))
        csrs.append(csr.public_bytes(serialization.Encoding.PEM).decode())
    return csrs


def write_bodies(path: Path, bodies: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(b, separators=(",", ":")) + "\n" for b in bodies))
    return path


# -- targets ------------------------------------------------------------------------------


def fresh_pg_schema(stack: contextlib.ExitStack, pg_url: str) -> str:
    """A schema of its own in the PostgreSQL database at ``pg_url``, dropped when ``stack`` closes;
    the URL that puts a certpulse CA in it."""
    from sqlalchemy import create_engine, text

    schema = f"bench_{uuid.uuid4().hex[:12]}"
    admin = create_engine(pg_url, isolation_level="AUTOCOMMIT", connect_args={"connect_timeout": 5})
    try:
        with admin.connect() as conn:
            conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    except Exception as exc:
        admin.dispose()
        raise BenchError(f"PostgreSQL is not reachable at {pg_url} ({type(exc).__name__}); "
                         f"start it, name another with --postgres URL, or leave out certpulse-postgres "
                         f"with --targets") from None

    def drop() -> None:
        with admin.connect() as conn:
            conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()

    stack.callback(drop)
    return f"{pg_url}?options=-csearch_path%3D{schema}"


@dataclasses.dataclass
class Target:
    name: str
    url: str
    headers: dict[str, str]
    bodies: Path
    proc: subprocess.Popen[bytes]
    database_url: str | None = None  # certpulse: checked after the runs
    postgres: bool = False

    @property
    def pid(self) -> int:
        return self.proc.pid


class Targets(contextlib.ExitStack):
    """Starts the servers; stops them (and drops what they made) on exit."""

    def __init__(self, work: Path, csrs: list[str], workers: int, pg_url: str) -> None:
        super().__init__()
        self.work = work
        self.csrs = csrs
        self.workers = workers
        self.pg_url = pg_url

    def start(self, name: str) -> Target:
        if name == "certpulse-sqlite":
            return self._certpulse(name, f"sqlite:///{self.work / name / 'ca.db'}")
        if name == "certpulse-postgres":
            return self._certpulse(name, self._pg_schema(), postgres=True)
        if name in ("cfssl", "cfssl-sqlite"):
            return self._cfssl(name, with_db=name == "cfssl-sqlite")
        raise BenchError(f"unknown target {name!r}; choose from {', '.join(ALL_TARGETS)}")

    def _spawn(self, name: str, args: list[str]) -> tuple[subprocess.Popen[bytes], Path]:
        log = self.work / f"{name}.log"
        out = self.enter_context(log.open("wb"))
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        self.callback(stop_process, proc)
        return proc, log

    def _pg_schema(self) -> str:
        return fresh_pg_schema(self, self.pg_url)

    def _certpulse(self, name: str, database_url: str, *, postgres: bool = False) -> Target:
        folder = self.work / name
        run([*CERTPULSE, "ca", "init", "--dir", str(folder), "--database", database_url, "--name", "bench",
             "--key-type", "ec-p256"])
        run([*CERTPULSE, "template", "add", str(MACHINE_TEMPLATE), "--dir", str(folder)])
        token = json.loads(run([*CERTPULSE, "principal", "add", PRINCIPAL, "--kind", "machine", "--json",
                                "--dir", str(folder)]))["token"]
        port = free_port()
        proc, log = self._spawn(name, [*CERTPULSE, "ca", "serve", "--dir", str(folder),
                                       "--listen", f"127.0.0.1:{port}", "--workers", str(self.workers),
                                       "--insecure-http"])
        base = f"http://127.0.0.1:{port}"
        wait_for(f"{base}/healthz", proc, log)
        status, answer = post_json(f"{base}/v1/tokens/exchange", {"token": token})
        if status != 200:
            raise BenchError(f"token exchange answered {status}: {answer}")
        bodies = write_bodies(self.work / f"{name}-bodies.jsonl",
                              [{"template": "machine", "csr": csr} for csr in self.csrs])
        return Target(name, f"{base}/v1/requests", {"Authorization": f"Bearer {answer['credential']}"},
                      bodies, proc, database_url=database_url, postgres=postgres)

    def _cfssl(self, name: str, *, with_db: bool) -> Target:
        if shutil.which("cfssl") is None or shutil.which("cfssljson") is None:
            raise BenchError("cfssl is not installed: run scripts/bench-packages (Debian package golang-cfssl), "
                             "or leave out the cfssl targets with --targets")
        folder = self.work / name
        folder.mkdir()
        request = {"CN": "bench cfssl CA", "key": {"algo": "ecdsa", "size": 256},
                   "names": [{"O": "bench"}]}
        (folder / "ca-csr.json").write_text(json.dumps(request))
        made = run(["cfssl", "genkey", "-initca", "ca-csr.json"], cwd=folder)
        run(["cfssljson", "-bare", "ca"], cwd=folder, input_=made)
        (folder / "config.json").write_text(json.dumps(CFSSL_CONFIG))
        port = free_port()
        args = ["cfssl", "serve", "-address", "127.0.0.1", "-port", str(port), "-ca", "ca.pem",
                "-ca-key", "ca-key.pem", "-config", "config.json", "-loglevel", "2"]
        if with_db:
            with contextlib.closing(sqlite3.connect(folder / "certs.db")) as db:
                db.executescript(CFSSL_CERTDB_SCHEMA)
            (folder / "db-config.json").write_text(json.dumps(
                {"driver": "sqlite3", "data_source": str(folder / "certs.db")}))
            args += ["-db-config", "db-config.json"]
        log = self.work / f"{name}.log"
        out = self.enter_context(log.open("wb"))
        proc = subprocess.Popen(args, cwd=folder, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        self.callback(stop_process, proc)
        base = f"http://127.0.0.1:{port}"
        wait_for(f"{base}/api/v1/cfssl/health", proc, log)
        bodies = write_bodies(self.work / f"{name}-bodies.jsonl",
                              [{"certificate_request": csr} for csr in self.csrs])
        status, answer = post_json(f"{base}/api/v1/cfssl/sign", json.loads(bodies.read_text().split("\n", 1)[0]))
        if status != 200 or not answer.get("success"):
            raise BenchError(f"cfssl sign answered {status}: {answer}")
        return Target(name, f"{base}/api/v1/cfssl/sign", {}, bodies, proc)


# -- load generators ----------------------------------------------------------------------


@dataclasses.dataclass
class ClientResult:
    ok: int
    errors: int
    seconds: float
    p50_ms: float
    p99_ms: float
    client_cpu: float
    error_kinds: dict[str, int]


def run_wrk(target: Target, concurrency: int, duration: float) -> ClientResult:
    threads = 1 if concurrency < 8 else 2
    args = ["wrk", "-t", str(threads), "-c", str(concurrency), "-d", f"{max(1, round(duration))}s",
            "--timeout", "10s", "-s", str(LUA), "-H", "Content-Type: application/json"]
    for key, value in target.headers.items():
        args += ["-H", f"{key}: {value}"]
    args += [target.url, "--", str(target.bodies)]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        out, err = proc.communicate(timeout=duration + 60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise BenchError("wrk did not finish") from None
    if proc.returncode != 0:
        raise BenchError(f"wrk failed ({proc.returncode}): {err.decode(errors='replace')}")
    line = next((x for x in reversed(out.decode().splitlines()) if x.startswith("{")), None)
    if line is None:
        raise BenchError(f"wrk printed no summary:\n{out.decode(errors='replace')}")
    summary = json.loads(line)
    errors = summary["errors"]
    ok = summary["requests"] - errors["status"]
    failed = sum(errors.values())
    return ClientResult(ok=ok, errors=failed, seconds=summary["duration_us"] / 1e6,
                        p50_ms=summary["latency_us"]["p50"] / 1000, p99_ms=summary["latency_us"]["p99"] / 1000,
                        client_cpu=0.0, error_kinds={k: v for k, v in errors.items() if v})


async def _async_load(target: Target, concurrency: int, duration: float) -> ClientResult:
    """A light HTTP/1.1 client: ``concurrency`` keep-alive connections, pre-encoded requests."""
    from urllib.parse import urlsplit

    url = urlsplit(target.url)
    host, port = url.hostname or "127.0.0.1", url.port or 80
    head = f"POST {url.path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
    head += "".join(f"{k}: {v}\r\n" for k, v in target.headers.items())
    requests = [
        (head + f"Content-Length: {len(line.encode())}\r\n\r\n").encode() + line.encode()
        for line in target.bodies.read_text().splitlines() if line
    ]
    latencies: list[float] = []
    counts = {"ok": 0, "status": 0, "read": 0, "connect": 0}
    deadline = time.perf_counter() + duration

    async def read_response(reader: asyncio.StreamReader) -> int:
        status = int((await reader.readline()).split(b" ", 2)[1])
        length, chunked = 0, False
        while (line := await reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
            elif name.strip().lower() == b"transfer-encoding" and b"chunked" in value.lower():
                chunked = True
        if chunked:
            while (size := int((await reader.readline()).strip().split(b";")[0], 16)) > 0:
                await reader.readexactly(size + 2)
            await reader.readline()
        else:
            await reader.readexactly(length)
        return status

    async def connection(index: int) -> None:
        position = index * 7919
        try:
            reader, writer = await asyncio.open_connection(host, port)
        except OSError:
            counts["connect"] += 1
            return
        try:
            while time.perf_counter() < deadline:
                position = (position + 1) % len(requests)
                started = time.perf_counter()
                writer.write(requests[position])
                try:
                    status = await asyncio.wait_for(read_response(reader), timeout=10)
                except (TimeoutError, OSError, asyncio.IncompleteReadError, ValueError, IndexError):
                    counts["read"] += 1
                    return
                latencies.append(time.perf_counter() - started)
                counts["ok" if 200 <= status < 300 else "status"] += 1
        finally:
            writer.close()

    cpu = time.process_time()
    started = time.perf_counter()
    await asyncio.gather(*(connection(i) for i in range(concurrency)))
    seconds = time.perf_counter() - started
    latencies.sort()

    def pct(q: float) -> float:
        return latencies[min(len(latencies) - 1, int(q * len(latencies)))] * 1000 if latencies else 0.0

    errors = {k: v for k, v in counts.items() if k != "ok" and v}
    return ClientResult(ok=counts["ok"], errors=sum(errors.values()), seconds=seconds, p50_ms=pct(0.50),
                        p99_ms=pct(0.99), client_cpu=time.process_time() - cpu, error_kinds=errors)


def run_client(kind: str, target: Target, concurrency: int, duration: float) -> ClientResult:
    if kind == "async":
        return asyncio.run(_async_load(target, concurrency, duration))
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    result = run_wrk(target, concurrency, duration)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    # wrk is the only child reaped meanwhile (the servers live until the end)
    result.client_cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    return result


# -- measuring ----------------------------------------------------------------------------


@dataclasses.dataclass
class Run:
    target: str
    concurrency: int
    repeat: int
    client: str
    issued_per_s: float
    ok: int
    errors: int
    error_kinds: dict[str, int]
    p50_ms: float
    p99_ms: float
    seconds: float
    server_cpu_s: float
    db_cpu_s: float | None
    client_cpu_s: float
    machine_busy: float  # share of all cores busy during the run, 0..1
    peak_rss_mib: float


class RssSampler(threading.Thread):
    def __init__(self, root: int, every: float = 0.2) -> None:
        super().__init__(daemon=True)
        self.root, self.every, self.peak = root, every, 0
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.is_set():
            self.peak = max(self.peak, rss_bytes(process_tree(self.root)))
            self.stopped.wait(self.every)

    def stop(self) -> int:
        self.stopped.set()
        self.join()
        return self.peak


def measure(target: Target, concurrency: int, duration: float, client: str, repeat: int) -> Run:
    cpu_before = cpu_seconds(process_tree(target.pid))
    pg = postgres_pids() if target.postgres else []
    pg_before = cpu_seconds(pg)
    busy_before, total_before = machine_busy()
    sampler = RssSampler(target.pid)
    sampler.start()
    try:
        result = run_client(client, target, concurrency, duration)
    finally:
        peak = sampler.stop()
    busy_after, total_after = machine_busy()
    # processes started during the run (a worker's pool opening PostgreSQL connections) count whole
    cpu_after = cpu_seconds(process_tree(target.pid))
    pg_after = cpu_seconds(postgres_pids()) if target.postgres else {}
    server_cpu = sum(cpu_after[p] - cpu_before.get(p, 0.0) for p in cpu_after)
    db_cpu = sum(pg_after[p] - pg_before.get(p, 0.0) for p in pg_after) if target.postgres else None
    return Run(
        target=target.name, concurrency=concurrency, repeat=repeat, client=client,
        issued_per_s=result.ok / result.seconds if result.seconds else 0.0, ok=result.ok, errors=result.errors,
        error_kinds=result.error_kinds, p50_ms=result.p50_ms, p99_ms=result.p99_ms, seconds=result.seconds,
        server_cpu_s=server_cpu, db_cpu_s=db_cpu, client_cpu_s=result.client_cpu,
        machine_busy=(busy_after - busy_before) / max(1e-9, total_after - total_before),
        peak_rss_mib=peak / 2**20,
    )


def check_certpulse(target: Target, received: int, in_flight: int) -> str:
    """What the CA recorded: one ``issued`` audit row per issued certificate, unique serials, and
    at least as many certificates as the client received."""
    from sqlalchemy import create_engine, text

    assert target.database_url is not None
    engine = create_engine(target.database_url)
    try:
        with engine.connect() as conn:
            # One statement, so one snapshot: a server still finishing requests in flight (each
            # one transaction writing all three rows) cannot make the counts disagree.
            row = conn.execute(text(
                "SELECT (SELECT count(*) FROM certificates WHERE status = 'issued' AND template_name = 'machine'), "
                "(SELECT count(DISTINCT authority_id || ':' || serial) FROM certificates "
                "WHERE status = 'issued' AND template_name = 'machine'), "
                "(SELECT count(*) FROM audit WHERE action = 'issued' AND template_name = 'machine'), "
                "(SELECT count(*) FROM requests WHERE status = 'issued')")).one()
    finally:
        engine.dispose()
    count, distinct, audited, requests = (int(value) for value in row)
    problems = []
    if distinct != count:
        problems.append(f"{count - distinct} duplicate serials")
    if audited != count or requests != count:
        problems.append(f"{count} certificates, {audited} issued audit rows, {requests} issued requests")
    if not received <= count <= received + in_flight:
        problems.append(f"the client received {received} certificates, the database holds {count}")
    if problems:
        raise BenchError(f"{target.name}: " + "; ".join(problems))
    return (f"{target.name}: {count} certificates issued, {audited} audited, serials unique "
            f"(clients received {received})")


# -- report -------------------------------------------------------------------------------


def mmm(values: list[float], fmt: str = "{:.0f}") -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return fmt.format(values[0])
    return " / ".join(fmt.format(v) for v in (min(values), statistics.median(values), max(values)))


def describe(r: Run) -> str:
    """One run on one line, as it finishes."""
    db = f" + DB {r.db_cpu_s / r.seconds:4.2f}" if r.db_cpu_s is not None else ""
    return (f"  #{r.repeat + 1} c={r.concurrency:<3} {r.target:<20} {r.issued_per_s:8.1f}/s "
            f"p50 {r.p50_ms:7.1f} ms  p99 {r.p99_ms:7.1f} ms  errors {r.errors:<4} "
            f"server CPU {r.server_cpu_s / r.seconds:4.2f}{db}  {per_cert(r):5.2f} ms/cert  "
            f"client CPU {r.client_cpu_s / r.seconds:4.2f}  machine busy {r.machine_busy:4.0%}  "
            f"peak RSS {r.peak_rss_mib:.0f} MiB")


def per_cert(run: Run) -> float:
    """Server CPU milliseconds per certificate issued (the database's own included, for PostgreSQL):
    unlike the rate, this hardly moves when something else on the machine takes CPU."""
    return 1000 * (run.server_cpu_s + (run.db_cpu_s or 0.0)) / max(1, run.ok)


def report(runs: list[Run], targets: list[str], levels: list[int], repeats: int) -> str:
    lines = []
    label = "min / median / max" if repeats > 1 else "one run"
    lines.append(f"Per target and concurrency ({label} over {repeats} run(s)); CPU in cores busy "
                 "(CPU seconds / wall seconds); CPU ms/cert: server and database CPU per certificate issued:")
    lines.append("")
    lines.append("| target | conc. | issued/s | p50 ms | p99 ms | errors | server CPU | CPU ms/cert | DB CPU "
                 "| client CPU | peak RSS MiB |")
    lines.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for level in levels:
        for name in targets:
            rs = [r for r in runs if r.target == name and r.concurrency == level]
            if not rs:
                continue
            db = [r.db_cpu_s / r.seconds for r in rs if r.db_cpu_s is not None]
            lines.append(
                f"| {name} | {level} | {mmm([r.issued_per_s for r in rs])} | {mmm([r.p50_ms for r in rs], '{:.1f}')} "
                f"| {mmm([r.p99_ms for r in rs], '{:.1f}')} | {mmm([float(r.errors) for r in rs])} "
                f"| {mmm([r.server_cpu_s / r.seconds for r in rs], '{:.2f}')} "
                f"| {mmm([per_cert(r) for r in rs], '{:.2f}')} "
                f"| {mmm(db, '{:.2f}') if db else '-'} "
                f"| {mmm([r.client_cpu_s / r.seconds for r in rs], '{:.2f}')} "
                f"| {mmm([r.peak_rss_mib for r in rs])} |")
    certpulse = [t for t in targets if t.startswith("certpulse")]
    peers = [t for t in targets if t.startswith("cfssl")]
    if certpulse and peers:
        lines.append("")
        lines.append("Ratio certpulse / cfssl in issued/s (per repetition, the runs of one repetition "
                     f"taken back to back; {label}):")
        lines.append("")
        lines.append("| conc. | " + " | ".join(f"{c} / {p}" for c in certpulse for p in peers) + " |")
        lines.append("|---:|" + "---:|" * (len(certpulse) * len(peers)))
        for level in levels:
            cells = []
            for c in certpulse:
                for p in peers:
                    ratios = []
                    for rep in range(repeats):
                        a = [r.issued_per_s for r in runs if (r.target, r.concurrency, r.repeat) == (c, level, rep)]
                        b = [r.issued_per_s for r in runs if (r.target, r.concurrency, r.repeat) == (p, level, rep)]
                        if a and b and b[0] > 0:
                            ratios.append(a[0] / b[0])
                    cells.append(mmm(ratios, "{:.2f}"))
            lines.append(f"| {level} | " + " | ".join(cells) + " |")
    errors = [r for r in runs if r.error_kinds]
    if errors:
        lines.append("")
        lines.append("Errors: " + "; ".join(f"{r.target} c={r.concurrency} #{r.repeat + 1}: {r.error_kinds}"
                                            for r in errors))
    return "\n".join(lines)


def machine_description() -> str:
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor() or "unknown CPU")
    return f"{os.cpu_count()} CPU(s), {model}, Linux {platform.release()}, Python {platform.python_version()}"


# -- main ---------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0] if __doc__ else None)
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per run (default 10)")
    parser.add_argument("--levels", default=LEVELS, help=f"concurrency levels (default {LEVELS})")
    parser.add_argument("--repeat", type=int, default=3, help="repetitions of every run (default 3)")
    parser.add_argument("--csrs", type=int, default=2000, help="distinct CSRs made in advance (default 2000)")
    parser.add_argument("--targets", default=",".join(ALL_TARGETS),
                        help=f"comma-separated, from {', '.join(ALL_TARGETS)} (default: all)")
    parser.add_argument("--client", choices=("auto", "wrk", "async"), default="auto",
                        help="load generator: wrk, the built-in asyncio client, or wrk when installed (default)")
    parser.add_argument("--workers", type=int, default=2, help="certpulse worker processes (default 2)")
    parser.add_argument("--warmup", type=float, default=2.0, help="unmeasured seconds per target first (default 2)")
    parser.add_argument("--postgres", default=PG_URL, help="PostgreSQL server for certpulse-postgres")
    parser.add_argument("--json", type=Path, help="also write every run as JSON to this file")
    parser.add_argument("--keep", action="store_true", help="keep the working folder (logs, CAs, databases)")
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run of a few seconds: certpulse on SQLite and cfssl (when installed), "
                             "concurrency 1 and 8, one short repetition (--targets and --levels still apply)")
    args = parser.parse_args(argv)
    if args.quick:
        args.duration, args.repeat, args.csrs, args.warmup = 1.0, 1, 50, 0.5
        if args.levels == LEVELS:
            args.levels = "1,8"
        if args.targets == ",".join(ALL_TARGETS):
            args.targets = "certpulse-sqlite" + (",cfssl" if shutil.which("cfssl") else "")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    levels = [int(x) for x in args.levels.split(",") if x.strip()]
    unknown = [t for t in targets if t not in ALL_TARGETS]
    if unknown or not targets or not levels or min(levels) < 1:
        print(f"issuance: choose targets from {', '.join(ALL_TARGETS)} and levels >= 1", file=sys.stderr)
        return 2
    client = args.client
    if client == "auto":
        client = "wrk" if shutil.which("wrk") else "async"
    elif client == "wrk" and not shutil.which("wrk"):
        print("issuance: wrk is not installed (scripts/bench-packages installs it)", file=sys.stderr)
        return 2

    print(f"issuance benchmark: {dt.datetime.now(dt.UTC).isoformat(timespec='seconds')}")
    print(f"machine: {machine_description()}")
    print(f"command: {' '.join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])])}")
    print(f"targets: {', '.join(targets)}; levels: {levels}; {args.duration:g} s per run; {args.repeat} repetition(s); "
          f"{args.csrs} CSRs; client: {client}{'' if client == 'wrk' else ' (asyncio, in this process)'}; "
          f"certpulse workers: {args.workers}")
    work = Path(tempfile.mkdtemp(prefix="certpulse-issuance-"))
    runs: list[Run] = []
    checks: list[str] = []
    try:
        started = time.perf_counter()
        csrs = make_csrs(args.csrs)
        print(f"made {len(csrs)} CSRs in {time.perf_counter() - started:.1f} s")
        with Targets(work, csrs, args.workers, args.postgres) as running:
            servers = {}
            for name in targets:
                servers[name] = running.start(name)
                print(f"started {name} (pid {servers[name].pid}) at {servers[name].url}")
            received = dict.fromkeys(servers, 0)  # certificates the clients got, warm-up included
            if args.warmup > 0:
                for name, server in servers.items():
                    received[name] += run_client(client, server, 8, args.warmup).ok
            for repeat in range(args.repeat):
                for level in levels:
                    for name in targets:
                        result = measure(servers[name], level, args.duration, client, repeat)
                        runs.append(result)
                        received[name] += result.ok
                        print(describe(result), flush=True)
            in_flight = sum(levels) * args.repeat + 8  # what the runs may have left in progress as they ended
            for name, server in servers.items():
                if server.database_url is not None:
                    checks.append(check_certpulse(server, received[name], in_flight))
        print()
        print(report(runs, targets, levels, args.repeat))
        print()
        for line in checks:
            print(f"check: {line}")
        if args.json:
            args.json.write_text(json.dumps({"machine": machine_description(), "client": client,
                                             "duration": args.duration, "runs": [dataclasses.asdict(r) for r in runs]},
                                            indent=1))
    except BenchError as exc:
        print(f"issuance: {exc}", file=sys.stderr)
        return 1
    finally:
        if args.keep:
            print(f"working folder kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
