"""Enrollment through a real ``certpulse ca serve`` over loopback: what a certificate holds,
names from the request, renewal, key archival, RA co-signatures, the policy and TLS."""

from __future__ import annotations

import base64
import datetime as dt
import ipaddress
import re
import ssl
import time
import tomllib
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, ExtensionOID, NameOID

from certpulse.pki import key_archival, template_info
from certpulse.pki.build import BACKDATE
from certpulse.pki.keys import PrivateKey
from certpulse.pki.signing import sign_bytes
from support import (
    CA,
    Client,
    assert_chains_to_root,
    assert_problem,
    cli_json,
    csr_der,
    load_cert,
    make_csr,
    new_key,
    renewal_evidence,
    serve,
)

SERVER_AUTH = ExtendedKeyUsageOID.SERVER_AUTH
CLIENT_AUTH = ExtendedKeyUsageOID.CLIENT_AUTH
RA_EKU = x509.ObjectIdentifier("1.3.6.1.4.1.311.20.2.1")
DAY = dt.timedelta(days=1)
SECOND = dt.timedelta(seconds=1)


def new_principal(ca: CA, server: str, prefix: str, *extra: str) -> tuple[str, Client]:
    """A principal of this test's own (so its name is known), enrolled over HTTP."""
    name = f"{prefix}-{uuid.uuid4().hex[:8]}.example.internal"
    return name, Client.enrolled(server, ca.add_principal(name, *extra))


def add_template(ca: CA, tmp_path: Path, text: str) -> None:
    path = tmp_path / f"template-{uuid.uuid4().hex[:8]}.toml"
    path.write_text(text)
    ca.cli("template", "add", str(path))


def requester_name(client: Client, request_id: int) -> str:
    response = client.http.get(f"/v1/requests/{request_id}")
    assert response.status_code == 200, response.text
    requester: str = response.json()["requester"]
    assert requester.startswith("principal:"), requester
    return requester.removeprefix("principal:")


def csr_pem(csr: x509.CertificateSigningRequest) -> str:
    return csr.public_bytes(serialization.Encoding.PEM).decode()


def public_der(key: Any) -> bytes:
    return bytes(key.public_bytes(serialization.Encoding.DER,
                                  serialization.PublicFormat.SubjectPublicKeyInfo))


def sans(cert: x509.Certificate) -> list[x509.GeneralName]:
    return list(cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value)


def ekus(cert: x509.Certificate) -> list[x509.ObjectIdentifier]:
    return list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)


def issued(response: httpx.Response) -> tuple[dict[str, Any], x509.Certificate]:
    assert response.status_code == 201, response.text
    body: dict[str, Any] = response.json()
    assert body["status"] == "issued", body
    return body, load_cert(body["certificate"])


def policy_template(client: Client, name: str) -> dict[str, Any]:
    response = client.http.get("/v1/policy")
    assert response.status_code == 200, response.text
    found = [x for x in response.json()["templates"] if x["name"] == name]
    assert len(found) == 1, response.json()["templates"]
    return dict(found[0])


# -- what a certificate holds -------------------------------------------------------------

