"""What the agent knows of its certificates' revocation, and asking the CA that issued each one.

Known revocations are kept in the store's state (``revoked``): from status answers, and from
renewals the CA refused because the old certificate was revoked or expired. A certificate is
asked about at the policy server that issued it (recorded when it was installed); one installed
before that was recorded is asked at the server whose policy id it carries, else the first one.
Offline or unknown is ignored (the seed: revocation errors count only when the source answers).

Each server is asked once per pulse, not once per certificate: one ``GET /v1/certificates/status``
answers for every unexpired certificate it issued to this principal (a page per 10,000), and the
certificates that answer does not cover (issued to another principal, e.g. copied onto this
machine) are asked by serial in ``POST``s of up to 500. A server older than those routes answers
404 or 405 (or, for the GET, reads ``status`` as a serial and refuses it as invalid): then, and
only then, each certificate is asked on its own, as before.

Known revocations stick: a certificate seen revoked is never asked about again. That holds for a
certificate on hold (``certificateHold``) that the CA releases afterwards too: at the pulse that
saw it revoked the agent already replaced it (a new request, with a new key), so the released
certificate stays retired and its replacement is the one in use.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping, Sequence

from certpulse.agent.client import CAClient, ServerRefused, ServerUnavailable, StatusAnswer
from certpulse.agent.gather import GatheredPolicy
from certpulse.machine.certstore import CertRecord, LocalStore

STATE = "revoked"
# Serials per POST: the CA's limit (ca/revocation.py MAX_SERIALS_PER_CALL, what fits its 64 KiB body limit)
SERIALS_PER_CALL = 500
# What a CA from before the batch routes answers them: 404/405, or 400 invalid-argument for the
# GET, which it reads as ``GET /v1/certificates/{serial}`` with the serial "status"
_NO_SUCH_ROUTE = (404, 405)


class _BatchUnsupported(Exception):
    """The server has no batch status routes: ask it the ``rest`` one certificate at a time
    (``revoked``: what its batch answers had already said)."""

    def __init__(self, revoked: set[str], rest: Sequence[CertRecord]) -> None:
        super().__init__("the server has no batch status routes")
        self.revoked = revoked
        self.rest = list(rest)


def known_revoked(store: LocalStore) -> set[str]:
    """Thumbprints known to be revoked."""
    return set(store.get_state(STATE) or [])


def remember_revoked(store: LocalStore, thumbprint: str) -> None:
    store.set_state(STATE, sorted(known_revoked(store) | {thumbprint}))


def issuing_client(record: CertRecord, clients: Mapping[str, CAClient],
                   policies: Sequence[GatheredPolicy]) -> CAClient | None:
    """The client of the policy server that issued ``record``: the one recorded at install, else
    one whose policy carries the record's policy id, else the first configured."""
    if record.policy_url is not None and record.policy_url in clients:
        return clients[record.policy_url]
    for policy in policies:
        if record.policy_id is not None and policy.server.policy_id == record.policy_id:
            client = clients.get(policy.server.url)
            if client is not None:
                return client
    return next(iter(clients.values()), None)


def refresh_revoked(store: LocalStore, clients: Mapping[str, CAClient], policies: Sequence[GatheredPolicy],
                    now: dt.datetime, *, batch: bool = True) -> frozenset[str]:
    """Ask each unexpired current certificate's issuing server whether it is revoked; the set of
    every certificate known to be revoked, remembered in the store. ``batch=False`` asks one
    certificate per call (what a server without the batch routes gets; kept for comparison)."""
    known = known_revoked(store)
    asking: dict[CAClient, list[CertRecord]] = {}
    for record in store.certificates(include_archived=False):
        if record.issuer_name is None or record.thumbprint in known or record.not_after < now:
            continue
        client = issuing_client(record, clients, policies)
        if client is not None:
            asking.setdefault(client, []).append(record)
    for client, records in asking.items():
        if batch:
            try:
                known |= _ask_in_batches(client, records)
                continue
            except _BatchUnsupported as unsupported:
                known |= unsupported.revoked
                records = unsupported.rest
        known |= _ask_one_by_one(client, records)
    store.set_state(STATE, sorted(known))
    return frozenset(known)


def _revoked(records: Sequence[CertRecord], answers: Sequence[StatusAnswer]) -> tuple[set[str], list[CertRecord]]:
    """The thumbprints of ``records`` the answers say are revoked, and the records they do not
    cover (matched on serial and issuer name: the same serial at another issuer is another
    certificate)."""
    said = {(a.serial, a.issuer): a.status for a in answers}
    revoked = {r.thumbprint for r in records if said.get((r.serial, r.issuer_name)) == "revoked"}
    return revoked, [r for r in records if (r.serial, r.issuer_name) not in said]


def _ask_in_batches(client: CAClient, records: Sequence[CertRecord]) -> set[str]:
    """One GET for this principal's certificates, then POSTs for the rest. Raises
    :class:`_BatchUnsupported` (with the records still to ask) when the server lacks the routes."""
    try:
        own = client.own_statuses()
    except ServerUnavailable:
        return set()  # offline: ignored, as every revocation error is
    except ServerRefused as refused:
        if refused.status in _NO_SUCH_ROUTE or (refused.status == 400 and refused.reason == "invalid-argument"):
            raise _BatchUnsupported(set(), records) from None
        own = []  # e.g. a credential the CA no longer takes: the serials are public, ask by list
    revoked, rest = _revoked(records, own)
    for start in range(0, len(rest), SERIALS_PER_CALL):
        chunk = rest[start:start + SERIALS_PER_CALL]
        try:
            answers = client.statuses([(r.serial, r.issuer_name) for r in chunk])
        except ServerUnavailable:
            break  # gone offline: the rest waits for the next pulse
        except ServerRefused as refused:
            if refused.status in _NO_SUCH_ROUTE:
                raise _BatchUnsupported(revoked, rest[start:]) from None
            continue
        revoked |= _revoked(chunk, answers)[0]
    return revoked


def _ask_one_by_one(client: CAClient, records: Sequence[CertRecord]) -> set[str]:
    """One ``GET /v1/certificates/{serial}`` per certificate (servers without the batch routes)."""
    revoked: set[str] = set()
    for record in records:
        try:
            if client.certificate_status(record.serial, record.issuer_name) == "revoked":
                revoked.add(record.thumbprint)
        except (ServerUnavailable, ServerRefused):
            continue
    return revoked
