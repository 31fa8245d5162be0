"""``nginx``: the files, then ``nginx -t`` and, only when it passes, ``nginx -s reload``.

Options: the file options of :mod:`~certpulse.rebind.deployers.files` (usually ``fullchain`` and
``key``, plus any other shape), ``conf`` (the nginx.conf to test and reload, default nginx's own),
``nginx`` (the binary, default the one on the fixed ``PATH``, else ``/usr/sbin/nginx``) and
``reload_timeout`` (seconds for each of the two steps, default 60).

Testing first is the point: ``nginx -s reload`` with a configuration nginx cannot load only
makes the master log an error and keep its old workers, so a bad certificate would go unnoticed
until the next restart took the site down. When ``nginx -t`` fails, nginx has not re-read
anything; :meth:`restore` puts the previous files back and the running nginx goes on serving the
previous certificate.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping
from typing import Any, ClassVar

from certpulse.errors import Reason, Refusal
from certpulse.rebind.deployers.atomic import restore_files
from certpulse.rebind.deployers.base import Backup, Deployer, DeployFailed, Material
from certpulse.rebind.deployers.files import SHAPES, deploy_shapes, parse_password_file, parse_shapes, refuse_unknown
from certpulse.rebind.deployers.runner import DEFAULT_TIMEOUT, parse_timeout, run_or_fail
from certpulse.sandbox import SAFE_PATH

FALLBACK_BINARY = "/usr/sbin/nginx"


def find_nginx() -> str | None:
    """nginx on the fixed ``PATH`` (nginx lives in ``/usr/sbin``, often not on a user's PATH)."""
    found = shutil.which("nginx", path=SAFE_PATH)
    if found:
        return found
    return FALLBACK_BINARY if os.access(FALLBACK_BINARY, os.X_OK) else None


def _executable(path: str, what: str) -> str:
    if not path.startswith("/") or not os.path.isfile(path) or not os.access(path, os.X_OK):
        raise Refusal(Reason.INVALID_ARGUMENT, f"{what}: {path!r} is not an executable file (give an absolute path)")
    return path


def complaint(output: str) -> str:
    """nginx's own one-line reason: its first ``[emerg]`` line, else its last line."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    for line in lines:
        if "[emerg]" in line:
            return line.split("[emerg]", 1)[1].strip()
    return lines[-1] if lines else "no output"


class NginxDeployer(Deployer):
    """Files, then a tested graceful reload."""

    kind: ClassVar[str] = "nginx"
    summary: ClassVar[str] = "files (fullchain, key, ...), then nginx -t and nginx -s reload"
    OPTIONS: ClassVar[frozenset[str]] = frozenset({*SHAPES, "pkcs12_password_file", "conf", "nginx",
                                                   "reload_timeout"})

    def parse_options(self, raw: Mapping[str, str]) -> dict[str, Any]:
        refuse_unknown(raw, self.OPTIONS, self.kind)
        options = parse_shapes(raw, SHAPES)
        options |= parse_password_file(raw, options)
        if "nginx" in raw:
            options["nginx"] = _executable(raw["nginx"], "nginx")
        else:
            found = find_nginx()
            if found is None:
                raise Refusal(Reason.INVALID_ARGUMENT, "nginx is not installed here; give nginx=/path/to/nginx")
            options["nginx"] = found
        if "conf" in raw:
            conf = raw["conf"]
            if not conf.startswith("/") or not os.path.isfile(conf):
                raise Refusal(Reason.INVALID_ARGUMENT, f"conf: {conf!r} is not an existing file (absolute path)")
            options["conf"] = conf
        if "reload_timeout" in raw:
            options["reload_timeout"] = parse_timeout(raw["reload_timeout"], "reload_timeout")
        return options

    def deploy(self, options: Mapping[str, Any], material: Material) -> Backup:
        return deploy_shapes(options, material, SHAPES)

    def reload(self, options: Mapping[str, Any], material: Material, *, old_thumbprint: str | None = None) -> str:
        base = [options["nginx"], *(["-c", options["conf"]] if options.get("conf") else [])]
        timeout = float(options.get("reload_timeout", DEFAULT_TIMEOUT))
        try:
            tested = run_or_fail([*base, "-t"], timeout=timeout, what="nginx -t failed")
        except DeployFailed as failure:
            raise DeployFailed(f"{failure}: {complaint(failure.output)}", failure.output) from None
        reloaded = run_or_fail([*base, "-s", "reload"], timeout=timeout, what="nginx did not reload")
        return tested + reloaded

    def restore(self, options: Mapping[str, Any], backup: Backup) -> None:
        restore_files(backup.files)


__all__ = ["NginxDeployer", "find_nginx"]
