"""``GET /metrics`` of a real ``certpulse ca serve``: counts read from the database, latency
histograms summed over every worker process, the multiprocess folder's lifecycle, and a 503
problem (never a 500) when the database is gone.

Counts are compared before and after each test's own actions (the CA is shared by the module),
except the histograms of a server a test starts itself, which must start from zero.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import glob
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.parser import text_string_to_metric_families

from certpulse.ca.config import CADir
from certpulse.ca.service import CAService
from certpulse.ca.setup import open_service
from certpulse.ca.state import KeyRing
from certpulse.frontends.http import create_app
from certpulse.frontends.metrics import multiprocess_mode
from certpulse.sql.db import make_engine
from support import CA, Client, assert_problem, make_csr, run_cli, serve

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> Samples:
    """Every sample of an exposition, keyed by sample name and labels."""
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def scrape(base: str) -> Samples:
    response = httpx.get(f"{base}/metrics", timeout=30)  # no credential: the route is open
    assert response.status_code == 200, response.text
    return parse(response.text)


def value(samples: Samples, name: str, **labels: str) -> float:
    """One sample's value; 0 when the series is absent (nothing counted yet)."""
    return samples.get((name, frozenset(labels.items())), 0.0)


def delta(before: Samples, after: Samples, name: str, **labels: str) -> float:
    return value(after, name, **labels) - value(before, name, **labels)


def new_client(ca: CA, base: str, prefix: str) -> Client:
    return Client.enrolled(base, ca.add_principal(f"{prefix}-{uuid.uuid4().hex[:8]}.example.internal"))


def issue(clients: list[Client], count: int) -> None:
    """``count`` machine certificates, eight submissions at a time, each on a new connection: a
    kept-alive connection stays with the worker that accepted it, so reused ones could leave
    the other worker idle."""
    csrs = [make_csr()[1] for _ in range(count)]

    def submit(index: int) -> httpx.Response:
        client = clients[index % len(clients)].http
        return httpx.post(str(client.base_url.join("/v1/requests")), json={"template": "machine", "csr": csrs[index]},
                          headers={"Authorization": client.headers["Authorization"]}, timeout=30)

    with ThreadPoolExecutor(max_workers=8) as pool:
        responses = list(pool.map(submit, range(count)))
    assert [r.status_code for r in responses] == [201] * count, [r.text for r in responses if r.status_code != 201]


def histogram_count_by_process(folder: Path, name: str) -> dict[str, float]:
    """Observations of one histogram in each worker's file (``histogram_PID.db``)."""
    counts: dict[str, float] = {}
    for path in glob.glob(str(folder / "histogram_*.db")):
        for metric in MultiProcessCollector.merge([path], accumulate=True):  # type: ignore[no-untyped-call]
            for sample in metric.samples:
                if sample.name == f"{name}_count" and not sample.labels:
                    counts[Path(path).stem] = sample.value
    return counts


# -- counts from the database, one worker ---------------------------------------------------

