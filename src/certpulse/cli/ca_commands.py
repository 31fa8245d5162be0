"""Server-side commands: ca, template, principal, request, revoke, audit."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType
from typing import Annotated, Any

import typer

from certpulse import clock
from certpulse.ca.admin import CAAdmin
from certpulse.ca.crl import CRLPublisher, CRLs, check_interval
from certpulse.ca.ocsp_signer import SignerRenewer, ensure_signers
from certpulse.ca.publishing import ca_cert_url, crl_url, ocsp_url
from certpulse.ca.results import PublishedCRL
from certpulse.ca.revocation import REVOCATION_REASONS, SerialQuery
from certpulse.ca.server_tls import (
    MIN_TLS_VALIDITY,
    TLSFiles,
    TLSRenewer,
    certificate_names,
    current_certificate,
    ensure_tls_certificate,
    server_names,
)
from certpulse.ca.setup import add_issuer, init_ca, rollover_root, set_public_url
from certpulse.ca.storage import migrate
from certpulse.ca.templates import Template
from certpulse.cli.common import DirOption, JsonOption, ca_dir, operator, root_fingerprint, service
from certpulse.cli.output import console, emit_json, print_fields, print_lines, shown, table
from certpulse.durations import format_duration, parse_duration
from certpulse.errors import Reason, Refusal
from certpulse.frontends import documents
from certpulse.frontends.lifecycle import (
    DEFAULT_SHUTDOWN_TIMEOUT,
    MAX_SHUTDOWN_TIMEOUT,
    SHUTDOWN_TIMEOUT_ENV,
    SUPERVISOR_ENV,
)
from certpulse.pki.certs import serial_hex
from certpulse.pki.crl import listed_entries, pem_crl
from certpulse.pki.fingerprint import ca_fingerprint
from certpulse.pki.keys import KEY_SPECS
from certpulse.sql.db import make_engine

ca_app = typer.Typer(help="Create and run an enrollment service (CA)", no_args_is_help=True)
template_app = typer.Typer(help="Certificate templates", no_args_is_help=True)
principal_app = typer.Typer(help="Principals (machines, users) and their groups", no_args_is_help=True)
request_app = typer.Typer(help="Certificate requests: list, approve, deny", no_args_is_help=True)
apikey_app = typer.Typer(help="API keys for CA managers", no_args_is_help=True)

# prometheus_client's multiprocess folder (named here: importing the metrics module would pull
# prometheus_client into every command, and fix its storage mode before ``ca serve`` chooses it).
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
FINGERPRINT_LABEL = "Root fingerprint (pin it with `certpulse agent init --ca-fingerprint ...`)"
KEY_TYPES = ", ".join(s for s in KEY_SPECS if s != "ec-p521")
MAX_INFLIGHT_ENV = "CERTPULSE_MAX_INFLIGHT"  # read by each worker (frontends/shedding.py); named here likewise
THREADS_ENV = "CERTPULSE_THREADS"  # likewise (frontends/threads.py)
READ_TIMEOUT_ENV = "CERTPULSE_READ_TIMEOUT"  # likewise (frontends/read_deadline.py)
AUDIT_ANONYMOUS_ENV = "CERTPULSE_AUDIT_ANONYMOUS_ROWS"  # likewise (frontends/http.py, ca/audit.py)
ROLE_ENV = "CERTPULSE_ROLE"  # likewise (frontends/http.py)
ROLES = ("all", "enrollment", "status")
# uvicorn's own limits, per worker (README, "Limits against anonymous clients"):
KEEP_ALIVE_S = 5  # an idle kept-alive connection is closed after this (uvicorn's default, kept on purpose)
BACKLOG = 2048  # connections the kernel queues before a worker accepts them (capped by net.core.somaxconn)


PUBLIC_URL_HELP = ("Base URL where relying parties fetch this CA's CRLs, OCSP answers and CA certificates, "
                   "e.g. http://ca.example.com (plain http: see the README); issued certificates point there")


def _admin(dir_: Path | None) -> CAAdmin:
    return CAAdmin(service(dir_), operator())


# -- ca ---------------------------------------------------------------------------------

@ca_app.command("init")
def ca_init(
    dir_: DirOption = None,
    key_type: Annotated[str, typer.Option("--key-type", help=KEY_TYPES)] = "ec-p256",
    name: Annotated[str, typer.Option("--name", help="Name of the CA (used in its certificates)")] = "certpulse",
    database: Annotated[
        str | None, typer.Option("--database", help="Database URL (default: SQLite in the CA folder)")
    ] = None,
    issuer_validity: Annotated[str, typer.Option("--issuer-validity", help="Lifetime of the issuing CA")] = "3650d",
    public_url: Annotated[str | None, typer.Option(
        "--public-url", help=PUBLIC_URL_HELP)] = None,
) -> None:
    """Create a root CA, an issuing CA and a key recovery agent; print the admin API key once."""
    if key_type not in KEY_SPECS or key_type == "ec-p521":
        raise Refusal(Reason.INVALID_ARGUMENT, f"--key-type must be one of {KEY_TYPES}")
    target = ca_dir(dir_)
    key = init_ca(target, name=name, key_type=key_type, now=clock.now(), database_url=database,
                  issuer_validity=parse_duration(issuer_validity), public_url=public_url)
    console.print(f"[green]CA {shown(repr(name))} created in {shown(target.root)}[/green] "
                  "(root, issuer 'issuing-1', KRA)")
    console.print("Admin API key (shown once, stored only as a hash):")
    console.print(key, soft_wrap=True)
    console.print(f"{FINGERPRINT_LABEL}: {root_fingerprint(target)}", soft_wrap=True)


@ca_app.command("serve")
def ca_serve(
    dir_: DirOption = None,
    listen: Annotated[str, typer.Option("--listen", help="HOST:PORT to listen on")] = "127.0.0.1:8443",
    role: Annotated[str, typer.Option(
        "--role", help="all; enrollment (the API without CRLs, OCSP and CA certificates); status (only "
                       "those, for relying parties: no credential, plain HTTP unless --tls)")] = "all",
    workers: Annotated[int, typer.Option("--workers", min=1, max=64, help="Worker processes (one per core)")] = 1,
    tls: Annotated[bool, typer.Option(
        "--tls", help="HTTPS with a certificate this CA issues itself (the default but for --role status, "
                      "which serves plain HTTP unless given --tls)")] = False,
    no_tls: Annotated[bool, typer.Option("--no-tls", hidden=True)] = False,
    insecure_http: Annotated[bool, typer.Option(
        "--insecure-http",
        help="Plain HTTP instead of TLS: every request, bearer credentials included, in clear")] = False,
    tls_names: Annotated[list[str] | None, typer.Option(
        "--tls-name", help="A DNS name or IP address agents dial, added to the certificate (repeat)")] = None,
    tls_lifetime: Annotated[str, typer.Option(
        "--tls-lifetime", help="Lifetime of the server certificate; renewed when a third is left")] = "90d",
    access_log: Annotated[bool, typer.Option("--access-log/--no-access-log")] = False,
    max_inflight: Annotated[int, typer.Option(
        "--max-inflight", min=0, max=100_000,
        help="Requests one worker takes at once; past that it answers 503 with Retry-After (0: no limit)")] = 64,
    threads: Annotated[int, typer.Option(
        "--threads", min=1, max=256,
        help="Blocking handlers (database transaction, signature) one worker runs at once")] = 4,
    read_timeout: Annotated[int, typer.Option(
        "--read-timeout", min=1, max=3600,
        help="Seconds a request has to arrive whole, headers and body; then 408 and the connection closes")] = 30,
    max_connections: Annotated[int, typer.Option(
        "--max-connections", min=16, max=1_000_000,
        help="Open connections one worker keeps; past that new requests get 503")] = 4096,
    audit_anonymous_rows: Annotated[int, typer.Option(
        "--audit-anonymous-rows", min=0, max=1_000_000,
        help="Audit rows per minute, per refusal reason and worker, for refusals of anonymous callers; "
             "the rest are summed in one row")] = 60,
    shutdown_timeout: Annotated[int, typer.Option(
        "--shutdown-timeout", min=1, max=MAX_SHUTDOWN_TIMEOUT,
        help="Seconds a stop (SIGTERM) waits for the requests in progress; then they are cut (503) "
             "and the process exits")] = DEFAULT_SHUTDOWN_TIMEOUT,
) -> None:
    """Serve the enrollment API, over TLS with a certificate from this CA (renewed while it runs);
    with --role, only the API or only what relying parties fetch (CRLs, OCSP, CA certificates)."""
    import uvicorn

    from certpulse.frontends.tls import ReloadingTLS

    if no_tls:
        raise Refusal(Reason.INVALID_ARGUMENT, "--no-tls is gone: TLS is the default; plain HTTP needs --insecure-http")
    if role not in ROLES:
        raise Refusal(Reason.INVALID_ARGUMENT, f"--role must be one of {', '.join(ROLES)} (got {role!r})")
    status_only = role == "status"
    # Relying parties fetch CRLs and OCSP over plain HTTP (the answers are signed): the status
    # role serves HTTP unless asked for TLS, and it carries no credential to warn about.
    plain = insecure_http or (status_only and not tls)
    if tls and insecure_http:
        raise Refusal(Reason.INVALID_ARGUMENT, "--tls and --insecure-http contradict each other: choose one")
    if plain and tls_names:
        raise Refusal(Reason.INVALID_ARGUMENT, "--tls-name names the TLS certificate: no use with plain HTTP")
    host, sep, port_text = listen.rpartition(":")
    if not sep or not port_text.isdigit() or not host:
        raise Refusal(Reason.INVALID_ARGUMENT, f"--listen must be HOST:PORT (got {listen!r})")
    lifetime = parse_duration(tls_lifetime)
    if lifetime < MIN_TLS_VALIDITY:
        raise Refusal(Reason.INVALID_ARGUMENT, f"--tls-lifetime must be at least {format_duration(MIN_TLS_VALIDITY)}")
    names = server_names(host, tls_names or ())
    _check_metrics_folder()
    target = ca_dir(dir_)
    config = target.load()
    engine = make_engine(config.database_url, pool_size=1)
    migrate(engine)
    engine.dispose()
    signer_renewer: SignerRenewer | None = None
    if role != "enrollment":  # every issuer has a delegated OCSP signer before a worker answers
        svc = service(dir_)
        try:
            ensure_signers(svc, clock.now())
        finally:
            svc.engine.dispose()
        signer_renewer = SignerRenewer(lambda: service(dir_), config.publishing().ocsp_signer_validity, clock.now)
    ssl: dict[str, ReloadingTLS] = {}
    renewer: TLSRenewer | None = None
    if not plain:
        svc = service(dir_)
        try:
            files, _ = ensure_tls_certificate(target, svc, names, clock.now(), lifetime)
        finally:
            svc.engine.dispose()
        ssl = {"ssl_context_factory": ReloadingTLS(files.cert, files.key)}
        renewer = TLSRenewer(target, lambda: service(dir_), names, clock.now, lifetime)
    os.environ["CERTPULSE_CA_DIR"] = str(target.root.resolve())
    os.environ[MAX_INFLIGHT_ENV] = str(max_inflight)
    os.environ[THREADS_ENV] = str(threads)
    os.environ[READ_TIMEOUT_ENV] = str(read_timeout)
    os.environ[AUDIT_ANONYMOUS_ENV] = str(audit_anonymous_rows)
    os.environ[SHUTDOWN_TIMEOUT_ENV] = str(shutdown_timeout)
    os.environ[SUPERVISOR_ENV] = str(os.getpid())
    os.environ[ROLE_ENV] = role
    _log_to_stderr()
    if plain and not status_only:
        logging.getLogger("certpulse.serve").warning(
            "--insecure-http: serving plain HTTP; all traffic, bearer credentials (API keys, enrollment "
            "tokens, session credentials) included, travels in clear")
    what = {"all": "", "enrollment": " (enrollment only: no CRLs, OCSP or CA certificates)",
            "status": " (status only: CRLs, OCSP, CA certificates, probes and metrics; no enrollment)"}[role]
    console.print(f"serving CA {shown(repr(config.name))} on {'http' if plain else 'https'}://{shown(listen)} "
                  f"({workers} worker(s)){what}")
    publisher = CRLPublisher(lambda: _crls_of(dir_), clock.now, check_interval(config.crl_period_delta))
    with _metrics_folder():
        if renewer is not None:
            renewer.start()
        if signer_renewer is not None:
            signer_renewer.start()
        publisher.start()
        try:
            uvicorn.run("certpulse.frontends.http:app_from_environment", factory=True, host=host.strip("[]"),
                        port=int(port_text), workers=workers, access_log=access_log, log_level="warning",
                        server_header=False, http="certpulse.frontends.read_deadline:BoundedHttpToolsProtocol",
                        timeout_keep_alive=KEEP_ALIVE_S, limit_concurrency=max_connections, backlog=BACKLOG,
                        timeout_graceful_shutdown=shutdown_timeout, **ssl)  # type: ignore[arg-type]
        finally:
            if signer_renewer is not None:
                signer_renewer.stop()
            publisher.stop()
            if renewer is not None:
                renewer.stop()


def _crls_of(dir_: Path | None) -> tuple[CRLs, Callable[[], None]]:
    """The CRLs of the CA in ``dir_``, for ``ca serve``'s periodic task, and how to let go of them."""
    svc = service(dir_)
    return svc.crls, svc.engine.dispose


