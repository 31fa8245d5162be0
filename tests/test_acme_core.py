"""The ACME core in process (service.acme) over a CA made by the real CLI, on SQLite and
PostgreSQL: accounts bound by external account binding, orders checked against templates,
authorizations and challenges, finalize through the registration authority (with approval),
revocation and renewal information. The renewal window and certificate identifiers are pure
and tested table-style without a CA."""

from __future__ import annotations

import concurrent.futures
import dataclasses
import datetime as dt
import json
from collections.abc import Iterator
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from joserfc import jws
from joserfc.jwk import ECKey, OctKey
from joserfc.registry import HeaderParameter
from sqlalchemy import select, update

from certpulse import clock
from certpulse.ca.acme import renewal_info
from certpulse.ca.acme.model import (
    Account,
    AccountKey,
    Identifier,
    Order,
    Problem,
    ValidationJob,
    ValidationResult,
)
from certpulse.ca.acme.orders import submission_key
from certpulse.ca.admin import CAAdmin
from certpulse.ca.config import CADir
from certpulse.ca.model import Caller, EnrollmentRequest
from certpulse.ca.service import CAService
from certpulse.ca.setup import open_service, rollover_root
from certpulse.ca.storage import schema as t
from certpulse.ca.templates import parse_template, parse_template_toml
from certpulse.errors import Reason, Refusal
from certpulse.pki import ari, jose
from certpulse.pki.template_info import TEMPLATE_INFO_OID
from certpulse.sql.db import read, write
from support import CA, TEMPLATES, make_csr

NEW_ACCOUNT_URL = "https://ca.test/acme/new-account"
OPERATOR = Caller(kind="operator", name="tester")
WEB = "web1.example.internal"  # a machine principal in group webservers
PLAIN = "plain.example.internal"  # a machine principal in no group (may not enroll for webserver)


# -- pure: the renewal window and certificate identifiers ----------------------------------

T0 = dt.datetime(2030, 1, 1, tzinfo=dt.UTC)
DAY = dt.timedelta(days=1)


@pytest.mark.parametrize(("lifetime", "period", "lead"), [
    (90 * DAY, 30 * DAY, 18 * DAY),  # 20 % of 90 days is less than the 30-day period
    (365 * DAY, 42 * DAY, 42 * DAY),  # the period is less than 20 % of a year
    (10 * DAY, 42 * DAY, 2 * DAY),  # short-lived: 20 % of the lifetime
])
def test_window_lead_is_the_smaller_of_period_and_a_fifth(lifetime: dt.timedelta, period: dt.timedelta,
                                                          lead: dt.timedelta) -> None:
    for serial in (1, 2, 0xABCDEF, 2**150 + 7):
        w = renewal_info.renewal_window(not_before=T0, not_after=T0 + lifetime, serial=serial,
                                        renewal_period=period, revoked=False, superseded_major=False, now=T0)
        latest_start = T0 + lifetime - lead
        assert latest_start - lead / 4 < w.start <= latest_start
        assert w.end - w.start == lead / 4
        assert w.end <= latest_start + lead / 4
        assert w.explanation is None


def test_window_is_stable_per_serial_and_spread_across_serials() -> None:
    def start(serial: int) -> dt.datetime:
        return renewal_info.renewal_window(not_before=T0, not_after=T0 + 90 * DAY, serial=serial,
                                           renewal_period=30 * DAY, revoked=False, superseded_major=False,
                                           now=T0).start
    assert start(12345) == start(12345)
    starts = {start(s) for s in range(1, 200)}
    assert len(starts) > 190
    assert max(starts) - min(starts) > 18 * DAY / 4 * 0.8  # spread over most of L/4


@pytest.mark.parametrize(("revoked", "superseded"), [(True, False), (False, True), (True, True)])
def test_window_moves_into_the_past(revoked: bool, superseded: bool) -> None:
    now = T0 + 5 * DAY
    w = renewal_info.renewal_window(not_before=T0, not_after=T0 + 90 * DAY, serial=99, renewal_period=30 * DAY,
                                    revoked=revoked, superseded_major=superseded, now=now)
    assert w.start <= T0 and w.start < w.end < now
    assert w.explanation and ("revoked" if revoked else "major version") in w.explanation


@pytest.mark.parametrize("serial", [1, 127, 128, 255, 256, 2**159 - 1, 0x87654321])
def test_certificate_identifier_round_trip(serial: int) -> None:
    key_id = bytes(range(20))
    text = ari.encode(key_id, serial)
    assert "=" not in text
    assert ari.decode(text) == (key_id, serial)


def test_certificate_identifier_of_rfc_9773_example() -> None:
    # RFC 9773 section 4.1: keyIdentifier 69:88:5B:6B:87:46:40:41:E1:B3:7B:84:7B:A0:AE:2C:DE:01:C8:D4,
    # serial 00:87:65:43:21
    key_id = bytes.fromhex("69885B6B87464041E1B37B847BA0AE2CDE01C8D4")
    assert ari.encode(key_id, 0x87654321) == "aYhba4dGQEHhs3uEe6CuLN4ByNQ.AIdlQyE"


@pytest.mark.parametrize("garbage", ["", "abc", "a.b.c", "aYhba4dG.", ".AIdlQyE", "a+b.AIdlQyE", "aYhb.AIdl==",
                                     "aYhba4dG.AAE", "aYhba4dG.gA", "aYhba4dG." + "A" * 40, "\x00.\x00"])
def test_certificate_identifier_garbage_is_malformed(garbage: str) -> None:
    with pytest.raises(Refusal) as refused:
        ari.decode(garbage)
    assert refused.value.reason == Reason.MALFORMED_REQUEST



