"""Smoke run of the OCSP benchmark (``benchmarks/ocsp.py --quick``): it runs and reports.

The figures themselves are not judged here (the full run takes them, see benchmarks/RESULTS.md);
only that both peers, certpulse's responder and ``openssl ocsp -port``, answered every request
without errors, in every mode (POST cached, POST with nonce, GET), and that every answer checked
during the runs was right.
wrk comes from scripts/system-packages, which ``make test`` runs.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from support import REPO

BENCH = REPO / "benchmarks" / "ocsp.py"


def test_quick_run_reports_both_peers_without_errors(tmp_path: Path) -> None:
    report = tmp_path / "ocsp.json"
    done = subprocess.run([sys.executable, str(BENCH), "--quick", "--json", str(report)],
                          capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    runs = json.loads(report.read_text())["runs"]
    assert {(r["target"], r["mode"]) for r in runs} == {
        (peer, mode) for peer in ("certpulse", "openssl") for mode in ("cached", "nonce", "get")}
    for run in runs:
        assert run["concurrency"] == 1 and run["ok"] > 0 and run["errors"] == 0, run
        assert run["checked"] > 0 and run["wrong"] == [], run
        assert run["server_cpu_s"] > 0 and run["p99_ms"] > 0, run
    assert "| certpulse | cached | 1 |" in done.stdout and "| openssl | nonce | 1 |" in done.stdout
    assert "certpulse / openssl" in done.stdout  # the ratio table
    assert "goal certpulse cached c=1:" in done.stdout and ", 0 wrong" in done.stdout
