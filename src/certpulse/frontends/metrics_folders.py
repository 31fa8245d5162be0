"""The private metrics folders of ``ca serve``: made per run, found and removed when left behind.

Without ``PROMETHEUS_MULTIPROC_DIR`` from the operator, each ``ca serve`` makes a folder of its
own under the system's temporary folder (``$TMPDIR``, else ``/tmp``) for its workers' metric
files, named ``certpulse-metrics-<pid>-<random>`` after the server's process, and removes it when
it stops. A server killed with SIGKILL (or by the kernel's OOM killer, or a power cut with a
persistent ``/tmp``) cannot, and every such kill left one behind. So at start, before making its
own, ``ca serve`` removes the folders of servers that are gone (:func:`remove_stale`):

* only folders named as above (or ``certpulse-metrics-<random>``, as older versions named them),
  that are real folders (not links) owned by the user running this server;
* only when no process they name is alive: neither the server in the name nor any worker whose
  files (``<kind>_<pid>.db``) are in it. A folder of an older version names no server: it is
  removed when it holds worker files and none of their processes is alive;
* only folders of servers in this server's PID namespace (recorded in the folder's
  :data:`OWNER_FILE`): a pid means nothing in another container sharing the temporary folder,
  and the folder of a server alive there must stay.

An operator-given ``PROMETHEUS_MULTIPROC_DIR`` is never looked at here: it is the operator's.
No prometheus_client import: it would fix its storage mode before ``ca serve`` chooses it.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import stat
import tempfile
from pathlib import Path

from certpulse.errors import Reason, Refusal

log = logging.getLogger("certpulse.serve")

PREFIX = "certpulse-metrics-"
OWNER_FILE = "server"  # "<pid> <pid namespace>" of the server that made the folder (not *.db: not a metric)
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
_NAMED = re.compile(r"certpulse-metrics-(\d+)-")
_WORKER_FILE = re.compile(r"[a-z_]+?_(\d+)\.db")


def make_folder() -> Path:
    """A fresh folder (0700) for this server's metric files, named after this process; a
    Refusal naming the folder and the reason when it cannot be made (a full or read-only disk)."""
    try:
        folder = Path(tempfile.mkdtemp(prefix=f"{PREFIX}{os.getpid()}-"))
        (folder / OWNER_FILE).write_text(f"{os.getpid()} {_pid_namespace()}\n")
        return folder
    except OSError as exc:  # gettempdir() too fails when no temporary folder is writable
        where = os.environ.get("TMPDIR") or "the temporary folder"
        raise Refusal(Reason.STORE, f"cannot make the metrics folder in {where}: {exc.strerror or exc}; "
                                    f"free space there, or set {MULTIPROC_ENV} to an existing folder") from None


def _pid_namespace() -> str:
    """This process's PID namespace ("pid:[inode]" on Linux; "-" where there is none to read)."""
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return "-"


def alive(pid: int) -> bool:
    """Whether a process with this pid exists (one of another user's counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale(parent: Path | None = None) -> list[Path]:
    """Remove the folders left by servers that are gone (see the module); returns them."""
    removed: list[Path] = []
    try:
        parent = parent or Path(tempfile.gettempdir())
        candidates = [p for p in parent.iterdir() if p.name.startswith(PREFIX)]
    except OSError as exc:
        log.warning("could not look for leftover metrics folders in %s: %s", parent or "the temporary folder", exc)
        return removed
    for folder in candidates:
        if _stale(folder):
            shutil.rmtree(folder, ignore_errors=True)
            if not folder.exists():
                removed.append(folder)
    if removed:
        log.info("removed %d metrics folder(s) left by servers that are gone: %s", len(removed),
                 ", ".join(str(p) for p in removed))
    return removed


def _stale(folder: Path) -> bool:
    try:
        info = folder.lstat()
        if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.geteuid():
            return False
        workers = {int(m.group(1)) for name in os.listdir(folder) if (m := _WORKER_FILE.fullmatch(name))}
    except (OSError, ValueError):
        return False
    named = _NAMED.match(folder.name)
    if named is not None:
        server = int(named.group(1))
        try:
            recorded = (folder / OWNER_FILE).read_text().split()
        except OSError:  # not written: made by a server that died at once, or not by one
            return False
        if recorded != [str(server), _pid_namespace()]:  # another container's, or not ours to judge
            return False
        pids = {server} | workers
    elif workers:
        pids = workers
    else:  # an older version's folder with nothing in it names no process: leave it
        return False
    return os.getpid() not in pids and not any(alive(pid) for pid in pids)


__all__ = ["PREFIX", "alive", "make_folder", "remove_stale"]
