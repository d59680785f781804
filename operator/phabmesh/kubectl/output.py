"""What ``kubectl phabmesh`` prints: tables by default, ``-o json`` or ``-o yaml``. Pure.

Tables follow kubectl's: upper-case headers, columns three spaces apart, no borders; an
empty answer prints a sentence on stderr ("No resources found" style) and no table.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from typing import Any

import yaml

FORMATS = ("table", "json", "yaml")
GAP = "   "


@dataclasses.dataclass(frozen=True)
class Report:
    """A command's answer: table columns (header, row key), rows, and the document that
    ``-o json|yaml`` prints (the rows themselves unless given)."""

    columns: Sequence[tuple[str, str]]
    rows: Sequence[Mapping[str, Any]]
    document: Any = None
    empty: str = "No resources found."
    exit_code: int = 0
    # Further tables, each printed after a blank line when it has rows (as ``kubectl get
    # a,b`` prints one table per kind): (columns, rows).
    more: Sequence[tuple[Sequence[tuple[str, str]], Sequence[Mapping[str, Any]]]] = ()


def cell(value: Any) -> str:
    if value is None or value == "":
        return "<none>"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, list | tuple):
        return ",".join(cell(v) for v in value) or "<none>"
    return " ".join(str(value).split())  # one line per row, whatever the value holds


def table(columns: Sequence[tuple[str, str]], rows: Sequence[Mapping[str, Any]]) -> str:
    """Rows under their headers, each column as wide as its widest cell."""
    grid = [[header.upper() for header, _ in columns]]
    grid += [[cell(row.get(key)) for _, key in columns] for row in rows]
    widths = [max(len(line[i]) for line in grid) for i in range(len(columns))]
    lines = [
        GAP.join(text.ljust(width) for text, width in zip(line, widths, strict=True)).rstrip()
        for line in grid
    ]
    return "\n".join(lines) + "\n"


def render(report: Report, fmt: str) -> tuple[str, str]:
    """(stdout, stderr) for ``report`` in format ``fmt`` (one of :data:`FORMATS`)."""
    document = report.document if report.document is not None else list(report.rows)
    if fmt == "json":
        return json.dumps(document, indent=2, sort_keys=False, default=str) + "\n", ""
    if fmt == "yaml":
        return yaml.safe_dump(json.loads(json.dumps(document, default=str)), sort_keys=False), ""
    if fmt != "table":
        raise ValueError(f"unknown output format {fmt!r}: use one of {', '.join(FORMATS)}")
    tables = [
        table(columns, rows)
        for columns, rows in ((report.columns, report.rows), *report.more)
        if rows
    ]
    if not tables:
        return "", report.empty + "\n"
    return "\n".join(tables), ""
