"""The ACME server end to end (RFC 8555, RFC 9773), against a real ``certpulse ca serve``.

One CA and one server for the module (on SQLite and PostgreSQL), a real pebble-challtestsrv as
the DNS resolver the CA validates through (every name answers 127.0.0.1) and a tiny HTTP server
on the port ``[acme] http01_port`` names, answering http-01 challenges. Accounts are bound to a
principal of group ``webservers`` with keys from ``certpulse principal acme-eab``.
"""

from __future__ import annotations

import datetime as dt
import json
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from acme_client import (
    ACMEClient,
    ChallengeServer,
    cert_id,
    configure_acme,
    csr_for,
    eab_for,
    jwk_key_of_private,
    new_account_key,
    private_pem,
    problem_type,
)
from certpulse.frontends.acme.operations import ORDERS_PAGE
from challtestsrv import ChallTestSrv
from support import CA, free_port, serve

PRINCIPAL = "acme-web"


@dataclass
class Env:
    ca: CA
    base: str
    web: ChallengeServer

    @property
    def directory(self) -> str:
        return f"{self.base}/acme/directory"

    def client(self, alg: str = "ES256") -> ACMEClient:
        """A client with a fresh account, bound by a fresh EAB key."""
        client = ACMEClient(self.directory, alg)
        response = client.new_account(eab=eab_for(self.ca, PRINCIPAL), contact=["mailto:ops@example.internal"])
        assert response.status_code == 201, response.text
        return client


@pytest.fixture(scope="module")
def env(ca: CA, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    folder = tmp_path_factory.mktemp("acme-protocol")
    ca.cli("principal", "add", PRINCIPAL, "--group", "webservers")
    with ChallTestSrv(folder) as dns, ChallengeServer(free_port()) as web:
        configure_acme(ca.dir, http01_port=web.port, dns_resolver=dns.address, validation_timeout="20s",
                       default_profile="webserver")
        with serve(ca, "--workers", "2") as base:  # nonces are spent once across workers
            yield Env(ca, base, web)


def name() -> str:
    return f"www-{uuid.uuid4().hex[:10]}.example.internal"


def validate_all(env: Env, client: ACMEClient, order: dict[str, Any]) -> None:
    """Answer every authorization's http-01 challenge and wait until each is valid."""
    for authz_url in order["authorizations"]:
        authz = client.get(authz_url)
        assert authz.status_code == 200, authz.text
        challenge = next(c for c in authz.json()["challenges"] if c["type"] == "http-01")
        env.web.answers[challenge["token"]] = client.key_authorization(challenge["token"])
        response = client.post(challenge["url"], {})
        assert response.status_code == 200, response.text
        assert response.json()["status"] in ("processing", "valid"), response.json()
        assert f'<{authz_url}>;rel="up"' in response.headers.get_list("link")
        assert client.poll(authz_url, ("valid", "invalid"))["status"] == "valid"


def issue(env: Env, client: ACMEClient, names: list[str]) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate,
                                                                    dict[str, Any]]:
    """An order for ``names`` through to its certificate; the key, leaf and final order."""
    response = client.new_order(names)
    assert response.status_code == 201, response.text
    order_url = response.headers["location"]
    validate_all(env, client, response.json())
    assert client.poll(order_url, ("ready", "invalid"))["status"] == "ready"
    key, csr = csr_for(names)
    finalized = client.finalize(response.json(), csr)
    assert finalized.status_code == 200, finalized.text
    order = client.poll(order_url, ("valid", "invalid"))
    assert order["status"] == "valid", order
    download = client.get(order["certificate"])
    assert download.status_code == 200, download.text
    assert download.headers["content-type"] == "application/pem-certificate-chain"
    leaf = x509.load_pem_x509_certificates(download.content)[0]
    return key, leaf, order


def assert_acme_headers(response: httpx.Response, env: Env) -> None:
    assert response.headers.get("replay-nonce"), response.headers
    assert response.headers.get("cache-control") == "no-store"
    assert f'<{env.directory}>;rel="index"' in response.headers.get_list("link")


def test_directory_lists_every_resource_and_the_profiles(env: Env) -> None:
    response = httpx.get(env.directory)
    assert response.status_code == 200, response.text
    directory = response.json()
    for key, path in (("newNonce", "new-nonce"), ("newAccount", "new-account"), ("newOrder", "new-order"),
                      ("revokeCert", "revoke-cert"), ("keyChange", "key-change"), ("renewalInfo", "renewal-info")):
        assert directory[key] == f"{env.base}/acme/{path}"
    assert directory["meta"]["externalAccountRequired"] is True
    assert "webserver" in directory["meta"]["profiles"]
    assert_acme_headers(response, env)


