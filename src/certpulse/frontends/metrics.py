"""Prometheus metrics for the enrollment service: ``GET /metrics`` in the text exposition format.

Two kinds of numbers, kept apart on purpose:

* **Counts of what the CA has done** (requests by template and outcome, refusals, certificates
  issued and revoked, what waits for approval) are read from the database when Prometheus
  scrapes (:mod:`certpulse.ca.stats`). The database is shared by every worker process and
  outlives restarts, so these are right however the server is run, and cost nothing on the
  paths that issue.
* **How long submissions take** exists only inside the process that served them, so it is a
  histogram observed once per submission. ``ca serve`` may run several worker processes, each
  answering scrapes at random; prometheus_client's multiprocess mode makes each of them write
  its histograms to files in ``PROMETHEUS_MULTIPROC_DIR`` and merges all the files at scrape
  time, so any worker reports the sum over all of them. ``ca serve`` creates that folder for
  its own run; without the variable (one process, e.g. the app used in-process by tests)
  the histograms are read from this process's memory instead.

The route is unauthenticated, as Prometheus expects; it reveals counts, never names or keys.
"""

from __future__ import annotations

import logging
import os
import platform
import time
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, values
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector
from sqlalchemy.exc import SQLAlchemyError
from starlette.requests import Request
from starlette.responses import Response

from certpulse import __version__, clock
from certpulse.ca.service import CAService
from certpulse.ca.stats import CAStats
from certpulse.errors import Reason
from certpulse.frontends.problems import database_unavailable, problem

log = logging.getLogger("certpulse.api")

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

# 1 ms to 10 s: an EC issuance on an idle server takes a few milliseconds, a busy SQLite
# writer queue or an RSA key can push it to seconds, and past 10 s clients give up anyway.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

# Histograms live for the whole process (one set per process, whatever number of apps it
# creates): in multiprocess mode their values are files named by pid, and two histograms of
# one name in one process would write over each other's slots.
_PROCESS_REGISTRY = CollectorRegistry(auto_describe=True)

ISSUANCE_SECONDS = Histogram(
    "certpulse_ca_issuance_seconds",
    "Time in the request-submission handler for requests that ended in a newly issued certificate",
    buckets=LATENCY_BUCKETS, registry=_PROCESS_REGISTRY,
)
SUBMISSION_SECONDS = Histogram(
    "certpulse_ca_submission_seconds",
    "Time in the request-submission handler for submissions that did not issue, by outcome "
    "(pending, replayed, refused, unavailable, error); issued ones are certpulse_ca_issuance_seconds",
    ["outcome"], buckets=LATENCY_BUCKETS, registry=_PROCESS_REGISTRY,
)


def observe_submission(outcome: str, started: float) -> None:
    """Record one submission's time in the handler, ``started`` from :func:`time.perf_counter`.

    Exactly one observation per submission, in memory or a shared-memory file: the hot path
    pays for no database query and no lock beyond the histogram's own.
    """
    elapsed = time.perf_counter() - started
    if outcome == "issued":
        ISSUANCE_SECONDS.observe(elapsed)
    else:
        SUBMISSION_SECONDS.labels(outcome).observe(elapsed)


# Load shedding (frontends/shedding.py): what each worker has in progress, and what it refused.
REQUESTS_SHED = Counter(
    "certpulse_ca_requests_shed",
    "Requests answered 503 with Retry-After, before any work, because their worker already had its limit "
    "(ca serve --max-inflight) of requests in progress",
    registry=_PROCESS_REGISTRY,
)
REQUESTS_INFLIGHT = Gauge(
    "certpulse_ca_requests_inflight", "Requests in progress now, over all workers (the probes and /metrics excluded)",
    registry=_PROCESS_REGISTRY, multiprocess_mode="livesum",
)
REQUESTS_INFLIGHT_PEAK = Gauge(
    "certpulse_ca_requests_inflight_peak",
    "The most requests one worker has had in progress at once since the server started",
    registry=_PROCESS_REGISTRY, multiprocess_mode="max",
)
INFLIGHT_LIMIT = Gauge(
    "certpulse_ca_requests_inflight_limit",
    "Requests one worker takes at once before it sheds (ca serve --max-inflight)",
    registry=_PROCESS_REGISTRY, multiprocess_mode="max",
)
MEASURED_CAPACITY = Gauge(
    "certpulse_ca_measured_capacity",
    "Requests per second the workers complete with every handler thread busy, as each last measured "
    "it; shed clients are given Retry-After turns from it (0 until a worker has been saturated for half "
    "a second)",
    registry=_PROCESS_REGISTRY, multiprocess_mode="livesum",
)
WORKER_THREADS = Gauge(
    "certpulse_ca_worker_threads",
    "Blocking handlers one worker runs at once: its thread pool (ca serve --threads)",
    registry=_PROCESS_REGISTRY, multiprocess_mode="max",
)


