"""The command line as an operator meets it: files it writes, and how it refuses."""

from __future__ import annotations

import hashlib
import json
import stat
import subprocess
from pathlib import Path

import pytest

from support import TEMPLATES, run_cli


def _assert_one_line_error(result: subprocess.CompletedProcess[str], reason: str) -> None:
    assert result.returncode == 2, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"certpulse: error: {reason}:"), lines[0]
    assert "Traceback" not in result.stderr + result.stdout


@pytest.fixture(scope="module")
def ca_dir(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    directory = tmp_path_factory.mktemp("cli") / "ca"
    out = run_cli("ca", "init", "--dir", str(directory), "--name", "Cli Test")
    keys = [line.strip() for line in out.stdout.splitlines() if line.strip().startswith("cpa_")]
    assert len(keys) == 1
    run_cli("template", "add", str(TEMPLATES / "machine.toml"), "--dir", str(directory))
    return directory, keys[0]


def test_init_writes_keys_0600_in_a_0700_folder(ca_dir: tuple[Path, str]) -> None:
    directory, _ = ca_dir
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    assert stat.S_IMODE((directory / "keys").stat().st_mode) == 0o700
    key_files = sorted(p.name for p in (directory / "keys").iterdir())
    assert key_files == ["issuer-issuing-1.key", "kra.key", "root.key"]
    for key in (directory / "keys").iterdir():
        assert stat.S_IMODE(key.stat().st_mode) == 0o600, key
        assert key.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")


def test_admin_key_is_stored_only_as_a_hash(ca_dir: tuple[Path, str]) -> None:
    directory, key = ca_dir
    database = (directory / "ca.db").read_bytes()
    wal = directory / "ca.db-wal"
    stored = database + (wal.read_bytes() if wal.exists() else b"")
    assert key.encode() not in stored
    assert hashlib.sha256(key.encode()).hexdigest().encode() in stored


def test_no_private_key_material_is_printed(tmp_path: Path) -> None:
    out = run_cli("ca", "init", "--dir", str(tmp_path / "ca"), "--key-type", "rsa-2048")
    assert "PRIVATE KEY" not in out.stdout + out.stderr
    for key in (tmp_path / "ca" / "keys").iterdir():
        body = key.read_text().splitlines()[1]
        assert body not in out.stdout + out.stderr


def test_init_refuses_an_existing_ca_and_changes_nothing(ca_dir: tuple[Path, str]) -> None:
    directory, _ = ca_dir
    before = (directory / "keys" / "root.key").read_bytes()
    _assert_one_line_error(run_cli("ca", "init", "--dir", str(directory), check=False), "conflict")
    assert (directory / "keys" / "root.key").read_bytes() == before


def test_unknown_key_type_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    result = run_cli("ca", "init", "--dir", str(tmp_path / "ca"), "--key-type", "rsa-1024", check=False)
    _assert_one_line_error(result, "invalid-argument")
    assert not (tmp_path / "ca").exists()


def test_commands_without_a_ca_say_how_to_make_one(tmp_path: Path) -> None:
    result = run_cli("template", "list", "--dir", str(tmp_path / "none"), check=False)
    _assert_one_line_error(result, "not-found")
    assert "certpulse ca init" in result.stderr


def test_invalid_template_names_the_setting_and_stores_nothing(ca_dir: tuple[Path, str], tmp_path: Path) -> None:
    directory, _ = ca_dir
    bad = tmp_path / "bad.toml"
    bad.write_text('name = "bad"\nvalidity = "1y"\n[key]\ntypes = ["ec-p256"]\nusge = ["digital_signature"]\n')
    _assert_one_line_error(run_cli("template", "add", str(bad), "--dir", str(directory), check=False),
                           "invalid-template")
    listed = json.loads(run_cli("template", "list", "--json", "--dir", str(directory)).stdout)
    assert [t["name"] for t in listed] == ["machine"]
    result = run_cli("template", "add", str(bad), "--dir", str(directory), check=False)
    assert "key.usge" in result.stderr


def test_unreadable_template_file_is_a_clear_error(ca_dir: tuple[Path, str], tmp_path: Path) -> None:
    directory, _ = ca_dir
    result = run_cli("template", "add", str(tmp_path / "missing.toml"), "--dir", str(directory), check=False)
    _assert_one_line_error(result, "invalid-argument")


def test_duplicate_template_and_principal_are_conflicts(ca_dir: tuple[Path, str]) -> None:
    directory, _ = ca_dir
    result = run_cli("template", "add", str(TEMPLATES / "machine.toml"), "--dir", str(directory), check=False)
    _assert_one_line_error(result, "conflict")
    run_cli("principal", "add", "dup-host", "--dir", str(directory))
    _assert_one_line_error(run_cli("principal", "add", "dup-host", "--dir", str(directory), check=False), "conflict")


@pytest.mark.parametrize(
    ("args", "reason"),
    [
        (["request", "approve", "999"], "not-found"),
        (["request", "deny", "999", "--reason", "no"], "not-found"),
        (["revoke", "zz-not-hex"], "invalid-argument"),
        (["revoke", "abcdef", "--reason", "because"], "invalid-argument"),
        (["revoke", "abcdef"], "not-found"),
        (["template", "show", "nope"], "unknown-template"),
        (["template", "reenroll-all", "nope"], "unknown-template"),
        (["principal", "add", "bad name!"], "invalid-argument"),
        (["principal", "add", "u1", "--kind", "robot"], "invalid-argument"),
        (["principal", "add", "u2", "--role", "god"], "invalid-argument"),
        (["principal", "token", "nobody"], "not-found"),
        (["ca", "set-issuer", "nope", "--cost", "1"], "unknown-issuer"),
        (["ca", "add-issuer", "x", "--template", "nope"], "unknown-template"),
        (["ca", "serve", "--listen", "nonsense"], "invalid-argument"),
    ],
)
def test_refusals_are_one_line_with_their_reason(ca_dir: tuple[Path, str], args: list[str], reason: str) -> None:
    directory, _ = ca_dir
    _assert_one_line_error(run_cli(*args, "--dir", str(directory), check=False), reason)


def test_usage_errors_exit_2_without_traceback(ca_dir: tuple[Path, str]) -> None:
    directory, _ = ca_dir
    result = run_cli("request", "approve", "not-a-number", "--dir", str(directory), check=False)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr


def test_principal_token_is_one_time_and_hashed(ca_dir: tuple[Path, str]) -> None:
    directory, _ = ca_dir
    out = json.loads(run_cli("principal", "add", "tok-host", "--json", "--dir", str(directory)).stdout)
    assert out["token"].startswith("cpe_")
    stored = (directory / "ca.db").read_bytes()
    wal = directory / "ca.db-wal"
    stored += wal.read_bytes() if wal.exists() else b""
    assert out["token"].encode() not in stored


def test_a_long_table_prints_as_plain_aligned_columns(capsys: pytest.CaptureFixture[str]) -> None:
    """Past PLAIN_TABLE_ROWS rows a table skips Rich's layout: every row whole on one line, the
    columns aligned, and a control character in a value shown escaped (\\n, \\x1b) rather than sent."""
    from certpulse.cli import output

    rows = [(f"{n:040X}", "machine" if n % 2 else None, f"CN=host-{n}") for n in range(output.PLAIN_TABLE_ROWS + 1)]
    rows[7] = (rows[7][0], "web\nserver", "CN=evil\x1b]0;owned\x07")
    output.table("Certificates", ["thumbprint", "template", "subject"], rows)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "Certificates"
    assert lines[1].split() == ["thumbprint", "template", "subject"]
    assert len(lines) == 3 + len(rows)
    assert lines[3 + 1].split() == [rows[1][0], "machine", "CN=host-1"]
    assert lines[3].split() == [rows[0][0], "CN=host-0"]  # None prints as an empty cell
    assert lines[3 + 7].split() == [rows[7][0], "web\\nserver", "CN=evil\\x1b]0;owned\\x07"]
    assert len({line.index("CN=") for line in lines[3:]}) == 1  # aligned
