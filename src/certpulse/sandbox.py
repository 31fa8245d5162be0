"""The process sandbox: checking, pinning and running an operator's command safely (the seed's
"Scripting considerations"). Notification tasks run their command through it, and rebind's
deployers their reload commands.

A command runs with the agent's privileges (root, for the machine context), so whoever can change
the command, or swap it for another file, can run code as the agent. Hence:

* :func:`check_command` refuses a command that anyone but root and the agent's user could change
  or replace: the file, every folder a name is looked up in on the way to it, and every symbolic
  link followed on the way must belong to an allowed user and not be writable by group or others.
  A folder above the command's own may be writable by others only with the sticky bit (``/tmp``):
  there nobody can rename or remove an entry they do not own. The command itself must not be a
  link. Its SHA-256 is pinned at registration (the seed's "digitally signed" rule, for scripts).
* :func:`run_command` checks again, reads the file through a descriptor opened without following
  links, hashes what it read, and runs **those bytes**: they are copied into a sealed memory file
  that is executed as ``/proc/self/fd/N``. A file swapped between the check and the exec is
  therefore never run; a file whose bytes differ from the pin is refused, never run and never
  silently skipped.
* The child gets no shell, a fixed environment (nothing inherited: no ``LD_PRELOAD``, no
  ``PYTHONPATH``), its own process group, the event as JSON on standard input and a timeout that
  kills the whole group. Its output is captured up to a cap; the rest is drained and dropped, so
  a chatty or stuck command neither blocks the agent nor eats its memory (the seed's "denial of
  service potential").
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import hashlib
import os
import pwd
import selectors
import signal
import stat
import subprocess
import time
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path

from certpulse.errors import Reason, Refusal

SAFE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
OUTPUT_CAP = 64 * 1024  # bytes of output kept per run; the rest is read and dropped
DEFAULT_TIMEOUT = 60.0
KILL_GRACE = 2.0  # seconds between SIGTERM and SIGKILL, and for the pipe to close after the exit
MAX_COMMAND_BYTES = 128 * 1024 * 1024  # a command larger than this is refused (it is copied to memory)
MAX_LINK_HOPS = 40  # as the kernel's own limit on symbolic links followed in one lookup
READ_CHUNK = 256 * 1024
MFD_EXEC = 0x0010  # memfd_create: executable (kernel 6.3+; older kernels reject it and need none)


def allowed_uids() -> frozenset[int]:
    """Who may own a command and the folders on its way: root and the agent's own user."""
    return frozenset({0, os.geteuid()})


# -- checking -------------------------------------------------------------------------------------

def _unsafe(detail: str) -> Refusal:
    return Refusal(Reason.COMMAND_UNSAFE, detail)


def _mode_text(mode: int) -> str:
    return oct(stat.S_IMODE(mode))


def _check_owner(what: str, path: str, st: os.stat_result, allowed: Collection[int]) -> None:
    if st.st_uid not in allowed:
        raise _unsafe(f"{what} {path} is owned by uid {st.st_uid}, not by root or the agent's user "
                      f"(uid {', '.join(str(u) for u in sorted(allowed))})")


def _check_folder(path: str, st: os.stat_result, allowed: Collection[int], *, immediate: bool) -> None:
    """A folder a name is looked up in: nobody else may add, rename or remove entries in it. The
    sticky bit makes a shared folder safe enough above the command's own folder, not for it."""
    _check_owner("folder", path, st, allowed)
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        sticky = bool(st.st_mode & stat.S_ISVTX)
        if immediate or not sticky:
            who = "group or others" if sticky or st.st_mode & stat.S_IWOTH else "its group"
            raise _unsafe(f"folder {path} (mode {_mode_text(st.st_mode)}) is writable by {who}")