def test_machine_certificate_is_built_from_the_template_not_the_csr(ca: CA, machine: Client) -> None:
    key = new_key()
    hostile = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "intruder.example.com"),
                                 x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Intruders")]))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=True,
                                     key_encipherment=True, data_encipherment=False,
                                     key_agreement=False, key_cert_sign=True, crl_sign=True,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CODE_SIGNING,
                                              ExtendedKeyUsageOID.OCSP_SIGNING]), critical=False)
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("intruder.example.com")]),
                       critical=False)
        .sign(key, hashes.SHA256())
    )
    body, cert = issued(machine.submit("machine", csr_pem(hostile)))

    issuer = assert_chains_to_root(ca, body["certificate"], body["chain"])
    assert cert.issuer == issuer.subject
    assert public_der(cert.public_key()) == public_der(key.public_key())

    name = requester_name(machine, body["id"])
    assert re.fullmatch(r"host-[0-9a-f]{8}\.example\.internal", name)
    assert cert.subject == x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    assert sans(cert) == [x509.DNSName(name)]

    assert ekus(cert) == [CLIENT_AUTH, SERVER_AUTH]
    usage = cert.extensions.get_extension_for_class(x509.KeyUsage)
    assert usage.critical
    assert usage.value.digital_signature
    assert not (usage.value.key_cert_sign or usage.value.crl_sign or usage.value.key_encipherment
                or usage.value.content_commitment)
    constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert constraints.critical and constraints.value.ca is False
    present = {ext.oid for ext in cert.extensions}
    assert present == {
        ExtensionOID.BASIC_CONSTRAINTS, ExtensionOID.KEY_USAGE,
        ExtensionOID.EXTENDED_KEY_USAGE, ExtensionOID.SUBJECT_ALTERNATIVE_NAME,
        ExtensionOID.SUBJECT_KEY_IDENTIFIER, ExtensionOID.AUTHORITY_KEY_IDENTIFIER,
        template_info.TEMPLATE_INFO_OID,
    }

    info = template_info.decode(cert)
    assert info is not None
    assert info.oid == policy_template(machine, "machine")["oid"]
    assert (info.major, info.minor) == (1, 0)

    assert cert.not_valid_after_utc - cert.not_valid_before_utc == 365 * DAY - SECOND
    now = dt.datetime.now(dt.UTC)
    # Backdated (a machine whose clock lags the CA's holds it at once), inside the validity.
    assert abs(cert.not_valid_before_utc - (now - BACKDATE)) < dt.timedelta(minutes=2)

    # Serials: positive, at most 20 octets, and drawn from well over 64 random bits.
    serials = [cert.serial_number, *(int(machine.enroll("machine")[1]["serial"], 16) for _ in range(3))]
    assert body["serial"] == format(cert.serial_number, "x")
    assert len(set(serials)) == len(serials)
    for serial in serials:
        assert 0 < serial < 2**159
        assert serial.bit_length() > 64


def test_webserver_certificate_holds_exactly_the_requested_names(machine: Client) -> None:
    dns = ["www.example.internal", "api.example.internal"]
    ips = ["127.0.0.1", "::1"]
    _key, csr = make_csr(cn="www.example.internal", dns=dns, ips=ips)
    _body, cert = issued(machine.submit("webserver", csr))
    assert cert.subject == x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "www.example.internal")])
    assert sans(cert) == [*(x509.DNSName(d) for d in dns),
                          *(x509.IPAddress(ipaddress.ip_address(i)) for i in ips)]
    assert ekus(cert) == [SERVER_AUTH]
    usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.digital_signature and usage.key_encipherment and not usage.key_cert_sign
    assert cert.not_valid_after_utc - cert.not_valid_before_utc == 90 * DAY - SECOND

    refused: list[dict[str, Any]] = [
        {"dns": ["www.example.com"]},
        {"dns": ["*.example.internal"]},
        {"dns": ["ok.example.internal"], "ips": ["192.168.1.1"]},
        {"cn": "other.example.internal", "dns": ["ok.example.internal"]},
        {},
    ]
    for names in refused:
        assert_problem(machine.submit("webserver", make_csr(**names)[1]), 400, "name-not-allowed")


def test_webserver_needs_group_membership(ca: CA, server: str) -> None:
    _, outsider = new_principal(ca, server, "outsider")  # a machine outside group webservers
    assert policy_template(outsider, "webserver")["rights"] == ["read"]
    response = outsider.submit("webserver", make_csr(dns=["x.example.internal"])[1])
    assert_problem(response, 403, "template-not-permitted")


# -- renewal ------------------------------------------------------------------------------