def test_new_nonce_head_and_get(env: Env) -> None:
    head = httpx.head(f"{env.base}/acme/new-nonce")
    get = httpx.get(f"{env.base}/acme/new-nonce")
    assert (head.status_code, get.status_code) == (200, 204)
    for response in (head, get):
        assert_acme_headers(response, env)
    assert head.headers["replay-nonce"] != get.headers["replay-nonce"]


@pytest.mark.parametrize("alg", ["ES256", "RS256", "EdDSA"])
def test_account_with_external_binding_for_each_key_type(env: Env, alg: str) -> None:
    client = ACMEClient(env.directory, alg)
    created = client.new_account(eab=eab_for(env.ca, PRINCIPAL), contact=["mailto:ops@example.internal"])
    assert created.status_code == 201, created.text
    assert created.json()["status"] == "valid"
    assert created.json()["contact"] == ["mailto:ops@example.internal"]
    assert created.headers["location"].startswith(f"{env.base}/acme/account/")
    assert_acme_headers(created, env)
    again = client.new_account(only_existing=True)  # the same key: the same account, 200
    assert again.status_code == 200, again.text
    assert again.headers["location"] == created.headers["location"]
    read = client.get(client.account_url or "")
    assert read.status_code == 200 and read.json()["status"] == "valid", read.text


def test_account_without_binding_is_refused(env: Env) -> None:
    client = ACMEClient(env.directory)
    response = client.new_account()
    assert problem_type(response) == "externalAccountRequired", response.text
    assert response.status_code == 400


def test_order_validate_finalize_download(env: Env) -> None:
    client = env.client()
    names = [name(), name()]
    response = client.new_order(names)
    assert response.status_code == 201, response.text
    order = response.json()
    assert order["status"] == "pending"
    assert [i["value"] for i in order["identifiers"]] == names
    assert len(order["authorizations"]) == 2
    assert response.headers["location"].startswith(f"{env.base}/acme/order/")
    key, leaf, final = issue(env, client, names)
    sans = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sorted(sans.get_values_for_type(x509.DNSName)) == sorted(names)
    assert leaf.public_key().public_numbers() == key.public_key().public_numbers()
    # the account's orders list names it
    account = client.get(client.account_url or "").json()
    listed = client.get(account["orders"])
    assert listed.status_code == 200, listed.text
    assert final["certificate"].startswith(f"{env.base}/acme/cert/")
    orders = listed.json()["orders"]
    assert any(url.startswith(f"{env.base}/acme/order/") for url in orders)


def test_a_validation_in_progress_asks_the_client_back_in_a_second(env: Env) -> None:
    """While the client's server has not answered yet, the challenge is processing and the
    challenge and authorization answers carry Retry-After: 1 (lego would wait 5 s otherwise)."""
    client = env.client()
    order = client.new_order([name()]).json()
    authz_url = order["authorizations"][0]
    challenge = next(c for c in client.get(authz_url).json()["challenges"] if c["type"] == "http-01")
    env.web.answers[challenge["token"]] = client.key_authorization(challenge["token"])
    release = env.web.held[challenge["token"]] = threading.Event()
    try:
        response = client.post(challenge["url"], {})
        assert response.status_code == 200, response.text
        assert response.json()["status"] == "processing"
        assert response.headers["retry-after"] == "1"
        authz = client.get(authz_url)
        assert authz.json()["status"] == "pending"
        assert authz.headers["retry-after"] == "1"
    finally:
        release.set()
    assert client.poll(authz_url, ("valid", "invalid"))["status"] == "valid"
    decided = client.get(authz_url)
    assert "retry-after" not in decided.headers


def test_orders_list_pages_with_a_next_link(env: Env) -> None:
    client = env.client()
    created = [client.new_order([name()]).headers["location"] for _ in range(ORDERS_PAGE + 2)]
    account = client.get(client.account_url or "").json()
    seen: list[str] = []
    pages = 0
    url: str | None = account["orders"]
    while url is not None and pages < 10:  # bounded
        page = client.get(url)
        assert page.status_code == 200, page.text
        assert len(page.json()["orders"]) <= ORDERS_PAGE
        seen += page.json()["orders"]
        pages += 1
        nexts = [link for link in page.headers.get_list("link") if link.endswith('rel="next"')]
        url = nexts[0][1:nexts[0].index(">")] if nexts else None
    assert pages == 2
    assert seen == created