def _check_file(path: str, st: os.stat_result, allowed: Collection[int]) -> None:
    """The command itself: a regular, executable file only its owner can change."""
    if stat.S_ISLNK(st.st_mode):
        raise _unsafe(f"{path} is a symbolic link; register the file it points to")
    if not stat.S_ISREG(st.st_mode):
        raise _unsafe(f"{path} is not a regular file")
    _check_owner("command", path, st, allowed)
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise _unsafe(f"command {path} (mode {_mode_text(st.st_mode)}) is writable by group or others")
    if not st.st_mode & stat.S_IXUSR:
        raise _unsafe(f"command {path} (mode {_mode_text(st.st_mode)}) is not executable")
    if st.st_size > MAX_COMMAND_BYTES:
        raise _unsafe(f"command {path} is larger than {MAX_COMMAND_BYTES} bytes")


def _lstat(path: str, what: str) -> os.stat_result:
    try:
        return os.lstat(path)
    except FileNotFoundError:
        raise Refusal(Reason.NOT_FOUND, f"{what} {path} does not exist") from None
    except OSError as exc:
        raise _unsafe(f"cannot inspect {path}: {exc.strerror}") from None


def _walk_to_parent(path: str, allowed: Collection[int]) -> str:
    """Resolve the folders of absolute ``path`` one name at a time, checking every folder a name
    is looked up in and every link followed; the real path of the command's own folder.

    Walking the lexical path as well as the link targets matters: ``/opt/app/run.sh`` with
    ``/opt/app`` a link in a world-writable ``/opt`` is unsafe even when the link's target is not.
    """
    parts = [p for p in path.split("/") if p]
    if not parts:
        raise _unsafe(f"{path} names no file")
    current = "/"
    _check_folder(current, _lstat(current, "folder"), allowed, immediate=False)
    pending = parts[:-1]
    hops = 0
    while pending:
        name = pending.pop(0)
        if name == ".":
            continue
        if name == "..":
            current = os.path.dirname(current)
            continue
        candidate = os.path.join(current, name)
        st = _lstat(candidate, "folder")
        if stat.S_ISLNK(st.st_mode):
            hops += 1
            if hops > MAX_LINK_HOPS:
                raise _unsafe(f"too many symbolic links on the way to {path}")
            _check_owner("link", candidate, st, allowed)
            target = os.readlink(candidate)
            pending = [p for p in target.split("/") if p] + pending
            if target.startswith("/"):
                current = "/"
            continue
        if not stat.S_ISDIR(st.st_mode):
            raise _unsafe(f"{candidate} (on the way to {path}) is not a folder")
        _check_folder(candidate, st, allowed, immediate=False)
        current = candidate
    _check_folder(current, _lstat(current, "folder"), allowed, immediate=True)
    return current


def _absolute(path: str | os.PathLike[str]) -> str:
    text = os.fspath(path)
    if not text or "\0" in text:
        raise Refusal(Reason.INVALID_ARGUMENT, "the command path is empty or holds a NUL character")
    if text.endswith("/"):
        raise _unsafe(f"{text} names a folder, not a command")
    return os.path.abspath(text)


def _check_path(path: str | os.PathLike[str], allowed: Collection[int]) -> tuple[str, os.stat_result]:
    """Every rule but the content's: the absolute path and the command's ``lstat``."""
    absolute = _absolute(path)
    st = _lstat(absolute, "command")
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISREG(st.st_mode):
        _check_file(absolute, st, allowed)  # say what is wrong with the name first
    _walk_to_parent(absolute, allowed)
    st = _lstat(absolute, "command")
    _check_file(absolute, st, allowed)
    return absolute, st


def check_command(path: str | os.PathLike[str], *, allowed_uids: Collection[int]) -> tuple[Path, str]:
    """The command's absolute path and the SHA-256 of its bytes, or a :class:`Refusal` naming the
    first rule it breaks (see the module's docstring)."""
    absolute, _ = _check_path(path, allowed_uids)
    digest = hashlib.sha256()
    fd = _open_checked(absolute, allowed_uids)
    try:
        while chunk := os.read(fd, READ_CHUNK):
            digest.update(chunk)
    finally:
        os.close(fd)
    return Path(absolute), digest.hexdigest()


