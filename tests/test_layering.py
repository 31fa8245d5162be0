"""The architecture as a test: which part of certpulse may import which, and no import cycles.

Read from the source with ``ast`` (nothing is imported), every ``import`` anywhere in a module,
including those inside functions, and ``importlib.import_module("...")`` calls. The rules:

* ``errors``, ``clock``, ``durations``, ``faults``, ``display`` are the base: anyone may import
  them, they import only each other.
* ``pki`` (pure X.509), ``sql`` (engines, transactions) and ``sandbox`` (running an operator's
  command) import only the base.
* ``ca`` (the CA core, its storage included) imports ``pki``, ``sql`` and the base: never a web
  framework, never an HTTP client, never a front end or anything of the machine side.
* ``frontends`` (the only place HTTP status codes exist) talk to ``ca``'s roles, never to its
  database (``sql``, ``ca.storage``) directly, never to the machine side.
* ``validation`` (ACME challenge validation: the one part that makes outbound connections to
  the names being validated, as Boulder's VA) imports ``pki`` and the base; ``frontends`` run it
  and hand its outcome to ``ca``, which never connects anywhere itself.
* ``machine`` (the machine-local store, the event log, locks) imports ``sql``, ``pki`` and the base.
* ``agent``, ``events`` and ``rebind`` build on ``machine``, none on another, except that the
  daemon (``agent/daemon.py``) composes events and rebind. The agent never imports the CA.
* ``cli`` may import anything; nothing imports ``cli`` but ``__main__``.
* No cycle between packages, and no cycle between modules through their top-level imports.
"""

from __future__ import annotations

import ast
import dataclasses
from collections.abc import Iterator
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
BASE = frozenset({"errors", "clock", "durations", "faults", "display"})

# part -> the project parts it may import (the base is always allowed, and a part itself)
ALLOWED: dict[str, frozenset[str]] = {
    "base": frozenset(),
    "pki": frozenset(),
    "sql": frozenset(),
    "sandbox": frozenset(),
    "ca": frozenset({"pki", "sql"}),
    "frontends": frozenset({"ca", "pki", "validation"}),
    "validation": frozenset({"pki"}),
    "machine": frozenset({"sql", "pki"}),
    "agent": frozenset({"machine", "pki", "sql"}),
    "events": frozenset({"machine", "pki", "sql", "sandbox"}),
    "rebind": frozenset({"machine", "pki", "sql", "sandbox"}),
    "cli": frozenset({"agent", "ca", "events", "frontends", "machine", "pki", "rebind", "sandbox", "sql",
                      "validation"}),
    "__main__": frozenset({"cli"}),
    "package": frozenset(),  # certpulse/__init__.py
}
# Single modules with a wider remit, and why.
EXCEPTIONS: dict[str, frozenset[str]] = {
    "certpulse.agent.daemon": frozenset({"events", "rebind"}),  # composes the three at run time
}
# Modules of an allowed part that a part must still not import.
INSIDE_ONLY: dict[str, tuple[str, ...]] = {
    "frontends": ("certpulse.ca.storage",),
    "cli": (),
}
# Third-party packages a part must never import.
FORBIDDEN_LIBRARIES: dict[str, frozenset[str]] = {
    "ca": frozenset({"fastapi", "starlette", "uvicorn", "httpx", "h11", "pydantic"}),
    "machine": frozenset({"fastapi", "starlette", "uvicorn", "httpx"}),
    "pki": frozenset({"sqlalchemy", "fastapi", "starlette", "httpx"}),
    "sql": frozenset({"fastapi", "starlette", "httpx", "cryptography"}),
    "agent": frozenset({"fastapi", "starlette", "uvicorn"}),
    "validation": frozenset({"sqlalchemy", "fastapi", "starlette", "uvicorn"}),
}


@dataclasses.dataclass(frozen=True)
class Import:
    importer: str  # dotted module name
    target: str  # dotted name as imported (a module, or a name inside one)
    line: int
    top_level: bool  # at module level (runs at import time: can make a cycle)


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted((SRC / "certpulse").rglob("*.py"))}


def part_of(name: str) -> str:
    """The architectural part a ``certpulse`` module belongs to."""
    parts = name.split(".")
    if len(parts) == 1:
        return "package"
    top = parts[1]
    return "base" if top in BASE else top


def imports_of(name: str, path: Path) -> Iterator[Import]:
    tree = ast.parse(path.read_text(), filename=str(path))
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    top_level = {id(node) for node in tree.body}
    for node in ast.walk(tree):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package[: len(package) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            targets = [f"{base}.{alias.name}" for alias in node.names] + [base]
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute | ast.Name)
              and getattr(node.func, "attr", getattr(node.func, "id", "")) in ("import_module", "__import__")
              and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            targets = [node.args[0].value]
        for target in targets:
            yield Import(name, target, getattr(node, "lineno", 0), id(node) in top_level)


