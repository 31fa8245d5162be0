"""nginx and haproxy staple certpulse's OCSP answers. First a real nginx (``ssl_stapling on; ssl_stapling_verify
on;``) serving a certificate certpulse issued, its staple fetched from ``ca serve``'s responder
and read by a real ``openssl s_client -status``; then ``certpulse revoke``.

What nginx does with a staple (``ngx_event_openssl_stapling.c``; nginx 1.22, Debian 12), which
the test follows and the README's "OCSP stapling with nginx" tells operators:

* It fetches the answer lazily: the first handshake after nginx starts (or reloads) carries no
  staple and starts the fetch; the handshakes after it carry the answer. So the test shakes
  hands until the staple is there (bounded: 60 s).
* It refreshes a good staple at max(min(nextUpdate - 5 min, now + 1 h), now + 5 min), and keeps
  serving the staple it has until its nextUpdate. A revocation therefore does not reach nginx on
  its own for up to an hour (certpulse's default ``ocsp_validity`` is 1 h); a reload (SIGHUP)
  builds new TLS contexts, drops the staple and fetches again at the next handshake. That is
  what an operator does after an urgent revocation, and what this test does.
* It staples only a ``good`` answer. A ``revoked`` one is logged (``certificate status
  "revoked" in the OCSP response``) and nothing is stapled: ``s_client -status`` shows
  "OCSP response: no response sent". (A client then asks the responder itself, or refuses the
  server when the certificate must be stapled.) The test checks both, and that the responder's
  answer nginx got says ``revoked`` with the reason, through ``openssl ocsp``.

haproxy staples whatever answer it is handed, revoked ones included: the second test fetches
certpulse's answers with ``openssl ocsp -respout`` (an operator's timer would) and hands them to a
real haproxy, and ``s_client -status`` shows the stapled good answer, then the revoked one with
its reason.

The certificate points at the responder by its AIA extension when certpulse writes one
(``public_url`` is set to this server's address); without it, ``ssl_stapling_responder`` names
the responder. SQLite only: the responder's backends are covered by tests/test_ocsp.py.
"""

from __future__ import annotations

import base64
import os
import re
import signal
import socket
import subprocess
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import tomli_w
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import AuthorityInformationAccessOID

from services import Haproxy, Nginx, wait_until
from support import CA, TEMPLATES, Client, free_port, make_csr, run_cli, serve

STAPLE_WAIT = 60.0  # seconds: nginx fetches on demand, then staples from the next handshake on
REVOKED_IN_LOG = 'certificate status "revoked" in the OCSP response'


def ocsp_urls(certificate: x509.Certificate) -> list[str]:
    try:
        aia = certificate.extensions.get_extension_for_class(x509.AuthorityInformationAccess).value
    except x509.ExtensionNotFound:
        return []
    return [str(d.access_location.value) for d in aia if d.access_method == AuthorityInformationAccessOID.OCSP]


