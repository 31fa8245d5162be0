"""The deployer plugin interface: how a certificate reaches one kind of consumer.

A *deployer* knows one kind of consumer (plain files, nginx, haproxy, a command such as IIS's
``appcmd renew binding``). The rebind engine drives every kind the same way::

    deployer = get_deployer(binding.kind)()
    options = deployer.parse_options({"fullchain": "/etc/ssl/web.pem", ...})  # at `binding add`
    backup = deployer.deploy(options, material)          # files written atomically
    try:
        output = deployer.reload(options, material, old_thumbprint=old)   # consumer picks it up
    except DeployFailed:
        deployer.restore(options, backup)                # previous files back, exactly

Deployers do I/O only at these edges and keep no state between calls: everything a binding needs
is in its options (parsed once, stored as JSON with the binding) and in the :class:`Backup` that
``deploy`` returns. A backup holds private keys in memory and is never written anywhere.

**Adding a kind.** Deployers are found through the ``certpulse.deployers`` entry-point group, so a
third party adds a kind from its own package, without touching certpulse: subclass
:class:`Deployer`, set ``kind``, and declare it in that package's ``pyproject.toml``::

    [project.entry-points."certpulse.deployers"]
    tomcat = "certpulse_tomcat:TomcatDeployer"

Once that package is installed beside certpulse, ``certpulse binding add --kind tomcat`` works. The
entry point's name must equal the class's ``kind``.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import stat
from abc import ABC, abstractmethod
from collections.abc import Mapping
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, ClassVar

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.serialization import pkcs12

from certpulse.errors import Reason, Refusal
from certpulse.pki.certs import thumbprint as thumbprint_of
from certpulse.pki.keys import PrivateKey, key_matches, load_private_key_pem

ENTRY_POINT_GROUP = "certpulse.deployers"

log = logging.getLogger(__name__)


class DeployFailed(Exception):
    """Deploying or reloading did not work; ``output`` is what the consumer said (nginx -t's
    complaint, haproxy's answer, a command's output), kept for the operator."""

    def __init__(self, message: str, output: str = "") -> None:
        super().__init__(message)
        self.output = output


# -- what is deployed -----------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True, repr=False)
class Material:
    """One certificate version in every shape a consumer may want. ``repr`` leaves the key out."""

    thumbprint: str  # SHA-1, upper-case hex
    cert_pem: bytes
    chain_pem: bytes  # the issuers, leaf's issuer first; may be empty
    key_pem: bytes

    def __repr__(self) -> str:
        return f"Material(thumbprint={self.thumbprint!r})"

    @classmethod
    def from_folder(cls, folder: Path, thumbprint: str) -> Material:
        """Read a version folder of the agent's store (``cert.pem``, ``chain.pem``, ``key.pem``).

        Refuses a folder whose certificate is not ``thumbprint`` or whose key does not match it:
        deploying such a pair would only make the consumer fail later, with a worse message."""
        try:
            cert_pem = (folder / "cert.pem").read_bytes()
            chain_path = folder / "chain.pem"
            chain_pem = chain_path.read_bytes() if chain_path.exists() else b""
            key_path = folder / "key.pem"
            if not key_path.exists():
                raise Refusal(Reason.STORE, f"certificate {thumbprint} has no private key in the store: "
                                            "only certificates enrolled with their key can be deployed")
            key_pem = key_path.read_bytes()
        except OSError as exc:
            raise Refusal(Reason.STORE, f"cannot read {folder}: {exc.strerror or exc}") from None
        material = cls(thumbprint.upper(), cert_pem, chain_pem, key_pem)
        actual = thumbprint_of(material.certificate())
        if actual != material.thumbprint:
            raise Refusal(Reason.STORE, f"{folder}/cert.pem is certificate {actual}, not {thumbprint}")
        if not key_matches(material.private_key(), material.certificate().public_key()):
            raise Refusal(Reason.STORE, f"{folder}/key.pem does not belong to certificate {thumbprint}")
        return material

    def certificate(self) -> x509.Certificate:
        return x509.load_pem_x509_certificate(self.cert_pem)

    def chain(self) -> list[x509.Certificate]:
        return x509.load_pem_x509_certificates(self.chain_pem) if self.chain_pem.strip() else []

    def private_key(self) -> PrivateKey:
        return load_private_key_pem(self.key_pem)

    @property
    def fullchain_pem(self) -> bytes:
        """Leaf then issuers: what nginx's ``ssl_certificate`` and most servers want."""
        return _joined(self.cert_pem, self.chain_pem)

    @property
    def combined_pem(self) -> bytes:
        """Leaf, issuers, then the key in one file: haproxy's ``crt`` shape."""
        return _joined(self.cert_pem, self.chain_pem, self.key_pem)

    def pkcs12(self, password: bytes | None) -> bytes:
        """PKCS#12 with key, leaf and chain. Without a password the file is **not encrypted**
        (only its file mode protects the key), as Java and .NET accept; with one, the strongest
        encryption cryptography offers (AES-256, PBKDF2)."""
        encryption: serialization.KeySerializationEncryption = (
            serialization.BestAvailableEncryption(password) if password else serialization.NoEncryption())
        return pkcs12.serialize_key_and_certificates(
            None, self.private_key(), self.certificate(), self.chain() or None, encryption)


