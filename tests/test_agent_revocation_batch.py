"""The agent asks each CA about its certificates' revocation once per pulse, not once per
certificate: against a real ``certpulse ca serve``, with the HTTP calls counted; a CA without the
batch routes is asked one certificate at a time; hostile batch answers revoke nothing."""

from __future__ import annotations

import dataclasses
import datetime as dt
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

from certpulse.agent.client import CAClient, ServerUnavailable
from certpulse.agent.revocation import STATE, refresh_revoked
from certpulse.ca.admin import CAAdmin
from certpulse.ca.config import CADir
from certpulse.ca.model import Caller, EnrollmentRequest
from certpulse.ca.results import Issued
from certpulse.ca.service import CAService
from certpulse.ca.setup import init_ca, open_service
from certpulse.machine.certstore import LocalStore
from support import CA, TEMPLATES, load_cert, make_csr, serve

OWN = 12  # certificates issued to the agent's principal
OTHERS = 2  # issued to another principal and installed on the same machine (asked by serial)
STATUS_ROUTE = "/v1/certificates/status"


class Counting(httpx.BaseTransport):
    """The real network, every call written down; ``answer`` may answer a call instead."""

    def __init__(self, answer: Callable[[httpx.Request], httpx.Response | None] | None = None) -> None:
        self.inner = httpx.HTTPTransport()
        self.answer = answer
        self.calls: list[tuple[str, str]] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        self.calls.append((request.method, request.url.path))
        if self.answer is not None:
            answered = self.answer(request)
            if answered is not None:
                return answered
        return self.inner.handle_request(request)


@dataclasses.dataclass
class Stocked:
    store: LocalStore
    server: str
    credential: str
    revoked: set[str]  # thumbprints the CA revoked

    def refresh(self, transport: httpx.BaseTransport, *, batch: bool = True) -> frozenset[str]:
        self.store.set_state(STATE, [])  # forget what an earlier test learnt
        client = CAClient(self.server, self.credential, verify=False, transport=transport, deadline=30)
        try:
            return refresh_revoked(self.store, {self.server: client}, [], dt.datetime.now(dt.UTC), batch=batch)
        finally:
            client.close()


def _install(store: LocalStore, service: CAService, who: Caller, server: str) -> tuple[str, str]:
    """One certificate issued by the CA's core (the quick way: no HTTP) and installed as the agent
    installs it; (thumbprint, serial)."""
    key, csr = make_csr()
    issued = service.requests.submit(who, EnrollmentRequest(template="machine", csr=csr.encode()), _now())
    assert isinstance(issued, Issued), issued
    record = store.install(key=key, cert=load_cert(issued.certificate), chain=[load_cert(c) for c in issued.chain],
                           source="auto", now=_now(), issuer_name="issuing-1", policy_url=server)
    return record.thumbprint, issued.serial


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


@pytest.fixture(scope="module")
def stocked(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stocked]:
    """A CA made in this process (quicker than its CLI), an agent store holding OWN certificates
    of one principal and OTHERS of another, one of each revoked; the CA served over loopback."""
    work = tmp_path_factory.mktemp("batch")
    ca_dir = CADir(work / "ca")
    admin_key = init_ca(ca_dir, name="batch", key_type="ec-p256", now=_now())
    service = open_service(ca_dir, pool_size=1)
    admin = CAAdmin(service, Caller(kind="operator", name="test"))
    admin.add_template((TEMPLATES / "machine.toml").read_text(), _now())
    credentials = [service.auth.exchange_token(admin.add_principal(
        f"{who}-{uuid.uuid4().hex[:8]}.example.internal", "machine", _now())["token"], _now()).credential
                   for who in ("agent", "other")]
    mine, other = (service.auth.authenticate(c, _now()) for c in credentials)
    store = LocalStore(work / "store")
    ca = CA(ca_dir.root, admin_key, service.engine.url.render_as_string(hide_password=False))
    with serve(ca) as server:
        own = [_install(store, service, mine, server) for _ in range(OWN)]
        copied = [_install(store, service, other, server) for _ in range(OTHERS)]
        revoked: set[str] = set()
        for (thumbprint, serial), reason in ((own[3], "keyCompromise"), (copied[1], "superseded")):
            service.revocation.revoke(Caller(kind="operator", name="test"), serial, reason, _now())
            revoked.add(thumbprint)
        service.engine.dispose()
        yield Stocked(store, server, credentials[0], revoked)
    store.close()


def test_one_call_for_the_principals_certificates_and_one_for_the_others(stocked: Stocked) -> None:
    batched = Counting()
    assert stocked.refresh(batched) == stocked.revoked
    # OWN + OTHERS certificates: one GET answers for the principal's own, one POST for the copied ones.
    assert batched.calls == [("GET", STATUS_ROUTE), ("POST", STATUS_ROUTE)]

    one_by_one = Counting()  # the path a CA without the batch routes gets: the same answer, N calls
    assert stocked.refresh(one_by_one, batch=False) == stocked.revoked
    assert len(one_by_one.calls) == OWN + OTHERS
    assert all(method == "GET" and path.startswith("/v1/certificates/") for method, path in one_by_one.calls)
    assert set(stocked.store.get_state(STATE)) == stocked.revoked  # remembered in the store


