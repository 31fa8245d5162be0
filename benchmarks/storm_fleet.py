"""The simulated fleet of ``benchmarks/storm.py``: N real agents, each with its own principal,
credential, key and store folder, started together and retrying the way the daemon does.

Each agent runs the real agent code (:class:`certpulse.agent.pulse.Agent`: policy, planner,
key generation, CSR, the CA client, answer checks, the SQLite store with its event log). That
code is synchronous (httpx's sync client, SQLAlchemy), so every agent is an asyncio task whose
pulses run in a bounded pool of threads (``asyncio.to_thread`` behind a semaphore): all N tasks
start at the same instant, at most ``concurrency`` pulses are in progress at once, and the rest
wait their turn in the client, as machines whose connection attempts queue. Between failed
pulses a task sleeps what the daemon would (:func:`certpulse.agent.daemon.next_delay`): the
server's Retry-After turn as given for the first few shed pulses, in real time; otherwise the
one-minute floor, exponential backoff with jitter, divided by ``time_factor``.

Each attempt opens the agent's folder, pulses and closes it again, as ``certpulse agent pulse``
does; the daemon keeps its folder open between pulses, which would need thousands of open
SQLite stores and sockets here. The agents pin the CA's root through ``trust_roots`` (as
``agent init --ca-file`` does): their TLS context holds that root alone.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import datetime as dt
import os
import random
import shutil
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from certpulse.agent import client as client_mod
from certpulse.agent.config import AgentConfig, PolicyServerConfig, save_config, write_credential
from certpulse.agent.daemon import follows_retry_after, next_delay
from certpulse.agent.pulse import Agent
from certpulse.ca.admin import CAAdmin
from certpulse.ca.model import Caller
from certpulse.ca.service import CAService
from certpulse.machine.certstore import LocalStore

TEMPLATE = "machine"


# -- setup (not timed) ----------------------------------------------------------------------

def register_principals(service: CAService, count: int, now: dt.datetime,
                        prefix: str = "storm") -> list[tuple[str, str]]:
    """``count`` machine principals and their credentials, through the CA's own Python API
    (``CAAdmin.add_principal`` and the token exchange, one transaction each, audited), in
    process against the CA's database before the server starts: the CLI would start a process
    per principal, and HTTP would add a request per principal for nothing."""
    admin = CAAdmin(service, Caller(kind="operator", name="storm-benchmark"))
    width = len(str(count))
    made = []
    for index in range(count):
        name = f"{prefix}-{index:0{width}d}.example.internal"
        token = admin.add_principal(name, "machine", now)["token"]
        made.append((name, service.auth.exchange_token(token, now).credential))
    return made


def template_store(folder: Path) -> Path:
    """An empty agent store made by the real code (the store's migrations), checkpointed into one
    file: every agent's store starts as a copy of it, byte for byte what ``agent init`` makes."""
    store = LocalStore(folder / "store")
    store.close()
    db = folder / "store" / "meta.db"
    for suffix in ("-wal", "-shm"):
        leftover = db.with_name(db.name + suffix)
        if leftover.exists() and leftover.stat().st_size:
            raise RuntimeError(f"{leftover} was not checkpointed; cannot copy the template store")
    return db


def make_agent_folders(root: Path, url: str, ca_file: Path, principals: list[tuple[str, str]],
                       store_db: Path) -> list[SimAgent]:
    """One agent folder per principal, as ``agent init --ca-file`` leaves it (the token exchange
    already done by :func:`register_principals`)."""
    agents = []
    for index, (principal, credential) in enumerate(principals):
        folder = root / f"agent-{index:05d}"
        (folder / "store").mkdir(mode=0o700, parents=True)
        write_credential(folder, credential)
        config = AgentConfig(servers=(PolicyServerConfig(url=url, trust_roots=str(ca_file),
                                                         insecure_http=url.startswith("http://")),),
                             principal=principal)
        save_config(folder, config)
        shutil.copyfile(store_db, folder / "store" / "meta.db")
        agents.append(SimAgent(index, folder, config))
    return agents


# -- the client's own view of the requests --------------------------------------------------

class RequestTally:
    """Counts every request the agents make, by route and answer, by wrapping the agent client's
    one transport method (:meth:`CAClient._call`): instrumentation only, the call is unchanged."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.counts: collections.Counter[tuple[str, str]] = collections.Counter()
        self._original: Callable[..., Any] | None = None

    @staticmethod
    def route(method: str, path: str) -> str:
        if path.startswith("/v1/certificates/"):
            return f"{method} /v1/certificates/{{serial}}"
        if path.startswith("/v1/requests/"):
            return f"{method} /v1/requests/{{id}}"
        return f"{method} {path}"

    def install(self) -> None:
        original = client_mod.CAClient._call
        self._original = original
        tally = self

        def counted(client: client_mod.CAClient, method: str, path: str, **kwargs: Any) -> Any:
            outcome = "ok"
            try:
                return original(client, method, path, **kwargs)
            except client_mod.ServerUnavailable as exc:
                outcome = "shed" if exc.retry_after is not None else "unavailable"
                raise
            except client_mod.ServerRefused as exc:
                outcome = f"refused {exc.status}"
                raise
            finally:
                with tally.lock:
                    tally.counts[(tally.route(method, path), outcome)] += 1

        client_mod.CAClient._call = counted  # type: ignore[method-assign,assignment]

    def uninstall(self) -> None:
        if self._original is not None:
            client_mod.CAClient._call = self._original  # type: ignore[method-assign]
            self._original = None

    def snapshot(self) -> dict[tuple[str, str], int]:
        with self.lock:
            return dict(self.counts)


# -- one agent --------------------------------------------------------------------------------

@dataclasses.dataclass
class SimAgent:
    index: int
    directory: Path
    config: AgentConfig
    holding: str | None = None  # thumbprint of the valid certificate it holds, once it does
    validity: tuple[dt.datetime, dt.datetime] | None = None  # that certificate's notBefore, notAfter


@dataclasses.dataclass
class AgentRun:
    """What one agent went through in one storm."""

    started: float = 0.0  # when its first pulse got a slot (seconds after the storm's start)
    done: float | None = None  # when it held a valid certificate
    pulses: int = 0
    shed: int = 0  # pulses that failed with a Retry-After (the server shed a request)
    unavailable: int = 0  # pulses that failed without one (connection refused or reset, timeout, 5xx)
    errors: list[str] = dataclasses.field(default_factory=list)  # anything else: refusals, exceptions


@dataclasses.dataclass(frozen=True)
class Attempt:
    ok: bool
    retry_after: float | None
    failed: bool  # the pulse failed as a whole (the daemon would back off)
    error: str | None  # a refusal, an exception or an inexplicable result


# Opening a store runs its Alembic migrations (a no-op once created), and Alembic loads its
# environment script as a module: two threads of one process doing so at once trip over each
# other (KeyError: 'script'). Real agents are separate processes; here opening is serialised.
OPEN_LOCK = threading.Lock()


def pulse_once(agent: SimAgent, now: dt.datetime, *, renewing: bool) -> Attempt:
    """One pulse by the real agent code; afterwards, whether the agent holds a valid certificate
    of the template (a new one, for a renewal storm)."""
    try:
        with OPEN_LOCK:
            live = Agent(agent.directory, agent.config)
    except Exception as exc:
        return Attempt(False, None, True, f"cannot open the agent: {type(exc).__name__}: {exc}")
    try:
        result = live.pulse(now)
        refused = [o for o in result.outcomes if o.outcome == "refused"]
        if refused:
            return Attempt(False, None, True, f"refused: {refused[0].detail}")
        if result.outcome == "failed":
            return Attempt(False, result.retry_after, True, None)
        current = [r for r in live.store.certificates(include_archived=False)
                   if r.template_name == TEMPLATE and r.not_before <= now + dt.timedelta(minutes=5) < r.not_after]
        fresh = [r for r in current if not renewing or r.thumbprint != agent.holding]
        if not fresh:
            done = [(o.action.kind.value, o.outcome, o.detail) for o in result.outcomes]
            return Attempt(False, None, False, f"pulse {result.outcome} but no valid {TEMPLATE} certificate: {done}")
        agent.holding = fresh[-1].thumbprint
        agent.validity = (fresh[-1].not_before, fresh[-1].not_after)
        return Attempt(True, None, False, None)
    except Exception as exc:  # the benchmark reports it; the real daemon would log it and go on
        return Attempt(False, None, True, f"{type(exc).__name__}: {exc}")
    finally:
        live.close()


# -- the storm ----------------------------------------------------------------------------------

@dataclasses.dataclass
class StormResult:
    runs: list[AgentRun]
    elapsed: float  # until the last agent held its certificate (or the deadline)
    client_cpu: float  # CPU seconds of this process (the simulated agents) during the storm
    completed: bool


async def _storm(agents: list[SimAgent], *, now_offset: dt.timedelta, renewing: bool, concurrency: int,
                 time_factor: float, deadline: float, seed: int) -> StormResult:
    loop = asyncio.get_running_loop()
    pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="agent")
    loop.set_default_executor(pool)
    slots = asyncio.Semaphore(concurrency)
    go = asyncio.Event()
    runs = [AgentRun() for _ in agents]
    t0 = 0.0

    async def one(agent: SimAgent, run: AgentRun) -> None:
        rng = random.Random(seed * 1_000_003 + agent.index)
        failures = 0
        await go.wait()
        while time.perf_counter() - t0 < deadline:
            async with slots:
                if not run.pulses:
                    run.started = time.perf_counter() - t0
                now = dt.datetime.now(dt.UTC) + now_offset
                attempt = await asyncio.to_thread(pulse_once, agent, now, renewing=renewing)
            run.pulses += 1
            if attempt.ok:
                run.done = time.perf_counter() - t0
                return
            if attempt.error:
                run.errors.append(attempt.error)
            elif attempt.retry_after is not None:
                run.shed += 1
            else:
                run.unavailable += 1
            failures += 1
            delay = next_delay(refresh=agent.config.refresh_interval, failures=failures,
                               retry_after=attempt.retry_after, cap=agent.config.backoff_cap, rng=rng)
            # The server's turn is real time; only the agent's own backoff is compressed.
            real = follows_retry_after(failures, attempt.retry_after)
            await asyncio.sleep(delay if real else delay / time_factor)

    tasks = [asyncio.create_task(one(agent, run)) for agent, run in zip(agents, runs, strict=True)]
    await asyncio.sleep(0)  # every task is waiting for the start
    cpu0 = time.process_time()
    t0 = time.perf_counter()
    go.set()
    await asyncio.gather(*tasks)
    elapsed = time.perf_counter() - t0
    cpu = time.process_time() - cpu0
    pool.shutdown(wait=True)
    completed = all(r.done is not None for r in runs)
    last = max((r.done for r in runs if r.done is not None), default=elapsed)
    return StormResult(runs, last if completed else elapsed, cpu, completed)


def storm(agents: list[SimAgent], *, now_offset: dt.timedelta = dt.timedelta(0), renewing: bool = False,
          concurrency: int, time_factor: float, deadline: float, seed: int = 1) -> StormResult:
    """All ``agents`` pulse from the same instant until each holds a valid certificate."""
    return asyncio.run(_storm(agents, now_offset=now_offset, renewing=renewing, concurrency=concurrency,
                              time_factor=time_factor, deadline=deadline, seed=seed))


# -- the server, seen from outside ---------------------------------------------------------------

def process_tree(pid: int) -> list[int]:
    """``pid`` and its descendants (uvicorn's workers are children of the ``ca serve`` process)."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as handle:
                fields = handle.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents.setdefault(int(fields[1]), []).append(int(entry))
    tree, todo = [], [pid]
    while todo:
        current = todo.pop()
        tree.append(current)
        todo.extend(parents.get(current, []))
    return tree


def proc_status(pid: int, field: str) -> int:
    """A ``kB`` field of ``/proc/PID/status`` (VmRSS, VmHWM), in bytes; 0 when gone."""
    try:
        with open(f"/proc/{pid}/status") as handle:
            for line in handle:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def cpu_seconds(pids: list[int]) -> float:
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as handle:
                fields = handle.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / ticks


class ServerSampler:
    """Samples the server while a storm runs, on a thread of its own: the summed RSS of its
    processes (every 0.2 s) and requests in progress from /metrics (every ``metrics_every`` s;
    each scrape costs the server a few queries, so not too often)."""

    def __init__(self, pid: int, base: str, metrics_every: float = 1.0) -> None:
        self.pid = pid
        self.base = base
        self.metrics_every = metrics_every
        self.peak_rss = 0
        self.peak_inflight = 0.0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, name="sampler", daemon=True)

    def __enter__(self) -> ServerSampler:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(10)

    def _loop(self) -> None:
        import httpx

        next_scrape = 0.0
        with httpx.Client(base_url=self.base, timeout=10) as http:
            while not self.stop.is_set():
                pids = process_tree(self.pid)
                self.peak_rss = max(self.peak_rss, sum(proc_status(p, "VmRSS") for p in pids))
                if time.monotonic() >= next_scrape:
                    next_scrape = time.monotonic() + self.metrics_every
                    try:
                        values = scrape(http)
                    except Exception:  # a missed sample is not a benchmark failure
                        values = {}
                    self.peak_inflight = max(self.peak_inflight, values.get("certpulse_ca_requests_inflight", 0.0))
                self.stop.wait(0.2)


TCP_COUNTERS = ("ListenOverflows", "ListenDrops", "SyncookiesSent", "EstabResets", "AttemptFails")


def tcp_counters() -> dict[str, int]:
    """The kernel's TCP counters that show a storm at the listening socket (system-wide, from
    /proc/net/netstat and /proc/net/snmp): accept-queue overflows, SYN cookies, resets."""
    found: dict[str, int] = {}
    for path in ("/proc/net/netstat", "/proc/net/snmp"):
        try:
            with open(path) as handle:
                lines = handle.read().splitlines()
        except OSError:
            continue
        for names, values in zip(lines[::2], lines[1::2], strict=False):
            for name, value in zip(names.split()[1:], values.split()[1:], strict=False):
                if name in TCP_COUNTERS and value.lstrip("-").isdigit():
                    found[name] = int(value)
    return found


def scrape(http: Any) -> dict[str, float]:
    """The server's metrics: each sample under its full name (``name{labels}``), and each
    labelled family also summed over its labels under its bare name."""
    response = http.get("/metrics")
    response.raise_for_status()
    values: dict[str, float] = collections.defaultdict(float)
    for line in response.text.splitlines():
        if not line or line.startswith("#"):
            continue
        sample, _, value = line.rpartition(" ")
        values[sample] = float(value)
        if "{" in sample:
            values[sample.split("{", 1)[0]] += float(value)
    return dict(values)