def test_trust_registered_names_is_a_template_option_off_by_default() -> None:
    base = (TEMPLATES / "webserver.toml").read_text()
    assert parse_template_toml(base, default_oid="2.999").trust_registered_names is False
    trusting = parse_template_toml(base + "\n[acme]\ntrust_registered_names = true\n", default_oid="2.999")
    assert trusting.trust_registered_names is True
    assert trusting.document()["acme"] == {"trust_registered_names": True}
    assert parse_template(trusting.document(), default_oid="2.999") == trusting
    with pytest.raises(Refusal) as typo:
        parse_template_toml(base + "\n[acme]\ntrust_registered_name = true\n", default_oid="2.999")
    assert typo.value.reason == Reason.INVALID_TEMPLATE and "acme.trust_registered_name" in typo.value.detail


# -- a CA, principals and helpers ------------------------------------------------------------

@dataclasses.dataclass
class World:
    ca: CA
    service: CAService
    admin: CAAdmin


@pytest.fixture(scope="module")
def world(ca: CA) -> Iterator[World]:
    service = open_service(CADir(ca.dir), pool_size=2)
    admin = CAAdmin(service, OPERATOR)
    now = clock.now()
    admin.add_principal(WEB, "machine", now, groups=["webservers"])
    admin.add_principal(PLAIN, "machine", now)
    text = (TEMPLATES / "webserver.toml").read_text().replace('name = "webserver"', 'name = "trusted-web"')
    text = text.replace('display_name = "Web server"', 'display_name = "Trusted"')
    admin.add_template(text + '\n[acme]\ntrust_registered_names = true\n', now)
    yield World(ca, service, admin)
    service.engine.dispose()


def new_key() -> tuple[ECKey, AccountKey]:
    key = ECKey.generate_key("P-256")
    public = key.as_dict(private=False)
    return key, AccountKey(public, jose.thumbprint(public))


def binding(admin: CAAdmin, principal: str, key: AccountKey, *, url: str = NEW_ACCOUNT_URL,
            payload: dict[str, Any] | None = None, expires: dt.timedelta | None = None) -> dict[str, Any]:
    made = admin.add_acme_eab(principal, clock.now(), expires)
    mac_key = OctKey.import_key(_b64(made["hmac_key"]))
    header = {"alg": "HS256", "kid": made["kid"], "url": url}
    return mac_signed(header, json.dumps(payload or dict(key.jwk)), mac_key)


MAC_REGISTRY = jws.JWSRegistry(header_registry={"url": HeaderParameter("ACME request URL", "str")},
                               algorithms=["HS256"])


def mac_signed(header: dict[str, Any], payload: str, key: OctKey) -> dict[str, Any]:
    """An external account binding as a client makes it: a flattened JWS MACed with the key."""
    return dict(jws.serialize_json({"protected": header}, payload, key, registry=MAC_REGISTRY))


def _b64(text: str) -> bytes:
    import base64
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def account_for(w: World, principal: str = WEB) -> Account:
    _, key = new_key()
    account, created = w.service.acme.new_account(
        key, contact=("mailto:ops@example.internal",), terms_agreed=True, only_return_existing=False,
        external_binding=binding(w.admin, principal, key), url=NEW_ACCOUNT_URL, now=clock.now())
    assert created
    return account


def refused(reason: Reason, call: Any, *args: Any, **kwargs: Any) -> Refusal:
    with pytest.raises(Refusal) as caught:
        call(*args, **kwargs)
    assert caught.value.reason == reason, caught.value.detail
    return caught.value


def validate_all(w: World, account: Account, order: Order, *, valid: bool = True,
                 seen: dict[str, Any] | None = None) -> None:
    now = clock.now()
    for authorization_id in order.authorization_ids:
        authz = w.service.acme.authorization(account, authorization_id, now)
        if authz.status == "valid":
            continue
        http = next(c for c in authz.challenges if c.type in ("http-01", "dns-01"))
        challenge, job = w.service.acme.respond_to_challenge(account, http.id, now)
        assert job is not None and challenge.status == "processing"
        assert job.key_authorization == f"{http.token}.{account.key_thumbprint}"
        problem = None if valid else Problem(Reason.VALIDATION_FAILED, "connection refused\x00", acme_type="connection")
        w.service.acme.record_validation(job, ValidationResult(valid, problem, seen or {"address": "127.0.0.1"}), now)


def request_of(w: World, order_id: int) -> int:
    """The registration authority's request an order was finalized into."""
    with read(w.service.engine) as conn:
        return int(conn.execute(select(t.acme_orders.c.request_id).where(t.acme_orders.c.id == order_id)).scalar_one())


def csr_der(names: list[str]) -> tuple[Any, bytes]:
    dns = [n for n in names if not n[0].isdigit()]
    ips = [n for n in names if n[0].isdigit()]
    key, pem_text = make_csr(dns=dns, ips=ips)
    der = x509.load_pem_x509_csr(pem_text.encode()).public_bytes(serialization.Encoding.DER)
    return key, der


def issued(w: World, account: Account, names: list[str],
           profile: str = "webserver") -> tuple[Order, x509.Certificate, Any]:
    order = w.service.acme.new_order(account, tuple(Identifier("dns", n) for n in names), profile=profile,
                                     not_before=None, not_after=None, replaces=None, now=clock.now())
    validate_all(w, account, order)
    key, der = csr_der(names)
    done = w.service.acme.finalize(account, order.id, der, clock.now())
    assert done.status == "valid" and done.certificate_id is not None
    chains = w.service.acme.certificate(account, done.certificate_id, 0, clock.now())
    leaf = x509.load_pem_x509_certificate(chains.pem.encode())
    return done, leaf, key


# -- accounts ----------------------------------------------------------------------------------

