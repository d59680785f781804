"""Check that the CRDs in ``crds/`` and the models in :mod:`phabmesh.resources` agree.

``python -m phabmesh.schemacheck crds/`` prints every difference (property
names, types, required-ness, enums and defaults, in both directions) and exits
non-zero when there is any. ``make manifests`` and CI run it.
"""

from __future__ import annotations

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


def _unwrap(annotation: Any) -> tuple[Any, bool]:
    """(inner type, optional?) for ``X | None``."""
    if get_origin(annotation) in (Union, types.UnionType):
        args = [a for a in get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return annotation, False


def _compare(
    where: str, model: type[BaseModel], schema: dict[str, Any], problems: list[str]
) -> None:
    props: dict[str, Any] = schema.get("properties") or {}
    required = set(schema.get("required") or [])
    fields: dict[str, FieldInfo] = {
        (info.alias or name): info for name, info in model.model_fields.items()
    }
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
    if "default" in prop and not model_required and info.default != prop["default"]:
        problems.append(
            f"{where}: default {prop['default']!r} in the CRD, {info.default!r} in the model"
        )
    _compare_type(where, info.annotation, prop, problems)


def _compare_type(  # noqa: PLR0912 - one branch per kind of type
    where: str, annotation: Any, prop: dict[str, Any], problems: list[str]
) -> None:
    inner, _ = _unwrap(annotation)
    origin = get_origin(inner)
    crd_type = prop.get("type")
    if isinstance(inner, type) and issubclass(inner, BaseModel):
        if crd_type != "object":
            problems.append(f"{where}: object in the model, {crd_type} in the CRD")
        else:
            _compare(where, inner, prop, problems)
    elif origin is Literal:
        values = sorted(str(v) for v in get_args(inner))
        if sorted(prop.get("enum") or []) != values:
            problems.append(f"{where}: enum {prop.get('enum')} in the CRD, {values} in the model")
    elif origin in (tuple, list):
        if crd_type != "array":
            problems.append(f"{where}: array in the model, {crd_type} in the CRD")
        else:
            _compare_type(where + "[]", get_args(inner)[0], prop.get("items") or {}, problems)
    elif origin is dict:
        if crd_type != "object" or "additionalProperties" not in prop:
            problems.append(f"{where}: a map in the model, not in the CRD")
    elif inner in _SCALARS:
        if crd_type != _SCALARS[inner]:
            problems.append(f"{where}: {_SCALARS[inner]} in the model, {crd_type} in the CRD")
    elif inner is not typing.Any:
        problems.append(f"{where}: the model's type {inner!r} is not understood")


def check(crd_dir: Path) -> list[str]:
    problems: list[str] = []
    seen: set[str] = set()
    for path in sorted(crd_dir.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if not doc or doc.get("kind") != "CustomResourceDefinition":
                continue
            kind = doc["spec"]["names"]["kind"]
            seen.add(kind)
            if doc["spec"]["group"] != resources.GROUP:
                problems.append(f"{path.name}: group {doc['spec']['group']}")
            version = next(
                (v for v in doc["spec"]["versions"] if v["name"] == resources.VERSION), None
            )
            if version is None:
                problems.append(f"{path.name}: no version {resources.VERSION}")
                continue
            root = version["schema"]["openAPIV3Schema"]["properties"]
            for part, models in (("spec", resources.SPECS), ("status", resources.STATUSES)):
                model = models.get(kind)
                if model is None:
                    problems.append(f"{kind}: no model")
                    continue
                _compare(f"{kind}.{part}", model, root.get(part) or {}, problems)
    for kind in sorted(set(resources.SPECS) - seen):
        problems.append(f"{kind}: a model without a CRD in {crd_dir}")
    return problems


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    crd_dir = Path(args[0] if args else "crds")
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
