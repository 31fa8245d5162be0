"""Smoke run of the planner and store scale benchmark (``benchmarks/scale.py --quick``).

It asserts only that the benchmark runs and reports every section: the figures themselves are
taken with the full run (``make bench``) on an otherwise idle machine, see benchmarks/RESULTS.md.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCALE = Path(__file__).resolve().parent.parent / "benchmarks" / "scale.py"


def test_scale_benchmark_quick_run_reports(tmp_path: Path) -> None:
    out = tmp_path / "scale.json"
    done = subprocess.run([sys.executable, str(SCALE), "--quick", "--json", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "scale bench: done" in done.stdout
    sections = json.loads(out.read_text())["sections"]
    for name in ("planner (spread)", "planner (dense)", "gather (real store)", "cert list (CLI process, end to end)",
                 "CA database (sqlite)"):
        assert sections[name]["figures"], name
    assert sections["gather (real store)"]["facts"]["bulk_rows_equal_install_rows"] is True
    assert sections["CA database (sqlite)"]["plans"], "no query plan was reported"
    assert "CA database (postgres)" in sections  # measured, or reported as skipped without a server
