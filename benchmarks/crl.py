#!/usr/bin/env python3
"""CRL generation (issue 17): time and size of a full CRL of 1,000 / 100,000 / 1,000,000 revoked
certificates, on SQLite and PostgreSQL, beside ``openssl ca -gencrl`` on the same revocations.

For each size and backend: a CA made by ``init_ca`` (the migrations' schema), whose issuing CA
then gets N revoked, unexpired certificates (and N/4 good ones) written in bulk (executemany /
COPY, not through the API: the revocation path is not what is measured). The rows leave the
certificate (``der``) empty, as a reserved row has it: a CRL reads its columns from an index
alone, and a gigabyte of certificates would only make the setup slower. Reasons are a fixed mix
(40 % unspecified, which carries no reason code, 25 % superseded, 20 % cessationOfOperation,
10 % keyCompromise, 5 % certificateHold). Then, in this process:

* ``cold``: ``service.crls.generate()`` with a new service (empty entry cache): what a freshly
  started process pays, the figure the goal (1,000,000 entries in under 10 s) is about. Wall
  time and this process's CPU time;
* its phases, measured apart on the same rows: reading the rows (the narrow select, streamed),
  building the entries, signing (with DER encoding), storing the row;
* ``warm``: ``generate()`` again in the same service after one more revocation, the entries
  cached (at most 200,000 of them: beyond that they are built again each time);
* the peer: ``openssl ca -gencrl`` over an ``index.txt`` listing the same revocations (the
  tool every operator has; it reads a text file, not a database).

PostgreSQL uses a schema of its own in the local ``test`` database, dropped afterwards.
``--quick`` runs 1,000 entries on SQLite only, in a few seconds (the smoke test in ``make test``).
Take final figures on an otherwise idle machine: ``flock /tmp/certpulse-bench.lock python
benchmarks/crl.py``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import random
import resource
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from certpulse.pki.build import random_serial
from certpulse.pki.certs import serial_hex

ROOT = Path(__file__).resolve().parent.parent
NOW = dt.datetime.now(dt.UTC).replace(microsecond=0)
DAY = dt.timedelta(days=1)
PG_ADMIN_URL = os.environ.get("CERTPULSE_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
REASON_MIX = (("unspecified", 40), ("superseded", 25), ("cessationOfOperation", 20), ("keyCompromise", 10),
              ("certificateHold", 5))
OPENSSL_REASONS = {"unspecified": "unspecified", "superseded": "superseded", "keyCompromise": "keyCompromise",
                   "cessationOfOperation": "cessationOfOperation", "certificateHold": "certificateHold"}
CHUNK = 50_000


# -- the CA and its rows --------------------------------------------------------------------------

@contextlib.contextmanager
def pg_schema() -> Iterator[str]:
    from sqlalchemy import create_engine, text

    schema = f"cp_crl_{uuid.uuid4().hex[:10]}"
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    try:
        yield f"{PG_ADMIN_URL}?options=-csearch_path%3D{schema}"
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


def postgres_available() -> bool:
    from sqlalchemy import create_engine, text

    try:
        engine = create_engine(PG_ADMIN_URL, connect_args={"connect_timeout": 3})
        with engine.connect() as conn:
            conn.execute(text("select 1"))
        engine.dispose()
        return True
    except Exception:
        return False


def revocations(count: int, seed: int = 17) -> list[tuple[str, dt.datetime, str]]:
    """(serial hex, revocation date, reason) of ``count`` revoked certificates, the fixed mix."""
    rng = random.Random(seed)
    reasons = [reason for reason, share in REASON_MIX for _ in range(share)]
    return [(serial_hex(random_serial()), NOW - dt.timedelta(seconds=rng.randrange(1, 300 * 86400)),
             reasons[i % len(reasons)]) for i in range(count)]


def certificate_rows(issuer_id: int, revoked: list[tuple[str, dt.datetime, str]], good: int
                     ) -> Iterator[dict[str, Any]]:
    names = json.dumps({"dns": ["host.bench.internal"]})
    common = dict(authority_id=issuer_id, template_name="machine", subject="CN=host.bench.internal", names=names,
                  status="issued", der=None)
    for serial, revoked_at, reason in revoked:
        yield dict(common, serial=serial, not_before=revoked_at - 30 * DAY, not_after=revoked_at + 335 * DAY,
                   revoked_at=revoked_at, revocation_reason=reason, created_at=revoked_at - 30 * DAY)
    for _ in range(good):
        yield dict(common, serial=serial_hex(random_serial()), not_before=NOW - 30 * DAY, not_after=NOW + 335 * DAY,
                   revoked_at=None, revocation_reason=None, created_at=NOW - 30 * DAY)


def bulk_insert(engine: Any, table: Any, rows: Iterable[dict[str, Any]]) -> None:
    """executemany on SQLite, COPY on PostgreSQL, in chunks; values bound through the columns' types."""
    columns: list[Any] | None = None
    processors: list[Any] = []
    with engine.begin() as conn:
        raw = conn.connection.dbapi_connection
        batch: list[tuple[Any, ...]] = []

        def flush() -> None:
            assert columns is not None
            names = ", ".join(c.name for c in columns)  # certpulse's own schema, never input
            if engine.dialect.name == "sqlite":
                marks = ", ".join("?" for _ in columns)
                raw.cursor().executemany(f"INSERT INTO {table.name} ({names}) VALUES ({marks})", batch)  # noqa: S608
            else:
                with raw.cursor() as cursor, cursor.copy(f"COPY {table.name} ({names}) FROM STDIN") as copy:
                    for row in batch:
                        copy.write_row(row)
            batch.clear()

        for row in rows:
            if columns is None:
                columns = [c for c in table.columns if c.name in row]
                processors = [c.type.bind_processor(engine.dialect) for c in columns]
            batch.append(tuple(p(row[c.name]) if p else row[c.name] for c, p in zip(columns, processors, strict=True)))
            if len(batch) >= CHUNK:
                flush()
        if batch:
            flush()
    if engine.dialect.name == "postgresql":
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            from sqlalchemy import text

            conn.execute(text(f"VACUUM ANALYZE {table.name}"))