def test_renewal_with_evidence_is_issued_as_a_renewal(ca: CA, machine: Client) -> None:
    old_key, old = machine.enroll("machine")
    old_cert = load_cert(old["certificate"])
    new_key_, csr = make_csr()
    body, cert = issued(machine.submit("machine", csr,
                                       renewal=renewal_evidence(old_key, old["certificate"], csr)))
    assert_chains_to_root(ca, body["certificate"], body["chain"])
    assert public_der(cert.public_key()) == public_der(new_key_.public_key())
    assert cert.serial_number != old_cert.serial_number
    assert cert.subject == old_cert.subject and sans(cert) == sans(old_cert)
    request = machine.http.get(f"/v1/requests/{body['id']}").json()
    assert request["kind"] == "renewal" and request["status"] == "issued"
    assert request["serial"] == body["serial"]


def test_renewal_evidence_must_verify_with_the_old_key(ca: CA, server: str, machine: Client) -> None:
    old_key, old = machine.enroll("machine")
    _, csr = make_csr()
    wrong_key = renewal_evidence(new_key(), old["certificate"], csr)
    assert_problem(machine.submit("machine", csr, renewal=wrong_key), 400, "renewal-invalid")
    other_csr = make_csr()[1]
    wrong_csr = renewal_evidence(old_key, old["certificate"], other_csr)
    assert_problem(machine.submit("machine", csr, renewal=wrong_csr), 400, "renewal-invalid")
    garbage = {"certificate": old["certificate"], "signature": base64.b64encode(b"x" * 64).decode()}
    assert_problem(machine.submit("machine", csr, renewal=garbage), 400, "renewal-invalid")

    # Another principal cannot renew this one's certificate, even with its key.
    _, thief = new_principal(ca, server, "thief", "--group", "webservers")
    stolen = renewal_evidence(old_key, old["certificate"], csr)
    assert_problem(thief.submit("machine", csr, renewal=stolen), 400, "renewal-invalid")
    # A certificate is renewed within its own template only.
    _, web_csr = make_csr(dns=["renew.example.internal"])
    cross = renewal_evidence(old_key, old["certificate"], web_csr)
    assert_problem(machine.submit("webserver", web_csr, renewal=cross), 400, "renewal-invalid")


def test_renewal_of_a_revoked_certificate_is_refused(machine: Client, admin: Client) -> None:
    old_key, old = machine.enroll("machine")
    revoked = admin.http.post(f"/v1/certificates/{old['serial']}/revoke", json={"reason": "superseded"})
    assert revoked.status_code == 200, revoked.text
    _, csr = make_csr()
    response = machine.submit("machine", csr, renewal=renewal_evidence(old_key, old["certificate"], csr))
    assert_problem(response, 400, "renewal-of-revoked")


def test_renewal_of_an_expired_certificate_is_refused(
    ca: CA, server: str, machine: Client, tmp_path: Path
) -> None:
    add_template(ca, tmp_path, """
name = "short-lived"
validity = "2s"
renewal_period = "1s"
[key]
ekus = ["client_auth"]
[[permissions]]
group = "webservers"
rights = ["read", "enroll"]
""")
    old_key, old = machine.enroll("short-lived")
    old_cert = load_cert(old["certificate"])
    assert old_cert.not_valid_after_utc - old_cert.not_valid_before_utc == SECOND
    # The CA's clock has whole seconds: wait until it is a full second past notAfter.
    wait = (old_cert.not_valid_after_utc + 1.2 * SECOND - dt.datetime.now(dt.UTC)).total_seconds()
    time.sleep(max(0.0, wait))
    _, csr = make_csr()
    response = machine.submit("short-lived", csr,
                              renewal=renewal_evidence(old_key, old["certificate"], csr))
    assert_problem(response, 400, "renewal-of-expired")
    status = httpx.get(f"{server}/v1/certificates/{old['serial']}", timeout=30)
    assert status.json()["status"] == "expired"
    directory = machine.http.get("/v1/policy").json()["directory"]
    assert old["serial"] not in [x["serial"] for x in directory]
    # A new request (no renewal evidence) is still fine.
    issued(machine.submit("short-lived", csr))


