"""The agent against a CA that lies, in-process: ``httpx.MockTransport`` plays the CA through the
agent's transport seam (``Agent(..., transport=...)``), so every class of hostile answer is one
table row here instead of a proxy process. (One end-to-end proxy test stays in
``test_agent_process.py``.)

The CA played here is honest by default: a real PKI from ``pki_factory`` (root -> issuing CA),
the policy document in the shape ``ca serve`` gives it, and certificates issued for the CSR the
agent sent. Each case rewrites one answer. What must hold whatever the lie: the pulse raises no
exception, nothing of the lie is installed, the request's key is not kept, the current
certificate and the live link stay, and the outcome says why in the agent's own words.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography import x509

from certpulse.agent.config import AgentConfig, PolicyServerConfig, save_config, write_credential
from certpulse.agent.pulse import Agent, PulseResult
from certpulse.agent.trust import ROOTS_NAME, PinFile
from certpulse.pki import template_info
from certpulse.pki.build import build_ca_certificate
from certpulse.pki.certs import thumbprint
from pki_factory import Authority, pem, self_signed, utc_now

URL = "https://ca.test"
PRINCIPAL = "host-1.example.internal"
OID = "1.3.6.1.4.1.311.21.8.424242.1"
OTHER_OID = "1.3.6.1.4.1.311.21.8.424242.2"
DAY = dt.timedelta(days=1)
Rewrite = Callable[["FakeCA", x509.CertificateSigningRequest, dict[str, Any]], httpx.Response | dict[str, Any]]


def _template_document() -> dict[str, Any]:
    return {
        "name": "machine", "display_name": "Machine", "oid": OID, "schema_version": 2, "major_version": 1,
        "minor_version": 0, "validity_seconds": 365 * 86400, "renewal_period_seconds": 42 * 86400,
        "purpose": "signature", "key": {"types": ["ec-p256"], "default": "ec-p256", "archive": False},
        "key_usage": ["digital_signature"], "ekus": ["1.3.6.1.5.5.7.3.2"], "subject_source": "principal",
        "renewal_subject_from_existing": False, "manager_approval": False, "ra_signatures": 0, "ra_policy": None,
        "supersedes": [], "old_certificate": "archive", "user_interaction": False, "check_directory": False,
        "rights": ["autoenroll", "enroll", "read"],
    }


@dataclasses.dataclass
class FakeCA:
    """An honest CA answering the agent's four calls, with a hook to lie on issuance."""

    root: Authority = dataclasses.field(default_factory=lambda: Authority.root("Hostile Test Root"))
    issuer: Authority = dataclasses.field(init=False)
    rewrite: Rewrite | None = None
    policy_rewrite: Callable[[dict[str, Any]], httpx.Response | dict[str, Any]] | None = None
    issued: list[x509.Certificate] = dataclasses.field(default_factory=list)
    requests: int = 0  # submissions received
    next_id: int = 1

    def __post_init__(self) -> None:
        self.issuer = self.root.subordinate("issuing-1")

    def policy(self) -> dict[str, Any]:
        return {
            "policy_id": "hostile-test", "generated_at": utc_now().isoformat(), "refresh_after_seconds": 600,
            "templates": [_template_document()],
            "issuers": [{"name": "issuing-1", "certificate": pem(self.issuer.certificate), "cost": 0,
                         "renewal_only": False, "templates": ["machine"],
                         "thumbprint": thumbprint(self.issuer.certificate)}],
            "roots": [pem(self.root.certificate)], "intermediates": [pem(self.issuer.certificate)],
            "kra": [], "directory": [],
        }

    def honest(self, csr: x509.CertificateSigningRequest) -> x509.Certificate:
        return self.issuer.issue(PRINCIPAL, sans=[PRINCIPAL], public_key=csr.public_key(),  # type: ignore[arg-type]
                                 template=template_info.TemplateInfo(OID, 1, 0)).certificate

    def handle(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path
        if path == "/v1/policy":
            document: httpx.Response | dict[str, Any] = self.policy()
            if self.policy_rewrite is not None:
                document = self.policy_rewrite(self.policy())
            return document if isinstance(document, httpx.Response) else httpx.Response(200, json=document)
        if path == "/v1/requests" and request.method == "POST":
            self.requests += 1
            body = json.loads(request.content)
            csr = x509.load_pem_x509_csr(body["csr"].encode())
            cert = self.honest(csr)
            answer: dict[str, Any] = {"id": self.next_id, "status": "issued", "serial": format(cert.serial_number, "x"),
                                      "certificate": pem(cert), "chain": [pem(self.issuer.certificate)]}
            self.next_id += 1
            if self.rewrite is not None:
                rewritten = self.rewrite(self, csr, answer)
                if isinstance(rewritten, httpx.Response):
                    return rewritten
                answer = rewritten
            self.issued.append(cert)
            return httpx.Response(201, json=answer)
        if path.startswith("/v1/certificates/"):
            return httpx.Response(200, json={"status": "good"})
        return httpx.Response(404, json={"reason": "not-found", "detail": path})


@pytest.fixture
def ca() -> FakeCA:
    return FakeCA()


@pytest.fixture
def agent(ca: FakeCA, tmp_path: Path) -> Any:
    directory = tmp_path / "agent"
    directory.mkdir(mode=0o700)
    write_credential(directory, "cpc_test-credential")
    PinFile(directory).save([ca.root.certificate])  # pinned at init: the honest CA's root
    config = AgentConfig(servers=(PolicyServerConfig(url=URL, trust_roots=ROOTS_NAME),), principal=PRINCIPAL,
                         policy_refresh=dt.timedelta(seconds=1))
    save_config(directory, config)
    opened = Agent(directory, config, transport=httpx.MockTransport(ca.handle))
    yield opened
    opened.close()


def _outcome(result: PulseResult) -> tuple[str, str, str | None]:
    [outcome] = [o for o in result.outcomes if o.action.template == "machine"]
    return outcome.outcome, outcome.detail, outcome.thumbprint


def _enrolled(agent: Agent) -> str:
    outcome, detail, installed = _outcome(agent.pulse(utc_now()))
    assert (outcome, installed is not None) == ("done", True), detail
    assert installed is not None
    return installed


# -- lies in an issued certificate: refused, the current certificate stays ----------------------------

def _other_key(ca: FakeCA, csr: x509.CertificateSigningRequest, answer: dict[str, Any]) -> dict[str, Any]:
    other = ca.issuer.issue(PRINCIPAL, sans=[PRINCIPAL], template=template_info.TemplateInfo(OID, 1, 0))
    return {**answer, "certificate": other.pem}


def _self_signed_right_key(ca: FakeCA, csr: x509.CertificateSigningRequest, answer: dict[str, Any]) -> dict[str, Any]:
    # A self-signature needs the private key, which only the agent has: the forger signs with its
    # own key a certificate for the agent's public key, naming itself as issuer.
    forger = Authority.root(PRINCIPAL)
    forged = forger.issue(PRINCIPAL, sans=[PRINCIPAL], public_key=csr.public_key(),  # type: ignore[arg-type]
                          template=template_info.TemplateInfo(OID, 1, 0))
    return {**answer, "certificate": forged.pem, "chain": []}


def _rogue_signature(ca: FakeCA, csr: x509.CertificateSigningRequest, answer: dict[str, Any]) -> dict[str, Any]:
    rogue = Authority.root("rogue")
    forged = ca.issuer.issue(PRINCIPAL, sans=[PRINCIPAL], public_key=csr.public_key(),  # type: ignore[arg-type]
                             template=template_info.TemplateInfo(OID, 1, 0), signing_key=rogue.key)
    return {**answer, "certificate": forged.pem}


def _rogue_chain(ca: FakeCA, csr: x509.CertificateSigningRequest, answer: dict[str, Any]) -> dict[str, Any]:
    # A whole parallel hierarchy with the same names, sent as the chain.
    rogue_root = Authority.root("Hostile Test Root")
    rogue_issuer = rogue_root.subordinate("issuing-1")
    forged = rogue_issuer.issue(PRINCIPAL, sans=[PRINCIPAL], public_key=csr.public_key(),  # type: ignore[arg-type]
                                template=template_info.TemplateInfo(OID, 1, 0))
    return {**answer, "certificate": forged.pem, "chain": [pem(c) for c in rogue_issuer.chain]}


def _another_principal(ca: FakeCA, csr: x509.CertificateSigningRequest, answer: dict[str, Any]) -> dict[str, Any]:
    cert = ca.issuer.issue("host-2.example.internal", sans=["host-2.example.internal"],
                           public_key=csr.public_key(),  # type: ignore[arg-type]
                           template=template_info.TemplateInfo(OID, 1, 0))
    return {**answer, "certificate": cert.pem}


def _extra_name(ca: FakeCA, csr: x509.CertificateSigningRequest, answer: dict[str, Any]) -> dict[str, Any]:
    cert = ca.issuer.issue(PRINCIPAL, sans=[PRINCIPAL, "www.bank.example"],
                           public_key=csr.public_key(),  # type: ignore[arg-type]
                           template=template_info.TemplateInfo(OID, 1, 0))
    return {**answer, "certificate": cert.pem}


def _other_template(ca: FakeCA, csr: x509.CertificateSigningRequest, answer: dict[str, Any]) -> dict[str, Any]:
    cert = ca.issuer.issue(PRINCIPAL, sans=[PRINCIPAL], public_key=csr.public_key(),  # type: ignore[arg-type]
                           template=template_info.TemplateInfo(OTHER_OID, 1, 0))
    return {**answer, "certificate": cert.pem}


def _no_template(ca: FakeCA, csr: x509.CertificateSigningRequest, answer: dict[str, Any]) -> dict[str, Any]:
    cert = ca.issuer.issue(PRINCIPAL, sans=[PRINCIPAL], public_key=csr.public_key())  # type: ignore[arg-type]
    return {**answer, "certificate": cert.pem}


def _expired(ca: FakeCA, csr: x509.CertificateSigningRequest, answer: dict[str, Any]) -> dict[str, Any]:
    start = utc_now() - 400 * DAY
    cert = ca.issuer.issue(PRINCIPAL, sans=[PRINCIPAL], public_key=csr.public_key(),  # type: ignore[arg-type]
                           template=template_info.TemplateInfo(OID, 1, 0), not_before=start,
                           not_after=start + 30 * DAY)
    return {**answer, "certificate": cert.pem}


def _garbage_pem(ca: FakeCA, csr: x509.CertificateSigningRequest, answer: dict[str, Any]) -> dict[str, Any]:
    return {**answer, "certificate": "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"}


def _garbage_chain(ca: FakeCA, csr: x509.CertificateSigningRequest, answer: dict[str, Any]) -> dict[str, Any]:
    return {**answer, "chain": ["not a certificate"]}


REFUSED = [
    (_other_key, "it does not hold the key this agent generated"),
    (_self_signed_right_key, "it does not chain to a pinned root"),
    (_rogue_signature, "it does not chain to a pinned root"),
    (_rogue_chain, "it does not chain to a pinned root"),
    (_expired, "it does not chain to a pinned root"),
    (_another_principal, "not this principal"),
    (_extra_name, "not this principal"),
    (_other_template, "it does not name the requested template"),
    (_no_template, "it does not name the requested template"),
    (_garbage_pem, "not a parseable certificate"),
    (_garbage_chain, "not a parseable certificate"),
]


@pytest.mark.parametrize(("rewrite", "why"), REFUSED, ids=[r.__name__.strip("_") for r, _ in REFUSED])
def test_a_lying_issuance_is_refused_and_the_current_certificate_stays(
        ca: FakeCA, agent: Agent, rewrite: Rewrite, why: str) -> None:
    current = _enrolled(agent)
    before = agent.store.certificates()
    ca.rewrite = rewrite
    outcome, detail, installed = _outcome(agent.pulse(utc_now() + 330 * DAY))  # renewal is due
    assert (outcome, installed) == ("refused", None), detail
    assert detail.startswith("certificate refused:") and why in detail, detail
    assert agent.store.certificates() == before
    assert agent.store.live_link("machine").resolve().name == current
    assert agent.store.flights() == [] and not any(agent.store.flights_dir.iterdir())

    ca.rewrite = None  # the same path with an honest answer goes through
    outcome, detail, installed = _outcome(agent.pulse(utc_now() + 330 * DAY))
    assert outcome == "done" and installed not in (None, current), detail


# -- answers of the wrong shape: the server is unavailable, the request kept to resend ----------------

def _json_of_wrong_shape(ca: FakeCA, csr: x509.CertificateSigningRequest, answer: dict[str, Any]) -> dict[str, Any]:
    return {"id": "one", "status": "issued"}


def _issued_without_certificate(ca: FakeCA, csr: x509.CertificateSigningRequest,
                                answer: dict[str, Any]) -> dict[str, Any]:
    return {"id": 7, "status": "issued", "chain": "nope"}


def _not_json(ca: FakeCA, csr: x509.CertificateSigningRequest, answer: dict[str, Any]) -> httpx.Response:
    return httpx.Response(201, content=b"<html>issued!</html>")


def _oversized(ca: FakeCA, csr: x509.CertificateSigningRequest, answer: dict[str, Any]) -> httpx.Response:
    return httpx.Response(201, content=b'{"pad": "' + b"x" * (5 * 1024 * 1024) + b'"}')


def _server_error(ca: FakeCA, csr: x509.CertificateSigningRequest, answer: dict[str, Any]) -> httpx.Response:
    return httpx.Response(500, json={"reason": "oops"})


UNAVAILABLE = [
    (_json_of_wrong_shape, "wrong shape"),
    (_issued_without_certificate, "an issued answer without a certificate"),
    (_not_json, "non-JSON body"),
    (_oversized, "larger than"),
    (_server_error, "answered 500"),
]


@pytest.mark.parametrize(("rewrite", "why"), UNAVAILABLE, ids=[r.__name__.strip("_") for r, _ in UNAVAILABLE])
def test_a_malformed_answer_keeps_the_request_to_resend(ca: FakeCA, agent: Agent, rewrite: Rewrite,
                                                       why: str) -> None:
    ca.rewrite = rewrite
    result = agent.pulse(utc_now())
    outcome, detail, installed = _outcome(result)
    assert (outcome, installed, result.outcome) == ("unavailable", None, "failed"), detail
    assert why in detail, detail
    [flight] = agent.store.flights()  # kept with its key, resent with the same idempotency key
    assert (flight.status, agent.store.certificates()) == ("created", [])
    ca.rewrite = None
    result = agent.pulse(utc_now())
    [resumed] = [o for o in result.outcomes if o.action.rule == "resume"]
    assert resumed.outcome == "done" and agent.store.flights() == []


def test_a_retry_after_beyond_a_day_is_capped(ca: FakeCA, agent: Agent) -> None:
    ca.rewrite = lambda *_: httpx.Response(503, headers={"Retry-After": "999999999"})
    result = agent.pulse(utc_now())
    assert result.outcome == "failed" and result.retry_after == 24 * 3600


# -- lies in the policy: refused whole, or the untrustworthy part dropped -----------------------------

def test_a_policy_whose_issuer_does_not_chain_to_its_roots_gives_no_issuer(ca: FakeCA, agent: Agent) -> None:
    stranger = Authority.root("Hostile Test Root").subordinate("issuing-1")
    ca.policy_rewrite = lambda doc: {**doc, "issuers": [{**doc["issuers"][0],
                                                           "certificate": pem(stranger.certificate)}]}
    result = agent.pulse(utc_now())
    assert result.outcome == "ok" and result.outcomes == []  # the template applies through no valid issuer
    assert ca.requests == 0 and agent.store.certificates() == []


@pytest.mark.parametrize("document", [
    {"policy_id": ""}, {"policy_id": "x", "templates": "all"}, {"policy_id": "x", "roots": ["junk"]},
    {"policy_id": "x", "templates": [{"name": "machine"}]},
])
def test_a_malformed_policy_is_refused_with_its_reason(ca: FakeCA, agent: Agent, document: dict[str, Any]) -> None:
    from certpulse.errors import Refusal

    ca.policy_rewrite = lambda _: document
    with pytest.raises(Refusal) as refused:
        agent.pulse(utc_now())
    assert refused.value.detail.startswith("bad policy from the server:")
    assert agent.store.certificates() == []


def _assert_untrusted(ca: FakeCA, agent: Agent, result: PulseResult) -> None:
    """The policy is trusted for nothing: the pulse fails saying why, nothing is asked or installed,
    and the pins are unchanged."""
    assert result.outcome == "failed", result
    assert result.error is not None and "neither pinned nor cross-signed by a pinned root" in result.error
    assert [n.rule for n in result.trust_notes] == ["untrusted-root"]
    assert result.outcomes == [] and ca.requests == 0 and agent.store.certificates() == []
    assert PinFile(agent.directory).load() == [ca.root.certificate]


def test_a_policy_root_that_is_not_a_ca_is_not_trusted(ca: FakeCA, agent: Agent) -> None:
    leaf = self_signed("not-a-ca")
    ca.policy_rewrite = lambda doc: {**doc, "roots": [leaf.pem]}
    _assert_untrusted(ca, agent, agent.pulse(utc_now()))


# -- the pinned root decides: swapped roots, foreign issuers, cross-certificates ----------------------

def _swapped(ca: FakeCA) -> Authority:
    """A man in the middle's hierarchy with the honest names, its issuer offered in the policy."""
    rogue_root = Authority.root("Hostile Test Root")
    rogue_issuer = rogue_root.subordinate("issuing-1")

    def swap(doc: dict[str, Any]) -> dict[str, Any]:
        return {**doc, "roots": [pem(rogue_root.certificate)], "intermediates": [pem(rogue_issuer.certificate)],
                "issuers": [{**doc["issuers"][0], "certificate": pem(rogue_issuer.certificate),
                             "thumbprint": thumbprint(rogue_issuer.certificate)}]}

    ca.policy_rewrite = swap
    ca.issuer = rogue_issuer  # what it would sign with, were it asked
    return rogue_root


def test_a_policy_with_a_swapped_root_is_trusted_for_nothing(ca: FakeCA, agent: Agent) -> None:
    _swapped(ca)
    _assert_untrusted(ca, agent, agent.pulse(utc_now()))


def test_a_policy_with_an_extra_root_beside_the_pinned_one_is_trusted_for_nothing(ca: FakeCA, agent: Agent) -> None:
    # The honest issuer, but the policy also slips in a root of its own: nothing of it is trusted.
    extra = Authority.root("Another Root")
    ca.policy_rewrite = lambda doc: {**doc, "roots": [*doc["roots"], pem(extra.certificate)]}
    _assert_untrusted(ca, agent, agent.pulse(utc_now()))


def test_an_installed_certificate_stays_valid_when_a_later_policy_swaps_the_root(ca: FakeCA, agent: Agent) -> None:
    current = _enrolled(agent)
    honest_root = ca.root
    rogue_root = _swapped(ca)
    result = agent.pulse(utc_now() + 330 * DAY)  # renewal is due: it must not go to the rogue issuer
    assert result.outcome == "failed" and result.outcomes == [] and ca.requests == 1, result
    assert [c.thumbprint for c in agent.store.certificates()] == [current]
    assert PinFile(agent.directory).load() == [honest_root.certificate]
    assert rogue_root.certificate not in agent.policies[0].trust.roots


def _cross(new_root: Authority, signer: Authority, *, public_key: Any = None, start: dt.datetime | None = None,
           end: dt.datetime | None = None) -> x509.Certificate:
    """A cross-certificate: ``new_root``'s subject (and by default key), signed by ``signer``."""
    begin = start or utc_now() - DAY
    return build_ca_certificate(subject=new_root.certificate.subject,
                                public_key=public_key or new_root.certificate.public_key(),
                                issuer_cert=signer.certificate, signing_key=signer.key, not_before=begin,
                                not_after=end or begin + 3650 * DAY, path_length=1)


def _rolled_over(ca: FakeCA, cross: Callable[[Authority], x509.Certificate]) -> Authority:
    """The CA rolls over to a new root and a new issuer under it, publishing ``cross(new_root)``."""
    new_root = Authority.root("Hostile Test Root R2")
    new_issuer = new_root.subordinate("issuing-r2")
    old_root = ca.root

    def rolled(doc: dict[str, Any]) -> dict[str, Any]:
        return {**doc, "roots": [pem(old_root.certificate), pem(new_root.certificate)],
                "cross_certificates": [pem(cross(new_root))],
                "intermediates": [pem(new_issuer.certificate)],
                "issuers": [{**doc["issuers"][0], "name": "issuing-r2", "certificate": pem(new_issuer.certificate),
                             "thumbprint": thumbprint(new_issuer.certificate)}]}

    ca.policy_rewrite = rolled
    ca.issuer = new_issuer
    return new_root


def test_a_root_cross_signed_by_the_pinned_root_is_pinned_and_its_issuer_used(ca: FakeCA, agent: Agent) -> None:
    old_root = ca.root
    new_root = _rolled_over(ca, lambda new: _cross(new, old_root))
    result = agent.pulse(utc_now())
    assert result.outcome == "ok", result.error
    [note] = result.trust_notes
    assert note.rule == "root-pinned" and "Hostile Test Root R2" in note.detail
    assert PinFile(agent.directory).load() == [old_root.certificate, new_root.certificate]  # persisted
    outcome, detail, installed = _outcome(result)
    assert outcome == "done" and installed is not None, detail
    # Pinned once: the next pulse finds nothing new to pin.
    again = agent.pulse(utc_now())
    assert again.trust_notes == [] and PinFile(agent.directory).load() == [old_root.certificate, new_root.certificate]


def _forged_cross(new: Authority) -> x509.Certificate:
    # Names the pinned root as issuer, signed with a key of the forger's.
    impostor = Authority(Authority.root("x").key, Authority.root("Hostile Test Root").certificate)
    return _cross(new, impostor)


CROSS_LIES = {
    "forged": _forged_cross,
    "expired": lambda new, old: _cross(new, old, start=utc_now() - 400 * DAY, end=utc_now() - 30 * DAY),
    "not-yet-valid": lambda new, old: _cross(new, old, start=utc_now() + 30 * DAY),
    "for-another-key": lambda new, old: _cross(new, old, public_key=Authority.root("k").certificate.public_key()),
    "signed-by-the-new-root-itself": lambda new, old: _cross(new, new),
}


@pytest.mark.parametrize("lie", list(CROSS_LIES))
def test_a_root_without_a_valid_cross_signature_is_refused(ca: FakeCA, agent: Agent, lie: str) -> None:
    old_root = ca.root
    make = CROSS_LIES[lie]
    _rolled_over(ca, (lambda new: make(new)) if lie == "forged" else (lambda new: make(new, old_root)))
    _assert_untrusted(ca, agent, agent.pulse(utc_now()))


# -- lies about the time: the Date header is measured, never trusted for more than a warning ------------

@pytest.mark.parametrize("date", ["yesterday", "Sat, 01 Jun 2030 12:08:00 -0000", "\x1b[2J" * 20,
                                  "Sat, 01 Jun 99999999999999999999 12:08:00 GMT", "Mon, 32 Foo 2030 25:61:61 GMT"])
def test_a_malformed_date_header_is_ignored(ca: FakeCA, agent: Agent, date: str) -> None:
    ca.policy_rewrite = lambda doc: httpx.Response(200, json=doc, headers={"Date": date})
    result = agent.pulse(utc_now())
    assert result.outcome == "ok" and [o.outcome for o in result.outcomes] == ["done"]
    assert agent.store.get_state("clock_skew") is None
    assert all(n.rule != "clock-skew" for n in result.trust_notes)


def test_a_date_years_away_is_a_warning_and_changes_nothing_else(ca: FakeCA, agent: Agent) -> None:
    ca.policy_rewrite = lambda doc: httpx.Response(200, json=doc, headers={"Date": "Fri, 01 Jan 2100 00:00:00 GMT"})
    result = agent.pulse(utc_now())
    assert result.outcome == "ok" and [o.outcome for o in result.outcomes] == ["done"]
    [note] = [n for n in result.trust_notes if n.rule == "clock-skew"]
    assert "behind the CA's" in note.detail and note.detail.endswith("check the clock (NTP)")
    assert agent.store.get_state("clock_skew")["exceeded"] is True
