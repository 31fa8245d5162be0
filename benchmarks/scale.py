#!/usr/bin/env python3
"""Planner and store scale (issue 6, part 3): how certpulse behaves with big stores and databases.

Four measurements, each repeated (min / median / max):

* ``planner``: ``plan(options, servers, snapshot, now)`` over a snapshot of N stored certificates
  against a policy of T templates (default 10,000 and 500), and the expiry monitor's
  ``expiry_notices`` over the same snapshot, given the plan's ``handled`` set: a pulse runs both.
* ``gather``: a real agent folder (``agent.toml`` and a ``LocalStore``) holding N real EC P-256
  certificates, issued by a real root and issuing CA with the template extension; the gather
  step ``gather.snapshot()`` over it (every ``cert.pem`` and ``chain.pem`` read and every chain
  validated), then ``plan`` and the expiry monitor on what it gathered. A sample is installed
  with the real ``LocalStore.install`` (timed per certificate); the rest is written the same
  way in bulk (one transaction: the same rows, files and 1006 events), and the bench checks
  that the bulk rows and files equal what ``install`` wrote.
* ``list``: the real CLI in its own process, end to end: ``certpulse cert list --all --json``
  (every certificate), ``cert list --json`` (the current ones), the Rich table, and
  ``certpulse version`` as the interpreter's start-up floor.
* ``ca-sqlite`` / ``ca-postgres``: a CA made with ``init_ca`` whose database is filled in bulk
  (executemany / COPY, not through the API) with R issued certificates, their requests and
  audit rows (default 1,000,000). The CA's own listing and lookup operations are then run
  through the CA core's roles (request list, audit log, status, revocation, policy directory,
  metrics counts ...); every SQL statement they send is captured and shown with its query
  plan (``EXPLAIN QUERY PLAN`` / ``EXPLAIN``), flagged when it reads a whole table.
  PostgreSQL uses a schema of its own in the local ``test`` database, dropped afterwards.

``--quick`` runs everything small in a few seconds (the smoke test in ``make test``).
Take final figures on an otherwise idle machine: ``flock /tmp/certpulse-bench.lock python
benchmarks/scale.py``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as dt
import hashlib
import json
import os
import platform
import random
import secrets
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from certpulse.agent import gather
from certpulse.agent import trust as agent_trust
from certpulse.agent.config import AgentConfig, PolicyServerConfig, open_agent_store, save_config, write_credential
from certpulse.agent.expiry import expiry_notices
from certpulse.agent.model import (
    IssuerPolicy,
    Options,
    PendingRequest,
    PolicyServer,
    StoredCertificate,
    StoreSnapshot,
    TemplatePolicy,
)
from certpulse.agent.planner import plan
from certpulse.machine import log as event_log
from certpulse.machine import schema as agent_schema
from certpulse.machine.certstore import LocalStore
from certpulse.machine.events import CertFacts, EventDraft, EventId
from certpulse.pki import template_info
from certpulse.pki.build import build_ca_certificate, end_entity_builder, random_serial, signature_hash, simple_name
from certpulse.pki.certs import pem, serial_hex, sha256_thumbprint, subject_names, thumbprint
from certpulse.pki.keys import private_key_pem

ROOT = Path(__file__).resolve().parent.parent
NOW = dt.datetime.now(dt.UTC).replace(microsecond=0)
DAY = dt.timedelta(days=1)
YEAR = 365 * DAY
ALL_RIGHTS = frozenset({"read", "enroll", "autoenroll"})
PG_ADMIN_URL = os.environ.get("CERTPULSE_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
POLICY_A, POLICY_B = "pol-a", "pol-b"
URL_A, URL_B = "http://127.0.0.1:9/a", "http://127.0.0.1:9/b"


# -- measuring --------------------------------------------------------------------------------


@dataclasses.dataclass
class Figure:
    name: str
    seconds: list[float]
    note: str = ""

    def summary(self) -> dict[str, Any]:
        return {"name": self.name, "runs": len(self.seconds), "min": min(self.seconds),
                "median": statistics.median(self.seconds), "max": max(self.seconds), "note": self.note}

    def line(self) -> str:
        s = self.summary()
        return (f"  {self.name:<58} {_ms(s['min']):>10} {_ms(s['median']):>10} {_ms(s['max']):>10}"
                f"   ({s['runs']} runs){'  ' + self.note if self.note else ''}")


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms" if seconds < 10 else f"{seconds:.2f} s"


def timed(name: str, runs: int, fn: Callable[[], object], note: str = "") -> Figure:
    seconds = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        seconds.append(time.perf_counter() - start)
    return Figure(name, seconds, note)


class Report:
    def __init__(self) -> None:
        self.sections: dict[str, dict[str, Any]] = {}
        self.current: dict[str, Any] = {}

    def section(self, name: str, **facts: Any) -> None:
        self.current = {"facts": facts, "figures": [], "plans": [], "notes": []}
        self.sections[name] = self.current
        print(f"\n== {name} ==", flush=True)
        for key, value in facts.items():
            print(f"  {key}: {value}")

    def figure(self, figure: Figure) -> Figure:
        if not self.current["figures"]:
            print(f"  {'':<58} {'min':>10} {'median':>10} {'max':>10}")
        self.current["figures"].append(figure.summary())
        print(figure.line(), flush=True)
        return figure

    def note(self, text: str) -> None:
        self.current["notes"].append(text)
        print(f"  - {text}", flush=True)

    def plan(self, operation: str, statement: str, plan_lines: list[str], verdict: str) -> None:
        self.current["plans"].append({"operation": operation, "sql": statement, "plan": plan_lines,
                                      "verdict": verdict})


# -- the policy and the planner's world -------------------------------------------------------


def oid_of(index: int) -> str:
    return f"1.3.6.1.4.1.311.21.8.4242.{index + 1}"


def make_templates(count: int) -> list[TemplatePolicy]:
    """``count`` templates, most set up for autoenrollment, the rest covering every rule that
    makes the planner skip or choose differently (manual, enroll-only, RA, key archival, user
    interaction, directory check, a raised major version, superseding templates)."""
    templates: list[TemplatePolicy] = []
    successors = max(1, count // 20)
    for i in range(count):
        kind = i % 20
        supersedes = (f"tpl-{i - count // 2:04d}",) if i >= count - successors and count >= 4 else ()
        templates.append(TemplatePolicy(
            name=f"tpl-{i:04d}", oid=oid_of(i), major_version=3 if kind == 19 else 2, minor_version=0,
            validity=YEAR, renewal_period=42 * DAY, purpose="encryption" if kind == 16 else "signature",
            key_types=("ec-p256",), default_key_type="ec-p256", archive_private_key=kind == 16,
            subject_source="request" if kind in (12, 13) else "principal",
            renewal_subject_from_existing=kind in (12, 13), manager_approval=False,
            ra_signatures=1 if kind == 15 else 0, ra_policy="1.3.6.1.4.1.311.20.2.1" if kind == 15 else None,
            supersedes=supersedes, old_certificate="delete" if i % 3 == 0 else "archive",
            user_interaction=kind == 17, check_directory=kind == 18,
            rights=frozenset({"read", "enroll"}) if kind == 14 else ALL_RIGHTS))
    return templates


def make_servers(templates: Sequence[TemplatePolicy]) -> list[PolicyServer]:
    """Two policy groups: the default one lists every template (three issuers: one cheap but
    unreachable, one renewal-only); the other lists every fourth template."""
    names = frozenset(t.name for t in templates)
    directory = tuple((t.name, NOW + 30 * DAY) for t in templates[18::40])
    server_a = PolicyServer(
        url=URL_A, policy_id=POLICY_A, cost=1, auth="token", is_default=True, templates=tuple(templates),
        issuers=(IssuerPolicy("CA-1", 1, False, names, True), IssuerPolicy("CA-2", 2, True, names, True),
                 IssuerPolicy("CA-0", 0, False, names, True, reachable=False)),
        kra_valid=True, directory=directory)
    quarter = tuple(templates[::4])
    server_b = PolicyServer(
        url=URL_B, policy_id=POLICY_B, cost=2, auth="token", is_default=False, templates=quarter,
        issuers=(IssuerPolicy("CB-1", 1, False, frozenset(t.name for t in quarter), True),), kra_valid=False)
    return [server_a, server_b]


@dataclasses.dataclass(frozen=True)
class CertSpec:
    """One certificate of the world: which template, its validity and its state."""

    index: int
    template: TemplatePolicy | None
    not_before: dt.datetime
    not_after: dt.datetime
    source: str
    policy_id: str | None
    archived: bool
    revoked: bool
    major_version: int


def make_specs(count: int, templates: Sequence[TemplatePolicy], seed: int = 6,
               archived_share: float = 0.4) -> list[CertSpec]:
    """``count`` certificates: about 95 % of policy templates (2 % of them of the other policy
    group), 5 % imported with no template; ``archived_share`` archived older versions; validity
    placed so that some are due, a few expired, most not due; 1 % revoked; a few of an older
    major version."""
    rng = random.Random(seed)
    specs: list[CertSpec] = []
    for i in range(count):
        template = templates[rng.randrange(len(templates))] if rng.random() >= 0.05 else None
        left = dt.timedelta(seconds=rng.randrange(-30 * 86_400, 360 * 86_400))
        not_before = (NOW + left - YEAR).replace(microsecond=0)
        manual = template is not None and template.subject_source == "request"
        major = template.major_version if template else 0
        specs.append(CertSpec(
            index=i, template=template, not_before=not_before, not_after=not_before + YEAR - dt.timedelta(seconds=1),
            source="manual" if manual or template is None else "auto",
            policy_id=(POLICY_B if rng.random() < 0.02 else POLICY_A) if template else None,
            archived=rng.random() < archived_share, revoked=rng.random() < 0.01,
            major_version=major - 1 if major and rng.random() < 0.05 else major))
    return specs


def stored(spec: CertSpec, print_: str) -> StoredCertificate:
    t = spec.template
    return StoredCertificate(
        thumbprint=print_, subject=f"CN=host-{spec.index}.bench.internal", not_before=spec.not_before,
        not_after=spec.not_after, template_oid=t.oid if t else None, template_name=t.name if t else None,
        major_version=spec.major_version, minor_version=0, source="manual" if spec.source == "manual" else "auto",
        policy_id=spec.policy_id, archived=spec.archived, revoked=spec.revoked)


def pending_and_flights(templates: Sequence[TemplatePolicy]) -> tuple[tuple[PendingRequest, ...], tuple[str, ...]]:
    pending = tuple(PendingRequest(request_id=1000 + i, template=t.name, issuer="CA-1", policy_url=URL_A,
                                   submitted_at=NOW - (70 if i % 4 == 0 else 3) * DAY, renewal_of=None)
                    for i, t in enumerate(templates[5::50]))
    return pending, tuple(t.name for t in templates[7::100])


def fake_thumbprint(index: int) -> str:
    """A SHA-1-shaped thumbprint, as the store keeps them."""
    return hashlib.sha1(f"bench-{index}".encode(), usedforsecurity=False).hexdigest().upper()


def bench_planner(report: Report, certs: int, n_templates: int, runs: int) -> None:
    """Two stores against the same policy: ``spread`` (certificates over every template, 40 %
    archived older versions) and ``dense`` (none archived, all on one template in 25: a server
    holding many current certificates per template, e.g. one per web site)."""
    templates = make_templates(n_templates)
    servers = make_servers(templates)
    pending, in_flight = pending_and_flights(templates)
    options = Options()
    worlds = {"spread": make_specs(certs, templates),
              "dense": make_specs(certs, templates[:max(2, n_templates // 25)], archived_share=0.0)}
    for name, specs in worlds.items():
        snapshot = StoreSnapshot(certificates=tuple(stored(s, fake_thumbprint(s.index)) for s in specs),
                                 pending=pending, in_flight=in_flight)
        result = plan(options, servers, snapshot, NOW)

        def planning(snap: StoreSnapshot = snapshot) -> object:
            return plan(options, servers, snap, NOW)

        def monitoring(snap: StoreSnapshot = snapshot, handled: frozenset[str] = result.handled) -> object:
            return expiry_notices(options, snap, NOW, handled=handled, warning_percent=10, raised=frozenset())

        report.section(f"planner ({name})", certificates=certs, templates=n_templates,
                       templates_used=len({s.template.name for s in specs if s.template}),
                       archived=sum(s.archived for s in specs), policy_groups=len(servers),
                       actions=len(result.actions), notes=len(result.notes))
        report.figure(timed("plan()", runs, planning))
        report.figure(timed("expiry_notices() (given the plan's handled set)", runs, monitoring))


# -- a real store ------------------------------------------------------------------------------


@dataclasses.dataclass
class Authority:
    root: x509.Certificate
    issuer: x509.Certificate
    issuer_key: ec.EllipticCurvePrivateKey


def make_authority() -> Authority:
    root_key = ec.generate_private_key(ec.SECP256R1())
    root = build_ca_certificate(subject=simple_name("Bench Root"), public_key=root_key.public_key(), issuer_cert=None,
                                signing_key=root_key, not_before=NOW - 3 * YEAR, not_after=NOW + 10 * YEAR,
                                path_length=1)
    issuer_key = ec.generate_private_key(ec.SECP256R1())
    issuer = build_ca_certificate(subject=simple_name("Bench Issuing CA"), public_key=issuer_key.public_key(),
                                  issuer_cert=root, signing_key=root_key, not_before=NOW - 3 * YEAR,
                                  not_after=NOW + 8 * YEAR, path_length=0)
    return Authority(root, issuer, issuer_key)


KEY_USAGE = x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                          data_encipherment=False, key_agreement=True, key_cert_sign=False, crl_sign=False,
                          encipher_only=False, decipher_only=False)


def issue(authority: Authority, spec: CertSpec) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    host = f"host-{spec.index}.bench.internal"
    extra: tuple[x509.ExtensionType, ...] = ()
    if spec.template is not None:
        extra = (template_info.encode(template_info.TemplateInfo(spec.template.oid, spec.major_version, 0)),)
    cert = end_entity_builder(
        subject=simple_name(host), public_key=key.public_key(), issuer_cert=authority.issuer,
        issuer_key=authority.issuer_key, not_before=spec.not_before,
        not_after=spec.not_after, sans=[x509.DNSName(host)], key_usage=KEY_USAGE,
        ekus=(ExtendedKeyUsageOID.SERVER_AUTH.dotted_string, ExtendedKeyUsageOID.CLIENT_AUTH.dotted_string),
        extra=extra).serial_number(random_serial()).sign(authority.issuer_key, signature_hash(authority.issuer_key))
    return key, cert


def certificate_row(cert: x509.Certificate, *, source: str, policy_id: str | None, issuer_name: str | None,
                    template_name: str | None, has_key: bool, now: dt.datetime) -> dict[str, Any]:
    """The ``certificates`` row ``LocalStore.install`` writes for ``cert`` (checked against it)."""
    info = template_info.decode(cert)
    return dict(
        thumbprint=thumbprint(cert), sha256=sha256_thumbprint(cert), subject=cert.subject.rfc4514_string(),
        names=json.dumps(subject_names(cert)), serial=serial_hex(cert.serial_number),
        issuer=cert.issuer.rfc4514_string(), not_before=cert.not_valid_before_utc,
        not_after=cert.not_valid_after_utc, template_oid=info.oid if info else None,
        template_name=template_name, major_version=info.major if info else 0,
        minor_version=info.minor if info else 0, source=source, policy_id=policy_id,
        issuer_name=issuer_name, has_key=has_key, archived=False, installed_at=now)


def write_version(store: LocalStore, key: ec.EllipticCurvePrivateKey, cert: x509.Certificate,
                  chain: list[x509.Certificate]) -> None:
    """The version folder ``LocalStore._write_version`` makes (same files and modes, no fsync:
    a fixture, not a crash-safe install)."""
    final = store.folder(thumbprint(cert))
    final.mkdir(mode=0o700)
    cert_pem, chain_pem = pem(cert).encode(), "".join(pem(c) for c in chain).encode()
    for name, data, mode in (("key.pem", private_key_pem(key), 0o600), ("cert.pem", cert_pem, 0o644),
                             ("chain.pem", chain_pem, 0o644), ("fullchain.pem", cert_pem + chain_pem, 0o644)):
        fd = os.open(final / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        try:
            os.fchmod(fd, mode)
            os.write(fd, data)
        finally:
            os.close(fd)
    os.chmod(final, 0o711)  # noqa: S103 (install() makes key folders 0711: the key itself is 0600)


def _folder_shape(folder: Path) -> list[tuple[str, int]]:
    """File names and modes of a version folder, the folder's own mode first."""
    return [(".", folder.stat().st_mode & 0o7777), *sorted((p.name, p.stat().st_mode & 0o7777)
                                                           for p in folder.iterdir())]