def test_webserver_renewal_keeps_the_old_certificates_names(machine: Client) -> None:
    old_key, old = machine.enroll("webserver", cn="old.example.internal",
                                  dns=["old.example.internal"], ips=["127.0.0.2"])
    old_cert = load_cert(old["certificate"])
    _, csr = make_csr(cn="other.example.internal", dns=["other.example.internal"], ips=["127.0.0.3"])
    body, cert = issued(machine.submit("webserver", csr,
                                       renewal=renewal_evidence(old_key, old["certificate"], csr)))
    assert cert.subject == old_cert.subject
    assert sans(cert) == [x509.DNSName("old.example.internal"),
                          x509.IPAddress(ipaddress.ip_address("127.0.0.2"))]
    assert machine.http.get(f"/v1/requests/{body['id']}").json()["kind"] == "renewal"


# -- key archival -------------------------------------------------------------------------

def test_key_archival_template_needs_the_key_sealed_to_the_kra(
    ca: CA, machine: Client, tmp_path: Path
) -> None:
    add_template(ca, tmp_path, """
name = "archived-encryption"
validity = "365d"
purpose = "encryption"
[key]
types = ["rsa"]
usage = ["key_encipherment"]
ekus = ["email_protection"]
archive = true
[[permissions]]
group = "machines"
rights = ["read", "enroll"]
""")
    policy = machine.http.get("/v1/policy").json()
    entry = next(x for x in policy["templates"] if x["name"] == "archived-encryption")
    assert entry["key"]["archive"] is True
    assert len(policy["kra"]) == 1
    kra = load_cert(policy["kra"][0])
    assert kra == load_cert((ca.dir / "certs" / "kra.pem").read_text())
    kra.verify_directly_issued_by(load_cert((ca.dir / "certs" / "root.pem").read_text()))

    key: PrivateKey = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    _, csr = make_csr(key)
    assert_problem(machine.submit("archived-encryption", csr), 400, "key-archival-required")
    other: PrivateKey = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    wrong_key = key_archival.seal(other, kra)
    assert_problem(machine.submit("archived-encryption", csr, archived_key=wrong_key),
                   400, "key-archival-required")
    tampered = {**key_archival.seal(key, kra), "ciphertext": base64.b64encode(b"\0" * 64).decode()}
    assert_problem(machine.submit("archived-encryption", csr, archived_key=tampered),
                   400, "key-archival-required")

    body, cert = issued(machine.submit("archived-encryption", csr,
                                       archived_key=key_archival.seal(key, kra)))
    assert_chains_to_root(ca, body["certificate"], body["chain"])
    assert public_der(cert.public_key()) == public_der(key.public_key())
    assert cert.extensions.get_extension_for_class(x509.KeyUsage).value.key_encipherment


# -- registration-authority co-signatures ---------------------------------------------------

