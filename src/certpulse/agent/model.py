"""What the planner sees and what it decides: immutable snapshots in, actions out.

The gather step (I/O) builds these from the policy server's answer and the local store; the
planner (pure) turns them into an ordered list of :class:`Action`; the executor (I/O) carries
the actions out. Nothing here touches the network, the disk or the clock.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import enum
from typing import Literal

Context = Literal["machine", "user"]
Source = Literal["auto", "manual"]
ReplaceAction = Literal["renew", "supersede"]  # the 1001 a replacing request raises
AUTH_STRENGTH = {"certificate": 0, "token": 1, "password": 2}
CLOCK_SKEW = dt.timedelta(minutes=5)  # how far ahead of this machine the CA's clock may run (for
# certificates not this machine's own; its own count as held however late they start)


def starts_later(what: str, start: dt.datetime, now: dt.datetime) -> str:
    """Why something valid is not used yet: ``what`` starts after this machine's clock, by how
    much (whole minutes, rounded up), and what to do about it."""
    minutes = max(1, -int((now - start).total_seconds() // 60))
    return (f"{what} starts at {start.isoformat(timespec='seconds')}, {minutes} minute{'s' if minutes > 1 else ''} "
            "after this machine's clock; check the clock")


@dataclasses.dataclass(frozen=True)
class Options:
    """The seed's AE options (the agent's config file plays Group Policy)."""

    enabled: bool = True
    enroll: bool = True
    manage: bool = True
    retrieve_pending: bool = True
    context: Context = "machine"


@dataclasses.dataclass(frozen=True)
class TemplatePolicy:
    """A template as the policy server describes it to this client."""

    name: str
    oid: str
    major_version: int
    minor_version: int
    validity: dt.timedelta
    renewal_period: dt.timedelta
    purpose: str
    key_types: tuple[str, ...]
    default_key_type: str
    archive_private_key: bool
    subject_source: str
    renewal_subject_from_existing: bool
    manager_approval: bool
    ra_signatures: int
    ra_policy: str | None
    supersedes: tuple[str, ...]
    old_certificate: str
    user_interaction: bool
    check_directory: bool
    rights: frozenset[str]

    @property
    def autoenroll(self) -> bool:
        return "autoenroll" in self.rights


@dataclasses.dataclass(frozen=True)
class IssuerPolicy:
    name: str
    cost: int
    renewal_only: bool
    templates: frozenset[str]
    valid: bool  # passed RFC 5280 validation in the gather step
    reachable: bool = True  # one known to be down is tried last; the gather step knows of none
    # Invalid only because it (or the pinned root above it) starts after this machine's clock:
    # when it would become valid. The plan notes why nothing is requested from it.
    starts_at: dt.datetime | None = None


@dataclasses.dataclass(frozen=True)
class PolicyServer:
    """One policy server's answer. Servers with one policy id form a group."""

    url: str
    policy_id: str
    cost: int
    auth: str  # certificate | token | password
    is_default: bool
    templates: tuple[TemplatePolicy, ...]
    issuers: tuple[IssuerPolicy, ...]
    kra_valid: bool  # a valid KRA certificate of this CA is present
    directory: tuple[tuple[str, dt.datetime], ...] = ()  # (template name, not_after) of published certs

    def template(self, name: str) -> TemplatePolicy | None:
        for template in self.templates:
            if template.name == name:
                return template
        return None