def _log_to_stderr() -> None:
    """The server's own messages (the plain-HTTP warning, certificate renewals) on stderr, as
    uvicorn's are."""
    logger = logging.getLogger("certpulse.serve")
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s:     certpulse: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False


def _check_metrics_folder() -> None:
    """Refuse early when the operator named a metrics folder that is not there: prometheus_client
    would otherwise fail on the first request that observes a latency, in every worker."""
    given = os.environ.get(MULTIPROC_ENV)
    if given is not None and not Path(given).is_dir():
        raise Refusal(Reason.INVALID_ARGUMENT, f"{MULTIPROC_ENV}={given!r} is not a directory")


class _Terminated(BaseException):
    """SIGTERM arrived: unwind (running clean-ups), then die of the signal as before."""


@contextlib.contextmanager
def _metrics_folder() -> Iterator[None]:
    """The folder where every worker process writes its latency histograms (prometheus_client's
    multiprocess mode), so that a scrape answered by any worker reports all of them.

    The operator's ``PROMETHEUS_MULTIPROC_DIR`` is used as it is (and left in place). Otherwise a
    fresh private folder (0700: other users must not read or plant the files) is made for this
    run and removed when the server stops, so that one run's histograms never leak into the
    next; the folders of servers killed before they could remove theirs are removed first
    (:mod:`certpulse.frontends.metrics_folders`). It must be in the environment before the
    workers import prometheus_client, which chooses its storage once, at import.

    SIGTERM (how systemd and most supervisors stop a server) would otherwise end a
    single-process server without running this clean-up: uvicorn re-raises the signal after its
    graceful shutdown, with the previous disposition. So for the server's lifetime SIGTERM
    unwinds the stack; afterwards the signal is raised again with the old disposition, and the
    process still ends the way it did before.
    """
    if MULTIPROC_ENV in os.environ:
        yield
        return
    from certpulse.frontends import metrics_folders

    metrics_folders.remove_stale()
    folder = metrics_folders.make_folder()  # mode 0700
    os.environ[MULTIPROC_ENV] = str(folder)

    def on_term(signum: int, frame: FrameType | None) -> None:
        raise _Terminated

    previous = signal.signal(signal.SIGTERM, on_term)
    terminated = False
    try:
        yield
    except _Terminated:
        terminated = True
    finally:
        signal.signal(signal.SIGTERM, previous)
        os.environ.pop(MULTIPROC_ENV, None)
        shutil.rmtree(folder, ignore_errors=True)
    if terminated:
        signal.raise_signal(signal.SIGTERM)


