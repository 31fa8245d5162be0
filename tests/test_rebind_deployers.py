"""Deployer plugins and the TLS probe, against real files and real servers.

nginx and haproxy run as children of the test on loopback high ports, each with its own
configuration, pid file and sockets under ``tmp_path``; they are stopped by their own PID. The
certificates come from a small CA made here (root -> intermediate -> leaf): deployers only need
PEM material, and a chain makes ``fullchain`` and ``combined`` worth checking.
"""

from __future__ import annotations

import grp
import os
import socket
import stat
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.serialization import pkcs12

from certpulse.errors import Reason, Refusal
from certpulse.pki.certs import thumbprint
from certpulse.rebind.deployers import Deployer, DeployFailed, Material, get_deployer, load_deployers
from certpulse.rebind.deployers.haproxy import RuntimeApi
from certpulse.rebind.probe import HANDSHAKE, UNREACHABLE, ProbeTarget, parse_probe, probe, settled_probe
from pki_factory import Authority
from services import NGINX, Haproxy, Nginx, TlsServer, served, wait_until
from support import free_port

# -- certificates ---------------------------------------------------------------------------------

def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


class Issuer:
    """Root and intermediate; :meth:`issue` makes a leaf (for ``localhost``) with its key and chain."""

    def __init__(self) -> None:
        self.root = Authority.root("Test Root")
        self.sub = self.root.subordinate("Test Issuing")

    def issue(self, cn: str) -> Material:
        leaf = self.sub.issue(cn, sans=["localhost"])
        return Material(leaf.thumbprint, leaf.pem.encode(), _pem(self.sub.certificate), leaf.key_pem)


@pytest.fixture(scope="module")
def issuer() -> Issuer:
    return Issuer()


@pytest.fixture(scope="module")
def certs(issuer: Issuer) -> dict[str, Material]:
    return {name: issuer.issue(f"{name.lower()}.test") for name in "ABCD"}


def deployer(kind: str) -> Deployer:
    return get_deployer(kind)()


def other_gid() -> int:
    """A group the test may give a file: nogroup as root, else a supplementary group."""
    if os.geteuid() == 0:
        return grp.getgrnam("nogroup").gr_gid
    others = [g for g in os.getgroups() if g != os.getegid()]
    assert others, "this test needs root or a supplementary group to change a file's group"
    return others[0]


# -- the interface and discovery ------------------------------------------------------------------

def test_the_four_built_in_kinds_are_found_through_entry_points() -> None:
    kinds = load_deployers()
    assert {"files", "nginx", "haproxy", "command"} <= set(kinds)
    for kind, cls in kinds.items():
        assert cls.kind == kind and issubclass(cls, Deployer)
    with pytest.raises(Refusal) as caught:
        get_deployer("iis")
    assert caught.value.reason is Reason.INVALID_ARGUMENT
    assert "known: command, files, haproxy, nginx" in caught.value.detail


def test_a_broken_plugin_does_not_take_the_built_in_kinds_down(monkeypatch: pytest.MonkeyPatch) -> None:
    from importlib.metadata import EntryPoint, entry_points

    from certpulse.rebind.deployers import base

    real = list(entry_points(group=base.ENTRY_POINT_GROUP))
    fake = [EntryPoint("broken", "no_such_module_here:Deployer", base.ENTRY_POINT_GROUP),
            EntryPoint("liar", "certpulse.rebind.deployers.files:FilesDeployer", base.ENTRY_POINT_GROUP)]
    monkeypatch.setattr(base, "entry_points", lambda group: [*real, *fake])
    base._discover.cache_clear()
    try:
        assert set(load_deployers()) == {"files", "nginx", "haproxy", "command"}
        with pytest.raises(Refusal, match="installed but unusable: no_such_module_here:Deployer does not load"):
            get_deployer("broken")
        with pytest.raises(Refusal, match="has kind 'files', not 'liar'"):
            get_deployer("liar")
    finally:
        base._discover.cache_clear()


