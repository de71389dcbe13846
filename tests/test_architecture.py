"""The layering of docs/architecture.md, checked on the source: an acyclic package import graph, stages that never
import each other or the CLI, an artifacts layer under every stage, imports at module level except the heavy
optional dependencies (each with its reason), and functions short enough to read at a glance."""

import ast
import shutil
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "edgeconformer"
LAZY_ALLOWED = {"coremltools", "wandb", "wandb_workspaces"}
TOP = {"cli", "ablate"}  # orchestration above the stages: may import anything below
STAGES = "stages"
LIBRARY = {
    "errors",
    "files",
    "config",
    "data",
    "decoding",
    "models",
    "scoring",
    "stabilize",
    "export",
    "metrics",
    "training",
    "hardware",
}
MAX_FUNCTION_LINES = 60  # def line to last line, docstring and comments included


def modules() -> dict[str, ast.Module]:
    out = {}
    for path in sorted(SRC.rglob("*.py")):
        parts = path.relative_to(SRC.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = ast.parse(path.read_text(), str(path))
    return out


def internal_imports(tree: ast.Module) -> list[tuple[str, ast.AST]]:
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("edgeconformer"):
            found += [(node.module, node)]
            if node.module == "edgeconformer":
                found += [(f"edgeconformer.{a.name}", node) for a in node.names if not a.name.startswith("__")]
        elif isinstance(node, ast.Import):
            found += [(a.name, node) for a in node.names if a.name.startswith("edgeconformer")]
    return found


def package(module: str) -> str:
    """edgeconformer.stages.train -> "stages"; edgeconformer.scoring -> "scoring"; the root -> "edgeconformer"."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def package_graph() -> dict[str, set[str]]:
    graph = defaultdict(set)
    for name, tree in modules().items():
        for target, _ in internal_imports(tree):
            a, b = package(name), package(target)
            if a != b and b != "edgeconformer":  # the root package holds only __version__
                graph[a].add(b)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_cycle_finder_finds_a_planted_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_the_package_import_graph_is_acyclic():
    assert find_cycle(package_graph()) is None


def test_stages_import_the_library_and_artifacts_never_each_other_or_the_cli():
    for name, tree in modules().items():
        for target, node in internal_imports(tree):
            where = f"{name} line {node.lineno} imports {target}"
            if name.startswith("edgeconformer.stages."):
                assert not target.startswith("edgeconformer.stages."), where
                assert package(target) not in TOP, where
            if package(name) in LIBRARY or package(name) == "artifacts":
                assert package(target) not in TOP | {STAGES}, where
            if package(name) in LIBRARY:
                assert package(target) != "artifacts", where + " (artifacts sits above the library)"


@pytest.mark.parametrize("name", sorted(modules()))
def test_imports_are_at_module_level_but_heavy_optional_ones_with_a_reason(name):
    path = SRC.parent / (name.replace(".", "/") + ".py")
    if not path.exists():
        path = SRC.parent / name.replace(".", "/") / "__init__.py"
    lines = path.read_text().splitlines()
    tree = ast.parse("\n".join(lines))
    for fn in [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]:
        for node in ast.walk(fn):
            if not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            root = (node.module if isinstance(node, ast.ImportFrom) else node.names[0].name).split(".")[0]
            where = f"{path.name}:{node.lineno}"
            assert root in LAZY_ALLOWED, f"{where}: import {root} inside a function; move it to the top"
            block = "\n".join(lines[max(0, node.lineno - 4) : node.lineno])
            assert "lazy:" in block or "try:" in block, f"{where}: say why the import is lazy (# lazy: ...)"


@pytest.mark.parametrize("command", [["check"], ["format", "--check"]], ids=["lint", "format"])
def test_the_code_passes_the_configured_linter_and_formatter(command):
    ruff = shutil.which("ruff", path=str(Path(sys.executable).parent)) or shutil.which("ruff")
    assert ruff, "ruff is not installed: run ./setup.sh (it installs the test extras)"
    root = SRC.parents[1]
    proc = subprocess.run(
        [ruff, *command, "--no-cache", "src", "tests", "benchmarks", "pipelines", "hydra_plugins"],
        cwd=root,
        capture_output=True,
        text=True,
    )
    fix = "ruff format src tests benchmarks pipelines hydra_plugins" if "format" in command else "ruff check --fix"
    assert proc.returncode == 0, f"run `{fix}`\n" + proc.stdout[-3000:] + proc.stderr[-1000:]


def function_lengths() -> dict[str, int]:
    """{"module:qualified name": lines from the def line to the function's last line} of every function in src/."""
    out = {}

    def visit(node, module, prefix):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                name = f"{prefix}{child.name}"
                if not isinstance(child, ast.ClassDef):
                    out[f"{module}:{name}"] = child.end_lineno - child.lineno + 1
                visit(child, module, name + ".")
            else:
                visit(child, module, prefix)

    for module, tree in modules().items():
        visit(tree, module, "")
    return out


def test_the_length_finder_names_nested_functions_and_methods():
    lengths = function_lengths()
    assert lengths["edgeconformer.stages.train:train"] > 1
    assert any(name.startswith("edgeconformer.training.callbacks:TimeGuard.") for name in lengths)


def test_functions_are_short_enough_to_read_at_a_glance():
    lengths = function_lengths()
    long = {name: n for name, n in lengths.items() if n > MAX_FUNCTION_LINES}
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines; split them into named helpers: {long}"