@ca_app.command("status")
def ca_status(dir_: DirOption = None, json_: JsonOption = False) -> None:
    """The CA at a glance: name, database, issuers, the root fingerprint agents pin, the server's
    TLS certificate, the URLs relying parties fetch CRLs, OCSP answers and CA certificates from."""
    from sqlalchemy.engine import make_url

    target = ca_dir(dir_)
    config = target.load()
    authorities = _admin(dir_).issuers()
    issuers = [{"name": r["name"], "not_after": r["not_after"], "enabled": r["enabled"], "cost": r["cost"],
                "renewal_only": r["renewal_only"]}
               for r in authorities if r["role"] == "issuer"]
    served = current_certificate(TLSFiles.of(target))
    tls_doc = None if served is None else {
        "serial": serial_hex(served.serial_number), "not_after": served.not_valid_after_utc.isoformat(),
        "names": list(certificate_names(served).all())}
    published = _published_urls(config.public_url, [r["name"] for r in authorities if r["role"] in PUBLISHED_ROLES])
    doc = {"name": config.name, "dir": str(target.root), "database": make_url(config.database_url).get_backend_name(),
           "ca_fingerprint": root_fingerprint(target), "issuers": issuers, "tls": tls_doc, "publishing": published}
    if json_:
        emit_json(doc)
        return
    print_fields(("name", config.name), ("folder", str(target.root)), ("database", doc["database"]),
                 ("root fingerprint", doc["ca_fingerprint"]),
                 ("TLS certificate", "none yet (ca serve issues it)" if tls_doc is None else
                  f"serial {tls_doc['serial']}, not after {tls_doc['not_after']}, "
                  f"names {', '.join(tls_doc['names'])}"),
                 ("public URL", "none: certificates carry no CRL or OCSP pointers (ca set-public-url URL)"
                  if published is None else published["public_url"]),
                 *(() if published is None else (("OCSP", published["ocsp"]),)))
    table("Issuers", ["name", "not after", "enabled", "cost", "renewal only"],
          [(i["name"], i["not_after"], i["enabled"], i["cost"], i["renewal_only"]) for i in issuers])
    if published is not None:
        table("Published", ["authority", "CRL", "certificate"],
              [(name, published["crls"][name], published["ca_certificates"][name]) for name in published["crls"]])


