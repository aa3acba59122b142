"""DESIGN §3: imports go down only. Parsed from the source, so a violation fails here first."""

from __future__ import annotations

import ast
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

# Which nzgw packages each layer may import.
ALLOWED = {
    "core": {"core"},
    "ports": {"core", "ports", "config"},
    "config": {"config", "core"},  # core is pure: nzgw.core.redact for error messages
    "adapters": {"core", "ports", "config", "adapters"},
    "services": {"core", "ports", "config", "services"},
    "http": {"core", "ports", "config", "services", "http", "logs"},
    "testing": {"core", "testing", "config"},
    "server": {
        "core",
        "ports",
        "config",
        "services",
        "http",
        "adapters",
        "logs",
        "server",
        "testing",
    },
    "cli": {
        "core",
        "ports",
        "config",
        "services",
        "http",
        "adapters",
        "logs",
        "server",
        "cli",
        "testing",
    },
    "logs": {"logs", "core"},  # nzgw.core.redact on every line
}


def _layer(path: Path) -> str:
    rel = path.relative_to(ROOT)
    return rel.parts[0].removesuffix(".py") if rel.parts else ""


def _imports(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(), str(path))
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
    return found


MODULES = sorted(p for p in ROOT.rglob("*.py") if _layer(p) not in {"__init__", "__main__"})


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_go_down_only(path: Path) -> None:
    layer = _layer(path)
    assert layer in ALLOWED, f"{path}: unknown layer {layer!r}; add it to DESIGN §3 and here"
    for line, module in _imports(path):
        top, _, rest = module.partition(".")
        if top == "nzgw":
            target = rest.split(".")[0] if rest else ""
            if target in {"", "__init__"}:
                continue
            assert target in ALLOWED[layer], f"{path}:{line}: {layer} must not import nzgw.{target}"
        elif layer == "core":
            assert top not in IO_MODULES, f"{path}:{line}: nzgw.core must not import {module}"
        elif top in DRIVERS and layer not in {"adapters", "testing"}:
            raise AssertionError(f"{path}:{line}: only adapters may import {module}")


def test_the_checker_sees_violations(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text("import trio\nfrom nzgw.http import app\n")
    assert [m for _, m in _imports(bad)] == ["trio", "nzgw.http"]
