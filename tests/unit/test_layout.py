"""The package's import rules (docs/architecture.md): the pipeline's stages import only the
stages before them, the processes compose, and nothing at run time needs the dev kits."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "operator" / "phabmesh"

# Part → the parts it must never import.
FORBIDDEN = {
    "identity": {"leases", "credentials", "controller", "endpoint", "admission", "gateway"},
    "matching": {"leases", "credentials", "controller", "endpoint", "admission", "gateway"},
    "resources": {"leases", "credentials", "controller", "endpoint", "admission", "gateway"},
    "leases": {"controller", "endpoint", "admission", "gateway", "processes"},
    "credentials": {"controller", "endpoint", "admission", "gateway", "processes", "leases"},
    "conduit": {"kube", "controller", "endpoint", "admission", "gateway", "processes"},
    "kube": {"controller", "endpoint", "admission", "gateway", "processes", "leases"},
    "gateway": {"controller", "endpoint", "admission", "processes"},
    "endpoint": {"controller", "gateway", "admission", "processes"},
    "admission": {"controller", "gateway", "endpoint", "processes"},
    "controller": {"gateway", "endpoint", "admission", "processes"},
}
RUNTIME_MAY_NOT_IMPORT = {"dev"}


def part_of(path: Path) -> str:
    return path.relative_to(PACKAGE).parts[0].removesuffix(".py")


def imported_parts(path: Path) -> set[str]:
    """The phabmesh parts a module imports at module level or in a function (not only for
    type checking: ``if TYPE_CHECKING`` blocks are skipped)."""
    tree = ast.parse(path.read_text())
    skipped: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skipped.update(id(child) for child in ast.walk(node))
    parts: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.ImportFrom) and node.module:
            if node.module == "phabmesh":
                parts.update(alias.name for alias in node.names)
            elif node.module.startswith("phabmesh."):
                parts.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("phabmesh."):
                    parts.add(alias.name.split(".")[1])
    return parts


MODULES = sorted(PACKAGE.rglob("*.py"))


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_each_module_imports_only_what_its_part_may(path: Path) -> None:
    part = part_of(path)
    imported = imported_parts(path) - {part}
    assert not imported & FORBIDDEN.get(part, set()), (part, imported & FORBIDDEN[part])
    if part not in ("dev", "cli"):
        assert not imported & RUNTIME_MAY_NOT_IMPORT, f"{part} imports the dev kits"


def test_the_cli_reaches_the_dev_kits_only_inside_its_dev_commands() -> None:
    tree = ast.parse((PACKAGE / "cli.py").read_text())
    top = [n for n in tree.body if isinstance(n, ast.Import | ast.ImportFrom)]
    assert not any("dev" in ast.unparse(n).split() or ".dev" in ast.unparse(n) for n in top)


def test_the_rules_name_real_parts() -> None:
    parts = {part_of(p) for p in MODULES}
    named = set(FORBIDDEN) | {x for xs in FORBIDDEN.values() for x in xs}
    assert named <= parts, named - parts