PUBLISHED_ROLES = ("root", "issuer")  # whose CRL and certificate relying parties fetch (never the KRA)


def _published_urls(public_url: str | None, authorities: list[str]) -> dict[str, Any] | None:
    """The URLs this CA's certificates point at (ca/publishing.py's scheme), or None without a public URL."""
    if public_url is None:
        return None
    return {"public_url": public_url, "ocsp": ocsp_url(public_url),
            "crls": {name: crl_url(public_url, name) for name in authorities},
            "ca_certificates": {name: ca_cert_url(public_url, name) for name in authorities}}


@ca_app.command("set-public-url")
def ca_set_public_url(
    url: Annotated[str | None, typer.Argument(help="e.g. http://ca.example.com", show_default=False)] = None,
    dir_: DirOption = None,
    clear: Annotated[bool, typer.Option("--clear", help="No public URL: new certificates point nowhere")] = False,
) -> None:
    """Set (or --clear) the base URL of the CRLs, OCSP responder and CA certificates that newly
    issued certificates point at."""
    if (url is None) == (not clear):
        raise Refusal(Reason.INVALID_ARGUMENT, "give the public URL, or --clear to have none (not both)")
    target = ca_dir(dir_)
    config = set_public_url(target, service(dir_), url, clock.now())
    if config.public_url is None:
        console.print("[green]public URL cleared[/green]: certificates issued from now on carry no CRL "
                      "distribution point and no AIA")
    else:
        console.print(f"[green]public URL set to {shown(config.public_url)}[/green]: certificates issued from now "
                      "on point at its CRLs, OCSP responder and CA certificates")
    console.print("certificates issued before keep what they carry (re-issue them, e.g. 'template reenroll-all', "
                  "to change that); restart 'ca serve' for it to take effect", soft_wrap=True)


@ca_app.command("add-issuer")
def ca_add_issuer(
    name: str,
    dir_: DirOption = None,
    key_type: Annotated[str, typer.Option("--key-type", help=KEY_TYPES)] = "ec-p256",
    cost: Annotated[int, typer.Option("--cost", help="Lower cost is preferred")] = 10,
    templates: Annotated[list[str] | None, typer.Option("--template", help="A template it serves (repeat)")] = None,
    renewal_only: Annotated[bool, typer.Option("--renewal-only", help="Serve renewals only")] = False,
    validity: Annotated[str, typer.Option("--validity")] = "3650d",
) -> None:
    """Add another issuing CA, signed by the root."""
    svc = service(dir_)
    add_issuer(ca_dir(dir_), svc, name=name, key_type=key_type, cost=cost, templates=templates or [],
               renewal_only=renewal_only, now=clock.now(), validity=parse_duration(validity))
    console.print(f"[green]issuer {shown(repr(name))} added[/green] "
                  f"(cost {cost}{', renewal only' if renewal_only else ''})")