class Site:
    """nginx serving a certpulse certificate with stapling on, and the files to check it with."""

    def __init__(self, ca: CA, base: str, folder: Path) -> None:
        client = Client.enrolled(base, ca.add_principal("stapled.example.internal", "--group", "webservers"))
        key, csr = make_csr(cn="localhost", dns=["localhost"])
        response = client.submit("webserver", csr)
        assert response.status_code == 201, response.text
        issued: dict[str, Any] = response.json()
        self.serial: str = issued["serial"]
        self.certificate = x509.load_pem_x509_certificate(issued["certificate"].encode())
        self.ca = ca
        self.folder = folder
        self.leaf = folder / "leaf.pem"
        self.leaf.write_text(issued["certificate"])
        self.issuer = folder / "issuer.pem"
        self.issuer.write_text(issued["chain"][0])
        self.trusted = folder / "trusted.pem"  # root + issuing CA: what nginx verifies the answer with
        self.trusted.write_text(issued["chain"][0] + (ca.dir / "certs" / "root.pem").read_text())
        self.responder = base + "/ocsp"
        self.nginx = Nginx(folder)
        self.nginx.cert_file.write_text(issued["certificate"] + issued["chain"][0])
        self.nginx.key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                                          serialization.PrivateFormat.PKCS8,
                                                          serialization.NoEncryption()))
        self.nginx.key_file.chmod(0o600)
        # The certificate's own pointer when it has one (issue 17's AIA); else nginx is told.
        named = ocsp_urls(self.certificate)
        assert named in ([], [self.responder]), named
        responder = "" if named else f"ssl_stapling_responder {self.responder};\n"
        self.nginx.extra.write_text(f"ssl_stapling on;\nssl_stapling_verify on;\n"
                                    f"ssl_trusted_certificate {self.trusted};\n{responder}")
        self.error_log = folder / "error.log"

    def handshake(self) -> str:
        """What ``openssl s_client -status`` prints about one handshake with nginx."""
        done = subprocess.run(["openssl", "s_client", "-connect", f"127.0.0.1:{self.nginx.port}", "-status",
                               "-servername", "localhost", "-CAfile", str(self.trusted), "-verify_return_error"],
                              stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=30, check=False)
        assert "Verify return code: 0 (ok)" in done.stdout, done.stdout + done.stderr
        return done.stdout

    def handshake_until(self, wanted: str, within: float = STAPLE_WAIT) -> str:
        """Shake hands until ``wanted`` shows (nginx staples from the handshake after its fetch)."""
        deadline = time.monotonic() + within
        while True:
            out = self.handshake()
            if wanted in out:
                return out
            if time.monotonic() > deadline:
                raise AssertionError(f"no {wanted!r} within {within:.0f} s; s_client said:\n{out}\n"
                                     f"nginx error log:\n{self.error_log.read_text(errors='replace')[-3000:]}")
            time.sleep(0.3)

    def reload(self) -> None:
        """nginx's reload: new workers with new TLS contexts (no staple), the old ones leave."""
        assert self.nginx.proc is not None and self.nginx.proc.poll() is None
        os.kill(self.nginx.proc.pid, signal.SIGHUP)

    def ask_responder(self) -> str:
        """The responder's answer about the site's certificate, as ``openssl ocsp`` reads it
        (no nonce: the cached answer, the one nginx is given)."""
        done = subprocess.run(["openssl", "ocsp", "-issuer", str(self.issuer), "-cert", str(self.leaf),
                               "-url", self.responder, "-CAfile", str(self.trusted), "-no_nonce"],
                              capture_output=True, text=True, timeout=30, check=False)
        assert done.returncode == 0, done.stdout + done.stderr
        return done.stdout + done.stderr


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    folder = tmp_path_factory.mktemp("stapling")
    # support.init_ca adds four templates (four CLI runs); this test needs one
    directory, database = folder / "ca", f"sqlite:///{folder / 'ca' / 'ca.db'}"
    created = run_cli("ca", "init", "--dir", str(directory), "--database", database)
    admin_key = next(line.strip() for line in created.stdout.splitlines() if line.strip().startswith("cpa_"))
    ca = CA(directory, admin_key, database)
    ca.cli("template", "add", str(TEMPLATES / "webserver.toml"))
    port = free_port()
    config = tomllib.loads((ca.dir / "ca.toml").read_text())
    config["public_url"] = f"http://127.0.0.1:{port}"
    (ca.dir / "ca.toml").write_text(tomli_w.dumps(config))
    with serve(ca, port=port) as base:
        (folder / "nginx").mkdir()
        served = Site(ca, base, folder / "nginx")
        served.nginx.start()
        try:
            yield served
        finally:
            served.nginx.stop()