def test_account_with_binding_then_found_by_its_key(world: World) -> None:
    _, key = new_key()
    eab = binding(world.admin, WEB, key)
    now = clock.now()
    account, created = world.service.acme.new_account(
        key, contact=("mailto:a@example.internal",), terms_agreed=False, only_return_existing=False,
        external_binding=eab, url=NEW_ACCOUNT_URL, now=now)
    assert created and account.principal_name == WEB and account.status == "valid"
    assert account.eab_kid is not None and account.contact == ("mailto:a@example.internal",)
    again, created_again = world.service.acme.new_account(
        key, contact=(), terms_agreed=False, only_return_existing=True, external_binding=None,
        url=NEW_ACCOUNT_URL, now=now)
    assert (again.id, created_again) == (account.id, False)
    assert world.service.acme.account(account.id, now).id == account.id
    # the binding is spent: another key cannot use it
    _, other = new_key()
    replay = dict(eab)
    refused(Reason.MALFORMED_REQUEST, world.service.acme.new_account, other, contact=(), terms_agreed=True,
            only_return_existing=False, external_binding=replay, url=NEW_ACCOUNT_URL, now=now)
    with read(world.service.engine) as conn:
        row = conn.execute(select(t.acme_eab_keys).where(t.acme_eab_keys.c.account_id == account.id)).one()
        actions = set(conn.execute(select(t.audit.c.action)).scalars())
    assert row.used_at is not None
    assert {"acme-eab-created", "acme-account-created"} <= actions


def test_spent_binding_is_refused_for_its_own_key_payload(world: World) -> None:
    _, key = new_key()
    made = world.admin.add_acme_eab(WEB, clock.now())
    mac = OctKey.import_key(_b64(made["hmac_key"]))

    def eab_for(k: AccountKey) -> dict[str, Any]:
        header = {"alg": "HS256", "kid": made["kid"], "url": NEW_ACCOUNT_URL}
        return mac_signed(header, json.dumps(dict(k.jwk)), mac)
    now = clock.now()
    world.service.acme.new_account(key, contact=(), terms_agreed=True, only_return_existing=False,
                                   external_binding=eab_for(key), url=NEW_ACCOUNT_URL, now=now)
    _, second = new_key()
    problem = refused(Reason.UNAUTHENTICATED, world.service.acme.new_account, second, contact=(),
                      terms_agreed=True, only_return_existing=False, external_binding=eab_for(second),
                      url=NEW_ACCOUNT_URL, now=now)
    assert "already used" in problem.detail


def test_account_refusals(world: World) -> None:
    acme = world.service.acme
    now = clock.now()
    _, key = new_key()
    args: dict[str, Any] = {"contact": (), "terms_agreed": True, "only_return_existing": False, "now": now,
                            "url": NEW_ACCOUNT_URL}
    refused(Reason.EXTERNAL_ACCOUNT_REQUIRED, acme.new_account, key, external_binding=None, **args)
    refused(Reason.ACCOUNT_DOES_NOT_EXIST, acme.new_account, key, external_binding=None,
            **{**args, "only_return_existing": True})
    refused(Reason.MALFORMED_REQUEST, acme.new_account, key,
            external_binding=binding(world.admin, WEB, key, url="https://elsewhere/acme/new-account"), **args)
    _, other = new_key()
    refused(Reason.MALFORMED_REQUEST, acme.new_account, key,
            external_binding=binding(world.admin, WEB, key, payload=dict(other.jwk)), **args)
    expired = binding(world.admin, WEB, key, expires=dt.timedelta(seconds=1))
    refused(Reason.UNAUTHENTICATED, acme.new_account, key, external_binding=expired,
            **{**args, "now": now + dt.timedelta(minutes=5)})
    genuine = binding(world.admin, WEB, key)
    forged = mac_signed(json.loads(_b64(genuine["protected"])), json.dumps(dict(key.jwk)),
                        OctKey.import_key(b"wrong key " * 10))
    refused(Reason.UNAUTHENTICATED, acme.new_account, key, external_binding=forged, **args)
    unknown = binding(world.admin, WEB, key)
    unknown_header = json.loads(_b64(unknown["protected"]))
    unknown_header["kid"] = "no-such-kid"
    refused(Reason.UNAUTHENTICATED, acme.new_account, key,
            external_binding=mac_signed(unknown_header, json.dumps(dict(key.jwk)), OctKey.import_key(b"k" * 96)),
            **args)
    unknown_header["kid"] = "bad\x00kid"  # hostile: never reaches the database (PostgreSQL refuses NUL)
    refused(Reason.MALFORMED_REQUEST, acme.new_account, key,
            external_binding=mac_signed(unknown_header, json.dumps(dict(key.jwk)), OctKey.import_key(b"k" * 96)),
            **args)
    for hostile in ([1, 2], "text", 5, {"protected": 1, "payload": [], "signature": None}, {}):
        refused(Reason.MALFORMED_REQUEST, acme.new_account, key, external_binding=hostile, **args)
    for bad, reason in ((("tel:+1555",), Reason.UNSUPPORTED_CONTACT), (("mailto:a@b.example,c@d.example",),
                        Reason.INVALID_CONTACT), (("mailto:not an address",), Reason.INVALID_CONTACT),
                        (("mailto:a\x00@x.example",), Reason.INVALID_CONTACT),
                        (tuple(f"mailto:a{i}@x.example" for i in range(9)), Reason.INVALID_CONTACT)):
        refused(reason, acme.new_account, key, external_binding=binding(world.admin, WEB, key),
                **{**args, "contact": bad})
    assert acme.account_by_key(key.thumbprint) is None  # nothing was written by any refusal
    for unknown_id in (10**9, 0, -1, 10**30):  # any id a URL may carry: never a database error
        refused(Reason.ACCOUNT_DOES_NOT_EXIST, acme.account, unknown_id, now)


