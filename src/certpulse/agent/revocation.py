"""What the agent knows of its certificates' revocation, and asking the CA that issued each one.

Known revocations are kept in the store's state (``revoked``): from status answers, and from
renewals the CA refused because the old certificate was revoked or expired. A certificate is
asked about at the policy server that issued it (recorded when it was installed); one installed
before that was recorded is asked at the server whose policy id it carries, else the first one.
Offline or unknown is ignored (the seed: revocation errors count only when the source answers).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping, Sequence

from certpulse.agent.client import CAClient, ServerRefused, ServerUnavailable
from certpulse.agent.gather import GatheredPolicy
from certpulse.machine.certstore import CertRecord, LocalStore

STATE = "revoked"


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
                    now: dt.datetime) -> frozenset[str]:
    """Ask each unexpired current certificate's issuing server whether it is revoked; the set of
    every certificate known to be revoked, remembered in the store."""
    known = known_revoked(store)
    for record in store.certificates(include_archived=False):
        if record.issuer_name is None or record.thumbprint in known or record.not_after < now:
            continue
        client = issuing_client(record, clients, policies)
        if client is None:
            continue
        try:
            if client.certificate_status(record.serial, record.issuer_name) == "revoked":
                known.add(record.thumbprint)
        except (ServerUnavailable, ServerRefused):
            continue
    store.set_state(STATE, sorted(known))
    return frozenset(known)
