"""Real ACME clients for the ACME tests: certbot (from the project's dev extras) and lego
(Debian) as child processes, each with its own folders in a test directory and a bounded run
time, pointed at a CA whose validation asks the local DNS test server (``tests/challtestsrv.py``:
every name maps to 127.0.0.1; TXT records for dns-01 are set through its management API by
small hook scripts the clients run).

The hook scripts are Python with no shell in between: certbot hands them the domain and the
validation text in its environment (``CERTBOT_DOMAIN``, ``CERTBOT_VALIDATION``), lego's ``exec``
provider as arguments; neither value is ever interpreted by a shell."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import tomli_w
from cryptography import x509

from challtestsrv import ChallTestSrv
from support import CA, Client, free_port, init_ca

CERTBOT = Path(sys.executable).with_name("certbot")
LEGO = shutil.which("lego")
OPENSSL = shutil.which("openssl") or "openssl"
HINT = "run scripts/system-packages (make test does) to install lego"
# One client run (account, order, validation, finalize, download) takes a few seconds on loopback;
# the bound is there so a hung client fails the test with its output instead of hanging it.
CLIENT_TIMEOUT = 180.0


def run_tool(args: list[str], *, env: dict[str, str] | None = None, check: bool = True,
             timeout: float = CLIENT_TIMEOUT) -> subprocess.CompletedProcess[str]:
    """Run a client to completion within ``timeout``; its output is in the failure message."""
    try:
        result = subprocess.run(args, capture_output=True, text=True, timeout=timeout, check=False,
                                env={**os.environ, **(env or {})}, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as exc:
        raise AssertionError(f"{' '.join(args)} did not finish within {timeout} s:\n"
                             f"{exc.stdout!r}\n{exc.stderr!r}") from None
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


class Background:
    """A client running in the background (its output in a file), for a test that acts at the
    CA while the client waits; :meth:`finish` waits for it within a bound."""

    def __init__(self, args: list[str], env: dict[str, str], output: Path) -> None:
        self.output = output
        with output.open("wb") as out:
            self.proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         env={**os.environ, **env})

    def text(self) -> str:
        return self.output.read_text(errors="replace")

    def running(self) -> bool:
        return self.proc.poll() is None

    def finish(self, timeout: float = CLIENT_TIMEOUT) -> str:
        """Its output, once it has exited 0 (killed and failed when it takes over ``timeout``)."""
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.stop()
        assert self.proc.returncode == 0, f"{self.proc.args!r} failed ({self.proc.returncode}):\n{self.text()}"
        return self.text()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)


# The hook scripts: values from the clients arrive in the environment (certbot) or as arguments
# (lego), go into a JSON body, and reach the DNS test server's management API; no shell.
_HOOK = '''#!{python}
"""dns-01 hook written by the certpulse tests: {what}."""
import json, os, sys, urllib.request

MANAGEMENT = {management!r}
LOG = {log!r}

def call(path, body):
    request = urllib.request.Request(MANAGEMENT + path, data=json.dumps(body).encode(), method="POST")
    with urllib.request.urlopen(request, timeout=10) as response:
        response.read()
    with open(LOG, "a") as log:
        log.write(json.dumps({{"call": path, **body}}) + "\\n")

{body}
'''

_CERTBOT_AUTH = '''call("/set-txt", {"host": "_acme-challenge." + os.environ["CERTBOT_DOMAIN"] + ".",
                    "value": os.environ["CERTBOT_VALIDATION"]})'''
_CERTBOT_CLEANUP = '''call("/clear-txt", {"host": "_acme-challenge." + os.environ["CERTBOT_DOMAIN"] + "."})'''
_LEGO_EXEC = '''action, fqdn, value = sys.argv[1:4]
if action == "present":
    call("/set-txt", {"host": fqdn, "value": value})
elif action == "cleanup":
    call("/clear-txt", {"host": fqdn})
elif action != "timeout":
    sys.exit("unknown action " + action)'''


def management_url(dns: ChallTestSrv) -> str:
    return f"http://127.0.0.1:{dns.management_port}"


def write_hook(path: Path, dns: ChallTestSrv, what: str, body: str) -> Path:
    path.write_text(_HOOK.format(python=sys.executable, what=what, management=management_url(dns),
                                 log=str(path.parent / "hooks.log"), body=body))
    path.chmod(0o700)
    return path


def hook_calls(folder: Path) -> list[dict[str, str]]:
    """What the hook scripts in ``folder`` asked of the DNS test server, in order."""
    log = folder / "hooks.log"
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


@dataclasses.dataclass
class Endpoint:
    """Where the clients find an ACME server: its directory, the file that makes its TLS
    certificate trusted, and the ports its validation connects to on 127.0.0.1."""

    directory: str
    trust: Path
    http01_port: int
    tlsalpn01_port: int


def acme_ca(directory: Path, database_url: str, dns: ChallTestSrv, **acme: Any) -> tuple[CA, Endpoint]:
    """A CA (example templates) whose ``ca.toml`` has an ``[acme]`` table pointing validation at
    the DNS test server and at free loopback ports for http-01 and tls-alpn-01; ``acme`` adds
    or overrides settings. The endpoint's directory URL is filled in once it is served."""
    ca = init_ca(directory, database_url)
    endpoint = Endpoint("", ca.dir / "certs" / "root.pem", free_port(), free_port())
    config = ca.dir / "ca.toml"
    data = tomllib.loads(config.read_text())
    data["acme"] = {"http01_port": endpoint.http01_port, "tlsalpn01_port": endpoint.tlsalpn01_port,
                    "dns_resolver": dns.address, "validation_timeout": "20s", **acme}
    config.write_text(tomli_w.dumps(data))
    return ca, endpoint


