"""The house's rules, checked on the package's source (ast): imports flow one way, with no cycle between modules nor
between rooms; the command layer is thin and its modules independent; no module grows past 400 lines and no function
past 60, anywhere in the package, with no exceptions.

The rooms (the package's subpackages, and each module at its root) are layered, lowest first; a room imports its own
modules and rooms below it, never one above it nor a peer beside it. An import anywhere in a module counts, inside a
function too (the heavy libraries load lazily, and so do many of the package's own imports):

    errors, chat, __init__   package-wide leaves: the one error type, chat formatting, the version
    methods                  the method registry: every defence, attack and judge by name (it names their code as
                             text, imported only when a job runs one, so every room may ask it)
    runtime                  how a step runs: numerics, cpu, logs, launch, provenance (manifests), replay
    data                     data sets, splits, the rows each stage trains on, JSON lines, refusal phrases
    training                 the Trainer set-up every training stage shares, packing, the SFT loop (handed a loader:
                             it knows no model source)
    models                   loading and placing any checkpoint; the organism's build; safety tuning (alignment)
    evaluation               judges, generation, refusal and capability of one checkpoint, Wilson intervals
    attacks, hardening       the harmful fine-tuning attack and its grid; the defences (RepNoise, TAR)
    landscape                the safety landscape: directions, scans, projections, VISAGE, its figures
    reporting                result tables, the attack grids' figures, published numbers, a run against a reference
    config                   config loading and validation (asks each section's domain)
    commands                 the command layer: arguments -> provenance Step -> one call into a room below
    cli                      the entry point
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "workflow" / "tamperlab"
MAX_LINES = 400  # a module holds one concept: past this it holds two
LAYERS = (  # lowest first: see the module docstring
    ("errors", "chat", "__init__"),
    ("methods",),
    ("runtime",),
    ("data",),
    ("training",),
    ("models",),
    ("evaluation",),
    ("attacks", "hardening"),
    ("landscape",),
    ("reporting",),
    ("config",),
    ("commands",),
    ("cli",),
)
MAX_FUNCTION_LINES = 60  # each step is a function one reads at a glance (decorators count)


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


def room(module: str) -> str:
    """The room a module lives in: its subpackage of tamperlab, or the root module itself ("__init__": the package's
    own __init__.py)."""
    return module.split(".")[0] or "__init__"


def room_graph(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """The module graph folded into rooms: an edge from room A to room B for any import, by any module of A, of a
    module of B (imports within a room are not edges)."""
    rooms: dict[str, set[str]] = {}
    for name, targets in graph.items():
        rooms.setdefault(room(name), set()).update(room(t) for t in targets if room(t) != room(name))
    return rooms


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


def test_the_room_graph_sees_a_cycle_the_module_graph_does_not():
    modules = {"models.organism": {"evaluation.judges"}, "evaluation.judges": {"errors"},
               "evaluation.refusal": {"models.registry"}, "models.registry": {"errors"}, "errors": set()}
    assert find_cycle(modules) is None
    assert find_cycle(room_graph(modules)) == ["evaluation", "models", "evaluation"]
    assert room_graph({"": {"errors"}, "errors": set()}) == {"__init__": {"errors"}, "errors": set()}


def test_no_two_rooms_lean_on_each_other():
    rooms = room_graph(import_graph())
    assert rooms["models"], "the room graph found no imports between rooms: the folding is broken"
    assert find_cycle(rooms) is None, " -> ".join(find_cycle(rooms))


def test_every_room_imports_only_rooms_below_it():
    rank = {name: level for level, names in enumerate(LAYERS) for name in names}
    rooms = room_graph(import_graph())
    unplaced = sorted(set(rooms) - set(rank))
    assert not unplaced, f"rooms missing from LAYERS (give each a place in the layering): {unplaced}"
    upward = sorted(f"{a} -> {b}" for a, targets in rooms.items() for b in targets if rank[b] >= rank[a])
    assert not upward, f"imports that do not point down the layering: {upward}"


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
    long = {name: n for name, n in sorted(lengths.items()) if n > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines (split each along a seam, one concept per module): {long}"


def function_lengths(source: str) -> dict[str, int]:
    """{qualified name: lines} of every function in `source`, nested ones and methods too (decorators count)."""
    lengths: dict[str, int] = {}

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                name = f"{prefix}{child.name}"
                if not isinstance(child, ast.ClassDef):
                    first = min([child.lineno] + [d.lineno for d in child.decorator_list])
                    lengths[name] = child.end_lineno - first + 1
                visit(child, name + ".")
            else:
                visit(child, prefix)

    visit(ast.parse(source), "")
    return lengths


def test_function_lengths_count_nested_functions_and_decorators():
    source = "@a\n@b\ndef f():\n    def g():\n        pass\n    return g\nclass C:\n    def m(self):\n        pass\n"
    assert function_lengths(source) == {"f": 6, "f.g": 2, "C.m": 2}


def test_no_function_is_too_long():
    lengths = {f"{name}.{function}": n for name, path in _modules().items()
               for function, n in function_lengths(path.read_text()).items()}
    assert len(lengths) > 500, "found too few functions: the package moved?"
    long = {name: n for name, n in sorted(lengths.items()) if n > MAX_FUNCTION_LINES}
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines (split them into named steps): {long}"


def test_conftest_is_a_fixture_file_no_test_imports_by_name():
    """Fixtures reach a test through pytest; what a test imports by name lives in tests/helpers.py, not in conftest
    nor in another test module (code in a string, a child process's, counts too)."""
    tests = Path(__file__).resolve().parent
    importers = []
    for path in sorted(tests.glob("*.py")):
        tree = ast.parse(path.read_text())
        sources = [tree, *(ast.parse(node.value) for node in ast.walk(tree) if isinstance(node, ast.Constant)
                           and isinstance(node.value, str) and "import " in node.value and _parses(node.value))]
        for node in (n for source in sources for n in ast.walk(source)):
            names = ([node.module] if isinstance(node, ast.ImportFrom)
                     else [a.name for a in node.names] if isinstance(node, ast.Import) else [])
            if any(name == "conftest" or (name or "").startswith("test_") for name in names):
                importers.append(path.name)
    assert len(list(tests.glob("test_*.py"))) > 30, "found too few test modules: the tests moved?"
    assert not importers, f"import from tests/helpers.py, not conftest or a test module: {sorted(set(importers))}"


def _parses(text: str) -> bool:
    try:
        ast.parse(text)
    except SyntaxError:
        return False
    return True


def test_the_code_passes_ruff():
    """pyproject.toml's lint rules (line length, imports, bugbear) hold for the package, the tests and the
    benchmarks."""
    import subprocess
    import sys

    run = subprocess.run([sys.executable, "-m", "ruff", "check", "--output-format", "concise", "workflow", "tests",
                          "benchmarks"], cwd=PACKAGE.parents[1], capture_output=True, text=True)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-1000:]
