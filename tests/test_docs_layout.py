"""README "Layout" lists every module of nzgw, and nothing that is gone: a newcomer finds each
file there with one line on what it holds."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "nzgw"


def layout_modules(readme: str) -> set[str]:
    """The module paths the Layout block names (`nzgw/http/proxy.py`), from its indentation."""
    block = readme.split("## Layout\n", 1)[1].split("```", 2)[1]
    found: set[str] = set()
    folder = ""
    for line in block.splitlines():
        match = re.match(r"^  (\w+/)\s", line)  # a package: `  http/   ...`
        if match:
            folder = match.group(1)
            continue
        match = re.match(r"^  (\w+\.py)\s", line) or re.match(r"^    (\w+\.py)\s", line)
        if match:
            name = match.group(1)
            found.add(f"nzgw/{folder}{name}" if line.startswith("    ") else f"nzgw/{name}")
            if not line.startswith("    "):
                folder = ""
    return found


def source_modules() -> set[str]:
    return {str(p.relative_to(ROOT)) for p in PACKAGE.rglob("*.py") if p.name != "__init__.py"}


def test_the_readme_layout_lists_every_module() -> None:
    listed = layout_modules((ROOT / "README.md").read_text())
    modules = source_modules()
    assert sorted(modules - listed) == [], "add them to README 'Layout'"
    assert sorted(listed - modules) == [], "gone: remove them from README 'Layout'"


def test_the_layout_reader_sees_packages_and_top_level_modules() -> None:
    readme = (
        "## Layout\n\n```\nnzgw/\n  server.py    root\n  http/        app\n"
        "    app.py     dispatch\n                 more words\n  ports.py     protocols\n```\n"
    )
    assert layout_modules(readme) == {"nzgw/server.py", "nzgw/http/app.py", "nzgw/ports.py"}
