"""Check that the CRDs in ``crds/`` and the models in :mod:`phabmesh.resources` agree.

``python -m phabmesh.dev.schemacheck crds/`` prints every difference and exits
non-zero when there is any; ``make manifests`` and CI run it. Compared, in both
directions, for every property of ``spec`` and ``status`` (nested objects and
list items included): the name, the type, whether it is required, enum values
and defaults. A printer column must point at a property that exists.

Pure apart from reading the YAML files.
"""

from __future__ import annotations

import re
import sys
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import BaseModel
from pydantic.fields import FieldInfo

from phabmesh import resources

_SCALARS = {str: "string", int: "integer", bool: "boolean", float: "number"}
_PATH_STEP = re.compile(r"\.([A-Za-z0-9_]+)|\[[^\]]*\]")


def _unwrap(annotation: Any) -> Any:
    """``X`` for ``X | None``; anything else unchanged."""
    if get_origin(annotation) in (Union, types.UnionType):
        args = [a for a in get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return annotation


def _is_zero(value: Any) -> bool:
    """A default that means "absent" (as Go's zero values do): None, "", 0, False, empty."""
    return not value


def _compare(
    where: str, model: type[BaseModel], schema: dict[str, Any], problems: list[str]
) -> None:
    props: dict[str, Any] = schema.get("properties") or {}
    required = set(schema.get("required") or [])
    fields: dict[str, FieldInfo] = {
        (info.alias or name): info for name, info in model.model_fields.items()
    }
    for name in sorted(required - set(props)):
        problems.append(f"{where}.{name}: required in the CRD but not a property there")
    for name in sorted(set(props) - set(fields)):
        problems.append(f"{where}.{name}: in the CRD, not in {model.__name__}")
    for name in sorted(set(fields) - set(props)):
        problems.append(f"{where}.{name}: in {model.__name__}, not in the CRD")
    for name in sorted(set(fields) & set(props)):
        _compare_field(f"{where}.{name}", fields[name], props[name], name in required, problems)


def _compare_field(
    where: str, info: FieldInfo, prop: dict[str, Any], crd_required: bool, problems: list[str]
) -> None:
    model_required = info.is_required()
    if model_required != crd_required:
        problems.append(f"{where}: required in {'the model' if model_required else 'the CRD'} only")
    if not model_required:
        default = info.get_default(call_default_factory=True)
        if "default" in prop:
            if _normalise(default) != prop["default"]:
                problems.append(
                    f"{where}: default {prop['default']!r} in the CRD, {default!r} in the model"
                )
        elif not _is_zero(default):
            problems.append(f"{where}: default {default!r} in the model, none in the CRD")
    _compare_type(where, info.annotation, prop, problems)


def _normalise(value: Any) -> Any:
    """A model default as it would appear in YAML (tuples as lists, models as dicts)."""
    if isinstance(value, BaseModel):
        return value.model_dump(by_alias=True, mode="json", exclude_none=True)
    if isinstance(value, tuple | list):
        return [_normalise(v) for v in value]
    return value


def _compare_type(  # noqa: PLR0912 - one branch per kind of type
    where: str, annotation: Any, prop: dict[str, Any], problems: list[str]
) -> None:
    inner = _unwrap(annotation)
    origin = get_origin(inner)
    crd_type = prop.get("type")
    if "enum" in prop and origin is not Literal:
        problems.append(f"{where}: enum {prop['enum']} in the CRD, not in the model")
    if isinstance(inner, type) and issubclass(inner, BaseModel):
        if crd_type != "object":
            problems.append(f"{where}: object in the model, {crd_type} in the CRD")
        else:
            _compare(where, inner, prop, problems)
    elif origin is Literal:
        values = sorted(str(v) for v in get_args(inner))
        if crd_type != "string":
            problems.append(f"{where}: string in the model, {crd_type} in the CRD")
        if sorted(prop.get("enum") or []) != values:
            problems.append(f"{where}: enum {prop.get('enum')} in the CRD, {values} in the model")
    elif origin in (tuple, list):
        if crd_type != "array":
            problems.append(f"{where}: array in the model, {crd_type} in the CRD")
        else:
            _compare_type(where + "[]", get_args(inner)[0], prop.get("items") or {}, problems)
    elif origin is dict:
        extra = prop.get("additionalProperties")
        if crd_type != "object" or not isinstance(extra, dict):
            problems.append(f"{where}: a map in the model, not in the CRD")
        else:
            _compare_type(where + "{}", get_args(inner)[1], extra, problems)
    elif inner in _SCALARS:
        if crd_type != _SCALARS[inner]:
            problems.append(f"{where}: {_SCALARS[inner]} in the model, {crd_type} in the CRD")
    elif inner is not typing.Any:
        problems.append(f"{where}: the model's type {inner!r} is not understood")


def _check_column(kind: str, column: dict[str, Any], root: dict[str, Any]) -> list[str]:
    """A printer column's jsonPath must lead to a property of the schema."""
    path = str(column.get("jsonPath", ""))
    if path.startswith(".metadata."):
        return []
    node: dict[str, Any] = {"type": "object", "properties": root}
    consumed = 0
    for step in _PATH_STEP.finditer(path):
        if step.start() != consumed:
            break
        consumed = step.end()
        if step.group(1) is None:  # [index] or [?(filter)]
            node = node.get("items") or {}
        else:
            node = (node.get("properties") or {}).get(step.group(1)) or {}
        if not node:
            break
    if not node or consumed != len(path):
        return [f"{kind}: printer column {column.get('name')!r} points at nothing ({path})"]
    return []


def _check_crd(name: str, doc: dict[str, Any], problems: list[str]) -> str | None:
    kind: str = doc["spec"]["names"]["kind"]
    if doc["spec"]["group"] != resources.GROUP:
        problems.append(f"{name}: group {doc['spec']['group']}, not {resources.GROUP}")
    version = next((v for v in doc["spec"]["versions"] if v["name"] == resources.VERSION), None)
    if version is None:
        problems.append(f"{name}: no version {resources.VERSION}")
        return kind
    root: dict[str, Any] = version["schema"]["openAPIV3Schema"].get("properties") or {}
    for part, models in (("spec", resources.SPECS), ("status", resources.STATUSES)):
        model = models.get(kind)
        if model is None:
            problems.append(f"{name}: kind {kind} has no {part} model in phabmesh.resources")
            continue
        if part not in root:
            problems.append(f"{kind}.{part}: in {model.__name__}, not in the CRD")
            continue
        _compare(f"{kind}.{part}", model, root[part], problems)
    for column in version.get("additionalPrinterColumns") or []:
        problems.extend(_check_column(kind, column, root))
    return kind


FOREIGN_GROUPS = frozenset({"kopf.dev"})


def check(crd_dir: Path) -> list[str]:
    """Every difference between the CRDs in ``crd_dir`` and the models, as a sentence."""
    problems: list[str] = []
    seen: set[str] = set()
    for path in sorted(crd_dir.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if isinstance(doc, dict) and doc.get("kind") == "CustomResourceDefinition":
                if doc["spec"]["group"] in FOREIGN_GROUPS:
                    continue  # installed with ours (kopf's peering), modelled by its owner
                kind = _check_crd(path.name, doc, problems)
                if kind is not None:
                    seen.add(kind)
    for kind in sorted(set(resources.SPECS) - seen):
        problems.append(f"{kind}: a model without a CRD in {crd_dir}")
    return problems


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    crd_dir = Path(args[0] if args else "crds")
    if not crd_dir.is_dir():
        print(f"{crd_dir}: not a directory", file=sys.stderr)
        return 2
    problems = check(crd_dir)
    for problem in problems:
        print(problem)
    if problems:
        print(f"{len(problems)} difference(s) between {crd_dir} and phabmesh.resources")
        return 1
    print(f"CRDs in {crd_dir} and phabmesh.resources agree")
    return 0


if __name__ == "__main__":
    sys.exit(main())
