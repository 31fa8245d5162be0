"""Who may import what, on the CA side: the CA core knows no front end, and the front ends reach
the CA's database only through the core.

The core (``certpulse.ca``) is what every front end (the HTTP API now; ACME, EST, SCEP, CMP
later) shares, so it must not depend on any of them or on an HTTP framework; a front end talks
to the core's roles and maps their typed results, and never runs SQL of its own. Checked on the
source (every import statement, including those inside functions), so a violation fails here
rather than in a review.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "certpulse"

HTTP = ("fastapi", "starlette", "httpx", "uvicorn", "h11", "pydantic")
RULES: dict[str, tuple[str, ...]] = {
    # the core: no front end, no HTTP framework, nothing of the agent's side
    "certpulse.ca": (*HTTP, "certpulse.frontends", "certpulse.cli", "certpulse.agent", "certpulse.events",
                     "certpulse.rebind", "certpulse.machine"),
    # the front ends: the core's roles, never its tables or a database engine of their own
    "certpulse.frontends": ("certpulse.sql", "certpulse.ca.storage", "certpulse.agent", "certpulse.cli"),
}


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """Every module ``path`` imports (relative imports resolved)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
            module = ".".join([*base, *([node.module] if node.module else [])])
            found.add(module)
            found.update(f"{module}.{alias.name}" for alias in node.names)
    return found


def violations(package: str, forbidden: tuple[str, ...]) -> list[str]:
    folder = SRC.joinpath(*package.split("."))
    return sorted(
        f"{module_name(path)} imports {target}"
        for path in folder.rglob("*.py")
        for target in imports(path)
        if any(target == f or target.startswith(f + ".") for f in forbidden)
    )


@pytest.mark.parametrize("package", sorted(RULES))
def test_dependency_rules(package: str) -> None:
    assert violations(package, RULES[package]) == []


def test_the_check_sees_imports() -> None:
    """The scan finds real imports, relative ones and those inside functions included (or the
    rules above would pass on anything)."""
    http = imports(PACKAGE / "frontends" / "http.py")
    assert "fastapi" in http and "certpulse.ca.setup" in http
    assert violations("certpulse.frontends", ("fastapi",))
    assert "uvicorn" in imports(PACKAGE / "cli" / "ca_commands.py")  # imported inside ca_serve
    assert "alembic.command" in imports(PACKAGE / "sql" / "db.py")  # "from alembic import command", in a function
