"""The CA's own certificates as relying parties fetch them: what an AIA caIssuers URL
(``/ca/{authority}.der``, :mod:`certpulse.ca.publishing`) answers.

A TLS client that was sent a leaf without its chain follows the leaf's caIssuers URL to the
issuing CA's certificate, then that certificate's to the root's. So every authority that signs
certificates is published, enabled or disabled (a disabled issuer's certificates are still out
there and still need their chain), and the cross-certificates of a root rollover too; the key
recovery agent is not (it signs nothing). The answers come from the process's snapshot
(:class:`~certpulse.ca.state.SnapshotCache`), checked against the database's generation at most
once per :data:`RECHECK_SECONDS`: a request costs no database read while the index is fresh, and
a name nobody has (a scanner's guess) costs none either.
"""

from __future__ import annotations

import dataclasses
import hashlib
import threading
from collections.abc import Mapping

from sqlalchemy import Engine

from certpulse.ca.state import Snapshot, SnapshotCache
from certpulse.pki.certs import der
from certpulse.sql.db import read

PUBLISHED_ROLES = frozenset({"root", "issuer", "cross"})
RECHECK_SECONDS = 1.0  # a new or re-keyed authority is served this long after it is made, at most


@dataclasses.dataclass(frozen=True, slots=True)
class PublishedCertificate:
    name: str
    der: bytes
    etag: str  # a strong entity tag (quoted): a certificate never changes under its name's bytes


@dataclasses.dataclass(frozen=True)
class _Index:
    generation: int
    checked_at: float  # monotonic seconds
    by_name: Mapping[str, PublishedCertificate]


def published(snapshot: Snapshot) -> dict[str, PublishedCertificate]:
    """The certificates of ``snapshot``'s authorities that relying parties may fetch, by name."""
    index: dict[str, PublishedCertificate] = {}
    for authority in snapshot.authorities:
        if authority.role in PUBLISHED_ROLES:
            data = der(authority.certificate)
            index[authority.name] = PublishedCertificate(
                authority.name, data, '"' + hashlib.sha256(data).hexdigest()[:32] + '"')
    return index


class CACertificates:
    """The published CA certificates of this process, kept with the snapshot."""

    def __init__(self, engine: Engine, state: SnapshotCache) -> None:
        self._engine = engine
        self._state = state
        self._index: _Index | None = None
        self._lock = threading.Lock()

    def fresh(self, monotonic: float) -> Mapping[str, PublishedCertificate] | None:
        """The certificates by name when the generation was checked within the last
        :data:`RECHECK_SECONDS`; None when a check is due (then :meth:`refresh`, which blocks)."""
        index = self._index
        if index is None or monotonic - index.checked_at >= RECHECK_SECONDS:
            return None
        return index.by_name

    def refresh(self, monotonic: float) -> Mapping[str, PublishedCertificate]:
        """Check the generation (one read; the snapshot reloads when it moved) and return the
        certificates of that snapshot. Blocking: call it off the event loop."""
        with read(self._engine) as conn:
            snapshot = self._state.get(conn)
        with self._lock:
            index = self._index
            if index is None or index.generation != snapshot.generation:
                index = _Index(snapshot.generation, monotonic, published(snapshot))
            else:
                index = dataclasses.replace(index, checked_at=monotonic)
            self._index = index
        return index.by_name

    def certificate(self, name: str, monotonic: float) -> PublishedCertificate | None:
        """One authority's certificate (None: no such published authority). Blocking when a check is due."""
        by_name = self.fresh(monotonic)
        if by_name is None:
            by_name = self.refresh(monotonic)
        return by_name.get(name)
