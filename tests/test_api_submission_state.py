"""A submission is decided before its write transaction (on the cached state snapshot and a
caller remembered by credential) and only recorded in it: whatever changes in between is seen.

The write transaction confirms the state generation, the caller's credential and groups, and what
the database says of presented certificates; anything that moved is decided again on the
database as it is. These tests change each of them between the two steps, in process (the
decision step wrapped), and over HTTP against a worker that remembers the caller.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from certpulse.ca.config import CADir
from certpulse.ca.model import Caller, EnrollmentRequest, Evidence
from certpulse.ca.results import Issued
from certpulse.ca.service import CAService
from certpulse.ca.setup import open_service
from certpulse.errors import Reason, Refusal
from certpulse.pki import template_info
from support import CA, TEMPLATES, Client, assert_problem, csr_der, load_cert, make_csr, renewal_evidence

OPERATOR = Caller(kind="operator", name="test")


@pytest.fixture
def service(ca: CA) -> Iterator[CAService]:
    service = open_service(CADir(ca.dir))
    try:
        yield service
    finally:
        service.engine.dispose()


def principal(ca: CA, server: str, *extra: str) -> tuple[str, str]:
    """A new machine principal's name and credential (exchanged over HTTP)."""
    name = f"state-{uuid.uuid4().hex[:8]}.example.internal"
    return name, Client.enrolled(server, ca.add_principal(name, *extra)).http.headers["Authorization"][7:]


def between(service: CAService, change: Callable[[], None]) -> None:
    """Run ``change`` after the next submission's decision and before its write transaction."""
    ra = service.requests
    decide = ra._decide_ahead

    def decide_then_change(*args: Any) -> Any:
        ahead = decide(*args)
        assert ahead is not None, "the decision ahead refused; the test would prove nothing"
        ra._decide_ahead = decide  # type: ignore[method-assign]
        change()
        return ahead

    ra._decide_ahead = decide_then_change  # type: ignore[method-assign]


def authenticate(service: CAService, credential: str) -> Caller:
    """The caller as a submission authenticates it: remembered by this process."""
    return service.auth.authenticate(credential, now(), remembered=True)


def issued(service: CAService, caller: Caller, req: EnrollmentRequest) -> Issued:
    result = service.requests.submit(caller, req, now())
    assert isinstance(result, Issued), result
    return result


def new_request(template: str = "machine", **csr: Any) -> EnrollmentRequest:
    return EnrollmentRequest(template=template, csr=make_csr(**csr)[1].encode())


def now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def test_a_credential_replaced_after_the_decision_is_refused(ca: CA, server: str, service: CAService) -> None:
    name, credential = principal(ca, server)
    caller = authenticate(service, credential)
    issued(service, caller, new_request())
    token = json.loads(ca.cli("principal", "token", name, "--json").stdout)["token"]
    between(service, lambda: service.auth.exchange_token(token, now()))
    with pytest.raises(Refusal) as refused:
        service.requests.submit(authenticate(service, credential), new_request(), now())
    assert refused.value.reason is Reason.UNAUTHENTICATED
    with pytest.raises(Refusal):  # and it is forgotten
        authenticate(service, credential)


def test_a_group_left_after_the_decision_is_seen(ca: CA, server: str, service: CAService) -> None:
    name, credential = principal(ca, server, "--group", "webservers")
    caller = authenticate(service, credential)
    web = {"template": "webserver", "dns": ["www.example.internal"]}
    issued(service, caller, new_request(**web))
    between(service, lambda: ca.cli("principal", "groups", name, "--remove", "webservers"))
    with pytest.raises(Refusal) as refused:
        service.requests.submit(authenticate(service, credential), new_request(**web), now())
    assert refused.value.reason is Reason.TEMPLATE_NOT_PERMITTED


def test_a_certificate_revoked_after_the_decision_is_not_renewed(ca: CA, server: str, service: CAService) -> None:
    _, credential = principal(ca, server)
    caller = authenticate(service, credential)
    old_key, old_csr = make_csr()
    old = issued(service, caller, EnrollmentRequest(template="machine", csr=old_csr.encode()))
    _, new_csr = make_csr()
    evidence = renewal_evidence(old_key, old.certificate, new_csr)
    renewal = EnrollmentRequest(
        template="machine", csr=new_csr.encode(),
        renewal=Evidence(load_cert(evidence["certificate"]), base64.b64decode(evidence["signature"])))
    between(service, lambda: service.revocation.revoke(OPERATOR, old.serial, "keyCompromise", now()))
    with pytest.raises(Refusal) as refused:
        service.requests.submit(caller, renewal, now())
    assert refused.value.reason is Reason.RENEWAL_OF_REVOKED
    assert csr_der(new_csr)  # the CSR itself was fine


def test_a_template_edited_after_the_decision_issues_its_new_version(
    ca: CA, server: str, service: CAService, tmp_path: Path
) -> None:
    name = f"state-{uuid.uuid4().hex[:8]}"
    text = (TEMPLATES / "machine.toml").read_text().replace('name = "machine"', f'name = "{name}"')
    (tmp_path / "t.toml").write_text(text)
    ca.cli("template", "add", str(tmp_path / "t.toml"))
    _, credential = principal(ca, server)
    caller = authenticate(service, credential)
    first = issued(service, caller, new_request(name))
    assert template_info.decode(load_cert(first.certificate)) is not None
    (tmp_path / "t.toml").write_text(text.replace('validity = "365d"', 'validity = "200d"'))
    between(service, lambda: ca.cli("template", "edit", name, str(tmp_path / "t.toml")))
    second = load_cert(issued(service, caller, new_request(name)).certificate)
    info = template_info.decode(second)
    assert info is not None and (info.major, info.minor) == (1, 1)
    assert second.not_valid_after_utc - second.not_valid_before_utc == dt.timedelta(days=200, seconds=-1)


# -- over HTTP: the worker remembers the caller between requests --------------------------

def test_a_replaced_credential_is_refused_on_its_next_request(ca: CA, server: str) -> None:
    name = f"state-{uuid.uuid4().hex[:8]}.example.internal"
    old = Client.enrolled(server, ca.add_principal(name))
    old.enroll("machine")
    token = json.loads(ca.cli("principal", "token", name, "--json").stdout)["token"]
    new = Client.enrolled(server, token)
    assert_problem(old.submit("machine", make_csr()[1]), 401, "unauthenticated")
    new.enroll("machine")


def test_a_group_change_applies_to_the_next_request(ca: CA, server: str) -> None:
    name = f"state-{uuid.uuid4().hex[:8]}.example.internal"
    client = Client.enrolled(server, ca.add_principal(name, "--group", "webservers"))
    csr = make_csr(dns=["www.example.internal"])[1]
    assert client.submit("webserver", csr).status_code == 201
    ca.cli("principal", "groups", name, "--remove", "webservers")
    assert_problem(client.submit("webserver", csr), 403, "template-not-permitted")
    ca.cli("principal", "groups", name, "--add", "webservers")
    assert client.submit("webserver", csr).status_code == 201