def _joined(*parts: bytes) -> bytes:
    """PEM blocks one after another, each ending with a newline, no blank lines in between."""
    return b"".join(part.strip() + b"\n" for part in parts if part.strip())


# -- what was there before ------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True, repr=False)
class FileSnapshot:
    """One path before a deploy: its bytes and stat, or ``content is None`` when it did not exist."""

    path: str
    content: bytes | None
    uid: int = -1
    gid: int = -1
    mode: int = 0
    atime_ns: int = 0
    mtime_ns: int = 0

    def __repr__(self) -> str:
        if self.content is None:
            return f"FileSnapshot({self.path!r}, absent)"
        return f"FileSnapshot({self.path!r}, {len(self.content)} bytes, {self.uid}:{self.gid} {self.mode:o})"

    @classmethod
    def take(cls, path: str) -> FileSnapshot:
        """What ``path`` holds now. A symbolic link is refused: writing through a link as root
        is how an attacker who owns the link's folder redirects a key into a file of their choice."""
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return cls(path, None)
        if not stat.S_ISREG(st.st_mode):
            raise DeployFailed(f"{path} exists and is not a regular file (a link or a folder): not overwritten")
        with open(path, "rb", opener=_open_nofollow) as stream:
            content = stream.read()
        return cls(path, content, st.st_uid, st.st_gid, st.st_mode & 0o7777, st.st_atime_ns, st.st_mtime_ns)


def _open_nofollow(path: str, flags: int) -> int:
    return os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC)


@dataclasses.dataclass(frozen=True)
class Backup:
    """What :meth:`Deployer.deploy` replaced, for :meth:`Deployer.restore`: every path it wrote
    (in the order written) and whatever else the kind needs (``state``, JSON-like)."""

    files: tuple[FileSnapshot, ...] = ()
    state: Mapping[str, Any] = dataclasses.field(default_factory=dict)


# -- the interface --------------------------------------------------------------------------------

class Deployer(ABC):
    """One kind of consumer. Subclasses are stateless; construct with no arguments."""

    kind: ClassVar[str]
    summary: ClassVar[str] = ""  # one line for listings

    @abstractmethod
    def parse_options(self, raw: Mapping[str, str]) -> dict[str, Any]:
        """Validate the ``--opt KEY=VALUE`` pairs of ``binding add``; the JSON-serialisable options
        stored with the binding (and given back to the other methods). Raises
        ``Refusal(Reason.INVALID_ARGUMENT, ...)`` naming the first unknown or malformed option."""

    @abstractmethod
    def deploy(self, options: Mapping[str, Any], material: Material) -> Backup:
        """Write every file atomically (temporary file in the same folder, fsync, rename). If one
        write fails, the files already written are put back before :class:`DeployFailed` is
        raised, so a failed deploy leaves nothing to restore."""

    @abstractmethod
    def reload(self, options: Mapping[str, Any], material: Material, *, old_thumbprint: str | None = None) -> str:
        """Make the consumer use the deployed files; its output. Raises :class:`DeployFailed` (with
        the consumer's output) when it refused them: the consumer must then still be serving what
        it served before, so that :meth:`restore` is a complete rollback."""

    @abstractmethod
    def restore(self, options: Mapping[str, Any], backup: Backup) -> None:
        """Put back exactly what :meth:`deploy` replaced (bytes, owner, group, mode, times), and
        remove the files that did not exist before."""


# -- discovery ------------------------------------------------------------------------------------

@functools.cache
def _discover() -> tuple[dict[str, type[Deployer]], dict[str, str]]:
    found: dict[str, type[Deployer]] = {}
    broken: dict[str, str] = {}
    for point in entry_points(group=ENTRY_POINT_GROUP):
        try:
            loaded = point.load()
        except Exception as exc:  # a broken plugin must not take the built-in kinds down with it
            broken[point.name] = f"{point.value} does not load: {exc}"
            log.warning("deployer %s: %s", point.name, broken[point.name])
            continue
        if not (isinstance(loaded, type) and issubclass(loaded, Deployer)):
            broken[point.name] = f"{point.value} is not a Deployer subclass"
        elif getattr(loaded, "kind", None) != point.name:
            broken[point.name] = f"{point.value} has kind {getattr(loaded, 'kind', None)!r}, not {point.name!r}"
        elif point.name in found and found[point.name] is not loaded:
            broken[point.name] = f"two packages declare kind {point.name!r}"
        else:
            found[point.name] = loaded
            continue
        log.warning("deployer %s: %s", point.name, broken[point.name])
    for name in broken:
        found.pop(name, None)
    return found, broken


def load_deployers() -> dict[str, type[Deployer]]:
    """Every usable deployer kind installed, built-in or from a plugin package (read once)."""
    return dict(_discover()[0])


def get_deployer(kind: str) -> type[Deployer]:
    """The deployer class for ``kind``, or a refusal naming the kinds there are."""
    found, broken = _discover()
    if kind in found:
        return found[kind]
    if kind in broken:
        raise Refusal(Reason.INVALID_ARGUMENT, f"deployer kind {kind!r} is installed but unusable: {broken[kind]}")
    known = ", ".join(sorted(found)) or "none"
    raise Refusal(Reason.INVALID_ARGUMENT, f"unknown deployer kind {kind!r} (known: {known})")


__all__ = ["ENTRY_POINT_GROUP", "Backup", "DeployFailed", "Deployer", "FileSnapshot", "Material", "get_deployer",
           "load_deployers"]
