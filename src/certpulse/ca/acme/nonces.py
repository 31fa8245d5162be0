"""ACME anti-replay nonces (RFC 8555 section 6.5), stateless to issue and single-use to spend.

Every ACME answer carries a fresh ``Replay-Nonce``, so issuing one must cost nothing: a nonce is
``base64url(random || issued-at || HMAC-SHA256(random || issued-at)[:16])`` under a secret kept in
the ``settings`` table. Any worker process of ``ca serve --workers N`` (they share the database,
hence the secret) can issue one and check one without a database round trip. Spending one is an
``INSERT`` into ``acme_spent_nonces``, whose primary key makes it single-use across all workers:
a second spend inserts nothing and is refused ``badNonce``. Nonces older than ``[acme]
nonce_lifetime`` fail on their age alone, so their rows can go: each process deletes a bounded
batch of them now and then.

The secret is made on first use by whichever process gets there first (an insert that does
nothing when the row exists, then a read, so two processes racing agree on one value); it never
leaves the database and is never logged.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import hashlib
import hmac
import json
import logging
import os
import secrets
import struct
import threading

from sqlalchemy import Connection, Engine, bindparam, delete, select
from sqlalchemy.dialects import postgresql, sqlite

from certpulse.ca.acme.model import Account
from certpulse.ca.storage import schema as t
from certpulse.errors import Reason, Refusal
from certpulse.sql.db import DirectStatement, read, write

log = logging.getLogger("certpulse.acme")

SECRET_SETTING = "acme_nonce_secret"  # noqa: S105 - the setting's name, not a secret
_RANDOM = 12  # bytes of randomness: two nonces never collide
_MAC = 16  # bytes of HMAC-SHA256 kept: forging one is 2^128 work
_STAMP = struct.Struct(">Q")  # issued at, whole seconds since the epoch
_LENGTH = _RANDOM + _STAMP.size + _MAC
ENCODED_LENGTH = (_LENGTH * 4 + 2) // 3  # 48 characters, within acme_spent_nonces.nonce's 64
# Spent rows past the lifetime are deleted at most this often per process, this many at a time:
# a bounded statement, never a long lock on the table.
PURGE_EVERY = dt.timedelta(minutes=1)
PURGE_BATCH = 5000
# A nonce issued up to this far in the future (another worker's clock a little ahead) is accepted.
CLOCK_SLACK = dt.timedelta(seconds=5)


class AccountChanged(Exception):
    """The account a request was checked against is no longer the database's (deactivated, its
    key or contacts or principal changed): the spend was rolled back; check the request afresh."""


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


class Nonces:
    """Issue and spend nonces for one CA database (one instance per process)."""

    def __init__(self, engine: Engine, lifetime: dt.timedelta) -> None:
        self.engine = engine
        self.lifetime = lifetime
        self._key: bytes | None = None
        self._lock = threading.Lock()
        self._next_purge: dt.datetime | None = None
        insert = postgresql.insert if engine.dialect.name == "postgresql" else sqlite.insert
        self._spend = DirectStatement(
            insert(t.acme_spent_nonces).on_conflict_do_nothing(index_elements=["nonce"]), engine.dialect,
            ("nonce", "spent_at"))
        # What a request signed by an account relies on, read inside the spend's transaction
        accounts, principals = t.acme_accounts, t.principals
        self._confirm = DirectStatement(
            select(accounts.c.status, accounts.c.key_thumbprint, accounts.c.principal_id, accounts.c.contact,
                   principals.c.name, principals.c.enabled)
            .select_from(accounts.outerjoin(principals, principals.c.id == accounts.c.principal_id))
            .where(accounts.c.id == bindparam("id")), engine.dialect)
        self._make_secret = insert(t.settings).values(name=SECRET_SETTING, value=bindparam("value")) \
            .on_conflict_do_nothing(index_elements=["name"])

    @property
    def ready(self) -> bool:
        """Whether the secret is loaded (issuing then needs no database)."""
        return self._key is not None

    def load(self) -> None:
        """Read (or make, on the CA's first ACME request) the secret. Blocking: a database trip."""
        if self._key is not None:
            return
        with self._lock:
            if self._key is not None:
                return
            query = select(t.settings.c.value).where(t.settings.c.name == SECRET_SETTING)
            with read(self.engine) as conn:
                value = conn.execute(query).scalar()
            if value is None:
                with write(self.engine) as conn:
                    conn.execute(self._make_secret, {"value": secrets.token_hex(32)})
                with read(self.engine) as conn:
                    value = conn.execute(query).scalar()
            try:
                key = bytes.fromhex(str(value))
            except ValueError:
                key = b""
            if len(key) < 32:
                raise Refusal(Reason.STORE, f"the setting {SECRET_SETTING} is damaged")
            self._key = key

    def _mac(self, body: bytes) -> bytes:
        assert self._key is not None
        return hmac.new(self._key, body, hashlib.sha256).digest()[:_MAC]

    def issue(self, now: dt.datetime) -> str:
        """A fresh nonce (the secret must be loaded: :meth:`load`)."""
        body = os.urandom(_RANDOM) + _STAMP.pack(int(now.timestamp()))
        return _b64(body + self._mac(body))

    def check(self, nonce: str, now: dt.datetime) -> None:
        """That ``nonce`` is one of ours and not too old (no database): BAD_NONCE otherwise."""
        self.load()
        if len(nonce) != ENCODED_LENGTH:
            raise Refusal(Reason.BAD_NONCE, "the nonce was not issued by this server")
        try:
            raw = base64.urlsafe_b64decode(nonce + "=" * (-len(nonce) % 4))
        except (binascii.Error, ValueError):
            raise Refusal(Reason.BAD_NONCE, "the nonce was not issued by this server") from None
        body, mac = raw[:-_MAC], raw[-_MAC:]
        if len(raw) != _LENGTH or not hmac.compare_digest(mac, self._mac(body)):
            raise Refusal(Reason.BAD_NONCE, "the nonce was not issued by this server")
        issued = dt.datetime.fromtimestamp(_STAMP.unpack(body[_RANDOM:])[0], dt.UTC)
        if issued > now + CLOCK_SLACK or now - issued > self.lifetime:
            raise Refusal(Reason.BAD_NONCE, "the nonce has expired; use the one from the last answer or ask "
                                            "newNonce for another")

    def spend(self, nonce: str, now: dt.datetime, account: Account | None = None) -> None:
        """Check ``nonce`` and mark it used, once across every worker: BAD_NONCE when it is not
        ours, too old, or already spent. One short write transaction.

        With ``account`` (the one whose key verified the request, maybe as this process
        remembered it), the same transaction first confirms that the database still has it as it
        was: valid, same key, same contacts, same enabled principal. So a request is never
        accepted for an account another worker has just deactivated or re-keyed, without a read
        transaction of its own per request. :class:`AccountChanged` (nothing written) otherwise."""
        self.check(nonce, now)
        with write(self.engine) as conn:
            if account is not None and not self._unchanged(conn, account):
                raise AccountChanged(account.id)
            inserted = self._spend.run(conn, {"nonce": nonce, "spent_at": now}).rowcount
        if inserted != 1:
            raise Refusal(Reason.BAD_NONCE, "the nonce has already been used; use the one from the last answer")
        self._purge_now_and_then(now)

    def _unchanged(self, conn: Connection, account: Account) -> bool:
        row = self._confirm.run(conn, {"id": account.id}).fetchone()
        if row is None:
            return False
        status, thumbprint, principal_id, contact, principal_name, enabled = row
        return (status == "valid" and bool(enabled) and principal_id is not None
                and principal_id == account.principal_id and principal_name == account.principal_name
                and thumbprint == account.key_thumbprint and tuple(json.loads(contact)) == account.contact)

    def _purge_now_and_then(self, now: dt.datetime) -> None:
        due = self._next_purge
        if due is not None and now < due:
            return
        self._next_purge = now + PURGE_EVERY
        if due is None:  # the first spend of this process: purge at the next period, not at start
            return
        self.purge(now)

    def purge(self, now: dt.datetime, batch: int = PURGE_BATCH) -> int:
        """Delete up to ``batch`` spent rows whose nonces have expired anyway; how many went."""
        cutoff = now - self.lifetime - CLOCK_SLACK
        old = select(t.acme_spent_nonces.c.nonce).where(t.acme_spent_nonces.c.spent_at < cutoff).limit(batch)
        try:
            with write(self.engine) as conn:
                return int(conn.execute(delete(t.acme_spent_nonces)
                                        .where(t.acme_spent_nonces.c.nonce.in_(old.scalar_subquery()))).rowcount)
        except Exception:  # housekeeping: the spend it follows has succeeded
            log.exception("could not delete expired ACME nonces")
            return 0


__all__ = ["ENCODED_LENGTH", "AccountChanged", "Nonces"]
