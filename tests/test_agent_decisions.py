"""A real agent against a real CA when a renewal's copied names are no longer allowed: the CA
refuses them (``name-no-longer-allowed``, audited), and the agent makes one new request from
what is its own in the same pulse, never a loop of refusals. Time moves with faketime.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from agent_support import Agent, action_for, ca_requests, new_agent
from support import CA, TEMPLATES, load_cert

WIDE = '[".example.internal", "localhost"]'


def set_webserver_names(pki: CA, directory: Path, dns: list[str]) -> None:
    """``certpulse template edit webserver`` with these allowed DNS names (the example's otherwise)."""
    text = (TEMPLATES / "webserver.toml").read_text()
    assert WIDE in text
    path = directory / "webserver-edited.toml"
    path.write_text(text.replace(WIDE, json.dumps(dns)))
    pki.cli("template", "edit", "webserver", str(path))


def audit_of(pki: CA, principal: str) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = json.loads(pki.cli("audit", "--json", "--limit", "10000").stdout)
    return [r for r in rows if r["actor"] == f"principal:{principal}"]


def manual_webserver(pki: CA, ca_url: str, directory: Path) -> tuple[Agent, dict[str, Any]]:
    set_webserver_names(pki, directory.parent, json.loads(WIDE))
    agent = new_agent(pki, ca_url, directory, "webservers")
    agent.pulse()
    out = agent.run("cert", "request", "--template", "webserver", "--san", "dns:www.example.internal", "--json")
    assert json.loads(out.stdout)["outcome"] == "done", out.stdout
    record = agent.current("webserver")
    assert record["names"] == ["www.example.internal"], record
    return agent, record


def test_names_no_longer_allowed_at_renewal_get_a_new_request_for_the_principals_own(
        pki: CA, ca_url: str, tmp_path: Path) -> None:
    agent, old = manual_webserver(pki, ca_url, tmp_path / "agent")
    set_webserver_names(pki, tmp_path, [agent.principal])  # www.example.internal no longer allowed
    refused_before = [r for r in audit_of(pki, agent.principal) if r["reason"]]

    result = agent.pulse(faketime="+75d")  # the renewal falls due after day 72
    action = action_for(result, "webserver")
    assert action["outcome"] == "done" and action["replaces"] == [old["thumbprint"]], action
    assert "name-no-longer-allowed" in action["outcome_detail"], action

    new = agent.current("webserver")
    assert new["thumbprint"] == action["new_thumbprint"] != old["thumbprint"]
    assert new["names"] == [agent.principal], new
    cert = load_cert((agent.live("webserver") / "cert.pem").read_text())
    assert cert.subject.rfc4514_string() == f"CN={agent.principal}"
    records = {c["thumbprint"]: c for c in agent.certs(all_=True)}
    assert records[old["thumbprint"]]["replaced_by"] == new["thumbprint"]

    # the refusal is audited with its reason, once; the new request was a new one, issued
    refused = [r for r in audit_of(pki, agent.principal) if r["reason"] and r not in refused_before]
    assert [(r["action"], r["reason"]) for r in refused] == [("refused", "name-no-longer-allowed")], refused
    assert "www.example.internal" in refused[0]["detail"]
    mine = [r for r in ca_requests(pki) if r["requester"] == f"principal:{agent.principal}"
            and r["template"] == "webserver"]
    newest = max(mine, key=lambda r: int(r["id"]))
    assert (newest["kind"], newest["status"], newest["names"]) == ("new", "issued", [agent.principal]), newest

    # and nothing left to do: no loop
    later = agent.pulse()
    assert [a for a in later["actions"] if a.get("template") == "webserver"] == [], later


def test_when_nothing_of_the_principals_is_allowed_either_each_pulse_tries_once(
        pki: CA, ca_url: str, tmp_path: Path) -> None:
    agent, old = manual_webserver(pki, ca_url, tmp_path / "agent")
    set_webserver_names(pki, tmp_path, ["localhost"])  # neither the old names nor the principal's
    for _ in range(2):
        before = [r for r in audit_of(pki, agent.principal) if r["reason"]]
        result = agent.pulse(faketime="+75d", ok=None)
        action = action_for(result, "webserver")
        assert action["outcome"] == "refused", action
        refused = [r for r in audit_of(pki, agent.principal) if r["reason"] and r not in before]
        # the renewal, then one new request: two refusals a pulse, never more
        assert [r["reason"] for r in sorted(refused, key=lambda r: r["id"])] == [
            "name-no-longer-allowed", "name-not-allowed"], refused
        assert agent.current("webserver")["thumbprint"] == old["thumbprint"]
    set_webserver_names(pki, tmp_path, json.loads(WIDE))
