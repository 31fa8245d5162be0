#!/usr/bin/env python3
"""What one issuance costs a ``ca serve`` worker, HTTP layer included, in Python calls and CPU.

Sets up a CA as ``benchmarks/issuance.py`` does (EC P-256, SQLite, the ``machine`` template, one
machine principal), then runs one worker in this process the way ``ca serve --workers 1
--insecure-http`` runs it (uvicorn with uvloop and the same protocol, limits and environment;
the application from ``app_from_environment``), in a thread. A client in another process sends
``POST /v1/requests`` one after the other on one kept-alive connection. Reports, per issuance:

* Python function calls in the whole worker, every thread (the event loop, the handler threads):
  a profile hook counts them while the client sends ``--count`` requests (after a warm-up);
* the worker's CPU time (``time.process_time``: this process, every thread, not the client's)
  over ``--rounds`` rounds without the hook.

Comparing two trees: run it with ``PYTHONPATH=<tree>/src`` for each, alternating.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from types import FrameType
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from issuance import (
    CERTPULSE,
    MACHINE_TEMPLATE,
    PRINCIPAL,
    free_port,
    make_csrs,
    post_json,
    run,
)

CLIENT = r"""
import http.client, json, sys
port, credential, path = int(sys.argv[1]), sys.argv[2], sys.argv[3]
bodies = [line.encode() for line in open(path).read().splitlines() if line]
conn = http.client.HTTPConnection("127.0.0.1", port)
headers = {"Content-Type": "application/json", "Authorization": "Bearer " + credential}
for line in sys.stdin:
    count = int(line)
    for i in range(count):
        conn.request("POST", "/v1/requests", body=bodies[i % len(bodies)], headers=headers)
        answer = conn.getresponse()
        data = answer.read()
        if answer.status != 201:
            sys.exit(f"answered {answer.status}: {data[:300]!r}")
    print("done", flush=True)
"""

counting = False
counts: collections.Counter[Any] = collections.Counter()


def hook(frame: FrameType, event: str, arg: Any) -> None:
    if counting and (event == "call" or event == "c_call"):
        counts[frame.f_code if event == "call" else arg] += 1


def wait_for_port(port: int, timeout: float = 900) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def label(what: Any) -> str:
    code = getattr(what, "co_filename", None)
    if code is not None:
        where = code.split("/src/certpulse/")[-1].split("site-packages/")[-1]
        return f"{where}:{what.co_firstlineno}({what.co_qualname})"
    return f"<{getattr(what, '__qualname__', what)}>"


def main() -> int:
    work = Path(tempfile.mkdtemp(prefix="certpulse-server-calls-"))
    try:
        return measure(work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def measure(work: Path) -> int:
    global counting
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0] if __doc__ else None)
    parser.add_argument("--count", type=int, default=500, help="issuances per measured round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--csrs", type=int, default=0, help="CSRs made (default: --count); the bodies cycle")
    parser.add_argument("--no-profile", action="store_true",
                        help="only the warm-up pass (for instruction counts: run under valgrind --tool=callgrind "
                             "with two --count values and subtract)")
    parser.add_argument("--top", type=int, default=0, help="list the most called functions")
    parser.add_argument("--save", type=Path, help="write the call counts by function (JSON) here")
    args = parser.parse_args()

    folder = work / "ca"
    run([*CERTPULSE, "ca", "init", "--dir", str(folder), "--database", f"sqlite:///{work}/ca.db",
         "--name", "bench", "--key-type", "ec-p256"])
    run([*CERTPULSE, "template", "add", str(MACHINE_TEMPLATE), "--dir", str(folder)])
    token = json.loads(run([*CERTPULSE, "principal", "add", PRINCIPAL, "--kind", "machine", "--json",
                            "--dir", str(folder)]))["token"]
    (work / "metrics").mkdir()
    os.environ.update({"CERTPULSE_CA_DIR": str(folder), "PROMETHEUS_MULTIPROC_DIR": str(work / "metrics"),
                       "CERTPULSE_MAX_INFLIGHT": "64", "CERTPULSE_THREADS": "4"})

    import uvicorn

    import certpulse
    extra: dict[str, Any] = {}
    try:
        from certpulse.frontends import read_deadline
        extra = {"http": read_deadline.PROTOCOL, "timeout_keep_alive": 5, "limit_concurrency": 4096,
                 "backlog": 2048}
    except ImportError:
        pass
    port = free_port()
    config = uvicorn.Config("certpulse.frontends.http:app_from_environment", factory=True, host="127.0.0.1",
                            port=port, access_log=False, log_level="warning", server_header=False, **extra)
    server = uvicorn.Server(config)
    if not args.no_profile:
        sys.setprofile(hook)
        threading.setprofile(hook)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_for_port(port)
    status, answer = post_json(f"http://127.0.0.1:{port}/v1/tokens/exchange", {"token": token})
    assert status == 200, answer
    bodies = work / "bodies.jsonl"
    bodies.write_text("".join(json.dumps({"template": "machine", "csr": c}) + "\n"
                              for c in make_csrs(args.csrs or args.count)))
    client = subprocess.Popen([sys.executable, "-c", CLIENT, str(port), answer["credential"], str(bodies)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert client.stdin is not None and client.stdout is not None

    def send(count: int) -> None:
        client.stdin.write(f"{count}\n")  # type: ignore[union-attr]
        client.stdin.flush()  # type: ignore[union-attr]
        if client.stdout.readline().strip() != "done":  # type: ignore[union-attr]
            raise SystemExit("the client failed")

    send(args.count)  # warm up
    if args.no_profile:
        args.rounds = 0
    counting = not args.no_profile
    send(args.count)
    counting = False
    calls = sum(counts.values()) / args.count
    sys.setprofile(None)
    threading.setprofile(None)  # type: ignore[arg-type]
    cpu = []
    for _ in range(args.rounds):
        start = time.process_time()
        send(args.count)
        cpu.append((time.process_time() - start) * 1000 / args.count)
    client.stdin.close()
    client.wait(timeout=60)
    server.should_exit = True
    thread.join(timeout=60)
    print(json.dumps({"code": str(Path(certpulse.__file__).parent), "count": args.count,
                      "calls_per_issuance": round(calls, 1), "cpu_ms": [round(c, 3) for c in cpu]}))
    if args.save:
        args.save.write_text(json.dumps({label(k): v / args.count for k, v in counts.items()}, indent=0))
    for what, n in counts.most_common(args.top):
        print(f"{n / args.count:8.2f}  {label(what)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