@dataclasses.dataclass
class BuiltStore:
    directory: Path
    authority: Authority
    templates: list[TemplatePolicy]
    servers: list[PolicyServer]
    total: int
    archived: int
    api_installs: Figure
    generate_seconds: float
    bulk_seconds: float
    rows_match: bool
    files_match: bool


def build_store(directory: Path, certs: int, n_templates: int, api_sample: int) -> BuiltStore:
    """An agent folder with ``certs`` real certificates: ``api_sample`` installed by
    ``LocalStore.install``, the rest written in bulk the same way, then older versions of each
    template archived (replaced by the next one) as renewals leave them."""
    config = AgentConfig(servers=(PolicyServerConfig(url=URL_A, trust_roots="trust/roots.pem", insecure_http=True),),
                         principal="bench.example.internal")
    directory.mkdir(parents=True)
    save_config(directory, config)
    write_credential(directory, "cpc_bench_not_a_real_credential")
    authority = make_authority()
    templates = make_templates(n_templates)
    servers = make_servers(templates)
    specs = make_specs(certs, templates)
    start = time.perf_counter()
    issued = [issue(authority, spec) for spec in specs]
    generate_seconds = time.perf_counter() - start
    chain = [authority.issuer]
    store = open_agent_store(directory, config)
    try:
        api_seconds: list[float] = []
        for spec, (key, cert) in zip(specs[:api_sample], issued[:api_sample], strict=True):
            begin = time.perf_counter()
            store.install(key=key, cert=cert, chain=chain, source=spec.source, now=NOW, policy_id=spec.policy_id,
                          issuer_name="CA-1", template_name=spec.template.name if spec.template else None)
            api_seconds.append(time.perf_counter() - begin)
        # The bulk path writes what install() wrote: compare rows and files on the sample.
        rows_match = files_match = True
        with store.engine.connect() as conn:
            for spec, (_, cert) in zip(specs[:api_sample], issued[:api_sample], strict=True):
                row = conn.execute(agent_schema.certificates.select().where(
                    agent_schema.certificates.c.thumbprint == thumbprint(cert))).one()._asdict()
                expected = certificate_row(cert, source=spec.source, policy_id=spec.policy_id, issuer_name="CA-1",
                                           template_name=spec.template.name if spec.template else None,
                                           has_key=True, now=NOW)
                rows_match &= all(row[k] == v for k, v in expected.items())
        sample_folder = store.folder(thumbprint(issued[0][1])) if api_sample else None
        start = time.perf_counter()
        rows: list[dict[str, Any]] = []
        drafts: list[EventDraft] = []
        for spec, (key, cert) in zip(specs[api_sample:], issued[api_sample:], strict=True):
            write_version(store, key, cert, chain)
            name = spec.template.name if spec.template else None
            rows.append(certificate_row(cert, source=spec.source, policy_id=spec.policy_id, issuer_name="CA-1",
                                        template_name=name, has_key=True, now=NOW))
            drafts.append(EventDraft(EventId.NEW, action="enroll", new=CertFacts.of(cert, template=name)))
        with store.engine.begin() as conn:
            if rows:
                conn.execute(agent_schema.certificates.insert(), rows)
            event_log.append(conn, drafts, now=NOW, channel=store.channel)
            # Renewals leave older versions archived, replaced by the next version of the template.
            newer: dict[str | None, str] = {}
            archived = 0
            for spec, (_, cert) in sorted(zip(specs, issued, strict=True), key=lambda p: p[0].not_after,
                                          reverse=True):
                name = spec.template.name if spec.template else None
                if spec.archived and name in newer:
                    conn.execute(agent_schema.certificates.update()
                                 .where(agent_schema.certificates.c.thumbprint == thumbprint(cert))
                                 .values(archived=True, archived_at=NOW, replaced_by=newer[name]))
                    archived += 1
                newer[name] = thumbprint(cert)
        bulk_seconds = time.perf_counter() - start
        if sample_folder is not None and len(issued) > api_sample:
            files_match = _folder_shape(sample_folder) == _folder_shape(store.folder(thumbprint(issued[api_sample][1])))
    finally:
        store.close()
    return BuiltStore(directory, authority, templates, servers, certs, archived,
                      Figure("LocalStore.install() per certificate", api_seconds or [0.0]), generate_seconds,
                      bulk_seconds, rows_match, files_match)


