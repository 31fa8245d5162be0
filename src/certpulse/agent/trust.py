"""The agent's pinned trust: the CA roots it was told to trust at ``agent init``, and nothing else.

The pin set is a PEM file in the agent folder (``trust/roots.pem``), named in ``agent.toml`` for
each policy server. It is the only trust the agent has:

* every TLS connection to a policy server is verified against these roots alone (never the
  system store, never what a server sends);
* roots in a policy are accepted only when pinned, or when a cross-certificate in the same policy
  (the new root's subject and public key, signed by a pinned root, valid now) vouches for them;
  such a root is then added to the pin set (a root rollover);
* issuers, KRA certificates and every certificate the agent installs must chain to a pinned root.

A pin is taken at ``agent init`` from ``--ca-file`` or from ``--ca-fingerprint``: the SHA-256 of
the root certificate's DER, compared with the roots the server serves at ``/v1/roots``.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import os
import ssl
from collections.abc import Iterable, Sequence
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization

from certpulse.errors import Reason, Refusal
from certpulse.pki.fingerprint import ca_fingerprint

TRUST_DIR = "trust"
ROOTS_NAME = "trust/roots.pem"


def is_ca(cert: x509.Certificate) -> bool:
    try:
        return bool(cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
    except x509.ExtensionNotFound:
        return False


# Signature checks already made in this process: (SHA-256 of the certificate, SHA-256 of the
# issuer) -> whether the issuer signed it. The answer depends on those bytes alone, so it never
# goes stale; validity dates and CA flags are checked at every call. A pulse over a store of
# 10,000 certificates would otherwise verify 20,000 ECDSA signatures (about a second), the same
# ones at every pulse of the daemon. Bounded: emptied when full.
_SIGNED: dict[tuple[bytes, bytes], bool] = {}
_SIGNED_MAX = 200_000


def signed_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    if cert.issuer != issuer.subject:
        return False
    key = (cert.fingerprint(hashes.SHA256()), issuer.fingerprint(hashes.SHA256()))
    signed = _SIGNED.get(key)
    if signed is None:
        try:
            cert.verify_directly_issued_by(issuer)
            signed = True
        except (InvalidSignature, ValueError, TypeError):
            # What verification raises for a certificate this issuer did not sign (a bad signature,
            # another key type, a signature algorithm that does not fit). Anything else is a fault
            # of ours: it propagates, and is never remembered as "not signed".
            signed = False
        if len(_SIGNED) >= _SIGNED_MAX:
            _SIGNED.clear()
        _SIGNED[key] = signed
    return signed


def valid_at(cert: x509.Certificate, now: dt.datetime) -> bool:
    return cert.not_valid_before_utc <= now <= cert.not_valid_after_utc


def is_root(cert: x509.Certificate) -> bool:
    return is_ca(cert) and signed_by(cert, cert)


def _spki(cert: x509.Certificate) -> bytes:
    return cert.public_key().public_bytes(serialization.Encoding.DER,
                                          serialization.PublicFormat.SubjectPublicKeyInfo)


def pem_bundle(certs: Iterable[x509.Certificate]) -> str:
    return "".join(c.public_bytes(serialization.Encoding.PEM).decode() for c in certs)


def parse_pems(text: str | bytes, what: str) -> list[x509.Certificate]:
    data = text.encode() if isinstance(text, str) else text
    try:
        return list(x509.load_pem_x509_certificates(data))
    except ValueError:
        raise Refusal(Reason.INVALID_ARGUMENT, f"{what} holds no readable PEM certificate") from None


def select_pinned(served: Sequence[x509.Certificate], wanted: str) -> x509.Certificate:
    """The one served root whose fingerprint is ``wanted``; a clear refusal when there is none."""
    for cert in served:
        if ca_fingerprint(cert) == wanted and is_root(cert):
            return cert
    seen = ", ".join(ca_fingerprint(c)[:16] + "…" for c in served) or "none"
    raise Refusal(Reason.FORBIDDEN,
                  f"the server serves no root with fingerprint {wanted} (it served: {seen}); "
                  "it may not be your CA, or someone is in the middle. Nothing was written")


def roots_from_file(path: Path) -> list[x509.Certificate]:
    """The CA certificates of a ``--ca-file`` (at least one)."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise Refusal(Reason.INVALID_ARGUMENT, f"cannot read {path}: {exc.strerror}") from None
    roots = [c for c in parse_pems(data, str(path)) if is_ca(c)]
    if not roots:
        raise Refusal(Reason.INVALID_ARGUMENT, f"{path} holds no CA certificate to pin")
    return roots