@dataclasses.dataclass(frozen=True)
class StoredCertificate:
    """A certificate the agent holds (personal store) or watches (additional stores)."""

    thumbprint: str
    subject: str
    not_before: dt.datetime
    not_after: dt.datetime
    template_oid: str | None
    template_name: str | None
    major_version: int
    minor_version: int
    source: Source
    policy_id: str | None
    archived: bool = False
    chain_valid: bool = True
    revoked: bool = False
    is_ra: bool = False  # holds the registration-authority (certificate request agent) EKU
    store: str = "personal"
    # Issued to this machine: a record of its personal store with its private key. Such a
    # certificate counts as held however far in the future it starts (see :meth:`usable`).
    own: bool = False

    @property
    def lifetime(self) -> dt.timedelta:
        return self.not_after - self.not_before

    def expired(self, now: dt.datetime) -> bool:
        return now > self.not_after

    def usable(self, now: dt.datetime) -> bool:
        """Valid, unexpired, not revoked, not archived: counts as holding the template.

        A certificate that starts up to :data:`CLOCK_SKEW` after ``now`` counts too, and one of
        this machine's own (:attr:`own`) however late it starts: the CA's clock may be ahead of
        this machine's, and a certificate issued a moment ago must not look missing (that would
        request another one at every pulse). The plan says so (:meth:`not_started`)."""
        return (not self.archived and self.chain_valid and not self.revoked and now <= self.not_after
                and (self.own or self.not_before - CLOCK_SKEW <= now))

    def not_started(self, now: dt.datetime) -> bool:
        """Not valid yet by this machine's clock: it starts after ``now``."""
        return now < self.not_before


@dataclasses.dataclass(frozen=True)
class PendingRequest:
    request_id: int
    template: str
    issuer: str
    policy_url: str
    submitted_at: dt.datetime
    renewal_of: str | None  # thumbprint of the certificate being replaced, if any


@dataclasses.dataclass(frozen=True)
class StoreSnapshot:
    certificates: tuple[StoredCertificate, ...] = ()
    pending: tuple[PendingRequest, ...] = ()
    # Templates with a request sent (or about to be) that the CA has not acknowledged yet: it is
    # resent with the same key and idempotency key, so no other request may be made for them.
    in_flight: tuple[str, ...] = ()


class Kind(enum.StrEnum):
    """What an action does. ARCHIVE and SKIP are never planned: a replaced certificate is archived
    when its successor is installed, and a rule that does not act leaves a Note, not an action."""

    DROP_STALE_REQUEST = "drop-stale-request"
    POLL_PENDING = "poll-pending"
    RENEW = "renew"
    ENROLL = "enroll"
    RENEW_MANUAL = "renew-manual"
    ARCHIVE = "archive"
    DELETE = "delete"
    SKIP = "skip"


@dataclasses.dataclass(frozen=True)
class Action:
    """One step of a pulse, with the rule (SPEC section) that caused it."""

    kind: Kind
    rule: str
    template: str | None = None
    thumbprint: str | None = None  # the certificate acted on or replaced
    request_id: int | None = None
    issuers: tuple[str, ...] = ()  # in order of preference; the executor falls back down the list
    policy_url: str | None = None
    replaces: tuple[str, ...] = ()  # certificates the result replaces (1001), e.g. superseded ones
    replace_action: ReplaceAction | None = None
    new_request: bool = False  # a new request (not a renewal signed by the old key)
    subject_from: str | None = None  # thumbprint whose subject a new request reuses
    # Replaced certificates to delete instead of archive once the new one is installed: the
    # template says "delete revoked or expired" and they already are (never encryption ones).
    delete_replaced: tuple[str, ...] = ()
    detail: str = ""

    def to_dict(self) -> dict[str, object]:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(self).items()
                if v not in (None, (), "", False)}


@dataclasses.dataclass(frozen=True)
class Note:
    """Something the planner decided not to do, and the rule that says so."""

    rule: str
    template: str | None = None
    thumbprint: str | None = None
    detail: str = ""


@dataclasses.dataclass(frozen=True)
class Plan:
    """The pulse's actions in order, the skips as notes, and ``handled``: the personal
    certificates the agent takes care of itself. Those it renews (6a, 6c), those a superseding
    template replaces, and older copies of a template a newer valid certificate holds; the
    expiry monitor warns (1003 / 1002) about every other one, since the seed raises those events
    only for what autoenrollment will not renew."""

    actions: tuple[Action, ...]
    notes: tuple[Note, ...]
    handled: frozenset[str] = frozenset()
