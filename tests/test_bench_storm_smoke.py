"""Smoke run of the renewal storm benchmark (``benchmarks/storm.py --quick``).

It asserts only that the benchmark runs and reports: the figures themselves are taken with the
full runs on an otherwise idle machine, see benchmarks/RESULTS.md.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

STORM = Path(__file__).resolve().parent.parent / "benchmarks" / "storm.py"


def test_storm_benchmark_quick_run_reports(tmp_path: Path) -> None:
    out = tmp_path / "storm.json"
    done = subprocess.run([sys.executable, str(STORM), "--quick", "--json", str(out), "--workdir", str(tmp_path)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "renewal storm:" in done.stdout
    report = json.loads(out.read_text())
    phases = {(run["mode"], phase["phase"]): phase for run in report["runs"] for phase in run["phases"]}
    assert set(phases) == {("real", "enroll"), ("real", "renew"), ("light", "enroll"), ("light", "renew")}
    for phase in phases.values():
        assert phase["completed"] and phase["errors"] == 0, phase
        assert phase["certificates_issued"] == phase["agents"], phase
    assert set(report["summary"]) == {"real enroll", "real renew", "light enroll", "light renew"}
    assert [p.name for p in tmp_path.iterdir()] == [out.name]  # the CA and agent folders were removed
