#!/usr/bin/env python3
"""What one issuance costs the CA in-process, in figures a busy machine does not move much.

Sets up a CA as ``benchmarks/issuance.py`` does (``certpulse ca init``, EC P-256, SQLite, the
``machine`` template, one machine principal), then answers ``POST /v1/requests`` bodies the way
a worker's direct route does (``SubmitRoute._parse`` and ``._answer``: body model,
authentication, policy, assembly, the audited write transaction, signing, the JSON answer), in
this process and this thread, with no HTTP server or event loop around it. Reports:

* Python function calls per issuance (cProfile; independent of load), and the functions with
  the largest cumulative cost per issuance;
* process CPU time per issuance (``time.process_time``, not wall), over ``--rounds`` rounds.

Comparing two trees: run it with ``PYTHONPATH=<tree>/src`` for each, alternating, e.g.

    for i in 1 2 3; do
      PYTHONPATH=/path/to/before/src .venv/bin/python benchmarks/issuance_calls.py --count 400
      .venv/bin/python benchmarks/issuance_calls.py --count 400
    done
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from issuance import CERTPULSE, MACHINE_TEMPLATE, PRINCIPAL, make_csrs, run


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0] if __doc__ else None)
    parser.add_argument("--count", type=int, default=400, help="issuances per measured round")
    parser.add_argument("--rounds", type=int, default=3, help="CPU-time rounds (the minimum is reported too)")
    parser.add_argument("--csrs", type=int, default=0, help="CSRs made (default: --count); the bodies cycle")
    parser.add_argument("--no-profile", action="store_true",
                        help="only the warm-up pass and the CPU rounds (for instruction counts: run under "
                             "valgrind --tool=callgrind with two --count values and subtract)")
    parser.add_argument("--top", type=int, default=25, help="functions listed by cumulative cost")
    parser.add_argument("--json", action="store_true", help="one JSON line instead of the report")
    parser.add_argument("--save", type=Path, help="also write the profile (pstats) to this file")
    parser.add_argument("--public-url", help="ca init --public-url: certificates carry a CRL distribution point "
                                             "and AIA (trees before issue 17 do not know the option)")
    args = parser.parse_args()

    import certpulse
    from certpulse import clock
    from certpulse.ca.config import CADir
    from certpulse.ca.setup import open_service
    from certpulse.frontends.http import SubmitRoute, create_app

    with tempfile.TemporaryDirectory(prefix="certpulse-issuance-calls-") as tmp:
        folder = Path(tmp) / "ca"
        run([*CERTPULSE, "ca", "init", "--dir", str(folder), "--database", f"sqlite:///{tmp}/ca.db",
             "--name", "bench", "--key-type", "ec-p256",
             *(("--public-url", args.public_url) if args.public_url else ())])
        run([*CERTPULSE, "template", "add", str(MACHINE_TEMPLATE), "--dir", str(folder)])
        token = json.loads(run([*CERTPULSE, "principal", "add", PRINCIPAL, "--kind", "machine", "--json",
                                "--dir", str(folder)]))["token"]
        service = open_service(CADir(folder))
        credential = service.auth.exchange_token(token, clock.now()).credential
        route = SubmitRoute(create_app(service), service)
        scope = {"type": "http", "method": "POST", "path": "/v1/requests", "headers": [
            (b"content-type", b"application/json"), (b"authorization", f"Bearer {credential}".encode())]}
        csrs = make_csrs(args.csrs or args.count)
        bodies = [json.dumps({"template": "machine", "csr": c}).encode() for c in csrs]

        def issue_all() -> None:
            for i in range(args.count):
                data = bodies[i % len(bodies)]
                parsed = SubmitRoute._parse(scope, data)
                assert parsed is not None
                response = route._answer(*parsed)
                if response.status_code != 201:
                    raise SystemExit(f"issuance answered {response.status_code}: {response.body!r}")

        issue_all()  # warm up: caches, prepared statements, the snapshot
        cpu: list[float] = []
        for _ in range(args.rounds):
            start = time.process_time()
            issue_all()
            cpu.append((time.process_time() - start) * 1000 / args.count)
        if args.no_profile:
            service.engine.dispose()
            print(json.dumps({"code": str(Path(certpulse.__file__).parent), "count": args.count,
                              "cpu_ms": [round(c, 3) for c in cpu]}))
            return 0
        profile = cProfile.Profile()
        profile.enable()
        issue_all()
        profile.disable()
        stats = pstats.Stats(profile)
        if args.save:
            stats.dump_stats(args.save)
        calls = stats.total_calls / args.count  # type: ignore[attr-defined]
        service.engine.dispose()

    if args.json:
        print(json.dumps({"code": str(Path(certpulse.__file__).parent), "count": args.count,
                          "calls_per_issuance": round(calls, 1), "cpu_ms": [round(c, 3) for c in cpu]}))
        return 0
    print(f"code: {Path(certpulse.__file__).parent}")
    print(f"{args.count} issuances a round; Python calls per issuance: {calls:.1f}")
    print("process CPU ms per issuance, by round: " + ", ".join(f"{c:.3f}" for c in cpu)
          + f" (min {min(cpu):.3f})")
    out = io.StringIO()
    stats.stream = out  # type: ignore[attr-defined]
    stats.sort_stats("cumulative").print_stats(args.top)
    print(out.getvalue())
    return 0


if __name__ == "__main__":
    sys.exit(main())
