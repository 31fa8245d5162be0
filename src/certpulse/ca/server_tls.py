"""The API server's own TLS certificate: issued by this CA's issuing CA, recorded and audited
like any other certificate, and renewed by the running server before it expires.

``ca serve`` calls :func:`ensure_tls_certificate` once before it listens (so there is always a
certificate to serve) and then, from a :class:`TLSRenewer` thread, again and again: a check that
costs one file read while the certificate is fresh, and re-issues (key first, then the chain,
each replaced atomically) once less than a third of its lifetime remains, or when the names it
must carry changed. The worker processes notice the new file and serve it on new handshakes
(``frontends/tls.py``); nobody restarts anything.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import ipaddress
import logging
import os
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from certpulse.ca.config import CADir
from certpulse.ca.service import CAService
from certpulse.ca.storage import schema as t
from certpulse.errors import Reason, Refusal
from certpulse.pki.build import (
    backdated_start,
    end_entity_builder,
    inclusive_not_after,
    random_serial,
    signature_hash,
    simple_name,
)
from certpulse.pki.certs import der, pem, serial_hex, thumbprint
from certpulse.pki.keys import PrivateKey, generate_private_key, write_private_key
from certpulse.pki.names import RequestedNames, is_hostname, names_to_json, to_general_names
from certpulse.sql.db import write

TLS_VALIDITY = dt.timedelta(days=90)
MIN_TLS_VALIDITY = dt.timedelta(seconds=10)
TLS_TEMPLATE = "_api-server"  # the template name its records carry: no real template issues it
RENEW_WHEN_LEFT = 3  # renew when less than 1/RENEW_WHEN_LEFT of the lifetime remains
_LOCAL_NAMES = ("localhost", "127.0.0.1")
_ANY_ADDRESS = (ipaddress.ip_address("0.0.0.0"), ipaddress.ip_address("::"))  # noqa: S104 - compared, not bound

log = logging.getLogger("certpulse.serve")


@dataclasses.dataclass(frozen=True)
class TLSFiles:
    """Where the server's key and chain (its certificate, then the issuing CA's) are kept."""

    cert: Path
    key: Path

    @classmethod
    def of(cls, ca_dir: CADir) -> TLSFiles:
        return cls(ca_dir.tls / "server.pem", ca_dir.tls / "server.key")


def server_names(listen_host: str, extra: Sequence[str] = ()) -> RequestedNames:
    """The names the certificate carries: the host the server listens on (unless it is the
    any-address, which no client dials), ``localhost`` and ``127.0.0.1``, and the names agents
    use (``--tls-name``). A name that is neither an IP address nor a DNS name is refused."""
    dns: list[str] = []
    ips: list[str] = []
    for given in (listen_host.strip("[]"), *_LOCAL_NAMES, *extra):
        try:
            address = ipaddress.ip_address(given)
        except ValueError:
            name = given.strip().lower().rstrip(".")
            if not is_hostname(name, allow_wildcard=True):
                raise Refusal(Reason.INVALID_ARGUMENT, f"{given!r} is neither a DNS name nor an IP address") from None
            if name not in dns:
                dns.append(name)
            continue
        if address not in _ANY_ADDRESS and str(address) not in ips:
            ips.append(str(address))
    return RequestedNames(dns=tuple(dns), ip=tuple(ips))


def certificate_names(cert: x509.Certificate) -> RequestedNames:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return RequestedNames()
    return RequestedNames(dns=tuple(san.get_values_for_type(x509.DNSName)),
                          ip=tuple(str(a) for a in san.get_values_for_type(x509.IPAddress)))


def renewal_due(cert: x509.Certificate, names: RequestedNames, now: dt.datetime) -> bool:
    """Re-issue when less than a third of the certificate's own lifetime is left, when it is not
    valid yet (a clock that went back), or when it lacks a name it must carry or has one it
    must not."""
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    if now < cert.not_valid_before_utc or cert.not_valid_after_utc - now < lifetime / RENEW_WHEN_LEFT:
        return True
    held = certificate_names(cert)
    return set(held.dns) != set(names.dns) or set(held.ip) != set(names.ip)


def current_certificate(files: TLSFiles) -> x509.Certificate | None:
    """The certificate being served, or None when there is none (yet) or it cannot be read."""
    try:
        return x509.load_pem_x509_certificates(files.cert.read_bytes())[0]
    except (OSError, ValueError, IndexError):
        return None


def ensure_tls_certificate(ca_dir: CADir, service: CAService, names: RequestedNames, now: dt.datetime,
                           lifetime: dt.timedelta = TLS_VALIDITY) -> tuple[TLSFiles, x509.Certificate | None]:
    """The server's files, re-issued first when :func:`renewal_due`; also the new certificate
    when one was issued (None when the current one stays)."""
    files = TLSFiles.of(ca_dir)
    current = current_certificate(files)
    if current is not None and files.key.exists() and not renewal_due(current, names, now):
        return files, None
    return files, _issue(ca_dir, files, service, names, now, lifetime)


def _issue(ca_dir: CADir, files: TLSFiles, service: CAService, names: RequestedNames, now: dt.datetime,
           lifetime: dt.timedelta) -> x509.Certificate:
    ca_dir.tls.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(ca_dir.tls, 0o700)
    with write(service.engine) as conn:
        snap = service.state.get(conn)
    issuers = sorted((a for a in snap.by_role("issuer") if a.enabled and a.valid_at(now)), key=lambda a: a.cost)
    if not issuers:
        raise Refusal(Reason.NO_ISSUER, "no valid issuing CA to issue the server certificate")
    issuer = issuers[0]
    issuer_key = service.keyring.key(issuer)
    key: PrivateKey = generate_private_key("ec-p256")
    serial = random_serial()
    start = backdated_start(now, lifetime, floor=issuer.certificate.not_valid_before_utc)
    not_after = min(inclusive_not_after(start, lifetime), issuer.certificate.not_valid_after_utc)
    cert = end_entity_builder(
        subject=simple_name(names.all()[0]), public_key=key.public_key(), issuer_cert=issuer.certificate,
        issuer_key=issuer_key, not_before=start, not_after=not_after, sans=to_general_names(names),
        key_usage=x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                data_encipherment=False, key_agreement=False, key_cert_sign=False,
                                crl_sign=False, encipher_only=False, decipher_only=False),
        ekus=(ExtendedKeyUsageOID.SERVER_AUTH.dotted_string,),
        extra=service.issuance.pointers_for(issuer)).serial_number(serial).sign(
            issuer_key, signature_hash(issuer_key))
    with write(service.engine) as conn:
        conn.execute(t.certificates.insert().values(
            authority_id=issuer.id, serial=serial_hex(serial), template_name=TLS_TEMPLATE,
            subject=cert.subject.rfc4514_string(), names=names_to_json(names), not_before=start,
            not_after=not_after, status="issued", der=der(cert), thumbprint=thumbprint(cert), created_at=now))
        service.audit.record(conn, now, "operator:serve", "issued", template=TLS_TEMPLATE,
                             serial=serial_hex(serial), names=list(names.all()), detail="API server TLS certificate")
    # The key first, then the chain, each replaced in one step: a worker reloads when the chain
    # file changes, and by then the key that matches it is in place.
    write_private_key(files.key, key)
    tmp = files.cert.with_name(f".{files.cert.name}.tmp")
    # After a root rollover the issuer is under the new root: its cross-certificate joins the
    # chain, so that agents still pinned to the old root verify the server (and learn the new one).
    cross = [pem(a.certificate) for a in snap.by_role("cross") if a.certificate.subject == issuer.certificate.issuer]
    tmp.write_text(pem(cert) + pem(issuer.certificate) + "".join(cross))
    os.replace(tmp, files.cert)
    return cert


def check_interval(lifetime: dt.timedelta) -> float:
    """Seconds between two renewal checks: a hundredth of the lifetime, at least one second and
    at most an hour (a check that finds nothing to do reads one file)."""
    return min(max(lifetime.total_seconds() / 100, 1.0), 3600.0)


class TLSRenewer(threading.Thread):
    """Runs :func:`ensure_tls_certificate` every :func:`check_interval` until stopped.

    It runs beside the server in the ``ca serve`` process (a daemon thread: it never holds the
    process up). The time comes from ``now`` (the caller passes the clock); a failed attempt
    (the database away, no valid issuer) is logged and tried again at the next check, while the
    current certificate is still served.
    """

    def __init__(self, ca_dir: CADir, open_service: Callable[[], CAService], names: RequestedNames,
                 now: Callable[[], dt.datetime], lifetime: dt.timedelta = TLS_VALIDITY) -> None:
        super().__init__(name="tls-renewer", daemon=True)
        self.ca_dir, self.names, self.now, self.lifetime = ca_dir, names, now, lifetime
        self._open_service = open_service
        self._stop = threading.Event()

    def run(self) -> None:
        files = TLSFiles.of(self.ca_dir)
        service: CAService | None = None
        try:
            while not self._stop.wait(check_interval(self.lifetime)):
                now = self.now()
                current = current_certificate(files)
                if current is not None and files.key.exists() and not renewal_due(current, self.names, now):
                    continue
                try:
                    service = service or self._open_service()
                    _, cert = ensure_tls_certificate(self.ca_dir, service, self.names, now, self.lifetime)
                except Exception as exc:
                    log.warning("renewing the server's TLS certificate failed (will retry): %s", exc)
                    continue
                if cert is not None:
                    log.info("server TLS certificate renewed: serial %s, valid until %s",
                                serial_hex(cert.serial_number), cert.not_valid_after_utc.isoformat())
        finally:
            if service is not None:
                service.engine.dispose()

    def stop(self) -> None:
        self._stop.set()
