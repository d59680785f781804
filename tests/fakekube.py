"""A fake KubeClient for unit tests of pure logic: objects held by path, every call recorded.

It answers as the API server does where the controller's writes depend on it: create
(409 AlreadyExists), get and delete (404 NotFound; a delete's UID or resourceVersion
precondition that does not hold: 409; a delete answers a Status), merge patches (RFC 7386; a
``metadata.resourceVersion`` in the patch is a precondition: 409), JSON patches (RFC 6902
test/add/replace/remove as the API server applies them: a replace of a missing member adds
it; an operation that does not apply, a failed test among them: 422 and nothing written),
the status subresource (a write to ``.../status`` changes only the status; a write to the
object keeps the status, and a create drops it, for the kinds that have one) and a numeric
``resourceVersion`` bumped on every write. A test may make one call fail (:meth:`fail`) or
answer it with a body of its own (:meth:`answer`, e.g. an access review).
tests/integration/test_fakekube_contract.py makes the same calls to the real API server.

No sockets and no time: it also lists what it holds, one page, and its watches stay quiet
(:class:`tests.fakeapi.FakeAPI`), so that the process's informers can list from it.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Mapping
from typing import Any

from phabmesh.kube import Conflict, KubeError, NotFound
from phabmesh.kube.client import JSON
from tests.fakeapi import FakeAPI

# The kinds (by plural) whose CRD has a status subresource (charts/phabmesh/crds).
STATUS_SUBRESOURCE = frozenset({"phabricatorbots", "phabricatorbindings", "phabricatorwebhooks"})

Call = tuple[str, str, Any]  # (verb, path, body)
WRITES = ("create", "merge_patch", "json_patch", "delete")


class FakeKube(FakeAPI):
    def __init__(
        self,
        objects: Mapping[str, JSON] | None = None,
        *,
        status_subresource: frozenset[str] = STATUS_SUBRESOURCE,
    ) -> None:
        super().__init__()
        self.objects: dict[str, JSON] = {}
        self.calls: list[Call] = []
        self.status_subresource = status_subresource
        self.version = 100  # the last resourceVersion given out
        self._uids = 0
        self._scripted: dict[tuple[str, str], list[JSON | Exception]] = {}
        for path, body in (objects or {}).items():
            self.put(path, body)

    # -- the test's side ----------------------------------------------------------------

    def put(self, path: str, body: JSON) -> JSON:
        """Hold ``body`` at ``path`` as it is (no call recorded); a uid and a
        resourceVersion are given when it has none."""
        obj = copy.deepcopy(body)
        meta = obj.setdefault("metadata", {})
        meta.setdefault("uid", self._uid())
        meta.setdefault("resourceVersion", self._bump())
        self.objects[path] = obj
        return obj

    def fail(self, verb: str, path: str, error: Exception, times: int = 1) -> None:
        """The next ``times`` calls of ``verb`` on ``path`` raise ``error`` (recorded, no
        change made)."""
        self._scripted.setdefault((verb, path), []).extend([error] * times)

    def answer(self, verb: str, path: str, body: JSON, times: int = 1) -> None:
        """The next ``times`` calls of ``verb`` on ``path`` return ``body`` (recorded, no
        change made): for calls that hold nothing, such as a SelfSubjectAccessReview."""
        self._scripted.setdefault((verb, path), []).extend([body] * times)

    @property
    def writes(self) -> list[Call]:
        """The calls that ask for a change, in order (gets left out)."""
        return [call for call in self.calls if call[0] in WRITES]

    # -- KubeClient ---------------------------------------------------------------------

    async def get(self, path: str, **_kw: Any) -> JSON:
        scripted = self._call("get", path, None)
        if scripted is not None:
            return scripted
        return copy.deepcopy(self._held(_object_path(path)))

    async def create(self, path: str, body: JSON, **_kw: Any) -> JSON:
        scripted = self._call("create", path, body)
        if scripted is not None:
            return scripted
        obj = copy.deepcopy(body)
        meta = obj.setdefault("metadata", {})
        name = meta.get("name")
        if not name:
            raise KubeError(422, "Invalid", "metadata.name: Required value")
        target = f"{path}/{name}"
        if target in self.objects:
            raise Conflict(409, "AlreadyExists", f'"{name}" already exists')
        if _plural(target) in self.status_subresource:
            obj.pop("status", None)
        meta["uid"] = self._uid()
        meta["resourceVersion"] = self._bump()
        self.objects[target] = obj
        return copy.deepcopy(obj)

    async def merge_patch(self, path: str, patch: JSON, **_kw: Any) -> JSON:
        scripted = self._call("merge_patch", path, patch)
        if scripted is not None:
            return scripted
        target, old = self._target(path)
        wanted = ((patch.get("metadata") or {}) if isinstance(patch, dict) else {}).get(
            "resourceVersion"
        )
        if wanted is not None and wanted != old["metadata"]["resourceVersion"]:
            raise Conflict(409, "Conflict", "the object has been modified")
        return self._store(path, target, old, merge(copy.deepcopy(old), patch))

    async def json_patch(self, path: str, ops: list[JSON], **_kw: Any) -> JSON:
        scripted = self._call("json_patch", path, ops)
        if scripted is not None:
            return scripted
        target, old = self._target(path)
        new = copy.deepcopy(old)
        for op in ops:
            new = _apply(new, op)
        return self._store(path, target, old, new)

    async def delete(self, path: str, body: JSON | None = None, **_kw: Any) -> JSON:
        scripted = self._call("delete", path, body)
        if scripted is not None:
            return scripted
        old = self._held(path)
        meta = old["metadata"]
        for field, value in ((body or {}).get("preconditions") or {}).items():
            if meta.get(field) != value:
                raise Conflict(
                    409, "Conflict", f"Precondition failed: {field}: {value}, in object meta: "
                    f"{meta.get(field)}"
                )  # fmt: skip
        del self.objects[path]
        details = {"name": meta.get("name"), "kind": _plural(path), "uid": meta.get("uid")}
        return {"apiVersion": "v1", "kind": "Status", "status": "Success", "details": details}

    async def list_all(
        self, path: str, params: Mapping[str, str] | None = None, chunk: int = 500
    ) -> tuple[list[JSON], str]:
        """What it holds of the collection at ``path`` (of every namespace when ``path``
        names none)."""
        head, _, plural = path.rstrip("/").rpartition("/")
        namespaced = (
            re.escape(head) if "/namespaces/" in head else re.escape(head) + "(/namespaces/[^/]+)?"
        )
        pattern = re.compile(f"^{namespaced}/{re.escape(plural)}/[^/]+$")
        found = [copy.deepcopy(obj) for key, obj in self.objects.items() if pattern.match(key)]
        return found, str(self.version)

    # -- the server's side --------------------------------------------------------------

    def _call(self, verb: str, path: str, body: Any) -> JSON | None:
        self.calls.append((verb, path, copy.deepcopy(body)))
        scripted = self._scripted.get((verb, path))
        if not scripted:
            return None
        outcome = scripted.pop(0)
        if isinstance(outcome, Exception):
            raise outcome
        return copy.deepcopy(outcome)

    def _held(self, path: str) -> JSON:
        if path not in self.objects:
            name = path.rsplit("/", 1)[-1]
            raise NotFound(404, "NotFound", f'{_plural(path)} "{name}" not found')
        return self.objects[path]

    def _target(self, path: str) -> tuple[str, JSON]:
        target = _object_path(path)
        old = self._held(target)
        if path != target and _plural(target) not in self.status_subresource:
            raise NotFound(404, "NotFound", "the server could not find the requested resource")
        return target, old

    def _store(self, path: str, target: str, old: JSON, new: JSON) -> JSON:
        if _plural(target) in self.status_subresource:
            if path == target:  # the object: its status is not written here
                new = {**new, "status": copy.deepcopy(old.get("status"))}
                if new["status"] is None:
                    del new["status"]
            else:  # the status subresource: only the status is
                status = new.get("status")
                new = copy.deepcopy(old)
                new.pop("status", None)
                if status is not None:
                    new["status"] = status
        new.setdefault("metadata", {})
        for field in ("uid", "name", "namespace"):  # not a patch's to change
            if field in old["metadata"]:
                new["metadata"][field] = old["metadata"][field]
        new["metadata"]["resourceVersion"] = self._bump()
        self.objects[target] = new
        return copy.deepcopy(new)

    def _bump(self) -> str:
        self.version += 1
        return str(self.version)

    def _uid(self) -> str:
        self._uids += 1
        return f"uid-{self._uids}"


def _object_path(path: str) -> str:
    return path.removesuffix("/status")


def _plural(object_path: str) -> str:
    return object_path.rstrip("/").rsplit("/", 2)[-2]


def merge(target: Any, patch: Any) -> Any:
    """RFC 7386: ``patch`` merged into ``target`` (a null removes the member)."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge(result.get(key), value)
    return result


