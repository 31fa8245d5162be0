"""Checking the files of the machine's certificates at every pulse, and repairing what can be.

A live certificate is only as good as its files: a ``cert.pem`` that is missing or garbled, a
``key.pem`` that cannot be read, a ``live/<template>`` link that names nothing, or a request
whose key is gone would otherwise surface as an exception somewhere in the pulse (ending it, and
the daemon with it) or not at all (the certificate expires unnoticed). :func:`check` looks at
each of them before the pulse plans anything and sorts what it finds into:

* :class:`Repair` — fixed here, and said so: ``cert.pem`` rewritten from the copy in
  ``fullchain.pem`` (or ``fullchain.pem`` from ``cert.pem`` and ``chain.pem``) when that copy is
  the very certificate the record names; a dangling live link pointed again at the template's
  current version (:mod:`certpulse.machine.current`'s rule) or removed when there is none; a
  request whose key is gone dropped (it can never be completed: the next pulse makes a new one).
* :class:`LocalFault` — cannot be fixed without the operator (the key of a certificate, or the
  certificate with no intact copy left): named in plain words with the next command to run, and
  the certificate is left out of planning so every other template still renews.

Only version folders are rewritten here, one file at a time through a temporary file and a
rename, so a kill never leaves half a file behind.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import secrets
from pathlib import Path

from cryptography import x509

from certpulse.machine import current as current_rule
from certpulse.machine.certstore import CertRecord, LocalStore, write_file
from certpulse.pki.certs import pem, thumbprint
from certpulse.pki.keys import key_matches, load_private_key_pem


@dataclasses.dataclass(frozen=True)
class Repair:
    """Something found broken and fixed during this pulse."""

    detail: str
    template: str | None = None
    thumbprint: str | None = None


@dataclasses.dataclass(frozen=True)
class LocalFault:
    """Something broken on this machine that the agent cannot fix. ``key`` is what it is
    counted under in the failing state (a thumbprint, or ``template:NAME``), ``cause`` a short
    stable slug (the metric's label), ``detail`` the sentence an operator reads."""

    key: str
    cause: str
    detail: str
    template: str | None = None
    thumbprint: str | None = None


@dataclasses.dataclass
class Findings:
    repairs: list[Repair] = dataclasses.field(default_factory=list)
    faults: list[LocalFault] = dataclasses.field(default_factory=list)

    @property
    def broken(self) -> frozenset[str]:
        """Thumbprints of certificates whose files are unusable (left out of planning)."""
        return frozenset(f.thumbprint for f in self.faults if f.thumbprint)


def os_reason(exc: BaseException) -> str:
    """An error as a few plain words: ``No such file or directory`` rather than ``[Errno 2] ...``."""
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    text = str(exc).strip()
    return text or type(exc).__name__


def _what(record: CertRecord) -> str:
    return f"the machine certificate {record.thumbprint}" + (
        f" (template {record.template_name})" if record.template_name else "")


def _read_cert(path: Path, wanted: str) -> x509.Certificate | None:
    """The certificate in ``path`` when it is the one named ``wanted`` (None otherwise)."""
    try:
        cert = x509.load_pem_x509_certificate(path.read_bytes())
    except (OSError, ValueError):
        return None
    return cert if thumbprint(cert) == wanted else None


def _why_unreadable(path: Path) -> str:
    try:
        data = path.read_bytes()
    except OSError as exc:
        return os_reason(exc)
    try:
        x509.load_pem_x509_certificate(data)
    except ValueError:
        return "not a PEM certificate"
    return "it holds another certificate"


def _rewrite(path: Path, data: bytes, mode: int) -> None:
    """Replace ``path`` whole: a temporary file beside it, synced, renamed over it (one left by
    a repair that was killed is removed first)."""
    for stale in path.parent.glob(f".{path.name}.*"):
        stale.unlink(missing_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}")
    try:
        write_file(tmp, data, mode)
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)
        raise


