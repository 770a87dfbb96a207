"""The shape of the source tree: imports run one way through declared layers, without cycles; source files stay
small; docstrings name only files that exist.

Imports are read with ``ast`` from every module under ``src/mask2former``, including the lazy ones inside functions
(they are dependencies all the same). Imports under ``if TYPE_CHECKING:`` are left out: they never run, so they
neither create an import cycle nor a run-time dependency (``training/callbacks.py`` names ``Trainer`` that way).
"""

from __future__ import annotations

import ast
import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
PACKAGE = "mask2former"

# Lowest first. A module may import from its own layer or any layer below; the longest matching prefix decides a
# module's layer. Apps are the entry points above the library: the CLI, the train entry point, predict-to-files,
# the HTTP server, ONNX export, and the package's own facade (``mask2former/__init__.py``).
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("config", ("mask2former.config", "mask2former.allocator")),
    ("data", ("mask2former.data",)),
    ("interop", ("mask2former.interop",)),
    ("modeling", ("mask2former.modeling",)),
    ("inference", ("mask2former.inference", "mask2former.viz", "mask2former.label_layout")),
    ("training", ("mask2former.training",)),
    ("evaluation", ("mask2former.evaluation",)),
    ("apps", ("mask2former", "mask2former.apps", "mask2former.cli", "mask2former.__main__",
              "mask2former.serve")),
]

MAX_LINES = 450
# Files named in docstrings that belong to other projects (detectron2's and Mask2Former's tool scripts).
EXTERNAL_FILES = {"convert-torchvision-to-d2.py", "tools/convert-torchvision-to-d2.py",
                  "tools/convert-pretrained-swin-model-to-d2.py"}


def _modules() -> dict[str, tuple[Path, bool]]:
    """Dotted module name -> (path, is a package ``__init__``)."""
    modules = {}
    for path in sorted((SRC / PACKAGE).rglob("*.py")):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        modules[".".join(parts[:-1] if is_package else parts)] = (path, is_package)
    return modules


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    skipped = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skipped.update(id(child) for statement in node.body for child in ast.walk(statement))
    return skipped


def _imports(name: str, modules: dict[str, tuple[Path, bool]]) -> set[str]:
    """The package modules ``name`` imports (``from x import y`` counts ``x.y`` when that is a module)."""
    path, is_package = modules[name]
    tree = ast.parse(path.read_text())
    skipped = _type_checking_nodes(tree)
    package = name if is_package else name.rpartition(".")[0]
    found = set()

    def owner(dotted: str) -> str:
        while dotted not in modules:
            dotted = dotted.rpartition(".")[0]
        return dotted

    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            found.update(owner(alias.name) for alias in node.names if alias.name.split(".")[0] == PACKAGE)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            if base.split(".")[0] != PACKAGE:
                continue
            for alias in node.names:
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else owner(base))
    found.discard(name)
    return found


def _layer(name: str) -> int:
    best, rank = -1, None
    for index, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            matches = name == prefix or (prefix != PACKAGE and name.startswith(prefix + "."))
            if matches and len(prefix) > best:
                best, rank = len(prefix), index
    assert rank is not None, f"{name} is in no layer of LAYERS"
    return rank


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, modules) for name in modules}


def _cycles(graph: dict[str, set[str]]) -> list[set[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components = []
    for start in graph:
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = set()
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.add(member)
                    if member == node:
                        break
                if len(component) > 1:
                    components.append(component)
    return components


def test_imports_follow_the_layers():
    graph = _graph()
    back_edges = {(source, target) for source, targets in graph.items() for target in targets
                  if _layer(target) > _layer(source)}
    names = [name for name, _ in LAYERS]
    assert not back_edges, "imports from a higher layer: " + "; ".join(
        f"{source} ({names[_layer(source)]}) -> {target} ({names[_layer(target)]})"
        for source, target in sorted(back_edges))


def test_no_import_cycles():
    cycles = _cycles(_graph())
    assert not cycles, f"import cycles: {[sorted(cycle) for cycle in cycles]}"


def test_the_checker_sees_lazy_imports_and_back_edges():
    # An oracle for the walker itself: known facts of the tree.
    graph = _graph()
    assert "mask2former.modeling.model" in graph["mask2former.modeling.build"]
    assert "mask2former.interop.backbone_weights" in graph["mask2former.modeling.build"]  # inside a function
    assert "mask2former.data.build" in graph["mask2former.evaluation.evaluator"]  # inside a function
    assert "mask2former.training.trainer" not in graph["mask2former.training.callbacks"]  # TYPE_CHECKING only
    assert _layer("mask2former.apps.predict_files") > _layer("mask2former.evaluation.evaluator")
    assert _layer("mask2former.apps.onnx") > _layer("mask2former.modeling.model") > _layer("mask2former.interop.hf")
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [{"a", "b", "c"}]


def test_source_files_are_short():
    long = {str(path.relative_to(ROOT)): count for path in sorted((SRC / PACKAGE).rglob("*.py"))
            if (count := len(path.read_text().splitlines())) > MAX_LINES}
    assert not long, f"source files over {MAX_LINES} lines: {long}"


REFERENCE = re.compile(r"(?<![\w/.-])((?:[\w.-]+/)*[\w-]+\.(?:py|md))\b")


def _repository_files() -> list[str]:
    listed = subprocess.run(["git", "-C", str(ROOT), "ls-files", "--cached", "--others", "--exclude-standard"],
                            capture_output=True, text=True, check=True).stdout.split()
    return [name for name in listed if (ROOT / name).exists()]


def test_docstrings_name_existing_files():
    files = _repository_files()
    missing = set()
    for name in files:
        if not name.endswith(".py") or not name.startswith(("src/", "benchmarks/", "scripts/")):
            continue
        tree = ast.parse((ROOT / name).read_text())
        for node in ast.walk(tree):
            if not isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for reference in REFERENCE.findall(ast.get_docstring(node, clean=False) or ""):
                exists = any(file == reference or file.endswith("/" + reference) for file in files)
                if not exists and reference not in EXTERNAL_FILES:
                    missing.add((name, reference))
    assert not missing, f"docstrings name files that do not exist: {sorted(missing)}"
