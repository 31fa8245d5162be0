"""The CA fingerprint an agent pins: SHA-256 over the root certificate's DER, lower-case hex.

The CA prints it (``ca init``, ``principal add``, ``principal token``, ``ca status``) and an
agent is given it at ``agent init --ca-fingerprint``; both sides compute it here, so the value
an operator copies from one screen is exactly the value the other side compares against. Like
``step ca bootstrap --fingerprint``, it names the root alone: whoever holds a root with that
fingerprint is the CA, whatever answers at the URL.
"""

from __future__ import annotations

import re

from cryptography import x509
from cryptography.hazmat.primitives import hashes

from certpulse.errors import Reason, Refusal

_HEX64 = re.compile(r"[0-9a-f]{64}")


def ca_fingerprint(root: x509.Certificate) -> str:
    """SHA-256 of the certificate's DER: 64 lower-case hex digits, no separators."""
    return root.fingerprint(hashes.SHA256()).hex()


def parse_fingerprint(text: str) -> str:
    """A fingerprint however a person typed or pasted it (upper or lower case, with the colons or
    spaces some tools put between the bytes, an optional ``sha256:`` prefix), in the form
    :func:`ca_fingerprint` writes; anything that is not a whole SHA-256 is refused."""
    cleaned = text.strip().lower()
    cleaned = cleaned.removeprefix("sha256:").replace(":", "").replace(" ", "")
    if not _HEX64.fullmatch(cleaned):
        raise Refusal(Reason.INVALID_ARGUMENT,
                      f"{text!r} is not a SHA-256 fingerprint (64 hex digits, colons allowed)")
    return cleaned