def test_material_is_read_from_a_store_version_folder_and_checked(tmp_path: Path, certs: dict[str, Material]) -> None:
    a, b = certs["A"], certs["B"]
    folder = tmp_path / a.thumbprint
    folder.mkdir()
    (folder / "cert.pem").write_bytes(a.cert_pem)
    (folder / "chain.pem").write_bytes(a.chain_pem)
    (folder / "key.pem").write_bytes(a.key_pem)
    loaded = Material.from_folder(folder, a.thumbprint.lower())
    assert loaded == a
    assert "PRIVATE" not in repr(loaded)
    with pytest.raises(Refusal, match="is certificate"):
        Material.from_folder(folder, b.thumbprint)
    (folder / "key.pem").write_bytes(b.key_pem)
    with pytest.raises(Refusal, match="does not belong"):
        Material.from_folder(folder, a.thumbprint)
    (folder / "key.pem").unlink()
    with pytest.raises(Refusal, match="no private key"):
        Material.from_folder(folder, a.thumbprint)


# -- files ----------------------------------------------------------------------------------------

def test_files_writes_every_shape_atomically_with_safe_modes(tmp_path: Path, certs: dict[str, Material]) -> None:
    a = certs["A"]
    out = tmp_path / "out"
    out.mkdir()
    password = tmp_path / "p12.pass"
    password.write_text("s3cret\n")
    files = deployer("files")
    options = files.parse_options({shape: str(out / f"{shape}.pem") for shape in
                                   ("cert", "key", "chain", "fullchain", "combined", "pkcs12")}
                                  | {"pkcs12_password_file": str(password)})
    backup = files.deploy(options, a)
    assert all(snap.content is None for snap in backup.files)
    assert (out / "cert.pem").read_bytes() == a.cert_pem
    assert (out / "key.pem").read_bytes() == a.key_pem
    assert (out / "chain.pem").read_bytes() == a.chain_pem
    assert (out / "fullchain.pem").read_bytes() == a.cert_pem + a.chain_pem
    assert (out / "combined.pem").read_bytes() == a.cert_pem + a.chain_pem + a.key_pem
    key, cert, extra = pkcs12.load_key_and_certificates((out / "pkcs12.pem").read_bytes(), b"s3cret")
    assert cert is not None and thumbprint(cert) == a.thumbprint
    assert key is not None and key.public_key() == cert.public_key()
    assert [_pem(c) for c in extra] == [a.chain_pem]
    with pytest.raises(ValueError):
        pkcs12.load_key_and_certificates((out / "pkcs12.pem").read_bytes(), None)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()}
    assert modes == {"cert.pem": 0o644, "chain.pem": 0o644, "fullchain.pem": 0o644,
                     "key.pem": 0o600, "combined.pem": 0o600, "pkcs12.pem": 0o600}  # no temporary file left
    files.restore(options, backup)
    assert list(out.iterdir()) == []  # what did not exist before is gone again


def test_pkcs12_without_a_password_file_is_unencrypted(tmp_path: Path, certs: dict[str, Material]) -> None:
    files = deployer("files")
    options = files.parse_options({"pkcs12": str(tmp_path / "bundle.p12")})
    files.deploy(options, certs["A"])
    key, cert, _ = pkcs12.load_key_and_certificates((tmp_path / "bundle.p12").read_bytes(), None)
    assert key is not None and cert is not None and thumbprint(cert) == certs["A"].thumbprint


def test_owner_group_and_mode_of_an_existing_key_are_kept_across_renewals(
        tmp_path: Path, certs: dict[str, Material]) -> None:
    gid = other_gid()
    key_path = tmp_path / "web.key"
    key_path.write_bytes(b"hand-placed key\n")
    os.chown(key_path, -1, gid)
    key_path.chmod(0o640)
    files = deployer("files")
    options = files.parse_options({"key": str(key_path), "cert": str(tmp_path / "web.crt")})
    for material in (certs["A"], certs["B"]):
        with key_path.open("rb") as reader:  # a consumer reading the previous version meanwhile
            before = reader.read()
            files.deploy(options, material)
            reader.seek(0)
            assert reader.read() == before  # renamed over, never rewritten in place
        st = key_path.stat()
        assert key_path.read_bytes() == material.key_pem
        assert (stat.S_IMODE(st.st_mode), st.st_gid, st.st_uid) == (0o640, gid, os.geteuid())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["web.crt", "web.key"]