@ca_app.command("rollover-root")
def ca_rollover_root(
    dir_: DirOption = None,
    key_type: Annotated[str, typer.Option("--key-type", help=KEY_TYPES)] = "ec-p256",
) -> None:
    """Make a new root, cross-signed by the current one, and a new issuing CA under it (the old
    issuers are disabled). Pinned agents accept the new root through the cross-certificate."""
    if key_type not in KEY_SPECS or key_type == "ec-p521":
        raise Refusal(Reason.INVALID_ARGUMENT, f"--key-type must be one of {KEY_TYPES}")
    new_root, _, issuer = rollover_root(ca_dir(dir_), service(dir_), key_type=key_type, now=clock.now())
    console.print(f"[green]new root {shown(new_root.subject.rfc4514_string())}[/green], cross-signed by the "
                  f"previous root; new issuer {shown(repr(issuer))}")
    console.print(f"new root fingerprint (SHA-256): {ca_fingerprint(new_root)}")
    console.print("the policy publishes the new root and its cross-certificate now; "
                  "agents pin the new root at their next policy refresh")


@ca_app.command("issuers")
def ca_issuers(dir_: DirOption = None, json_: JsonOption = False) -> None:
    """List the CA's authorities: root, issuers, KRA."""
    rows = _admin(dir_).issuers()
    if json_:
        emit_json(rows)
        return
    table("Authorities", ["name", "role", "cost", "renewal only", "enabled", "templates", "not after", "thumbprint"],
          [(r["name"], r["role"], r["cost"] if r["role"] == "issuer" else "", r["renewal_only"], r["enabled"],
            ", ".join(r["templates"]), r["not_after"][:10], r["thumbprint"]) for r in rows])


@ca_app.command("crl")
def ca_crl(
    dir_: DirOption = None,
    issuer: Annotated[str | None, typer.Option(
        "--issuer", help="The authority whose CRL to make (default: every issuer and the root)")] = None,
    out: Annotated[Path | None, typer.Option("--out", help="Write the CRL to FILE (DER; PEM with --pem)")] = None,
    pem_out: Annotated[bool, typer.Option("--pem", help="With --out: PEM instead of DER")] = False,
    json_: JsonOption = False,
) -> None:
    """Make the CRL now (it becomes the one served) and print what it lists."""
    if pem_out and out is None:
        raise Refusal(Reason.INVALID_ARGUMENT, "--pem says how --out writes the CRL: give --out FILE too")
    svc = service(dir_)
    crls = svc.crls
    names = [issuer] if issuer is not None else [a.name for a in crls.signers()]
    if out is not None and len(names) != 1:
        raise Refusal(Reason.INVALID_ARGUMENT, "--out writes one CRL: name its authority with --issuer")
    made = [crls.generate(name, clock.now()) for name in names]
    if out is not None:
        _write_crl(out, made[0].der, pem_out)
    documents_ = [_crl_document(published, svc.publishing.public_url) for published in made]
    if json_:
        emit_json(documents_)
        return
    for document in documents_:
        print_fields(("issuer", document["issuer"]), ("number", document["number"]),
                     ("this_update", document["this_update"]), ("next_update", document["next_update"]),
                     ("entries", document["entries"]), ("url", document["url"]))
        if document["revoked"]:
            table(f"CRL {document['number']} of {document['issuer']}", ["serial", "revoked at", "reason"],
                  [(e["serial"], e["revoked_at"], e["reason"]) for e in document["revoked"]])
    if out is not None:
        console.print(f"written to {shown(out)} ({'PEM' if pem_out else 'DER'})")


def _crl_document(published: PublishedCRL, public_url: str | None) -> dict[str, Any]:
    return {
        "issuer": published.authority, "number": published.number,
        "this_update": published.this_update.isoformat(), "next_update": published.next_update.isoformat(),
        "entries": published.entries, "bytes": len(published.der),
        "url": crl_url(public_url, published.authority) if public_url else None,
        "revoked": [{"serial": serial_hex(e.serial), "revoked_at": e.revoked_at.isoformat(), "reason": e.reason}
                    for e in listed_entries(published.der)],
    }


def _write_crl(out: Path, der: bytes, as_pem: bool) -> None:
    try:
        if as_pem:
            out.write_text(pem_crl(der))
        else:
            out.write_bytes(der)
    except OSError as exc:
        raise Refusal(Reason.INVALID_ARGUMENT, f"cannot write {out}: {exc.strerror}") from None


@ca_app.command("set-issuer")
def ca_set_issuer(
    name: str,
    dir_: DirOption = None,
    cost: Annotated[int | None, typer.Option("--cost")] = None,
    renewal_only: Annotated[bool | None, typer.Option("--renewal-only/--all-requests")] = None,
    enabled: Annotated[bool | None, typer.Option("--enable/--disable")] = None,
    serve: Annotated[list[str] | None, typer.Option("--serve", help="Start serving a template")] = None,
    unserve: Annotated[list[str] | None, typer.Option("--unserve", help="Stop serving a template")] = None,
) -> None:
    """Change an issuer's cost, mode or the templates it serves."""
    _admin(dir_).set_issuer(name, clock.now(), cost=cost, renewal_only=renewal_only, enabled=enabled,
                            serve=serve, unserve=unserve)
    console.print(f"[green]issuer {shown(repr(name))} updated[/green]")


