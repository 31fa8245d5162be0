"""Defects of issue 14 reproduced through real processes: a real ``ca serve``, real agent folders
driven by the real command line.

* D1: a template that archives private keys is enrolled (the agent seals the new key to the KRA
  the policy names; the CA checks the envelope and keeps it; the KRA opens it).
* D3: a certificate's revocation is asked of the policy server that issued it, not the first one.
* D5: the commands that only read or change the local store work without a readable credential.
"""

from __future__ import annotations

import json
import shutil
import sqlite3
import ssl
import tomllib
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
import tomli_w
from cryptography.hazmat.primitives import serialization

from agent_support import Agent, action_for, long_lived_tls, new_agent, one, one_line_error, public_der
from certpulse.pki import key_archival
from support import CA, init_ca, load_cert, serve

ESCROW_TEMPLATE = """\
name = "escrow"
display_name = "Key archival (tests)"
validity = "365d"
renewal_period = "6w"
purpose = "encryption"

[key]
types = ["ec-p256"]
usage = ["key_agreement"]
ekus = ["email_protection"]
archive = true

[subject]
source = "principal"

[handling]
old_certificate = "archive"

[[permissions]]
group = "escrowers"
rights = ["read", "enroll", "autoenroll"]
"""

ONLY_B_TEMPLATE = """\
name = "only-b"
display_name = "Served by the second CA only (tests)"
validity = "365d"
renewal_period = "6w"

[key]
types = ["ec-p256"]
usage = ["digital_signature"]
ekus = ["client_auth"]

[subject]
source = "principal"

[handling]
old_certificate = "archive"

[[permissions]]
group = "machines"
rights = ["read", "enroll", "autoenroll"]
"""


# -- D1: key archival ----------------------------------------------------------------------------------

def test_a_key_archival_template_is_enrolled_with_the_key_sealed_to_the_kra(
        pki: CA, ca_url: str, tmp_path: Path) -> None:
    template = tmp_path / "escrow.toml"
    template.write_text(ESCROW_TEMPLATE)
    if "escrow" not in pki.cli("template", "list").stdout:
        pki.cli("template", "add", str(template))
    agent = new_agent(pki, ca_url, tmp_path / "agent", "escrowers")

    result = agent.pulse()
    action = action_for(result, "escrow")
    assert (action["rule"], action["outcome"]) == ("6b:missing", "done"), action
    installed = agent.dir / "store" / "certs" / str(action["new_thumbprint"])
    key = serialization.load_pem_private_key((installed / "key.pem").read_bytes(), None)

    # The CA kept the envelope with the request, and the KRA's key opens it to this very key.
    serial = load_cert((installed / "cert.pem").read_text()).serial_number
    with sqlite3.connect(pki.dir / "ca.db") as db:
        rows = db.execute(
            "SELECT envelope FROM archived_keys JOIN requests ON requests.id = archived_keys.request_id "
            "JOIN certificates ON certificates.id = requests.certificate_id WHERE certificates.serial = ?",
            (format(serial, "x"),)).fetchall()
    [(envelope,)] = rows
    kra_key = serialization.load_pem_private_key((pki.dir / "keys" / "kra.key").read_bytes(), None)
    recovered = key_archival.open_envelope(json.loads(envelope), kra_key)  # type: ignore[arg-type]
    assert public_der(recovered) == public_der(key)

    # Renewal archives the new key too (the CA checks every request of the template).
    renewed = action_for(agent.pulse(faketime="+330d"), "escrow")
    assert (renewed["rule"], renewed["outcome"]) == ("6a:threshold", "done"), renewed
    with sqlite3.connect(pki.dir / "ca.db") as db:
        kinds = db.execute("SELECT requests.kind FROM archived_keys JOIN requests ON "
                           "requests.id = archived_keys.request_id WHERE requests.requester = ?",
                           (f"principal:{agent.principal}",)).fetchall()
    assert sorted(k for (k,) in kinds) == ["new", "renewal"]


# -- D3: revocation asked of the issuing server ---------------------------------------------------------

