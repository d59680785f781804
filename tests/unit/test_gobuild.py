"""gobuild.go_tool: a build is cached by its module's files and its build tags."""

from __future__ import annotations

from pathlib import Path

import pytest

from phabmesh.dev import gobuild

MODULE = "example.com/tool"


@pytest.fixture
def builds(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> list[tuple[Path, str]]:
    """A module tests/controlplane/tool, and the builds go_tool asks for (none runs)."""
    mod = tmp_path / "controlplane" / "tool"
    mod.mkdir(parents=True)
    (mod / "go.mod").write_text(f"module phabmesh.io/tool\n\nrequire {MODULE} v1.2.3\n")
    (mod / "go.sum").write_text("")
    (mod / "tools.go").write_text(f'package tool\n\nimport (\n\t_ "{MODULE}/cmd/tool"\n)\n')
    monkeypatch.setenv("PHABMESH_CONTROLPLANE_MODULE", str(tmp_path / "controlplane"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    calls: list[tuple[Path, str]] = []

    def build_into(
        bindir: Path,
        mod: Path,
        version: str,
        ldflags: str,
        packages: list[str],
        log: Path | None,
        tags: str = "",
    ) -> None:
        assert (version, packages) == ("v1.2.3", [f"{MODULE}/cmd/tool"])
        calls.append((bindir, tags))

    monkeypatch.setattr(gobuild, "_build_into", build_into)
    return calls


def test_build_tags_are_passed_and_key_the_cache(builds: list[tuple[Path, str]]) -> None:
    plain = gobuild.go_tool("tool", MODULE)
    tagged = gobuild.go_tool("tool", MODULE, tags="remove_all_sd")
    assert builds == [(plain, ""), (tagged, "remove_all_sd")]
    assert plain != tagged
    assert plain.name.startswith("tool-v1.2.3-")
    assert tagged.name.startswith("tool-v1.2.3-")
    assert gobuild.go_tool("tool", MODULE, tags="remove_all_sd") == tagged