def test_renewal_info_for_an_issued_certificate(env: Env) -> None:
    client = env.client()
    _, leaf, _ = issue(env, client, [name()])
    response = httpx.get(f"{env.base}/acme/renewal-info/{cert_id(leaf)}")
    assert response.status_code == 200, response.text
    window = response.json()["suggestedWindow"]
    start = dt.datetime.fromisoformat(window["start"])
    end = dt.datetime.fromisoformat(window["end"])
    assert leaf.not_valid_before_utc < start < end <= leaf.not_valid_after_utc
    assert int(response.headers["retry-after"]) > 0


def test_revoke_by_account_then_already_revoked(env: Env) -> None:
    client = env.client()
    _, leaf, _ = issue(env, client, [name()])
    from cryptography.hazmat.primitives.serialization import Encoding

    der = leaf.public_bytes(Encoding.DER)
    response = client.revoke(der, reason=4)
    assert response.status_code == 200, response.text
    assert_acme_headers(response, env)
    again = client.revoke(der)
    assert problem_type(again) == "alreadyRevoked", again.text
    # its renewal window is now in the past: renew at once
    info = httpx.get(f"{env.base}/acme/renewal-info/{cert_id(leaf)}").json()
    assert dt.datetime.fromisoformat(info["suggestedWindow"]["end"]) <= dt.datetime.now(dt.UTC)


def test_revoke_by_the_certificate_key(env: Env) -> None:
    client = env.client()
    key, leaf, _ = issue(env, client, [name()])
    from cryptography.hazmat.primitives.serialization import Encoding

    stranger = ACMEClient(env.directory)  # no account: signs with the certificate's own key
    response = stranger.revoke(leaf.public_bytes(Encoding.DER), certificate_key=jwk_key_of_private(private_pem(key)))
    assert response.status_code == 200, response.text
    status = httpx.get(f"{env.base}/v1/certificates/{leaf.serial_number:x}")
    assert status.status_code == 200 and status.json()["status"] == "revoked", status.text


def test_key_change_then_only_the_new_key_signs(env: Env) -> None:
    client = env.client()
    old_key, old_alg = client.key, client.alg
    new_key, _ = new_account_key("ES256")  # the same type: the signature itself is what fails below
    response = client.key_change(new_key)
    assert response.status_code == 200, response.text
    assert client.get(client.account_url or "").status_code == 200
    # the old key no longer signs for the account
    stale = ACMEClient(env.directory, old_alg)
    stale.key, stale.account_url = old_key, client.account_url
    refused = stale.get(client.account_url or "")
    assert refused.status_code == 403 and problem_type(refused) == "unauthorized", refused.text
    # and a new account for the new key is the same account
    found = ACMEClient(env.directory, "ES256")
    found.key = new_key
    assert found.new_account(only_existing=True).headers["location"] == client.account_url


def test_account_deactivation(env: Env) -> None:
    client = env.client()
    response = client.post(client.account_url or "", {"status": "deactivated"})
    assert response.status_code == 200, response.text
    assert response.json()["status"] == "deactivated"
    after = client.new_order([name()])
    assert after.status_code == 403 and problem_type(after) == "unauthorized", after.text


def test_acme_routes_in_openapi(env: Env) -> None:
    paths = httpx.get(f"{env.base}/openapi.json").json()["paths"]
    assert "application/jose+json" in paths["/acme/new-order"]["post"]["requestBody"]["content"]
    assert "/acme/renewal-info/{certID}" in paths


def test_acme_metrics(env: Env) -> None:
    httpx.head(f"{env.base}/acme/new-nonce")
    text = httpx.get(f"{env.base}/metrics").text
    assert 'certpulse_acme_requests_total{operation="newNonce",outcome="ok"}' in text


def _issued_count(env: Env) -> float:
    text = httpx.get(f"{env.base}/metrics").text
    line = next(x for x in text.splitlines() if x.startswith("certpulse_ca_issuance_seconds_count"))
    return float(line.split()[-1])


def test_an_acme_issuance_is_counted_with_native_ones(env: Env) -> None:
    """The CA's issuance histogram counts a certificate issued over ACME as it counts a native one."""
    before = _issued_count(env)
    issue(env, env.client(), [name()])
    assert _issued_count(env) == before + 1