def new_eab(ca: CA, principal: str) -> tuple[str, str]:
    """A one-time external account binding for ``principal``: (key id, HMAC key)."""
    out = json.loads(ca.cli("principal", "acme-eab", principal, "--json").stdout)
    return str(out["kid"]), str(out["hmac_key"])


def openssl_verify(root: Path, leaf: Path, chain: Path | None = None) -> None:
    """``openssl verify``: the leaf chains to exactly ``root`` (through ``chain``)."""
    args = [OPENSSL, "verify", "-CAfile", str(root)]
    if chain is not None and chain.read_text().strip():
        args += ["-untrusted", str(chain)]
    result = run_tool([*args, str(leaf)], timeout=60)
    assert result.stdout.strip().endswith("OK"), result.stdout


def first_certificate(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificates(path.read_bytes())[0]


def dns_names(cert: x509.Certificate) -> list[str]:
    return cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
        x509.DNSName)


TEMPLATE_INFORMATION = x509.ObjectIdentifier("1.3.6.1.4.1.311.21.7")  # AD CS certificate template


def has_template_extension(cert: x509.Certificate) -> bool:
    """The certificate carries the template-information extension, as a native one does."""
    try:
        cert.extensions.get_extension_for_oid(TEMPLATE_INFORMATION)
    except x509.ExtensionNotFound:
        return False
    return True


def serial_hex(cert: x509.Certificate) -> str:
    return format(cert.serial_number, "x")


