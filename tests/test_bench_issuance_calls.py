"""The issuance path's cost in Python calls, which load does not move (benchmarks/issuance_calls.py
and benchmarks/issuance_server_calls.py).

Wall-clock and even CPU figures move by a fifth on a shared machine; the number of Python calls an
issuance makes does not. The path must stay as cheap as it was before issue 15 added its checks
(issue 14's rule: no regression of the hot path): 1,108 calls per issuance at 3e26fba, measured
the same way (an in-process answer of ``POST /v1/requests`` on SQLite, the ``machine`` template).
A change that needs more than that on every issuance must win them back elsewhere, or say why in
benchmarks/RESULTS.md and move this bound with it.
"""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

from support import REPO

CALLS_BEFORE_ISSUE_15 = 1108


def run_bench(script: str, *args: str) -> dict[str, Any]:
    result = subprocess.run([sys.executable, str(REPO / "benchmarks" / script), *args],
                            capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, f"{result.stdout}\n{result.stderr}"
    return dict(json.loads(result.stdout.splitlines()[0]))


def test_an_issuance_costs_no_more_python_calls_than_before_issue_15() -> None:
    report = run_bench("issuance_calls.py", "--count", "100", "--rounds", "1", "--json")
    assert all(ms > 0 for ms in report["cpu_ms"]), report
    assert 500 < report["calls_per_issuance"] <= CALLS_BEFORE_ISSUE_15, report


def test_pointing_at_the_crl_and_ocsp_keeps_an_issuance_within_the_same_bound() -> None:
    # issue 17: with a public URL every certificate carries a CRL distribution point and an AIA
    # (built once per issuer and handed to the builder with the other extensions in one list)
    report = run_bench("issuance_calls.py", "--count", "100", "--rounds", "1", "--json",
                       "--public-url", "http://ca.example.com")
    assert 500 < report["calls_per_issuance"] <= CALLS_BEFORE_ISSUE_15, report


def test_the_server_side_count_runs_a_worker_and_reports() -> None:
    report = run_bench("issuance_server_calls.py", "--count", "50", "--rounds", "1")
    # the HTTP layer comes on top of the in-process path: uvicorn, the middleware, the thread pool
    assert report["calls_per_issuance"] > CALLS_BEFORE_ISSUE_15 and report["cpu_ms"][0] > 0, report
