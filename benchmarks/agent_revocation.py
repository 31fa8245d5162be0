#!/usr/bin/env python3
"""The revocation check of one agent pulse with many certificates: one call per certificate
(before issue 17) against the batch status routes (after), in the same run.

Setup (not measured): a CA made in this process (EC P-256, SQLite, the ``machine`` template),
``--certs`` certificates issued by its core to the agent's machine principal and ``--others`` to a
second principal (copied onto the agent's machine: the batch path asks about those by serial),
``--revoked`` of them revoked; an agent store holding them all, written in bulk (the rows
``LocalStore.install`` writes; the revocation check reads nothing else); a real ``certpulse ca
serve`` (one worker, plain HTTP on loopback).

Measured, interleaved, ``--runs`` times each: ``agent.revocation.refresh_revoked`` with the
agent's own ``CAClient`` (a persistent connection), ``batch=False`` (one ``GET
/v1/certificates/{serial}`` per certificate: the old path, kept for CAs without the batch routes)
and ``batch=True`` (one ``GET /v1/certificates/status`` for the principal's own certificates, a
``POST`` per 500 of the rest). Reported per mode: wall seconds (min / median / max), HTTP calls,
CPU seconds of the agent (this process) and of the server (its process group, from /proc), and
the revoked set each found (both must equal what was revoked).

``--quick`` is the smoke run in ``make test`` (50 certificates, one run). Final figures: on an
otherwise idle machine, ``flock /tmp/certpulse-bench.lock .venv/bin/python
benchmarks/agent_revocation.py``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from certpulse.agent.client import CAClient
from certpulse.agent.revocation import STATE, refresh_revoked
from certpulse.ca.admin import CAAdmin
from certpulse.ca.config import CADir
from certpulse.ca.model import Caller, EnrollmentRequest
from certpulse.ca.results import Issued
from certpulse.ca.service import CAService
from certpulse.ca.setup import init_ca, open_service
from certpulse.machine import schema as store_schema
from certpulse.machine.certstore import LocalStore
from certpulse.pki import template_info

ROOT = Path(__file__).resolve().parent.parent
TEMPLATE = ROOT / "examples" / "templates" / "machine.toml"
OPERATOR = Caller(kind="operator", name="bench")
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


class Counting(httpx.BaseTransport):
    """httpx's own network transport, each call counted."""

    def __init__(self) -> None:
        self.inner = httpx.HTTPTransport()
        self.calls = 0

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        self.calls += 1
        return self.inner.handle_request(request)

    def close(self) -> None:
        self.inner.close()


def group_cpu_seconds(group: int) -> float:
    """User + system CPU of every live process in process group ``group``, children it waited
    for included (fields 14-17 of /proc/PID/stat)."""
    total = 0
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        if int(fields[2]) == group:  # pgrp
            total += sum(int(f) for f in fields[11:15])
    return total / CLOCK_TICKS


def new_csr() -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    csr = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([])).sign(key, hashes.SHA256())
    return csr.public_bytes(serialization.Encoding.PEM)


def issue(service: CAService, who: Caller, csr: bytes, count: int) -> list[Issued]:
    """``count`` certificates for ``who`` through the CA's core (one key each principal: a key
    belongs to one principal, and only the rows matter here)."""
    issued = []
    for _ in range(count):
        result = service.requests.submit(who, EnrollmentRequest(template="machine", csr=csr),
                                         dt.datetime.now(dt.UTC))
        assert isinstance(result, Issued), result
        issued.append(result)
    return issued


def stock_store(store: LocalStore, issued: list[Issued], url: str) -> dict[str, str]:
    """The agent store's rows for ``issued``, in one transaction (what ``install`` writes to the
    table the revocation check reads); serial -> thumbprint."""
    now = dt.datetime.now(dt.UTC)
    rows = []
    for item in issued:
        cert = x509.load_pem_x509_certificate(item.certificate.encode())
        rows.append({**store_schema.certificate_columns(cert, template_info.decode(cert)),
                     "template_name": "machine", "source": "auto", "policy_id": None, "issuer_name": "issuing-1",
                     "has_key": True, "archived": False, "installed_at": now, "policy_url": url})
    with store.engine.begin() as conn:
        conn.execute(store_schema.certificates.insert(), rows)
    return {row["serial"]: row["thumbprint"] for row in rows}