ANONYMOUS_REFUSALS = Counter(
    "certpulse_ca_anonymous_refusals",
    "Refusals of callers with no valid credential, every one, by the refused action and the reason "
    "(unauthenticated, token-invalid, malformed-request, body-too-large, request-timeout, ...). The "
    "audit log keeps only a sample of these (certpulse_ca_refusals_total counts its rows)",
    ["action", "reason"], registry=_PROCESS_REGISTRY,
)


# The OCSP responder (frontends/ocsp_route.py): every answer, by what it said and where it came from.
OCSP_RESPONSES = Counter(
    "certpulse_ocsp_responses",
    "OCSP answers by status (good, revoked, unknown, or the refusal: unauthorized, malformedRequest, "
    "tryLater, internalError) and source: cache (the signed answer kept in memory), memory (signed now "
    "from the status kept in memory: a nonce), database (the status read, or a refusal)",
    ["status", "source"], registry=_PROCESS_REGISTRY,
)


# The ACME server (frontends/acme/): every request, by operation (newOrder, finalize, ...) and
# outcome (ok, or the ACME error type it was refused with: badNonce, malformed, ...).
ACME_REQUESTS = Counter(
    "certpulse_acme_requests",
    "ACME requests by operation (directory, newNonce, newAccount, newOrder, finalize, challenge, ...) and "
    "outcome: ok, or the ACME error type of the refusal (badNonce, malformed, unauthorized, rateLimited, ...)",
    ["operation", "outcome"], registry=_PROCESS_REGISTRY,
)
ACME_SECONDS = Histogram(
    "certpulse_acme_request_seconds",
    "Time an ACME request took in this server, from its body read to its answer, by operation",
    ["operation"], buckets=LATENCY_BUCKETS, registry=_PROCESS_REGISTRY,
)
_acme_children: dict[tuple[str, str], Any] = {}
_acme_timers: dict[str, Any] = {}


def observe_acme(operation: str, outcome: str, started: float) -> None:
    """One ACME request answered, ``started`` from :func:`time.perf_counter` (label children are
    kept: looking them up on every request would cost more than counting)."""
    counter = _acme_children.get((operation, outcome))
    if counter is None:
        counter = _acme_children[(operation, outcome)] = ACME_REQUESTS.labels(operation, outcome)
    timer = _acme_timers.get(operation)
    if timer is None:
        timer = _acme_timers[operation] = ACME_SECONDS.labels(operation)
    counter.inc()
    timer.observe(time.perf_counter() - started)


def ocsp_counter(status: str, source: str) -> Any:
    """The counter child of one (status, source), for the route to keep: ``labels()`` on every
    answer would cost more than the rest of a cached answer's bookkeeping."""
    return OCSP_RESPONSES.labels(status, source)


def observe_anonymous_refusal(action: str, reason: str) -> None:
    ANONYMOUS_REFUSALS.labels(action, reason).inc()


def observe_shed() -> None:
    REQUESTS_SHED.inc()


def observe_inflight(change: int) -> None:
    """A request started (+1) or ended (-1)."""
    REQUESTS_INFLIGHT.inc(change)


def observe_inflight_peak(peak: int) -> None:
    """This worker has just had more requests in progress at once than ever before."""
    REQUESTS_INFLIGHT_PEAK.set(peak)


def set_inflight_limit(limit: int) -> None:
    INFLIGHT_LIMIT.set(limit)


def set_measured_capacity(requests_per_second: float) -> None:
    MEASURED_CAPACITY.set(requests_per_second)


def set_worker_threads(threads: int) -> None:
    WORKER_THREADS.set(threads)


def multiprocess_mode() -> bool:
    """Whether this process's histograms write to ``PROMETHEUS_MULTIPROC_DIR``.

    Decided by prometheus_client when it was first imported, so we ask it rather than read
    the variable again: if the two disagreed, a scrape would read files nobody writes.
    """
    return values.ValueClass is not values.MutexValue


