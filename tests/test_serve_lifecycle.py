"""The ``ca serve`` process under faults: its workers die with it, a stop ends in time although a
client holds a request half-sent, and a killed server's metrics folder does not pile up.

Real processes throughout: the server is started by the real command line, killed with SIGKILL
or stopped with SIGTERM, and restarted on the same port.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from agent_support import wait_for
from support import CA, CERTPULSE, REPO, Client, assert_problem, free_port, init_ca, make_csr, root_trust, serve

STOP_TIMEOUT = 2  # --shutdown-timeout of the servers stopped here
HARD_STOP_MARGIN = 10  # frontends/lifecycle.py


@pytest.fixture(scope="module")
def sqlite_ca(tmp_path_factory: pytest.TempPathFactory) -> CA:
    directory = tmp_path_factory.mktemp("lifecycle") / "ca"
    return init_ca(directory, f"sqlite:///{directory.parent / 'ca.db'}")


def start(ca: CA, port: int, *extra: str, tls: bool = False,
          env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    """A real ``ca serve`` on ``port``, answering /healthz; the caller stops it."""
    args = [*CERTPULSE, "ca", "serve", "--dir", str(ca.dir), "--listen", f"127.0.0.1:{port}", *extra]
    if not tls:
        args.append("--insecure-http")
    log = (ca.dir / f"serve-{port}-{time.monotonic_ns()}.log").open("w")
    proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                            env={**os.environ, **(env or {})})
    log.close()
    base = f"{'https' if tls else 'http'}://127.0.0.1:{port}"
    verify: ssl.SSLContext | bool = root_trust(ca) if tls else True

    def ready() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"ca serve exited {proc.returncode}: {log.name}: {Path(log.name).read_text()}")
        try:
            return httpx.get(f"{base}/healthz", timeout=2, verify=verify).status_code == 200
        except httpx.HTTPError:
            return False

    wait_for(ready, 90, "ca serve to answer /healthz")
    return proc


def kill_group(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=30)


def children(pid: int) -> set[int]:
    found: set[int] = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            found |= {int(p) for p in (task / "children").read_text().split()}
    return found


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with contextlib.suppress(OSError):  # a zombie (not yet reaped by init) has exited
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    return False


def port_free(port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds it
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def read_by_server(port: int, client_port: int) -> bool:
    """The server has read everything this connection sent (its receive queue is empty; the
    request parser runs on what is read in the same step), so a stop finds the request begun."""
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local, remote, queues = fields[1], fields[2], fields[4]
        if int(local.split(":")[1], 16) == port and int(remote.split(":")[1], 16) == client_port:
            return int(queues.split(":")[1], 16) == 0
    return False


# -- item 6: the workers die with the server ----------------------------------------------------

def test_killing_the_server_process_stops_its_workers_and_a_restart_gets_the_port(sqlite_ca: CA) -> None:
    port = free_port()
    proc = start(sqlite_ca, port, "--workers", "2")
    try:
        workers = wait_for(lambda: {p for p in children(proc.pid) if "spawn_main" in
                                    Path(f"/proc/{p}/cmdline").read_text(errors="replace")} or None,
                           60, "the two workers")
        assert len(workers) == 2, workers
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        # each worker stops as on SIGTERM: at once when idle, within its stop deadline at most
        wait_for(lambda: not any(alive(w) for w in workers), 60, "the orphaned workers to exit")
        wait_for(lambda: port_free(port), 60, "the port to be free")
    finally:
        kill_group(proc)
        for worker in children(proc.pid) if alive(proc.pid) else ():
            with contextlib.suppress(ProcessLookupError):
                os.kill(worker, signal.SIGKILL)
    again = start(sqlite_ca, port, "--workers", "2")
    try:
        assert httpx.get(f"http://127.0.0.1:{port}/livez", timeout=30).json()["status"] == "alive"
        ready = httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=30)
        assert ready.status_code == 200 and ready.json()["database"] == "ok", ready.text
    finally:
        kill_group(again)


# -- item 7: a stop is bounded ------------------------------------------------------------------

@pytest.mark.parametrize(("workers", "tls"), [(1, True), (2, True), (1, False), (2, False)],
                         ids=["1-worker-tls", "2-workers-tls", "1-worker-http", "2-workers-http"])
def test_a_stop_cuts_a_half_sent_body_at_the_deadline(sqlite_ca: CA, workers: int, tls: bool) -> None:
    """A client sends headers and part of the body, then holds the connection. The read deadline
    is an hour, so only the stop deadline can end it: SIGTERM must end the server within
    --shutdown-timeout (plus the time to stop), and the client gets a 503 with Retry-After,
    never a 500 or a connection cut without an answer."""
    port = free_port()
    proc = start(sqlite_ca, port, "--workers", str(workers), "--read-timeout", "3600",
                 "--shutdown-timeout", str(STOP_TIMEOUT), tls=tls)
    try:
        raw = socket.create_connection(("127.0.0.1", port), timeout=120)
        conn: socket.socket = root_trust(sqlite_ca).wrap_socket(raw, server_hostname="127.0.0.1") if tls else raw
        with conn:
            conn.sendall(b"POST /v1/requests HTTP/1.1\r\nHost: ca\r\nContent-Type: application/json\r\n"
                         b"Content-Length: 4000\r\n\r\n{\"template\": \"mach")
            client_port = conn.getsockname()[1]
            wait_for(lambda: read_by_server(port, client_port), 60, "the worker to read the request's head")
            stopped = time.monotonic()
            os.kill(proc.pid, signal.SIGTERM)
            received = b""
            while True:
                try:
                    chunk = conn.recv(65536)
                except (ConnectionError, ssl.SSLError):
                    break
                if not chunk:
                    break
                received += chunk
        code = proc.wait(timeout=120)
        took = time.monotonic() - stopped
    finally:
        kill_group(proc)
    head, _, body = received.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 503"), received
    assert b"retry-after: 1" in head.lower() and b"connection: close" in head.lower(), head
    document = json.loads(body)
    assert document["reason"] == "unavailable" and "stopping" in document["detail"], document
    assert took < STOP_TIMEOUT + HARD_STOP_MARGIN, f"the stop took {took:.1f} s"
    assert code in (0, -signal.SIGTERM), code  # a graceful end, not the hard stop (70)


def test_the_hard_stop_ends_a_process_whose_stop_never_completes(tmp_path: Path) -> None:
    """A request whose handler thread cannot be interrupted would hold the stop forever: the timer
    armed by the first SIGTERM ends the process anyway (here a stop handler that does nothing)."""
    script = ("import signal, time\n"
              "signal.signal(signal.SIGTERM, lambda *_: None)\n"
              "from certpulse.frontends.lifecycle import arm_stop_deadline\n"
              "arm_stop_deadline(1, margin=1)\n"
              "print('armed', flush=True)\n"
              "time.sleep(600)\n")
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert proc.stdout is not None and proc.stdout.readline() == b"armed\n"
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert code == 70, code
    assert time.monotonic() - started >= 1.5
    assert proc.stderr is not None and b"stop deadline (1 s) has passed" in proc.stderr.read()


# -- item 9: no metrics folders left behind ------------------------------------------------------

def test_metrics_folders_of_killed_servers_are_removed_at_start(sqlite_ca: CA, tmp_path: Path) -> None:
    temp = tmp_path / "tmp"
    temp.mkdir()
    env = {"TMPDIR": str(temp)}
    os.environ.pop("PROMETHEUS_MULTIPROC_DIR", None)
    dead = subprocess.Popen(["true"])
    dead.wait()
    live_elsewhere = temp / f"certpulse-metrics-{os.getpid()}-abcd1234"  # a server alive on this machine
    live_elsewhere.mkdir(mode=0o700)
    (live_elsewhere / "server").write_text(f"{os.getpid()} {os.readlink('/proc/self/ns/pid')}\n")
    old_version = temp / "certpulse-metrics-q1w2e3r4"  # as older versions named it, its workers gone
    old_version.mkdir(mode=0o700)
    (old_version / f"histogram_{dead.pid}.db").write_bytes(b"")
    unrelated = temp / "certpulse-metrics-notes.txt"
    unrelated.write_text("not a folder")

    for _ in range(2):  # two kills, each leaving its folder
        proc = start(sqlite_ca, free_port(), env=env)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    port = free_port()
    proc = start(sqlite_ca, port, env=env)
    try:
        folders = {p.name for p in temp.iterdir() if p.is_dir()}
        own = {name for name in folders if name.startswith(f"certpulse-metrics-{proc.pid}-")}
        assert len(own) == 1 and folders == own | {live_elsewhere.name}, folders
        assert unrelated.exists()
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=60)
    assert sorted(p.name for p in temp.iterdir()) == sorted([live_elsewhere.name, unrelated.name])


# -- the systemd unit ---------------------------------------------------------------------------

def test_the_ca_unit_stops_the_server_gracefully_and_restarts_it_on_failure(tmp_path: Path) -> None:
    unit = (REPO / "contrib" / "certpulse-ca.service").read_text()
    keys: dict[str, str] = {}
    for line in unit.splitlines():
        if "=" in line and not line.startswith("#"):
            key, _, value = line.partition("=")
            keys[key.strip()] = value.strip()
    assert keys["KillMode"] == "mixed" and keys["Restart"] == "on-failure", keys
    assert "ca serve" in keys["ExecStart"] and "--shutdown-timeout 20" in keys["ExecStart"]
    assert int(keys["TimeoutStopSec"].removesuffix("s")) > 20 + HARD_STOP_MARGIN
    assert keys["NoNewPrivileges"] == "yes" and keys["ProtectSystem"] == "strict" and keys["UMask"] == "0077"
    verifier = shutil.which("systemd-analyze")
    if verifier is None:
        return
    installed = tmp_path / "certpulse-ca.service"  # the command must exist for verify to accept the unit
    executable = shutil.which("certpulse") or str(Path(sys.executable).parent / "certpulse")
    installed.write_text(unit.replace("/usr/local/bin/certpulse", executable))
    result = subprocess.run([verifier, "verify", str(installed)], capture_output=True, text=True, timeout=120,
                            check=False)
    assert result.returncode == 0, result.stderr


def test_only_our_own_real_folders_of_dead_servers_are_removed(tmp_path: Path) -> None:
    """In process: the rule itself, for what a start on a shared machine may find."""
    from certpulse.frontends.metrics_folders import remove_stale

    dead = subprocess.Popen(["true"])
    dead.wait()
    namespace = os.readlink("/proc/self/ns/pid")
    gone = tmp_path / f"certpulse-metrics-{dead.pid}-gone"
    gone.mkdir()
    (gone / "server").write_text(f"{dead.pid} {namespace}\n")
    (gone / f"counter_{dead.pid}.db").write_bytes(b"")
    other_container = tmp_path / f"certpulse-metrics-{dead.pid}-container"  # that pid may be alive there
    other_container.mkdir()
    (other_container / "server").write_text(f"{dead.pid} pid:[1]\n")
    unmarked = tmp_path / f"certpulse-metrics-{dead.pid}-unmarked"
    unmarked.mkdir()
    worker_alive = tmp_path / f"certpulse-metrics-{dead.pid}-worker"  # server gone, one worker still running
    worker_alive.mkdir()
    (worker_alive / "server").write_text(f"{dead.pid} {namespace}\n")
    (worker_alive / f"histogram_{os.getpid()}.db").write_bytes(b"")
    target = tmp_path / "elsewhere"
    target.mkdir()
    link = tmp_path / f"certpulse-metrics-{dead.pid}-link"
    link.symlink_to(target)
    others = tmp_path / f"certpulse-metrics-{dead.pid}-others"
    others.mkdir()
    if os.geteuid() == 0:
        os.chown(others, 65534, 65534)
    else:
        others.rmdir()
    empty_old = tmp_path / "certpulse-metrics-oldempty"
    empty_old.mkdir()

    assert remove_stale(tmp_path) == [gone]
    assert worker_alive.is_dir() and link.is_symlink() and target.is_dir() and empty_old.is_dir()
    assert other_container.is_dir() and unmarked.is_dir()
    assert others.is_dir() or os.geteuid() != 0


# -- item 8 on SQLite: a database that does not let the server write -----------------------------

def test_a_sqlite_database_held_locked_is_503_with_retry_after(sqlite_ca: CA) -> None:
    """Another process holds the SQLite database's write lock (a long transaction in a shell, a
    backup) past the busy timeout: the submission is a 503 problem with Retry-After, not a 500;
    once the lock is released, submissions succeed again."""
    import sqlite3

    with serve(sqlite_ca) as base:
        client = Client.enrolled(base, sqlite_ca.add_principal("locked.example.internal"))
        client.enroll("machine")
        holder = sqlite3.connect(sqlite_ca.dir.parent / "ca.db", isolation_level=None, timeout=60)
        try:
            holder.execute("BEGIN EXCLUSIVE")
            submitted = client.submit("machine", make_csr()[1])
        finally:
            holder.execute("ROLLBACK")
            holder.close()
        body = assert_problem(submitted, 503, "unavailable")
        assert submitted.headers["retry-after"] == "10" and body["retry_after"] == 10, submitted.headers
        client.enroll("machine")
