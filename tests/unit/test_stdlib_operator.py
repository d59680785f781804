"""operator/ is a source root, never a package: the stdlib's `operator` must win."""

import operator
import sys
from pathlib import Path


def test_import_operator_is_the_standard_library() -> None:
    assert hasattr(operator, "itemgetter")
    assert operator.add(2, 3) == 5
    origin = getattr(operator, "__file__", None)
    # Either built in (no file) or loaded from the interpreter's own library.
    assert origin is None or Path(origin).parent == Path(sys.modules["os"].__file__).parent


def test_source_root_has_no_init() -> None:
    root = Path(__file__).resolve().parents[2] / "operator"
    assert (root / "phabmesh" / "__init__.py").is_file()
    assert not (root / "__init__.py").exists()
