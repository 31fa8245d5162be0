"""Writing deployed files so that a consumer never reads half a file, and putting them back.

Every file is written to a temporary name in its own folder (created 0600, so a key is never
readable by others even for a moment), given its owner, group and mode, synced, renamed over the
old name, and the folder synced: a reader sees the old file or the new one, never a mix, and a
crash leaves at most a ``.name.certpulse-*.tmp`` file behind, which the next deploy removes.

Owner, group and mode of a file that already exists are kept unless the binding names them
(the requirement "owner, group and mode of deployed keys are kept across renewals"): the web
server's group that was given read access to its key by hand keeps it after every renewal.
"""

from __future__ import annotations

import contextlib
import dataclasses
import grp
import os
import pwd
import re
import secrets
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from certpulse.errors import Reason, Refusal
from certpulse.rebind.deployers.base import DeployFailed, FileSnapshot

SECRET_MODE = 0o600
PUBLIC_MODE = 0o644
_MODE = re.compile(r"^0?[0-7]{3}\Z")
_TMP_MARK = ".certpulse-"


def _invalid(detail: str) -> Refusal:
    return Refusal(Reason.INVALID_ARGUMENT, detail)


@dataclasses.dataclass(frozen=True)
class FileSpec:
    """Where one shape goes: an absolute path and, optionally, owner, group and mode to force."""

    path: str
    uid: int | None = None
    gid: int | None = None
    mode: int | None = None

    @classmethod
    def parse(cls, text: str, what: str, *, secret: bool) -> FileSpec:
        """``PATH`` or ``PATH:OWNER:GROUP:MODE`` (names or numeric ids, octal mode such as 0640;
        any of the three may be empty). A secret (a key) may not be readable by others."""
        path, uid, gid, mode = text, None, None, None
        if ":" in text:
            parts = text.rsplit(":", 3)
            if len(parts) != 4:
                raise _invalid(f"{what}={text!r}: give PATH or PATH:OWNER:GROUP:MODE (parts may be empty)")
            path, owner, group, mode_text = parts
            uid = _uid(owner, what) if owner else None
            gid = _gid(group, what) if group else None
            mode = _mode(mode_text, what) if mode_text else None
        _check_path(path, what)
        if secret and mode is not None and mode & 0o007:
            raise _invalid(f"{what}: mode {mode:04o} lets every user read the private key; use 0600 or 0640")
        return cls(path, uid, gid, mode)

    def to_json(self) -> dict[str, Any]:
        return {"path": self.path, "uid": self.uid, "gid": self.gid,
                "mode": None if self.mode is None else f"{self.mode:04o}"}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> FileSpec:
        mode = data.get("mode")
        return cls(str(data["path"]), data.get("uid"), data.get("gid"), None if mode is None else int(mode, 8))


def _uid(owner: str, what: str) -> int:
    if owner.isdigit():
        return int(owner)
    try:
        return pwd.getpwnam(owner).pw_uid
    except KeyError:
        raise _invalid(f"{what}: no user named {owner!r} on this machine") from None


def _gid(group: str, what: str) -> int:
    if group.isdigit():
        return int(group)
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        raise _invalid(f"{what}: no group named {group!r} on this machine") from None


def _mode(text: str, what: str) -> int:
    if not _MODE.match(text):
        raise _invalid(f"{what}: mode {text!r} is not an octal permission such as 0640")
    return int(text, 8)


def _check_path(path: str, what: str) -> None:
    if not path.startswith("/") or path.endswith("/") or "\0" in path or "\n" in path:
        raise _invalid(f"{what}: {path!r} is not an absolute file path")
    folder = os.path.dirname(path)
    if not os.path.isdir(folder):
        raise _invalid(f"{what}: folder {folder} does not exist")
    if os.path.islink(path) or (os.path.lexists(path) and not os.path.isfile(path)):
        raise _invalid(f"{what}: {path} exists and is not a regular file (a link or a folder)")


