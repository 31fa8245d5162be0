#!/usr/bin/env python3
"""An asyncio ACME load generator (issue 18): complete RFC 8555 orders, as many as a server
finishes, at a fixed number of orders in flight, for a fixed time.

It is the load generator of ``benchmarks/acme.py`` (which starts the servers), and one process
of it drives one server at one concurrency level. The same generator drives every peer, so the
figures compare the servers and not their clients.

One account, reused: its ES256 key is made once (``--account-key``; created when the file does
not exist) and registered with ``newAccount`` — with an external account binding when
``--eab-kid`` / ``--eab-key`` are given, else ``onlyReturnExisting`` (the key was registered by
an earlier run). Every order, by each of ``--concurrency`` asyncio tasks, one after the other:

  newOrder (one dns identifier under ``--domain``, unique per order) -> POST-as-GET the
  authorization -> POST the http-01 challenge -> poll the authorization until valid ->
  finalize with a CSR -> poll the order until valid -> download the certificate.

Every request is a JWS (ES256, joserfc) with a nonce taken from a pool of the ``Replay-Nonce``
headers of earlier answers (``newNonce`` only when the pool is empty); a ``badNonce`` problem is
retried once with a fresh nonce, a second one is an error. Polls wait 5 ms, then twice as long
each time up to 200 ms; ``Retry-After`` is not honoured (it is whole seconds, and would measure
the header rather than the server), the same for every peer.

The http-01 responder is in this process: an asyncio HTTP/1.1 server (h11) on
``127.0.0.1:--http01-port`` answering ``/.well-known/acme-challenge/<token>`` from the key
authorizations of the orders in flight, so the server validates over real HTTP. It resolves the
order's name however it does (the harness points it at pebble-challtestsrv).

The CSRs (a fresh EC P-256 key each, the order's name as CN and SAN) are made before the timed
window, ``--csrs`` of them (default: enough for 400 orders/s); if the run needs more they are
made inline and their CPU time is reported apart (``inline_csr_cpu_s``).

The timed window: after ``--warmup`` seconds of orders that are not counted, every task starts
orders until ``--duration`` seconds have passed and finishes the one in flight; orders/s is the
orders completed over the time until the last one finished. Inside that window: this process's
CPU time (client and responder; ``time.process_time``), and, with ``--server-pid``, the CPU time
of that process and its descendants (``/proc/<pid>/stat``), and with ``--also-pid`` that of
other processes (e.g. the DNS server both peers use). Per order: its latency (newOrder sent to
certificate received). Any failed order (an HTTP error, a problem document, an invalid
authorization or order, a wrong certificate, a poll that never ends) counts as an error with
its kind, and the task goes on with the next order. With ``--stall-after S``, a run in which no
order completed for S seconds (a server that stopped answering) ends there: its rate counts the
orders up to the last completed one, the result says when (``stalled_after_s``), and the
connections are aborted rather than closed politely.

The result is one JSON object on stdout (``--json`` writes it to a file too).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import collections
import contextlib
import dataclasses
import json
import os
import secrets
import ssl
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import h11
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from issuance import cpu_seconds, process_tree
from joserfc import jws
from joserfc.jwk import ECKey, OctKey
from joserfc.registry import HeaderParameter

# ACME's own protected header parameters (RFC 8555 section 6.4, 6.5)
REGISTRY = jws.JWSRegistry(header_registry={"nonce": HeaderParameter("ACME anti-replay nonce", "str"),
                                            "url": HeaderParameter("ACME request URL", "str")},
                           algorithms=["ES256", "HS256"])
JOSE = "application/jose+json"
POLL_FIRST, POLL_MAX = 0.005, 0.2
ORDER_DEADLINE = 60.0
REQUEST_TIMEOUT = 30.0  # seconds one request may take  # seconds an order may take before it counts as an error
CHALLENGE_PATH = "/.well-known/acme-challenge/"


class OrderFailed(Exception):
    """One order went wrong; ``kind`` is its short description for the error counts."""

    def __init__(self, kind: str, detail: str = "") -> None:
        super().__init__(f"{kind}: {detail}" if detail else kind)
        self.kind = kind


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


# -- the http-01 responder ----------------------------------------------------------------


class Responder:
    """Answers ``GET /.well-known/acme-challenge/<token>`` with its key authorization, 404 else."""

    def __init__(self) -> None:
        self.answers: dict[str, bytes] = {}
        self.served = 0
        self.unknown = 0
        self._server: asyncio.Server | None = None

    async def start(self, port: int) -> None:
        self._server = await asyncio.start_server(self._connection, "127.0.0.1", port, reuse_address=True)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2)

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = h11.Connection(h11.SERVER)
        try:
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    data = await asyncio.wait_for(reader.read(65536), 30)
                    conn.receive_data(data)
                    continue
                if isinstance(event, h11.Request):
                    target = event.target.decode("ascii", "replace")
                    body = self.answers.get(target[len(CHALLENGE_PATH):]) if target.startswith(CHALLENGE_PATH) \
                        else None
                    if body is None:
                        self.unknown += 1
                    else:
                        self.served += 1
                    answer = body if body is not None else b"not found\n"
                    headers = [("Content-Type", "text/plain"), ("Content-Length", str(len(answer)))]
                    writer.write(conn.send(h11.Response(status_code=200 if body is not None else 404,
                                                        headers=headers)) or b"")
                    writer.write(conn.send(h11.Data(data=answer)) or b"")
                    writer.write(conn.send(h11.EndOfMessage()) or b"")
                    await writer.drain()
                elif isinstance(event, h11.EndOfMessage):
                    if conn.our_state is h11.MUST_CLOSE or conn.their_state is h11.MUST_CLOSE:
                        break
                    conn.start_next_cycle()
                elif isinstance(event, h11.ConnectionClosed):
                    break
        except (h11.RemoteProtocolError, h11.LocalProtocolError, OSError, TimeoutError):
            pass
        finally:
            writer.close()


# -- CSRs ---------------------------------------------------------------------------------


def make_csr(name: str) -> bytes:
    """DER CSR for ``name`` (CN and SAN) with a fresh EC P-256 key."""
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, name)]))
           .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
           .sign(key, hashes.SHA256()))
    return csr.public_bytes(serialization.Encoding.DER)


class Names:
    """Unique order names with their CSRs, made ahead; more made inline (and timed) if needed."""

    def __init__(self, domain: str, count: int) -> None:
        self.prefix = f"o{secrets.token_hex(4)}"
        self.domain = domain.lstrip(".")
        self.next = 0
        self.inline_cpu = 0.0
        self.inline = 0
        self.ready: collections.deque[tuple[str, bytes]] = collections.deque()
        for _ in range(count):
            name = self._name()
            self.ready.append((name, make_csr(name)))

    def _name(self) -> str:
        self.next += 1
        return f"{self.prefix}-{self.next}.{self.domain}"

    def take(self) -> tuple[str, bytes]:
        if self.ready:
            return self.ready.popleft()
        started = time.process_time()
        name = self._name()
        csr = make_csr(name)
        self.inline_cpu += time.process_time() - started
        self.inline += 1
        return name, csr


# -- HTTP/1.1 over one kept-alive connection ---------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class Answer:
    status: int
    headers: dict[str, str]  # names in lower case
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


class Connection:
    """One HTTP/1.1 keep-alive connection (h11 over asyncio streams), reopened when the server
    closes it. Each task of the generator has its own, so there is no pool to manage: that pool
    (httpx/httpcore) cost more CPU per request than the rest of the client together."""

    def __init__(self, origin: str, context: ssl.SSLContext | None) -> None:
        parts = urlsplit(origin)
        self.scheme, self.host, self.port = parts.scheme, parts.hostname or "", parts.port or 443
        self.netloc = parts.netloc
        self.context = context if parts.scheme == "https" else None
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.h11 = h11.Connection(h11.CLIENT)
        self.opened = 0

    async def _open(self) -> None:
        await self.close()
        self.reader, self.writer = await asyncio.open_connection(
            self.host, self.port, ssl=self.context, server_hostname=self.host if self.context else None)
        self.h11 = h11.Connection(h11.CLIENT)
        self.opened += 1

    async def close(self, *, abort: bool = False) -> None:
        """Close the connection; ``abort``: at once, without the TLS goodbye (whose answer a
        server that stopped answering never sends)."""
        if self.writer is not None:
            if abort:
                self.writer.transport.abort()
            else:
                self.writer.close()
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(self.writer.wait_closed(), 2)
        self.reader = self.writer = None

    async def request(self, method: str, url: str, body: bytes = b"",
                      content_type: str | None = None) -> Answer:
        """One request; a connection the server closed while idle is reopened once."""
        for attempt in (1, 2):
            fresh = self.writer is None
            if fresh:
                await self._open()
            try:
                return await asyncio.wait_for(self._exchange(method, url, body, content_type), REQUEST_TIMEOUT)
            except TimeoutError:  # (before OSError, of which it is a kind)
                await self.close(abort=True)
                raise OrderFailed("HTTP: no answer", f"{method} {url}: none within {REQUEST_TIMEOUT:g} s") from None
            except (OSError, h11.ProtocolError, ConnectionError, asyncio.IncompleteReadError) as exc:
                await self.close(abort=True)
                if fresh or attempt == 2:
                    raise OrderFailed(f"HTTP: {type(exc).__name__}", f"{method} {url}: {exc}") from None
        raise AssertionError("unreachable")

    async def _exchange(self, method: str, url: str, body: bytes, content_type: str | None) -> Answer:
        assert self.reader is not None and self.writer is not None
        parts = urlsplit(url)
        target = parts.path + (f"?{parts.query}" if parts.query else "")
        headers = [("Host", self.netloc), ("Content-Length", str(len(body)))]
        if content_type:
            headers.append(("Content-Type", content_type))
        conn = self.h11
        data = conn.send(h11.Request(method=method, target=target, headers=headers)) or b""
        if body:
            data += conn.send(h11.Data(data=body)) or b""
        data += conn.send(h11.EndOfMessage()) or b""
        self.writer.write(data)
        await self.writer.drain()
        response: h11.Response | None = None
        chunks: list[bytes] = []
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                received = await self.reader.read(65536)
                conn.receive_data(received)  # b"" tells h11 the connection closed
                continue
            if isinstance(event, h11.Response):
                response = event
            elif isinstance(event, h11.Data):
                chunks.append(bytes(event.data))
            elif isinstance(event, h11.EndOfMessage):
                break
            elif isinstance(event, h11.ConnectionClosed):
                raise ConnectionError("the server closed the connection")
        assert response is not None
        if conn.our_state is h11.MUST_CLOSE or conn.their_state is h11.MUST_CLOSE:
            await self.close()
        else:
            conn.start_next_cycle()
        return Answer(response.status_code,
                      {k.decode("latin-1"): v.decode("latin-1") for k, v in response.headers},
                      b"".join(chunks))


# -- the ACME client ----------------------------------------------------------------------


class Client:
    """One ACME account; its tasks share the nonce pool, each has its own connection."""

    def __init__(self, directory_url: str, key: ECKey, context: ssl.SSLContext | None) -> None:
        self.directory_url = directory_url
        self.key = key
        self.context = context
        self.directory: dict[str, Any] = {}
        self.kid = ""
        self.thumbprint = key.thumbprint()
        self.nonces: collections.deque[str] = collections.deque()
        self.requests = 0
        self.bad_nonces = 0

    def connection(self) -> Connection:
        return Connection(self.directory_url, self.context)

    def _keep_nonce(self, answer: Answer) -> None:
        nonce = answer.headers.get("replay-nonce")
        if nonce:
            self.nonces.append(nonce)

    async def _nonce(self, conn: Connection) -> str:
        if self.nonces:
            return self.nonces.popleft()
        answer = await conn.request("HEAD", self.directory["newNonce"])
        self.requests += 1
        nonce = answer.headers.get("replay-nonce")
        if not nonce:
            raise OrderFailed("newNonce", f"HTTP {answer.status} without Replay-Nonce")
        return nonce

    def _sign(self, url: str, payload: bytes, nonce: str, jwk: dict[str, Any] | None = None) -> bytes:
        header: dict[str, Any] = {"alg": "ES256", "nonce": nonce, "url": url}
        if jwk is not None:
            header["jwk"] = jwk
        else:
            header["kid"] = self.kid
        return json.dumps(jws.serialize_json({"protected": header}, payload, self.key, registry=REGISTRY)).encode()

    async def post(self, conn: Connection, step: str, url: str, payload: dict[str, Any] | None, *,
                   jwk: dict[str, Any] | None = None) -> Answer:
        """A signed POST (``payload`` None: POST-as-GET); a problem answer raises OrderFailed."""
        body = b"" if payload is None else json.dumps(payload).encode()
        for attempt in (1, 2):
            signed = self._sign(url, body, await self._nonce(conn), jwk)
            try:
                answer = await conn.request("POST", url, signed, JOSE)
            except OrderFailed as exc:
                raise OrderFailed(f"{step}: {exc.kind}", str(exc)) from None
            self.requests += 1
            self._keep_nonce(answer)
            if answer.status < 400:
                return answer
            problem = problem_of(answer)
            if problem.get("type") == "urn:ietf:params:acme:error:badNonce" and attempt == 1:
                self.bad_nonces += 1
                continue
            kind = str(problem.get("type", "")).rsplit(":", 1)[-1] or "no problem document"
            raise OrderFailed(f"{step}: HTTP {answer.status} {kind}", str(problem.get("detail", ""))[:300])
        raise AssertionError("unreachable")

    async def register(self, conn: Connection, eab_kid: str | None, eab_key: str | None) -> None:
        answer = await conn.request("GET", self.directory_url)
        if answer.status != 200:
            raise OrderFailed("directory", f"HTTP {answer.status}")
        self.directory = answer.json()
        jwk = self.key.as_dict(private=False)
        payload: dict[str, Any] = {"termsOfServiceAgreed": True}
        if eab_kid and eab_key:
            mac_key = OctKey.import_key(base64.urlsafe_b64decode(eab_key + "=" * (-len(eab_key) % 4)))
            payload["externalAccountBinding"] = jws.serialize_json(
                {"protected": {"alg": "HS256", "kid": eab_kid, "url": self.directory["newAccount"]}},
                json.dumps(jwk).encode(), mac_key, registry=REGISTRY)
        else:
            payload["onlyReturnExisting"] = True
        created = await self.post(conn, "newAccount", self.directory["newAccount"], payload, jwk=jwk)
        self.kid = created.headers["location"]

    async def poll(self, conn: Connection, step: str, url: str, done: str, deadline: float) -> dict[str, Any]:
        """POST-as-GET ``url`` until its status is ``done``; ``invalid`` or the deadline fail."""
        delay = POLL_FIRST
        while True:
            state = (await self.post(conn, step, url, None)).json()
            status = state.get("status")
            if status == done:
                return dict(state)
            if status == "invalid":
                raise OrderFailed(f"{step}: invalid", json.dumps(state)[:300])
            if time.monotonic() + delay > deadline:
                raise OrderFailed(f"{step}: still {status} after {ORDER_DEADLINE:g} s")
            await asyncio.sleep(delay)
            delay = min(POLL_MAX, delay * 2)

    async def order(self, conn: Connection, name: str, csr: bytes, responder: Responder, *, check: bool) -> None:
        deadline = time.monotonic() + ORDER_DEADLINE
        created = await self.post(conn, "newOrder", self.directory["newOrder"],
                                  {"identifiers": [{"type": "dns", "value": name}]})
        order_url = created.headers.get("location", "")
        order = created.json()
        if created.status != 201 or not order_url:
            raise OrderFailed("newOrder: not created", f"HTTP {created.status}")
        [authz_url] = order["authorizations"]
        authz = (await self.post(conn, "authz", authz_url, None)).json()
        if authz.get("status") != "valid":
            challenge = next((c for c in authz.get("challenges", ()) if c.get("type") == "http-01"), None)
            if challenge is None:
                raise OrderFailed("authz: no http-01 challenge")
            token = challenge["token"]
            responder.answers[token] = f"{token}.{self.thumbprint}".encode()
            try:
                await self.post(conn, "challenge", challenge["url"], {})
                await self.poll(conn, "authz poll", authz_url, "valid", deadline)
            finally:
                responder.answers.pop(token, None)
        order = (await self.post(conn, "finalize", order["finalize"], {"csr": b64url(csr)})).json()
        if order.get("status") != "valid":
            order = await self.poll(conn, "order poll", order_url, "valid", deadline)
        certificate_url = order.get("certificate")
        if not certificate_url:
            raise OrderFailed("order: valid without certificate URL")
        pem = (await self.post(conn, "certificate", certificate_url, None)).body
        if not pem.startswith(b"-----BEGIN CERTIFICATE-----"):
            raise OrderFailed("certificate: not a PEM chain", repr(pem[:80]))
        if check:  # the first order of each task: the leaf is for the name asked
            leaf = x509.load_pem_x509_certificate(pem)
            names = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            if names.get_values_for_type(x509.DNSName) != [name]:
                raise OrderFailed("certificate: wrong names", str(names))


def problem_of(answer: Answer) -> dict[str, Any]:
    try:
        found = answer.json()
    except ValueError:
        return {}
    return found if isinstance(found, dict) else {}


# -- the run ------------------------------------------------------------------------------


@dataclasses.dataclass
class Result:
    concurrency: int
    seconds: float
    orders: int
    errors: int
    error_kinds: dict[str, int]
    error_examples: list[str]
    orders_per_s: float
    p50_ms: float
    p99_ms: float
    mean_ms: float
    requests: int
    bad_nonces: int
    generator_cpu_s: float
    server_cpu_s: float | None
    also_cpu_s: float | None
    inline_csrs: int
    inline_csr_cpu_s: float
    challenges_served: int
    challenges_unknown: int
    warmup_orders: int
    stalled_after_s: float | None  # the server stopped completing orders this long into the window
    connections_opened: int  # in the timed window (keep-alive: 0 when no server closed one)

    @property
    def server_cpu_ms_per_order(self) -> float | None:
        return None if self.server_cpu_s is None or not self.orders else 1000 * self.server_cpu_s / self.orders


def tree_cpu(pids: Sequence[int]) -> dict[int, float]:
    tree: list[int] = []
    for pid in pids:
        tree.extend(process_tree(pid))
    return cpu_seconds(tree)


def percentile(values: list[float], fraction: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


async def drive(args: argparse.Namespace) -> Result:
    key_file: Path = args.account_key
    if key_file.exists():
        key = ECKey.import_key(key_file.read_bytes())
    else:
        key = ECKey.generate_key("P-256", private=True)
        key_file.write_bytes(key.as_pem(private=True))
        key_file.chmod(0o600)
    context = ssl.create_default_context(cafile=str(args.ca_file)) if args.ca_file else ssl.create_default_context()
    names = Names(args.domain, args.csrs if args.csrs is not None else max(64, round(400 * args.duration)))
    responder = Responder()
    await responder.start(args.http01_port)
    client = Client(args.directory, key, context)
    connections = [client.connection() for _ in range(args.concurrency)]
    latencies: list[float] = []
    errors: collections.Counter[str] = collections.Counter()
    examples: list[str] = []  # the first errors, in full
    counting = False
    warmup_orders = 0
    checked: set[int] = set()

    progress = [time.perf_counter()]  # when the last order completed
    stalled_at: list[float] = []  # when the server stopped completing orders, if it did

    async def phase(until: float) -> list[float]:
        """Every task until ``until``; with --stall-after, the phase ends early when no order has
        completed for that long (a server that stopped answering), at its last completed order."""
        tasks = [asyncio.create_task(task(i, until)) for i in range(args.concurrency)]
        progress[0] = time.perf_counter()
        while args.stall_after and not all(t.done() for t in tasks):
            await asyncio.wait(tasks, timeout=0.25)
            if time.perf_counter() - progress[0] > args.stall_after and not all(t.done() for t in tasks):
                stalled_at.append(progress[0])
                for t in tasks:
                    t.cancel()
                break
        ends = await asyncio.gather(*tasks, return_exceptions=True)
        return [e for e in ends if isinstance(e, float)] or [progress[0]]

    async def task(number: int, until: float) -> float:
        nonlocal warmup_orders
        conn = connections[number]
        last = time.perf_counter()
        while time.perf_counter() < until:
            name, csr = names.take()
            started = time.perf_counter()
            try:
                await client.order(conn, name, csr, responder, check=number not in checked)
                checked.add(number)
            except OrderFailed as exc:
                if counting:
                    errors[exc.kind] += 1
                    if len(examples) < 10:
                        examples.append(f"{time.perf_counter() - started:.2f} s into {name}: {exc}")
                elif args.verbose:
                    print(f"warm-up order failed: {exc}", file=sys.stderr)
                last = time.perf_counter()
                continue
            except (KeyError, ValueError, TypeError) as exc:  # an answer without what RFC 8555 says
                if counting:
                    errors[f"malformed answer: {type(exc).__name__}"] += 1
                last = time.perf_counter()
                continue
            last = time.perf_counter()
            progress[0] = last
            if counting:
                latencies.append(last - started)
            else:
                warmup_orders += 1
        return last

    try:
        await client.register(connections[0], args.eab_kid, args.eab_key)
        if args.warmup > 0:
            await phase(time.perf_counter() + args.warmup)
        requests_before, bad_before = client.requests, client.bad_nonces
        served_before, unknown_before = responder.served, responder.unknown
        opened_before = sum(c.opened for c in connections)
        server_before = tree_cpu(args.server_pid) if args.server_pid else {}
        also_before = tree_cpu(args.also_pid) if args.also_pid else {}
        cpu_before = time.process_time()
        counting = True
        started = time.perf_counter()
        ends = await phase(started + args.duration) if not stalled_at else [started]
        finished = max(stalled_at[0], started) if stalled_at else max(ends)
        cpu = time.process_time() - cpu_before
        server_after = tree_cpu(args.server_pid) if args.server_pid else {}
        also_after = tree_cpu(args.also_pid) if args.also_pid else {}
    finally:
        for conn in connections:
            await conn.close(abort=bool(stalled_at))
        await responder.stop()
    seconds = finished - started
    done = len(latencies)
    ms = [x * 1000 for x in latencies]
    return Result(
        concurrency=args.concurrency, seconds=seconds, orders=done, errors=sum(errors.values()),
        error_kinds=dict(errors), orders_per_s=done / seconds if seconds > 0 else 0.0,
        p50_ms=percentile(ms, 0.5), p99_ms=percentile(ms, 0.99), mean_ms=statistics.fmean(ms) if ms else 0.0,
        requests=client.requests - requests_before, bad_nonces=client.bad_nonces - bad_before,
        generator_cpu_s=cpu,
        server_cpu_s=sum(server_after[p] - server_before.get(p, 0.0) for p in server_after)
        if args.server_pid else None,
        also_cpu_s=sum(also_after[p] - also_before.get(p, 0.0) for p in also_after) if args.also_pid else None,
        inline_csrs=names.inline, inline_csr_cpu_s=names.inline_cpu,
        challenges_served=responder.served - served_before, challenges_unknown=responder.unknown - unknown_before,
        error_examples=examples, warmup_orders=warmup_orders,
        stalled_after_s=max(0.0, stalled_at[0] - started) if stalled_at else None,
        connections_opened=sum(c.opened for c in connections) - opened_before)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0] if __doc__ else None)
    parser.add_argument("--directory", required=True, help="the ACME directory URL")
    parser.add_argument("--ca-file", type=Path, help="PEM root(s) the server's TLS certificate chains to")
    parser.add_argument("--account-key", type=Path, required=True,
                        help="the account's ES256 key (PEM); made when the file does not exist")
    parser.add_argument("--eab-kid", help="external account binding key id (registers the account)")
    parser.add_argument("--eab-key", help="external account binding MAC key, base64url")
    parser.add_argument("--concurrency", type=int, default=1, help="orders in flight (default 1)")
    parser.add_argument("--duration", type=float, default=10.0, help="timed seconds (default 10)")
    parser.add_argument("--warmup", type=float, default=1.0, help="seconds of uncounted orders first (default 1)")
    parser.add_argument("--http01-port", type=int, required=True, help="port of the http-01 responder")
    parser.add_argument("--domain", default="example.internal", help="names are <unique>.DOMAIN")
    parser.add_argument("--csrs", type=int, help="CSRs made before the run (default 400 per second of --duration)")
    parser.add_argument("--server-pid", type=int, action="append", default=[],
                        help="measure this process tree's CPU in the timed window (repeatable)")
    parser.add_argument("--also-pid", type=int, action="append", default=[],
                        help="measure this process tree's CPU apart (e.g. the DNS server; repeatable)")
    parser.add_argument("--stall-after", type=float, default=0.0, metavar="SECONDS",
                        help="end the run when no order has completed for this long (a server that stopped "
                             "answering): the rate counts up to its last completed order, and the result says so")
    parser.add_argument("--json", type=Path, help="also write the result to this file")
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args(argv)
    if args.concurrency < 1 or args.duration <= 0:
        parser.error("--concurrency must be >= 1 and --duration > 0")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        import uvloop
    except ImportError:
        result = asyncio.run(drive(args))
    else:
        result = uvloop.run(drive(args))
    document = {**dataclasses.asdict(result), "server_cpu_ms_per_order": result.server_cpu_ms_per_order,
                "pid": os.getpid()}
    text = json.dumps(document)
    if args.json:
        args.json.write_text(text)
    print(text, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