def test_an_owner_group_and_mode_named_by_the_binding_win(tmp_path: Path, certs: dict[str, Material]) -> None:
    gid = other_gid()
    path = tmp_path / "named.key"
    path.write_bytes(b"old")
    path.chmod(0o600)
    files = deployer("files")
    options = files.parse_options({"key": f"{path}::{gid}:0640"})
    files.deploy(options, certs["A"])
    st = path.stat()
    assert (stat.S_IMODE(st.st_mode), st.st_gid) == (0o640, gid)


def test_restore_puts_back_the_old_bytes_owner_and_mode(tmp_path: Path, certs: dict[str, Material]) -> None:
    gid = other_gid()
    old = tmp_path / "site.pem"
    old.write_bytes(b"the previous certificate\n")
    os.chown(old, -1, gid)
    old.chmod(0o640)
    os.utime(old, ns=(1_600_000_000_000_000_000, 1_600_000_000_000_000_000))
    files = deployer("files")
    options = files.parse_options({"fullchain": str(old), "key": str(tmp_path / "site.key")})
    backup = files.deploy(options, certs["A"])
    assert old.read_bytes() == certs["A"].fullchain_pem
    files.restore(options, backup)
    st = old.stat()
    assert old.read_bytes() == b"the previous certificate\n"
    assert (stat.S_IMODE(st.st_mode), st.st_gid, st.st_mtime_ns) == (0o640, gid, 1_600_000_000_000_000_000)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["site.pem"]  # the new key file is gone


def test_a_deploy_that_fails_half_way_puts_back_what_it_wrote(tmp_path: Path, certs: dict[str, Material]) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first = tmp_path / "a" / "cert.pem"
    first.write_bytes(b"before")
    files = deployer("files")
    options = files.parse_options({"cert": str(first), "key": str(tmp_path / "b" / "key.pem")})
    (tmp_path / "b").rmdir()  # the second write cannot happen
    with pytest.raises(DeployFailed, match="cannot write"):
        files.deploy(options, certs["A"])
    assert first.read_bytes() == b"before"
    assert os.listdir(tmp_path / "a") == ["cert.pem"]


def test_a_link_is_never_written_through(tmp_path: Path, certs: dict[str, Material]) -> None:
    target = tmp_path / "elsewhere"
    target.write_bytes(b"untouched")
    link = tmp_path / "cert.pem"
    files = deployer("files")
    options = files.parse_options({"cert": str(link)})
    link.symlink_to(target)
    with pytest.raises(DeployFailed, match="not a regular file"):
        files.deploy(options, certs["A"])
    assert target.read_bytes() == b"untouched" and link.is_symlink()
    with pytest.raises(Refusal, match="not a regular file"):
        files.parse_options({"cert": str(link)})


def test_the_reload_command_runs_without_a_shell(tmp_path: Path, certs: dict[str, Material]) -> None:
    files = deployer("files")
    marker = tmp_path / "pwned"
    options = files.parse_options({"cert": str(tmp_path / "c.pem"),
                                   "reload": f"printf '[%s]\\n' 'a; touch {marker}' '$(id)' x|y"})
    assert options["reload"][0] == "printf"
    files.deploy(options, certs["A"])
    output = files.reload(options, certs["A"])
    assert output == f"[a; touch {marker}]\n[$(id)]\n[x|y]\n"
    assert not marker.exists()


def test_a_failing_or_stuck_reload_command_raises_with_its_output(tmp_path: Path) -> None:
    files = deployer("files")
    failing = files.parse_options({"cert": str(tmp_path / "c.pem"), "reload": "sh -c 'echo broken >&2; exit 3'"})
    with pytest.raises(DeployFailed, match="exited with status 3") as caught:
        files.reload(failing, Material("", b"", b"", b""))
    assert caught.value.output == "broken\n"
    stuck = files.parse_options({"cert": str(tmp_path / "c.pem"), "reload": "sleep 30", "reload_timeout": "0.5"})
    started = time.monotonic()
    with pytest.raises(DeployFailed, match="timed out"):
        files.reload(stuck, Material("", b"", b"", b""))
    assert time.monotonic() - started < 25  # killed at its timeout, not left to sleep its 30 s


