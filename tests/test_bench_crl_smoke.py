"""Smoke run of the CRL generation benchmark (``benchmarks/crl.py --quick``: 1,000 entries, SQLite).

It asserts only that the benchmark runs and reports its figures and the peer's: the figures
themselves are taken with the full run on an otherwise idle machine, see benchmarks/RESULTS.md.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

CRL_BENCH = Path(__file__).resolve().parent.parent / "benchmarks" / "crl.py"


def test_crl_benchmark_quick_run_reports(tmp_path: Path) -> None:
    out = tmp_path / "crl.json"
    done = subprocess.run([sys.executable, str(CRL_BENCH), "--quick", "--json", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "CRL bench: done" in done.stdout
    results = json.loads(out.read_text())["results"]
    ours = next(r for r in results if r["backend"] == "sqlite")
    assert ours["entries"] == 1000 and ours["bytes"] > 1000 * 30
    for figure in ("cold_s", "cold_cpu_s", "read_s", "build_s", "sign_s", "warm_s"):
        assert ours[figure] > 0, figure
    peer = next(r for r in results if r["backend"].startswith("openssl"))
    assert peer["entries"] == 1000 and peer["wall_s"] > 0
