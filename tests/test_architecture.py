"""The layout docs/architecture.md describes holds in the code: dependencies flow one way."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _imports(path: Path) -> set[str]:
    """Top-level package names a module imports, wherever the import statement sits."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("package", ["strategies", "clients"])
def test_strategies_and_clients_never_import_the_runtime_or_ray(package: str) -> None:
    offenders = {
        str(p.relative_to(ROOT)): sorted(_imports(p) & {"system", "ray", "launch"})
        for p in sorted((ROOT / package).rglob("*.py"))
    }
    assert {k: v for k, v in offenders.items() if v} == {}


def test_specs_import_nothing_of_the_runtime() -> None:
    """system/specs.py is what build, hosts, server and peers share: it must not import them."""
    tree = ast.parse((ROOT / "system" / "specs.py").read_text())
    mods = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert not {m for m in mods if m.startswith("system")}