@pytest.mark.parametrize(("raw", "message"), [
    ({}, "name at least one file"),
    ({"cert": "/tmp/x.pem", "color": "blue"}, "unknown option 'color'"),
    ({"cert": "relative.pem"}, "not an absolute file path"),
    ({"cert": "/no/such/folder/x.pem"}, "does not exist"),
    ({"cert": "/tmp/x.pem:root"}, "PATH:OWNER:GROUP:MODE"),
    ({"cert": "/tmp/x.pem:root:root:0999"}, "not an octal permission"),
    ({"cert": "/tmp/x.pem:no-such-user-here::"}, "no user named"),
    ({"cert": "/tmp/x.pem::no-such-group-here:"}, "no group named"),
    ({"key": "/tmp/x.key:::0644"}, "lets every user read the private key"),
    ({"cert": "/tmp/x.pem", "fullchain": "/tmp/x.pem"}, "named twice"),
    ({"cert": "/tmp/x.pem", "pkcs12_password_file": "/tmp/p"}, "without a pkcs12 file"),
    ({"cert": "/tmp/x.pem", "reload": "echo 'unbalanced"}, "No closing quotation"),
    ({"cert": "/tmp/x.pem", "reload": "true", "reload_timeout": "forever"}, "reload_timeout must be seconds"),
])
def test_files_options_are_refused_with_one_clear_line(raw: dict[str, str], message: str) -> None:
    with pytest.raises(Refusal) as caught:
        deployer("files").parse_options(raw)
    assert caught.value.reason is Reason.INVALID_ARGUMENT
    assert message in caught.value.detail and "\n" not in caught.value.detail


def test_stored_options_are_json() -> None:
    import json

    options = deployer("files").parse_options({"key": "/tmp/x.key:0:0:0640", "reload": "systemctl reload x"})
    assert json.loads(json.dumps(options)) == options
    assert options["key"] == {"path": "/tmp/x.key", "uid": 0, "gid": 0, "mode": "0640"}


# -- nginx ----------------------------------------------------------------------------------------

@pytest.fixture
def nginx(tmp_path: Path) -> Iterator[Nginx]:
    server = Nginx(tmp_path)
    try:
        yield server
    finally:
        server.stop()


def test_nginx_serves_each_new_certificate_and_keeps_the_old_one_when_the_test_fails(
        nginx: Nginx, certs: dict[str, Material]) -> None:
    a, b, c = certs["A"], certs["B"], certs["C"]
    kind = deployer("nginx")
    options = kind.parse_options({"fullchain": str(nginx.folder / "site.crt"), "key": str(nginx.folder / "site.key"),
                                  "conf": str(nginx.conf)})
    assert options["nginx"] == NGINX
    kind.deploy(options, a)
    nginx.start()
    assert served(nginx.port) == a.thumbprint

    kind.deploy(options, b)
    output = kind.reload(options, b, old_thumbprint=a.thumbprint)
    assert "test is successful" in output
    wait_until(lambda: served(nginx.port) == b.thumbprint, 10, "nginx to serve B after the reload")

    nginx.extra.write_text("no_such_directive on;\n")  # someone broke the configuration meanwhile
    backup = kind.deploy(options, c)
    with pytest.raises(DeployFailed) as caught:
        kind.reload(options, c, old_thumbprint=b.thumbprint)
    assert 'unknown directive "no_such_directive"' in str(caught.value)
    assert "configuration file" in caught.value.output and "test failed" in caught.value.output
    kind.restore(options, backup)
    assert (nginx.folder / "site.crt").read_bytes() == b.fullchain_pem
    assert (nginx.folder / "site.key").read_bytes() == b.key_pem
    assert stat.S_IMODE((nginx.folder / "site.key").stat().st_mode) == 0o600
    time.sleep(0.5)  # were a reload under way, the new workers would be up by now
    assert served(nginx.port) == b.thumbprint
    assert nginx.proc is not None and nginx.proc.poll() is None