def test_metrics_count_requests_by_template_and_outcome(ca: CA, server: str, admin: Client) -> None:
    before = scrape(server)
    client = new_client(ca, server, "metrics")
    issued = 3
    serials = [client.enroll("machine")[1]["serial"] for _ in range(issued)]
    pending_ids = []
    for _ in range(2):
        response = client.submit("approval-required", make_csr()[1])
        assert response.status_code == 202, response.text
        pending_ids.append(response.json()["id"])
    denied = admin.http.post(f"/v1/requests/{pending_ids[0]}/deny", json={"reason": "not this one"})
    assert denied.status_code == 200, denied.text
    assert_problem(client.submit("machine", "not a CSR"), 400, "malformed-csr")
    assert_problem(client.submit("no-such-template-here", make_csr()[1]), 400, "unknown-template")
    revoked = admin.http.post(f"/v1/certificates/{serials[0]}/revoke", json={"reason": "keyCompromise"})
    assert revoked.status_code == 200, revoked.text
    after = scrape(server)

    assert delta(before, after, "certpulse_ca_requests_total", template="machine", outcome="issued") == issued
    assert delta(before, after, "certpulse_ca_requests_total", template="approval-required", outcome="denied") == 1
    assert delta(before, after, "certpulse_ca_requests_pending", template="approval-required") == 1
    assert delta(before, after, "certpulse_ca_requests_total", template="machine", outcome="refused") == 1
    assert delta(before, after, "certpulse_ca_requests_total", template="(unknown)", outcome="refused") == 1
    assert value(after, "certpulse_ca_oldest_pending_request_age_seconds") >= 0
    assert delta(before, after, "certpulse_ca_refusals_total", action="refused", reason="malformed-csr") == 1
    assert delta(before, after, "certpulse_ca_refusals_total", action="refused", reason="unknown-template") == 1

    assert delta(before, after, "certpulse_ca_issuance_seconds_count") == issued
    assert delta(before, after, "certpulse_ca_issuance_seconds_bucket", le="+Inf") == issued
    assert delta(before, after, "certpulse_ca_issuance_seconds_sum") > 0
    assert delta(before, after, "certpulse_ca_submission_seconds_count", outcome="pending") == 2
    assert delta(before, after, "certpulse_ca_submission_seconds_count", outcome="refused") == 2

    certs = {"issuer": "issuing-1", "template": "machine"}
    assert delta(before, after, "certpulse_ca_certificates_issued_total", **certs) == issued
    assert delta(before, after, "certpulse_ca_certificates_valid", **certs) == issued - 1
    assert delta(before, after, "certpulse_ca_certificates_revoked_total", **certs, reason="keyCompromise") == 1
    assert value(after, "certpulse_ca_authority_not_after_timestamp_seconds", authority="root", role="root") > (
        dt.datetime.now(dt.UTC).timestamp())

    # Approving the other pending request moves it from the gauge to the issued outcome; the
    # issuance histogram times submissions only, so it does not move.
    approved = admin.http.post(f"/v1/requests/{pending_ids[1]}/approve")
    assert approved.status_code == 200, approved.text
    final = scrape(server)
    assert delta(after, final, "certpulse_ca_requests_pending", template="approval-required") == -1
    assert delta(after, final, "certpulse_ca_requests_total", template="approval-required", outcome="issued") == 1
    assert delta(after, final, "certpulse_ca_issuance_seconds_count") == 0


def test_metrics_is_open_prometheus_text_and_documented(server: str) -> None:
    response = httpx.get(f"{server}/metrics", timeout=30)
    assert response.status_code == 200, response.text
    content_type = response.headers["content-type"]
    assert content_type.startswith("text/plain") and "version=0.0.4" in content_type, content_type
    samples = parse(response.text)
    assert any(name == "certpulse_ca_build_info" for name, _ in samples)
    assert ("certpulse_ca_issuance_seconds_bucket", frozenset({("le", "0.001")})) in samples
    assert ("certpulse_ca_issuance_seconds_bucket", frozenset({("le", "10.0")})) in samples

    openmetrics = httpx.get(f"{server}/metrics", timeout=30,
                            headers={"Accept": "application/openmetrics-text; version=1.0.0"})
    assert openmetrics.headers["content-type"].startswith("application/openmetrics-text"), openmetrics.headers
    assert openmetrics.text.endswith("# EOF\n")

    spec = httpx.get(f"{server}/openapi.json", timeout=30).json()
    operation = spec["paths"]["/metrics"]["get"]
    assert "security" not in operation and operation["summary"]
    assert any(kind.startswith("text/plain") for kind in operation["responses"]["200"]["content"])


# -- several workers -------------------------------------------------------------------------

