"""The house's rules, checked on the package's source (ast): imports flow one way, with no cycle; the command
layer is thin and its modules independent; no module grows past 450 lines; no function of the TAR package grows
past 60."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "workflow" / "tamperlab"
MAX_LINES = 450
MAX_FUNCTION_LINES = 60  # in the packages below: each step of the algorithm is a function one reads at a glance
SHORT_FUNCTIONS = ("hardening.tar",)


def _modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def _imports(path: Path, name: str, modules: dict[str, Path]) -> set[str]:
    """The package modules `name` imports anywhere in its source (lazy imports inside functions too)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    targets = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from the importing module's package
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] if package else [])
                base = ".".join(p for p in (base, node.module or "") if p)
            else:
                base = node.module or ""
            names = [base] + [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        for full in names:
            if not full.startswith("tamperlab"):
                continue
            relative = full.removeprefix("tamperlab").lstrip(".")
            if relative in modules and relative != name:
                targets.add(relative)
    return targets


def import_graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(path, name, modules) for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle of the graph as a path [a, b, …, a], or None (depth-first search, three colours)."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_cycle_finder_finds_a_cycle_and_accepts_a_tree():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_the_package_has_no_import_cycle():
    graph = import_graph()
    assert "cli" in graph and graph["cli"], "the graph found no imports: the parser is broken"
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_imports_flow_from_commands_to_the_domain():
    graph = import_graph()
    for name, targets in graph.items():
        if not name.startswith("commands") and name != "cli":
            bad = {t for t in targets if t == "cli" or t.startswith("commands")}
            assert not bad, f"domain module {name} imports the command layer: {sorted(bad)}"
        elif name.startswith("commands."):
            others = {t for t in targets if t.startswith("commands.") and t != "commands.common"}
            assert not others, f"{name} imports another command module: {sorted(others)}"


def test_the_entry_point_is_thin_and_no_module_is_too_long():
    lengths = {name: len(path.read_text().splitlines()) for name, path in _modules().items()}
    assert lengths["cli"] <= 150
    long = {name: n for name, n in lengths.items() if n > MAX_LINES}
    assert not long, long


def test_no_function_of_the_tar_package_is_too_long():
    checked, long = 0, {}
    for name, path in _modules().items():
        if not any(name == p or name.startswith(p + ".") for p in SHORT_FUNCTIONS):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                checked += 1
                first = min([node.lineno] + [d.lineno for d in node.decorator_list])
                if node.end_lineno - first + 1 > MAX_FUNCTION_LINES:
                    long[f"{name}.{node.name}"] = node.end_lineno - first + 1
    assert checked > 20, "found too few functions: the package moved?"
    assert not long, long