def _open_checked(path: str, allowed: Collection[int]) -> int:
    """Open the command without following a link and check what was opened, not what the name
    pointed to a moment earlier."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise _unsafe(f"{path} is a symbolic link; register the file it points to") from None
        if exc.errno == errno.ENOENT:
            raise Refusal(Reason.NOT_FOUND, f"command {path} does not exist") from None
        raise _unsafe(f"cannot open {path}: {exc.strerror}") from None
    try:
        _check_file(path, os.fstat(fd), allowed)
    except Refusal:
        os.close(fd)
        raise
    return fd


# -- running --------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class RunResult:
    """What one run of a command came to. ``outcome``: ok (exit 0), failed (another exit, a
    signal, or it could not start), timeout (killed at its time limit), refused (not run)."""

    outcome: str
    exit_status: int | None
    output: bytes
    truncated: bool
    detail: str
    duration: float
    reason: str | None = None  # the refusal's reason, when refused


def task_environment(extra: Mapping[str, str], *, home: str | None = None) -> dict[str, str]:
    """The whole environment of a task: fixed values and certpulse's own, nothing inherited."""
    env = {"PATH": SAFE_PATH, "LANG": "C.UTF-8", "HOME": home if home is not None else _home()}
    for key, value in extra.items():
        if not key.startswith("CERTPULSE_"):
            raise ValueError(f"{key} is not a certpulse variable")
        env[key] = value
    return env


def _home() -> str:
    """The agent user's home when it exists, else ``/``."""
    with contextlib.suppress(KeyError):
        home = pwd.getpwuid(os.geteuid()).pw_dir
        if home and os.path.isdir(home):
            return home
    return "/"


def _sealed_copy(fd: int, pin: str) -> tuple[int | None, str]:
    """Copy the open command into a sealed memory file while hashing it: (memfd, sha256), or
    (None, sha256) when the bytes do not match ``pin`` (nothing of a changed file is kept)."""
    try:
        memfd = os.memfd_create("certpulse-task", os.MFD_ALLOW_SEALING | os.MFD_CLOEXEC | MFD_EXEC)
    except OSError as exc:
        if exc.errno != errno.EINVAL:
            raise
        memfd = os.memfd_create("certpulse-task", os.MFD_ALLOW_SEALING | os.MFD_CLOEXEC)
    digest = hashlib.sha256()
    try:
        copied = 0
        while chunk := os.read(fd, READ_CHUNK):
            copied += len(chunk)
            if copied > MAX_COMMAND_BYTES:
                raise _unsafe(f"the command grew past {MAX_COMMAND_BYTES} bytes while it was read")
            digest.update(chunk)
            view = memoryview(chunk)
            while view:
                view = view[os.write(memfd, view):]
        if digest.hexdigest() != pin:
            os.close(memfd)
            return None, digest.hexdigest()
        fcntl.fcntl(memfd, fcntl.F_ADD_SEALS,
                    fcntl.F_SEAL_WRITE | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_SEAL)
        # The child gets a read-only descriptor of the sealed file, nothing more.
        readonly = os.open(f"/proc/self/fd/{memfd}", os.O_RDONLY | os.O_CLOEXEC)
        os.close(memfd)
        return readonly, digest.hexdigest()
    except BaseException:
        with contextlib.suppress(OSError):
            os.close(memfd)
        raise


def prepare(path: str | os.PathLike[str], pin: str, *, allowed: Collection[int]) -> int:
    """Check the command again and return a sealed copy of its bytes, or raise a Refusal:
    ``command-unsafe`` (or ``not-found``) when a rule is broken, ``command-changed`` when its
    bytes are not the pinned ones."""
    absolute, _ = _check_path(path, allowed)
    fd = _open_checked(absolute, allowed)
    try:
        memfd, actual = _sealed_copy(fd, pin)
    finally:
        os.close(fd)
    if memfd is None:
        raise Refusal(Reason.COMMAND_CHANGED, f"{absolute} changed since it was registered "
                      f"(SHA-256 {actual[:16]}..., pinned {pin[:16]}...); re-pin it with 'certpulse task pin'")
    return memfd


