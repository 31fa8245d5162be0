"""Clock skew never causes re-enrollment (issue 16), through real processes: a real ``ca serve``
on loopback and agents run under ``faketime`` behind it.

The CA was set up a day ago (``ca init`` under ``faketime -1d``), as a CA in service is: its
root and issuer are long valid, so only the certificates it issues now meet the agent's lagging
clock. The CA backdates what it issues (10 minutes), so an agent 6 to 10 minutes behind holds a
valid certificate at once; an agent further behind holds one that "starts later" and says so,
and never asks again. Counts are taken at the CA.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent_support import FAKETIME, FAKETIME_HINT, Agent, issued, new_agent, one
from support import CA, CERTPULSE, TEMPLATES, serve

pytestmark = pytest.mark.skipif(FAKETIME is None, reason=FAKETIME_HINT)

LATE_TEMPLATE = """\
name = "late"
display_name = "Served by an issuer made just now (tests)"
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
group = "latecomers"
rights = ["read", "enroll", "autoenroll"]
"""


@pytest.fixture(scope="module")
def old_ca(tmp_path_factory: pytest.TempPathFactory) -> CA:
    """A SQLite CA initialised a day ago, with the machine template, and a template ``late``
    that only an issuer added just now serves."""
    directory = tmp_path_factory.mktemp("skew-ca") / "ca"
    assert FAKETIME is not None
    out = subprocess.run([FAKETIME, "-f", "-1d", *CERTPULSE, "ca", "init", "--dir", str(directory),
                          "--database", f"sqlite:///{directory.parent}/ca.db"],
                         capture_output=True, text=True, timeout=120, check=True)
    key = next(line.strip() for line in out.stdout.splitlines() if line.strip().startswith("cpa_"))
    ca = CA(directory, key, f"sqlite:///{directory.parent}/ca.db")
    ca.cli("template", "add", str(TEMPLATES / "machine.toml"))
    late = directory.parent / "late.toml"
    late.write_text(LATE_TEMPLATE)
    ca.cli("template", "add", str(late))
    ca.cli("ca", "add-issuer", "fresh", "--template", "late")
    ca.cli("ca", "set-issuer", "issuing-1", "--unserve", "late")
    return ca


@pytest.fixture(scope="module")
def plain_url(old_ca: CA) -> Iterator[str]:
    with serve(old_ca) as base:
        yield base


@pytest.fixture(scope="module")
def tls_url(old_ca: CA) -> Iterator[str]:
    """``ca serve --tls`` with the server certificate it issues itself at start (backdated too)."""
    with serve(old_ca, tls=True) as base:
        yield base


def pulses(agent: Agent, offset: str, count: int) -> list[dict[str, Any]]:
    return [agent.pulse(faketime=offset) for _ in range(count)]


def notes(result: dict[str, Any], rule: str) -> list[dict[str, Any]]:
    return [n for n in result["notes"] if n["rule"] == rule]


@pytest.mark.parametrize("offset", ["-6m", "-10m"])
def test_an_agent_minutes_behind_the_ca_enrolls_once(old_ca: CA, plain_url: str, tmp_path: Path,
                                                    offset: str) -> None:
    """The issue's case: 6 to 10 minutes behind, five pulses, one certificate."""
    agent = new_agent(old_ca, plain_url, tmp_path / "agent")
    results = pulses(agent, offset, 5)
    assert issued(old_ca, agent.principal, "machine") == {"new": 1, "renewal": 0}
    assert all(not r["actions"] for r in results[1:]), results[1:]
    assert agent.current("machine")["template_name"] == "machine"


def test_an_agent_far_behind_holds_its_certificate_and_says_why(old_ca: CA, plain_url: str,
                                                                tmp_path: Path) -> None:
    """40 minutes behind: the certificate starts about 30 minutes after this machine's clock
    even backdated; it is installed, held, never asked for again, and each pulse says why."""
    agent = new_agent(old_ca, plain_url, tmp_path / "agent")
    first, *later = pulses(agent, "-40m", 4)
    assert [(a["rule"], a["outcome"]) for a in first["actions"]] == [("6b:missing", "done")], first
    assert issued(old_ca, agent.principal, "machine") == {"new": 1, "renewal": 0}
    for result in later:
        assert result["actions"] == [] and result["outcome"] == "ok", result
        note = one(notes(result, "6b:not-yet-valid"), "not-yet-valid note")
        assert note["template"] == "machine"
        assert "after this machine's clock; check the clock" in note["detail"], note
        minutes = int(note["detail"].split(", ")[1].split(" minute")[0])
        assert 25 <= minutes <= 31, note
    text = agent.run("agent", "pulse", faketime="-40m").stdout  # said on the terminal too
    assert "pulse ok" in text and "6b:not-yet-valid machine: the certificate starts at" in text, text
    assert issued(old_ca, agent.principal, "machine") == {"new": 1, "renewal": 0}


