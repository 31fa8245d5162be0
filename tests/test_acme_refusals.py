"""What the ACME server refuses, and how: each refusal an RFC 8555 problem document
(``application/problem+json``, an ``urn:ietf:params:acme:error:*`` type, a detail), with a
fresh ``Replay-Nonce``, and never a 500. One CA and one real ``ca serve`` for the module.
"""

from __future__ import annotations

import base64
import json
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from acme_client import (
    ACMEClient,
    ChallengeServer,
    b64,
    configure_acme,
    csr_for,
    eab_for,
    encode_payload,
    problem_type,
    sign,
)
from challtestsrv import ChallTestSrv
from support import CA, free_port, serve

PRINCIPAL = "acme-refusals"
READER = "acme-reader"
TERMS = "https://ca.example.internal/terms"  # in group machines: may read the webserver profile, not enroll in it


@dataclass
class Env:
    ca: CA
    base: str
    web: ChallengeServer
    client: ACMEClient  # one account, shared by the tests that only need one

    @property
    def directory(self) -> str:
        return f"{self.base}/acme/directory"

    def account(self, principal: str = PRINCIPAL) -> ACMEClient:
        client = ACMEClient(self.directory)
        response = client.new_account(eab=eab_for(self.ca, principal))
        assert response.status_code == 201, response.text
        return client