def run_command(path: str | os.PathLike[str], pin: str, *, args: Sequence[str] = (), stdin: bytes = b"",
                env: Mapping[str, str] | None = None, timeout: float = DEFAULT_TIMEOUT,
                allowed: Collection[int] | None = None, output_cap: int = OUTPUT_CAP,
                kill_grace: float = KILL_GRACE) -> RunResult:
    """Run the checked, pinned bytes of ``path`` with ``args`` (argv[0] is ``path``), ``stdin``
    and ``env`` (use :func:`task_environment`); never raises for the command's own misbehaviour."""
    started = time.monotonic()
    try:
        memfd = prepare(path, pin, allowed=allowed if allowed is not None else allowed_uids())
    except Refusal as refusal:
        return RunResult("refused", None, b"", False, refusal.detail, time.monotonic() - started,
                         reason=refusal.reason.value)
    except OSError as exc:  # no memfd_create, no /proc: nothing can be run safely here
        return RunResult("failed", None, b"", False, f"cannot prepare {path}: {exc.strerror or exc}",
                         time.monotonic() - started)
    try:
        proc = subprocess.Popen(
            [os.fspath(path), *args], executable=f"/proc/self/fd/{memfd}", pass_fds=(memfd,), close_fds=True,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd="/",
            env=dict(env) if env is not None else task_environment({}), start_new_session=True)
    except OSError as exc:
        return RunResult("failed", None, b"", False, f"cannot start {path}: {exc.strerror or exc}",
                         time.monotonic() - started)
    finally:
        os.close(memfd)
    return supervise(proc, stdin, timeout=timeout, output_cap=output_cap, kill_grace=kill_grace, started=started)


def supervise(proc: subprocess.Popen[bytes], stdin: bytes, *, timeout: float, output_cap: int = OUTPUT_CAP,
              kill_grace: float = KILL_GRACE, started: float | None = None) -> RunResult:
    """Watch a child started in a session of its own (a task's command, a binding's reload):
    feed ``stdin``, keep up to ``output_cap`` bytes of output, kill the whole group at ``timeout``."""
    return _Supervisor(proc, stdin, timeout, output_cap, kill_grace,
                       time.monotonic() if started is None else started).run()