def test_terms_must_be_agreed_when_configured(world: World) -> None:
    acme = world.service.acme
    acme.accounts.config = dataclasses.replace(acme.config, terms_of_service="https://ca.test/terms")
    try:
        _, key = new_key()
        problem = refused(Reason.USER_ACTION_REQUIRED, acme.new_account, key, contact=(), terms_agreed=False,
                          only_return_existing=False, external_binding=binding(world.admin, WEB, key),
                          url=NEW_ACCOUNT_URL, now=clock.now())
        assert problem.extra["instance"] == "https://ca.test/terms"
    finally:
        acme.accounts.config = acme.config


def test_update_deactivate_and_key_change(world: World) -> None:
    acme = world.service.acme
    account = account_for(world)
    other = account_for(world)
    now = clock.now()
    updated = acme.update_account(account, contact=("mailto:new@example.internal",), deactivate=False, now=now)
    assert updated.contact == ("mailto:new@example.internal",)
    problem = refused(Reason.CONFLICT, acme.change_key, account,
                      AccountKey(other.jwk, other.key_thumbprint), now)
    assert problem.extra["account_id"] == other.id
    _, fresh = new_key()
    rolled = acme.change_key(account, fresh, now)
    assert rolled.key_thumbprint == fresh.thumbprint
    assert acme.account_by_key(account.key_thumbprint) is None
    gone = acme.update_account(rolled, contact=None, deactivate=True, now=now)
    assert gone.status == "deactivated"
    refused(Reason.UNAUTHENTICATED, acme.account, account.id, now)
    refused(Reason.UNAUTHENTICATED, acme.new_account, fresh, contact=(), terms_agreed=True,
            only_return_existing=True, external_binding=None, url=NEW_ACCOUNT_URL, now=now)


def test_disabled_principal_opens_no_account(world: World) -> None:
    name = "gone.example.internal"
    world.admin.add_principal(name, "machine", clock.now(), groups=["webservers"])
    account = account_for(world, name)
    world.admin.set_principal_enabled(name, False, clock.now())
    refused(Reason.UNAUTHENTICATED, world.service.acme.account, account.id, clock.now())
    world.admin.set_principal_enabled(name, True, clock.now())
    assert world.service.acme.account(account.id, clock.now()).id == account.id
    world.admin.remove_principal(name, clock.now())
    refused(Reason.UNAUTHENTICATED, world.service.acme.account, account.id, clock.now())
    refused(Reason.NOT_FOUND, world.admin.add_acme_eab, name, clock.now())


# -- orders --------------------------------------------------------------------------------------

def test_directory_meta_lists_enrollable_templates(world: World) -> None:
    meta = world.service.acme.directory_meta(clock.now())
    assert meta.profiles["webserver"] == "Web server" and meta.profiles["trusted-web"] == "Trusted"
    assert meta.external_account_required is True
    assert meta.default_profile == sorted(meta.profiles)[0]


def test_order_lifecycle_issues_like_native(world: World) -> None:
    acme = world.service.acme
    account = account_for(world)
    now = clock.now()
    names = ("site.example.internal", "Www.Example.Internal.", "site.example.internal")
    order = acme.new_order(account, (*(Identifier("dns", n) for n in names), Identifier("ip", "127.0.0.1")),
                           profile="webserver", not_before=None, not_after=None, replaces=None, now=now)
    assert order.status == "pending" and order.profile == "webserver"
    assert [i.value for i in order.identifiers] == ["site.example.internal", "www.example.internal", "127.0.0.1"]
    kinds = [sorted(c.type for c in acme.authorization(account, a, now).challenges) for a in order.authorization_ids]
    assert kinds == [["dns-01", "http-01", "tls-alpn-01"]] * 2 + [["http-01", "tls-alpn-01"]]
    refused(Reason.ORDER_NOT_READY, acme.finalize, account, order.id, csr_der(["site.example.internal"])[1], now)
    validate_all(world, account, order)
    ready = acme.order(account, order.id, now)
    assert ready.status == "ready"
    # a CSR whose names are not exactly the order's: badCSR, and the order stays ready
    problem = refused(Reason.MALFORMED_CSR, acme.finalize, account, order.id,
                      csr_der(["site.example.internal", "other.example.internal"])[1], now)
    assert "other.example.internal" in problem.detail
    assert acme.order(account, order.id, now).status == "ready"
    _, der = csr_der(["www.example.internal", "site.example.internal", "127.0.0.1"])
    done = acme.finalize(account, order.id, der, clock.now())
    assert done.status == "valid" and done.certificate_id is not None
    chains = acme.certificate(account, done.certificate_id, 0, clock.now())
    assert chains.pem.count("BEGIN CERTIFICATE") >= 3 and chains.alternates == 0
    leaf = x509.load_pem_x509_certificate(chains.pem.encode())
    assert leaf.extensions.get_extension_for_oid(TEMPLATE_INFO_OID) is not None
    with read(world.service.engine) as conn:
        request = conn.execute(select(t.requests).where(t.requests.c.certificate_id == done.certificate_id)).one()
        issued_rows = conn.execute(select(t.audit).where(t.audit.c.request_id == request.id)).all()
    assert request.requester == f"principal:{WEB}" and request.template_name == "webserver"
    assert [r.action for r in issued_rows] == ["issued"]
    # the certificate is the account's only: another account cannot fetch it
    refused(Reason.NOT_FOUND, acme.certificate, account_for(world), done.certificate_id, 0, clock.now())
    refused(Reason.NOT_FOUND, acme.certificate, account, done.certificate_id, 1, clock.now())
    page = acme.orders(account, after=None, limit=10, now=now)
    assert order.id in page.order_ids
    for huge in (10**30, -5):
        refused(Reason.NOT_FOUND, acme.order, account, huge, now)
        refused(Reason.NOT_FOUND, acme.authorization, account, huge, now)
        refused(Reason.NOT_FOUND, acme.challenge, account, huge, now)
        refused(Reason.NOT_FOUND, acme.certificate, account, huge, 0, now)
    refused(Reason.MALFORMED_REQUEST, acme.orders, account, after=10**30, limit=10, now=now)