def test_nginx_refuses_unknown_options_and_missing_files(tmp_path: Path) -> None:
    kind = deployer("nginx")
    with pytest.raises(Refusal, match="unknown option 'reload'"):
        kind.parse_options({"fullchain": str(tmp_path / "a.pem"), "reload": "true"})
    with pytest.raises(Refusal, match="not an existing file"):
        kind.parse_options({"fullchain": str(tmp_path / "a.pem"), "conf": str(tmp_path / "missing.conf")})
    with pytest.raises(Refusal, match="not an executable file"):
        kind.parse_options({"fullchain": str(tmp_path / "a.pem"), "nginx": str(tmp_path)})


# -- haproxy --------------------------------------------------------------------------------------

@pytest.fixture
def haproxy(tmp_path: Path) -> Iterator[Haproxy]:
    server = Haproxy(tmp_path)
    try:
        yield server
    finally:
        server.stop()


def test_haproxy_takes_a_new_certificate_through_its_runtime_api_without_a_restart(
        haproxy: Haproxy, certs: dict[str, Material]) -> None:
    a, b, c, d = certs["A"], certs["B"], certs["C"], certs["D"]
    kind = deployer("haproxy")
    options = kind.parse_options({"pem": str(haproxy.pem), "stats_socket": str(haproxy.socket)})
    assert options["cert_name"] == str(haproxy.pem)
    kind.deploy(options, a)
    haproxy.start()
    assert haproxy.proc is not None
    pid = haproxy.proc.pid
    assert served(haproxy.port) == a.thumbprint

    kind.deploy(options, b)
    output = kind.reload(options, b, old_thumbprint=a.thumbprint)
    assert "Transaction created" in output and "Success!" in output
    assert served(haproxy.port) == b.thumbprint  # at once: the commit swapped it in memory
    assert haproxy.proc.poll() is None and haproxy.proc.pid == pid
    assert haproxy.pem.read_bytes() == b.combined_pem

    broken = Material(c.thumbprint, c.cert_pem, c.chain_pem, a.key_pem)  # C's certificate with A's key
    backup = kind.deploy(options, broken)
    with pytest.raises(DeployFailed) as caught:
        kind.reload(options, broken, old_thumbprint=b.thumbprint)
    assert "inconsistencies between private key and certificate" in caught.value.output
    kind.restore(options, backup)
    assert haproxy.pem.read_bytes() == b.combined_pem
    assert stat.S_IMODE(haproxy.pem.stat().st_mode) == 0o600
    assert served(haproxy.port) == b.thumbprint
    api = RuntimeApi(str(haproxy.socket))
    assert "No ongoing transaction" in api.ask(b"abort ssl cert " + str(haproxy.pem).encode() + b"\n")

    backup = kind.deploy(options, d)  # the aborted transaction is out of the way
    kind.reload(options, d, old_thumbprint=b.thumbprint)
    assert served(haproxy.port) == d.thumbprint
    assert api.loaded_thumbprint(str(haproxy.pem)) == d.thumbprint

    kind.restore(options, backup)  # committed, then rolled back (say the engine's probe failed)
    assert haproxy.pem.read_bytes() == b.combined_pem
    assert served(haproxy.port) == b.thumbprint


def test_haproxy_refusals_name_the_problem(tmp_path: Path, certs: dict[str, Material]) -> None:
    kind = deployer("haproxy")
    pem = str(tmp_path / "site.pem")
    with pytest.raises(Refusal, match="pem=PATH is required"):
        kind.parse_options({"stats_socket": "/run/haproxy/admin.sock"})
    with pytest.raises(Refusal, match="exactly one of"):
        kind.parse_options({"pem": pem})
    with pytest.raises(Refusal, match="exactly one of"):
        kind.parse_options({"pem": pem, "stats_socket": "/run/x.sock", "reload": "true"})
    with pytest.raises(Refusal, match="may hold no spaces"):
        kind.parse_options({"pem": pem, "stats_socket": "/run/x.sock", "cert_name": "a b"})
    options = kind.parse_options({"pem": pem, "stats_socket": str(tmp_path / "nobody-listens.sock")})
    with pytest.raises(DeployFailed, match="runtime API"):
        kind.reload(options, certs["A"])
    by_command = kind.parse_options({"pem": pem, "reload": "true"})
    assert kind.reload(by_command, certs["A"]) == ""


