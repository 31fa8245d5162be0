"""A per-process snapshot of the slow-changing CA state: authorities, their keys, templates.

Parsing keys and templates on every request is the kind of cost that shows at hundreds of
requests a second, so a process keeps a snapshot and reloads it only when the database's
``generation`` counter (bumped by every administrative change) moves.
"""

from __future__ import annotations

import dataclasses
import json
import threading
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import rsa
from sqlalchemy import Connection, Integer, Text, select, update

from certpulse.ca.model import Authority, Signer
from certpulse.ca.storage import schema as t
from certpulse.ca.templates import Template, parse_template
from certpulse.errors import Reason, Refusal
from certpulse.pki.certs import pem
from certpulse.pki.keys import PrivateKey, load_private_key_pem

GENERATION = "generation"


@dataclasses.dataclass(frozen=True)
class Snapshot:
    generation: int
    authorities: tuple[Authority, ...]
    templates: dict[str, Template]
    # PEM chains by issuer id, made on first use: every issuance answers with its issuer's chain
    _chains: dict[int, tuple[str, ...]] = dataclasses.field(default_factory=dict, compare=False, repr=False)

    def authority(self, authority_id: int) -> Authority:
        for authority in self.authorities:
            if authority.id == authority_id:
                return authority
        raise Refusal(Reason.STORE, f"authority {authority_id} is missing")

    def chain(self, issuer_id: int) -> tuple[str, ...]:
        """The issuer's certificate and its parents up to the root, as PEM. Kept with the
        snapshot, so that an administrative change (a new generation) never serves a stale one."""
        chain = self._chains.get(issuer_id)
        if chain is None:
            links: list[str] = []
            authority = self.authority(issuer_id)
            while True:
                links.append(pem(authority.certificate))
                if authority.parent_id is None:
                    break
                authority = self.authority(authority.parent_id)
            chain = self._chains[issuer_id] = tuple(links)
        return chain

    def by_role(self, role: str) -> list[Authority]:
        return [a for a in self.authorities if a.role == role]

    def kra(self) -> Authority | None:
        kras = [a for a in self.authorities if a.role == "kra" and a.enabled]
        return kras[0] if kras else None


def bump_generation(conn: Connection) -> None:
    result = conn.execute(
        update(t.settings)
        .where(t.settings.c.name == GENERATION)
        .values(value=(t.settings.c.value.cast(Integer) + 1).cast(Text))
    )
    if result.rowcount == 0:
        conn.execute(t.settings.insert().values(name=GENERATION, value="1"))


_READ_GENERATION = select(t.settings.c.value).where(t.settings.c.name == GENERATION)  # built once: a hot path


def read_generation(conn: Connection) -> int:
    value = conn.execute(_READ_GENERATION).scalar()
    return int(value) if value is not None else 0


def load_snapshot(conn: Connection) -> Snapshot:
    generation = read_generation(conn)
    served: dict[int, set[str]] = {}
    for row in conn.execute(select(t.issuer_templates)):
        served.setdefault(row.authority_id, set()).add(row.template_name)
    authorities = tuple(
        Authority(
            id=row.id,
            name=row.name,
            role=row.role,
            certificate=x509.load_der_x509_certificate(row.certificate_der),
            key_file=row.key_file,
            cost=row.cost,
            renewal_only=row.renewal_only,
            enabled=row.enabled,
            templates=frozenset(served.get(row.id, set())),
            parent_id=row.parent_id,
        )
        for row in conn.execute(select(t.authorities).order_by(t.authorities.c.id))
    )
    templates = {
        row.name: parse_template(json.loads(row.document), default_oid=row.oid).with_versions(
            row.major_version, row.minor_version
        )
        for row in conn.execute(select(t.templates))
    }
    return Snapshot(generation, authorities, templates)


class SnapshotCache:
    """This process's snapshot, reloaded when an administrative change moved the generation."""

    def __init__(self) -> None:
        self._current: Snapshot | None = None
        self._lock = threading.Lock()

    @property
    def current(self) -> Snapshot | None:
        """The snapshot last loaded, unchecked: for work done before a transaction that then
        confirms the generation it rested on."""
        return self._current

    def get(self, conn: Connection) -> Snapshot:
        """The snapshot as of ``conn``'s transaction (one read of the generation when it is current)."""
        generation = read_generation(conn)
        current = self._current
        if current is None or current.generation != generation:
            with self._lock:
                current = load_snapshot(conn)
                self._current = current
        return current

    def at(self, conn: Connection, generation: int) -> Snapshot:
        """The snapshot of ``generation``, which ``conn``'s transaction has already read: the
        cached one without another query when it is that generation."""
        current = self._current
        if current is not None and current.generation == generation:
            return current
        return self.get(conn)


class KeyRing:
    """Private keys of the CA's authorities, read from disk once per process."""

    def __init__(self, keys_dir: Path) -> None:
        self._dir = keys_dir.resolve()
        self._keys: dict[str, PrivateKey] = {}
        self._lock = threading.Lock()

    @property
    def directory(self) -> Path:
        """Where the keys are (the CA's ``keys/``): the OCSP signers' keys are written there too."""
        return self._dir

    def key(self, authority: Authority) -> PrivateKey:
        if authority.key_file is None:
            raise Refusal(Reason.STORE, f"authority {authority.name!r} has no key on this server")
        return self.load(authority.key_file, authority.name)

    def load(self, key_file: str, label: str) -> PrivateKey:
        with self._lock:
            cached = self._keys.get(key_file)
            if cached is None:
                path = (self._dir / key_file).resolve()
                if path.parent != self._dir:
                    raise Refusal(Reason.STORE, f"key file of {label!r} is outside {self._dir}")
                try:
                    cached = load_private_key_pem(path.read_bytes())
                except OSError as exc:
                    raise Refusal(Reason.STORE, f"cannot read the key of {label!r}: {exc.strerror}") from None
                self._keys[key_file] = cached
            return cached

    def signer(self, authority: Authority) -> Signer:
        return Signer(authority, self.key(authority))

    def kra_key(self, authority: Authority | None) -> rsa.RSAPrivateKey | None:
        if authority is None:
            return None
        key = self.key(authority)
        return key if isinstance(key, rsa.RSAPrivateKey) else None