class _Supervisor:
    """Feeds standard input, drains output, enforces the time limit and reaps the whole group,
    all in the calling thread with bounded memory and bounded time."""

    def __init__(self, proc: subprocess.Popen[bytes], stdin: bytes, timeout: float, cap: int, grace: float,
                 started: float) -> None:
        self.proc = proc
        self.pending = memoryview(stdin)
        self.cap = cap
        self.grace = grace
        self.started = started
        self.output = bytearray()
        self.truncated = False
        self.timed_out = False
        self.exited = False
        self.notes: list[str] = []
        self.timeout = timeout
        self.deadline = started + timeout
        self.phase = "running"  # running -> terminating -> killed; or exited -> draining
        self.selector = selectors.DefaultSelector()
        self.live: set[str] = set()  # what the selector still watches: out, in, exit
        self.pidfd = os.pidfd_open(proc.pid)

    def run(self) -> RunResult:
        try:
            self._register()
            while self.live:
                self._step()
        finally:
            self._close()
        return self._result()

    def _register(self) -> None:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        os.set_blocking(self.proc.stdout.fileno(), False)
        self.selector.register(self.proc.stdout.fileno(), selectors.EVENT_READ, "out")
        self.selector.register(self.pidfd, selectors.EVENT_READ, "exit")
        self.live.update({"out", "exit"})
        if self.pending:
            os.set_blocking(self.proc.stdin.fileno(), False)
            self.selector.register(self.proc.stdin.fileno(), selectors.EVENT_WRITE, "in")
            self.live.add("in")
        else:
            self._close_stdin()

    def _step(self) -> None:
        wait = self.deadline - time.monotonic()
        if wait <= 0:
            self._deadline_passed()
            return
        for key, _ in self.selector.select(wait):
            if key.data not in self.live:
                continue  # dropped by an earlier key of the same wakeup (the exit closes stdin)
            if key.data == "out":
                self._read()
            elif key.data == "in":
                self._write()
            else:
                self._leader_exited()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        try:
            chunk = os.read(self.proc.stdout.fileno(), READ_CHUNK)
        except BlockingIOError:
            return
        if not chunk:
            self._drop("out", self.proc.stdout.fileno())
            return
        room = self.cap - len(self.output)
        if room > 0:
            self.output += chunk[:room]
        if len(chunk) > room:
            self.truncated = True

    def _write(self) -> None:
        assert self.proc.stdin is not None
        try:
            written = os.write(self.proc.stdin.fileno(), self.pending[:65536])
        except BlockingIOError:
            return
        except (BrokenPipeError, ConnectionResetError):
            written = len(self.pending)  # the command does not read its input: not our problem
        self.pending = self.pending[written:]
        if not self.pending:
            self._close_stdin()

    def _close_stdin(self) -> None:
        assert self.proc.stdin is not None
        if "in" in self.live:
            self._drop("in", self.proc.stdin.fileno())
        with contextlib.suppress(OSError):
            self.proc.stdin.close()

    def _drop(self, tag: str, fd: int) -> None:
        """Stop watching ``fd`` (before it is closed, so a reused number is never confused)."""
        self.live.discard(tag)
        self.selector.unregister(fd)

    def _leader_exited(self) -> None:
        """The main process is gone (not yet reaped, so its group id cannot be reused): kill what
        it left in its group, then give the pipe a short grace to close."""
        self._drop("exit", self.pidfd)
        self.exited = True
        self._signal_group(signal.SIGKILL)
        if self.pending:
            self._close_stdin()
        if self.phase == "running" or self.phase == "terminating":
            self.phase = "draining"
            self.deadline = time.monotonic() + self.grace

    def _deadline_passed(self) -> None:
        if self.phase == "running":
            self.timed_out = True
            self.phase = "terminating"
            self._signal_group(signal.SIGTERM)
            self.deadline = time.monotonic() + self.grace
        elif self.phase == "terminating":
            self.phase = "killed"
            self._signal_group(signal.SIGKILL)
            self.deadline = time.monotonic() + self.grace
        else:
            # Killed or exited, and the pipe is still open: a process that left the group (setsid)
            # holds it. Stop waiting for it; what it writes from now on is lost.
            self.notes.append("output closed early: a process outside the task's group kept it open")
            for key in list(self.selector.get_map().values()):
                self._drop(str(key.data), key.fd)

    def _signal_group(self, sig: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, sig)

    def _close(self) -> None:
        self.selector.close()
        if not self.exited:
            self._signal_group(signal.SIGKILL)
        with contextlib.suppress(OSError):
            os.close(self.pidfd)
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=self.grace + 5)  # SIGKILLed already: only a hung kernel call delays it

    def _result(self) -> RunResult:
        status = self.proc.returncode
        duration = time.monotonic() - self.started
        notes = list(self.notes)
        if self.truncated:
            notes.append(f"output truncated to {self.cap} bytes")
        if self.timed_out:
            how = "killed" if self.phase == "killed" else "stopped"
            detail = f"timed out after {self.timeout:g} s; {how} its process group"
            return RunResult("timeout", status, bytes(self.output), self.truncated, "; ".join([detail, *notes]),
                             duration)
        if status == 0:
            return RunResult("ok", 0, bytes(self.output), self.truncated, "; ".join(notes), duration)
        detail = f"killed by signal {-status}" if status < 0 else f"exited with status {status}"
        return RunResult("failed", status, bytes(self.output), self.truncated, "; ".join([detail, *notes]),
                         duration)



__all__ = ["DEFAULT_TIMEOUT", "OUTPUT_CAP", "SAFE_PATH", "RunResult", "allowed_uids", "check_command", "prepare",
           "run_command", "task_environment"]
