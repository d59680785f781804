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


def test_a_long_build_says_how_far_it_is(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """What `go build -v` writes (modules fetched, then each package compiled) is counted and
    said on stderr as it goes; a failure returns Go's own last words."""
    script = (
        "import sys\n"
        "for m in ('a', 'b'): print(f'go: downloading example.com/{m} v1.0.0', file=sys.stderr)\n"
        "for p in ('example.com/a', 'example.com/b/c', 'k8s.io/x'): print(p, file=sys.stderr)\n"
        "print('# k8s.io/x', file=sys.stderr)\n"
        "print('x.go:1: undefined: y', file=sys.stderr)\n"
        "sys.exit(int(sys.argv[1]))\n"
    )
    command = ["python3", "-c", script]
    code, tail = gobuild._run_with_progress([*command, "0"], tmp_path, None, "tool", every=0)
    said = capsys.readouterr().err
    assert code == 0
    assert "still building tool: 2 modules fetched, 3 packages compiled" in said
    assert "built tool in" in said and "(3 packages)" in said
    code, tail = gobuild._run_with_progress([*command, "1"], tmp_path, None, "tool", every=0)
    assert code == 1 and "undefined: y" in tail
    assert "built tool" not in capsys.readouterr().err


def test_a_module_without_tools_go_is_built_as_its_own_main_package(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """CoreDNS's module is a main package of its own (the plugins it registers are blank
    imports): it builds ".", and its Go files key the cache, so a plugin added is a new build."""
    mod = tmp_path / "controlplane" / "server"
    mod.mkdir(parents=True)
    (mod / "go.mod").write_text(f"module phabmesh.io/server\n\nrequire {MODULE} v1.2.3\n")
    (mod / "go.sum").write_text("")
    main = 'package main\n\nimport (\n\t_ "{}/plugin/a"\n\n\t"{}/core"\n)\n'
    (mod / "main.go").write_text(main.format(MODULE, MODULE))
    monkeypatch.setenv("PHABMESH_CONTROLPLANE_MODULE", str(tmp_path / "controlplane"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    calls: list[tuple[Path, list[str]]] = []

    def build_into(
        bindir: Path,
        mod: Path,
        version: str,
        ldflags: str,
        packages: list[str],
        log: Path | None,
        tags: str = "",
    ) -> None:
        calls.append((bindir, packages))

    monkeypatch.setattr(gobuild, "_build_into", build_into)
    first = gobuild.go_tool("server", MODULE)
    (mod / "main.go").write_text(main.replace("plugin/a", "plugin/b").format(MODULE, MODULE))
    second = gobuild.go_tool("server", MODULE)
    assert calls == [(first, ["."]), (second, ["."])]
    assert first != second and first.name.startswith("server-v1.2.3-")