def bench_gather(report: Report, built: BuiltStore, runs: int) -> None:
    trust = gather.Trust(roots=(built.authority.root,), issuers={"CA-1": built.authority.issuer}, kra=())
    policies = [gather.GatheredPolicy(built.servers[0], trust), gather.GatheredPolicy(built.servers[1], trust)]
    config = AgentConfig(servers=(PolicyServerConfig(url=URL_A, trust_roots="trust/roots.pem", insecure_http=True),),
                         principal="bench.example.internal")
    store = open_agent_store(built.directory, config)
    try:
        snapshot = gather.snapshot(store, policies, NOW)
        valid = sum(c.chain_valid for c in snapshot.certificates)
        servers = [p.server for p in policies]
        result = plan(Options(), servers, snapshot, NOW)
        status_calls = sum(1 for r in store.certificates(include_archived=False)
                           if r.issuer_name is not None and r.not_after >= NOW)
        report.section("gather (real store)", certificates=built.total, archived=built.archived,
                       templates=len(built.templates), chains_valid=valid, actions=len(result.actions),
                       generate_seconds=round(built.generate_seconds, 2),
                       bulk_write_seconds=round(built.bulk_seconds, 2),
                       bulk_rows_equal_install_rows=built.rows_match, bulk_files_equal_install_files=built.files_match)
        report.figure(built.api_installs)
        report.figure(timed("LocalStore.certificates() (every row)", runs, store.certificates))
        def first_pulse() -> object:
            agent_trust._SIGNED.clear()  # as in a new process: no signature checked yet
            return gather.snapshot(store, policies, NOW)

        report.figure(timed("gather.snapshot(), first pulse of a process", runs, first_pulse))
        gather.snapshot(store, policies, NOW)
        report.figure(timed("gather.snapshot(), later pulses (daemon)", runs,
                            lambda: gather.snapshot(store, policies, NOW)))
        report.figure(timed("plan() on the gathered snapshot", runs, lambda: plan(Options(), servers, snapshot, NOW)))
        report.figure(timed("expiry_notices() on the gathered snapshot", runs,
                            lambda: expiry_notices(Options(), snapshot, NOW, handled=result.handled, warning_percent=10,
                                                   raised=store.expiry_raised())))
        report.note(f"a networked pulse also asks the CA for the status of every current, unexpired certificate "
                    f"it does not already know to be revoked (agent.revocation.refresh_revoked): {status_calls} "
                    "HTTP requests here")
        # The agent's own queries: it lists its store whole and filters in Python (the expiry
        # monitor included): no query selects by expiry.
        capture = Capture(store.engine)
        for label, call in (("LocalStore.certificates() (cert list --all, gather)", store.certificates),
                            ("LocalStore.certificates(include_archived=False) (cert list)",
                             lambda: store.certificates(include_archived=False)),
                            ("LocalStore.expiry_raised() (expiry monitor)", store.expiry_raised)):
            with capture.recording() as statements:
                call()
            for statement, parameters in statements:
                plan_lines, verdict = explain(store.engine, statement, parameters)
                report.plan(label, " ".join(statement.split()), plan_lines, verdict)
        print_plans(report)
    finally:
        store.close()