def test_nonces_work_and_are_spent_once_across_workers(env: Env) -> None:
    """Each nonce fetched, used and replayed on connections of their own (so spread over the two
    workers): used once it works wherever it was issued, replayed it is refused wherever it lands."""
    client = env.client()
    url = client.account_url or ""
    for _ in range(12):
        nonce = httpx.head(f"{env.base}/acme/new-nonce").headers["replay-nonce"]
        first = httpx.post(url, content=json.dumps(client.body(url, None, nonce=nonce)),
                           headers={"content-type": "application/jose+json"})
        assert first.status_code == 200, first.text
        replayed = httpx.post(url, content=json.dumps(client.body(url, None, nonce=nonce)),
                              headers={"content-type": "application/jose+json"})
        assert replayed.status_code == 400 and problem_type(replayed) == "badNonce", replayed.text
        assert replayed.headers["replay-nonce"]


def _post_as_get_anywhere(env: Env, client: ACMEClient, key: Any = None) -> httpx.Response:
    """A POST-as-GET of the client's account on a connection of its own (either worker)."""
    url = client.account_url or ""
    nonce = httpx.head(f"{env.base}/acme/new-nonce").headers["replay-nonce"]
    return httpx.post(url, content=json.dumps(client.body(url, None, nonce=nonce, key=key)),
                      headers={"content-type": "application/jose+json"})


def test_workers_that_remember_an_account_see_its_deactivation_and_key_change_at_once(env: Env) -> None:
    """Both workers remember an account once it has signed there; a key change or deactivation
    answered by one worker holds on the next request wherever it lands: the old key no longer
    signs, a deactivated account is refused."""
    client = env.client()
    for _ in range(8):  # spread over both workers: each remembers the account and its key
        assert _post_as_get_anywhere(env, client).status_code == 200
    old_key = client.key
    new_key, _ = new_account_key("ES256")
    assert client.key_change(new_key).status_code == 200
    for _ in range(8):
        stale = _post_as_get_anywhere(env, client, key=old_key)
        assert stale.status_code == 403 and problem_type(stale) == "unauthorized", stale.text
        assert _post_as_get_anywhere(env, client).status_code == 200  # the new key, remembered again
    assert client.post(client.account_url or "", {"status": "deactivated"}).status_code == 200
    for _ in range(8):
        refused = _post_as_get_anywhere(env, client)
        assert refused.status_code == 403 and problem_type(refused) == "unauthorized", refused.text


def test_key_change_to_a_key_another_account_has_is_a_conflict(env: Env) -> None:
    client, other = env.client(), env.client()
    response = client.key_change(other.key)
    assert response.status_code == 409 and problem_type(response) == "malformed", response.text
    assert response.headers["location"] == other.account_url
    assert client.get(client.account_url or "").status_code == 200  # the old key still signs


def test_order_waiting_for_approval_is_processing_with_retry_after(env: Env) -> None:
    """A profile with manager approval: finalize leaves the order processing (Retry-After) until a
    CA manager approves the request through the native API; then the certificate is there."""
    machine = f"approve-{uuid.uuid4().hex[:8]}.example.internal"
    env.ca.cli("principal", "add", machine, "--group", "machines")
    client = ACMEClient(env.directory)
    assert client.new_account(eab=eab_for(env.ca, machine)).status_code == 201
    response = client.new_order([machine], profile="approval-required")
    assert response.status_code == 201, response.text
    order_url = response.headers["location"]
    validate_all(env, client, response.json())
    assert client.poll(order_url, ("ready", "invalid"))["status"] == "ready"
    _, csr = csr_for([machine])
    finalized = client.finalize(response.json(), csr)
    assert finalized.status_code == 200, finalized.text
    assert finalized.json()["status"] == "processing"
    assert int(finalized.headers["retry-after"]) >= 1
    polled = client.get(order_url)
    assert polled.json()["status"] == "processing" and int(polled.headers["retry-after"]) >= 1
    admin = httpx.Client(base_url=env.base, headers={"Authorization": f"Bearer {env.ca.admin_key}"}, timeout=30)
    pending = admin.get("/v1/requests", params={"status": "pending"}).json()
    mine = [r for r in pending if r["template"] == "approval-required"]
    assert mine, pending
    assert admin.post(f"/v1/requests/{mine[-1]['id']}/approve").status_code == 200
    order = client.poll(order_url, ("valid", "invalid"))
    assert order["status"] == "valid", order
    assert client.get(order["certificate"]).status_code == 200


def test_authorization_deactivation(env: Env) -> None:
    client = env.client()
    response = client.new_order([name()])
    assert response.status_code == 201, response.text
    authz_url = response.json()["authorizations"][0]
    deactivated = client.post(authz_url, {"status": "deactivated"})
    assert deactivated.status_code == 200, deactivated.text
    assert deactivated.json()["status"] == "deactivated"
    assert f'<{response.headers["location"]}>;rel="up"' in deactivated.headers.get_list("link")
    assert client.get(authz_url).json()["status"] == "deactivated"
