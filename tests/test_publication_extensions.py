"""Issued certificates point relying parties at the CA's CRL, OCSP responder and issuer certificate
(issue 17), and ``/ca/{authority}.der`` answers the caIssuers URL they carry.

Real ``ca init`` / ``ca serve`` processes, certificates read with cryptography and with
``openssl x509 -text``, and the fetched issuer certificate used by ``openssl verify`` to build
the chain. One served CA with a public URL per backend, and one CA (SQLite) that starts without
one and gets it later, shared by the module's tests.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import AuthorityInformationAccessOID, ExtensionOID

from certpulse.ca.config import CADir, check_public_url
from certpulse.ca.server_tls import ensure_tls_certificate, server_names
from certpulse.ca.setup import open_service
from certpulse.ca.templates import parse_template
from certpulse.errors import Refusal
from conftest import database, postgres_available
from services import HINT, NGINX, wait_until
from support import CA, TEMPLATES, Client, cli_json, free_port, load_cert, run_cli, serve

MACHINE = (TEMPLATES / "machine.toml").read_text()


def make_ca(folder: Path, database_url: str, *extra: str) -> CA:
    """``ca init`` and the machine template only (each command is a process start: a second or more)."""
    out = run_cli("ca", "init", "--dir", str(folder), "--database", database_url, *extra)
    ca = CA(folder, next(w for w in out.stdout.split() if w.startswith("cpa_")), database_url)
    ca.cli("template", "add", str(TEMPLATES / "machine.toml"))
    return ca


def variant(name: str, *settings: str) -> str:
    """The machine template under another name, with top-level ``settings`` added."""
    return MACHINE.replace('name = "machine"', "\n".join((f'name = "{name}"', *settings)), 1)


@dataclasses.dataclass
class Served:
    ca: CA
    base: str
    public_url: str
    client: Client
    token: str = ""  # not exchanged yet

    def enroll(self, template: str = "machine") -> x509.Certificate:
        _, issued = self.client.enroll(template)
        return load_cert(issued["certificate"])

    def ca_cert(self, name: str) -> x509.Certificate:
        return x509.load_pem_x509_certificate((self.ca.dir / "certs" / name).read_bytes())


@pytest.fixture(scope="module")
def published(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """A CA made with a public URL (SQLite; the CA given one later is on PostgreSQL), served there."""
    folder = tmp_path_factory.mktemp("published")
    port = free_port()
    public_url = f"http://127.0.0.1:{port}"
    ca = make_ca(folder / "ca", f"sqlite:///{folder / 'ca.db'}", "--public-url", public_url + "/")  # "/" dropped
    for name, setting in (("no-cdp", "crl_distribution_point = false"),
                          ("no-aia", "authority_information_access = false")):
        (folder / f"{name}.toml").write_text(variant(name, setting))
        ca.cli("template", "add", str(folder / f"{name}.toml"))
    token = ca.add_principal("web01", "--kind", "machine")
    with serve(ca, port=port) as base:
        yield Served(ca, base, public_url, Client.enrolled(base, token))


def uris(cert: x509.Certificate) -> dict[str, list[str]]:
    """The URIs of the CRL distribution points and of the AIA, by kind ('crl', 'ocsp', 'ca_issuers')."""
    found: dict[str, list[str]] = {}
    for ext in cert.extensions:
        assert not ext.critical or ext.oid not in (ExtensionOID.CRL_DISTRIBUTION_POINTS,
                                                   ExtensionOID.AUTHORITY_INFORMATION_ACCESS), ext
        if isinstance(ext.value, x509.CRLDistributionPoints):
            for point in ext.value:
                assert point.reasons is None and point.crl_issuer is None and point.relative_name is None
                found.setdefault("crl", []).extend(n.value for n in point.full_name or ())
        elif isinstance(ext.value, x509.AuthorityInformationAccess):
            for access in ext.value:
                kind = {AuthorityInformationAccessOID.OCSP: "ocsp",
                        AuthorityInformationAccessOID.CA_ISSUERS: "ca_issuers"}[access.access_method]
                found.setdefault(kind, []).append(access.access_location.value)
    return found


def openssl_text(cert: x509.Certificate, folder: Path) -> str:
    path = folder / "cert.pem"
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return subprocess.run(["openssl", "x509", "-noout", "-text", "-in", str(path)], capture_output=True,
                          text=True, check=True, timeout=30).stdout


def test_an_issued_certificate_points_at_its_issuers_crl_the_responder_and_the_issuer(
        published: Served, tmp_path: Path) -> None:
    cert = published.enroll()
    url = published.public_url
    assert uris(cert) == {"crl": [f"{url}/crl/issuing-1/0.crl"], "ocsp": [f"{url}/ocsp"],
                          "ca_issuers": [f"{url}/ca/issuing-1.der"]}
    text = openssl_text(cert, tmp_path)
    assert "X509v3 CRL Distribution Points:" in text and f"URI:{url}/crl/issuing-1/0.crl" in text
    assert f"OCSP - URI:{url}/ocsp" in text and f"CA Issuers - URI:{url}/ca/issuing-1.der" in text
    # the rest of the certificate as before: the template's extensions, the template information
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).critical
    assert cert.extensions.get_extension_for_oid(x509.ObjectIdentifier("1.3.6.1.4.1.311.21.7"))


def test_each_template_switch_leaves_its_extension_out(published: Served, tmp_path: Path) -> None:
    url = published.public_url
    assert uris(published.enroll("no-cdp")) == {"ocsp": [f"{url}/ocsp"], "ca_issuers": [f"{url}/ca/issuing-1.der"]}
    no_aia = published.enroll("no-aia")
    assert uris(no_aia) == {"crl": [f"{url}/crl/issuing-1/0.crl"]}
    assert "Authority Information Access" not in openssl_text(no_aia, tmp_path)
    shown = published.ca.cli("template", "show", "no-cdp").stdout
    assert "crl_distribution_point = false" in shown and "authority_information_access = true" in shown


def test_the_template_switches_are_checked() -> None:
    doc: dict[str, Any] = {"name": "t", "validity": "30d"}
    template = parse_template(doc, default_oid="1.2.3")
    assert template.crl_distribution_point and template.authority_information_access  # the default
    assert not parse_template({**doc, "authority_information_access": False},
                              default_oid="1.2.3").authority_information_access
    with pytest.raises(Refusal, match="crl_distribution_point must be true or false"):
        parse_template({**doc, "crl_distribution_point": "no"}, default_oid="1.2.3")


def test_issuing_cas_point_at_the_roots_crl_and_certificate_and_roots_at_nothing(published: Served) -> None:
    url = published.public_url
    root_pointers = {"crl": [f"{url}/crl/root/0.crl"], "ca_issuers": [f"{url}/ca/root.der"]}
    assert uris(published.ca_cert("issuer-issuing-1.pem")) == root_pointers  # made by ca init
    assert uris(published.ca_cert("root.pem")) == {}


def test_the_api_servers_own_certificate_points_there_too(published: Served) -> None:
    service = open_service(CADir(published.ca.dir))
    try:
        files, cert = ensure_tls_certificate(CADir(published.ca.dir), service, server_names("127.0.0.1"),
                                             dt.datetime.now(dt.UTC))
    finally:
        service.engine.dispose()
    assert cert is not None and files.cert.read_bytes().startswith(cert.public_bytes(serialization.Encoding.PEM))
    url = published.public_url
    assert uris(cert) == {"crl": [f"{url}/crl/issuing-1/0.crl"], "ocsp": [f"{url}/ocsp"],
                          "ca_issuers": [f"{url}/ca/issuing-1.der"]}


def test_the_ca_issuers_url_serves_the_certificate_that_verifies_the_leaf(published: Served, tmp_path: Path) -> None:
    leaf = published.enroll()
    (tmp_path / "leaf.pem").write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    root = str(published.ca.dir / "certs" / "root.pem")
    verify = ["openssl", "verify", "-CAfile", root]
    alone = subprocess.run([*verify, str(tmp_path / "leaf.pem")], capture_output=True, text=True, timeout=30)
    assert alone.returncode != 0, alone.stdout  # the root alone does not verify it: the issuer is missing

    response = httpx.get(uris(leaf)["ca_issuers"][0], timeout=30)  # the URL as the certificate has it
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/pkix-cert"
    (tmp_path / "fetched.der").write_bytes(response.content)
    subprocess.run(["openssl", "x509", "-inform", "DER", "-in", str(tmp_path / "fetched.der"),
                    "-out", str(tmp_path / "fetched.pem")], check=True, capture_output=True, timeout=30)
    done = subprocess.run([*verify, "-untrusted", str(tmp_path / "fetched.pem"), str(tmp_path / "leaf.pem")],
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 0 and done.stdout.strip().endswith(": OK"), done.stdout + done.stderr

    # and from the issuer, its own caIssuers URL leads to the root
    issuer = x509.load_der_x509_certificate(response.content)
    assert issuer == published.ca_cert("issuer-issuing-1.pem")
    upward = httpx.get(uris(issuer)["ca_issuers"][0], timeout=30)
    assert upward.status_code == 200 and x509.load_der_x509_certificate(upward.content) == \
        published.ca_cert("root.pem")


def test_a_relying_party_follows_the_certificates_own_urls_and_sees_a_revocation(
        published: Served, tmp_path: Path) -> None:
    """End to end as a relying party that knows only the root: openssl fetches the CRLs that the
    leaf's and the issuer's distribution points name (``-crl_download``, the whole chain checked;
    the root, which points nowhere, is checked against the root's own CRL, given as a file) and
    asks the responder the leaf's AIA names; after ``certpulse revoke`` both say revoked."""
    leaf = published.enroll()
    (tmp_path / "leaf.pem").write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    issuer = tmp_path / "issuer.pem"
    issuer.write_bytes((published.ca.dir / "certs" / "issuer-issuing-1.pem").read_bytes())
    root = published.ca.dir / "certs" / "root.pem"
    (tmp_path / "chain.pem").write_bytes(issuer.read_bytes() + root.read_bytes())
    root_crl = httpx.get(f"{published.public_url}/crl/root/0.crl", timeout=30)
    assert root_crl.status_code == 200, root_crl.text
    (tmp_path / "root.crl").write_bytes(x509.load_der_x509_crl(root_crl.content).public_bytes(
        serialization.Encoding.PEM))

    def verify() -> subprocess.CompletedProcess[str]:
        return subprocess.run(["openssl", "verify", "-crl_check_all", "-crl_download", "-CAfile", str(root),
                               "-CRLfile", str(tmp_path / "root.crl"), "-untrusted", str(issuer),
                               str(tmp_path / "leaf.pem")],
                              capture_output=True, text=True, timeout=60)

    def ocsp() -> str:
        return subprocess.run(["openssl", "ocsp", "-issuer", str(issuer), "-cert", str(tmp_path / "leaf.pem"),
                               "-url", uris(leaf)["ocsp"][0], "-CAfile", str(tmp_path / "chain.pem"), "-no_nonce"],
                              capture_output=True, text=True, timeout=60).stdout

    before = verify()
    assert before.returncode == 0 and before.stdout.strip().endswith(": OK"), before.stdout + before.stderr
    assert f"{tmp_path / 'leaf.pem'}: good" in ocsp()
    published.ca.cli("revoke", format(leaf.serial_number, "x"), "--reason", "keyCompromise")
    # A worker reads the signed CRL from the database at most once a second: the revocation (made
    # by another process, with the new CRL) reaches relying parties within that, not at once.
    def revoked_on_the_crl() -> bool:
        after = verify()
        return after.returncode != 0 and "certificate revoked" in after.stdout + after.stderr

    wait_until(revoked_on_the_crl, 30, "the CRL the leaf points at to list it revoked")
    wait_until(lambda: f"{tmp_path / 'leaf.pem'}: revoked" in ocsp(), 30, "the responder to say revoked")


def test_ca_certificates_are_cacheable(published: Served) -> None:
    url = f"{published.base}/ca/issuing-1.der"
    first = httpx.get(url, timeout=30)
    assert first.status_code == 200
    assert first.headers["cache-control"] == "public, max-age=86400"
    etag = first.headers["etag"]
    assert etag.startswith('"') and etag.endswith('"')
    again = httpx.get(url, headers={"If-None-Match": etag}, timeout=30)
    assert again.status_code == 304 and again.content == b"" and again.headers["etag"] == etag
    other = httpx.get(url, headers={"If-None-Match": '"something-else"'}, timeout=30)
    assert other.status_code == 200 and other.content == first.content
    head = httpx.head(url, timeout=30)
    assert head.status_code == 200 and head.content == b""
    assert head.headers["content-length"] == str(len(first.content)) and head.headers["etag"] == etag


@pytest.mark.parametrize("path", ["/ca/nosuch.der", "/ca/kra.der", "/ca/issuing-1.pem", "/ca/issuing-1",
                                  "/ca/", "/ca/a/b.der", "/ca/%2e%2e.der", "/ca/" + "x" * 65 + ".der"])
def test_anything_but_a_published_authority_is_not_found(published: Served, path: str) -> None:
    response = httpx.get(published.base + path, timeout=30)
    assert response.status_code == 404, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    assert response.json()["reason"] == "not-found"


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE"])
def test_other_methods_are_not_allowed(published: Served, method: str) -> None:
    response = httpx.request(method, f"{published.base}/ca/issuing-1.der", content=b"x", timeout=30)
    assert response.status_code == 405, response.text
    assert response.headers["allow"] == "GET, HEAD"
    assert response.headers["content-type"].startswith("application/problem+json")


def test_new_and_disabled_authorities_are_served_without_a_restart(published: Served) -> None:
    url = published.public_url
    published.ca.cli("ca", "add-issuer", "second", "--cost", "20")
    assert uris(published.ca_cert("issuer-second.pem")) == {"crl": [f"{url}/crl/root/0.crl"],
                                                             "ca_issuers": [f"{url}/ca/root.der"]}
    published.ca.cli("ca", "set-issuer", "second", "--disable")  # its certificates still need their chain
    fetch = f"{published.base}/ca/second.der"
    wait_until(lambda: httpx.get(fetch, timeout=30).status_code == 200, 15, "the new issuer to be served")
    assert x509.load_der_x509_certificate(httpx.get(fetch, timeout=30).content) == \
        published.ca_cert("issuer-second.pem")


# -- a CA without a public URL, given one later --------------------------------------------

@pytest.fixture(scope="module")
def unpublished(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """A CA made without a public URL, on PostgreSQL (SQLite when no server answers: see conftest)."""
    folder = tmp_path_factory.mktemp("unpublished")
    backend = "postgres" if postgres_available() else "sqlite"
    with database(backend, folder) as url:
        ca = make_ca(folder / "ca", url)
        yield Served(ca, "", "", Client("http://unused"), token=ca.add_principal("web02", "--kind", "machine"))


def test_without_a_public_url_nothing_points_anywhere_until_one_is_set(unpublished: Served) -> None:
    ca = unpublished.ca
    port = free_port()
    with serve(ca, port=port) as base:
        client = Client.enrolled(base, unpublished.token)
        _, issued = client.enroll("machine")
        assert uris(load_cert(issued["certificate"])) == {}
        assert uris(load_cert(issued["chain"][0])) == {}
        assert "public URL: none" in ca.cli("ca", "status").stdout

        public_url = f"http://127.0.0.1:{port}"
        said = ca.cli("ca", "set-public-url", public_url).stdout
        assert "certificates issued from now on" in said and "restart 'ca serve'" in said
    status = cli_json(ca, "ca", "status")["publishing"]
    assert status["ocsp"] == f"{public_url}/ocsp"
    assert status["crls"] == {"root": f"{public_url}/crl/root/0.crl", "issuing-1": f"{public_url}/crl/issuing-1/0.crl"}
    assert status["ca_certificates"]["issuing-1"] == f"{public_url}/ca/issuing-1.der"

    with serve(ca, port=port) as base:
        _, issued = client.enroll("machine")  # the credential outlives the server
        assert uris(load_cert(issued["certificate"]))["crl"] == [f"{public_url}/crl/issuing-1/0.crl"]
        assert uris(unpublished.ca_cert("issuer-issuing-1.pem")) == {}  # signed before: as it was
        audit = Client(base, ca.admin_key).http.get("/v1/audit", params={"limit": 50}).json()
        assert any(row["action"] == "public-url-set" and row["detail"] == public_url for row in audit), audit[:3]

        # a root rollover: the cross-certificate points at the old root, the new issuer at the new root
        ca.cli("ca", "rollover-root")
        assert uris(unpublished.ca_cert("root-r2.pem")) == {}
        assert uris(unpublished.ca_cert("cross-r2.pem")) == {"crl": [f"{public_url}/crl/root/0.crl"],
                                                              "ca_issuers": [f"{public_url}/ca/root.der"]}
        assert uris(unpublished.ca_cert("issuer-issuing-r2.pem")) == {
            "crl": [f"{public_url}/crl/root-r2/0.crl"], "ca_issuers": [f"{public_url}/ca/root-r2.der"]}
        wait_until(lambda: httpx.get(f"{base}/ca/cross-r2.der", timeout=30).status_code == 200, 15,
                   "the cross-certificate to be served")


BAD_URLS = ["ftp://ca.example.com", "http://", "http:///crl", "http://ca.example.com/?x=1",
            "http://ca.example.com/#top", "http://ca example.com", "http://user@ca.example.com", "ca.example.com",
            "http://ca.example.com:99999", "http://ca.example.com/\x1b[2J"]


@pytest.mark.parametrize("url", BAD_URLS)
def test_what_a_public_url_may_be(url: str) -> None:
    with pytest.raises(Refusal, match=r"must be an http:// or https:// URL|is not a URL"):
        check_public_url(url)
    assert check_public_url("http://ca.example.com/pki/") == "http://ca.example.com/pki"


# each command is a process start (a second or two): two of the values above, the rest as well
# refused by the same check
@pytest.mark.parametrize("url", ["ftp://ca.example.com", "http://ca example.com"])
def test_ca_init_refuses_a_bad_public_url_in_one_line(tmp_path: Path, url: str) -> None:
    folder = tmp_path / "ca"
    refused = run_cli("ca", "init", "--dir", str(folder), "--public-url", url, check=False)
    assert refused.returncode != 0 and not folder.exists()
    lines = refused.stderr.strip().splitlines()
    assert len(lines) == 1 and "public_url" in lines[0] and "Traceback" not in refused.stderr, refused.stderr


def test_set_public_url_refuses_a_bad_one_and_changes_nothing(unpublished: Served) -> None:
    config = (unpublished.ca.dir / "ca.toml").read_text()
    refused = unpublished.ca.cli("ca", "set-public-url", "http://ca.example.com/\x1b[2J", check=False)
    assert refused.returncode != 0 and len(refused.stderr.strip().splitlines()) == 1, refused.stderr
    assert "\x1b" not in refused.stderr  # shown escaped, never sent to the terminal
    neither = unpublished.ca.cli("ca", "set-public-url", check=False)
    assert neither.returncode != 0 and "--clear" in neither.stderr
    assert (unpublished.ca.dir / "ca.toml").read_text() == config


# -- the README's relying-party configuration --------------------------------------------

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_section(title: str) -> str:
    text = README.read_text()
    start = text.index(f"\n## {title}\n")
    return text[start:text.index("\n## ", start + 1)]


def fenced(section: str, language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```$", section, flags=re.MULTILINE | re.DOTALL)


def test_the_readmes_nginx_configuration_passes_nginx_t(published: Served, tmp_path: Path) -> None:
    """Every nginx block of "Revocation for relying parties", with its files made real (certificates
    of this CA, a CRL), is a configuration the installed nginx accepts; the CRL script parses."""
    assert NGINX is not None, HINT
    section = readme_section("Revocation for relying parties")
    blocks = fenced(section, "nginx")
    assert len(blocks) >= 4, "the section lost its nginx examples"
    key, issued = published.client.enroll("machine")
    certs = published.ca.dir / "certs"
    root, issuer = (certs / "root.pem").read_text(), (certs / "issuer-issuing-1.pem").read_text()
    crl_key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    crl = (x509.CertificateRevocationListBuilder().issuer_name(load_cert(issuer).subject).last_update(now)
           .next_update(now + dt.timedelta(days=7)).sign(crl_key, hashes.SHA256()))
    files = {
        "fullchain.pem": issued["certificate"] + issuer, "chain.pem": issuer + root,
        "key.pem": key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                     serialization.NoEncryption()).decode(),
        "certpulse-root.pem": root, "certpulse-ca.pem": root + issuer,
        "certpulse.crl.pem": crl.public_bytes(serialization.Encoding.PEM).decode(),
    }
    for name, content in files.items():
        (tmp_path / name).write_text(content)
    for index, block in enumerate(blocks):
        conf = tmp_path / f"nginx-{index}.conf"
        conf.write_text(f"""
pid {tmp_path}/nginx.pid;
error_log {tmp_path}/error.log;
events {{ worker_connections 16; }}
http {{
    access_log off;
{block.replace("/etc/nginx/tls/", f"{tmp_path}/")}
}}
""")
        checked = subprocess.run([NGINX, "-t", "-c", str(conf), "-e", str(tmp_path / "error.log")],
                                 capture_output=True, text=True, timeout=30)
        assert checked.returncode == 0 and "test is successful" in checked.stderr, f"{block}\n{checked.stderr}"
        assert "[warn]" not in checked.stderr, f"{block}\n{checked.stderr}"
    scripts = fenced(section, "sh")
    crl_script = next(s for s in scripts if s.startswith("#!/bin/sh"))
    (tmp_path / "certpulse-crl").write_text(crl_script)
    subprocess.run(["sh", "-n", str(tmp_path / "certpulse-crl")], check=True, timeout=30)