def test_finalize_refusals_leave_the_order_ready_or_invalid(world: World) -> None:
    acme = world.service.acme
    name = "moved.example.internal"
    world.admin.add_principal(name, "machine", clock.now(), groups=["webservers"])
    account = account_for(world, name)
    order = acme.new_order(account, (Identifier("dns", "k.example.internal"),), profile="webserver",
                           not_before=None, not_after=None, replaces=None, now=clock.now())
    validate_all(world, account, order)
    # a key the template does not allow: the client may send another CSR
    _, p521 = make_csr(ec.generate_private_key(ec.SECP521R1()), dns=["k.example.internal"])
    refused(Reason.KEY_NOT_ALLOWED, acme.finalize, account, order.id,
            x509.load_pem_x509_csr(p521.encode()).public_bytes(serialization.Encoding.DER), clock.now())
    assert acme.order(account, order.id, clock.now()).status == "ready"
    refused(Reason.MALFORMED_CSR, acme.finalize, account, order.id, b"not a CSR", clock.now())
    # the principal lost its right to the template meanwhile: final, the order is invalid with it
    world.admin.set_groups(name, clock.now(), [], ["webservers"])
    refused(Reason.TEMPLATE_NOT_PERMITTED, acme.finalize, account, order.id, csr_der(["k.example.internal"])[1],
            clock.now())
    invalid = acme.order(account, order.id, clock.now())
    assert invalid.status == "invalid" and invalid.error is not None
    assert invalid.error.reason == Reason.TEMPLATE_NOT_PERMITTED
    refused(Reason.ORDER_NOT_READY, acme.finalize, account, order.id, csr_der(["k.example.internal"])[1],
            clock.now())



def test_a_claim_left_by_a_dead_finalizer_is_settled(world: World) -> None:
    """A finalize that claimed its order (processing) and died before recording the outcome:
    the order follows the request it submitted, or is ready again when it submitted none."""
    acme = world.service.acme
    account = account_for(world)
    orders = []
    for name in ("dead1.example.internal", "dead2.example.internal"):
        order = acme.new_order(account, (Identifier("dns", name),), profile="webserver", not_before=None,
                               not_after=None, replaces=None, now=clock.now())
        validate_all(world, account, order)
        orders.append(order)
    claimed_at = clock.now()
    with write(world.service.engine) as conn:
        conn.execute(update(t.acme_orders).where(t.acme_orders.c.id.in_([o.id for o in orders]))
                     .values(status="processing", updated_at=claimed_at))
        caller = world.service.auth.principal_by_id(conn, account.principal_id)
    assert caller is not None
    world.service.requests.submit(caller, EnrollmentRequest(
        template="webserver", csr=csr_der(["dead1.example.internal"])[1],
        idempotency_key=submission_key(orders[0].id)), claimed_at)
    assert acme.order(account, orders[0].id, claimed_at + dt.timedelta(minutes=1)).status == "processing"
    later = claimed_at + dt.timedelta(minutes=6)
    settled = acme.order(account, orders[0].id, later)
    assert settled.status == "valid" and settled.certificate_id is not None
    assert acme.order(account, orders[1].id, later).status == "ready"


def test_rejected_identifiers_each_get_a_subproblem(world: World) -> None:
    account = account_for(world)
    idents = (Identifier("dns", "ok.example.internal"), Identifier("dns", "evil.example.com"),
              Identifier("dns", "*.example.internal"), Identifier("ip", "192.0.2.1"), Identifier("dns", "bad..name"))
    problem = refused(Reason.REJECTED_IDENTIFIER, world.service.acme.new_order, account, idents, profile="webserver",
                      not_before=None, not_after=None, replaces=None, now=clock.now())
    subs = problem.extra["subproblems"]
    assert [s.identifier.value for s in subs] == ["evil.example.com", "*.example.internal", "192.0.2.1", "bad..name"]
    assert all(s.reason == Reason.REJECTED_IDENTIFIER for s in subs)



def test_hostile_order_input_is_refused_cleanly(world: World) -> None:
    """Oversized, unprintable and odd values from the network: a clear refusal, never a database
    error (PostgreSQL refuses NUL in text and values longer than their column)."""
    acme = world.service.acme
    account = account_for(world)
    args: dict[str, Any] = {"not_before": None, "not_after": None, "now": clock.now()}
    for identifier in (Identifier("dns", "a" * 10_000 + ".example.internal"),
                       Identifier("dns", "x\x00.example.internal"), Identifier("ip", "::1%eth0"),
                       Identifier("ip", "1.2.3.4.5"), Identifier("dns", "\u202e.example")):
        problem = refused(Reason.REJECTED_IDENTIFIER, acme.new_order, account, (identifier,), profile="webserver",
                          replaces=None, **args)
        assert len(problem.detail) < 600 and problem.detail.isprintable()
    refused(Reason.UNSUPPORTED_IDENTIFIER, acme.new_order, account,
            (Identifier("email", "a@b.example"),), profile="webserver", replaces=None, **args)  # type: ignore[arg-type]
    refused(Reason.MALFORMED_REQUEST, acme.new_order, account, (Identifier("dns", 5),),  # type: ignore[arg-type]
            profile="webserver", replaces=None, **args)
    refused(Reason.INVALID_PROFILE, acme.new_order, account, (Identifier("dns", "a.example.internal"),),
            profile="p\x00" * 5000, replaces=None, **args)
    refused(Reason.MALFORMED_REQUEST, acme.new_order, account, (Identifier("dns", "a.example.internal"),),
            profile="webserver", replaces="A" * 5000 + "." + "B" * 5000, **args)
    refused(Reason.REJECTED_IDENTIFIER, acme.new_order, account,
            tuple(Identifier("dns", f"n{i}.example.internal") for i in range(101)), profile="webserver",
            replaces=None, **args)