def test_ra_template_needs_an_agents_co_signature(
    ca: CA, server: str, machine: Client, tmp_path: Path
) -> None:
    agent_name = f"agent-{uuid.uuid4().hex[:8]}"
    add_template(ca, tmp_path, f"""
name = "request-agent"
validity = "30d"
[key]
ekus = ["certificate_request_agent"]
[[permissions]]
principal = "{agent_name}"
rights = ["read", "enroll"]
""")
    add_template(ca, tmp_path, """
name = "ra-cosigned"
validity = "30d"
[key]
ekus = ["client_auth"]
[issuance]
ra_signatures = 1
[[permissions]]
group = "machines"
rights = ["read", "enroll"]
""")
    agent = Client.enrolled(server, ca.add_principal(agent_name))
    agent_key, agent_body = agent.enroll("request-agent")
    agent_cert = load_cert(agent_body["certificate"])
    assert ekus(agent_cert) == [RA_EKU]
    # Others may not even see the agent template.
    assert_problem(machine.submit("request-agent", make_csr()[1]), 400, "unknown-template")

    _, csr = make_csr()
    der = csr_der(csr)
    assert_problem(machine.submit("ra-cosigned", csr), 400, "ra-signatures-missing")

    own_key, own = machine.enroll("machine")  # a certificate without the agent EKU
    not_agent = {"certificate": own["certificate"],
                 "signature": base64.b64encode(sign_bytes(own_key, der)).decode()}
    assert_problem(machine.submit("ra-cosigned", csr, ra_signatures=[not_agent]),
                   400, "ra-signatures-missing")
    other_csr = make_csr()[1]
    wrong_csr = {"certificate": agent_body["certificate"],
                 "signature": base64.b64encode(sign_bytes(agent_key, csr_der(other_csr))).decode()}
    assert_problem(machine.submit("ra-cosigned", csr, ra_signatures=[wrong_csr]),
                   400, "ra-signatures-missing")

    cosigned = {"certificate": agent_body["certificate"],
                "signature": base64.b64encode(sign_bytes(agent_key, der)).decode()}
    body, cert = issued(machine.submit("ra-cosigned", csr, ra_signatures=[cosigned]))
    assert_chains_to_root(ca, body["certificate"], body["chain"])
    assert ekus(cert) == [CLIENT_AUTH]
    assert requester_name(machine, body["id"]) != agent_name


# -- the policy endpoint --------------------------------------------------------------------

def _readable(documents: list[dict[str, Any]], name: str, groups: set[str]) -> set[str]:
    return {
        d["name"] for d in documents
        if any("read" in p["rights"] and (p.get("principal") == name or p.get("group") in groups)
               for p in d["permissions"])
    }


def test_policy_describes_what_the_caller_may_use(ca: CA, server: str, admin: Client) -> None:
    name, client = new_principal(ca, server, "policy", "--group", "webservers")
    policy = client.http.get("/v1/policy").json()
    documents = cli_json(ca, "template", "list")

    names = {x["name"] for x in policy["templates"]}
    assert names == _readable(documents, name, {"machines", "webservers"})
    # A CA manager's key sees every template, with no right to enroll.
    everything = admin.http.get("/v1/policy").json()
    assert {x["name"] for x in everything["templates"]} == {d["name"] for d in documents}
    assert {tuple(x["rights"]) for x in everything["templates"]} == {("read",)}
    assert everything["directory"] == []
    assert {"machine", "webserver", "approval-required", "encryption"} <= names
    by_name = {x["name"]: x for x in policy["templates"]}
    by_doc = {d["name"]: d for d in documents}

    machine = by_name["machine"]
    assert machine["oid"] == by_doc["machine"]["oid"]
    assert (machine["major_version"], machine["minor_version"]) == (1, 0)
    assert machine["validity_seconds"] == 365 * 86400
    assert machine["renewal_period_seconds"] == 6 * 7 * 86400
    assert machine["key"] == {"types": ["ec-p256", "ec-p384", "rsa"], "default": "ec-p256",
                              "archive": False}
    assert machine["key_usage"] == ["digital_signature"]
    assert machine["ekus"] == [CLIENT_AUTH.dotted_string, SERVER_AUTH.dotted_string]
    assert machine["subject_source"] == "principal"
    assert machine["manager_approval"] is False and machine["ra_signatures"] == 0
    assert machine["rights"] == ["autoenroll", "enroll", "read"]
    webserver = by_name["webserver"]
    assert webserver["subject_source"] == "request"
    assert webserver["renewal_subject_from_existing"] is True
    assert webserver["validity_seconds"] == 90 * 86400
    assert webserver["rights"] == ["autoenroll", "enroll", "read"]
    assert by_name["approval-required"]["manager_approval"] is True
    assert by_name["encryption"]["key"]["default"] == "rsa-2048"

    certs = ca.dir / "certs"
    issuers = {x["name"]: x for x in policy["issuers"]}
    first = issuers["issuing-1"]
    assert first["cost"] == 10 and first["renewal_only"] is False
    assert {"machine", "webserver", "approval-required", "encryption"} <= set(first["templates"])
    assert load_cert(first["certificate"]) == load_cert((certs / "issuer-issuing-1.pem").read_text())
    config = tomllib.loads((ca.dir / "ca.toml").read_text())
    assert policy["policy_id"] == config["policy_id"]
    assert [load_cert(p) for p in policy["roots"]] == [load_cert((certs / "root.pem").read_text())]
    assert load_cert(first["certificate"]) in [load_cert(p) for p in policy["intermediates"]]
    assert [load_cert(p) for p in policy["kra"]] == [load_cert((certs / "kra.pem").read_text())]

    # The directory: the caller's valid certificates, and only those.
    assert policy["directory"] == []
    _, one = client.enroll("machine")
    _, two = client.enroll("webserver", dns=["dir.example.internal"])
    listed = client.http.get("/v1/policy").json()["directory"]
    assert [(x["serial"], x["template"]) for x in listed] == [(one["serial"], "machine"),
                                                               (two["serial"], "webserver")]
    assert listed[0]["thumbprint"] == one["thumbprint"]
    revoked = admin.http.post(f"/v1/certificates/{one['serial']}/revoke", json={"reason": "superseded"})
    assert revoked.status_code == 200, revoked.text
    listed = client.http.get("/v1/policy").json()["directory"]
    assert [x["serial"] for x in listed] == [two["serial"]]