def check_distinct(specs: Iterable[FileSpec]) -> None:
    seen: set[str] = set()
    for spec in specs:
        real = os.path.normpath(spec.path)
        if real in seen:
            raise _invalid(f"{spec.path} is named twice: each shape needs its own file")
        seen.add(real)


# -- writing --------------------------------------------------------------------------------------

def _fsync_folder(folder: str) -> None:
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sweep(path: str) -> None:
    """Remove what an earlier, killed write of ``path`` left."""
    folder, name = os.path.split(path)
    prefix = f".{name}{_TMP_MARK}"
    with contextlib.suppress(OSError), os.scandir(folder) as entries:
        for entry in entries:
            if entry.name.startswith(prefix) and entry.name.endswith(".tmp"):
                with contextlib.suppress(OSError):
                    os.unlink(entry.path)


def write_atomic(path: str, data: bytes, *, uid: int, gid: int, mode: int,
                 times_ns: tuple[int, int] | None = None) -> None:
    """Replace ``path`` with ``data`` owned by ``uid``:``gid`` with ``mode``, atomically."""
    folder, name = os.path.split(path)
    _sweep(path)
    tmp = os.path.join(folder, f".{name}{_TMP_MARK}{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, SECRET_MODE)
    try:
        try:
            st = os.fstat(fd)
            if (st.st_uid, st.st_gid) != (uid, gid):
                os.fchown(fd, uid, gid)
            os.fchmod(fd, mode)  # after chown, which clears set-id bits
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            if times_ns is not None:
                os.utime(fd, ns=times_ns)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_folder(folder)


def deploy_files(items: Sequence[tuple[FileSpec, bytes, bool]]) -> tuple[FileSnapshot, ...]:
    """Write each ``(spec, data, secret)``; the snapshots of what was there. On a failure the
    files already written are put back and :class:`DeployFailed` says which write failed."""
    done: list[FileSnapshot] = []
    try:
        for spec, data, secret in items:
            before = FileSnapshot.take(spec.path)
            done.append(before)
            uid, gid, mode = target_stat(spec, before, secret=secret)
            try:
                write_atomic(spec.path, data, uid=uid, gid=gid, mode=mode)
            except OSError as exc:
                raise DeployFailed(f"cannot write {spec.path}: {exc.strerror or exc}") from None
    except BaseException as failure:
        try:
            restore_files(done)
        except DeployFailed as also:
            raise DeployFailed(f"{failure}; then {also}") from failure
        raise
    return tuple(done)


def target_stat(spec: FileSpec, before: FileSnapshot, *, secret: bool) -> tuple[int, int, int]:
    """Owner, group and mode for a new version of a file: what the binding names, else what the
    file has now, else the agent's own user and 0600 for secrets, 0644 for the rest."""
    if before.content is not None:
        uid, gid, mode = before.uid, before.gid, before.mode
    else:
        uid, gid, mode = os.geteuid(), os.getegid(), SECRET_MODE if secret else PUBLIC_MODE
    return (spec.uid if spec.uid is not None else uid, spec.gid if spec.gid is not None else gid,
            spec.mode if spec.mode is not None else mode)


def restore_files(snapshots: Sequence[FileSnapshot]) -> None:
    """Put every snapshot back, last written first. Raises :class:`DeployFailed` naming the paths
    that could not be restored (after trying them all)."""
    failures: list[str] = []
    for snap in reversed(snapshots):
        try:
            if snap.content is None:
                try:
                    os.unlink(snap.path)
                except FileNotFoundError:
                    continue  # never written, or its folder is gone: nothing to take back
                _fsync_folder(os.path.dirname(snap.path))
            else:
                write_atomic(snap.path, snap.content, uid=snap.uid, gid=snap.gid, mode=snap.mode,
                             times_ns=(snap.atime_ns, snap.mtime_ns))
        except OSError as exc:
            failures.append(f"{snap.path}: {exc.strerror or exc}")
    if failures:
        raise DeployFailed("could not put back " + "; ".join(failures))


__all__ = ["FileSpec", "check_distinct", "deploy_files", "restore_files", "target_stat", "write_atomic"]