def test_profile_refusals(world: World) -> None:
    acme = world.service.acme
    account = account_for(world)
    plain = account_for(world, PLAIN)
    one = (Identifier("dns", "a.example.internal"),)
    args: dict[str, Any] = {"not_before": None, "not_after": None, "replaces": None, "now": clock.now()}
    refused(Reason.INVALID_PROFILE, acme.new_order, account, one, profile="no-such", **args)
    refused(Reason.TEMPLATE_NOT_PERMITTED, acme.new_order, plain, one, profile="webserver", **args)
    too_long = clock.now() + dt.timedelta(days=400)
    refused(Reason.MALFORMED_REQUEST, acme.new_order, account, one, profile="webserver",
            **{**args, "not_after": too_long})
    refused(Reason.MALFORMED_REQUEST, acme.new_order, account, (), profile="webserver", **args)
    refused(Reason.MALFORMED_REQUEST, acme.new_order, account, one, profile="webserver",
            **{**args, "replaces": "not-an-identifier"})



def test_a_template_no_issuer_serves_is_no_profile(world: World) -> None:
    text = (TEMPLATES / "webserver.toml").read_text().replace('name = "webserver"', 'name = "a-unserved"')
    world.admin.add_template(text, clock.now(), issuers=[])
    assert "a-unserved" not in world.service.acme.directory_meta(clock.now()).profiles
    refused(Reason.INVALID_PROFILE, world.service.acme.new_order, account_for(world),
            (Identifier("dns", "u.example.internal"),), profile="a-unserved", not_before=None, not_after=None,
            replaces=None, now=clock.now())


def test_failed_validation_invalidates_the_order(world: World) -> None:
    acme = world.service.acme
    account = account_for(world)
    order = acme.new_order(account, (Identifier("dns", "fail.example.internal"),), profile="webserver",
                           not_before=None, not_after=None, replaces=None, now=clock.now())
    validate_all(world, account, order, valid=False, seen={"answer": "\x00\x1b[31m" * 5000})
    now = clock.now()
    failed = acme.order(account, order.id, now)
    assert failed.status == "invalid" and failed.error is not None
    assert failed.error.subproblems[0].identifier == Identifier("dns", "fail.example.internal")
    authz = acme.authorization(account, order.authorization_ids[0], now)
    assert authz.status == "invalid"
    bad = next(c for c in authz.challenges if c.status == "invalid")
    assert bad.error is not None and bad.error.acme_type == "connection"
    # nothing more to start
    assert acme.respond_to_challenge(account, bad.id, now)[1] is None


def test_a_challenge_left_processing_is_handed_out_again(world: World) -> None:
    acme = world.service.acme
    account = account_for(world)
    now = clock.now()
    order = acme.new_order(account, (Identifier("dns", "slow.example.internal"),), profile="webserver",
                           not_before=None, not_after=None, replaces=None, now=now)
    challenge = acme.authorization(account, order.authorization_ids[0], now).challenges[0]
    assert acme.respond_to_challenge(account, challenge.id, now)[1] is not None
    assert acme.respond_to_challenge(account, challenge.id, now + dt.timedelta(seconds=1))[1] is None
    later = now + 3 * acme.config.duration("validation_timeout")
    again = acme.respond_to_challenge(account, challenge.id, later)[1]
    assert again is not None
    stale = ValidationJob(challenge.id, challenge.type, again.identifier, "another-token", again.key_authorization)
    acme.record_validation(stale, ValidationResult(True), later)  # a result for another token changes nothing
    assert acme.challenge(account, challenge.id, later).status == "processing"
    acme.record_validation(again, ValidationResult(True), later)
    assert acme.challenge(account, challenge.id, later).status == "valid"
    # another account sees none of it
    refused(Reason.NOT_FOUND, acme.challenge, account_for(world), challenge.id, later)
    refused(Reason.NOT_FOUND, acme.order, account_for(world), order.id, later)


def test_deactivated_authorization_invalidates_the_order(world: World) -> None:
    acme = world.service.acme
    account = account_for(world)
    now = clock.now()
    order = acme.new_order(account, (Identifier("dns", "deact.example.internal"),), profile="webserver",
                           not_before=None, not_after=None, replaces=None, now=now)
    authz = acme.deactivate_authorization(account, order.authorization_ids[0], now)
    assert authz.status == "deactivated"
    assert acme.order(account, order.id, now).status == "invalid"


def test_expired_order_is_invalid(world: World) -> None:
    acme = world.service.acme
    account = account_for(world)
    now = clock.now()
    order = acme.new_order(account, (Identifier("dns", "late.example.internal"),), profile="webserver",
                           not_before=None, not_after=None, replaces=None, now=now)
    later = now + acme.config.duration("order_lifetime") + dt.timedelta(seconds=1)
    assert acme.order(account, order.id, later).status == "invalid"
    assert acme.authorization(account, order.authorization_ids[0], later).status == "expired"


