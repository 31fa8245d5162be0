"""ACME nonces (certpulse.ca.acme.nonces) in-process over a real migrated database: stateless to
issue, checked by MAC and age, spent once across instances (as across worker processes), the
secret made once and shared, spent rows purged in bounded batches."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine, func, select, update

from certpulse.ca.acme.model import Account
from certpulse.ca.acme.nonces import ENCODED_LENGTH, AccountChanged, Nonces
from certpulse.ca.storage import migrate
from certpulse.ca.storage import schema as t
from certpulse.errors import Reason, Refusal
from certpulse.sql.db import make_engine, write

NOW = dt.datetime(2026, 6, 1, 12, 0, tzinfo=dt.UTC)
LIFETIME = dt.timedelta(minutes=15)


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[Engine]:
    engine = make_engine(f"sqlite:///{tmp_path / 'ca.db'}", writer_lock=True)
    migrate(engine)
    yield engine
    engine.dispose()


def refused(action: object) -> Refusal:
    with pytest.raises(Refusal) as caught:
        action()  # type: ignore[operator]
    return caught.value


def test_issue_spend_once_across_instances(engine: Engine) -> None:
    one, two = Nonces(engine, LIFETIME), Nonces(engine, LIFETIME)
    one.load()
    nonce = one.issue(NOW)
    assert len(nonce) == ENCODED_LENGTH and nonce != one.issue(NOW)
    two.spend(nonce, NOW + dt.timedelta(seconds=1))  # another worker: the same secret
    assert refused(lambda: one.spend(nonce, NOW + dt.timedelta(seconds=2))).reason is Reason.BAD_NONCE
    assert refused(lambda: two.spend(nonce, NOW + dt.timedelta(seconds=2))).reason is Reason.BAD_NONCE


def test_forged_expired_and_future_nonces(engine: Engine) -> None:
    nonces = Nonces(engine, LIFETIME)
    nonces.load()
    nonce = nonces.issue(NOW)
    forged = nonce[:-2] + ("AA" if nonce[-2:] != "AA" else "BB")
    for bad in (forged, "", "x" * ENCODED_LENGTH, nonce + "A", "!" * ENCODED_LENGTH):
        assert refused(lambda bad=bad: nonces.spend(bad, NOW)).reason is Reason.BAD_NONCE
    assert "expired" in refused(lambda: nonces.spend(nonce, NOW + LIFETIME + dt.timedelta(seconds=1))).detail
    assert refused(lambda: nonces.spend(nonces.issue(NOW + dt.timedelta(hours=1)), NOW)).reason is Reason.BAD_NONCE
    nonces.spend(nonce, NOW + LIFETIME)  # the last second of its life: still good


def test_purge_deletes_only_rows_of_expired_nonces_in_batches(engine: Engine) -> None:
    nonces = Nonces(engine, LIFETIME)
    nonces.load()
    for minutes in range(6):
        at = NOW + dt.timedelta(minutes=minutes)
        nonces.spend(nonces.issue(at), at)
    later = NOW + LIFETIME + dt.timedelta(minutes=3)  # nonces spent at minutes 0-2 are past any use
    assert nonces.purge(later, batch=2) == 2
    assert nonces.purge(later, batch=2) == 1
    assert nonces.purge(later, batch=2) == 0
    with engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(t.acme_spent_nonces)).scalar() == 3


def test_the_secret_is_made_once(engine: Engine) -> None:
    Nonces(engine, LIFETIME).load()
    Nonces(engine, LIFETIME).load()
    with engine.connect() as conn:
        rows = conn.execute(select(t.settings.c.value).where(t.settings.c.name == "acme_nonce_secret")).all()
    assert len(rows) == 1 and len(bytes.fromhex(rows[0][0])) == 32


def test_spending_for_an_account_confirms_it_in_the_same_transaction(engine: Engine) -> None:
    """A worker that remembers an account gets AccountChanged, with the nonce left unspent, as
    soon as another worker has deactivated it, re-keyed it, changed its contacts or disabled its
    principal; never a request accepted for the account as it was."""
    with write(engine) as conn:
        principal_id = conn.execute(t.principals.insert().values(
            name="web1", kind="machine", enabled=True, created_at=NOW)).inserted_primary_key[0]
        account_id = conn.execute(t.acme_accounts.insert().values(
            key_thumbprint="thumb-1", jwk="{}", principal_id=principal_id, status="valid",
            contact='["mailto:a@example.internal"]', created_at=NOW, updated_at=NOW)).inserted_primary_key[0]
    account = Account(id=account_id, status="valid", contact=("mailto:a@example.internal",), key_thumbprint="thumb-1",
                      jwk={}, principal_id=principal_id, principal_name="web1", eab_kid=None, created_at=NOW)
    nonces = Nonces(engine, LIFETIME)
    nonces.load()
    nonces.spend(nonces.issue(NOW), NOW, account)  # as the database has it: accepted
    changes = [
        (t.acme_accounts, {"status": "deactivated"}, {"status": "valid"}),
        (t.acme_accounts, {"key_thumbprint": "thumb-2"}, {"key_thumbprint": "thumb-1"}),
        (t.acme_accounts, {"contact": "[]"}, {"contact": '["mailto:a@example.internal"]'}),
        (t.principals, {"enabled": False}, {"enabled": True}),
        (t.principals, {"name": "web2"}, {"name": "web1"}),
    ]
    for table, changed, restored in changes:
        key = account_id if table is t.acme_accounts else principal_id
        with write(engine) as conn:
            conn.execute(update(table).where(table.c.id == key).values(**changed))
        nonce = nonces.issue(NOW)
        with pytest.raises(AccountChanged):
            nonces.spend(nonce, NOW, account)
        nonces.spend(nonce, NOW)  # rolled back: the nonce was not spent
        with write(engine) as conn:
            conn.execute(update(table).where(table.c.id == key).values(**restored))
    with write(engine) as conn:
        conn.execute(t.acme_accounts.delete().where(t.acme_accounts.c.id == account_id))
    with pytest.raises(AccountChanged):
        nonces.spend(nonces.issue(NOW), NOW, account)
