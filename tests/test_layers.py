"""Imports go down only (docs/ARCHITECTURE.md, "Layers"). Parsed from the source, so a
violation fails here first. The checker itself is tested on synthetic bad modules: a rule that
can no longer fail is caught too."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent / "nzgw"

# Third-party modules that do I/O or pick an event loop; `nzgw.core` may import none of them.
IO_MODULES = {
    "trio",
    "trio_asyncio",
    "asyncio",
    "anyio",
    "quart",
    "quart_trio",
    "hypercorn",
    "httpx",
    "httpcore",
    "h11",
    "asyncpg",
    "coredis",
    "redis",
    "sqlite3",
    "socket",
    "argon2",
    "click",
    "subprocess",
    "threading",
}
# Only these may import the drivers (and the asyncio bridge).
DRIVERS = {"asyncpg", "trio_asyncio", "coredis", "redis", "httpx", "httpcore", "sqlite3"}
# Only the HTTP layer may import the web framework and the server: the data plane below it
# (services/forwarding.py) works without them (docs/ARCHITECTURE.md, "Request path").
WEB = {"quart", "quart_trio", "hypercorn", "werkzeug"}

# The composition root and the commands wire everything (but the commands).
_WIRING = {"core", "ports", "config", "services", "http", "adapters", "logs", "server", "testing"}
# Which nzgw packages each layer may import.
ALLOWED = {
    "core": {"core"},
    "ports": {"core", "ports", "config"},
    "config": {"config", "core"},  # core is pure: nzgw.core.redact for error messages
    "adapters": {"core", "ports", "config", "adapters"},
    "services": {"core", "ports", "config", "services"},
    "http": {"core", "ports", "config", "services", "http", "logs"},
    "testing": {"core", "testing", "config"},
    "server": _WIRING,
    "cli": _WIRING | {"cli"},
    "logs": {"logs", "core"},  # nzgw.core.redact on every line
}
# Names `from nzgw import ...` may take that are not a layer (package metadata).
PACKAGE_NAMES = {"__version__"}


def _layer(path: Path) -> str:
    rel = path.relative_to(ROOT)
    return rel.parts[0].removesuffix(".py") if rel.parts else ""


def _imports(source: str, filename: str = "<module>") -> list[tuple[int, str]]:
    """Every imported module, anywhere in the file (also inside functions); `from nzgw import
    x` counts as importing `nzgw.x`; a relative import is reported as `.` plus its module."""
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(source, filename)):
        if isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                found.append((node.lineno, "." * node.level + (node.module or "")))
            elif node.module == "nzgw":
                found.extend((node.lineno, f"nzgw.{alias.name}") for alias in node.names)
            elif node.module:
                found.append((node.lineno, node.module))
    return found


def violations(layer: str, source: str, filename: str = "<module>") -> list[str]:
    """What is wrong with the imports of a module of `layer` (empty: nothing)."""
    if layer not in ALLOWED:
        return [f"{filename}: unknown layer {layer!r}; add it to docs/ARCHITECTURE.md and here"]
    found: list[str] = []
    for line, module in _imports(source, filename):
        where = f"{filename}:{line}"
        top, _, rest = module.partition(".")
        if module.startswith("."):
            found.append(f"{where}: relative import {module} (write nzgw.… so it is checked)")
        elif top == "nzgw":
            target = rest.split(".")[0]
            if target in PACKAGE_NAMES or target in {"", "__init__"}:
                continue
            if target not in ALLOWED[layer]:
                found.append(f"{where}: {layer} must not import nzgw.{target}")
        elif layer == "core" and top in IO_MODULES:
            found.append(f"{where}: nzgw.core must not import {module}")
        elif top in DRIVERS and layer not in {"adapters", "testing"}:
            found.append(f"{where}: only adapters may import {module}")
        elif top in WEB and layer != "http":
            found.append(f"{where}: only nzgw.http may import {module}")
    return found


MODULES = sorted(p for p in ROOT.rglob("*.py") if _layer(p) not in {"__init__", "__main__"})


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_go_down_only(path: Path) -> None:
    assert violations(_layer(path), path.read_text(), str(path)) == []


@pytest.mark.parametrize(
    ("layer", "source", "expected"),
    [
        ("core", "import trio\n", "nzgw.core must not import trio"),
        ("core", "def f():\n    import sqlite3\n", "nzgw.core must not import sqlite3"),
        ("core", "from nzgw.http import app\n", "core must not import nzgw.http"),
        ("core", "from nzgw import services\n", "core must not import nzgw.services"),
        ("services", "import asyncpg\n", "only adapters may import asyncpg"),
        ("services", "from nzgw.adapters.redis import X\n", "must not import nzgw.adapters"),
        ("http", "import httpx\n", "only adapters may import httpx"),
        ("services", "from quart import Response\n", "only nzgw.http may import quart"),
        ("server", "import hypercorn.trio\n", "only nzgw.http may import hypercorn.trio"),
        ("adapters", "from nzgw.services import registry\n", "must not import nzgw.services"),
        ("ports", "from nzgw.http.gateway import RequestInfo\n", "must not import nzgw.http"),
        ("core", "from ..http import app\n", "relative import ..http"),
        ("plugins", "", "unknown layer 'plugins'"),
    ],
)
def test_the_checker_fails_on_a_bad_import(layer: str, source: str, expected: str) -> None:
    found = violations(layer, source)
    assert len(found) == 1 and expected in found[0], found


def test_the_checker_accepts_the_allowed_imports() -> None:
    source = "import attrs\nfrom nzgw.core import names\nfrom nzgw import __version__\n"
    assert violations("core", source) == []
    assert violations("adapters", "import asyncpg\nfrom nzgw.ports import Store\n") == []


# --- No import circles, also through imports inside functions --------------------------------


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _graph() -> dict[str, set[str]]:
    """nzgw module → the nzgw modules it imports (`from pkg import mod` resolved to pkg.mod)."""
    modules = {_module_name(p): p for p in ROOT.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        edges: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                edges.update(a.name for a in node.names if a.name in modules)
            elif isinstance(node, ast.ImportFrom) and node.module in modules and not node.level:
                for alias in node.names:
                    sub = f"{node.module}.{alias.name}"
                    edges.add(sub if sub in modules else node.module)
        edges.discard(name)
        graph[name] = edges
    return graph


def cycles(graph: dict[str, set[str]]) -> Iterator[list[str]]:
    """One path per import circle found by a depth-first walk (package `__init__` re-exports of
    their own submodules are not circles: a package may import what it contains)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> Iterator[list[str]]:
        state[node] = 1
        path.append(node)
        for target in sorted(graph.get(node, ())):
            if target.startswith(node + "."):
                continue  # a package importing its own submodule
            if state.get(target) == 1:
                yield [*path[path.index(target) :], target]
            elif target not in state:
                yield from visit(target)
        path.pop()
        state[node] = 2

    for start in sorted(graph):
        if start not in state:
            yield from visit(start)