def bench_list(report: Report, built: BuiltStore, runs: int, quick: bool) -> None:
    env = {**os.environ, "COLUMNS": "200", "CERTPULSE_DIR": str(built.directory)}
    command = [sys.executable, "-m", "certpulse"]

    def run(*args: str, expect: int | None = None) -> Callable[[], None]:
        def go() -> None:
            done = subprocess.run([*command, *args], env=env, capture_output=True, check=True)
            if expect is not None:
                listed = json.loads(done.stdout)
                assert len(listed) == expect, (len(listed), expect)
        return go

    current = built.total - built.archived
    report.section("cert list (CLI process, end to end)", certificates=built.total, current=current,
                   command=" ".join(["python -m certpulse", "cert", "list", "--all", "--json"]))
    if quick:  # one process: the smoke run checks that it lists, not how fast
        report.figure(timed(f"cert list --all --json ({built.total} rows)", 1,
                            run("cert", "list", "--all", "--json", expect=built.total)))
        return
    report.figure(timed("certpulse version (start-up floor)", runs, run("version")))
    report.figure(timed(f"cert list --all --json ({built.total} rows)", runs,
                        run("cert", "list", "--all", "--json", expect=built.total)))
    report.figure(timed(f"cert list --json ({current} rows)", runs, run("cert", "list", "--json", expect=current)))
    report.figure(timed(f"cert list --all (Rich table, {built.total} rows)", runs, run("cert", "list", "--all")))