def test_trusted_registered_name_needs_no_challenge(world: World) -> None:
    acme = world.service.acme
    account = account_for(world)
    now = clock.now()
    order = acme.new_order(account, (Identifier("dns", WEB),), profile="trusted-web", not_before=None,
                           not_after=None, replaces=None, now=now)
    assert order.status == "ready"
    authz = acme.authorization(account, order.authorization_ids[0], now)
    assert authz.status == "valid" and authz.challenges == ()
    # another name under the same template still needs a challenge; the option is off elsewhere
    other = acme.new_order(account, (Identifier("dns", WEB), Identifier("dns", "x.example.internal")),
                           profile="trusted-web", not_before=None, not_after=None, replaces=None, now=now)
    assert other.status == "pending"
    plain = acme.new_order(account, (Identifier("dns", WEB),), profile="webserver", not_before=None,
                           not_after=None, replaces=None, now=now)
    assert plain.status == "pending"


def test_approval_template_processing_until_approved(world: World) -> None:
    acme = world.service.acme
    account = account_for(world)
    now = clock.now()
    # approval-required names certificates after the principal: only its own name can be ordered
    refused(Reason.REJECTED_IDENTIFIER, acme.new_order, account, (Identifier("dns", "x.example.internal"),),
            profile="approval-required", not_before=None, not_after=None, replaces=None, now=now)
    order = acme.new_order(account, (Identifier("dns", WEB),), profile="approval-required", not_before=None,
                           not_after=None, replaces=None, now=now)
    validate_all(world, account, order)
    processing = acme.finalize(account, order.id, csr_der([WEB])[1], clock.now())
    assert processing.status == "processing" and processing.retry_after == dt.timedelta(seconds=60)
    assert acme.order(account, order.id, clock.now()).status == "processing"
    world.service.requests.approve(OPERATOR, request_of(world, order.id), clock.now())
    valid = acme.order(account, order.id, clock.now())
    assert valid.status == "valid" and valid.certificate_id is not None
    # a denied one: invalid, with the manager's reason
    second = acme.new_order(account, (Identifier("dns", WEB),), profile="approval-required", not_before=None,
                            not_after=None, replaces=None, now=clock.now())
    validate_all(world, account, second)
    acme.finalize(account, second.id, csr_der([WEB])[1], clock.now())
    world.service.requests.deny(OPERATOR, request_of(world, second.id), "not this one", clock.now())
    denied = acme.order(account, second.id, clock.now())
    assert denied.status == "invalid" and denied.error is not None and "not this one" in denied.error.detail


def test_replaces_links_lineage_and_only_once(world: World) -> None:
    acme = world.service.acme
    account = account_for(world)
    old_order, old, _ = issued(world, account, ["renew.example.internal"])
    cert_id = ari.certificate_id(old)
    now = clock.now()
    order = acme.new_order(account, (Identifier("dns", "renew.example.internal"),), profile=None, not_before=None,
                           not_after=None, replaces=cert_id, now=now)
    assert order.replaces == cert_id and order.profile == "webserver"
    second = acme.new_order(account, (Identifier("dns", "renew.example.internal"),), profile=None, not_before=None,
                            not_after=None, replaces=cert_id, now=now)
    validate_all(world, account, order)
    validate_all(world, account, second)
    done = acme.finalize(account, order.id, csr_der(["renew.example.internal"])[1], clock.now())
    with read(world.service.engine) as conn:
        request = conn.execute(select(t.requests).where(t.requests.c.certificate_id == done.certificate_id)).one()
    assert request.kind == "renewal" and request.renewal_of == old_order.certificate_id
    refused(Reason.ALREADY_REPLACED, acme.finalize, account, second.id, csr_der(["renew.example.internal"])[1],
            clock.now())
    refused(Reason.ALREADY_REPLACED, acme.new_order, account, (Identifier("dns", "renew.example.internal"),),
            profile=None, not_before=None, not_after=None, replaces=cert_id, now=clock.now())
    # a certificate of another principal cannot be replaced
    plain = account_for(world, PLAIN)
    refused(Reason.MALFORMED_REQUEST, acme.new_order, plain, (Identifier("dns", PLAIN),), profile="machine",
            not_before=None, not_after=None, replaces=cert_id, now=clock.now())


# -- revocation and renewal information ----------------------------------------------------------

def test_renewal_info_then_revocation_by_account(world: World) -> None:
    acme = world.service.acme
    account = account_for(world)
    _, leaf, _ = issued(world, account, ["ari.example.internal"])
    now = clock.now()
    info = acme.renewal_info(ari.certificate_id(leaf), now)
    lifetime = leaf.not_valid_after_utc - leaf.not_valid_before_utc
    lead = min(dt.timedelta(days=30), lifetime / 5)
    assert leaf.not_valid_after_utc - lead - lead / 4 <= info.start <= leaf.not_valid_after_utc - lead
    assert info.retry_after == dt.timedelta(hours=6)
    refused(Reason.NOT_FOUND, acme.renewal_info, ari.encode(b"\x01" * 20, leaf.serial_number), now)
    refused(Reason.MALFORMED_REQUEST, acme.renewal_info, "garbage", now)
    der = leaf.public_bytes(serialization.Encoding.DER)
    refused(Reason.BAD_REVOCATION_REASON, acme.revoke, der, 6, account=account, signer_jwk=None, now=now)
    refused(Reason.FORBIDDEN, acme.revoke, der, 1, account=account_for(world, PLAIN), signer_jwk=None, now=now)
    acme.revoke(der, 4, account=account, signer_jwk=None, now=now)
    status = world.service.revocation.status(format(leaf.serial_number, "x"), now)
    assert status.status == "revoked" and status.revocation_reason == "superseded"
    refused(Reason.ALREADY_REVOKED, acme.revoke, der, None, account=account, signer_jwk=None, now=now)
    past = acme.renewal_info(ari.certificate_id(leaf), clock.now())
    assert past.end < clock.now() and past.explanation and "revoked" in past.explanation