def test_no_import_circles() -> None:
    assert list(cycles(_graph())) == []


def test_the_circle_finder_finds_a_circle_through_a_local_import() -> None:
    graph = {"nzgw.a.stores": {"nzgw.a.pg"}, "nzgw.a.pg": {"nzgw.a.stores"}, "nzgw.b": set()}
    assert list(cycles(graph)) == [["nzgw.a.pg", "nzgw.a.stores", "nzgw.a.pg"]]


# --- Ports: one name, one thing --------------------------------------------------------------


def _classes() -> Iterator[tuple[str, bool, str]]:
    """(class name, is a typing.Protocol, where) for every class in nzgw."""
    for path in ROOT.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ClassDef):
                bases = {ast.unparse(b).split("[")[0] for b in node.bases}
                protocol = bool(bases & {"Protocol", "typing.Protocol"})
                yield node.name, protocol, f"{path.relative_to(ROOT)}:{node.lineno}"


def test_no_protocol_shares_its_name_with_a_class() -> None:
    classes = list(_classes())
    protocols = {name: where for name, protocol, where in classes if protocol}
    clashes = [
        f"{name}: Protocol at {protocols[name]}, class at {where}"
        for name, protocol, where in classes
        if not protocol and name in protocols
    ]
    assert clashes == []


# --- No hidden state on the request path (docs/ARCHITECTURE.md, "Explicit collaborators") ------