def _exchange(url: str, token: str, root: Path) -> str:
    answer = httpx.post(f"{url}/v1/tokens/exchange", json={"token": token}, timeout=30,
                        verify=ssl.create_default_context(cafile=str(root)))
    assert answer.status_code == 200, answer.text
    return str(answer.json()["credential"])


def _add_server(agent: Agent, url: str, token: str, *, cost: int, root: Path) -> None:
    """A second policy server for the same machine (its own credential file and pinned root), as
    an operator adds one to ``agent.toml``."""
    name = f"credential-{uuid.uuid4().hex[:6]}"
    (agent.dir / name).write_text(_exchange(url, token, root) + "\n")
    (agent.dir / name).chmod(0o600)
    shutil.copyfile(root, agent.dir / "trust" / f"{name}.pem")
    path = agent.dir / "agent.toml"
    config = tomllib.loads(path.read_text())
    config["policy_servers"].append({"url": url, "cost": cost, "is_default": False, "credential_file": name,
                                     "trust_roots": f"trust/{name}.pem"})
    path.write_text(tomli_w.dumps(config))


@pytest.fixture(scope="module")
def second_ca(tmp_path_factory: pytest.TempPathFactory) -> Any:
    directory = tmp_path_factory.mktemp("second-ca") / "ca"
    ca = init_ca(directory, f"sqlite:///{directory.parent / 'ca.db'}")
    template = directory.parent / "only-b.toml"
    template.write_text(ONLY_B_TEMPLATE)
    ca.cli("template", "add", str(template))
    long_lived_tls(ca)
    with serve(ca, tls=True) as url:
        yield ca, url


def test_revocation_is_asked_of_the_server_that_issued_the_certificate(
        pki: CA, ca_url: str, second_ca: tuple[CA, str], tmp_path: Path) -> None:
    other, other_url = second_ca
    agent = new_agent(pki, ca_url, tmp_path / "agent")
    _add_server(agent, other_url, other.add_principal(agent.principal), cost=1,
                root=other.dir / "certs" / "root.pem")

    first = agent.pulse()
    from_b = action_for(first, "only-b")
    assert from_b["outcome"] == "done", from_b
    thumbprint = str(from_b["new_thumbprint"])
    record = one([c for c in agent.certs() if c["thumbprint"] == thumbprint], "the only-b certificate")
    assert record["policy_url"] == other_url  # recorded at install: the server that issued it
    assert one([c for c in agent.certs() if c["template_name"] == "machine"], "machine")["policy_url"] == ca_url

    serial = record["serial"]
    other.cli("revoke", serial, "--reason", "keyCompromise")
    second = agent.pulse()
    again = action_for(second, "only-b")
    # The revocation was seen (asked of the second CA): a new request replaces the revoked one.
    assert (again["rule"], again["outcome"]) == ("6b:missing", "done"), again
    assert again["replaces"] == [thumbprint]
    assert thumbprint in agent.run("agent", "status", "--json").stdout


# -- D5: local commands need no credential ---------------------------------------------------------------

def test_local_commands_work_without_a_readable_credential(pki: CA, ca_url: str, tmp_path: Path) -> None:
    agent = new_agent(pki, ca_url, tmp_path / "agent")
    agent.pulse()
    machine = agent.current("machine")["thumbprint"]
    (agent.dir / "credential").rename(agent.dir / "credential.away")

    assert [c["thumbprint"] for c in agent.certs()] == [machine]
    shown = json.loads(agent.run("cert", "show", machine[:10], "--json").stdout)
    assert shown["thumbprint"] == machine
    status = agent.status()
    assert [c["thumbprint"] for c in status["certificates"]] == [machine]
    assert status["certificates"][0]["renewal_time"] is not None  # from the cached policy
    exported = tmp_path / "machine.pem"
    agent.run("cert", "export", machine, "--pem", str(exported))
    assert load_cert(exported.read_text()).subject.rfc4514_string() == f"CN={agent.principal}"
    agent.run("task", "list")
    agent.run("cert", "delete", machine)
    assert agent.certs(all_=True) == []

    # What needs the CA says so in one line.
    refused = agent.run("agent", "pulse", check=False)
    assert "cannot read the agent credential" in one_line_error(refused, "unauthenticated")