# -- templates --------------------------------------------------------------------------

def _template_row(x: Template) -> tuple[str, ...]:
    return (x.name, x.version, format_duration(x.validity), format_duration(x.renewal_period), x.purpose,
            x.subject_source, "yes" if x.manager_approval else "", ", ".join(x.supersedes))


def _read_file(path: Path) -> str:
    try:
        return path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise Refusal(Reason.INVALID_ARGUMENT, f"cannot read {path}: {exc}") from None


@template_app.command("add")
def template_add(
    file: Path,
    dir_: DirOption = None,
    issuers: Annotated[list[str] | None, typer.Option("--issuer", help="Issuer to serve it (default: all)")] = None,
) -> None:
    """Add a template from a TOML file."""
    template = _admin(dir_).add_template(_read_file(file), clock.now(), issuers=issuers)
    console.print(f"[green]template {shown(repr(template.name))} added[/green] "
                  f"(version {template.version}, OID {template.oid})")


@template_app.command("list")
def template_list(dir_: DirOption = None, json_: JsonOption = False) -> None:
    """List templates."""
    templates = _admin(dir_).templates()
    if json_:
        emit_json([x.document() for x in templates])
        return
    table("Templates",
          ["name", "version", "validity", "renewal period", "purpose", "subject", "approval", "supersedes"],
          [_template_row(x) for x in templates])


@template_app.command("show")
def template_show(name: str, dir_: DirOption = None, json_: JsonOption = False) -> None:
    """Show every setting of a template (as TOML, or JSON)."""
    import tomli_w

    template = _admin(dir_).template(name)
    if json_:
        emit_json(template.document())
    else:
        print_lines(tomli_w.dumps(template.document()))


@template_app.command("edit")
def template_edit(name: str, file: Path, dir_: DirOption = None) -> None:
    """Replace a template's settings from FILE; raises the minor version."""
    template = _admin(dir_).edit_template(name, _read_file(file), clock.now())
    console.print(f"[green]template {shown(repr(name))} updated[/green] (version {template.version})")


@template_app.command("reenroll-all")
def template_reenroll_all(name: str, dir_: DirOption = None) -> None:
    """Raise the major version: every holder renews at its next pulse."""
    template = _admin(dir_).reenroll_all(name, clock.now())
    console.print(f"[green]template {shown(repr(name))} now at version {template.version}[/green]: holders re-enroll")


# -- principals -------------------------------------------------------------------------

@principal_app.command("add")
def principal_add(
    name: str,
    dir_: DirOption = None,
    kind: Annotated[str, typer.Option("--kind", help="machine or user")] = "machine",
    groups: Annotated[list[str] | None, typer.Option("--group", help="Group to join (repeat)")] = None,
    roles: Annotated[list[str] | None, typer.Option("--role", help="Role, e.g. ca-manager")] = None,
    json_: JsonOption = False,
) -> None:
    """Add a principal and print its one-time enrollment token."""
    result = _admin(dir_).add_principal(name, kind, clock.now(), groups=groups, roles=roles)
    result["ca_fingerprint"] = root_fingerprint(ca_dir(dir_))
    if json_:
        emit_json(result)
        return
    console.print(f"[green]{shown(kind)} {shown(repr(name))} added[/green]. "
                  f"One-time enrollment token (expires {shown(result['expires_at'])}):")
    console.print(result["token"], soft_wrap=True)
    console.print(f"{FINGERPRINT_LABEL}: {result['ca_fingerprint']}", soft_wrap=True)


@principal_app.command("token")
def principal_token(name: str, dir_: DirOption = None, json_: JsonOption = False) -> None:
    """Issue a new one-time enrollment token for an existing principal."""
    result = _admin(dir_).new_token(name, clock.now())
    result["ca_fingerprint"] = root_fingerprint(ca_dir(dir_))
    if json_:
        emit_json(result)
        return
    if result["superseded"]:
        console.print(f"{result['superseded']} earlier unused token(s) of {shown(repr(name))} can no longer be used.")
    console.print(f"One-time enrollment token for {shown(repr(name))} (expires {shown(result['expires_at'])}):")
    console.print(result["token"], soft_wrap=True)
    console.print(f"{FINGERPRINT_LABEL}: {result['ca_fingerprint']}", soft_wrap=True)


@principal_app.command("disable")
def principal_disable(name: str, dir_: DirOption = None) -> None:
    """Disable a principal: its credential stops working at once, on every server process."""
    changed = _admin(dir_).set_principal_enabled(name, False, clock.now())
    console.print(f"[yellow]principal {shown(repr(name))} disabled[/yellow]" + ("" if changed else " (it already was)"))


@principal_app.command("enable")
def principal_enable(name: str, dir_: DirOption = None) -> None:
    """Enable a disabled principal again: its credential works again."""
    changed = _admin(dir_).set_principal_enabled(name, True, clock.now())
    console.print(f"[green]principal {shown(repr(name))} enabled[/green]" + ("" if changed else " (it already was)"))


