"""Protocol-level agents for ``benchmarks/storm.py --mode light``: the CA's side of a storm.

A real agent costs its machine several times the CPU its CA spends on it (key, CSR, answer
checks, its SQLite store and event log: ~40 ms against ~11 ms). Simulated on the same two cores
as the server, real agents cannot arrive faster than the server answers, so the CA never sees a
storm. These agents send exactly what the real agent sends, in the same order, and back off the
same way (:func:`certpulse.agent.daemon.next_delay` with the server's Retry-After), but with
keys, CSRs and renewal signatures made before the storm and no store: each is one asyncio
coroutine with its own connection, so all N really are at the server at once.

One pulse, one connection (the real agent opens a new client per pulse):

* enrollment: ``GET /v1/policy`` (only until it succeeds once: the agent caches the policy for
  10 minutes; shed, the pulse fails), then ``POST /v1/requests`` with an ``Idempotency-Key``;
* renewal: ``GET /v1/policy`` (shed, the agent goes on with the policy it cached before, so it
  is skipped too), ``GET /v1/certificates/SERIAL`` (the revocation check; shed or failed, the
  agent ignores it), then the renewal ``POST`` carrying the old certificate and the old key's
  signature over the new CSR.

Every request has the real agent's 30 s timeout; a timeout, a refused or reset connection or a
5xx without Retry-After is a failure the benchmark reports (the agent would retry it too).
"""

from __future__ import annotations

import asyncio
import base64
import collections
import contextlib
import dataclasses
import json
import random
import time

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from certpulse.agent.config import AgentConfig, PolicyServerConfig
from certpulse.agent.daemon import follows_retry_after, next_delay
from certpulse.pki.signing import sign_bytes

TIMEOUT = 30.0  # the agent client's (CAClient) timeout
ISSUER = "issuing-1"
TEMPLATE = "machine"
DEFAULTS = AgentConfig(servers=(PolicyServerConfig(url="http://unused"),), principal="unused")


def _csr(key: ec.EllipticCurvePrivateKey) -> tuple[str, bytes]:
    csr = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([])).sign(key, hashes.SHA256())
    return csr.public_bytes(serialization.Encoding.PEM).decode(), csr.public_bytes(serialization.Encoding.DER)


@dataclasses.dataclass
class LightAgent:
    index: int
    credential: str
    key: ec.EllipticCurvePrivateKey
    enroll_csr: str
    renew_csr: str
    renew_signature: str  # base64, by ``key`` over the renewal CSR's DER
    certificate: str | None = None
    serial: str | None = None

    @classmethod
    def make(cls, index: int, credential: str) -> LightAgent:
        """The agent's keys and requests, made before the storm (as the agent makes them before sending)."""
        key = ec.generate_private_key(ec.SECP256R1())
        enroll_csr, _ = _csr(key)
        renew_csr, renew_der = _csr(ec.generate_private_key(ec.SECP256R1()))
        signature = base64.b64encode(sign_bytes(key, renew_der)).decode()
        return cls(index, credential, key, enroll_csr, renew_csr, signature)

    def body(self, renewing: bool) -> bytes:
        document: dict[str, object] = {"template": TEMPLATE, "csr": self.renew_csr if renewing else self.enroll_csr,
                                       "issuer": ISSUER}
        if renewing:
            document["renewal"] = {"certificate": self.certificate, "signature": self.renew_signature}
        return json.dumps(document).encode()


@dataclasses.dataclass
class LightRun:
    started: float = 0.0
    done: float | None = None
    pulses: int = 0
    shed: int = 0
    unavailable: int = 0
    errors: list[str] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class LightResult:
    runs: list[LightRun]
    elapsed: float
    client_cpu: float
    completed: bool
    requests: dict[tuple[str, str], int]
    latencies: list[float]  # seconds, every answered request


class _Unavailable(Exception):
    pass


class _Conn:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, host: str,
                 credential: str, tally: collections.Counter[tuple[str, str]], latencies: list[float]) -> None:
        self.reader, self.writer, self.host = reader, writer, host
        self.auth = f"Bearer {credential}"
        self.tally, self.latencies = tally, latencies

    async def call(self, method: str, path: str, route: str, body: bytes = b"",
                   extra: str = "") -> tuple[int, dict[str, str], bytes]:
        head = (f"{method} {path} HTTP/1.1\r\nHost: {self.host}\r\nAuthorization: {self.auth}\r\n"
                f"Accept: application/json\r\n{extra}")
        if body:
            head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
        started = time.perf_counter()
        try:
            status, headers, answer = await asyncio.wait_for(self._exchange((head + "\r\n").encode() + body), TIMEOUT)
        except TimeoutError:
            self.tally[(route, "timeout")] += 1
            raise _Unavailable(f"{route}: no answer within {TIMEOUT:g} s") from None
        except (OSError, asyncio.IncompleteReadError, ValueError) as exc:
            self.tally[(route, f"connection {type(exc).__name__}")] += 1
            raise _Unavailable(f"{route}: {type(exc).__name__}: {exc}") from None
        self.latencies.append(time.perf_counter() - started)
        self.tally[(route, "shed" if status in (429, 503) and "retry-after" in headers else str(status))] += 1
        return status, headers, answer

    async def _exchange(self, request: bytes) -> tuple[int, dict[str, str], bytes]:
        self.writer.write(request)
        await self.writer.drain()
        head = await self.reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            if name:
                headers[name.strip().lower()] = value.strip()
        length = int(headers.get("content-length", "0"))
        return status, headers, await self.reader.readexactly(length)


