"""The drift check between crds/ and phabmesh.resources finds every kind of difference."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from phabmesh.dev import schemacheck

REPO = Path(__file__).resolve().parents[2]
CRDS = REPO / "crds"

Edit = Callable[[dict[str, Any]], None]


def _version(doc: dict[str, Any]) -> dict[str, Any]:
    version: dict[str, Any] = doc["spec"]["versions"][0]
    return version


def _root(doc: dict[str, Any]) -> dict[str, Any]:
    root: dict[str, Any] = _version(doc)["schema"]["openAPIV3Schema"]["properties"]
    return root


def _spec(doc: dict[str, Any]) -> dict[str, Any]:
    spec: dict[str, Any] = _root(doc)["spec"]["properties"]
    return spec


def _status(doc: dict[str, Any]) -> dict[str, Any]:
    status: dict[str, Any] = _root(doc)["status"]["properties"]
    return status


def _drifted(tmp_path: Path, file: str, edit: Edit) -> list[str]:
    """The check's findings for a copy of crds/ with one CRD edited."""
    copy = tmp_path / "crds"
    shutil.copytree(CRDS, copy)
    path = copy / file
    doc = yaml.safe_load(path.read_text())
    edit(doc)
    path.write_text(yaml.safe_dump(doc))
    return schemacheck.check(copy)


def test_the_crds_and_the_models_agree() -> None:
    assert schemacheck.check(CRDS) == []


def _add_field(doc: dict[str, Any]) -> None:
    _spec(doc)["extraField"] = {"type": "string", "description": "x"}


def _drop_field(doc: dict[str, Any]) -> None:
    del _spec(doc)["requireClientID"]


def _change_default(doc: dict[str, Any]) -> None:
    _spec(doc)["credentialTTL"]["default"] = "10m"


def _drop_default(doc: dict[str, Any]) -> None:
    del _spec(doc)["tokenSecretRef"]["properties"]["key"]["default"]


def _change_type(doc: dict[str, Any]) -> None:
    _status(doc)["matchedPods"]["type"] = "string"


def _unrequire(doc: dict[str, Any]) -> None:
    _root(doc)["spec"]["required"].remove("allowedMethods")


def _require_in_items(doc: dict[str, Any]) -> None:
    _status(doc)["conditions"]["items"]["required"].remove("message")


def _add_enum_value(doc: dict[str, Any]) -> None:
    _status(doc)["phase"]["enum"].append("Expired")


def _enum_on_plain_string(doc: dict[str, Any]) -> None:
    _spec(doc)["bot"]["enum"] = ["a", "b"]


def _nested_rename(doc: dict[str, Any]) -> None:
    selector = _spec(doc)["namespaceSelector"]["properties"]
    selector["matchExpression"] = selector.pop("matchExpressions")


def _map_value_type(doc: dict[str, Any]) -> None:
    _spec(doc)["podSelector"]["properties"]["matchLabels"]["additionalProperties"] = {
        "type": "integer"
    }


def _bad_column(doc: dict[str, Any]) -> None:
    _version(doc)["additionalPrinterColumns"][0]["jsonPath"] = ".spec.botName"


def _drop_status(doc: dict[str, Any]) -> None:
    del _root(doc)["status"]


DRIFTS: list[tuple[str, str, Edit, str]] = [
    ("property only in the CRD", "phabricatorbindings.yaml", _add_field, "extraField: in the CRD"),
    (
        "property only in the model",
        "phabricatorbindings.yaml",
        _drop_field,
        "PhabricatorBinding.spec.requireClientID: in BindingSpec, not in the CRD",
    ),
    (
        "different defaults",
        "phabricatorbindings.yaml",
        _change_default,
        "credentialTTL: default '10m' in the CRD, '15m' in the model",
    ),
    (
        "default only in the model",
        "phabricatorbots.yaml",
        _drop_default,
        "tokenSecretRef.key: default 'token' in the model, none in the CRD",
    ),
    (
        "different types",
        "phabricatorbindings.yaml",
        _change_type,
        "status.matchedPods: integer in the model, string in the CRD",
    ),
    (
        "required only in the model",
        "phabricatorbindings.yaml",
        _unrequire,
        "spec.allowedMethods: required in the model only",
    ),
    (
        "required-ness inside list items",
        "phabricatorbots.yaml",
        _require_in_items,
        "status.conditions[].message: required in the model only",
    ),
    (
        "enum values differ",
        "phabricatorcredentials.yaml",
        _add_enum_value,
        "status.phase: enum ['Active', 'Revoked', 'Expired'] in the CRD",
    ),
    (
        "enum only in the CRD",
        "phabricatorcredentials.yaml",
        _enum_on_plain_string,
        "spec.bot: enum ['a', 'b'] in the CRD, not in the model",
    ),
    (
        "nested property renamed",
        "phabricatorbots.yaml",
        _nested_rename,
        "namespaceSelector.matchExpressions: in LabelSelector, not in the CRD",
    ),
    (
        "map value type",
        "phabricatorbindings.yaml",
        _map_value_type,
        "podSelector.matchLabels{}: string in the model, integer in the CRD",
    ),
    (
        "printer column to nowhere",
        "phabricatorbindings.yaml",
        _bad_column,
        "printer column 'Bot' points at nothing (.spec.botName)",
    ),
    (
        "status schema missing",
        "phabricatorcredentials.yaml",
        _drop_status,
        "PhabricatorCredential.status: in LeaseStatus, not in the CRD",
    ),
]


@pytest.mark.parametrize(("case", "file", "edit", "expected"), DRIFTS, ids=[d[0] for d in DRIFTS])
def test_drift_is_reported(tmp_path: Path, case: str, file: str, edit: Edit, expected: str) -> None:
    problems = _drifted(tmp_path, file, edit)
    assert any(expected in p for p in problems), problems


def test_a_missing_crd_is_reported(tmp_path: Path) -> None:
    shutil.copytree(CRDS, tmp_path / "crds")
    (tmp_path / "crds" / "phabricatorcredentials.yaml").unlink()
    assert schemacheck.check(tmp_path / "crds") == [
        f"PhabricatorCredential: a model without a CRD in {tmp_path / 'crds'}"
    ]


def test_main_prints_the_differences_and_fails(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _drifted(tmp_path, "phabricatorbindings.yaml", _add_field)
    assert schemacheck.main([str(tmp_path / "crds")]) == 1
    out = capsys.readouterr().out
    assert "PhabricatorBinding.spec.extraField: in the CRD, not in BindingSpec" in out
    assert "1 difference(s)" in out
    assert schemacheck.main([str(CRDS)]) == 0
    assert schemacheck.main([str(tmp_path / "nowhere")]) == 2


def test_runs_as_a_module(tmp_path: Path) -> None:
    _drifted(tmp_path, "phabricatorbots.yaml", _drop_default)

    def run(crd_dir: str) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "PYTHONPATH": str(REPO / "operator")}
        argv = [sys.executable, "-m", "phabmesh.dev.schemacheck", crd_dir]
        return subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, check=False)

    ok = run("crds/")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    bad = run(str(tmp_path / "crds"))
    assert bad.returncode == 1
    assert "default 'token' in the model, none in the CRD" in bad.stdout
