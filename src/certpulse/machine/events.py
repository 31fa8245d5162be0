"""What a lifecycle event is: the seed's ids 1001-1007, our failure events from 1100, and the
certificate facts every event carries.

Pure data: nothing here touches the disk, the clock or the network. An :class:`EventDraft` is
what a component wants to say; :mod:`certpulse.machine.log` gives it a sequence number, a time,
a channel and the raising user when it is written, in the same transaction as the change.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import enum
from typing import Any

from cryptography import x509

from certpulse.pki import template_info
from certpulse.pki.certs import sha256_thumbprint, subject_names, thumbprint


class EventId(enum.IntEnum):
    REPLACE = 1001
    EXPIRED = 1002
    CLOSE_TO_EXPIRATION = 1003
    DELETED = 1004
    ARCHIVED = 1005
    NEW = 1006
    EXPORTED = 1007
    # Failures operators miss most (certpulse's own, numbered from 1100; see the README).
    RENEWAL_FAILED = 1100
    PENDING_DROPPED = 1101
    REQUEST_DENIED = 1102
    TASK_FAILED = 1103
    TASK_REFUSED = 1104
    NOT_DEPLOYED = 1105
    BINDING_DRIFT = 1106
    CLOCK_SKEW = 1107


# name, level: the seed's table, then ours.
DESCRIPTIONS: dict[EventId, tuple[str, str]] = {
    EventId.REPLACE: ("replace", "info"),
    EventId.EXPIRED: ("expired", "error"),
    EventId.CLOSE_TO_EXPIRATION: ("close-to-expiration", "warning"),
    EventId.DELETED: ("deleted", "info"),
    EventId.ARCHIVED: ("archived", "info"),
    EventId.NEW: ("new", "info"),
    EventId.EXPORTED: ("exported", "info"),
    EventId.RENEWAL_FAILED: ("renewal-failed", "error"),
    EventId.PENDING_DROPPED: ("pending-dropped", "warning"),
    EventId.REQUEST_DENIED: ("request-denied", "error"),
    EventId.TASK_FAILED: ("task-failed", "error"),
    EventId.TASK_REFUSED: ("task-refused", "error"),
    EventId.NOT_DEPLOYED: ("not-deployed", "error"),
    EventId.BINDING_DRIFT: ("binding-drift", "warning"),
    EventId.CLOCK_SKEW: ("clock-skew", "warning"),
}

CHANNELS = ("system", "user")


def event_name(event_id: int) -> str:
    try:
        return DESCRIPTIONS[EventId(event_id)][0]
    except ValueError:
        return str(event_id)


@dataclasses.dataclass(frozen=True)
class CertFacts:
    """What an event says about one certificate (SPEC "Lifecycle events": template, subject names,
    EKUs, thumbprint SHA-1 and SHA-256, store, expiration)."""

    thumbprint: str
    sha256: str
    subject: str
    subject_names: tuple[str, ...]
    ekus: tuple[str, ...]
    template: str | None
    template_oid: str | None
    store: str
    not_before: dt.datetime
    expiration: dt.datetime

    @classmethod
    def of(cls, cert: x509.Certificate, *, template: str | None, store: str = "personal") -> CertFacts:
        info = template_info.decode(cert)
        try:
            ekus = tuple(_eku_name(o) for o in cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)
        except x509.ExtensionNotFound:
            ekus = ()
        return cls(thumbprint=thumbprint(cert), sha256=sha256_thumbprint(cert), subject=cert.subject.rfc4514_string(),
                   subject_names=tuple(subject_names(cert)), ekus=ekus, template=template,
                   template_oid=info.oid if info else None, store=store, not_before=cert.not_valid_before_utc,
                   expiration=cert.not_valid_after_utc)

    def to_dict(self) -> dict[str, Any]:
        return {"thumbprint": self.thumbprint, "sha256": self.sha256, "subject": self.subject,
                "subject_names": list(self.subject_names), "ekus": list(self.ekus), "template": self.template,
                "template_oid": self.template_oid, "store": self.store, "not_before": self.not_before.isoformat(),
                "expiration": self.expiration.isoformat()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CertFacts:
        return cls(thumbprint=data["thumbprint"], sha256=data["sha256"], subject=data["subject"],
                   subject_names=tuple(data["subject_names"]), ekus=tuple(data["ekus"]), template=data["template"],
                   template_oid=data.get("template_oid"), store=data["store"],
                   not_before=dt.datetime.fromisoformat(data["not_before"]),
                   expiration=dt.datetime.fromisoformat(data["expiration"]))


def _eku_name(oid: x509.ObjectIdentifier) -> str:
    """The EKU's dotted OID, with its short name when cryptography knows one (serverAuth ...)."""
    name = oid._name  # cryptography's registry of well-known names; "Unknown OID" otherwise
    return oid.dotted_string if name == "Unknown OID" else f"{name} ({oid.dotted_string})"


@dataclasses.dataclass(frozen=True)
class EventDraft:
    """An event before it is written. ``old`` is a certificate already in the store (replaced,
    expiring, deleted, archived, exported); ``new`` one just installed (1006, 1001)."""

    event_id: EventId
    action: str | None = None
    old: CertFacts | None = None
    new: CertFacts | None = None
    template: str | None = None
    detail: str = ""
    data: dict[str, Any] = dataclasses.field(default_factory=dict)  # event-specific extras (request id, task ...)


@dataclasses.dataclass(frozen=True)
class Event:
    seq: int
    event_id: int
    channel: str
    time: dt.datetime
    uid: int  # the user whose process raised it (system-channel tasks trust only root and the agent's user)
    action: str | None
    old: CertFacts | None
    new: CertFacts | None
    template: str | None
    detail: str
    data: dict[str, Any]
    synthetic: bool = False  # made up by ``task test``: never in the log

    @property
    def name(self) -> str:
        return event_name(self.event_id)

    @property
    def level(self) -> str:
        try:
            return DESCRIPTIONS[EventId(self.event_id)][1]
        except ValueError:
            return "info"

    @property
    def old_thumbprint(self) -> str:
        return self.old.thumbprint if self.old else ""

    @property
    def new_thumbprint(self) -> str:
        return self.new.thumbprint if self.new else ""

    def summary(self) -> str:
        """One line for people and syslog."""
        parts = [f"{self.event_id} {self.name}"]
        if self.action:
            parts.append(f"action={self.action}")
        if self.template:
            parts.append(f"template={self.template}")
        if self.old:
            parts.append(f"old={self.old.thumbprint}")
        if self.new:
            parts.append(f"new={self.new.thumbprint}")
        if self.detail:
            parts.append(self.detail)
        return " ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        return {"seq": self.seq, "id": self.event_id, "name": self.name, "level": self.level,
                "channel": self.channel, "time": self.time.isoformat(), "uid": self.uid, "action": self.action,
                "template": self.template, "old": self.old.to_dict() if self.old else None,
                "new": self.new.to_dict() if self.new else None, "detail": self.detail, "data": self.data,
                "synthetic": self.synthetic}