def _retry_after(headers: dict[str, str]) -> float | None:
    value = headers.get("retry-after", "").strip()
    return float(value) if value.isdigit() else None


async def _pulse(agent: LightAgent, run: LightRun, renewing: bool, state: dict[str, bool], host: str, port: int,
                 tally: collections.Counter[tuple[str, str]], latencies: list[float]) -> tuple[str, float | None]:
    """One pulse: ("done" | "shed" | "unavailable" | "error", Retry-After)."""
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), TIMEOUT)
    except (OSError, TimeoutError) as exc:
        tally[("connect", type(exc).__name__)] += 1
        return "unavailable", None
    conn = _Conn(reader, writer, f"{host}:{port}", agent.credential, tally, latencies)
    try:
        if not state.get("policy"):
            status, headers, _ = await conn.call("GET", "/v1/policy", "GET /v1/policy")
            if status == 200:
                state["policy"] = True
            elif not renewing:  # no cached policy yet: the pulse fails
                return ("shed", _retry_after(headers)) if status in (429, 503) and _retry_after(headers) else (
                    "error", None)
        if renewing:
            await conn.call("GET", f"/v1/certificates/{agent.serial}?issuer={ISSUER}", "GET /v1/certificates/{serial}")
        idempotency = f"Idempotency-Key: storm-{'renew' if renewing else 'enroll'}-{agent.index}\r\n"
        status, headers, answer = await conn.call("POST", "/v1/requests", "POST /v1/requests", agent.body(renewing),
                                                  idempotency)
        if status in (200, 201):
            data = json.loads(answer)
            if data.get("status") != "issued" or not data.get("certificate"):
                run.errors.append(f"answer {status} without a certificate: {answer[:200]!r}")
                return "error", None
            agent.certificate, agent.serial = data["certificate"], data["serial"]
            return "done", None
        retry_after = _retry_after(headers)
        if status in (429, 503) and retry_after is not None:
            return "shed", retry_after
        run.errors.append(f"POST answered {status}: {answer[:200]!r}")
        return "error", None
    except _Unavailable:
        return "unavailable", None
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


async def _storm(agents: list[LightAgent], *, host: str, port: int, renewing: bool, time_factor: float,
                 deadline: float, seed: int) -> LightResult:
    runs = [LightRun() for _ in agents]
    tally: collections.Counter[tuple[str, str]] = collections.Counter()
    latencies: list[float] = []
    go = asyncio.Event()
    t0 = 0.0

    async def one(agent: LightAgent, run: LightRun) -> None:
        rng = random.Random(seed * 1_000_003 + agent.index)
        state: dict[str, bool] = {}
        failures = 0
        await go.wait()
        while time.perf_counter() - t0 < deadline:
            if not run.pulses:
                run.started = time.perf_counter() - t0
            run.pulses += 1
            outcome, retry_after = await _pulse(agent, run, renewing, state, host, port, tally, latencies)
            if outcome == "done":
                run.done = time.perf_counter() - t0
                return
            if outcome == "shed":
                run.shed += 1
            elif outcome == "unavailable":
                run.unavailable += 1
            failures += 1
            delay = next_delay(refresh=DEFAULTS.refresh_interval, failures=failures, retry_after=retry_after,
                               cap=DEFAULTS.backoff_cap, rng=rng)
            # The server's turn is real time (it is sized from the server's real rate); only the
            # agent's own backoff is compressed.
            await asyncio.sleep(delay if follows_retry_after(failures, retry_after) else delay / time_factor)

    tasks = [asyncio.create_task(one(agent, run)) for agent, run in zip(agents, runs, strict=True)]
    await asyncio.sleep(0)
    cpu0 = time.process_time()
    t0 = time.perf_counter()
    go.set()
    await asyncio.gather(*tasks)
    elapsed = time.perf_counter() - t0
    completed = all(r.done is not None for r in runs)
    last = max((r.done for r in runs if r.done is not None), default=elapsed)
    return LightResult(runs, last if completed else elapsed, time.process_time() - cpu0, completed, dict(tally),
                       latencies)


def storm(agents: list[LightAgent], *, host: str, port: int, renewing: bool, time_factor: float, deadline: float,
          seed: int = 1) -> LightResult:
    return asyncio.run(_storm(agents, host=host, port=port, renewing=renewing, time_factor=time_factor,
                              deadline=deadline, seed=seed))