def test_policy_for_a_user_hides_machine_templates(ca: CA, server: str) -> None:
    _name, user = new_principal(ca, server, "user", "--kind", "user")
    policy = user.http.get("/v1/policy").json()
    names = {x["name"] for x in policy["templates"]}
    assert "machine" not in names and "webserver" not in names
    assert {"approval-required", "encryption"} <= names
    rights = {x["name"]: x["rights"] for x in policy["templates"]}
    assert rights["approval-required"] == ["enroll", "read"]
    assert rights["encryption"] == ["autoenroll", "enroll", "read"]
    # A template the caller may not read is not confirmed to exist.
    assert_problem(user.submit("machine", make_csr()[1]), 400, "unknown-template")


def test_policy_needs_a_credential(server: str) -> None:
    assert_problem(httpx.get(f"{server}/v1/policy", timeout=30), 401, "unauthenticated")
    bogus = Client(server, "cpc_not-a-real-credential")
    assert_problem(bogus.http.get("/v1/policy"), 401, "unauthenticated")


# -- TLS ------------------------------------------------------------------------------------

def test_tls_server_certificate_chains_to_the_ca_root(ca: CA) -> None:
    root_pem = ca.dir / "certs" / "root.pem"
    trust = ssl.create_default_context(cafile=str(root_pem))
    with serve(ca, tls=True) as base:
        assert base.startswith("https://")
        response = httpx.get(f"{base}/healthz", verify=trust, timeout=30)
        assert response.status_code == 200 and response.json()["status"] == "ok"
        with Client(base, ca.admin_key, verify=trust).http as http:
            policy = http.get("/v1/policy")
        assert policy.status_code == 200, policy.text
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{base}/healthz", verify=ssl.create_default_context(), timeout=30)

        port = int(base.rsplit(":", 1)[1])
        served = x509.load_pem_x509_certificate(
            ssl.get_server_certificate(("127.0.0.1", port)).encode())
    on_disk = x509.load_pem_x509_certificates((ca.dir / "tls" / "server.pem").read_bytes())
    assert served == on_disk[0]
    root = load_cert(root_pem.read_text())
    served.verify_directly_issued_by(on_disk[1])
    on_disk[1].verify_directly_issued_by(root)
    assert x509.IPAddress(ipaddress.ip_address("127.0.0.1")) in sans(served)
    assert ekus(served) == [SERVER_AUTH]