# The layers a request runs through. Their collaborators are passed in, never reached through a
# ContextVar, a `global` or an object built at import time.
REQUEST_PATH = {"core", "ports", "adapters", "services", "http"}
# What a module may build at import time: immutable values (by the callable's last name).
IMMUTABLE_CALLS = {
    "compile",  # re.compile
    "getLogger",
    "frozenset",
    "tuple",
    "TypeVar",
    "MappingProxyType",
    "maketrans",
    "join",
    "from_bytes",
    "datetime",
    "timedelta",
    "EdgeRefusal",  # attrs.frozen values
    "Limits",
    "Budgets",
    "_unnest_insert",  # returns a str
}
# Where a module-level dict, list or set would be shared by every request (core's tables are
# constant data of a pure layer; adapters' are statement tables).
NO_MUTABLE_TABLES = {"services", "http"}
_MUTABLE_DISPLAYS = (ast.Dict, ast.List, ast.Set, ast.DictComp, ast.ListComp, ast.SetComp)


def hidden_state(layer: str, source: str, filename: str = "<module>") -> list[str]:
    """Module-level state a request could reach without it being passed in (empty: none)."""
    if layer not in REQUEST_PATH:
        return []
    found: list[str] = []
    tree = ast.parse(source, filename)
    for node in ast.walk(tree):
        where = f"{filename}:{getattr(node, 'lineno', 0)}"
        if isinstance(node, ast.Global):
            found.append(f"{where}: `global {', '.join(node.names)}`")
        elif isinstance(node, ast.Name | ast.Attribute):
            name = node.id if isinstance(node, ast.Name) else node.attr
            if name == "ContextVar":
                found.append(f"{where}: ContextVar (pass the value in)")
    for line, module in _imports(source, filename):
        if module == "contextvars":
            found.append(f"{filename}:{line}: imports contextvars (pass the value in)")
    for statement in tree.body:
        if isinstance(statement, ast.Assign):
            targets, value = [ast.unparse(t) for t in statement.targets], statement.value
        elif isinstance(statement, ast.AnnAssign) and statement.value is not None:
            targets, value = [ast.unparse(statement.target)], statement.value
        else:
            continue
        where = f"{filename}:{statement.lineno}"
        if isinstance(value, ast.Call):
            called = ast.unparse(value.func).split(".")[-1]
            if called not in IMMUTABLE_CALLS:
                found.append(f"{where}: {targets[0]} = {called}(...) built at import time")
        elif (
            layer in NO_MUTABLE_TABLES
            and isinstance(value, _MUTABLE_DISPLAYS)
            and targets != ["__all__"]
        ):
            found.append(f"{where}: {targets[0]} is a mutable module-level table")
    return found


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_hidden_state_on_the_request_path(path: Path) -> None:
    assert hidden_state(_layer(path), path.read_text(), str(path)) == []


@pytest.mark.parametrize(
    ("layer", "source", "expected"),
    [
        ("http", "import contextvars\n", "imports contextvars"),
        ("services", "from contextvars import ContextVar\n", "imports contextvars"),
        ("http", "STACK: 'ContextVar[int]' = make()\n", "built at import time"),
        ("core", "def f(v):\n    return ContextVar(v)\n", "ContextVar"),
        ("http", "METRICS = GatewayMetrics()\n", "METRICS = GatewayMetrics(...)"),
        ("adapters", "POOL = pools.Pool(size=4)\n", "POOL = Pool(...)"),
        ("services", "_seen = {}\n", "_seen is a mutable module-level table"),
        ("http", "HEADERS: list[str] = []\n", "HEADERS is a mutable module-level table"),
        ("ports", "def f():\n    global N\n    N = 1\n", "`global N`"),
    ],
)
def test_the_state_checker_fails_on_hidden_state(layer: str, source: str, expected: str) -> None:
    found = hidden_state(layer, source)
    assert len(found) == 1 and expected in found[0], found


def test_the_state_checker_accepts_constants_and_stays_off_the_wiring() -> None:
    source = (
        "import logging, re\nlog = logging.getLogger('x')\nR = re.compile('a')\n"
        "ROUTES = frozenset({1})\n__all__ = ['R']\nLIMIT = 4\n"
    )
    assert hidden_state("http", source) == []
    assert hidden_state("core", "TABLE = {'a': 1}\n") == []
    assert hidden_state("server", "GLOBAL = Thing()\n") == []