def ssl_context(roots: Sequence[x509.Certificate]) -> ssl.SSLContext:
    """A client context that trusts exactly ``roots``: no system store (``cadata`` alone)."""
    if not roots:
        raise Refusal(Reason.INVALID_ARGUMENT, "no pinned root to verify the server with")
    return ssl.create_default_context(cadata=pem_bundle(roots))


@dataclasses.dataclass(frozen=True)
class PinFile:
    """The pinned roots of one policy server, in the agent folder."""

    directory: Path
    name: str = ROOTS_NAME

    @property
    def path(self) -> Path:
        return self.directory / self.name

    def load(self) -> list[x509.Certificate]:
        try:
            data = self.path.read_bytes()
        except OSError as exc:
            raise Refusal(Reason.INVALID_ARGUMENT,
                          f"cannot read the pinned CA roots {self.path}: {exc.strerror}") from None
        return parse_pems(data, str(self.path))

    def save(self, roots: Sequence[x509.Certificate]) -> None:
        """Written whole to a temporary file, then renamed: never half a pin set. The folder is
        0700 (only the agent), the file 0644 (roots are public)."""
        folder = self.path.parent
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(folder, 0o700)
        temporary = folder / f".{self.path.name}.new"
        temporary.write_text(pem_bundle(roots))
        os.chmod(temporary, 0o644)
        os.replace(temporary, self.path)


@dataclasses.dataclass(frozen=True)
class PolicyTrust:
    """What a policy's roots mean under the pins: the roots to trust, the new pins a cross-signature
    earned (to persist), and why the policy is not trusted at all (None when it is)."""

    roots: tuple[x509.Certificate, ...]
    added: tuple[x509.Certificate, ...]
    distrust: str | None


def judge_roots(pins: Sequence[x509.Certificate], policy_roots: Sequence[x509.Certificate],
                cross: Sequence[x509.Certificate], now: dt.datetime) -> PolicyTrust:
    """Accept each policy root that is pinned or cross-signed by an accepted root (repeatedly, so a
    chain of rollovers works); any other root makes the whole policy untrusted."""
    accepted = [p for p in pins if valid_at(p, now)]
    known = {ca_fingerprint(p) for p in pins}
    added: list[x509.Certificate] = []
    waiting = [r for r in policy_roots if ca_fingerprint(r) not in known]
    progress = True
    while waiting and progress:
        progress = False
        for root in list(waiting):
            if _vouched(root, accepted, cross, now):
                accepted.append(root)
                added.append(root)
                waiting.remove(root)
                progress = True
    if waiting:
        names = "; ".join(f"{r.subject.rfc4514_string()[:80]!r} (SHA-256 {ca_fingerprint(r)[:16]}…)" for r in waiting)
        return PolicyTrust(tuple(p for p in pins if valid_at(p, now)), (),
                           f"the policy carries a root that is neither pinned nor cross-signed by a pinned root: "
                           f"{names}; its issuers and KRA are not trusted")
    return PolicyTrust(tuple(accepted), tuple(added), None)


def _vouched(root: x509.Certificate, accepted: Sequence[x509.Certificate], cross: Sequence[x509.Certificate],
             now: dt.datetime) -> bool:
    """``root`` is a valid self-signed CA and one cross-certificate for exactly its subject and key
    is signed by an accepted root and valid now."""
    if not (is_root(root) and valid_at(root, now)):
        return False
    key = _spki(root)
    for item in cross:
        if item.subject != root.subject or _spki(item) != key:
            continue
        if not (is_ca(item) and valid_at(item, now)):
            continue
        if any(signed_by(item, pin) for pin in accepted):
            return True
    return False
