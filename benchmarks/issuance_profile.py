#!/usr/bin/env python3
"""Where a certpulse worker's time goes while it issues: py-spy over ``ca serve`` under wrk load.

Starts ``certpulse ca serve`` the way ``benchmarks/issuance.py`` does (SQLite or PostgreSQL),
drives ``POST /v1/requests`` with wrk at one concurrency level, and records every worker process
with py-spy (``--gil``: only samples where a thread holds the GIL, i.e. Python doing work; time
in SQLite, libpq or waiting is not in them). Prints the functions with the largest inclusive and
self shares of those samples, grouped so that the parts of an issuance can be compared before
and after a change. py-spy is in the ``bench`` extra (``make bench`` installs it; or ``pip install -e '.[bench]'``).

    python benchmarks/issuance_profile.py [--backend sqlite|postgres] [--concurrency 32] [--seconds 8]
"""

from __future__ import annotations

import argparse
import collections
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from issuance import (
    PG_URL,
    BenchError,
    ClientResult,
    Targets,
    make_csrs,
    process_tree,
    run_client,
)

# What kind of code burns the time: the first frame from the leaf up that matches decides.
KINDS = (
    ("waiting for the SQLite writer lock (the GIL idle)", ("WriterLock.held",)),
    ("SQL (SQLAlchemy and the driver, Python side)", ("sqlalchemy/", "psycopg", "sqlite3")),
    ("X.509 and signing (cryptography, certpulse.pki)", ("cryptography/", "certpulse/pki/")),
    ("metrics", ("prometheus_client",)),
    ("HTTP framework and thread pool (FastAPI, pydantic, Starlette, anyio)",
     ("fastapi/", "pydantic", "starlette/", "anyio/")),
    ("server and event loop (uvicorn, httptools, asyncio)", ("uvicorn/", "httptools", "asyncio/", "uvloop")),
    ("certpulse's own code", ("certpulse/",)),
    ("threads and locks", ("threading.py", "queue.py")),
)
# Steps of an issuance (inclusive: everything under the frame)
STEPS = (
    ("whole handler (FastAPI route or the direct one)", ("create_app.<locals>.submit", "SubmitRoute.")),
    ("  authentication", ("Authentication.authenticate",)),
    ("  policy decision and certificate assembly before the transaction",
     ("RegistrationAuthority._decide_ahead",)),
    ("  write transaction (lock wait included)", ("write (certpulse/sql/db.py)",)),
    ("    confirming caller and state", ("Authentication.confirm", "read_generation")),
    ("    request row", ("RegistrationAuthority._insert_request",)),
    ("    serial reservation", ("CertificateAuthority._reserve_serial",)),
    ("    signing the certificate", ("CertificateBuilder.sign",)),
    ("    audit row", ("AuditTrail.record",)),
    ("  latency histogram", ("observe_submission",)),
)


def _kind(frames: list[str]) -> str:
    for frame in reversed(frames):
        for kind, needles in KINDS:
            if any(n in frame for n in needles):
                return kind
    return "other"


def summarise(raw: Path, top: int) -> str:
    inclusive: collections.Counter[str] = collections.Counter()
    own: collections.Counter[str] = collections.Counter()
    kinds: collections.Counter[str] = collections.Counter()
    steps: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        samples = int(count)
        total += samples
        frames = [re.sub(r":\d+\)$", ")", f) for f in stack.split(";")]
        for frame in set(frames):
            inclusive[frame] += samples
        own[frames[-1]] += samples
        kinds[_kind(frames)] += samples
        for step, needles in STEPS:
            if any(n in f for f in frames for n in needles):
                steps[step] += samples
    if not total:
        return "no samples"
    lines = [f"{total} samples holding the GIL", "", "by kind of code (leaf first):"]
    lines += [f"  {100 * n / total:5.1f}%  {kind}" for kind, n in kinds.most_common()]
    lines += ["", "by step of an issuance (inclusive):"]
    lines += [f"  {100 * steps[step] / total:5.1f}%  {step}" for step, _ in STEPS]
    lines += ["", "inclusive:"]
    lines += [f"  {100 * n / total:5.1f}%  {f}" for f, n in inclusive.most_common(top)
              if not f.startswith(("Thread._bootstrap", "<module>", "_run_module_as_main", "_run_code"))]
    lines += ["", "self:"]
    lines += [f"  {100 * n / total:5.1f}%  {f}" for f, n in own.most_common(top)]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0] if __doc__ else None)
    parser.add_argument("--backend", choices=("sqlite", "postgres"), default="sqlite")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--rate", type=int, default=250, help="py-spy samples per second")
    parser.add_argument("--top", type=int, default=30)
    parser.add_argument("--postgres", default=PG_URL)
    parser.add_argument("--raw", type=Path, help="keep the merged raw py-spy samples (flame graph input) here")
    args = parser.parse_args()
    pyspy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(pyspy).exists():
        print("issuance_profile: py-spy is not installed (pip install -e '.[bench]')", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="certpulse-issuance-profile-"))
    try:
        with Targets(work, make_csrs(500), args.workers, args.postgres) as targets:
            target = targets.start(f"certpulse-{args.backend}")
            run_client("wrk" if shutil.which("wrk") else "async", target, 8, 2.0)  # warm up
            workers = [p for p in process_tree(target.pid) if p != target.pid]
            outcome: list[ClientResult] = []
            client = "wrk" if shutil.which("wrk") else "async"
            load = threading.Thread(target=lambda: outcome.append(
                run_client(client, target, args.concurrency, args.seconds + 2)))
            load.start()
            time.sleep(1)
            raws = [work / f"spy-{pid}.txt" for pid in workers]
            spies = [subprocess.Popen([pyspy, "record", "--pid", str(pid), "--duration", str(int(args.seconds)),
                                       "--rate", str(args.rate), "--gil", "--nonblocking", "--format", "raw",
                                       "--output", str(raw)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                     for pid, raw in zip(workers, raws, strict=True)]
            for spy in spies:
                spy.wait(timeout=args.seconds + 60)
            load.join(timeout=args.seconds + 60)
        merged = work / "merged.txt"
        merged.write_text("".join(r.read_text() for r in raws if r.exists()))
        if args.raw:
            shutil.copy(merged, args.raw)
        print(f"certpulse-{args.backend}, {args.workers} workers, concurrency {args.concurrency}, "
              f"{args.seconds:g} s of py-spy --gil at {args.rate}/s over workers {workers}")
        for r in outcome:
            print(f"load: {r.ok / r.seconds:.0f} issued/s, p50 {r.p50_ms:.1f} ms, p99 {r.p99_ms:.1f} ms, "
                  f"errors {r.errors}")
        print(summarise(merged, args.top))
    except BenchError as exc:
        print(f"issuance_profile: {exc}", file=sys.stderr)
        return 1
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