# -- the CA's database ------------------------------------------------------------------------


@contextlib.contextmanager
def pg_schema() -> Iterator[str]:
    """A schema of its own in the local PostgreSQL ``test`` database, as a URL; dropped afterwards."""
    from sqlalchemy import create_engine, text

    schema = f"cp_bench_{uuid.uuid4().hex[:10]}"
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    try:
        yield f"{PG_ADMIN_URL}?options=-csearch_path%3D{schema}"
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


def postgres_available() -> bool:
    from sqlalchemy import create_engine, text

    try:
        engine = create_engine(PG_ADMIN_URL, connect_args={"connect_timeout": 3})
        with engine.connect() as conn:
            conn.execute(text("select 1"))
        engine.dispose()
        return True
    except Exception:
        return False


REFUSALS = ("bad-csr-signature", "name-not-allowed", "forbidden", "unknown-template", "key-not-allowed")


def fill_ca(url: str, directory: Path, rows: int) -> dict[str, Any]:
    """A CA made by ``init_ca`` (so the schema is the migrations'), then ``rows`` issued
    certificates with their requests and audit rows, written in bulk."""
    from sqlalchemy import select

    from certpulse.ca.admin import CAAdmin
    from certpulse.ca.config import CADir
    from certpulse.ca.model import Caller
    from certpulse.ca.setup import init_ca, open_service
    from certpulse.ca.storage import schema as t

    ca_dir = CADir(directory)
    init_ca(ca_dir, name="bench", key_type="ec-p256", now=NOW, database_url=url)
    service = open_service(ca_dir, pool_size=2)
    admin = CAAdmin(service, Caller(kind="operator", name="bench"))
    for path in sorted((ROOT / "examples" / "templates").glob("*.toml")):
        admin.add_template(path.read_text(), NOW)
    template_names = [row.name for row in admin.templates()]
    if not template_names:
        raise SystemExit(f"no example templates under {ROOT / 'examples' / 'templates'}")
    with service.engine.connect() as conn:
        issuers = [r.id for r in conn.execute(select(t.authorities.c.id).where(t.authorities.c.role == "issuer"))]
    principals = max(10, rows // 100)
    rng = random.Random(7)
    key = ec.generate_private_key(ec.SECP256R1())
    # Every row carries a real CSR and certificate of the usual size (the same ones: only the
    # size matters to the queries).
    csr_der = x509.CertificateSigningRequestBuilder().subject_name(simple_name("host.bench.internal")).sign(
        key, hashes.SHA256()).public_bytes(serialization.Encoding.DER)
    sample = issue(make_authority(), CertSpec(0, None, NOW, NOW + YEAR, "auto", None, False, False, 0))[1]
    sample_der = sample.public_bytes(serialization.Encoding.DER)
    start_time = NOW - 3 * YEAR
    principal_rows = [dict(id=p, name=f"host-{p}.bench.internal", kind="machine", roles="", enabled=True,
                           credential_hash=secrets.token_hex(32), created_at=start_time)
                      for p in range(1, principals + 1)]
    requests: list[dict[str, Any]] = []
    certificates: list[dict[str, Any]] = []
    audit: list[dict[str, Any]] = []
    step = (3 * YEAR) / max(rows, 1)
    serials: list[str] = []
    for i in range(1, rows + 1):
        p = rng.randrange(1, principals + 1)
        name = f"host-{p}.bench.internal"
        template = template_names[i % len(template_names)]
        created = start_time + step * i
        roll = rng.random()
        status = "issued" if roll < 0.97 else "pending" if roll < 0.975 else "denied" if roll < 0.995 else "failed"
        names = json.dumps({"dns": [name]})  # as names_to_json writes them
        requests.append(dict(
            id=i, principal_id=p, requester=f"principal:{name}", template_name=template, template_major=1,
            template_minor=0, kind="new" if rng.random() < 0.5 else "renewal", csr_der=csr_der,
            subject=f"CN={name}", names=names, renewal_of=None, authority_id=issuers[i % len(issuers)], status=status,
            reason="not approved" if status == "denied" else None, created_at=created,
            decided_at=created if status != "pending" else None, decided_by=None,
            certificate_id=i if status == "issued" else None,
            idempotency_key=secrets.token_hex(16) if rng.random() < 0.9 else None))
        audit.append(dict(at=created, actor=f"principal:{name}", action=status if status != "failed" else "refused",
                          template_name=template, request_id=i, serial=None, names=json.dumps([name]),
                          reason=None, detail=None))
        if status == "issued":
            serial = serial_hex(random_serial())
            serials.append(serial)
            revoked = rng.random() < 0.02
            certificates.append(dict(
                id=i, authority_id=issuers[i % len(issuers)], serial=serial, request_id=i, principal_id=p,
                template_name=template, subject=f"CN={name}", names=names, not_before=created,
                not_after=created + YEAR, status="issued", der=sample_der, thumbprint=secrets.token_hex(20).upper(),
                revoked_at=created + 30 * DAY if revoked else None,
                revocation_reason="keyCompromise" if revoked else None, created_at=created))
            audit[-1]["serial"] = serial
        if i % 50 == 0:
            audit.append(dict(at=created, actor=f"principal:{name}", action="refused", template_name=template,
                              request_id=None, serial=None, names=None, reason=rng.choice(REFUSALS),
                              detail="refused by the bench"))
    _bulk_insert(service.engine, [(t.principals, principal_rows), (t.requests, requests),
                                  (t.certificates, certificates), (t.audit, audit)])
    service.engine.dispose()
    return {"principals": principals, "requests": len(requests), "certificates": len(certificates),
            "audit": len(audit), "serials": serials, "templates": template_names}


def _bulk_insert(engine: Any, tables: list[tuple[Any, list[dict[str, Any]]]]) -> None:
    """executemany on SQLite, COPY on PostgreSQL: values bound through the columns' own types."""
    from sqlalchemy import text

    with engine.begin() as conn:
        for table, rows in tables:
            if not rows:
                continue
            columns = [c for c in table.columns if c.name in rows[0]]
            processors = [c.type.bind_processor(engine.dialect) for c in columns]

            def convert(row: dict[str, Any], cols: list[Any] = columns,
                        procs: list[Any] = processors) -> tuple[Any, ...]:
                return tuple(proc(row[c.name]) if proc else row[c.name] for c, proc in zip(cols, procs, strict=True))

            # Table and column names come from certpulse's own schema, never from input.
            names = ", ".join(c.name for c in columns)
            raw = conn.connection.dbapi_connection
            if engine.dialect.name == "sqlite":
                cursor = raw.cursor()
                marks = ", ".join("?" for _ in columns)
                cursor.executemany(f"INSERT INTO {table.name} ({names}) VALUES ({marks})",  # noqa: S608
                                   (convert(r) for r in rows))
            else:
                with raw.cursor() as cursor, cursor.copy(f"COPY {table.name} ({names}) FROM STDIN") as copy:
                    for r in rows:
                        copy.write_row(convert(r))
            if engine.dialect.name == "postgresql" and "id" in table.columns:
                conn.execute(text(f"SELECT setval(pg_get_serial_sequence('{table.name}', 'id'), "  # noqa: S608
                                  f"(SELECT max(id) FROM {table.name}))"))
    if engine.dialect.name == "postgresql":
        # What autovacuum does to a settled database: statistics and the visibility map (which
        # index-only scans need).
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            for table, _ in tables:
                conn.execute(text(f"VACUUM ANALYZE {table.name}"))


class Capture:
    """Every statement an engine sends, with its parameters (the CA's own SQL, not a copy)."""

    def __init__(self, engine: Any) -> None:
        from sqlalchemy import event

        self.engine = engine
        self.statements: list[tuple[str, Any]] = []
        self.on = False
        event.listen(engine, "before_cursor_execute", self._record)

    def _record(self, conn: Any, cursor: Any, statement: str, parameters: Any, context: Any, many: bool) -> None:
        if self.on and not statement.lstrip().upper().startswith(("BEGIN", "COMMIT", "ROLLBACK", "SELECT 1")):
            self.statements.append((statement, parameters))

    @contextlib.contextmanager
    def recording(self) -> Iterator[list[tuple[str, Any]]]:
        self.statements = []
        self.on = True
        try:
            yield self.statements
        finally:
            self.on = False


BIG_TABLES = ("requests", "certificates", "audit", "principals", "expiry_notices")


def explain(engine: Any, statement: str, parameters: Any) -> tuple[list[str], str]:
    """The query plan of ``statement`` with its own parameters, and its :func:`verdict`."""
    raw = engine.raw_connection()
    try:
        cursor = raw.cursor()
        if engine.dialect.name == "sqlite":
            cursor.execute("EXPLAIN QUERY PLAN " + statement, parameters)
            depth: dict[int, int] = {0: -1}
            lines = []
            for node, parent, _, detail in cursor.fetchall():
                depth[node] = depth.get(parent, -1) + 1
                lines.append(f"{'  ' * depth[node]}{detail}")
        else:
            cursor.execute("EXPLAIN " + statement, parameters)
            lines = [r[0] for r in cursor.fetchall()]
        raw.rollback()
    finally:
        raw.close()
    return lines, verdict(engine.dialect.name, statement, lines)


def verdict(dialect: str, statement: str, lines: list[str]) -> str:
    """How a plan reads the big tables:

    * ``FULL TABLE SCAN``: every row of a big table (SQLite ``SCAN t``, PostgreSQL ``Seq Scan``);
    * ``key-order scan stopped by LIMIT``: the primary key walked in the order asked, no sort;
    * ``whole index, index only``: every entry of an index and no table row (an aggregate);
    * ``index only``: an index range, no table row;
    * ``indexed``: key or index lookups and ranges;
    * ``..., then sorts every match``: all the rows found are sorted before a LIMIT takes its page."""
    if dialect == "sqlite":
        scans = [line.strip() for line in lines if line.strip().startswith("SCAN ")
                 and line.strip().split()[1] in BIG_TABLES]
        table_scans = [line for line in scans if "INDEX" not in line]
        index_scans = [line for line in scans if "INDEX" in line]
        sorted_all = any("TEMP B-TREE" in line for line in lines)
        order_sort = any("TEMP B-TREE FOR ORDER BY" in line for line in lines)
        index_only = any("COVERING INDEX" in line for line in lines)
    else:
        table_scans = [line.strip() for line in lines if "Seq Scan on" in line
                       and line.split("Seq Scan on")[1].split()[0] in BIG_TABLES]
        index_scans = _whole_index_scans(lines)
        sorted_all = order_sort = any(line.strip().startswith(("Sort ", "->  Sort ")) for line in lines)
        order_sort = order_sort and " GROUP BY " not in statement.upper()
        index_only = any("Index Only Scan" in line for line in lines)
    if (table_scans or index_scans) and " LIMIT " in statement.upper() and not sorted_all:
        return "key-order scan stopped by LIMIT"
    if table_scans:
        return "FULL TABLE SCAN"
    if index_scans:
        return "whole index, index only" if index_only else "whole index"
    found = "index only" if index_only else "indexed"
    return found + ", then sorts every match" if order_sort else found


def _whole_index_scans(lines: list[str]) -> list[str]:
    """PostgreSQL index scans of a big table with no ``Index Cond``: they read the whole index."""
    found = []
    for i, line in enumerate(lines):
        if "Index" not in line or " Scan " not in line or " on " not in line:
            continue
        table = line.split(" on ")[1].split()[0]
        if table not in BIG_TABLES:
            continue
        indent = len(line) - len(line.lstrip(" ->"))
        details = []
        for later in lines[i + 1:]:
            if len(later) - len(later.lstrip(" ->")) <= indent or later.lstrip().startswith("->"):
                break
            details.append(later)
        if not any("Index Cond" in d for d in details):
            found.append(line.strip())
    return found


def bench_ca(report: Report, backend: str, rows: int, runs: int, work: Path, http_calls: int) -> None:
    from sqlalchemy import text

    from certpulse.ca.config import CADir
    from certpulse.ca.model import Caller
    from certpulse.ca.setup import open_service
    from certpulse.ca.stats import read_stats
    from certpulse.sql.db import read

    with contextlib.ExitStack() as stack:
        if backend == "postgres":
            url = stack.enter_context(pg_schema())
        else:
            url = f"sqlite:///{work / 'ca-db' / 'ca.db'}"
            (work / "ca-db").mkdir()
        start = time.perf_counter()
        filled = fill_ca(url, work / f"ca-{backend}", rows)
        fill_seconds = time.perf_counter() - start
        service = open_service(CADir(work / f"ca-{backend}"), pool_size=2)
        stack.callback(service.engine.dispose)
        with service.engine.connect() as conn:
            version = conn.execute(text("select version_num from alembic_version")).scalar()
            indexes = _indexes(conn, backend)
        report.section(f"CA database ({backend})", rows={k: v for k, v in filled.items()
                                                          if k not in ("serials", "templates")},
                       fill_seconds=round(fill_seconds, 1), alembic_revision=version,
                       analyzed="yes (VACUUM ANALYZE after the bulk load, as autovacuum would)"
                       if backend == "postgres"
                       else "no (the CA never runs ANALYZE; plans are what a real CA database gets)")
        report.note("indexes: " + "; ".join(indexes))
        operator = Caller(kind="operator", name="bench")
        serials = filled["serials"]
        rng = random.Random(11)
        capture = Capture(service.engine)
        with service.engine.connect() as conn:
            busy = conn.execute(text(
                "select principal_id from certificates group by principal_id order by count(*) desc limit 1")).scalar()
            request_id = int(conn.execute(text("select max(request_id) from certificates")).scalar_one())
        busy_caller = Caller(kind="principal", name=f"host-{busy}.bench.internal", principal_id=busy,
                             principal_kind="machine", groups=frozenset({"machines"}))
        revocable = iter(serials[len(serials) // 3:])

        def stats() -> None:
            with read(service.engine) as conn:
                read_stats(conn, NOW)

        operations: list[tuple[str, Callable[[], object]]] = [
            ("GET /v1/requests (list: the first 500 by id)", lambda: service.requests.list(operator, NOW)),
            ("GET /v1/requests?status=pending", lambda: service.requests.list(operator, NOW, "pending")),
            ("GET /v1/requests?status=issued", lambda: service.requests.list(operator, NOW, "issued")),
            ("GET /v1/requests?status=denied", lambda: service.requests.list(operator, NOW, "denied")),
            ("GET /v1/requests/{id}", lambda: service.requests.get(operator, request_id)),
            ("GET /v1/audit (newest 100)", lambda: service.audit.read(operator, NOW)),
            ("GET /v1/audit?request_id=", lambda: service.audit.read(operator, NOW, request_id=request_id)),
            ("GET /v1/certificates/{serial} (status)", lambda: service.revocation.status(rng.choice(serials), NOW)),
            ("certpulse status SERIAL --issuer",
             lambda: service.revocation.status(rng.choice(serials), NOW, "issuing-1")),
            ("POST /v1/certificates/{serial}/revoke",
             lambda: service.revocation.revoke(operator, next(revocable), "superseded", NOW)),
            ("GET /v1/policy (the caller's directory)", lambda: service.policy.document(busy_caller, NOW)),
            ("GET /metrics (read_stats: counts, valid, pending)", stats),
        ]
        for name, operation in operations:
            with capture.recording() as statements:
                operation()
            report.figure(timed(name, runs, operation))
            for statement, parameters in statements:
                if not any(f" {table}" in statement for table in BIG_TABLES):
                    continue
                plan_lines, verdict = explain(service.engine, statement, parameters)
                report.plan(name, " ".join(statement.split()), plan_lines, verdict)
        if http_calls:
            report.figure(http_status(work / f"ca-{backend}", serials, min(http_calls, len(serials)), runs))
        verdicts: dict[str, int] = {}
        for entry in report.current["plans"]:
            verdicts[entry["verdict"]] = verdicts.get(entry["verdict"], 0) + 1
        report.note(f"{len(report.current['plans'])} statements on the big tables: "
                    + ", ".join(f"{count} {verdict}" for verdict, count in sorted(verdicts.items())))
        print_plans(report)


def print_plans(report: Report) -> None:
    for entry in report.current["plans"]:
        print(f"\n  [{entry['operation']}] {entry['verdict']}\n    {_abridged(entry['sql'])}")
        for line in entry["plan"]:
            print(f"      {line}")


def http_status(ca_dir: Path, serials: list[str], calls: int, runs: int) -> Figure:
    """What the agent's revocation check costs per certificate: ``CAClient.certificate_status``
    (the agent's own client) against a real ``certpulse ca serve`` (one worker) on loopback,
    ``calls`` different serials per run; the figure is per call."""
    from certpulse.agent.client import CAClient

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "certpulse", "ca", "serve", "--dir", str(ca_dir), "--listen",
                             f"127.0.0.1:{port}", "--workers", "1", "--insecure-http"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    client = CAClient(f"http://127.0.0.1:{port}", None, verify=False, timeout=10)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if client.http.get("/healthz").status_code == 200:
                    break
            except Exception:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError("ca serve did not start") from None
                time.sleep(0.2)
        rng = random.Random(13)

        def batch() -> None:
            for serial in rng.sample(serials, calls):
                assert client.certificate_status(serial, "issuing-1") in ("good", "revoked", "expired")

        batch()  # connection and first-request warm-up
        figure = timed("", runs, batch)
        return Figure(f"HTTP GET /v1/certificates/{{serial}} via CAClient, per call ({calls}/run)",
                      [t / calls for t in figure.seconds])
    finally:
        client.close()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _abridged(sql: str) -> str:
    """The statement with its select list shortened (the plans are the point)."""
    head, sep, tail = sql.partition(" FROM ")
    if sep and len(head) > 120:
        head = head[:100] + " ..."
    return head + sep + tail


def _indexes(conn: Any, backend: str) -> list[str]:
    from sqlalchemy import text

    if backend == "sqlite":
        rows = conn.execute(text("select tbl_name, name from sqlite_master where type = 'index' "
                                 "and tbl_name in ('requests', 'certificates', 'audit') order by tbl_name, name"))
    else:
        rows = conn.execute(text("select tablename, indexname from pg_indexes where schemaname = current_schema() "
                                 "and tablename in ('requests', 'certificates', 'audit') order by 1, 2"))
    return [f"{r[0]}.{r[1]}" for r in rows]


# -- main ---------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes, a few seconds (smoke run)")
    parser.add_argument("--certs", type=int, help="certificates in the agent store (default 10000)")
    parser.add_argument("--templates", type=int, help="templates in the policy (default 500)")
    parser.add_argument("--ca-rows", type=int, help="issued certificates in the CA database (default 1000000)")
    parser.add_argument("--runs", type=int, help="repetitions of each measurement (default 5; quick 3)")
    parser.add_argument("--api-sample", type=int, help="certificates installed through LocalStore.install")
    parser.add_argument("--http-calls", type=int,
                        help="status calls per run against a real ca serve (default 200; quick 0)")
    parser.add_argument("--only", default="planner,gather,list,ca-sqlite,ca-postgres",
                        help="comma-separated sections (default: all)")
    parser.add_argument("--json", type=Path, help="also write the figures and plans to this file")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (printed)")
    args = parser.parse_args(argv)
    certs = args.certs or (200 if args.quick else 10_000)
    n_templates = args.templates or (20 if args.quick else 500)
    ca_rows = args.ca_rows or (2_000 if args.quick else 1_000_000)
    runs = max(1, args.runs or 3 if args.quick else args.runs or 5)
    api_sample = min(certs, args.api_sample if args.api_sample is not None else (10 if args.quick else 200))
    http_calls = args.http_calls if args.http_calls is not None else (0 if args.quick else 200)
    only = {s.strip() for s in args.only.split(",") if s.strip()}

    report = Report()
    print(f"certpulse scale bench: {platform.node()} ({os.cpu_count()} cores, {platform.platform()}, "
          f"Python {platform.python_version()}, SQLite {sqlite3.sqlite_version}), {NOW.isoformat()}")
    print(f"command: {' '.join([Path(sys.executable).name, *sys.argv])}")
    work = Path(tempfile.mkdtemp(prefix="certpulse-scale-"))
    try:
        if "planner" in only:
            bench_planner(report, certs, n_templates, runs)
        if only & {"gather", "list"}:
            built = build_store(work / "agent", certs, n_templates, api_sample)
            if "gather" in only:
                bench_gather(report, built, runs)
            if "list" in only:
                bench_list(report, built, runs, args.quick)
        for backend in ("sqlite", "postgres"):
            if f"ca-{backend}" not in only:
                continue
            if backend == "postgres" and not postgres_available():
                report.section("CA database (postgres)", skipped=f"no PostgreSQL at {PG_ADMIN_URL}")
                continue
            target = work / backend
            target.mkdir()
            bench_ca(report, backend, ca_rows, runs, target, http_calls if backend == "sqlite" else 0)
    finally:
        if args.keep:
            print(f"\nwork folder kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    if args.json:
        args.json.write_text(json.dumps({"machine": platform.node(), "cores": os.cpu_count(), "at": NOW.isoformat(),
                                         "argv": sys.argv, "sections": report.sections}, indent=1, default=str))
    print("\nscale bench: done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