def test_revocation_by_certificate_key(world: World) -> None:
    acme = world.service.acme
    account = account_for(world)
    _, leaf, key = issued(world, account, ["bykey.example.internal"])
    der = leaf.public_bytes(serialization.Encoding.DER)
    now = clock.now()
    stranger = ECKey.import_key(ec.generate_private_key(ec.SECP256R1()).public_key()).as_dict(private=False)
    refused(Reason.FORBIDDEN, acme.revoke, der, 1, account=None, signer_jwk=stranger, now=now)
    own = ECKey.import_key(key.public_key()).as_dict(private=False)
    acme.revoke(der, 1, account=None, signer_jwk=own, now=now)
    status = world.service.revocation.status(format(leaf.serial_number, "x"), now)
    assert status.revocation_reason == "keyCompromise"


def test_reenroll_all_moves_the_window_into_the_past(world: World) -> None:
    acme = world.service.acme
    account = account_for(world)
    _, leaf, _ = issued(world, account, [WEB], profile="trusted-web")
    before = acme.renewal_info(ari.certificate_id(leaf), clock.now())
    assert before.start > clock.now()
    world.admin.reenroll_all("trusted-web", clock.now())
    after = acme.renewal_info(ari.certificate_id(leaf), clock.now())
    assert after.end < clock.now() and after.explanation and "major version" in after.explanation


def test_unbound_accounts_act_as_the_configured_principal(world: World) -> None:
    acme = world.service.acme
    now = clock.now()
    _, key = new_key()
    args: dict[str, Any] = {"contact": (), "terms_agreed": True, "only_return_existing": False,
                            "external_binding": None, "url": NEW_ACCOUNT_URL, "now": now}
    acme.accounts.config = dataclasses.replace(acme.config, external_account_required=False)
    try:
        refused(Reason.EXTERNAL_ACCOUNT_REQUIRED, acme.new_account, key, **args)  # no unbound principal named
        acme.accounts.config = dataclasses.replace(acme.config, external_account_required=False,
                                                   unbound_principal=PLAIN)
        account, created = acme.new_account(key, **args)
        assert created and account.principal_name == PLAIN and account.eab_kid is None
    finally:
        acme.accounts.config = acme.config


def test_binding_must_be_hs256(world: World) -> None:
    _, key = new_key()
    made = world.admin.add_acme_eab(WEB, clock.now())
    header = {"alg": "HS384", "kid": made["kid"], "url": NEW_ACCOUNT_URL}
    registry = jws.JWSRegistry(header_registry={"url": HeaderParameter("ACME request URL", "str")},
                               algorithms=["HS384"])
    eab = dict(jws.serialize_json({"protected": header}, json.dumps(dict(key.jwk)),
                                  OctKey.import_key(_b64(made["hmac_key"])), registry=registry))
    refused(Reason.BAD_SIGNATURE_ALGORITHM, world.service.acme.new_account, key, contact=(), terms_agreed=True,
            only_return_existing=False, external_binding=eab, url=NEW_ACCOUNT_URL, now=clock.now())


def test_without_a_profile_the_first_template_that_allows_the_names(world: World) -> None:
    acme = world.service.acme
    account = account_for(world)
    now = clock.now()
    # approval-required comes first by name but only certifies the principal's own name
    web = acme.new_order(account, (Identifier("dns", "any.example.internal"),), profile=None, not_before=None,
                         not_after=None, replaces=None, now=now)
    own = acme.new_order(account, (Identifier("dns", WEB),), profile=None, not_before=None, not_after=None,
                         replaces=None, now=now)
    assert (web.profile, own.profile) == ("trusted-web", "approval-required")
    refused(Reason.REJECTED_IDENTIFIER, acme.new_order, account, (Identifier("dns", "x.example.com"),), profile=None,
            not_before=None, not_after=None, replaces=None, now=now)



def test_validations_finishing_together_make_the_order_ready(world: World) -> None:
    acme = world.service.acme
    account = account_for(world)
    for round_ in range(3):
        now = clock.now()
        names = tuple(Identifier("dns", f"c{round_}-{i}.example.internal") for i in range(4))
        order = acme.new_order(account, names, profile="webserver", not_before=None, not_after=None,
                               replaces=None, now=now)
        jobs = []
        for authorization_id in order.authorization_ids:
            challenge = acme.authorization(account, authorization_id, now).challenges[0]
            job = acme.respond_to_challenge(account, challenge.id, now)[1]
            assert job is not None
            jobs.append(job)
        with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
            list(pool.map(lambda job, at=now: acme.record_validation(job, ValidationResult(True), at), jobs))
        assert acme.order(account, order.id, now).status == "ready"


def test_after_root_rollover_an_alternate_chain_reaches_the_old_root(world: World) -> None:
    """Last in the module: it rolls the CA over to a new root (new issuer, old ones disabled)."""
    acme = world.service.acme
    account = account_for(world)
    before, _, _ = issued(world, account, ["before.example.internal"])
    assert acme.certificate(account, before.certificate_id or 0, 0, clock.now()).alternates == 0
    old_root = x509.load_pem_x509_certificate((world.ca.dir / "certs" / "root.pem").read_bytes())
    new_root, cross, _ = rollover_root(CADir(world.ca.dir), world.service, key_type="ec-p256", now=clock.now())
    after, _, _ = issued(world, account, ["after.example.internal"])
    main = acme.certificate(account, after.certificate_id or 0, 0, clock.now())
    assert main.alternates == 1
    alternate = acme.certificate(account, after.certificate_id or 0, 1, clock.now())
    main_chain = x509.load_pem_x509_certificates(main.pem.encode())
    other_chain = x509.load_pem_x509_certificates(alternate.pem.encode())
    assert main_chain[0] == other_chain[0] and main_chain[-1] == new_root
    assert other_chain[-2:] == [cross, old_root]
    refused(Reason.NOT_FOUND, acme.certificate, account, after.certificate_id or 0, 2, clock.now())