@pytest.fixture(scope="module")
def env(ca: CA, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    folder = tmp_path_factory.mktemp("acme-refusals")
    ca.cli("principal", "add", PRINCIPAL, "--group", "webservers")
    ca.cli("principal", "add", READER, "--group", "machines")
    with ChallTestSrv(folder) as dns, ChallengeServer(free_port()) as web:
        configure_acme(ca.dir, http01_port=web.port, dns_resolver=dns.address, validation_timeout="10s",
                       default_profile="webserver", terms_of_service=TERMS, website="https://ca.example.internal/")
        with serve(ca, "--max-inflight", "2", "--threads", "1") as base:  # see the shedding test
            client = ACMEClient(f"{base}/acme/directory")
            created = client.new_account(eab=eab_for(ca, PRINCIPAL))
            assert created.status_code == 201, created.text
            yield Env(ca, base, web, client)


def name() -> str:
    return f"r-{uuid.uuid4().hex[:10]}.example.internal"


def assert_refused(response: httpx.Response, error: str, status: int) -> dict[str, Any]:
    """An ACME problem of this type and status, with its nonce, never a 500."""
    assert response.status_code != 500, response.text
    assert response.status_code == status, f"{response.status_code} {response.text}"
    assert response.headers["content-type"].startswith("application/problem+json"), response.headers
    document: dict[str, Any] = response.json()
    assert document["type"] == f"urn:ietf:params:acme:error:{error}", document
    assert document["detail"], document
    assert response.headers.get("replay-nonce"), response.headers
    return document


def raw_jws(protected: dict[str, Any], payload: bytes = b"{}", signature: bytes = b"x" * 64) -> dict[str, str]:
    """A JWS built by hand (for what joserfc will not sign: alg none, both jwk and kid...)."""
    return {"protected": b64(json.dumps(protected).encode()), "payload": b64(payload), "signature": b64(signature)}


@pytest.mark.sqlite_only
def test_replayed_nonce_is_bad_nonce(env: Env) -> None:
    client = env.client
    nonce = client.fresh_nonce()
    url = client.account_url or ""
    first = client.send(url, client.body(url, None, nonce=nonce))
    assert first.status_code == 200, first.text
    replay = client.send(url, client.body(url, None, nonce=nonce))
    assert_refused(replay, "badNonce", 400)


@pytest.mark.sqlite_only
def test_made_up_nonce_is_bad_nonce(env: Env) -> None:
    client = env.client
    url = client.account_url or ""
    made_up = b64(b"\0" * 36)
    assert_refused(client.send(url, client.body(url, None, nonce=made_up)), "badNonce", 400)


@pytest.mark.sqlite_only
def test_bad_signature_is_unauthorized(env: Env) -> None:
    client = env.client
    url = client.account_url or ""
    body = client.body(url, None)
    signature = bytearray(base64.urlsafe_b64decode(body["signature"] + "=="))
    signature[5] ^= 0xFF
    body["signature"] = b64(bytes(signature))
    assert_refused(client.send(url, body), "unauthorized", 403)


@pytest.mark.sqlite_only
def test_url_header_must_be_the_request_url(env: Env) -> None:
    client = env.client
    url = client.account_url or ""
    body = client.body(url.replace("127.0.0.1", "localhost"), None)
    assert_refused(client.send(url, body), "unauthorized", 403)
    other = client.body(client.url("newOrder"), {"identifiers": [{"type": "dns", "value": name()}]})
    assert_refused(client.send(url, other), "unauthorized", 403)


def test_kid_of_another_account(env: Env) -> None:
    mine, theirs = env.client, env.account()
    # signed by my key but naming their account: the signature is not theirs
    body = mine.body(theirs.account_url or "", None)
    header = json.loads(base64.urlsafe_b64decode(body["protected"] + "=="))
    assert header["kid"] == mine.account_url
    forged = sign({**header, "kid": theirs.account_url}, b"", mine.key)
    assert_refused(mine.send(theirs.account_url or "", forged), "unauthorized", 403)
    # my own account reading theirs: refused
    assert_refused(mine.get(theirs.account_url or ""), "unauthorized", 403)
    # their order is not mine to read
    order = theirs.new_order([name()])
    assert order.status_code == 201, order.text
    assert_refused(mine.get(order.headers["location"]), "malformed", 404)


def test_order_for_forbidden_names_names_each(env: Env) -> None:
    allowed, refused_a, refused_b = name(), "www.example.com", "evil.example.org"
    response = env.client.new_order([allowed, refused_a, refused_b])
    document = assert_refused(response, "rejectedIdentifier", 400)
    flagged = {sub["identifier"]["value"] for sub in document["subproblems"]}
    assert flagged == {refused_a, refused_b}
    for sub in document["subproblems"]:
        assert sub["type"].startswith("urn:ietf:params:acme:error:") and sub["detail"]
        assert sub["identifier"]["type"] == "dns"


@pytest.mark.sqlite_only
def test_unsupported_identifier_type(env: Env) -> None:
    response = env.client.post(env.client.url("newOrder"),
                               {"identifiers": [{"type": "email", "value": "a@example.internal"}]})
    assert_refused(response, "unsupportedIdentifier", 400)


def test_failing_challenge_makes_the_order_invalid(env: Env) -> None:
    client = env.client
    response = client.new_order([name()])
    assert response.status_code == 201, response.text
    order_url = response.headers["location"]
    authz_url = response.json()["authorizations"][0]
    challenge = next(c for c in client.get(authz_url).json()["challenges"] if c["type"] == "http-01")
    env.web.answers[challenge["token"]] = "not-the-key-authorization"
    started = client.post(challenge["url"], {})
    assert started.status_code == 200, started.text
    authz = client.poll(authz_url, ("valid", "invalid"))
    assert authz["status"] == "invalid"
    failed = next(c for c in authz["challenges"] if c["url"] == challenge["url"])
    assert failed["status"] == "invalid"
    assert failed["error"]["type"] == "urn:ietf:params:acme:error:incorrectResponse", failed
    assert client.poll(order_url, ("invalid",))["status"] == "invalid"
    # and it cannot be finalized
    _, csr = csr_for([name()])
    finalize = client.post(response.json()["finalize"], {"csr": b64(csr)})
    assert_refused(finalize, "orderNotReady", 403)


def test_profile_not_permitted(env: Env) -> None:
    reader = env.account(READER)  # may read the webserver template, not enroll
    response = reader.new_order([name()], profile="webserver")
    assert_refused(response, "unauthorized", 403)
    unknown = env.client.new_order([name()], profile="no-such-profile")
    assert_refused(unknown, "invalidProfile", 400)


def test_finalize_with_a_csr_for_other_names(env: Env) -> None:
    client = env.client
    ordered = name()
    response = client.new_order([ordered])
    assert response.status_code == 201, response.text
    order_url = response.headers["location"]
    authz_url = response.json()["authorizations"][0]
    challenge = next(c for c in client.get(authz_url).json()["challenges"] if c["type"] == "http-01")
    env.web.answers[challenge["token"]] = client.key_authorization(challenge["token"])
    client.post(challenge["url"], {})
    assert client.poll(order_url, ("ready", "invalid"))["status"] == "ready"
    _, csr = csr_for([ordered, name()])
    assert_refused(client.finalize(response.json(), csr), "badCSR", 400)
    assert_refused(client.post(response.json()["finalize"], {"csr": "!!not base64!!"}), "malformed", 400)
    assert_refused(client.post(response.json()["finalize"], {"csr": 42}), "malformed", 400)
    assert_refused(client.post(response.json()["finalize"], {"csr": b64(b"\x30\x03junk")}), "badCSR", 400)


@pytest.mark.sqlite_only
def test_oversized_body(env: Env) -> None:
    client = env.client
    url = client.url("newOrder")
    body = client.body(url, {"identifiers": [{"type": "dns", "value": "x" * 200}] * 600})
    assert_refused(client.send(url, body), "malformed", 413)


@pytest.mark.sqlite_only
def test_malformed_bodies(env: Env) -> None:
    client = env.client
    url = client.url("newOrder")
    assert_refused(client.send(url, b"{not json"), "malformed", 400)
    assert_refused(client.send(url, b"[]"), "malformed", 400)
    assert_refused(client.send(url, {"protected": "e30", "payload": "", "signature": "", "extra": 1}), "malformed", 400)
    assert_refused(client.send(url, {"protected": 5, "payload": "", "signature": ""}), "malformed", 400)
    body = client.body(url, None)
    assert_refused(client.send(url, body, content_type="application/json"), "malformed", 415)
    # a payload of the wrong shape
    for payload in (b"[1, 2]", b"not json", {"identifiers": "www.example.internal"},
                    {"identifiers": [{"type": "dns", "value": 7}]}, {"identifiers": []},
                    {"identifiers": [{"type": "dns", "value": name()}], "notAfter": "tomorrow"}):
        response = client.post(url, payload)
        assert_refused(response, "malformed", 400)
    # a GET where a POST-as-GET belongs
    assert_refused(httpx.get(client.account_url or ""), "malformed", 405)
    assert_refused(httpx.post(f"{env.base}/acme/no-such-thing", content=b"{}"), "malformed", 404)


@pytest.mark.sqlite_only
@pytest.mark.parametrize("alg", ["none", "HS256", "RS512", "ES512"])
def test_unsupported_algorithm(env: Env, alg: str) -> None:
    client = env.client
    url = client.account_url or ""
    protected = {"alg": alg, "nonce": client.fresh_nonce(), "url": url, "kid": url}
    document = assert_refused(client.send(url, raw_jws(protected, b"")), "badSignatureAlgorithm", 400)
    assert set(document["algorithms"]) >= {"ES256", "RS256"}


@pytest.mark.sqlite_only
def test_jwk_and_kid_together_or_misplaced(env: Env) -> None:
    client = env.client
    url = client.account_url or ""
    both = client.body(url, None, use_jwk=True, kid=url)
    assert_refused(client.send(url, both), "malformed", 400)
    # a jwk where an account kid belongs
    order_url = client.url("newOrder")
    with_jwk = client.body(order_url, {"identifiers": [{"type": "dns", "value": name()}]}, use_jwk=True)
    assert_refused(client.send(order_url, with_jwk), "malformed", 400)
    # a kid on newAccount
    new_account = client.url("newAccount")
    assert_refused(client.send(new_account, client.body(new_account, {})), "malformed", 400)


@pytest.mark.sqlite_only
def test_unknown_account_kid(env: Env) -> None:
    client = env.client
    url = client.url("newOrder")
    body = client.body(url, {"identifiers": [{"type": "dns", "value": name()}]},
                       kid=f"{env.base}/acme/account/999999")
    assert_refused(client.send(url, body), "accountDoesNotExist", 400)


@pytest.mark.sqlite_only
def test_private_key_in_jwk_is_bad_public_key(env: Env) -> None:
    stranger = ACMEClient(env.directory)
    url = stranger.url("newAccount")
    header = {"alg": "ES256", "nonce": stranger.fresh_nonce(), "url": url,
              "jwk": dict(stranger.key.as_dict(private=True))}
    body = raw_jws(header, encode_payload({"termsOfServiceAgreed": True}))
    assert_refused(stranger.send(url, body), "badPublicKey", 400)


@pytest.mark.sqlite_only
def test_spent_binding_is_refused(env: Env) -> None:
    binding = eab_for(env.ca, PRINCIPAL)
    first = ACMEClient(env.directory)
    assert first.new_account(eab=binding).status_code == 201
    second = ACMEClient(env.directory)
    response = second.new_account(eab=binding)
    assert_refused(response, "unauthorized", 403)


def test_no_refusal_is_a_server_error(env: Env) -> None:
    """Every ACME URL with hostile input: a problem document, never a 500."""
    client = env.client
    targets = [f"{env.base}/acme/{path}" for path in (
        "new-account", "new-order", "key-change", "revoke-cert", "order/1", "order/1/finalize", "authz/1",
        "chall/1", "cert/1", "cert/1/9", "account/1", "account/1/orders", "order/99999999", "authz/0")]
    payloads: list[Any] = [None, {}, [], "text", 0, {"status": 5}, {"status": "valid"},
                           {"csr": None}, {"certificate": "AAAA", "reason": "x"}, {"contact": ["tel:1"]},
                           {"identifiers": [{}]}, {"account": 1, "oldKey": "x"}]
    for url in targets:
        for payload in payloads:
            response = client.post(url, payload, retry_bad_nonce=False)
            assert response.status_code != 500 and response.status_code < 500, (url, payload, response.text)
            if response.status_code >= 400:
                assert problem_type(response), (url, payload, response.text)
    deep = b"[" * 30000 + b"]" * 30000
    assert_refused(client.send(client.url("newOrder"), deep), "malformed", 400)
    assert_refused(client.post(client.url("newOrder"), b'{"identifiers": ' + b"[" * 20000 + b"]" * 20000 + b"}"),
                   "malformed", 400)
    for path in ("renewal-info/AAAA.AAAA", "renewal-info/x", "renewal-info/..", "renewal-info/" + "A" * 500):
        response = httpx.get(f"{env.base}/acme/{path}")
        assert response.status_code < 500 and problem_type(response), (path, response.text)


@pytest.mark.sqlite_only
def test_shed_requests_are_rate_limited_with_retry_after(env: Env) -> None:
    """The server runs with --max-inflight 2 --threads 1: a burst of ACME requests gets some
    answered 429 rateLimited with Retry-After (and a nonce), none a 500."""
    import asyncio

    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=64)) as http:
            return list(await asyncio.gather(*(http.head(f"{env.base}/acme/directory") for _ in range(64))))

    shed: list[httpx.Response] = []
    for _ in range(10):  # bounded: a burst of 64 against 2 places sheds unless the server is very fast
        answers = asyncio.run(burst())
        assert all(a.status_code in (200, 429) for a in answers), [a.status_code for a in answers]
        shed = [a for a in answers if a.status_code == 429]
        if shed:
            break
    assert shed, "no request was shed"
    refused = shed[0]
    assert int(refused.headers["retry-after"]) >= 1
    assert refused.headers["content-type"].startswith("application/problem+json")
    assert refused.headers.get("replay-nonce")


@pytest.mark.sqlite_only
def test_terms_not_agreed_is_user_action_required(env: Env) -> None:
    meta = httpx.get(env.directory).json()["meta"]
    assert meta["termsOfService"] == TERMS and meta["website"] == "https://ca.example.internal/"
    client = ACMEClient(env.directory)
    response = client.new_account(eab=eab_for(env.ca, PRINCIPAL), terms=False)
    document = assert_refused(response, "userActionRequired", 403)
    assert document["instance"] == TERMS
    assert f'<{TERMS}>;rel="terms-of-service"' in response.headers.get_list("link")


@pytest.mark.sqlite_only
def test_revocation_reasons_must_be_crl_reason_codes(env: Env) -> None:
    client = env.client
    url = client.url("revokeCert")
    for reason in (7, 11, -1, 99):  # 7 is unassigned in RFC 5280; 11 is beyond the list
        response = client.post(url, {"certificate": b64(b"\x30\x03\x02\x01\x01"), "reason": reason})
        assert_refused(response, "badRevocationReason", 400)
    assert_refused(client.post(url, {"certificate": b64(b"\x30\x00"), "reason": "keyCompromise"}),
                   "badRevocationReason", 400)