def test_nginx_staples_good_then_nothing_once_revoked_and_reloaded(site: Site) -> None:
    out = site.handshake_until("Cert Status: good")
    assert "OCSP Response Status: successful" in out
    assert re.search(r"Serial Number: 0*" + site.serial.upper(), out, re.IGNORECASE), out

    site.ca.cli("revoke", site.serial, "--reason", "keyCompromise")
    # The responder says so at once (within its one-second revision poll)...
    wait_until(lambda: "Reason: keyCompromise" in site.ask_responder(), 30, "the responder to answer revoked")
    assert f"{site.leaf}: revoked" in site.ask_responder()
    # ...but nginx keeps the good staple it has until it refreshes (up to an hour here).
    assert "Cert Status: good" in site.handshake()

    site.reload()
    out = site.handshake_until("OCSP response: no response sent")
    assert "Cert Status" not in out, out
    wait_until(lambda: REVOKED_IN_LOG in site.error_log.read_text(errors="replace"), 10,
               "nginx to log the revoked answer it would not staple")


def test_haproxy_staples_what_the_responder_answers_good_then_revoked(site: Site, tmp_path: Path) -> None:
    """nginx never staples a revoked answer (above); haproxy staples the answer it is given,
    revoked ones included, which is how a client sees a revocation in the handshake itself.
    haproxy does not fetch: an operator's timer fetches certpulse's answer (``openssl ocsp
    -respout``) and hands it over, at start (``site.pem.ocsp``) and then through haproxy's
    runtime API (``set ssl ocsp-response``), as haproxy's documentation describes."""
    base = site.responder.removesuffix("/ocsp")
    client = Client.enrolled(base, site.ca.add_principal("haproxy.example.internal", "--group", "webservers"))
    key, csr = make_csr(cn="localhost", dns=["localhost"])
    response = client.submit("webserver", csr)
    assert response.status_code == 201, response.text
    issued: dict[str, Any] = response.json()
    leaf, issuer = tmp_path / "leaf.pem", tmp_path / "issuer.pem"
    leaf.write_text(issued["certificate"])
    issuer.write_text(issued["chain"][0])

    def fetch(answer: Path) -> str:
        done = subprocess.run(["openssl", "ocsp", "-issuer", str(issuer), "-cert", str(leaf), "-url", site.responder,
                               "-CAfile", str(site.trusted), "-no_nonce", "-respout", str(answer)],
                              capture_output=True, text=True, timeout=30, check=False)
        assert done.returncode == 0, done.stdout + done.stderr
        return done.stdout

    proxy = Haproxy(tmp_path)
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption()).decode()
    proxy.pem.write_text(issued["certificate"] + issued["chain"][0] + key_pem)
    proxy.pem.chmod(0o600)
    assert f"{leaf}: good" in fetch(Path(f"{proxy.pem}.ocsp"))
    proxy.start()
    try:
        def handshake() -> str:
            done = subprocess.run(["openssl", "s_client", "-connect", f"127.0.0.1:{proxy.port}", "-status",
                                   "-servername", "localhost", "-CAfile", str(site.trusted)],
                                  stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=30, check=False)
            return done.stdout

        good = handshake()
        assert "OCSP Response Status: successful" in good and "Cert Status: good" in good, good

        site.ca.cli("revoke", issued["serial"], "--reason", "keyCompromise")
        wait_until(lambda: f"{leaf}: revoked" in fetch(tmp_path / "revoked.der"), 30, "the responder to say revoked")
        command = f"set ssl ocsp-response {base64.b64encode((tmp_path / 'revoked.der').read_bytes()).decode()}\n"
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as admin:
            admin.settimeout(30)
            admin.connect(str(proxy.socket))
            admin.sendall(command.encode())
            reply = b""
            while chunk := admin.recv(4096):
                reply += chunk
        assert b"OCSP Response updated" in reply, reply
        revoked = handshake()
        assert "Cert Status: revoked" in revoked and "Revocation Reason: keyCompromise" in revoked, revoked
    finally:
        proxy.stop()