# -- command --------------------------------------------------------------------------------------

def test_command_runs_pinned_bytes_with_old_and_new_thumbprints(tmp_path: Path, certs: dict[str, Material]) -> None:
    a, b = certs["A"], certs["B"]
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(mode=0o700)
    record = tmp_path / "record"
    script = bin_dir / "rebind.sh"
    script.write_text(f"#!/bin/sh\nprintf '%s\\n' \"$@\" > {record}\n"
                      f"echo \"env $CERTPULSE_OLD_THUMBPRINT $CERTPULSE_NEW_THUMBPRINT\" >> {record}\n"
                      f"cat >> {record}\necho rebound\n")
    script.chmod(0o755)
    kind = deployer("command")
    options = kind.parse_options({"command": str(script), "args": "--site 'Default Web Site'"})
    assert len(options["sha256"]) == 64 and options["args"] == ["--site", "Default Web Site"]
    assert kind.deploy(options, b).files == ()
    assert kind.reload(options, b, old_thumbprint=a.thumbprint) == "rebound\n"
    lines = record.read_text().splitlines(keepends=True)
    assert lines[:5] == ["--site\n", "Default Web Site\n", f"{a.thumbprint}\n", f"{b.thumbprint}\n",
                         f"env {a.thumbprint} {b.thumbprint}\n"]
    assert "".join(lines[5:]).encode() == b.cert_pem

    script.write_text("#!/bin/sh\necho changed\n")  # not the pinned bytes any more
    with pytest.raises(DeployFailed, match="command-changed"):
        kind.reload(options, b, old_thumbprint=a.thumbprint)


