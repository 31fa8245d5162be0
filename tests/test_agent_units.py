"""Agent pieces with no server: the daemon's backoff arithmetic and the store's file rules."""

from __future__ import annotations

import datetime as dt
import os
import random
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from hypothesis import given, settings
from hypothesis import strategies as st

from certpulse.agent import gather
from certpulse.agent.daemon import BACKOFF_FLOOR, follows_retry_after, next_delay
from certpulse.machine.certstore import LocalStore
from certpulse.pki.keys import PrivateKey
from pki_factory import Authority

NOW = dt.datetime(2030, 1, 1, tzinfo=dt.UTC)
HOUR = dt.timedelta(hours=1)


@settings(max_examples=100, deadline=None)
@given(failures=st.integers(0, 40), retry_after=st.one_of(st.none(), st.floats(0, 86400)),
       refresh_s=st.integers(60, 86400), cap_s=st.integers(60, 86400), seed=st.integers(0, 2**32))
def test_next_delay_bounds(failures: int, retry_after: float | None, refresh_s: int, cap_s: int, seed: int) -> None:
    refresh, cap = dt.timedelta(seconds=refresh_s), dt.timedelta(seconds=cap_s)
    delay = next_delay(refresh=refresh, failures=failures, retry_after=retry_after, cap=cap, rng=random.Random(seed))
    if failures == 0:
        assert refresh_s <= delay <= refresh_s * 1.1  # the refresh interval plus jitter
    elif follows_retry_after(failures, retry_after):
        assert delay >= max(retry_after or 0, 1.0)  # the server's turn, never sooner than a second
        assert delay <= max(cap_s, retry_after or 0)
        assert delay <= max(retry_after or 0, 1.0) * 1.1 + 1  # a little spread, no backoff on top
    else:
        assert delay >= BACKOFF_FLOOR  # never hammers a CA that is down
        assert delay <= max(cap_s, BACKOFF_FLOOR, retry_after or 0)
        assert delay >= (retry_after or 0)  # Retry-After is honoured


def test_backoff_grows_then_stops_at_the_cap() -> None:
    rng = random.Random(7)
    ceilings = [max(next_delay(refresh=8 * HOUR, failures=n, retry_after=None, cap=HOUR, rng=rng)
                    for _ in range(200)) for n in range(1, 10)]
    assert ceilings[0] <= 60 and ceilings[2] > 120 and ceilings[-1] <= 3600
    assert ceilings[-1] > 1800  # reached the cap's neighbourhood, and no further


World = tuple[LocalStore, Authority]


def _issue(ca: Authority, name: str) -> tuple[PrivateKey, x509.Certificate]:
    issued = ca.issue(name, not_before=NOW, not_after=NOW + 365 * 24 * HOUR)
    assert issued.key is not None
    return issued.key, issued.certificate


@pytest.fixture
def store_and_ca(tmp_path: Path) -> Iterator[World]:
    ca = Authority.root("Test CA", not_before=NOW, not_after=NOW + 3650 * 24 * HOUR, path_length=0)
    store = LocalStore(tmp_path / "store")
    yield store, ca
    store.close()


def test_key_files_are_0600_and_the_live_link_names_a_matching_pair(store_and_ca: World) -> None:
    store, authority = store_and_ca
    ca = authority.certificate
    key, cert = _issue(authority, "one")
    record = store.install(key=key, cert=cert, chain=[ca], source="auto", now=NOW, template_name="machine")
    folder = Path(os.path.realpath(store.live_link("machine")))
    assert folder == store.folder(record.thumbprint)
    assert stat.S_IMODE((folder / "key.pem").stat().st_mode) == 0o600
    loaded = x509.load_pem_x509_certificate((folder / "cert.pem").read_bytes())
    assert loaded.public_key() == store.key(record.thumbprint).public_key()
    assert cert.fingerprint(hashes.SHA1()).hex().upper() == record.thumbprint  # noqa: S303