def make_ca(directory: Path, url: str, revoked: list[tuple[str, dt.datetime, str]]) -> float:
    """A CA in ``directory`` whose issuing CA has these revocations and a quarter as many good
    certificates; returns the seconds the bulk insert took."""
    from sqlalchemy import select

    from certpulse.ca.config import CADir
    from certpulse.ca.setup import init_ca, open_service
    from certpulse.ca.storage import schema as t

    ca_dir = CADir(directory)
    init_ca(ca_dir, name="bench", key_type="ec-p256", now=NOW - 400 * DAY, database_url=url)
    service = open_service(ca_dir, pool_size=2)
    try:
        with service.engine.connect() as conn:
            issuer_id = conn.execute(select(t.authorities.c.id).where(t.authorities.c.name == "issuing-1")).scalar_one()
        started = time.perf_counter()
        bulk_insert(service.engine, t.certificates, certificate_rows(issuer_id, revoked, len(revoked) // 4))
        return time.perf_counter() - started
    finally:
        service.engine.dispose()


# -- measuring --------------------------------------------------------------------------------------

def timed(fn: Callable[[], Any]) -> tuple[Any, float, float]:
    """fn's result, wall seconds, and this process's CPU seconds."""
    cpu, wall = time.process_time(), time.perf_counter()
    result = fn()
    return result, time.perf_counter() - wall, time.process_time() - cpu


def bench_certpulse(directory: Path, count: int) -> dict[str, Any]:
    from sqlalchemy import update

    from certpulse.ca import crl as ca_crl
    from certpulse.ca.config import CADir
    from certpulse.ca.setup import open_service
    from certpulse.ca.storage import schema as t
    from certpulse.pki.crl import EntryCache, sign_crl
    from certpulse.sql.db import read, write

    ca_dir = CADir(directory)
    service = open_service(ca_dir, pool_size=2)
    try:
        published, cold_wall, cold_cpu = timed(lambda: service.crls.generate("issuing-1", NOW))
        assert published.entries == count, (published.entries, count)
        authority = service.crls.authority("issuing-1")
        # the phases, apart
        rows, read_wall, _ = timed(lambda: _read_rows(service.engine, authority.id, read, ca_crl))
        entries, build_wall, _ = timed(lambda: EntryCache().entries(rows))
        signed, sign_wall, _ = timed(lambda: sign_crl(
            issuer_cert=authority.certificate, issuer_key=service.keyring.key(authority), number=10**6,
            this_update=NOW, next_update=NOW + 7 * DAY, entries=entries))
        # one more revocation (a good certificate put on hold), then the CRL again, entries cached
        with write(service.engine) as conn:
            victim = conn.execute(t.certificates.select().where(t.certificates.c.revoked_at.is_(None)).limit(1)).first()
            conn.execute(update(t.certificates).where(t.certificates.c.id == victim.id).values(
                revoked_at=NOW, revocation_reason="certificateHold"))
        warm, warm_wall, warm_cpu = timed(lambda: service.crls.generate("issuing-1", NOW + dt.timedelta(seconds=1)))
        assert warm.entries == count + 1
        store_wall = max(cold_wall - read_wall - build_wall - sign_wall, 0.0)
        return {"entries": count, "bytes": len(published.der), "cold_s": cold_wall, "cold_cpu_s": cold_cpu,
                "read_s": read_wall, "build_s": build_wall, "sign_s": sign_wall, "store_and_rest_s": store_wall,
                "warm_s": warm_wall, "warm_cpu_s": warm_cpu, "signed_bytes": len(signed.der),
                "entries_per_s": count / cold_wall if cold_wall else 0.0}
    finally:
        service.engine.dispose()


def _read_rows(engine: Any, authority_id: int, read: Any, ca_crl: Any) -> list[tuple[int, dt.datetime, str]]:
    with read(engine) as conn:
        return list(ca_crl._revoked_rows(conn, ca_crl.DirectStatement(ca_crl.REVOKED_ROWS, engine.dialect),
                                         authority_id, NOW))


def bench_openssl(directory: Path, revoked: list[tuple[str, dt.datetime, str]]) -> dict[str, Any]:
    """``openssl ca -gencrl`` over an index.txt of the same revocations, signed by the same issuer key."""
    openssl = shutil.which("openssl")
    if openssl is None:
        return {"skipped": "openssl is not installed"}
    work = directory / "openssl-ca"
    work.mkdir()
    expiry = (NOW + 300 * DAY).strftime("%y%m%d%H%M%SZ")
    with (work / "index.txt").open("w") as index:
        for serial, revoked_at, reason in revoked:
            hexed = serial.upper().rjust(len(serial) + len(serial) % 2, "0")
            index.write(f"R\t{expiry}\t{revoked_at.strftime('%y%m%d%H%M%SZ')},{OPENSSL_REASONS[reason]}\t"
                        f"{hexed}\tunknown\t/CN=host.bench.internal\n")
    (work / "index.txt.attr").write_text("unique_subject = no\n")
    (work / "crlnumber").write_text("01\n")
    config = work / "openssl.cnf"
    config.write_text(
        "[ ca ]\ndefault_ca = bench\n[ bench ]\n"
        f"database = {work / 'index.txt'}\ncrlnumber = {work / 'crlnumber'}\n"
        f"certificate = {directory / 'ca' / 'certs' / 'issuer-issuing-1.pem'}\n"
        f"private_key = {directory / 'ca' / 'keys' / 'issuer-issuing-1.key'}\n"
        "default_md = sha256\ndefault_crl_days = 7\ncrl_extensions = crl_ext\n"
        "[ crl_ext ]\nauthorityKeyIdentifier = keyid:always\n")
    out = work / "crl.der"
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    done = subprocess.run([openssl, "ca", "-config", str(config), "-gencrl", "-batch", "-out", str(work / "crl.pem")],
                          capture_output=True, text=True, timeout=3600, check=False)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        return {"failed": done.stderr[-2000:]}
    subprocess.run([openssl, "crl", "-in", str(work / "crl.pem"), "-outform", "DER", "-out", str(out)],
                   capture_output=True, timeout=600, check=True)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    size = out.stat().st_size
    shutil.rmtree(work, ignore_errors=True)
    return {"entries": len(revoked), "bytes": size, "wall_s": wall, "cpu_s": cpu,
            "entries_per_s": len(revoked) / wall if wall else 0.0}


def _mb(size: int) -> str:
    return f"{size / 1e6:.2f} MB"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="1,000 entries on SQLite only (smoke run)")
    parser.add_argument("--sizes", default="1000,100000,1000000", help="revoked certificates, comma-separated")
    parser.add_argument("--backends", default="sqlite,postgres", help="comma-separated: sqlite, postgres")
    parser.add_argument("--no-openssl", action="store_true", help="leave out openssl ca -gencrl")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    args = parser.parse_args(argv)
    sizes = [1000] if args.quick else [int(s) for s in args.sizes.split(",") if s.strip()]
    backends = ["sqlite"] if args.quick else [b.strip() for b in args.backends.split(",") if b.strip()]
    print(f"certpulse CRL bench: {platform.node()} ({os.cpu_count()} cores, {platform.platform()}, "
          f"Python {platform.python_version()}, SQLite {sqlite3.sqlite_version}), {NOW.isoformat()}")
    print(f"command: {' '.join([Path(sys.executable).name, *sys.argv])}")
    results: list[dict[str, Any]] = []
    work = Path(tempfile.mkdtemp(prefix="certpulse-crl-"))
    try:
        for size in sizes:
            revoked = revocations(size)
            for backend in backends:
                if backend == "postgres" and not postgres_available():
                    print(f"\n== {size} entries, postgres: skipped (no PostgreSQL at {PG_ADMIN_URL}) ==")
                    results.append({"backend": backend, "entries": size, "skipped": "no PostgreSQL"})
                    continue
                folder = work / f"{backend}-{size}"
                folder.mkdir()
                with contextlib.ExitStack() as stack:
                    url = f"sqlite:///{folder / 'ca.db'}" if backend == "sqlite" else stack.enter_context(pg_schema())
                    insert_s = make_ca(folder / "ca", url, revoked)
                    figures = bench_certpulse(folder / "ca", size)
                figures.update(backend=backend, insert_s=insert_s)
                results.append(figures)
                print(f"\n== {size:,} entries, {backend} (rows written in bulk in {insert_s:.1f} s) ==")
                print(f"  cold (new process state): {figures['cold_s']:.2f} s wall, {figures['cold_cpu_s']:.2f} s CPU,"
                      f" {_mb(figures['bytes'])}, {figures['entries_per_s']:,.0f} entries/s")
                print(f"    read rows {figures['read_s']:.2f} s, build entries {figures['build_s']:.2f} s, "
                      f"sign + DER {figures['sign_s']:.2f} s, store and the rest {figures['store_and_rest_s']:.2f} s")
                print(f"  warm (one more revocation, entries cached): {figures['warm_s']:.2f} s wall, "
                      f"{figures['warm_cpu_s']:.2f} s CPU")
                if backend == backends[-1] and not args.no_openssl:
                    peer = bench_openssl(folder, revoked)
                    peer.update(backend="openssl ca -gencrl (index.txt)")
                    results.append(peer)
                    if "wall_s" in peer:
                        print(f"  peer, openssl ca -gencrl over index.txt: {peer['wall_s']:.2f} s wall, "
                              f"{peer['cpu_s']:.2f} s CPU, {_mb(peer['bytes'])}, "
                              f"{peer['entries_per_s']:,.0f} entries/s")
                    else:
                        print(f"  peer, openssl ca -gencrl: {peer}")
                shutil.rmtree(folder, ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if args.json:
        args.json.write_text(json.dumps({"machine": platform.node(), "cores": os.cpu_count(), "at": NOW.isoformat(),
                                         "argv": sys.argv, "results": results}, indent=1, default=str))
    print("\nCRL bench: done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