@principal_app.command("remove")
def principal_remove(name: str, dir_: DirOption = None, json_: JsonOption = False) -> None:
    """Remove a principal: credential, tokens and groups go; certificates, requests and audit stay.

    Its pending requests are denied. Adding the name again makes a new principal."""
    result = _admin(dir_).remove_principal(name, clock.now())
    if json_:
        emit_json(result)
        return
    console.print(f"[yellow]principal {shown(repr(name))} removed[/yellow]: "
                  f"kept {result['certificates_kept']} certificate(s) "
                  f"and {result['requests_kept']} request(s); denied {result['pending_denied']} pending request(s)")


@principal_app.command("list")
def principal_list(dir_: DirOption = None, json_: JsonOption = False) -> None:
    """List principals with their groups."""
    rows = _admin(dir_).principals()
    if json_:
        emit_json(rows)
        return
    table("Principals", ["name", "kind", "groups", "roles", "enrolled", "enabled"],
          [(r["name"], r["kind"], ", ".join(r["groups"]), ", ".join(r["roles"]), "yes" if r["enrolled"] else "no",
            "yes" if r["enabled"] else "no") for r in rows])


@principal_app.command("groups")
def principal_groups(
    name: str,
    dir_: DirOption = None,
    add: Annotated[list[str] | None, typer.Option("--add")] = None,
    remove: Annotated[list[str] | None, typer.Option("--remove")] = None,
) -> None:
    """Add a principal to groups or remove it from them."""
    _admin(dir_).set_groups(name, clock.now(), add or [], remove or [])
    console.print(f"[green]groups of {shown(repr(name))} updated[/green]")


@principal_app.command("acme-eab")
def principal_acme_eab(
    name: str,
    dir_: DirOption = None,
    expires: Annotated[str | None, typer.Option(
        "--expires", help="Lifetime of the unused key, e.g. 7d (default: ca.toml [acme] eab_key_lifetime)")] = None,
    json_: JsonOption = False,
) -> None:
    """Make a one-time ACME external account binding key for a principal (printed once).

    An ACME client registers its account with it (certbot --eab-kid/--eab-hmac-key, lego
    --eab --kid/--hmac); the account then acts as the principal."""
    lifetime = parse_duration(expires) if expires is not None else None
    result = _admin(dir_).add_acme_eab(name, clock.now(), lifetime)
    if json_:
        emit_json(result)
        return
    kid, key = result["kid"], result["hmac_key"]
    console.print(f"ACME account binding for {shown(repr(name))} (shown once; one use; "
                  f"expires {shown(result['expires_at'])}):")
    print_fields(("kid", kid), ("hmac_key", key))
    directory = "https://CA-HOST:PORT/acme/directory"
    console.print("certbot:", soft_wrap=True)
    console.print(f"  certbot register --server {directory} --eab-kid {kid} --eab-hmac-key {key}",
                  soft_wrap=True, markup=False)
    console.print("lego:", soft_wrap=True)
    console.print(f"  lego --server {directory} --eab --kid {kid} --hmac {key} --email ADDRESS run ...",
                  soft_wrap=True, markup=False)


# -- requests, revocation, audit ----------------------------------------------------------

@request_app.command("list")
def request_list(
    dir_: DirOption = None,
    status: Annotated[str | None, typer.Option("--status", help="pending, issued, denied, failed")] = None,
    json_: JsonOption = False,
) -> None:
    """List requests."""
    listed = service(dir_).requests.list(operator(), clock.now(), status)
    if json_:
        emit_json([documents.request(r) for r in listed.requests])
        return
    table("Requests", ["id", "status", "template", "kind", "requester", "names", "created", "decided by"],
          [(r.request_id, r.status, r.template, r.kind, r.requester, ", ".join(r.names), r.created_at.isoformat(),
            r.decided_by) for r in listed.requests])


@request_app.command("show")
def request_show(request_id: int, dir_: DirOption = None, json_: JsonOption = False) -> None:
    """Show one request (and its certificate once issued)."""
    result = service(dir_).requests.get(operator(), request_id)
    if json_:
        emit_json(documents.request(result))
        return
    issued = result.issued
    _print_fields(
        ("id", result.request_id), ("status", result.status), ("template", result.template), ("kind", result.kind),
        ("requester", result.requester), ("subject", result.subject), ("names", list(result.names)),
        ("created_at", result.created_at.isoformat()),
        ("decided_at", result.decided_at.isoformat() if result.decided_at else None),
        ("decided_by", result.decided_by), ("reason", result.reason),
        ("serial", issued.serial if issued else None), ("thumbprint", issued.thumbprint if issued else None))


_print_fields = print_fields  # one "name: value" line per field: printable, never markup


@request_app.command("approve")
def request_approve(request_id: int, dir_: DirOption = None) -> None:
    """Approve a pending request: the certificate is issued now."""
    result = service(dir_).requests.approve(operator(), request_id, clock.now())
    console.print(f"[green]request {request_id} approved[/green]: serial {shown(result.issued.serial)}")