def project_module(target: str, known: dict[str, Path]) -> str | None:
    """The project module an import names (``a.b.c`` may be the name ``c`` in module ``a.b``)."""
    while target:
        if target in known:
            return target
        target = target.rpartition(".")[0]
    return None


ALL = modules()
IMPORTS = [i for name, path in ALL.items() for i in imports_of(name, path)]


def test_the_rules_cover_every_part() -> None:
    assert {part_of(name) for name in ALL} <= set(ALLOWED), "a new top-level part needs its rule here"
    assert len(ALL) > 80  # the whole tree was read


def violations() -> list[str]:
    found: set[str] = set()
    for item in IMPORTS:
        if not item.target.startswith("certpulse"):
            continue
        target = project_module(item.target, ALL)
        if target is None:
            continue
        source_part, target_part = part_of(item.importer), part_of(target)
        if target_part in (source_part, "base", "package") and not (source_part == "base" and target_part == "package"):
            continue
        allowed = ALLOWED[source_part] | EXCEPTIONS.get(item.importer, frozenset())
        if target_part not in allowed:
            found.add(f"{item.importer}:{item.line} imports {target} ({source_part} -> {target_part})")
    return sorted(found)


def test_every_import_follows_the_dependency_rules() -> None:
    assert violations() == []


def test_front_ends_never_reach_into_the_cas_storage() -> None:
    """A front end asks the core's roles and maps their typed results; it never runs SQL of its
    own (the CA's tables and statements are the core's)."""
    found = [f"{i.importer}:{i.line} imports {i.target}" for i in IMPORTS
             if part_of(i.importer) in INSIDE_ONLY and any(
                 i.target == f or i.target.startswith(f + ".") for f in INSIDE_ONLY[part_of(i.importer)])]
    assert found == []


def test_no_part_imports_a_library_it_must_not() -> None:
    found = [f"{i.importer}:{i.line} imports {i.target}" for i in IMPORTS
             if i.target.split(".")[0] in FORBIDDEN_LIBRARIES.get(part_of(i.importer), frozenset())]
    assert found == []


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one node (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_no_cycle_between_parts() -> None:
    graph: dict[str, set[str]] = {}
    for item in IMPORTS:
        target = project_module(item.target, ALL) if item.target.startswith("certpulse") else None
        if target is None or item.importer in EXCEPTIONS:
            continue
        source_part, target_part = part_of(item.importer), part_of(target)
        if source_part != target_part and "package" not in (source_part, target_part):
            graph.setdefault(source_part, set()).add(target_part)
            graph.setdefault(target_part, set())
    assert _cycles(graph) == []


def test_no_cycle_between_modules_at_import_time() -> None:
    graph: dict[str, set[str]] = {name: set() for name in ALL}
    for item in IMPORTS:
        target = project_module(item.target, ALL) if item.target.startswith("certpulse") else None
        if target is not None and item.top_level and target != item.importer:
            graph[item.importer].add(target)
    assert _cycles(graph) == []


# -- the checks themselves are live ------------------------------------------------------------------

def test_the_scan_sees_every_kind_of_import() -> None:
    """Relative imports, imports inside functions and names imported from a package are all seen
    (or the rules above would pass on anything)."""
    by_module: dict[str, set[str]] = {}
    for item in IMPORTS:
        by_module.setdefault(item.importer, set()).add(item.target)
    assert "fastapi" in by_module["certpulse.frontends.http"]
    assert "uvicorn" in by_module["certpulse.cli.ca_commands"]  # imported inside ca serve
    assert "alembic.command" in by_module["certpulse.sql.db"]  # "from alembic import command", in a function
    assert "certpulse.machine.certstore.LocalStore" in by_module["certpulse.agent.config"]
    assert not any(i.top_level for i in IMPORTS if i.target == "uvicorn" and i.importer == "certpulse.cli.ca_commands")


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


@pytest.mark.parametrize(("importer", "target", "allowed"), [
    ("certpulse.agent.pulse", "certpulse.ca.service", False),
    ("certpulse.agent.pulse", "certpulse.events.tasks", False),
    ("certpulse.agent.daemon", "certpulse.events.tasks", True),
    ("certpulse.events.tasks", "certpulse.rebind.engine", False),
    ("certpulse.ca.policy", "certpulse.frontends.http", False),
    ("certpulse.frontends.http", "certpulse.sql.db", False),
    ("certpulse.machine.log", "certpulse.agent.config", False),
    ("certpulse.pki.certs", "certpulse.sql.db", False),
    ("certpulse.cli.ca_commands", "certpulse.ca.setup", True),
])
def test_the_rules_judge_an_import_as_the_docstring_says(importer: str, target: str, allowed: bool) -> None:
    global IMPORTS
    saved = IMPORTS
    IMPORTS = [Import(importer, target, 1, True)]
    try:
        assert (violations() == []) is allowed
    finally:
        IMPORTS = saved