def test_a_ca_without_the_batch_routes_is_asked_one_certificate_at_a_time(stocked: Stocked) -> None:
    def older_ca(request: httpx.Request) -> httpx.Response | None:
        """What the CA before the batch routes answered them (GET: "status" read as a serial)."""
        if request.url.path != STATUS_ROUTE:
            return None
        if request.method == "GET":
            return httpx.Response(400, json={"reason": "invalid-argument", "detail": "'status' is not a serial"})
        return httpx.Response(405, json={"reason": "not-found", "detail": "Method Not Allowed"})

    older = Counting(older_ca)
    assert stocked.refresh(older) == stocked.revoked
    assert older.calls[0] == ("GET", STATUS_ROUTE) and len(older.calls) == 1 + OWN + OTHERS

    def post_missing(request: httpx.Request) -> httpx.Response | None:
        if request.url.path == STATUS_ROUTE and request.method == "POST":
            return httpx.Response(404, json={"reason": "not-found", "detail": "Not Found"})
        return None

    # Only the POST missing: the GET's answer stands, the copied certificates are asked one by one.
    half = Counting(post_missing)
    assert stocked.refresh(half) == stocked.revoked
    assert half.calls[:2] == [("GET", STATUS_ROUTE), ("POST", STATUS_ROUTE)] and len(half.calls) == 2 + OTHERS


def test_an_unreachable_ca_is_asked_once_and_ignored(stocked: Stocked) -> None:
    def offline(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    down = Counting(offline)
    assert stocked.refresh(down) == frozenset()
    assert down.calls == [("GET", STATUS_ROUTE)]


def _answers(entries: Any, **extra: Any) -> dict[str, Any]:
    return {"certificates": entries, **extra}


def _entry(serial: str = "1a2b", status: str = "revoked", **extra: Any) -> dict[str, Any]:
    return {"serial": serial, "issuer": "issuing-1", "status": status, "revoked_at": None,
            "revocation_reason": "keyCompromise", "not_after": None, **extra}


HOSTILE: dict[str, Any] = {
    "not an object": ["revoked"],
    "no list": {"certificates": {"1a2b": "revoked"}},
    "status spelt otherwise": _answers([_entry(status="REVOKED")]),
    "serial as a path": _answers([_entry(serial="../../etc/passwd")]),
    "serial too long": _answers([_entry(serial="f" * 41)]),
    "issuer not text": _answers([_entry(issuer=["issuing-1"])]),
    "issuer too long": _answers([_entry(issuer="i" * 65)]),
    "too many entries": _answers([_entry(serial=f"{i:x}") for i in range(1, 10_002)]),
    "cursor not text": _answers([_entry()], next=5),
    "cursor with a path": _answers([_entry()], next="../x"),
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_batch_answers_are_refused_and_revoke_nothing(name: str, stocked: Stocked) -> None:
    def hostile(request: httpx.Request) -> httpx.Response | None:
        return httpx.Response(200, json=HOSTILE[name]) if request.url.path == STATUS_ROUTE else None

    with pytest.raises(ServerUnavailable):
        CAClient(stocked.server, None, verify=False, transport=httpx.MockTransport(hostile)).own_statuses()
    lying = Counting(hostile)
    assert stocked.refresh(lying) == frozenset()  # a wrong shape is an unavailable CA: nothing learnt
    assert lying.calls == [("GET", STATUS_ROUTE)]


def test_pages_are_followed_by_their_cursor(stocked: Stocked) -> None:
    asked: list[str | None] = []

    def paged(request: httpx.Request) -> httpx.Response:
        after = request.url.params.get("after")
        asked.append(after)
        if after is None:
            return httpx.Response(200, json=_answers([_entry(serial="a1", status="good")], next="17"))
        return httpx.Response(200, json=_answers([_entry(serial="a2")]))

    answers = CAClient(stocked.server, None, verify=False, transport=httpx.MockTransport(paged)).own_statuses()
    assert [(a.serial, a.status) for a in answers] == [("a1", "good"), ("a2", "revoked")] and asked == [None, "17"]


def test_pages_that_loop_are_cut_short(stocked: Stocked) -> None:
    pages: list[str | None] = []

    def looping(request: httpx.Request) -> httpx.Response:
        pages.append(request.url.params.get("after"))
        return httpx.Response(200, json=_answers([_entry(serial=f"{len(pages):x}", status="good")], next="7"))

    with pytest.raises(ServerUnavailable, match="loop"):
        CAClient(stocked.server, None, verify=False, transport=httpx.MockTransport(looping)).own_statuses()
    assert pages == [None, "7"]


def test_a_batch_answer_about_certificates_not_asked_revokes_nothing(stocked: Stocked) -> None:
    def boasting(request: httpx.Request) -> httpx.Response | None:
        if request.url.path != STATUS_ROUTE:
            return None
        # every serial revoked, but none of this store's (and the copied ones' POST answers "unknown")
        if request.method == "GET":
            return httpx.Response(200, json=_answers([_entry(serial=f"{i:x}") for i in range(1, 50)]))
        return httpx.Response(200, json=_answers([_entry(serial="abc", status="unknown")]))

    assert stocked.refresh(Counting(boasting)) == frozenset()