class Certbot:
    """certbot with its own configuration, work and log folders, run as a real process."""

    def __init__(self, folder: Path, endpoint: Endpoint) -> None:
        assert CERTBOT.exists(), f"certbot is not in {CERTBOT.parent} (make venv installs the dev extras)"
        self.folder = folder
        self.endpoint = endpoint
        folder.mkdir(parents=True, exist_ok=True)

    def command(self, *args: str) -> list[str]:
        return [str(CERTBOT), *args, "--config-dir", str(self.folder / "config"), "--work-dir",
                str(self.folder / "work"), "--logs-dir", str(self.folder / "logs"), "--non-interactive",
                "--server", self.endpoint.directory]

    def run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        # requests (certbot's HTTP library) trusts exactly this bundle for the ACME server.
        return run_tool(self.command(*args), env={"REQUESTS_CA_BUNDLE": str(self.endpoint.trust)}, check=check)

    def register(self, eab: tuple[str, str]) -> subprocess.CompletedProcess[str]:
        return self.run("register", "--agree-tos", "--register-unsafely-without-email",
                        "--eab-kid", eab[0], "--eab-hmac-key", eab[1])

    def certonly_http(self, name: str, *extra: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """http-01: certbot's own web server answers the CA on the CA's http01_port."""
        return self.run("certonly", "--standalone", "--http-01-address", "127.0.0.1", "--http-01-port",
                        str(self.endpoint.http01_port), "-d", name, "--cert-name", name, *extra, check=check)

    def dns_args(self, name: str, dns: ChallTestSrv) -> list[str]:
        """certonly for ``name`` by dns-01: manual hooks put the TXT record into the DNS test
        server the CA asks."""
        auth = write_hook(self.folder / "auth-hook.py", dns, "certbot manual auth hook", _CERTBOT_AUTH)
        cleanup = write_hook(self.folder / "cleanup-hook.py", dns, "certbot manual cleanup hook", _CERTBOT_CLEANUP)
        return ["certonly", "--manual", "--preferred-challenges", "dns", "--manual-auth-hook", str(auth),
                "--manual-cleanup-hook", str(cleanup), "-d", name, "--cert-name", name]

    def certonly_dns(self, name: str, dns: ChallTestSrv, *extra: str) -> subprocess.CompletedProcess[str]:
        return self.run(*self.dns_args(name, dns), *extra)

    def start(self, *args: str) -> Background:
        return Background(self.command(*args), {"REQUESTS_CA_BUNDLE": str(self.endpoint.trust)},
                          self.folder / "certbot.out")

    def renew(self, name: str) -> subprocess.CompletedProcess[str]:
        """``certbot renew`` for one lineage, as its timer runs it but without the random delay
        (up to 8 minutes) certbot adds before renewing when nobody is at a terminal."""
        return self.run("renew", "--cert-name", name, "--no-random-sleep-on-renew")

    def live(self, name: str, what: str = "cert") -> Path:
        return self.folder / "config" / "live" / name / f"{what}.pem"

    def renewal_conf(self, name: str) -> Path:
        return self.folder / "config" / "renewal" / f"{name}.conf"


class Lego:
    """lego (Debian) with its own ``--path``, run as a real process."""

    def __init__(self, folder: Path, endpoint: Endpoint, eab: tuple[str, str], dns: ChallTestSrv) -> None:
        assert LEGO is not None, f"lego is not installed: {HINT}"
        self.folder = folder
        self.endpoint = endpoint
        self.eab = eab
        self.dns = dns
        folder.mkdir(parents=True, exist_ok=True)
        self.exec_script = write_hook(folder / "lego-exec.py", dns, "lego exec DNS provider", _LEGO_EXEC)

    def command(self, name: str, *challenge: str) -> list[str]:
        assert LEGO is not None
        return [LEGO, "--server", self.endpoint.directory, "--accept-tos", "--email", "ops@example.internal",
                "--eab", "--kid", self.eab[0], "--hmac", self.eab[1], "--path", str(self.folder),
                "--domains", name, *challenge]

    def http(self) -> list[str]:
        return ["--http", "--http.port", f"127.0.0.1:{self.endpoint.http01_port}"]

    def tls(self) -> list[str]:
        return ["--tls", "--tls.port", f"127.0.0.1:{self.endpoint.tlsalpn01_port}"]

    def dns_exec(self) -> list[str]:
        # --dns.disable-cp: one look-up at the resolver, not a wait for authoritative servers
        # (the test server is the only one there is).
        return ["--dns", "exec", "--dns.resolvers", self.dns.address, "--dns.disable-cp"]

    def env(self) -> dict[str, str]:
        # lego trusts exactly this bundle for the ACME server; its exec provider runs our script.
        return {"LEGO_CA_CERTIFICATES": str(self.endpoint.trust), "EXEC_PATH": str(self.exec_script),
                "EXEC_POLLING_INTERVAL": "1", "EXEC_PROPAGATION_TIMEOUT": "60"}

    def run(self, name: str, challenge: list[str], *action: str,
            check: bool = True) -> subprocess.CompletedProcess[str]:
        return run_tool([*self.command(name, *challenge), *action], env=self.env(), check=check)

    def start(self, name: str, challenge: list[str], *action: str) -> Background:
        return Background([*self.command(name, *challenge), *action], self.env(), self.folder / "lego.out")

    def certificate(self, name: str) -> Path:
        """The certificate lego saved: leaf then issuer (lego bundles them)."""
        return self.folder / "certificates" / f"{name}.crt"

    def issuer(self, name: str) -> Path:
        return self.folder / "certificates" / f"{name}.issuer.crt"


def ca_status(admin: Client, cert: x509.Certificate) -> dict[str, Any]:
    """What the CA says of ``cert`` (``GET /v1/certificates/SERIAL``, as ``certpulse status``)."""
    response = admin.http.get(f"/v1/certificates/{serial_hex(cert)}")
    assert response.status_code == 200, response.text
    status: dict[str, Any] = response.json()
    assert int(status["serial"], 16) == cert.serial_number, status
    return status


def audit_rows(admin: Client, action: str) -> list[dict[str, Any]]:
    """The CA's audit rows with this action (``GET /v1/audit``), oldest first."""
    response = admin.http.get("/v1/audit", params={"limit": 10_000})
    assert response.status_code == 200, response.text
    rows: list[dict[str, Any]] = response.json()
    return sorted((row for row in rows if row["action"] == action), key=lambda row: row["id"])


def issued_rows(admin: Client, cert: x509.Certificate) -> list[dict[str, Any]]:
    """The CA's ``issued`` audit rows for ``cert``."""
    return [row for row in audit_rows(admin, "issued")
            if row["serial"] and int(row["serial"], 16) == cert.serial_number]


def validated_by(admin: Client) -> list[str]:
    """How each ACME authorization was validated, oldest first: ``http-01``, ``dns-01``..."""
    return [row["detail"].rpartition(" by ")[2] for row in audit_rows(admin, "acme-authorization-valid")]