def _unprocessable(message: str) -> KubeError:
    return KubeError(422, "Invalid", message)


def _pointer(path: str) -> list[str]:
    if not path.startswith("/"):
        raise _unprocessable(f"invalid JSON pointer {path!r}")
    return [part.replace("~1", "/").replace("~0", "~") for part in path[1:].split("/")]


def _parent(doc: Any, parts: list[str], path: str) -> Any:
    here = doc
    for part in parts[:-1]:
        if isinstance(here, dict) and part in here:
            here = here[part]
        elif isinstance(here, list) and part.isdigit() and int(part) < len(here):
            here = here[int(part)]
        else:
            raise _unprocessable(f"doc is missing path: {path!r}")
    return here


def _locate(doc: Any, op: JSON) -> tuple[Any, str | int, bool]:
    """Where an operation applies: the container, the key or index in it, and whether a
    member is there."""
    kind, path = op.get("op"), str(op.get("path", ""))
    parts = _pointer(path)
    parent = _parent(doc, parts, path)
    last = parts[-1]
    if isinstance(parent, dict):
        return parent, last, last in parent
    if not isinstance(parent, list):
        raise _unprocessable(f"doc is missing path: {path!r}")
    adding = kind == "add"
    index = len(parent) if last == "-" and adding else int(last) if last.isdigit() else -1
    if not 0 <= index < len(parent) + adding:
        raise _unprocessable(f"index out of range in {path!r}")
    return parent, index, index < len(parent)


def _apply(doc: Any, op: JSON) -> Any:
    """One RFC 6902 operation of test, add, replace and remove (others are refused)."""
    kind, path, value = op.get("op"), op.get("path"), copy.deepcopy(op.get("value"))
    if kind not in ("test", "add", "replace", "remove"):
        raise _unprocessable(f"unsupported operation {kind!r}")
    parent, key, exists = _locate(doc, op)
    if kind == "test":
        if not exists or parent[key] != value:
            raise _unprocessable(f"testing value {path!r} failed: test operation failed")
    elif kind == "add" and isinstance(parent, list):
        parent.insert(int(key), value)
    elif kind == "add":
        parent[key] = value
    elif kind == "replace" and (exists or isinstance(parent, dict)):
        parent[key] = value  # the API server replaces a missing member as an add
    elif not exists:
        raise _unprocessable(f"{kind} operation does not apply: doc is missing key: {path!r}")
    else:
        del parent[key]
    return doc