def test_histograms_sum_over_two_workers_and_the_folder_is_private_and_removed(
        ca: CA, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    temp = tmp_path / "tmp"
    temp.mkdir()
    monkeypatch.setenv("TMPDIR", str(temp))  # where ca serve makes its metrics folder
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    with serve(ca, "--workers", "2") as base:
        folders = list(temp.glob("certpulse-metrics-*"))
        assert len(folders) == 1, folders
        assert folders[0].stat().st_mode & 0o777 == 0o700
        start = scrape(base)
        assert value(start, "certpulse_ca_issuance_seconds_count") == 0  # a fresh folder per run
        clients = [new_client(ca, base, f"w{i}") for i in range(4)]
        issued = 0
        while True:  # until both workers have issued some (the kernel picks who accepts)
            issue(clients, 8)
            issued += 8
            per_process = histogram_count_by_process(folders[0], "certpulse_ca_issuance_seconds")
            if sum(1 for count in per_process.values() if count > 0) >= 2 or issued >= 96:
                break
        assert sum(1 for count in per_process.values() if count > 0) >= 2, per_process
        assert sum(per_process.values()) == issued
        for _ in range(6):  # whichever worker answers reports the sum over both
            samples = scrape(base)
            assert value(samples, "certpulse_ca_issuance_seconds_count") == issued
            assert value(samples, "certpulse_ca_issuance_seconds_bucket", le="+Inf") == issued
            assert delta(start, samples, "certpulse_ca_requests_total", template="machine", outcome="issued") == issued
    assert list(temp.iterdir()) == []  # removed when the server stopped


def test_an_operator_metrics_folder_is_used_and_kept(ca: CA, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    missing = tmp_path / "missing"
    refused = run_cli("ca", "serve", "--dir", str(ca.dir), "--listen", "127.0.0.1:1", check=False,
                      env={"PROMETHEUS_MULTIPROC_DIR": str(missing)})
    assert refused.returncode == 2 and "invalid-argument" in refused.stderr, refused.stderr

    folder = tmp_path / "prometheus"
    folder.mkdir()
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(folder))
    with serve(ca) as base:
        new_client(ca, base, "own").enroll("machine")
        assert value(scrape(base), "certpulse_ca_issuance_seconds_count") == 1
        assert list(folder.glob("histogram_*.db"))
    assert list(folder.glob("histogram_*.db"))  # the operator's folder is theirs to empty


# -- in process, without multiprocess mode ----------------------------------------------------

def in_process(app: Any, method: str, path: str, **kwargs: Any) -> httpx.Response:
    """One request to the app in this process (no server, no worker processes)."""
    async def call() -> httpx.Response:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://ca") as client:
            return await client.request(method, path, **kwargs)

    return asyncio.run(call())


def test_in_process_app_keeps_histograms_in_memory(ca: CA, server: str) -> None:
    assert not multiprocess_mode(), "run the tests without PROMETHEUS_MULTIPROC_DIR"
    credential = new_client(ca, server, "inproc").http.headers["Authorization"]
    service = open_service(CADir(ca.dir), pool_size=1)
    try:
        app = create_app(service)
        before = parse(in_process(app, "GET", "/metrics").text)
        response = in_process(app, "POST", "/v1/requests", json={"template": "machine", "csr": make_csr()[1]},
                              headers={"Authorization": credential})
        assert response.status_code == 201, response.text
        after = parse(in_process(app, "GET", "/metrics").text)
    finally:
        service.engine.dispose()
    assert delta(before, after, "certpulse_ca_issuance_seconds_count") == 1
    assert delta(before, after, "certpulse_ca_requests_total", template="machine", outcome="issued") == 1


def test_unreachable_database_is_a_503_problem(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'no-such-folder' / 'ca.db'}", pool_size=1)
    service = CAService(engine, KeyRing(tmp_path), policy_id="none", token_lifetime=dt.timedelta(hours=1))
    try:
        response = in_process(create_app(service), "GET", "/metrics")
    finally:
        engine.dispose()
    assert_problem(response, 503, "unavailable")
