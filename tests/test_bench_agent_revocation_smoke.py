"""Smoke run of the agent revocation benchmark (``benchmarks/agent_revocation.py --quick``).

It asserts that the benchmark runs, that both modes found exactly the revoked certificates (the
benchmark checks that itself and fails otherwise) and the number of HTTP calls each made, which
does not depend on the machine; the figures themselves come from the full run, see
benchmarks/RESULTS.md.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from support import REPO


def test_agent_revocation_benchmark_quick_run_reports(tmp_path: Path) -> None:
    out = tmp_path / "agent-revocation.json"
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "agent_revocation.py"), "--quick",
                           "--json", str(out)], capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "agent revocation bench: done" in done.stdout and "command:" in done.stdout
    figures = json.loads(out.read_text())
    modes = figures["modes"]
    # one GET per certificate before; one GET (own) and one POST (the other principal's) after
    assert modes["per-certificate"]["calls"] == figures["certs"] + figures["others"]
    assert modes["batch"]["calls"] == 2
    assert all(s > 0 for mode in modes.values() for s in mode["seconds"])
