"""Smoke run of the ACME benchmark (``benchmarks/acme.py --quick``): it runs and reports.

The figures themselves are not judged here (the full run takes them, see benchmarks/RESULTS.md);
only that both peers, certpulse's ACME server and pebble, completed orders at concurrency 1
and 8 — every one validated over real HTTP by the generator's http-01 responder, its name
resolved by pebble-challtestsrv — without a single failed order, and that the report carries
the ratio and the goal lines. pebble and pebble-challtestsrv come from scripts/system-packages,
which ``make test`` runs.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from support import REPO

BENCH = REPO / "benchmarks" / "acme.py"


def test_quick_run_completes_orders_on_both_peers_without_errors(tmp_path: Path) -> None:
    report = tmp_path / "acme.json"
    done = subprocess.run([sys.executable, str(BENCH), "--quick", "--json", str(report)],
                          capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    runs = json.loads(report.read_text())["runs"]
    assert {(r["target"], r["concurrency"]) for r in runs} == {
        (peer, level) for peer in ("certpulse", "pebble") for level in (1, 8)}
    for run in runs:
        assert run["orders"] > 0 and run["errors"] == 0 and run["error_kinds"] == {}, run
        assert run["server_cpu_s"] > 0 and run["generator_cpu_s"] > 0 and run["p99_ms"] > 0, run
        assert run["requests"] >= 6 * run["orders"], run  # newOrder, authz, challenge, authz poll, finalize, cert
    assert "| certpulse | 1 |" in done.stdout and "| pebble | 8 |" in done.stdout
    assert "certpulse / pebble" in done.stdout  # the ratio table
    assert "goal certpulse c=1:" in done.stdout and "goal certpulse c=8:" in done.stdout