def _check_files(store: LocalStore, record: CertRecord, found: Findings) -> bool:
    """Repair the certificate files of ``record``; False when no intact copy is left."""
    folder = store.folder(record.thumbprint)
    cert_path, full_path, chain_path = folder / "cert.pem", folder / "fullchain.pem", folder / "chain.pem"
    cert = _read_cert(cert_path, record.thumbprint)
    if cert is None:
        why = _why_unreadable(cert_path)
        try:
            copies = x509.load_pem_x509_certificates(full_path.read_bytes())
        except (OSError, ValueError):
            copies = []
        cert = copies[0] if copies and thumbprint(copies[0]) == record.thumbprint else None
        if cert is None:
            found.faults.append(LocalFault(
                key=record.thumbprint, cause="certificate-unreadable", template=record.template_name,
                thumbprint=record.thumbprint,
                detail=f"{_what(record)} cannot be read from {cert_path}: {why}, and fullchain.pem holds no intact "
                       f"copy; run `certpulse cert show {record.thumbprint}` (and `certpulse cert delete "
                       f"{record.thumbprint}` to have the next pulse enroll anew)"))
            return False
        _rewrite(cert_path, pem(cert).encode(), 0o644)
        found.repairs.append(Repair(f"rewrote cert.pem of {_what(record)} from its fullchain.pem ({why})",
                                    record.template_name, record.thumbprint))
    full = None
    with contextlib.suppress(OSError, ValueError):
        full = x509.load_pem_x509_certificates(full_path.read_bytes())
    if not full or thumbprint(full[0]) != record.thumbprint:
        try:
            chain = chain_path.read_bytes() if chain_path.exists() else b""
            x509.load_pem_x509_certificates(chain) if chain.strip() else None
        except (OSError, ValueError):
            return True  # the chain is garbled too: the certificate itself is intact, nothing to rebuild from
        _rewrite(full_path, pem(cert).encode() + chain, 0o644)
        found.repairs.append(Repair(f"rewrote fullchain.pem of {_what(record)} from cert.pem and chain.pem",
                                    record.template_name, record.thumbprint))
    return True


def _check_key(store: LocalStore, record: CertRecord, found: Findings) -> None:
    """A current certificate's key must load and belong to it; nothing can repair it."""
    path = store.folder(record.thumbprint) / "key.pem"
    try:
        key = load_private_key_pem(path.read_bytes())
        cert = store.certificate(record.thumbprint)
        why = None if key_matches(key, cert.public_key()) else "it does not belong to the certificate"
    except OSError as exc:
        why = os_reason(exc)
    except (ValueError, TypeError):
        why = "not a readable private key"
    if why is not None:
        found.faults.append(LocalFault(
            key=record.thumbprint, cause="key-unreadable", template=record.template_name,
            thumbprint=record.thumbprint,
            detail=f"the key of {_what(record)} cannot be read from {path}: {why}; run `certpulse cert show "
                   f"{record.thumbprint}` (and `certpulse cert delete {record.thumbprint}` to have the next "
                   f"pulse enroll anew)"))


def _check_links(store: LocalStore, records: list[CertRecord], found: Findings) -> None:
    """A live link that names no version folder: pointed at the current version, or removed."""
    current = current_rule.current_by_template(records)
    for link in sorted(store.live_dir.iterdir()):
        if link.name.startswith(".") or not link.is_symlink() or link.exists():
            continue
        record = current.get(link.name)
        target = os.readlink(link)
        if record is not None and Path(target).name != record.thumbprint:
            store.point_live(link.name, record.thumbprint)
            found.repairs.append(Repair(f"the live link of template {link.name} named {target}, which is gone; "
                                        f"it names {record.thumbprint} again", link.name, record.thumbprint))
        elif record is None:
            link.unlink(missing_ok=True)
            found.repairs.append(Repair(f"removed the live link of template {link.name}: it named {target}, which "
                                        "is gone, and the template has no certificate left", link.name))


def _check_flights(store: LocalStore, found: Findings) -> None:
    """A request whose key is gone can never be installed: dropped, so the next plan asks anew."""
    for flight in store.flights():
        path = store.flights_dir / flight.id / "key.pem"
        try:
            load_private_key_pem(path.read_bytes())
        except OSError as exc:
            why = os_reason(exc)
        except (ValueError, TypeError):
            why = "not a readable private key"
        else:
            continue
        store.drop_flight(flight.id)
        request = f"request {flight.request_id}" if flight.request_id is not None else "an unanswered request"
        found.repairs.append(Repair(f"dropped {request} for template {flight.template_name}: its key {path} "
                                    f"cannot be read ({why}); a new request follows", flight.template_name))


def check(store: LocalStore) -> Findings:
    """Check (and repair what can be) every unarchived certificate, the live links and the
    requests in flight. Database errors are not caught: they are the pulse's to report."""
    found = Findings()
    records = store.certificates(include_archived=False)
    intact: list[CertRecord] = []
    for record in records:
        try:
            if _check_files(store, record, found):
                intact.append(record)
        except OSError as exc:  # a repair that could not be written (a full disk, a read-only folder)
            found.faults.append(LocalFault(
                key=record.thumbprint, cause="certificate-unrepairable", template=record.template_name,
                thumbprint=record.thumbprint,
                detail=f"the files of {_what(record)} are damaged and cannot be rewritten: {os_reason(exc)}; "
                       f"free space or fix the permissions of {store.folder(record.thumbprint)}"))
    for record in current_rule.current_by_template(intact).values():
        _check_key(store, record, found)
    _check_links(store, records, found)
    _check_flights(store, found)
    return found
