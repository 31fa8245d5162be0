"""``certpulse principal acme-eab``: a one-time external account binding key for an ACME client,
printed once, kept only as its SHA-256, audited without the key; clear one-line refusals."""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import json

import pytest
from sqlalchemy import create_engine, select

from certpulse.ca.storage import schema as t
from support import CA

pytestmark = pytest.mark.sqlite_only  # the command's behaviour does not depend on the database


def _decoded(text: str) -> bytes:
    assert "=" not in text and "+" not in text and "/" not in text  # base64url, unpadded
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


@pytest.fixture(scope="module")
def bound_ca(ca: CA) -> CA:
    ca.add_principal("eab.example.internal", "--group", "webservers")
    ca.add_principal("off.example.internal")
    ca.cli("principal", "disable", "off.example.internal")
    return ca


def test_json_key_is_stored_only_as_its_digest_and_audited(bound_ca: CA) -> None:
    out = bound_ca.cli("principal", "acme-eab", "eab.example.internal", "--expires", "2h", "--json")
    made = json.loads(out.stdout)
    key = _decoded(made["hmac_key"])
    assert len(key) == 96 and made["principal"] == "eab.example.internal"
    expires = dt.datetime.fromisoformat(made["expires_at"])
    assert dt.timedelta(hours=1, minutes=50) < expires - dt.datetime.now(dt.UTC) <= dt.timedelta(hours=2)
    engine = create_engine(bound_ca.database_url)
    try:
        with engine.connect() as conn:
            row = conn.execute(select(t.acme_eab_keys).where(t.acme_eab_keys.c.kid == made["kid"])).one()
            audit = conn.execute(select(t.audit).where(t.audit.c.action == "acme-eab-created")).all()
    finally:
        engine.dispose()
    assert row.key_digest == hashlib.sha256(key).hexdigest() and row.used_at is None
    assert any(made["kid"] in (a.detail or "") for a in audit)
    assert not any(made["hmac_key"] in (a.detail or "") for a in audit)


def test_text_output_gives_the_client_flags(bound_ca: CA) -> None:
    out = bound_ca.cli("principal", "acme-eab", "eab.example.internal").stdout
    kid = next(line.split(": ", 1)[1] for line in out.splitlines() if line.startswith("kid: "))
    key = next(line.split(": ", 1)[1] for line in out.splitlines() if line.startswith("hmac_key: "))
    assert len(_decoded(key)) == 96
    assert f"--eab-kid {kid} --eab-hmac-key {key}" in out  # certbot
    assert f"--eab --kid {kid} --hmac {key}" in out  # lego


@pytest.mark.parametrize(("args", "words"), [
    (("nobody.example.internal",), "no principal named"),
    (("off.example.internal",), "disabled"),
    (("eab.example.internal", "--expires", "soon"), "not a duration"),
])
def test_refusals_are_one_line(bound_ca: CA, args: tuple[str, ...], words: str) -> None:
    result = bound_ca.cli("principal", "acme-eab", *args, check=False)
    assert result.returncode != 0 and result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and words in lines[0] and "Traceback" not in result.stderr
