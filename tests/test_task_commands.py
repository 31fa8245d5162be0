"""Checking and running a task's command (certpulse.sandbox): real files, real processes.

Scripts live in a 0700 folder under ``tmp_path``: its ancestors are root's and ``/tmp`` is
sticky, which is exactly what the ancestor rule accepts.
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import sys
import time
from pathlib import Path

import pytest

from certpulse.errors import Refusal
from certpulse.sandbox import (
    OUTPUT_CAP,
    SAFE_PATH,
    allowed_uids,
    check_command,
    prepare,
    run_command,
    task_environment,
)

ALLOWED = allowed_uids()
as_root = pytest.mark.skipif(os.geteuid() != 0, reason="changing a file's owner needs root; CI runs as root")


def script(folder: Path, name: str, body: str, mode: int = 0o700) -> Path:
    folder.mkdir(mode=0o700, exist_ok=True)
    path = folder / name
    path.write_text(body)
    path.chmod(mode)
    return path


def alive(pid: int) -> bool:
    """The process exists and is not a zombie (a container's init may be slow to reap)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except FileNotFoundError:
        return False
    return fields[0] != "Z"


def refused(path: Path) -> Refusal:
    with pytest.raises(Refusal) as caught:
        check_command(path, allowed_uids=ALLOWED)
    return caught.value


def test_a_safe_script_is_pinned_by_the_sha256_of_its_bytes(tmp_path: Path) -> None:
    path = script(tmp_path / "bin", "ok.sh", "#!/bin/sh\nexit 0\n")
    checked, digest = check_command(path, allowed_uids=ALLOWED)
    assert checked == path and checked.is_absolute()
    assert digest == hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_world_writable_script_is_refused(tmp_path: Path) -> None:
    path = script(tmp_path / "bin", "ww.sh", "#!/bin/sh\n", mode=0o777)
    path.chmod(0o777)
    error = refused(path)
    assert error.reason.value == "command-unsafe" and "writable by group or others" in error.detail


def test_a_group_writable_folder_is_refused_even_with_a_safe_script(tmp_path: Path) -> None:
    path = script(tmp_path / "bin", "ok.sh", "#!/bin/sh\n")
    (tmp_path / "bin").chmod(0o770)
    error = refused(path)
    assert error.reason.value == "command-unsafe" and f"folder {tmp_path / 'bin'}" in error.detail


def test_the_commands_own_folder_may_not_be_sticky_and_shared(tmp_path: Path) -> None:
    path = script(tmp_path / "bin", "ok.sh", "#!/bin/sh\n")
    (tmp_path / "bin").chmod(0o1777)
    assert "writable by group or others" in refused(path).detail


def test_a_shared_ancestor_is_accepted_only_with_the_sticky_bit(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    path = script(shared / "bin", "ok.sh", "#!/bin/sh\n")
    shared.chmod(0o1777)  # like /tmp: nobody can rename bin away
    check_command(path, allowed_uids=ALLOWED)
    shared.chmod(0o777)  # anyone can rename bin and put their own in its place
    assert f"folder {shared}" in refused(path).detail


def test_a_symlinked_command_is_refused(tmp_path: Path) -> None:
    target = script(tmp_path / "bin", "real.sh", "#!/bin/sh\n")
    link = tmp_path / "bin" / "link.sh"
    link.symlink_to(target)
    assert "symbolic link" in refused(link).detail


def test_a_link_on_the_way_is_followed_and_its_folder_checked(tmp_path: Path) -> None:
    target = script(tmp_path / "real", "ok.sh", "#!/bin/sh\n")
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o700)
    (shared / "app").symlink_to(tmp_path / "real")
    checked, _ = check_command(shared / "app" / "ok.sh", allowed_uids=ALLOWED)
    assert checked == shared / "app" / "ok.sh"  # registered as given; run through the same checks
    shared.chmod(0o777)  # the link itself can now be swapped, though its target is safe
    assert f"folder {shared}" in refused(shared / "app" / "ok.sh").detail
    assert target.exists()


def test_missing_folder_and_unexecutable_commands_are_refused(tmp_path: Path) -> None:
    plain = script(tmp_path / "bin", "plain.sh", "#!/bin/sh\n", mode=0o600)
    assert "not executable" in refused(plain).detail
    assert refused(tmp_path / "bin" / "absent.sh").reason.value == "not-found"
    assert "not a regular file" in refused(tmp_path / "bin").detail


@as_root
def test_a_command_or_folder_owned_by_another_user_is_refused(tmp_path: Path) -> None:
    path = script(tmp_path / "bin", "ok.sh", "#!/bin/sh\n")
    os.chown(path, 65534, 65534)
    assert "owned by uid 65534" in refused(path).detail
    os.chown(path, 0, 0)
    os.chown(tmp_path / "bin", 65534, 65534)
    assert "owned by uid 65534" in refused(path).detail


def test_a_changed_script_is_refused_and_never_run(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    path = script(tmp_path / "bin", "job.sh", "#!/bin/sh\nexit 0\n")
    _, pin = check_command(path, allowed_uids=ALLOWED)
    path.write_text(f"#!/bin/sh\ntouch {marker}\n")  # same path, same inode, new content
    result = run_command(path, pin, timeout=5)
    assert result.outcome == "refused" and result.reason == "command-changed"
    assert not marker.exists()
    with pytest.raises(Refusal) as caught:
        prepare(path, pin, allowed=ALLOWED)
    assert caught.value.reason.value == "command-changed"


def test_the_sealed_copy_holds_the_checked_bytes_whatever_the_file_becomes(tmp_path: Path) -> None:
    original = "#!/bin/sh\necho original\n"
    path = script(tmp_path / "bin", "job.sh", original)
    _, pin = check_command(path, allowed_uids=ALLOWED)
    fd = prepare(path, pin, allowed=ALLOWED)
    try:
        path.write_text("#!/bin/sh\necho swapped\n")  # after the check: what runs is the copy
        with open(f"/proc/self/fd/{fd}", "rb") as copy:
            assert copy.read() == original.encode()
        with pytest.raises(OSError):
            os.write(fd, b"x")  # read-only, and sealed against writes anyway
    finally:
        os.close(fd)


def test_arguments_stdin_and_environment_arrive_as_plain_data(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LD_PRELOAD", "/nonexistent/libevil.so")
    monkeypatch.setenv("PYTHONPATH", str(tmp_path / "evil"))
    monkeypatch.setenv("PATH", f"{tmp_path / 'evil'}:{os.environ['PATH']}")
    path = script(tmp_path / "bin", "dump.py", f"#!{sys.executable}\n"
                  "import json, os, sys\n"
                  "print(json.dumps({'argv': sys.argv, 'env': dict(os.environ), 'stdin': sys.stdin.read()}))\n")
    _, pin = check_command(path, allowed_uids=ALLOWED)
    hostile = ["$(touch /tmp/certpulse-x)", "`id`", "a\nb", "; rm -rf /", "'\""]
    result = run_command(path, pin, args=hostile, stdin=b'{"subject": "$(id)"}',
                         env=task_environment({"CERTPULSE_TASK": "t"}, home="/"), timeout=10)
    assert result.outcome == "ok", result
    seen = json.loads(result.output)
    assert seen["argv"][1:] == hostile
    assert seen["stdin"] == '{"subject": "$(id)"}'
    assert seen["env"] == {"PATH": SAFE_PATH, "LANG": "C.UTF-8", "HOME": "/", "CERTPULSE_TASK": "t"}


def test_only_certpulse_variables_can_be_added() -> None:
    with pytest.raises(ValueError):
        task_environment({"LD_PRELOAD": "x"})


def test_a_command_that_never_ends_is_killed_at_its_timeout(tmp_path: Path) -> None:
    path = script(tmp_path / "bin", "sleep.sh", "#!/bin/sh\necho started\nexec sleep 1000\n")
    _, pin = check_command(path, allowed_uids=ALLOWED)
    result = run_command(path, pin, timeout=1, kill_grace=0.5)
    assert result.outcome == "timeout" and result.output == b"started\n"
    assert 1 <= result.duration < 3  # SIGTERM ended it: no grace was needed
    assert "timed out after 1 s" in result.detail


def test_a_child_ignoring_sigterm_dies_with_its_whole_group(tmp_path: Path) -> None:
    pids = tmp_path / "pids"
    path = script(tmp_path / "bin", "stubborn.sh", f"#!/bin/sh\ntrap '' TERM\nsleep 1000 &\necho $! > {pids}\n"
                  f"echo $$ >> {pids}\nwhile :; do sleep 1; done\n")
    _, pin = check_command(path, allowed_uids=ALLOWED)
    result = run_command(path, pin, timeout=1, kill_grace=0.5)
    assert result.outcome == "timeout" and result.exit_status == -9
    assert "killed its process group" in result.detail
    assert 1.5 <= result.duration < 4  # SIGTERM ignored, SIGKILL after the grace
    recorded = [int(p) for p in pids.read_text().split()]
    assert len(recorded) == 2
    deadline = time.monotonic() + 2
    while any(alive(p) for p in recorded) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(alive(p) for p in recorded)


def test_leftovers_holding_the_output_are_killed_when_the_command_exits(tmp_path: Path) -> None:
    pid_file = tmp_path / "pid"
    path = script(tmp_path / "bin", "forks.sh", f"#!/bin/sh\nsleep 1000 &\necho $! > {pid_file}\necho done\n")
    _, pin = check_command(path, allowed_uids=ALLOWED)
    result = run_command(path, pin, timeout=30, kill_grace=0.5)
    assert result.outcome == "ok" and result.output == b"done\n"
    assert result.duration < 3  # not held for the background sleep's 1000 s
    pid = int(pid_file.read_text())
    deadline = time.monotonic() + 2
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not alive(pid)


def test_a_command_that_does_not_read_its_input_does_not_hang_us(tmp_path: Path) -> None:
    path = script(tmp_path / "bin", "deaf.sh", "#!/bin/sh\nexit 4\n")
    _, pin = check_command(path, allowed_uids=ALLOWED)
    result = run_command(path, pin, stdin=b"x" * (4 * 1024 * 1024), timeout=120)
    # It exited with its own status: the unread input did not hold us until the timeout.
    assert result.outcome == "failed" and result.exit_status == 4 and result.duration < 60
    assert result.detail == "exited with status 4"


def test_a_flood_of_output_is_capped_and_drained_in_bounded_memory(tmp_path: Path) -> None:
    path = script(tmp_path / "bin", "flood.sh", "#!/bin/sh\nhead -c 100000000 /dev/zero\necho end >&2\n")
    _, pin = check_command(path, allowed_uids=ALLOWED)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB
    result = run_command(path, pin, timeout=30)
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    assert result.outcome == "ok" and result.truncated
    assert len(result.output) == OUTPUT_CAP and result.output == b"\0" * OUTPUT_CAP
    assert grown < 16 * 1024, f"peak memory grew by {grown} KiB for 100 MB of output"


def test_a_script_is_interpreted_from_its_sealed_copy(tmp_path: Path) -> None:
    path = script(tmp_path / "bin", "who.sh", "#!/bin/sh\necho \"$0\"\n")
    _, pin = check_command(path, allowed_uids=ALLOWED)
    result = run_command(path, pin, timeout=5)
    assert result.outcome == "ok"
    assert result.output.decode().startswith("/proc/self/fd/")  # the interpreter read the copy, not the path


@pytest.mark.skipif(not Path("/bin/dash").is_file(), reason="needs dash as /bin/dash (Debian, Ubuntu)")
def test_a_binary_keeps_its_registered_path_as_argv0() -> None:
    shell, pin = check_command("/bin/dash", allowed_uids=ALLOWED)  # /bin is a link to usr/bin on Debian
    result = run_command(shell, pin, args=["-c", "cat /proc/$$/cmdline"], timeout=5)
    assert result.outcome == "ok", result
    assert result.output.split(b"\0")[:2] == [str(shell).encode(), b"-c"]