def test_command_refuses_a_world_writable_script(tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(mode=0o700)
    script = bin_dir / "open.sh"
    script.write_text("#!/bin/sh\nexit 0\n")
    script.chmod(0o777)
    with pytest.raises(Refusal) as caught:
        deployer("command").parse_options({"command": str(script)})
    assert caught.value.reason is Reason.COMMAND_UNSAFE and "writable by group or others" in caught.value.detail
    with pytest.raises(Refusal, match="unknown option 'sha256'"):
        deployer("command").parse_options({"command": str(script), "sha256": "0" * 64})


# -- probe ----------------------------------------------------------------------------------------

@pytest.mark.parametrize(("text", "expected"), [
    ("web01.example.internal:443", ProbeTarget("web01.example.internal", 443)),
    ("127.0.0.1:8443,sni=www.example.com", ProbeTarget("127.0.0.1", 8443, "www.example.com")),
    ("[::1]:443", ProbeTarget("::1", 443)),
    ("[2001:db8::5]:9443,sni=a.test", ProbeTarget("2001:db8::5", 9443, "a.test")),
])
def test_probe_targets_parse(text: str, expected: ProbeTarget) -> None:
    assert parse_probe(text) == expected
    assert parse_probe(str(expected)) == expected


@pytest.mark.parametrize("text", ["web01", "web01:", ":443", "web01:0", "web01:70000", "::1:443", "[::1]443",
                                  "[127.0.0.1]:443", "web01:443,sni=", "web01:443,alpn=h2", "bad_name!:443",
                                  "web01:443,sni=a.test,sni=b.test"])
def test_bad_probe_targets_are_refused(text: str) -> None:
    with pytest.raises(Refusal) as caught:
        parse_probe(text)
    assert caught.value.reason is Reason.INVALID_ARGUMENT and "HOST:PORT" in caught.value.detail


def test_probe_reads_the_served_leaf_without_trusting_it(tmp_path: Path, certs: dict[str, Material]) -> None:
    server = TlsServer(tmp_path, certs["A"])
    try:
        seen = probe("127.0.0.1", server.port, sni="a.test", timeout=5)
        assert seen.ok and seen.thumbprint == certs["A"].thumbprint and seen.failure is None
        assert probe("localhost", server.port, timeout=5).thumbprint == certs["A"].thumbprint
        assert probe("127.0.0.1", server.port, timeout=5).ok
        wait_until(lambda: len(server.names) == 3, 5, "three handshakes")
        assert server.names == ["a.test", "localhost", None]  # no SNI for an IP address
    finally:
        server.close()


def test_a_settled_probe_waits_for_a_reload_to_finish_handing_over(
        tmp_path: Path, certs: dict[str, Material]) -> None:
    # Old and new workers both accepting for four connections (A B A B), then only the new one.
    server = TlsServer(tmp_path, certs["A"], certs["B"], pick=lambda n: n % 2 if n < 4 else 1)
    target = ProbeTarget("127.0.0.1", server.port, None)
    try:
        seen = settled_probe(target, window=10, wanted=certs["B"].thumbprint)
        # The first B (connection 1) is not enough: B three times in a row is (connections 3, 4, 5).
        assert seen.thumbprint == certs["B"].thumbprint and server.connections == 6
    finally:
        server.close()


def test_a_settled_probe_without_a_wanted_answer_takes_three_that_agree(
        tmp_path: Path, certs: dict[str, Material]) -> None:
    server = TlsServer(tmp_path, certs["A"], certs["B"], pick=lambda n: 0 if n < 2 else 1)
    try:
        seen = settled_probe(ProbeTarget("127.0.0.1", server.port, None), window=10)
        assert seen.thumbprint == certs["B"].thumbprint and server.connections == 5  # A A B B B
    finally:
        server.close()


def test_a_settled_probe_of_an_endpoint_that_never_agrees_ends_with_its_window(
        tmp_path: Path, certs: dict[str, Material]) -> None:
    server = TlsServer(tmp_path, certs["A"], certs["B"], pick=lambda n: n % 2)  # two backends, one stale
    try:
        started = time.monotonic()
        seen = settled_probe(ProbeTarget("127.0.0.1", server.port, None), window=1.0, wanted=certs["B"].thumbprint)
        elapsed = time.monotonic() - started
        assert seen.thumbprint in (certs["A"].thumbprint, certs["B"].thumbprint)
        # It asked again and again until its window ran out (how often depends on the machine's
        # speed; that it stopped is what counts: it would otherwise go on for ever).
        assert elapsed >= 1.0 and server.connections >= 2
        assert elapsed < 30
    finally:
        server.close()


def test_probe_of_a_closed_port_is_unreachable_at_once() -> None:
    started = time.monotonic()
    result = probe("127.0.0.1", free_port(), timeout=60)
    assert result.failure == UNREACHABLE and result.thumbprint is None
    assert "refused" in (result.error or "").lower()
    assert time.monotonic() - started < 30  # at once: not after waiting out its 60 s timeout
    nameless = probe("no-such-host.invalid", 443, timeout=60)
    assert nameless.failure == UNREACHABLE and nameless.thumbprint is None


@pytest.mark.parametrize("answer", [b"HTTP/1.0 400 Bad Request\r\n\r\n", None])
def test_probe_of_a_plain_tcp_port_is_a_handshake_failure_within_the_timeout(answer: bytes | None) -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    held: list[socket.socket] = []

    def serve() -> None:
        with listener:
            conn, _ = listener.accept()
            held.append(conn)
            if answer is not None:
                conn.recv(4096)
                conn.sendall(answer)
                conn.close()

    threading.Thread(target=serve, daemon=True).start()
    started = time.monotonic()
    result = probe("127.0.0.1", port, timeout=1.5)
    elapsed = time.monotonic() - started
    for conn in held:
        conn.close()
    assert result.failure == HANDSHAKE and result.thumbprint is None, result
    assert elapsed < 30  # the peer holds the connection for ever: only the timeout ended it
    if answer is None:
        assert "did not complete a TLS handshake within 1.5 s" in (result.error or "")
    else:
        assert "TLS handshake" in (result.error or "")


def test_probe_of_a_black_hole_ends_at_the_timeout() -> None:
    started = time.monotonic()
    result = probe("192.0.2.1", 443, timeout=1.0)  # TEST-NET-1: never answers, often not even routed
    assert result.failure == UNREACHABLE
    assert time.monotonic() - started < 30  # the system's own connect timeout is minutes
