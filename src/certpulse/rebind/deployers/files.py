"""``files``: the certificate written in the shapes a consumer reads, then an optional reload.

Options (``--opt KEY=VALUE``):

* ``cert``, ``key``, ``chain``, ``fullchain``, ``combined``, ``pkcs12`` — where each shape goes,
  as ``PATH`` or ``PATH:OWNER:GROUP:MODE`` (user and group names or numeric ids, an octal mode
  such as ``0640``; any of the three may be empty). At least one. ``combined`` is leaf + chain +
  key (haproxy's shape), ``fullchain`` leaf + chain.
* ``pkcs12_password_file`` — a file whose content (less a final newline) is the PKCS#12
  password. Without it the PKCS#12 file is **not encrypted**: only its mode protects the key.
* ``reload`` — a command line run after the files are in place, split into arguments and run
  without a shell; ``reload_timeout`` — its time limit in seconds (default 60).

A new file gets mode 0600 when it holds the key (``key``, ``combined``, ``pkcs12``) and 0644
otherwise, owned by the agent's user; an existing file keeps its owner, group and mode unless the
option names them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

from certpulse.errors import Reason, Refusal
from certpulse.rebind.deployers.atomic import FileSpec, check_distinct, deploy_files, restore_files
from certpulse.rebind.deployers.base import Backup, Deployer, DeployFailed, Material
from certpulse.rebind.deployers.runner import reload_options, run_reload

SHAPES: dict[str, bool] = {  # shape -> holds the private key
    "cert": False, "key": True, "chain": False, "fullchain": False, "combined": True, "pkcs12": True,
}
MAX_PASSWORD_FILE = 4096


def refuse_unknown(raw: Mapping[str, str], known: set[str] | frozenset[str], kind: str) -> None:
    unknown = sorted(set(raw) - set(known))
    if unknown:
        raise Refusal(Reason.INVALID_ARGUMENT, f"unknown option {unknown[0]!r} for kind {kind} "
                                               f"(known: {', '.join(sorted(known))})")


def parse_shapes(raw: Mapping[str, str], shapes: Mapping[str, bool]) -> dict[str, Any]:
    """The file options among ``shapes`` that ``raw`` names (at least one), as stored JSON."""
    specs = {shape: FileSpec.parse(raw[shape], shape, secret=secret)
             for shape, secret in shapes.items() if shape in raw}
    if not specs:
        raise Refusal(Reason.INVALID_ARGUMENT, f"name at least one file: {', '.join(shapes)}")
    check_distinct(specs.values())
    return {shape: spec.to_json() for shape, spec in specs.items()}


def parse_password_file(raw: Mapping[str, str], stored: Mapping[str, Any]) -> dict[str, Any]:
    if "pkcs12_password_file" not in raw:
        return {}
    if "pkcs12" not in stored:
        raise Refusal(Reason.INVALID_ARGUMENT, "pkcs12_password_file without a pkcs12 file")
    path = raw["pkcs12_password_file"]
    if not path.startswith("/"):
        raise Refusal(Reason.INVALID_ARGUMENT, f"pkcs12_password_file: {path!r} is not an absolute path")
    try:
        _read_password(path)
    except DeployFailed as exc:
        raise Refusal(Reason.INVALID_ARGUMENT, f"pkcs12_password_file: {exc}") from None
    return {"pkcs12_password_file": path}


def _read_password(path: str) -> bytes:
    try:
        with open(path, "rb") as stream:
            data = stream.read(MAX_PASSWORD_FILE + 1)
    except OSError as exc:
        raise DeployFailed(f"cannot read {path}: {exc.strerror or exc}") from None
    if len(data) > MAX_PASSWORD_FILE:
        raise DeployFailed(f"{path} is larger than {MAX_PASSWORD_FILE} bytes: not a password")
    password = data.removesuffix(b"\n").removesuffix(b"\r")
    if not password:
        raise DeployFailed(f"{path} is empty")
    return password


def shape_bytes(shape: str, material: Material, options: Mapping[str, Any]) -> bytes:
    if shape == "cert":
        return material.cert_pem
    if shape == "key":
        return material.key_pem
    if shape == "chain":
        return material.chain_pem
    if shape == "fullchain":
        return material.fullchain_pem
    if shape == "combined":
        return material.combined_pem
    password_file = options.get("pkcs12_password_file")
    return material.pkcs12(_read_password(password_file) if password_file else None)


def deploy_shapes(options: Mapping[str, Any], material: Material, shapes: Mapping[str, bool]) -> Backup:
    items = [(FileSpec.from_json(options[shape]), shape_bytes(shape, material, options), secret)
             for shape, secret in shapes.items() if shape in options]
    return Backup(files=deploy_files(items))


class FilesDeployer(Deployer):
    """Files in any shape, then an optional reload command."""

    kind: ClassVar[str] = "files"
    summary: ClassVar[str] = "cert/key/chain/fullchain/combined/PKCS#12 files, then an optional reload command"
    OPTIONS: ClassVar[frozenset[str]] = frozenset({*SHAPES, "pkcs12_password_file", "reload", "reload_timeout"})

    def parse_options(self, raw: Mapping[str, str]) -> dict[str, Any]:
        refuse_unknown(raw, self.OPTIONS, self.kind)
        options = parse_shapes(raw, SHAPES)
        options |= parse_password_file(raw, options)
        options |= reload_options(raw)
        return options

    def deploy(self, options: Mapping[str, Any], material: Material) -> Backup:
        return deploy_shapes(options, material, SHAPES)

    def reload(self, options: Mapping[str, Any], material: Material, *, old_thumbprint: str | None = None) -> str:
        return run_reload(options)

    def restore(self, options: Mapping[str, Any], backup: Backup) -> None:
        restore_files(backup.files)


__all__ = ["SHAPES", "FilesDeployer", "deploy_shapes", "parse_shapes", "refuse_unknown"]