@request_app.command("deny")
def request_deny(
    request_id: int,
    reason: Annotated[str, typer.Option("--reason", help="Why (told to the requester)")],
    dir_: DirOption = None,
) -> None:
    """Deny a pending request."""
    service(dir_).requests.deny(operator(), request_id, reason, clock.now())
    console.print(f"[yellow]request {request_id} denied[/yellow]")


def revoke(
    serial: str,
    reason: Annotated[str, typer.Option("--reason", help=", ".join(REVOCATION_REASONS))] = "unspecified",
    issuer: Annotated[str | None, typer.Option("--issuer", help="When the serial exists at several issuers")] = None,
    dir_: DirOption = None,
) -> None:
    """Revoke a certificate by serial number (hex)."""
    result = service(dir_).revocation.revoke(operator(), serial, reason, clock.now(), issuer=issuer)
    console.print(f"[yellow]certificate {shown(result.serial)} revoked[/yellow] ({shown(result.reason)})")


def unrevoke(
    serial: str,
    issuer: Annotated[str | None, typer.Option("--issuer", help="When the serial exists at several issuers")] = None,
    dir_: DirOption = None,
) -> None:
    """Release a certificate from hold (revoked with --reason certificateHold): it is good again."""
    result = service(dir_).revocation.unrevoke(operator(), serial, clock.now(), issuer=issuer)
    console.print(f"[green]certificate {shown(result.serial)} released from hold[/green] "
                  f"(held since {shown(result.held_since.isoformat())})")


def status(serials: Annotated[list[str], typer.Argument(metavar="SERIAL...", help="Serial numbers in hex")],
           dir_: DirOption = None, json_: JsonOption = False,
           issuer: Annotated[str | None, typer.Option("--issuer", help="The issuing CA's name")] = None) -> None:
    """Show certificates' status by serial number: good, revoked (when, and why) or expired.

    One serial: every field (an unknown serial is refused, exit 2). Several (at most 500): one
    line each, or with --json a list; an unknown serial is listed as "unknown" and the command
    then exits 1, so a script can tell that some serial is not this CA's."""
    if len(serials) == 1:
        result = service(dir_).revocation.status(serials[0], clock.now(), issuer=issuer)
        if json_:
            emit_json(documents.certificate_status(result))
            return
        _print_fields(
            ("serial", result.serial), ("issuer", result.issuer), ("status", result.status),
            ("template", result.template), ("subject", result.subject), ("not_before", result.not_before.isoformat()),
            ("not_after", result.not_after.isoformat()),
            ("revoked_at", result.revoked_at.isoformat() if result.revoked_at else None),
            ("revocation_reason", result.revocation_reason), ("thumbprint", result.thumbprint))
        return
    listed = service(dir_).revocation.statuses([SerialQuery(serial, issuer) for serial in serials], clock.now())
    if json_:
        emit_json([documents.serial_status(s) for s in listed.certificates])
    else:
        table("Certificates", ["serial", "issuer", "status", "revoked at", "reason", "not after"],
              [(s.serial, s.issuer, s.status, s.revoked_at.isoformat() if s.revoked_at else None,
                s.revocation_reason, s.not_after.isoformat() if s.not_after else None) for s in listed.certificates])
    if any(s.status == "unknown" for s in listed.certificates):
        raise typer.Exit(1)


def audit(dir_: DirOption = None, json_: JsonOption = False,
          limit: Annotated[int, typer.Option("--limit", min=1, max=10000)] = 50) -> None:
    """Show the audit log, newest first."""
    log = service(dir_).audit.read(operator(), clock.now(), limit=limit)
    if json_:
        emit_json([documents.audit_entry(e) for e in log.entries])
        return
    table("Audit", ["at", "actor", "action", "template", "request", "serial", "reason", "detail"],
          [(e.at.isoformat(), e.actor, e.action, e.template, e.request_id, e.serial, e.reason, (e.detail or "")[:80])
           for e in log.entries])


@apikey_app.command("add")
def apikey_add(
    name: str,
    dir_: DirOption = None,
    expires: Annotated[str | None, typer.Option(
        "--expires", help="Lifetime, e.g. 90d (default: until revoked)")] = None,
) -> None:
    """Create a CA-manager API key; printed once."""
    lifetime = parse_duration(expires) if expires is not None else None
    key = _admin(dir_).add_api_key(name, clock.now(), lifetime)
    console.print(f"API key {shown(repr(name))} (shown once):")
    console.print(key, soft_wrap=True)


@apikey_app.command("list")
def apikey_list(dir_: DirOption = None, json_: JsonOption = False) -> None:
    """List API keys: name, created, expires, revoked (never the key: only its hash is kept)."""
    rows = _admin(dir_).api_keys(clock.now())
    if json_:
        emit_json(rows)
        return
    table("API keys", ["name", "role", "state", "created", "expires", "revoked"],
          [(r["name"], r["role"], r["state"], r["created_at"], r["expires_at"] or "never", r["revoked_at"])
           for r in rows])


@apikey_app.command("revoke")
def apikey_revoke(name: str, dir_: DirOption = None) -> None:
    """Revoke an API key by name; it stops working at once. The last valid key cannot be revoked."""
    _admin(dir_).revoke_api_key(name, clock.now())
    console.print(f"[yellow]API key {shown(repr(name))} revoked[/yellow]")