class _Families(Collector):
    """The families computed from one database reading, plus build information."""

    def __init__(self, stats: CAStats, query_seconds: float) -> None:
        self.stats = stats
        self.query_seconds = query_seconds

    def collect(self) -> Iterator[Metric]:
        s = self.stats
        build = GaugeMetricFamily("certpulse_ca_build_info", "certpulse version and Python running this server",
                                  labels=["version", "python"])
        build.add_metric([__version__, platform.python_version()], 1)
        yield build

        requests = CounterMetricFamily(
            "certpulse_ca_requests_total",
            "Certificate requests by template and outcome: issued (directly or after approval), denied, "
            "failed, and refused (never recorded as a request; template '(unknown)' when it named none "
            "this CA has). Requests awaiting approval are certpulse_ca_requests_pending.",
            labels=["template", "outcome"])
        outcomes: dict[tuple[str, str], int] = {(name, o): 0 for name in s.templates
                                               for o in ("issued", "denied", "refused")}
        outcomes.update(s.requests)
        for name, count in s.refused.items():
            outcomes[(name, "refused")] = count
        for (name, outcome), count in sorted(outcomes.items()):
            requests.add_metric([name, outcome], count)
        yield requests

        pending = GaugeMetricFamily("certpulse_ca_requests_pending",
                                    "Requests waiting for a CA manager's approval, by template", labels=["template"])
        for name in sorted({*s.templates, *s.pending}):
            pending.add_metric([name], s.pending.get(name, 0))
        yield pending
        yield GaugeMetricFamily("certpulse_ca_oldest_pending_request_age_seconds",
                                "How long the oldest pending request has waited (0 when none waits)",
                                value=s.oldest_pending_age)

        refusals = CounterMetricFamily(
            "certpulse_ca_refusals_total",
            "Every refusal the CA audited, by the refused action and the reason (e.g. unauthenticated, "
            "refused with bad-csr-signature, malformed). Anonymous refusals are audited sampled: "
            "certpulse_ca_anonymous_refusals_total counts all of them", labels=["action", "reason"])
        for (action, reason), count in sorted(s.refusals.items()):
            refusals.add_metric([action, reason], count)
        yield refusals

        issued = CounterMetricFamily("certpulse_ca_certificates_issued_total",
                                     "Certificates signed, by issuing CA and template", labels=["issuer", "template"])
        valid = GaugeMetricFamily("certpulse_ca_certificates_valid",
                                  "Issued certificates neither expired nor revoked, by issuing CA and template",
                                  labels=["issuer", "template"])
        revoked = CounterMetricFamily("certpulse_ca_certificates_revoked_total",
                                      "Certificates revoked, by issuing CA, template and revocation reason",
                                      labels=["issuer", "template", "reason"])
        for (issuer, template), counts in sorted(s.certificates.items()):
            issued.add_metric([issuer, template], counts.issued)
            valid.add_metric([issuer, template], counts.valid)
            for reason, count in sorted(counts.revoked.items()):
                revoked.add_metric([issuer, template, reason], count)
        yield from (issued, valid, revoked)

        expiry = GaugeMetricFamily("certpulse_ca_authority_not_after_timestamp_seconds",
                                   "When each authority's certificate (root, issuers, KRA) expires, Unix time",
                                   labels=["authority", "role"])
        for name, role, not_after in s.authorities:
            expiry.add_metric([name, role], not_after.timestamp())
        yield expiry

        yield GaugeMetricFamily("certpulse_ca_metrics_query_seconds",
                                "Time the database queries of this scrape took (they grow with the tables)",
                                value=self.query_seconds)


def render(service: CAService, accept: str | None) -> Response:
    """The exposition for one scrape; a 503 problem (never a 500) when the database fails."""
    started = time.perf_counter()
    try:
        stats = service.stats(clock.now())
    except SQLAlchemyError as exc:
        log.error("metrics: database unavailable: %s", exc)
        return database_unavailable(f"metrics need the certificate database, which failed: {type(exc).__name__}")
    registry = CollectorRegistry(auto_describe=False)
    if multiprocess_mode():
        folder = os.environ.get(MULTIPROC_ENV, "")
        if not os.path.isdir(folder):  # removed under a running server: say so, do not crash
            return problem(Reason.UNAVAILABLE, f"the metrics folder {MULTIPROC_ENV}={folder!r} is missing",
                           status=503)
        MultiProcessCollector(registry, path=folder)  # type: ignore[no-untyped-call]  # untyped upstream
    else:
        registry.register(_ProcessHistograms())
    registry.register(_Families(stats, time.perf_counter() - started))
    encoder, content_type = choose_encoder(accept or "")
    try:
        body = encoder(registry)
    except Exception:  # e.g. a worker's histogram file unreadable: a scrape fails, the server does not
        log.exception("metrics: cannot render the exposition")
        return problem(Reason.UNAVAILABLE, "metrics could not be rendered; see the server log", status=503)
    return Response(body, media_type=content_type)


class _ProcessHistograms(Collector):
    """This process's histograms, when they live in memory (single-process mode)."""

    def collect(self) -> Iterator[Metric]:
        return iter(_PROCESS_REGISTRY.collect())


METRICS_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"description": "Prometheus text exposition (OpenMetrics when the Accept header asks for it)",
          "content": {"text/plain; version=0.0.4": {"schema": {"type": "string"}}}},
    503: {"description": "The certificate database is unavailable", "content": {"application/problem+json": {}}},
}


def metrics_endpoint(request: Request) -> Response:
    """The handler behind ``GET /metrics`` (mounted by :func:`certpulse.frontends.http.create_app`)."""
    service: CAService = request.app.state.service
    return render(service, request.headers.get("accept"))
