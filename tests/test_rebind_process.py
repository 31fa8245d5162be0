"""Rebind with real services: a real CA, an agent driven through the CLI, and a real nginx and
haproxy on loopback ports. A renewal reaches them and the TLS endpoint serves the new
certificate; a broken nginx configuration is rolled back (the old certificate still served) with
a "renewed but not deployed" event; a listener left on a replaced certificate is found by
``binding check``."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent_support import Agent, action_for, new_agent, one
from certpulse.rebind.deployers import Material
from services import Haproxy, Nginx, TlsServer, served, write_placeholder
from support import CA


@pytest.fixture
def nginx(tmp_path: Path) -> Iterator[Nginx]:
    """nginx serving a placeholder certificate of no CA until a binding deploys a real one."""
    server = start_nginx(tmp_path / "nginx")
    try:
        yield server
    finally:
        server.stop()


def start_nginx(folder: Path) -> Nginx:
    folder.mkdir()
    server = Nginx(folder)
    write_placeholder(server.cert_file, server.key_file)
    server.start()
    return server


def bind(agent: Agent, nginx: Nginx, *extra: str) -> None:
    agent.run("binding", "add", "web", "--template", "machine", "--kind", "nginx",
              "--opt", f"fullchain={nginx.cert_file}", "--opt", f"key={nginx.key_file}", "--opt", f"conf={nginx.conf}",
              "--probe", f"127.0.0.1:{nginx.port},sni=localhost", *extra)


def binding(agent: Agent) -> dict[str, Any]:
    return one(json.loads(agent.run("binding", "list", "--json").stdout), "binding")


def events(agent: Agent, *args: str) -> list[dict[str, Any]]:
    data: list[dict[str, Any]] = json.loads(agent.run("events", "--json", *args).stdout)
    return data


def test_a_renewal_reaches_nginx_and_the_endpoint_serves_the_new_certificate(
        pki: CA, ca_url: str, tmp_path: Path, nginx: Nginx) -> None:
    agent = new_agent(pki, ca_url, tmp_path / "agent")
    old = action_for(agent.pulse(), "machine")["new_thumbprint"]
    bind(agent, nginx)
    assert served(nginx.port) == old
    assert (binding(agent)["thumbprint"], binding(agent)["state"]) == (old, "ok")
    assert os.stat(nginx.key_file).st_mode & 0o777 == 0o600

    new = action_for(agent.pulse(faketime="+330d"), "machine")["new_thumbprint"]
    assert served(nginx.port) == new  # rebound during the one-shot pulse, nginx reloaded, probed
    record = binding(agent)
    assert (record["thumbprint"], record["target"], record["state"]) == (new, None, "ok")
    assert os.stat(nginx.key_file).st_mode & 0o777 == 0o600
    # The old certificate was archived only once nginx no longer served it.
    ids = [(e["id"], (e["old"] or {}).get("thumbprint")) for e in events(agent)]
    assert ids.index((1001, old)) < ids.index((1005, old))
    checked = json.loads(agent.run("binding", "check", "--json").stdout)
    assert [(c["verdict"], c["served"], c["newest"]) for c in checked] == [("ok", new, new)]


def test_a_broken_nginx_configuration_is_rolled_back_and_reported(
        pki: CA, ca_url: str, tmp_path: Path, nginx: Nginx) -> None:
    agent = new_agent(pki, ca_url, tmp_path / "agent")
    old = action_for(agent.pulse(), "machine")["new_thumbprint"]
    bind(agent, nginx)
    before = (nginx.cert_file.read_bytes(), nginx.key_file.read_bytes())
    nginx.extra.write_text("this_is_not_a_directive on;\n")

    new = action_for(agent.pulse(faketime="+330d"), "machine")["new_thumbprint"]
    assert served(nginx.port) == old  # the old certificate is still served
    assert (nginx.cert_file.read_bytes(), nginx.key_file.read_bytes()) == before  # the files were put back
    record = binding(agent)
    assert (record["thumbprint"], record["target"], record["state"]) == (old, new, "failed")
    [failure] = events(agent, "--id", "1105")
    assert failure["name"] == "not-deployed" and failure["data"]["binding"] == "web"
    assert "this_is_not_a_directive" in failure["data"]["output"] + failure["detail"]
    status = json.loads(agent.run("agent", "status", "--json").stdout)
    assert one(status["bindings"], "binding")["state"] == "failed"
    assert "renewed but not deployed" in agent.run("binding", "list").stdout
    # The old certificate is kept unarchived while nginx serves it.
    certs = {c["thumbprint"]: c for c in json.loads(agent.run("cert", "list", "--all", "--json").stdout)}
    assert certs[old]["archived"] is False and certs[old]["replaced_by"] == new

    nginx.extra.write_text("# fixed\n")
    agent.run("binding", "deploy", "web")
    assert served(nginx.port) == new
    certs = {c["thumbprint"]: c for c in json.loads(agent.run("cert", "list", "--all", "--json").stdout)}
    assert certs[old]["archived"] is True


def test_binding_check_finds_a_stale_listener_a_mismatch_and_an_unreachable_one(
        pki: CA, ca_url: str, tmp_path: Path, nginx: Nginx) -> None:
    agent = new_agent(pki, ca_url, tmp_path / "agent")
    old = action_for(agent.pulse(), "machine")["new_thumbprint"]
    bind(agent, nginx, "--no-auto")
    new = action_for(agent.pulse(faketime="+330d"), "machine")["new_thumbprint"]
    # Not automatic: the files and nginx still hold the old certificate (the WinRM case).
    assert served(nginx.port) == old
    result = agent.run("binding", "check", "--json", check=False)
    assert result.returncode == 1
    [row] = json.loads(result.stdout)
    assert (row["verdict"], row["configured"], row["served"], row["newest"]) == ("stale", old, old, new)
    [drift] = events(agent, "--id", "1106")
    assert drift["data"]["verdict"] == "stale"

    # Files changed behind nginx's back, no reload: still stale until it reloads.
    shutil.copyfile(agent.dir / "store" / "certs" / new / "fullchain.pem", nginx.cert_file)
    shutil.copyfile(agent.dir / "store" / "certs" / new / "key.pem", nginx.key_file)
    assert json.loads(agent.run("binding", "check", "--json", check=False).stdout)[0]["verdict"] == "stale"

    agent.run("binding", "renew", "--old", old, "--new", new)
    assert served(nginx.port) == new
    assert json.loads(agent.run("binding", "check", "--json").stdout)[0]["verdict"] == "ok"

    other = start_nginx(tmp_path / "other")  # serves its own placeholder: nothing this store holds
    try:
        agent.run("binding", "add", "foreign", "--cert", new, "--kind", "files",
                  "--opt", f"fullchain={tmp_path / 'foreign.pem'}", "--probe", f"127.0.0.1:{other.port}",
                  check=False)
        verdicts = {r["binding"]: r["verdict"]
                    for r in json.loads(agent.run("binding", "check", "--json", check=False).stdout)}
        assert verdicts == {"web": "ok", "foreign": "mismatch"}
    finally:
        other.stop()
    nginx.stop()
    verdicts = {r["binding"]: r["verdict"]
                for r in json.loads(agent.run("binding", "check", "--json", check=False).stdout)}
    assert verdicts == {"web": "unreachable", "foreign": "unreachable"}



def test_the_daemon_rebinds_after_its_pulse_and_runs_the_drift_check(
        pki: CA, ca_url: str, tmp_path: Path, nginx: Nginx) -> None:
    agent = new_agent(pki, ca_url, tmp_path / "agent")
    old = action_for(agent.pulse(), "machine")["new_thumbprint"]
    bind(agent, nginx)
    assert binding(agent)["verdict"] is None  # never checked yet
    agent.run("agent", "run", "--pulses", "1", faketime="+330d", timeout=120)
    record = binding(agent)
    new = record["thumbprint"]
    assert new != old and served(nginx.port) == new
    assert (record["state"], record["verdict"], record["served"]) == ("ok", "ok", new)
    assert record["checked_at"] is not None


def test_the_drift_check_asks_again_while_a_reload_is_handing_over(
        pki: CA, ca_url: str, tmp_path: Path) -> None:
    # nginx starts its new worker and tells the old one to stop accepting about 100 ms later: one
    # connection in that moment still gets the replaced certificate. That is not drift.
    agent = new_agent(pki, ca_url, tmp_path / "agent")
    old = action_for(agent.pulse(), "machine")["new_thumbprint"]
    new = action_for(agent.pulse(faketime="+330d"), "machine")["new_thumbprint"]
    folder = agent.dir / "store" / "certs"
    old_worker_at = [-1]  # the connection an old worker still accepts
    server = TlsServer(tmp_path, Material.from_folder(folder / old, old), Material.from_folder(folder / new, new),
                       pick=lambda n: 0 if n == old_worker_at[0] else 1)
    try:
        agent.run("binding", "add", "web", "--cert", new, "--kind", "files",
                  "--opt", f"fullchain={tmp_path / 'web.pem'}", "--probe", f"127.0.0.1:{server.port}")
        old_worker_at[0] = server.connections
        [row] = json.loads(agent.run("binding", "check", "--json").stdout)
        assert (row["verdict"], row["served"]) == ("ok", new)
        assert server.connections >= old_worker_at[0] + 4  # the old answer, then three new ones in a row
        assert events(agent, "--id", "1106") == []
        # A listener that really stays on the old certificate is still found.
        server.pick = lambda _n: 0
        result = agent.run("binding", "check", "--json", check=False)
        assert result.returncode == 1 and json.loads(result.stdout)[0]["verdict"] == "stale"
    finally:
        server.close()


def test_a_renewal_reaches_haproxy_through_its_runtime_api(pki: CA, ca_url: str, tmp_path: Path) -> None:
    agent = new_agent(pki, ca_url, tmp_path / "agent")
    old = action_for(agent.pulse(), "machine")["new_thumbprint"]
    folder = tmp_path / "haproxy"
    folder.mkdir()
    haproxy = Haproxy(folder)
    store = agent.dir / "store" / "certs" / old
    haproxy.pem.write_bytes(b"".join((store / name).read_bytes() for name in ("fullchain.pem", "key.pem")))
    haproxy.pem.chmod(0o600)
    haproxy.start()
    try:
        pid = haproxy.proc.pid if haproxy.proc else 0
        agent.run("binding", "add", "lb", "--template", "machine", "--kind", "haproxy",
                  "--opt", f"pem={haproxy.pem}", "--opt", f"stats_socket={haproxy.socket}",
                  "--probe", f"127.0.0.1:{haproxy.port}")
        assert served(haproxy.port) == old
        new = action_for(agent.pulse(faketime="+330d"), "machine")["new_thumbprint"]
        assert served(haproxy.port) == new
        assert haproxy.proc is not None and haproxy.proc.poll() is None and haproxy.proc.pid == pid  # no restart
        assert one(json.loads(agent.run("binding", "list", "--json").stdout), "binding")["thumbprint"] == new
    finally:
        haproxy.stop()


def test_a_binding_waits_for_its_first_certificate_and_keeps_the_key_files_owner_and_mode(
        pki: CA, ca_url: str, tmp_path: Path) -> None:
    import grp

    agent = new_agent(pki, ca_url, tmp_path / "agent")
    deploy = tmp_path / "deploy"
    deploy.mkdir(mode=0o700)
    reloaded = deploy / "reloaded"
    agent.run("binding", "add", "app", "--template", "machine", "--kind", "files",
              "--opt", f"fullchain={deploy / 'fullchain.pem'}", "--opt", f"key={deploy / 'key.pem'}",
              "--opt", f"reload=touch {reloaded}")
    assert binding(agent)["state"] == "waiting" and not (deploy / "key.pem").exists()
    first = action_for(agent.pulse(), "machine")["new_thumbprint"]
    assert binding(agent)["thumbprint"] == first and reloaded.exists()
    assert (deploy / "key.pem").read_bytes() == (agent.dir / "store" / "certs" / first / "key.pem").read_bytes()
    assert os.stat(deploy / "key.pem").st_mode & 0o777 == 0o600

    nogroup = grp.getgrnam("nogroup").gr_gid
    os.chown(deploy / "key.pem", -1, nogroup)
    os.chmod(deploy / "key.pem", 0o640)
    second = action_for(agent.pulse(faketime="+330d"), "machine")["new_thumbprint"]
    assert binding(agent)["thumbprint"] == second
    info = os.stat(deploy / "key.pem")
    assert (info.st_mode & 0o777, info.st_gid) == (0o640, nogroup)
    assert (deploy / "key.pem").read_bytes() == (agent.dir / "store" / "certs" / second / "key.pem").read_bytes()


def test_binding_commands_refuse_bad_input_in_one_line(pki: CA, ca_url: str, tmp_path: Path) -> None:
    agent = new_agent(pki, ca_url, tmp_path / "agent")
    target = f"fullchain={tmp_path / 'x.pem'}"
    cases = [
        (("binding", "add", "a", "--template", "machine", "--kind", "ftp", "--opt", target), "invalid-argument"),
        (("binding", "add", "a", "--kind", "files", "--opt", target), "invalid-argument"),
        (("binding", "add", "a", "--template", "machine", "--cert", "AB", "--kind", "files", "--opt", target),
         "invalid-argument"),
        (("binding", "add", "a", "--template", "machine", "--kind", "files", "--opt", target, "--probe", "nowhere"),
         "invalid-argument"),
        (("binding", "add", "a", "--template", "machine", "--kind", "files", "--opt", "colour=blue"),
         "invalid-argument"),
        (("binding", "add", "a b", "--template", "machine", "--kind", "files", "--opt", target), "invalid-argument"),
        (("binding", "show", "missing"), "not-found"),
        (("binding", "remove", "missing"), "not-found"),
        (("binding", "renew", "--old", "ZZ", "--new", "AB"), "invalid-argument"),
    ]
    for args, reason in cases:
        result = agent.run(*args, check=False)
        assert result.returncode == 2, (args, result.stdout, result.stderr)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"certpulse: error: {reason}:"), (args, result.stderr)
    assert json.loads(agent.run("binding", "list", "--json").stdout) == []
    agent.run("binding", "add", "a", "--template", "machine", "--kind", "files", "--opt", target)
    result = agent.run("binding", "add", "a", "--template", "machine", "--kind", "files", "--opt", target,
                       check=False)
    assert result.returncode == 2 and "conflict" in result.stderr


def test_a_certificate_a_binding_serves_is_not_deleted_or_moved_away(
        pki: CA, ca_url: str, tmp_path: Path) -> None:
    agent = new_agent(pki, ca_url, tmp_path / "agent")
    thumbprint = action_for(agent.pulse(), "machine")["new_thumbprint"]
    deploy = tmp_path / "deploy"
    deploy.mkdir(mode=0o700)
    agent.run("binding", "add", "app", "--cert", thumbprint, "--kind", "files",
              "--opt", f"fullchain={deploy / 'fullchain.pem'}")
    other = new_agent(pki, ca_url, tmp_path / "other")
    for args in (("cert", "delete", thumbprint), ("cert", "move", thumbprint, "--to", str(other.dir))):
        result = agent.run(*args, check=False)
        assert result.returncode == 2 and "certpulse: error: conflict: a binding still serves" in result.stderr
    assert [c["thumbprint"] for c in agent.certs()] == [thumbprint]
    assert other.certs() == []
    agent.run("cert", "delete", thumbprint, "--force")
    assert agent.certs() == []
