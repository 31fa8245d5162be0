#!/usr/bin/env python3
"""Renewal storm (issue 6, part 2): N agents start at the same instant against one ``ca serve``.

What one run does:

1. Makes a CA in a temporary folder (EC P-256, the ``machine`` template; SQLite by default,
   ``--postgres URL`` for a fresh schema in PostgreSQL), registers N machine principals through
   the CA's Python API (``CAAdmin.add_principal`` + the token exchange, in process, before the
   server starts) and an agent folder for each (what ``agent init --ca-file`` leaves).
2. Starts ``certpulse ca serve --workers W --max-inflight M --insecure-http`` on loopback.
3. **Enrollment storm**: every agent pulses at the same instant and keeps pulsing, backing off
   as the daemon does (``next_delay``: the server's Retry-After turn for the first few shed
   pulses, then the one-minute floor, exponential, with jitter; the agents' own backoff divided
   by ``--time-factor``), until it holds a valid certificate.
4. **Renewal storm**: after a short pause the same agents pulse again, their clock moved forward
   (``Agent.pulse(now)``) to one second past the latest renewal threshold of their certificates
   (min(six weeks, 20 % of the lifetime) before expiry), so every certificate is due at once;
   done when every agent holds a new valid certificate. The CA keeps its own clock (renewing a
   still-valid certificate is allowed). Its new certificates expire, from the agents' moved
   clock, as soon as the old ones did; the pause makes them due only that long after they are
   issued, so that no agent renews twice within the storm.

Two kinds of agents (``--mode``; the default runs both, each against a fresh CA):

* ``real``: the real agent code, each agent with its own folder, SQLite store, keys and
  credential (``storm_fleet.py``). On one machine these cost ~4x the CPU the CA spends on them,
  so they show correctness at scale (every agent valid, one certificate each, no errors) and the
  end-to-end time, but the CA is not their bottleneck;
* ``light``: protocol-level agents (``storm_light.py``): the same requests in the same order,
  the same backoff, one connection each, keys and CSRs made beforehand, so that N agents really
  are at the server at once and the CA is the bottleneck: this is where shedding shows.

Reported per storm: the time until every agent held a valid certificate, per-agent times,
pulses and retries, the requests the server shed (503 + Retry-After; the server's own counter
and what the agents saw), errors (anything else: timeouts, resets, 5xx, refusals: must be 0),
the server's peak concurrency, peak RSS and CPU, and the CPU the simulated agents used.

The agents' own backoff is divided by ``--time-factor`` (60: the one-minute floor becomes one
second) and nothing else is: an agent backing off comes back 60 times sooner than it would, so
the server sees denser retry waves than in reality. A turn the server gave (``Retry-After``,
followed as given for the first few shed pulses) is slept in real time: the server sized it
from its real rate. ``--time-factor 1`` gives real-time backoff.

    .venv/bin/python benchmarks/storm.py --agents 1000 --runs 3
    .venv/bin/python benchmarks/storm.py --agents 10000 --mode light --max-inflight 100000   # no shedding
    .venv/bin/python benchmarks/storm.py --quick          # a few seconds (the smoke test)
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as dt
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import storm_light as light_mod  # noqa: E402
from storm_fleet import (  # noqa: E402
    AgentRun,
    RequestTally,
    ServerSampler,
    SimAgent,
    StormResult,
    cpu_seconds,
    make_agent_folders,
    proc_status,
    process_tree,
    register_principals,
    scrape,
    storm,
    tcp_counters,
    template_store,
)

from certpulse import clock  # noqa: E402
from certpulse.ca.admin import CAAdmin  # noqa: E402
from certpulse.ca.config import CADir  # noqa: E402
from certpulse.ca.model import Caller  # noqa: E402
from certpulse.ca.setup import init_ca, open_service  # noqa: E402
from certpulse.ca.templates import parse_template_toml  # noqa: E402

MACHINE_TEMPLATE = REPO / "examples" / "templates" / "machine.toml"
LIFETIME_SHARE = 5  # the agent renews at min(renewal period, 1/5 of the lifetime) before expiry


@dataclasses.dataclass
class Settings:
    agents: int
    concurrency: int
    workers: int
    max_inflight: int
    time_factor: float
    runs: int
    scenarios: tuple[str, ...]
    modes: tuple[str, ...]
    deadline: float
    pause: float
    postgres: str | None
    workdir: Path | None
    keep: bool
    seed: int
    json_path: Path | None


def parse(argv: list[str] | None) -> Settings:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--agents", type=int, default=1000, help="simulated agents (default 1000)")
    parser.add_argument("--concurrency", type=int, default=None,
                        help="pulses in progress at once in the client (default min(agents, 1000))")
    parser.add_argument("--workers", type=int, default=2, help="ca serve --workers (default 2)")
    parser.add_argument("--max-inflight", type=int, default=64, help="ca serve --max-inflight (default 64)")
    parser.add_argument("--time-factor", type=float, default=60.0,
                        help="divide the agents' own backoff by this (default 60: the one-minute floor becomes 1 s; "
                             "the server's Retry-After turns stay real time)")
    parser.add_argument("--runs", type=int, default=1, help="independent runs, each with a fresh CA (default 1)")
    parser.add_argument("--scenario", choices=("enroll", "both"), default="both",
                        help="the enrollment storm only, or both storms (default)")
    parser.add_argument("--deadline", type=float, default=3600.0, help="give up on a storm after this many seconds")
    parser.add_argument("--postgres", metavar="URL", default=None,
                        help="put the CA's database in a fresh schema of this PostgreSQL database "
                             "(e.g. postgresql+psycopg://postgres@127.0.0.1:5432/test); dropped afterwards")
    parser.add_argument("--workdir", type=Path, default=None, help="where to make the temporary folders (/tmp)")
    parser.add_argument("--keep", action="store_true", help="keep the CA and agent folders")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--mode", choices=("real", "light", "both"), default="both",
                        help="real: the real agent code, one store folder per agent; light: protocol-level "
                             "agents (storm_light.py) that cost the client little, so that the server is the "
                             "bottleneck; both (default): one after the other, each with a fresh CA")
    parser.add_argument("--pause", type=float, default=10.0,
                        help="seconds between the two storms (default 10; see the renewal storm above)")
    parser.add_argument("--json", dest="json_path", type=Path, default=None, help="also write the figures here")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 24 agents, 1 worker, --max-inflight 2, delays / 600")
    args = parser.parse_args(argv)
    if args.quick:
        args.agents, args.workers, args.max_inflight, args.time_factor = 24, 1, 2, 600.0
        args.runs, args.deadline, args.pause, args.mode = 1, 120.0, 2.0, "both"
    if args.agents < 1 or args.runs < 1 or args.workers < 1 or args.max_inflight < 0 or args.time_factor <= 0:
        parser.error("agents, runs and workers must be positive, max-inflight >= 0, time-factor > 0")
    return Settings(
        agents=args.agents, concurrency=args.concurrency or min(args.agents, 1000), workers=args.workers,
        max_inflight=args.max_inflight, time_factor=args.time_factor, runs=args.runs,
        scenarios=("enroll", "renew") if args.scenario == "both" else ("enroll",),
        modes=("real", "light") if args.mode == "both" else (args.mode,),
        deadline=args.deadline, pause=args.pause, postgres=args.postgres, workdir=args.workdir, keep=args.keep,
        seed=args.seed, json_path=args.json_path)


# -- the CA and its server -------------------------------------------------------------------------

@contextlib.contextmanager
def database(settings: Settings, folder: Path) -> Iterator[str | None]:
    """None (SQLite in the CA folder), or a fresh PostgreSQL schema as a URL; dropped afterwards."""
    if settings.postgres is None:
        yield None
        return
    from sqlalchemy import create_engine, text

    schema = f"storm_{uuid.uuid4().hex[:12]}"
    admin = create_engine(settings.postgres, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    try:
        separator = "&" if "?" in settings.postgres else "?"
        yield f"{settings.postgres}{separator}options=-csearch_path%3D{schema}"
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def ca_server(ca_dir: Path, settings: Settings) -> Iterator[tuple[subprocess.Popen[bytes], str, Path]]:
    """``certpulse ca serve`` on a free loopback port, in a session of its own; stopped (the
    whole process group, by its id) on the way out."""
    port = free_port()
    log_path = ca_dir / "serve.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "certpulse", "ca", "serve", "--dir", str(ca_dir), "--listen", f"127.0.0.1:{port}",
             "--workers", str(settings.workers), "--max-inflight", str(settings.max_inflight),
             "--insecure-http"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            env={**os.environ, "PYTHONPATH": str(REPO / "src")})
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"ca serve exited {proc.returncode}: {log_path.read_text()}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{base}/healthz", timeout=1).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError("ca serve did not answer /healthz within 60 s")
            time.sleep(0.1)
        yield proc, base, log_path
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


# -- figures ------------------------------------------------------------------------------------

def quantile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def phase_figures(name: str, result: StormResult | light_mod.LightResult, before: dict[str, float],
                  after: dict[str, float], requests: dict[tuple[str, str], int], server_cpu: float, peak_rss: int,
                  sampled_inflight: float, server_log_errors: int) -> dict[str, Any]:
    runs: list[AgentRun] | list[light_mod.LightRun] = result.runs

    def delta(metric: str) -> float:
        return after.get(metric, 0.0) - before.get(metric, 0.0)

    errors = [e for r in runs for e in r.errors]
    done = [r.done for r in runs if r.done is not None]
    by_route: dict[str, dict[str, int]] = {}
    for (route, outcome), count in sorted(requests.items()):
        by_route.setdefault(route, {})[outcome] = count
    seen_503 = sum(c for (_, outcome), c in requests.items() if outcome == "shed")
    return {
        "phase": name,
        "agents": len(runs),
        "completed": result.completed,
        **({"request_latency_s": {"p50": round(quantile(result.latencies, 0.5), 3),
                                  "p99": round(quantile(result.latencies, 0.99), 3),
                                  "max": round(max(result.latencies, default=float("nan")), 3)}}
           if isinstance(result, light_mod.LightResult) else {}),
        "all_valid_s": round(result.elapsed, 2),
        "agents_per_s": round(len(done) / result.elapsed, 1) if result.elapsed else None,
        "agent_done_s": {"p50": round(quantile(done, 0.5), 2), "p90": round(quantile(done, 0.9), 2),
                         "max": round(max(done, default=float("nan")), 2)},
        "last_first_pulse_s": round(max(r.started for r in runs), 2),  # client-side queueing for a slot
        "pulses": sum(r.pulses for r in runs),
        "retries": sum(r.pulses for r in runs) - len(done),
        "pulses_shed": sum(r.shed for r in runs),
        "pulses_unavailable": sum(r.unavailable for r in runs),
        "max_pulses_one_agent": max(r.pulses for r in runs),
        "errors": len(errors) + int(delta('certpulse_ca_submission_seconds_count{outcome="error"}'))
        + server_log_errors + sum(r.unavailable for r in runs),
        "error_samples": errors[:5],
        "server_shed_503": int(delta("certpulse_ca_requests_shed_total")),
        "client_seen_503": seen_503,
        "requests": by_route,
        "certificates_issued": int(delta("certpulse_ca_certificates_issued_total")),
        "inflight_peak_per_worker": int(after.get("certpulse_ca_requests_inflight_peak", 0)),
        "inflight_peak_sampled_total": int(sampled_inflight),
        "server_peak_rss_mib": round(peak_rss / 2**20, 1),
        "server_cpu_s": round(server_cpu, 1),
        "client_cpu_s": round(result.client_cpu, 1),
    }


def one_run(settings: Settings, run: int, mode: str) -> dict[str, Any]:
    """One run of one mode: a fresh CA, its server, the agents, then each storm in turn."""
    root = Path(tempfile.mkdtemp(prefix="certpulse-storm-", dir=settings.workdir))
    figures: dict[str, Any] = {"run": run, "mode": mode, "phases": []}
    tally = RequestTally()
    try:
        with database(settings, root) as database_url:
            started = time.perf_counter()
            ca_dir = CADir(root / "ca")
            now = clock.now()
            init_ca(ca_dir, name="Storm", key_type="ec-p256", now=now, database_url=database_url)
            service = open_service(ca_dir)
            CAAdmin(service, Caller(kind="operator", name="storm-benchmark")).add_template(
                MACHINE_TEMPLATE.read_text(), now)
            renewal_period = parse_template_toml(MACHINE_TEMPLATE.read_text(), default_oid="1.2.3").renewal_period
            principals = register_principals(service, settings.agents, now)
            service.engine.dispose()
            registered = time.perf_counter()
            with ca_server(ca_dir.root, settings) as (proc, base, log_path):
                folders_started = time.perf_counter()
                real: list[SimAgent] = []
                light: list[light_mod.LightAgent] = []
                if mode == "real":
                    store_db = template_store(root / "template-agent")
                    real = make_agent_folders(root / "agents", base, ca_dir.certs / "root.pem", principals, store_db)
                    tally.install()
                else:
                    light = [light_mod.LightAgent.make(index, credential)
                             for index, (_, credential) in enumerate(principals)]
                figures["setup_s"] = {"principals": round(registered - started, 1),
                                      "agents": round(time.perf_counter() - folders_started, 1)}
                log(f"run {run} ({mode}): {settings.agents} principals in {figures['setup_s']['principals']} s, "
                    f"agents in {figures['setup_s']['agents']} s; server {base}")
                with httpx.Client(base_url=base, timeout=30) as http:
                    for phase in settings.scenarios:
                        renewing = phase == "renew"
                        if renewing:
                            time.sleep(settings.pause)
                        before, requests_before, tcp_before = scrape(http), tally.snapshot(), tcp_counters()
                        cpu0 = cpu_seconds(process_tree(proc.pid))
                        with ServerSampler(proc.pid, base) as sampler:
                            if mode == "real":
                                offset = renewal_offset(real, renewal_period) if renewing else dt.timedelta(0)
                                result: StormResult | light_mod.LightResult = storm(
                                    real, now_offset=offset, renewing=renewing, concurrency=settings.concurrency,
                                    time_factor=settings.time_factor, deadline=settings.deadline,
                                    seed=settings.seed + run)
                            else:
                                result = light_mod.storm(light, host="127.0.0.1", port=int(base.rsplit(":", 1)[1]),
                                                         renewing=renewing, time_factor=settings.time_factor,
                                                         deadline=settings.deadline, seed=settings.seed + run)
                        server_cpu = cpu_seconds(process_tree(proc.pid)) - cpu0
                        after = scrape(http)
                        if isinstance(result, light_mod.LightResult):
                            requests = result.requests
                        else:
                            requests = {k: v - requests_before.get(k, 0) for k, v in tally.snapshot().items()}
                        requests = {k: v for k, v in requests.items() if v}
                        phase_result = phase_figures(phase, result, before, after, requests, server_cpu,
                                                     sampler.peak_rss, sampler.peak_inflight,
                                                     server_log_errors(log_path))
                        tcp_after = tcp_counters()
                        phase_result["kernel_tcp"] = {k: v - tcp_before.get(k, 0) for k, v in tcp_after.items()}
                        phase_result["loadavg_after"] = os.getloadavg()[0]
                        figures["phases"].append(phase_result)
                        log(summary_line(run, mode, phase_result))
                    figures["server_vmhwm_mib"] = {
                        str(pid): round(proc_status(pid, "VmHWM") / 2**20, 1) for pid in process_tree(proc.pid)}
                    figures["healthz"] = http.get("/healthz").status_code
            figures["disk_mib"] = round(folder_size(root) / 2**20, 1)
    finally:
        tally.uninstall()
        if settings.keep:
            log(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    return figures


def renewal_offset(agents: list[SimAgent], renewal_period: dt.timedelta) -> dt.timedelta:
    """How far to move the agents' clock so that, from now on, every certificate they hold is
    past its renewal threshold (the latest of them by one second)."""
    due = []
    for agent in agents:
        if agent.validity is None:
            raise RuntimeError(f"agent {agent.index} has no certificate to renew")
        not_before, not_after = agent.validity
        due.append(not_after - min(renewal_period, (not_after - not_before) / LIFETIME_SHARE))
    return max(due) + dt.timedelta(seconds=1) - dt.datetime.now(dt.UTC)


def server_log_errors(path: Path) -> int:
    text = path.read_text(errors="replace")
    return text.count("Traceback") + text.count("unexpected error")


def folder_size(root: Path) -> int:
    total = 0
    for folder, _, files in os.walk(root):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(folder, name)).st_blocks * 512
    return total


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def summary_line(run: int, mode: str, p: dict[str, Any]) -> str:
    return (f"run {run} {mode} {p['phase']}: {p['agents']} agents all valid in {p['all_valid_s']} s "
            f"({'complete' if p['completed'] else 'INCOMPLETE'}); 503s {p['server_shed_503']} (server) / "
            f"{p['client_seen_503']} (agents); retries {p['retries']}; errors {p['errors']}; "
            f"peak in flight {p['inflight_peak_per_worker']}/worker, {p['inflight_peak_sampled_total']} sampled; "
            f"server RSS {p['server_peak_rss_mib']} MiB, CPU {p['server_cpu_s']} s; agents' CPU {p['client_cpu_s']} s")


SUMMARY_KEYS = ("all_valid_s", "agents_per_s", "server_shed_503", "client_seen_503", "retries", "errors",
                "inflight_peak_per_worker", "inflight_peak_sampled_total", "server_peak_rss_mib", "server_cpu_s",
                "client_cpu_s", "certificates_issued")


def summarise(runs: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, float]]]:
    """min / median / max of the headline figures over the runs, per mode and phase."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for run in runs:
        for phase in run["phases"]:
            out.setdefault(f"{run['mode']} {phase['phase']}", {})
    for label in out:
        mode, phase_name = label.split()
        rows = [p for r in runs if r["mode"] == mode for p in r["phases"] if p["phase"] == phase_name]
        for key in SUMMARY_KEYS:
            values = [float(row[key]) for row in rows if row.get(key) is not None]
            if values:
                out[label][key] = {"min": min(values), "median": statistics.median(values), "max": max(values)}
    return out


