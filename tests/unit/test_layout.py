"""The library's shape: no import circle in common/, and no module a newcomer cannot read in one sitting."""

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
COMMON = REPO / "common"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports_of_common() -> dict[str, set[str]]:
    """Every module of common/ -> the modules of common/ it imports, at top level or inside a function."""
    modules = {_module_name(p): p for p in COMMON.rglob("*.py")}
    graph = {m: set() for m in modules}
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("common"):
                targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                continue
            graph[name].update(t for t in targets if t in modules and t != name)
    return graph


def _a_circle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(u):
        state[u] = 1
        path.append(u)
        for v in sorted(graph[u]):
            if state.get(v) == 1:
                return path[path.index(v) :] + [v]
            if v not in state and (found := visit(v)):
                return found
        state[u] = 2
        path.pop()
        return None

    for u in sorted(graph):
        if u not in state and (found := visit(u)):
            return found
    return None


def test_no_import_circle_in_common():
    graph = _imports_of_common()
    assert len(graph) > 50 and graph["common.apps.lungseg"]  # the graph was read
    circle = _a_circle(graph)
    assert circle is None, " -> ".join(circle)


def test_a_circle_is_found_when_there_is_one():
    assert _a_circle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _a_circle({"a": {"b"}, "b": set()}) is None


def test_no_module_in_common_over_about_500_lines():
    long = {str(p.relative_to(REPO)): n for p in COMMON.rglob("*.py") if (n := len(p.read_text().splitlines())) > 520}
    assert not long, long
