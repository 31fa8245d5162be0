"""Smoke runs of the issuance benchmark (benchmarks/issuance.py --quick): it runs and reports.

The figures themselves are not judged here (``make bench`` takes them); only that every target
ran, issued certificates without errors, and that the CA recorded and audited what it issued.
Without wrk the benchmark drives certpulse with its own asyncio client, so the certpulse side
runs everywhere; cfssl joins when it is installed (scripts/bench-packages).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from support import REPO

BENCH = REPO / "benchmarks" / "issuance.py"


def run_bench(tmp_path: Path, *args: str) -> tuple[str, dict[str, Any]]:
    report = tmp_path / "runs.json"
    result = subprocess.run([sys.executable, str(BENCH), "--quick", "--json", str(report), *args],
                            capture_output=True, text=True, timeout=180, check=False)
    assert result.returncode == 0, f"{result.stdout}\n{result.stderr}"
    return result.stdout, json.loads(report.read_text())


def test_quick_run_reports_every_target(tmp_path: Path) -> None:
    out, report = run_bench(tmp_path)
    expected = {"certpulse-sqlite"} | ({"cfssl"} if shutil.which("cfssl") else set())
    assert {r["target"] for r in report["runs"]} == expected
    assert report["client"] == ("wrk" if shutil.which("wrk") else "async")
    for run in report["runs"]:
        assert run["issued_per_s"] > 0 and run["errors"] == 0, run
        assert run["p50_ms"] > 0 and run["server_cpu_s"] > 0 and run["peak_rss_mib"] > 0, run
    assert "| certpulse-sqlite | 8 |" in out
    assert "check: certpulse-sqlite:" in out and "serials unique" in out
    if "cfssl" in expected:
        assert "certpulse-sqlite / cfssl" in out  # the ratio table


def test_the_asyncio_client_drives_certpulse(tmp_path: Path) -> None:
    out, report = run_bench(tmp_path, "--client", "async", "--targets", "certpulse-sqlite", "--levels", "4")
    assert report["client"] == "async"
    [run] = report["runs"]
    assert run["issued_per_s"] > 0 and run["errors"] == 0 and run["client_cpu_s"] > 0, run
    assert "client: async" in out
