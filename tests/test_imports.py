"""tvlib's modules import each other without a cycle, function-level imports included: a
function-level import is never a way around one."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "tvlib"


def module_names() -> dict[str, Path]:
    names = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.with_suffix("").relative_to(PACKAGE.parent).parts
        names[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return names


def import_graph() -> dict[str, set[str]]:
    """{module: the tvlib modules it imports anywhere in its body}."""
    names = module_names()
    graph = {name: set() for name in names}
    for name, path in names.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not isinstance(node, ast.ImportFrom):
                continue
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            elif (node.module or "").startswith("tvlib"):
                target = node.module
            else:
                continue
            for candidate in [target] + [f"{target}.{alias.name}" for alias in node.names]:
                if candidate in names and candidate != name:
                    graph[name].add(candidate)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state = {}                                   # 1: on the current path, 2: done

    def visit(node, path):
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path + [node, nxt]
            if nxt not in state:
                found = visit(nxt, path + [node])
                if found:
                    return found
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node, [])
            if found:
                return found
    return None


def test_the_checker_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) is not None
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_tvlib_has_no_import_cycle():
    graph = import_graph()
    assert "tvlib.cleanup" in graph["tvlib.experiments.cleanup_sweeps"]     # the graph is read
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_fingerprints_and_cache_are_leaves():
    graph = import_graph()
    assert "tvlib.cache" in graph["tvlib.result_keys"]
    assert graph["tvlib.fingerprints"] == {"tvlib.paths"}
    assert graph["tvlib.checks"] == set()                   # every module may use it
    assert graph["tvlib.cache"] <= {"tvlib.fingerprints", "tvlib.paths"}