@contextlib.contextmanager
def ca_serve(ca_dir: Path) -> Iterator[tuple[str, int]]:
    """``certpulse ca serve`` (one worker, plain HTTP, loopback); its URL and process group."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "certpulse", "ca", "serve", "--dir", str(ca_dir), "--listen",
                             f"127.0.0.1:{port}", "--workers", "1", "--insecure-http"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline or proc.poll() is not None:
                raise SystemExit("ca serve did not start")
            time.sleep(0.2)
        yield url, proc.pid
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def measure(store: LocalStore, url: str, credential: str, group: int, batch: bool) -> dict[str, Any]:
    store.set_state(STATE, [])  # nothing known yet: every certificate is asked about
    transport = Counting()
    client = CAClient(url, credential, verify=False, transport=transport, timeout=60, deadline=600)
    try:
        server_before, agent_before = group_cpu_seconds(group), time.process_time()
        started = time.perf_counter()
        revoked = refresh_revoked(store, {url: client}, [], dt.datetime.now(dt.UTC), batch=batch)
        seconds = time.perf_counter() - started
        agent_cpu, server_cpu = time.process_time() - agent_before, group_cpu_seconds(group) - server_before
    finally:
        client.close()
    return {"seconds": seconds, "calls": transport.calls, "agent_cpu": agent_cpu, "server_cpu": server_cpu,
            "revoked": sorted(revoked)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0] if __doc__ else None)
    parser.add_argument("--certs", type=int, default=10_000, help="certificates issued to the agent's principal")
    parser.add_argument("--others", type=int, default=100, help="certificates of another principal in the store")
    parser.add_argument("--revoked", type=int, default=20, help="of them revoked (half each, at least one)")
    parser.add_argument("--runs", type=int, default=3, help="measured runs of each mode, interleaved")
    parser.add_argument("--quick", action="store_true", help="the smoke run: 50 + 10 certificates, one run")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    if args.quick:
        args.certs, args.others, args.revoked, args.runs = 50, 10, 4, 1
    command = " ".join([Path(sys.executable).name, *sys.argv])

    with tempfile.TemporaryDirectory(prefix="certpulse-agent-revocation-") as tmp:
        work = Path(tmp)
        ca_dir = CADir(work / "ca")
        setup_started = time.perf_counter()
        init_ca(ca_dir, name="bench", key_type="ec-p256", now=dt.datetime.now(dt.UTC))
        service = open_service(ca_dir, pool_size=1)
        admin = CAAdmin(service, OPERATOR)
        admin.add_template(TEMPLATE.read_text(), dt.datetime.now(dt.UTC))
        credentials = [service.auth.exchange_token(admin.add_principal(
            f"{who}-{uuid.uuid4().hex[:8]}.bench.internal", "machine", dt.datetime.now(dt.UTC))["token"],
            dt.datetime.now(dt.UTC)).credential for who in ("agent", "other")]
        agent, other = (service.auth.authenticate(c, dt.datetime.now(dt.UTC)) for c in credentials)
        own, copied = issue(service, agent, new_csr(), args.certs), issue(service, other, new_csr(), args.others)
        revoke = [*own[:: max(1, len(own) // max(1, args.revoked // 2))][: max(1, args.revoked // 2)],
                  *copied[: max(1, args.revoked - args.revoked // 2)]] if copied else own[: max(1, args.revoked)]
        for item in revoke:
            service.revocation.revoke(OPERATOR, item.serial, "keyCompromise", dt.datetime.now(dt.UTC))
        service.engine.dispose()
        store = LocalStore(work / "store")
        with ca_serve(ca_dir.root) as (url, group):
            thumbprints = stock_store(store, own + copied, url)
            expected = sorted(thumbprints[item.serial] for item in revoke)
            setup_seconds = time.perf_counter() - setup_started
            print(f"agent revocation bench: {args.certs} own + {args.others} copied certificates, "
                  f"{len(revoke)} revoked; setup {setup_seconds:.1f} s (not measured)", flush=True)
            measure(store, url, credentials[0], group, batch=True)  # warm-up: the server's first answers
            results: dict[str, list[dict[str, Any]]] = {"per-certificate": [], "batch": []}
            for _ in range(args.runs):
                for mode in results:
                    figures = measure(store, url, credentials[0], group, batch=mode == "batch")
                    if figures.pop("revoked") != expected:
                        raise SystemExit(f"{mode}: the revoked set found is not the one revoked")
                    results[mode].append(figures)
        store.close()

    summary: dict[str, Any] = {"command": command, "certs": args.certs, "others": args.others,
                               "revoked": len(revoke), "runs": args.runs, "modes": {}}
    print(f"command: {command}")
    print(f"{'mode':<16} {'seconds min/median/max':>26} {'HTTP calls':>11} {'agent CPU s':>12} {'server CPU s':>13}")
    for mode, runs in results.items():
        seconds = [r["seconds"] for r in runs]
        row = {"seconds": seconds, "calls": runs[0]["calls"],
               "agent_cpu": statistics.median(r["agent_cpu"] for r in runs),
               "server_cpu": statistics.median(r["server_cpu"] for r in runs)}
        summary["modes"][mode] = row
        print(f"{mode:<16} {min(seconds):>8.3f} /{statistics.median(seconds):>7.3f} /{max(seconds):>7.3f} "
              f"{row['calls']:>11} {row['agent_cpu']:>12.3f} {row['server_cpu']:>13.3f}")
    before, after = summary["modes"]["per-certificate"], summary["modes"]["batch"]
    speedup = statistics.median(before["seconds"]) / max(statistics.median(after["seconds"]), 1e-9)
    summary["speedup"] = speedup
    print(f"batch / per-certificate: {speedup:.1f}x faster (median wall), "
          f"{before['calls'] / max(after['calls'], 1):.0f}x fewer calls")
    print(f"load average at the end: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2))
    print("agent revocation bench: done")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
