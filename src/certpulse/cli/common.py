"""Options and helpers shared by the server-side commands."""

from __future__ import annotations

import getpass
from pathlib import Path
from typing import Annotated

import typer

from certpulse.ca.config import SYSTEM_CA_DIR, CADir, resolve_ca_dir
from certpulse.ca.model import Caller
from certpulse.ca.service import CAService
from certpulse.ca.setup import open_service
from certpulse.errors import Reason, Refusal
from certpulse.pki.fingerprint import ca_fingerprint

DirOption = Annotated[
    Path | None,
    typer.Option(
        "--dir",
        envvar="CERTPULSE_CA_DIR",
        help=f"CA folder (default: $CERTPULSE_CA_DIR, then {SYSTEM_CA_DIR})",
        show_default=False,
    ),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table")]


def ca_dir(given: Path | None) -> CADir:
    return CADir(resolve_ca_dir(given))


def root_fingerprint(target: CADir) -> str:
    """The fingerprint agents pin (``agent init --ca-fingerprint``): of the root in ``certs/root.pem``."""
    from cryptography import x509

    try:
        root = x509.load_pem_x509_certificate((target.certs / "root.pem").read_bytes())
    except (OSError, ValueError) as exc:
        raise Refusal(Reason.STORE, f"cannot read the root certificate in {target.certs}: {exc}") from None
    return ca_fingerprint(root)


def service(given: Path | None) -> CAService:
    return open_service(ca_dir(given), pool_size=2)


def operator() -> Caller:
    """The person at the CA's own console: a CA manager, audited under their login name."""
    try:
        name = getpass.getuser()
    except (KeyError, OSError):
        name = "unknown"
    return Caller(kind="operator", name=name)