def test_an_agent_behind_its_issuers_start_says_why_it_does_nothing(old_ca: CA, plain_url: str,
                                                                    tmp_path: Path) -> None:
    """The issuer ``fresh`` was made a moment ago; two hours behind, the agent cannot use it and
    says so (it used to answer ``ok`` with no word)."""
    agent = new_agent(old_ca, plain_url, tmp_path / "agent", "latecomers")
    result = agent.pulse(faketime="-2h")
    assert all(a.get("template") != "late" for a in result["actions"]), result
    note = one(notes(result, "6b:issuer-not-yet-valid"), "issuer-not-yet-valid note")
    assert note["template"] == "late"
    assert note["detail"].startswith("the issuing CA 'fresh' starts at "), note
    assert note["detail"].endswith("after this machine's clock; check the clock"), note
    assert issued(old_ca, agent.principal, "late") == {"new": 0, "renewal": 0}
    # On time, the same agent enrolls for it.
    assert [a["rule"] for a in agent.pulse()["actions"] if a.get("template") == "late"] == ["6b:missing"]


def test_an_agent_behind_a_tls_ca_connects_and_enrolls_once(old_ca: CA, tls_url: str, tmp_path: Path) -> None:
    """Over TLS the server's own certificate is backdated the same way: 8 minutes behind, the
    handshake succeeds and three pulses bring one certificate."""
    agent = new_agent(old_ca, tls_url, tmp_path / "agent")
    pulses(agent, "-8m", 3)
    assert issued(old_ca, agent.principal, "machine") == {"new": 1, "renewal": 0}


def test_the_skew_is_measured_shown_and_warned_of_once_per_episode(old_ca: CA, plain_url: str,
                                                                   tmp_path: Path) -> None:
    """From the CA's Date header: ``agent status`` (text and JSON), the metric, a pulse note, and
    event 1107 once per episode, for a clock behind and one ahead."""
    agent = new_agent(old_ca, plain_url, tmp_path / "agent")
    agent.set_config(clock_skew_warning="5m")  # the default, which the test helper raises
    behind = pulses(agent, "-8m", 3)
    for result in behind:
        note = one(notes(result, "clock-skew"), "clock-skew note")
        assert note["detail"].startswith("this machine's clock is 8 minutes behind the CA's"), note
    skew = agent.status()["clock_skew"]
    assert 470 <= skew["offset_seconds"] <= 500 and skew["exceeded"] is True, skew
    assert "8 minutes behind the CA's" in agent.run("agent", "status").stdout
    [metric] = [line for line in agent.run("agent", "metrics").stdout.splitlines()
                if line.startswith("certpulse_clock_skew_seconds ")]
    assert 470 <= float(metric.split()[1]) <= 500, metric
    assert [e["detail"][:49] for e in skew_events(agent)] == ["this machine's clock is 8 minutes behind the CA's"]

    on_time = agent.pulse()
    assert notes(on_time, "clock-skew") == []
    skew = agent.status()["clock_skew"]
    assert abs(skew["offset_seconds"]) <= 30 and skew["exceeded"] is False, skew
    assert len(skew_events(agent)) == 1

    ahead = agent.pulse(faketime="+8m")
    assert one(notes(ahead, "clock-skew"), "clock-skew note")["detail"].startswith(
        "this machine's clock is 8 minutes ahead of the CA's")
    assert -500 <= agent.status()["clock_skew"]["offset_seconds"] <= -470
    assert len(skew_events(agent)) == 2
    assert issued(old_ca, agent.principal, "machine") == {"new": 1, "renewal": 0}


def skew_events(agent: Agent) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = json.loads(agent.run("events", "--json", "--id", "1107").stdout)
    assert all(e["name"] == "clock-skew" for e in found), found
    return found


def test_an_agent_behind_the_servers_own_certificate_is_told_to_check_its_clock(
        old_ca: CA, tls_url: str, tmp_path: Path) -> None:
    """40 minutes behind, even the backdated TLS certificate of ``ca serve`` has not started:
    the pulse fails (exit 1) with the handshake's reason and what to do about it."""
    agent = new_agent(old_ca, tls_url, tmp_path / "agent")
    result = agent.pulse(faketime="-40m", ok=False)
    assert "certificate is not yet valid" in result["error"], result
    assert "judged by this machine's clock: check the clock" in result["error"], result
    assert issued(old_ca, agent.principal, "machine") == {"new": 0, "renewal": 0}
