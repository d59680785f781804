"""What the import layers (import-linter's contract in pyproject.toml, run by `make lint`)
cannot say: the CLI reaches the dev kits only inside its dev commands, so that nothing at
run time needs them (they stay out of the wheel and the image)."""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "operator" / "phabmesh"


def test_the_cli_reaches_the_dev_kits_only_inside_its_dev_commands() -> None:
    tree = ast.parse((PACKAGE / "cli.py").read_text())
    top = [n for n in tree.body if isinstance(n, ast.Import | ast.ImportFrom)]
    assert not any("dev" in ast.unparse(n).split() or ".dev" in ast.unparse(n) for n in top)


def test_the_layers_name_every_part_of_the_package() -> None:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    (contract,) = config["contracts"]
    named = {part.strip() for layer in contract["layers"] for part in layer.split("|")}
    parts = {p.name.removesuffix(".py") for p in PACKAGE.iterdir()
             if p.suffix == ".py" or (p / "__init__.py").exists()} - {"__init__"}  # fmt: skip
    assert named == parts
    assert contract["exhaustive"] is True