@pytest.mark.skipif(os.geteuid() != 0, reason="changing a file's owner needs root; CI runs as root")
def test_renewal_keeps_the_key_owner_and_group(store_and_ca: World) -> None:
    store, authority = store_and_ca
    ca = authority.certificate
    key, cert = _issue(authority, "old")
    old = store.install(key=key, cert=cert, chain=[ca], source="auto", now=NOW, template_name="machine")
    os.chown(store.folder(old.thumbprint) / "key.pem", 4321, 8765)
    new_key, new_cert = _issue(authority, "new")
    new = store.install(key=new_key, cert=new_cert, chain=[ca], source="auto", now=NOW, template_name="machine",
                        replaces=(old.thumbprint,))
    st_new = (store.folder(new.thumbprint) / "key.pem").stat()
    assert (st_new.st_uid, st_new.st_gid) == (4321, 8765)
    assert stat.S_IMODE(st_new.st_mode) == 0o600
    assert store.find(old.thumbprint).archived and store.find(old.thumbprint).replaced_by == new.thumbprint
    assert os.path.realpath(store.live_link("machine")) == str(store.folder(new.thumbprint))


def test_recover_points_a_stale_link_at_the_current_version(store_and_ca: World) -> None:
    store, authority = store_and_ca
    ca = authority.certificate
    key, cert = _issue(authority, "old")
    old = store.install(key=key, cert=cert, chain=[ca], source="auto", now=NOW, template_name="machine")
    new_key, new_cert = _issue(authority, "new")
    new = store.install(key=new_key, cert=new_cert, chain=[ca], source="auto", now=NOW, template_name="machine",
                        replaces=(old.thumbprint,))
    # What a kill between the database commit and the link swap leaves behind:
    link = store.live_link("machine")
    link.unlink()
    link.symlink_to(os.path.join("..", "certs", old.thumbprint))
    (store.certs_dir / ".HALF.abcd").mkdir()
    store.recover(NOW)
    assert os.path.realpath(link) == str(store.folder(new.thumbprint))
    assert not (store.certs_dir / ".HALF.abcd").exists()


def test_chain_validation_remembers_signatures_by_the_exact_bytes() -> None:
    """gather caches signature checks; a forgery that copies every name (and even the serial) of
    a certificate already verified is still refused, at the first and at every later check."""
    authority = Authority.root("Cache CA", not_before=NOW, not_after=NOW + 3650 * 24 * HOUR, path_length=0)
    impostor = Authority.root("Cache CA", not_before=NOW, not_after=NOW + 3650 * 24 * HOUR, path_length=0)
    ca = authority.certificate
    _, genuine = _issue(authority, "host")
    # Every name of the genuine certificate, signed by the impostor's key.
    forged = authority.issue(public_key=genuine.public_key(), subject=genuine.subject, not_before=NOW,  # type: ignore[arg-type]
                             not_after=NOW + 365 * 24 * HOUR, signing_key=impostor.key,
                             serial=genuine.serial_number).certificate
    at = NOW + HOUR
    for _ in range(2):  # the second round answers from the cache
        assert gather.chain_valid(genuine, [], [ca], at)
        assert not gather.chain_valid(forged, [], [ca], at)
        assert not gather.chain_valid(genuine, [], [impostor.certificate], at)  # same names, another key
        assert not gather.chain_valid(genuine, [], [ca], NOW + 3650 * 24 * HOUR)  # dates are checked every time


def test_a_fault_inside_signature_verification_is_not_taken_for_a_bad_signature(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """D6: the check used to catch every exception, so a programming error (here a RuntimeError
    out of verification) was recorded, and cached for the life of the process, as "not signed by
    this issuer"."""
    authority = Authority.root("Fault CA", not_before=NOW, not_after=NOW + 3650 * 24 * HOUR, path_length=0)
    _, genuine = _issue(authority, "fault")

    def broken(self: x509.Certificate, issuer: x509.Certificate) -> None:
        raise RuntimeError("a bug, not a forgery")

    monkeypatch.setattr(x509.Certificate, "verify_directly_issued_by", broken)
    with pytest.raises(RuntimeError):
        gather.chain_valid(genuine, [], [authority.certificate], NOW + HOUR)
    monkeypatch.undo()
    assert gather.chain_valid(genuine, [], [authority.certificate], NOW + HOUR)  # nothing wrong was remembered
