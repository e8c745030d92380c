"""The layering rule: commands -> daemon -> features -> core, never back up."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "guardntp"

#: Layer of each top-level module or package (higher imports lower, never the reverse).
COMMANDS, DAEMON, FEATURES, CORE = 3, 2, 1, 0
#: ``_fastlane`` is the compiled implementation of the filter's packet path.
CORE_MODULES = {"filter", "responder", "verdicts", "clock", "wire", "timestamps", "netaddr",
                "_fastlane"}


def layer_of(module: str) -> int:
    top = module.split(".")[1] if module.startswith("guardntp.") else module
    if top in ("commands", "cli", "__main__"):
        return COMMANDS
    if top == "daemon":
        return DAEMON
    if top in CORE_MODULES:
        return CORE
    return FEATURES


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path, name: str) -> list[tuple[int, str]]:
    """(line, absolute module name) of every guardntp import in ``path``, anywhere in it
    (function-local imports included)."""
    tree = ast.parse(path.read_text(), str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            found.append((node.lineno, name))
    return [(line, name) for line, name in found if name.startswith("guardntp")]


MODULES = sorted(PACKAGE.rglob("*.py"))


def upward_imports(path: Path, name: str) -> list[str]:
    mine = layer_of(name)
    return [f"line {line}: {imported}" for line, imported in imported_modules(path, name)
            if imported != "guardntp" and layer_of(imported) > mine]


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_module_imports_a_higher_layer(path: Path) -> None:
    upward = upward_imports(path, module_name(path))
    assert not upward, f"{module_name(path)} imports upward: {upward}"


def test_the_checker_sees_an_upward_import_even_inside_a_function(tmp_path: Path) -> None:
    # What the old layout did: a feature importing the serve command to dodge a cycle.
    module = tmp_path / "live.py"
    module.write_text("def setup():\n    from ..commands.serve import Service\n")
    assert upward_imports(module, "guardntp.blocklist.live") == [
        "line 2: guardntp.commands.serve"]
    module.write_text("from ..daemon.service import Service\n")
    assert upward_imports(module, "guardntp.control.service") == [
        "line 1: guardntp.daemon.service"]
    module.write_text("from ..filter.pipeline import Pipeline\n")
    assert upward_imports(module, "guardntp.control.service") == []