def report(settings: Settings, runs: list[dict[str, Any]]) -> dict[str, Any]:
    machine = {"cpus": os.cpu_count(), "python": platform.python_version(), "kernel": platform.release(),
               "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")}
    document = {"settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(settings).items()
                             if k != "postgres"} | {"database": "postgresql" if settings.postgres else "sqlite"},
                "machine": machine, "runs": runs, "summary": summarise(runs)}
    database_kind = "postgresql" if settings.postgres else "sqlite"
    print(f"renewal storm: {settings.agents} agents ({', '.join(settings.modes)}), client concurrency "
          f"{settings.concurrency} (real agents), {settings.workers} worker(s), --max-inflight "
          f"{settings.max_inflight}, backoff / {settings.time_factor:g}, {database_kind}, {settings.runs} run(s); "
          f"{machine['cpus']} CPUs, {machine['date']}")
    for label, figures in summarise(runs).items():
        print(f"  {label}:")
        for key, stats in figures.items():
            print(f"    {key:30} min {stats['min']:>10g}  median {stats['median']:>10g}  max {stats['max']:>10g}")
    for run in runs:
        for phase in run["phases"]:
            where = f"  run {run['run']} {run['mode']} {phase['phase']}"
            print(f"{where} requests: "
                  + "; ".join(f"{route} {outcomes}" for route, outcomes in phase["requests"].items()))
            if phase.get("kernel_tcp"):
                print(f"{where} kernel TCP counters (system-wide): {phase['kernel_tcp']}")
            if "request_latency_s" in phase:
                print(f"{where} request latency (s): {phase['request_latency_s']}")
            if phase["error_samples"]:
                print(f"{where} errors: {phase['error_samples']}")
    return document


def main(argv: list[str] | None = None) -> int:
    settings = parse(argv)
    warnings.simplefilter("ignore", DeprecationWarning)  # httpx's verify=<path>, once per simulated agent
    runs = [one_run(settings, run, mode) for mode in settings.modes for run in range(1, settings.runs + 1)]
    document = report(settings, runs)
    if settings.json_path is not None:
        settings.json_path.write_text(json.dumps(document, indent=2, default=str) + "\n")
    bad = [p for r in runs for p in r["phases"] if not p["completed"] or p["errors"]]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
